//! The synchronous path, the change map and resync.
//!
//! **Sync mode.** A write is given a sequence number and an epoch and sent to staging on the
//! session's agent link (TLS over TCP, `drv_transport::link`), under the lock that assigns them, so
//! frames leave in sequence order; the frame goes into the socket on the writer's own thread. The
//! reader task resolves waiters from the cumulative `Ack` frames; the local write runs only
//! after the acknowledgement and the write completes after both. In-flight bytes are bounded.
//! Overlapping writes are never in flight together (the local disk and staging would otherwise see
//! them in different orders). An idle volume gets an `EPOCH_END` record.
//!
//! **Change-map mode.** When staging is unreachable, too slow (`ack_timeout`) or reports its log
//! full, the agent marks each write's blocks in the persistent change map (durably) before the local
//! write, and writes go local only; the write that failed is handled the same way, so nothing is
//! lost. A background task reconnects.
//!
//! **Resync.** Once connected again, the agent ships the marked blocks as `RESYNC` records read from
//! the local disk, in passes (writes keep going to the change map meanwhile and are shipped by the
//! next pass). The last pass holds new writes back, ships what is left, clears the map and returns to
//! sync mode; an `EPOCH_END` record then ends the resync run so the replica applies it at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use drv_format::frame::Frame;
use drv_format::record::{Flags, MAX_WRITE_BYTES};
use drv_proto::{Issue, Order, Stamp};
use drv_transport::{Identity, TransportError};
use tokio::sync::{Notify, RwLock, Semaphore};

use crate::activity::ActivityLog;
use crate::changemap::{ChangeMap, ChangeMapError};
use crate::session::{AckWait, Session, open_session};

pub use drv_proto::Mode;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("staging refused volume {volume}: {message}")]
    Refused { volume: u64, message: String },
    /// Staging reported its write log full (the cue for the change map).
    #[error("staging write log full: {0}")]
    LogFull(String),
    #[error("staging did not acknowledge seq {seq} within {timeout:?}")]
    AckTimeout { seq: u64, timeout: Duration },
    #[error("the connection to staging is gone")]
    Disconnected,
    /// Staging answered but cannot take writes now (its log failed).
    #[error("staging cannot take writes now: {0}")]
    Unavailable(String),
    #[error("write of {0} bytes is over the {MAX_WRITE_BYTES}-byte limit of one record")]
    TooLarge(usize),
    #[error("local write at offset {offset}: {err}")]
    Local { offset: u64, err: std::io::Error },
    #[error(transparent)]
    ChangeMap(#[from] ChangeMapError),
    /// Another process has the state directory (names it).
    #[error(transparent)]
    StateInUse(#[from] drv_files::LockError),
    #[error("range at offset {offset} ({len} bytes) is outside the volume ({volume_bytes} bytes)")]
    OutOfRange { offset: u64, len: u64, volume_bytes: u64 },
    #[error("staging is unavailable and this agent has no change map: the write at offset {offset} failed: {why}")]
    Unprotected { offset: u64, why: String },
    #[error(transparent)]
    StagingLost(#[from] drv_proto::StagingLost),
    /// A digest of the local disk could not be taken at one sequence number.
    #[error("no exact digest: {0}")]
    NotExact(String),
    /// A resync used up the room staging reported for its session (it asks again; never shown).
    #[error("the room staging's log reported for this session is used up")]
    RoomUsed,
    /// The file that keeps an initial sync's `FULL` mark across restarts (names it).
    #[error("{path}: {err}")]
    FullMarker { path: String, err: std::io::Error },
}

/// The local disk of a protected volume: where a write goes once staging has it.
pub trait LocalDisk: Send + Sync + 'static {
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Makes every completed write stable (FLUSH; and after a FUA write).
    fn flush(&self) -> std::io::Result<()>;
}

/// A file or block device opened for the local writes.
pub struct FileDisk(pub std::fs::File);

impl LocalDisk for FileDisk {
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, data, offset)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
}

#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Bytes of writes between issue and completion; writers wait beyond it.
    pub inflight_bytes_limit: u64,
    /// How long a write may wait for the staging acknowledgement before the agent switches to its
    /// change map.
    pub ack_timeout: Duration,
    /// Nothing in flight for this long ends the current epoch (an `EPOCH_END` record).
    pub epoch_close_idle: Duration,
    /// Delay between reconnection attempts while in change-map mode.
    pub reconnect_interval: Duration,
    /// A resync pass this small (in blocks) is the last one: new writes wait while it runs.
    pub final_pass_blocks: usize,
    /// Block size of the change map.
    pub change_block_bytes: u64,
    /// Extent size of the activity log (the ranges resynced after a crash of the agent or host).
    pub activity_extent_bytes: u64,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            inflight_bytes_limit: 32 << 20,
            ack_timeout: Duration::from_secs(5),
            epoch_close_idle: Duration::from_millis(20),
            reconnect_interval: Duration::from_millis(500),
            final_pass_blocks: 256,
            change_block_bytes: 64 << 10,
            activity_extent_bytes: 4 << 20,
        }
    }
}

/// Counters for status and the demo.
#[derive(Debug, Default)]
pub struct AgentStats {
    pub writes: AtomicU64,
    pub bytes: AtomicU64,
    pub epochs_closed: AtomicU64,
    /// Writes that went to the change map instead of staging.
    pub mapped_writes: AtomicU64,
    pub resync_blocks: AtomicU64,
    pub resync_bytes: AtomicU64,
    pub mode_switches: AtomicU64,
}

/// Local writes up to this size without FLUSH/FUA run inline on the async worker.
const INLINE_WRITE_BYTES: u64 = 64 << 10;

/// The order core and the session records are sent on, under one lock: frames leave in sequence
/// order.
pub(crate) struct Ordered {
    pub core: Order,
    pub session: Option<Arc<Session>>,
}

impl Ordered {
    /// Sends the record `stamp` (built by `f`) on the session: `None` when there is none or it is
    /// broken.
    pub fn send(&self, stamp: Stamp, f: impl FnOnce(Stamp) -> Frame) -> Option<(u64, AckWait)> {
        let s = self.session.as_ref()?;
        Some((stamp.seq, s.send(stamp.seq, f(stamp))?))
    }

    /// Why the current session broke, if it did.
    fn broken_reason(&self) -> Option<String> {
        self.session.as_ref().and_then(|s| s.broken_reason())
    }
}

/// The zero-length `EPOCH_END` record that ends `stamp.epoch`.
pub(crate) fn epoch_end(volume_id: u64) -> impl FnOnce(Stamp) -> Frame {
    move |s| Frame::Write {
        volume_id,
        seq: s.seq,
        epoch: s.epoch,
        offset: 0,
        flags: Flags::EPOCH_END.0,
        capture_unix: drv_format::record::capture_clock(),
        data: Bytes::new(),
    }
}

/// The file in the state directory that says an initial sync's `FULL` record is still owed. It is
/// written (durably) before the blocks are marked and removed (durably) once staging acknowledged
/// the record; an agent that starts and finds it marks every block again and owes the record, so
/// a replica waiting for a `FULL` record gets one even if the agent died in between.
pub const FULL_MARKER: &str = "full-sync";

/// The `FULL` mark of an initial sync: the first RESYNC record sent after every block was marked
/// carries `Flags::FULL` (a replica added later may start there). Exactly one record of a run
/// carries it while it is in flight; if the pass stops before staging acknowledged it, the next
/// record carries it again (a record sent before it, whose block staging acknowledged, would be
/// missing for a replica that starts at a later mark).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FullMark {
    None,
    /// The next RESYNC record carries it.
    Pending,
    /// Carried by the record of this sequence, not yet acknowledged.
    InFlight(u64),
}

pub(crate) struct Inner {
    pub volume_id: u64,
    pub volume_bytes: u64,
    pub id: Identity,
    pub staging: SocketAddr,
    pub disk: Arc<dyn LocalDisk>,
    pub map: Option<Arc<ChangeMap>>,
    activity: Option<Arc<ActivityLog>>,
    pub order: Mutex<Ordered>,
    /// Writes hold it shared; the last resync pass holds it exclusively.
    pub gate: RwLock<()>,
    pub inflight: Semaphore,
    range_freed: Notify,
    idle: Arc<Notify>,
    pub degraded: Arc<Notify>,
    pub opts: AgentOptions,
    pub stats: AgentStats,
    /// Resync bandwidth limit in bytes per second (0: none).
    pub bwlimit: AtomicU64,
    /// Where the `FULL` mark of an initial sync stands (see `FullMark`).
    pub full: Mutex<FullMark>,
    /// `STATE/full-sync`: present from the start of an initial sync until staging acknowledged
    /// its `FULL` record, so a restart in between starts the sync again (see `FULL_MARKER`).
    pub full_marker: Option<std::path::PathBuf>,
    /// The highest sequence number staging acknowledged, on any session: a staging server that
    /// comes back holding less lost acknowledged writes (`drv_proto::StagingLost`).
    pub acked: Arc<AtomicU64>,
    /// See [`AgentStatus::problem`].
    pub problem: Mutex<Option<String>>,
    /// The state directory's lock (held while the agent lives).
    _lock: Option<drv_files::DirLock>,
    /// Told each write's epoch as it is issued (see [`Agent::set_issue_tap`]).
    tap: std::sync::OnceLock<IssueTap>,
}

/// Called with `(offset, len, epoch)` of each data write as the agent issues it, under the lock
/// that assigns epochs (so in issue order). It must not block.
pub type IssueTap = Box<dyn Fn(u64, u64, u64) + Send + Sync>;

/// The agent of one protected volume. Runs on a multi-threaded tokio runtime (the short local
/// write runs on the calling worker through `block_in_place`).
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

/// 4 KiB units of the in-flight limit.
pub(crate) fn units(bytes: usize) -> u32 {
    (bytes.div_ceil(4096).max(1)).min(u32::MAX as usize) as u32
}

/// How a write was issued.
enum Issued {
    Staging(AckWait),
    Local,
}

impl Agent {
    /// Starts the agent of `volume_id` (`volume_bytes` long). With a state directory (change map
    /// `changemap` and activity log `activity` in it) the agent keeps protecting the volume when
    /// staging is away, and starts by resyncing whatever an earlier run left marked, including the
    /// extents that had writes in doubt when it died; without one, writes fail while staging is
    /// away.
    pub async fn start(
        id: &Identity,
        staging: SocketAddr,
        volume_id: u64,
        volume_bytes: u64,
        disk: Arc<dyn LocalDisk>,
        state_dir: Option<&std::path::Path>,
        opts: AgentOptions,
    ) -> Result<Agent, AgentError> {
        let permits = (opts.inflight_bytes_limit / 4096).clamp(1, Semaphore::MAX_PERMITS as u64) as usize;
        let state = state_dir.map(|d| crate::state::open(d, volume_id, volume_bytes, &opts)).transpose()?;
        let (map, activity, lock) = match state {
            Some(s) => (Some(s.map), Some(s.activity), Some(s.lock)),
            None => (None, None, None),
        };
        let full_marker = state_dir.map(|d| d.join(FULL_MARKER));
        let owed = full_marker.as_ref().is_some_and(|p| p.exists());
        if let (Some(m), true) = (&map, owed) {
            let m = m.clone();
            blocking(0, move || m.mark_all()).await?;
            tracing::warn!(volume = volume_id, "an initial sync did not finish its first record: starting it again");
        }
        let dirty = map.as_ref().is_some_and(|m| m.dirty_bytes() > 0);
        let inner = Arc::new(Inner {
            volume_id,
            volume_bytes,
            id: id.clone(),
            staging,
            disk,
            map,
            activity,
            order: Mutex::new(Ordered { core: Order::new(), session: None }),
            gate: RwLock::new(()),
            inflight: Semaphore::new(permits),
            range_freed: Notify::new(),
            idle: Arc::default(),
            degraded: Arc::default(),
            opts,
            stats: AgentStats::default(),
            tap: std::sync::OnceLock::new(),
            bwlimit: AtomicU64::new(0),
            full: Mutex::new(if owed { FullMark::Pending } else { FullMark::None }),
            full_marker,
            acked: Arc::default(),
            problem: Mutex::default(),
            _lock: lock,
        });
        match open_session(id, staging, volume_id, inner.opts.ack_timeout, inner.acked.clone()).await {
            Ok(o) if !dirty => {
                let mut ord = inner.order.lock().expect("order");
                ord.core.connected(o.last_seq, o.last_epoch);
                ord.session = Some(o.session);
                tracing::info!(
                    volume_id,
                    last_seq = o.last_seq,
                    last_epoch = o.last_epoch,
                    "agent connected to staging {staging}"
                );
            }
            // Marked blocks from an earlier run: the reconnect task resyncs them first (it asks
            // staging for room on a session of its own).
            Ok(_) => tracing::info!(volume_id, "blocks marked by an earlier run: resyncing them first"),
            // A refusal is a configuration problem (unknown volume, wrong certificate), not an
            // outage: say so instead of protecting a volume staging will never take.
            Err(e @ AgentError::Refused { .. }) => return Err(e),
            Err(e) if inner.map.is_some() => {
                tracing::warn!("staging not reachable, protecting with the change map: {e}")
            }
            Err(e) => return Err(e),
        }
        tokio::spawn(Inner::reconnect_task(Arc::downgrade(&inner)));
        tokio::spawn(idle_closer(Arc::downgrade(&inner), inner.idle.clone(), inner.opts.epoch_close_idle));
        Ok(Agent { inner })
    }

    /// The write of `data` at `offset`: to staging, then (after its acknowledgement) to the local
    /// disk; returns when both are done. In change-map mode: marked, then local.
    pub async fn write(&self, offset: u64, data: Bytes, flags: Flags) -> Result<(), AgentError> {
        let disk = self.inner.disk.clone();
        let d = data.clone();
        self.write_with(offset, data, flags, move || async move {
            let len = d.len() as u64;
            let local = move || {
                if !d.is_empty() {
                    disk.write_at(offset, &d)?;
                }
                if flags.contains(Flags::FLUSH) || flags.contains(Flags::FUA) {
                    disk.flush()?;
                }
                Ok(())
            };
            // The local write is one syscall: run it on this worker rather than handing it to
            // another thread. A small write without a flush takes microseconds: run it inline
            // (`block_in_place` would hand this worker's queue to another thread for each one,
            // which costs more than the write); a flush or a large write may take milliseconds,
            // so the worker's other tasks move elsewhere meanwhile.
            let quick = len <= INLINE_WRITE_BYTES && !flags.contains(Flags::FLUSH) && !flags.contains(Flags::FUA);
            if quick { local() } else { tokio::task::block_in_place(local) }
        })
        .await
    }

    /// For capture paths that perform the local write themselves (a kernel module releasing the
    /// held bio, a userspace device writing its image): `local` is called once staging has the
    /// write (or the change map has it marked), and the write is complete when its future
    /// resolves. It is not called when the write fails before that (then nothing may reach the
    /// local disk: the capture path fails the application's write).
    pub async fn write_with<F, Fut>(&self, offset: u64, data: Bytes, flags: Flags, local: F) -> Result<(), AgentError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = std::io::Result<()>> + Send,
    {
        let i = &self.inner;
        if data.len() > MAX_WRITE_BYTES as usize {
            return Err(AgentError::TooLarge(data.len()));
        }
        let _gate = i.gate.read().await;
        let permit = i.inflight.acquire_many(units(data.len())).await.map_err(|_| AgentError::Disconnected)?;
        let len = data.len() as u64;
        i.activity_enter(offset, len).await?;
        let mut data = Some(data);
        let issued = loop {
            let freed = i.range_freed.notified();
            if let Some(x) = i.try_issue(offset, flags, &mut data) {
                break x;
            }
            freed.await;
        };
        let mut result = i.protect(issued, offset, len).await;
        if let Ok(marked) = result {
            let flush_gen = match &i.activity {
                Some(al) if flags.contains(Flags::FLUSH) => Some(al.flush_begin()),
                _ => None,
            };
            result = local().await.map(|()| marked).map_err(|err| AgentError::Local { offset, err });
            if let (Some(map), true) = (&i.map, marked) {
                map.write_done(offset, len);
            }
            if let (Some(al), Some(g), true) = (&i.activity, flush_gen, result.is_ok()) {
                result = al.flush_done(g).map(|()| marked).map_err(AgentError::from);
            }
        }
        // Always: a write that ends, however, leaves the order (its range, the epoch's count).
        i.finish(offset, len);
        drop(permit);
        if result.is_ok() {
            i.stats.writes.fetch_add(1, Ordering::Relaxed);
            i.stats.bytes.fetch_add(len, Ordering::Relaxed);
        }
        result.map(|_| ())
    }

    /// Installs the tap told every data write's epoch as it is issued (once; a second call is
    /// ignored). The userspace capture path uses it to cross-check its epochs against the kernel's
    /// order of the loop device (`drv_blocktrace::order::Checker`).
    pub fn set_issue_tap(&self, tap: IssueTap) {
        let _ = self.inner.tap.set(tap);
    }

    /// Initial sync: marks every block and ships the whole volume to the replica through staging
    /// (as a resync, at most `bwlimit` bytes per second) while writes go on; writes during it are
    /// marked and shipped by a later pass. Returns at once; `status()` shows the progress
    /// (`resync_bytes` against `dirty_bytes`), and the mode is sync again when it is done. The
    /// replica is consistent only once it completes (the whole run applies as one unit).
    pub async fn start_initial_sync(&self, bwlimit: Option<u64>) -> Result<(), AgentError> {
        let i = &self.inner;
        // Like a write: never while the last resync pass runs (it clears the map when done).
        let _gate = i.gate.read().await;
        let map = i.state_map("an initial sync")?;
        // None: the limit set before (the volume's configured one) stays.
        if let Some(b) = bwlimit {
            i.bwlimit.store(b, Ordering::Relaxed);
        }
        if let Some(p) = i.full_marker.clone() {
            let path = p.display().to_string();
            let text = b"an initial sync owes its FULL record\n";
            blocking(0, move || drv_files::replace(&p, text).map_err(|err| AgentError::FullMarker { path, err }))
                .await?;
        }
        let m = map.clone();
        blocking(0, move || m.mark_all()).await?;
        *i.full.lock().expect("full mark") = FullMark::Pending;
        tracing::info!(volume = i.volume_id, bytes = map.dirty_bytes(), ?bwlimit, "initial sync started");
        i.leave_sync("initial sync");
        Ok(())
    }

    /// Ships the given byte ranges again from the local disk (a media resync: the blocks the
    /// replica saw change since `drv media-resync begin`). The ranges are marked in the change map
    /// durably before this returns, so an agent crash after it loses none of them. The replica is
    /// consistent again once the resync completes (`status()` shows sync mode and no dirty bytes).
    pub async fn resync_ranges(&self, ranges: &[(u64, u64)]) -> Result<(), AgentError> {
        let i = &self.inner;
        let _gate = i.gate.read().await;
        let map = i.state_map("a resync")?;
        if let Some(&(offset, len)) = ranges.iter().find(|(o, l)| o.checked_add(*l).is_none_or(|e| e > i.volume_bytes))
        {
            return Err(AgentError::OutOfRange { offset, len, volume_bytes: i.volume_bytes });
        }
        let (m, r) = (map.clone(), ranges.to_vec());
        blocking(0, move || m.mark_ranges(&r)).await?;
        tracing::info!(
            volume = i.volume_id,
            ranges = ranges.len(),
            dirty_bytes = map.dirty_bytes(),
            "resync requested"
        );
        i.leave_sync("resync requested");
        Ok(())
    }

    /// Sets the resync bandwidth limit (bytes per second; `None`: unlimited).
    pub fn set_bwlimit(&self, bwlimit: Option<u64>) {
        self.inner.bwlimit.store(bwlimit.unwrap_or(0), Ordering::Relaxed);
    }

    /// Ends the current epoch now if nothing is in flight (the idle task does this on its own).
    pub fn close_epoch(&self) {
        self.inner.close_idle_epoch();
    }

    /// The next sequence number and the current epoch.
    pub fn position(&self) -> (u64, u64) {
        self.inner.order.lock().expect("order").core.position()
    }

    pub fn mode(&self) -> Mode {
        self.inner.order.lock().expect("order").core.mode()
    }

    /// Waits until the agent is in sync mode with a clear change map (everything marked was
    /// shipped and acknowledged), at most `timeout`: whether it got there.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.mode() == Mode::Sync && self.dirty_bytes() == 0 {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Bytes marked in the change map (what a resync will ship).
    /// The xxh3-128 digest of the local disk holding every write up to the returned sequence
    /// number and none after: new writes wait while the disk is read (a pause of the volume for
    /// as long as reading it takes). Refused outside sync mode (writes in the change map are not
    /// at staging yet: the disk is ahead of every sequence number). Compare it with `drv snapshot
    /// digest` of a replica snapshot at that sequence number (or after it, with no write between).
    pub async fn digest(&self) -> Result<AgentDigest, AgentError> {
        let i = &self.inner;
        let _exclusive = i.gate.write().await;
        let check = || -> Result<(u64, u64), AgentError> {
            let (mode, dirty) = (self.mode(), self.dirty_bytes());
            if mode != Mode::Sync || dirty > 0 {
                return Err(AgentError::NotExact(format!(
                    "the agent is in {mode} mode with {dirty} bytes marked: the local disk holds writes staging does not have yet"
                )));
            }
            Ok((self.position().0 - 1, i.stats.mapped_writes.load(Ordering::Relaxed)))
        };
        let before = check()?;
        let (disk, size) = (i.disk.clone(), i.volume_bytes);
        let xxh3_128 = blocking(0, move || -> Result<u128, AgentError> {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            let mut buf = vec![0u8; DIGEST_READ_BYTES];
            let mut offset = 0;
            while offset < size {
                let n = (size - offset).min(DIGEST_READ_BYTES as u64) as usize;
                disk.read_at(offset, &mut buf[..n]).map_err(|err| AgentError::Local { offset, err })?;
                h.update(&buf[..n]);
                offset += n as u64;
            }
            Ok(h.digest128())
        })
        .await?;
        // Writes that passed by meanwhile (a capture path's hold timeout) went to the change map.
        // (An idle EPOCH_END may have taken a sequence number: it changes no block.)
        if check()?.1 != before.1 {
            return Err(AgentError::NotExact("writes passed by while the disk was read: try again".into()));
        }
        Ok(AgentDigest { seq: before.0, bytes: size, xxh3_128: format!("{xxh3_128:032x}") })
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.inner.map.as_ref().map(|m| m.dirty_bytes()).unwrap_or(0)
    }

    pub fn stats(&self) -> &AgentStats {
        &self.inner.stats
    }

    /// Mode, positions, dirty bytes and counters.
    pub fn status(&self) -> AgentStatus {
        let (next_seq, epoch) = self.position();
        let s = self.stats();
        AgentStatus {
            volume_id: self.inner.volume_id,
            volume_bytes: self.inner.volume_bytes,
            mode: self.mode(),
            next_seq,
            epoch,
            dirty_bytes: self.dirty_bytes(),
            writes: s.writes.load(Ordering::Relaxed),
            mapped_writes: s.mapped_writes.load(Ordering::Relaxed),
            resync_bytes: s.resync_bytes.load(Ordering::Relaxed),
            problem: self.inner.problem.lock().expect("problem").clone(),
        }
    }
}

/// Bytes read at once for [`Agent::digest`].
const DIGEST_READ_BYTES: usize = 1 << 20;

/// The digest of the local disk at a sequence number ([`Agent::digest`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentDigest {
    /// Every write up to `seq` is in it, none after.
    pub seq: u64,
    pub bytes: u64,
    /// 32 hex digits.
    pub xxh3_128: String,
}

/// What `Agent::status` reports.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AgentStatus {
    pub volume_id: u64,
    pub volume_bytes: u64,
    pub mode: Mode,
    /// What keeps the agent from protecting the volume through staging, when something does
    /// that the operator must act on (staging lost acknowledged writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    pub next_seq: u64,
    pub epoch: u64,
    pub dirty_bytes: u64,
    pub writes: u64,
    pub mapped_writes: u64,
    pub resync_bytes: u64,
}

/// Runs `f` (change-map or disk I/O) on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static, E>(
    offset: u64,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, AgentError>
where
    E: Send + 'static,
    AgentError: From<E>,
{
    let r = tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Local { offset, err: std::io::Error::other(e.to_string()) })?;
    Ok(r?)
}

/// Ends the epoch once nothing was in flight for `wait` (an `EPOCH_END` record), until the agent
/// is gone.
async fn idle_closer(weak: std::sync::Weak<Inner>, idle: Arc<Notify>, wait: Duration) {
    loop {
        // The timer only rechecks that the agent still exists.
        tokio::select! {
            _ = idle.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if weak.strong_count() == 0 { return }
                continue;
            }
        }
        tokio::time::sleep(wait).await;
        let Some(i) = weak.upgrade() else { return };
        i.close_idle_epoch();
    }
}

impl Inner {
    /// Marks the write's extents in the activity log before it goes to staging.
    async fn activity_enter(&self, offset: u64, len: u64) -> Result<(), AgentError> {
        let Some(al) = self.activity.clone() else { return Ok(()) };
        if len == 0 {
            return Ok(());
        }
        // Usually the extent is marked already: no I/O, no thread hand-off.
        if al.map.is_marked(offset, len) {
            return Ok(al.enter(offset, len)?);
        }
        blocking(offset, move || al.enter(offset, len)).await
    }

    /// Issues the write: to staging in sync mode, else for the change map. `None` while a write in
    /// flight overlaps it.
    fn try_issue(&self, offset: u64, flags: Flags, data: &mut Option<Bytes>) -> Option<Issued> {
        let len = data.as_ref().map(|d| d.len() as u64).unwrap_or(0);
        let mut o = self.order.lock().expect("order");
        let issue = o.core.try_issue(offset, len)?;
        let (Issue::Staging { epoch, .. } | Issue::Local { epoch }) = issue;
        if len > 0
            && let Some(tap) = self.tap.get()
        {
            tap(offset, len, epoch);
        }
        if let Issue::Staging { seq, epoch } = issue {
            let (volume_id, d) = (self.volume_id, data.take().expect("issued once"));
            let capture_unix = drv_format::record::capture_clock();
            let frame = |s: Stamp| Frame::Write {
                volume_id,
                seq: s.seq,
                epoch: s.epoch,
                offset,
                flags: flags.0,
                capture_unix,
                data: d,
            };
            if let Some((_, rx)) = o.send(Stamp { seq, epoch }, frame) {
                return Some(Issued::Staging(rx));
            }
            // The session broke with nothing in flight to notice it (staging closed the link
            // between writes): this write goes to the change map, and the agent with it.
            if self.map.is_some() {
                let why = o.broken_reason().unwrap_or_else(|| "the link to staging is gone".into());
                self.switch_to_map(&mut o, &why);
            }
        }
        Some(Issued::Local)
    }

    /// Waits for staging's acknowledgement, or marks the write in the change map (when it is not
    /// in sync mode, or staging failed it). Returns whether the write was marked: then the map is
    /// told when the local write is done.
    async fn protect(&self, issued: Issued, offset: u64, len: u64) -> Result<bool, AgentError> {
        let failed = match issued {
            // Bounded by the session's watchdog (`ack_timeout`).
            Issued::Staging(rx) => match rx.await.unwrap_or(Err(AgentError::Disconnected)) {
                Ok(()) => return Ok(false),
                Err(e) => Some(e),
            },
            Issued::Local => None,
        };
        // Staging may or may not have it: the change map covers it either way.
        if let Some(e) = failed {
            self.degrade(&e)?;
        }
        // A flush (no data) changes no block: nothing to mark.
        if len == 0 {
            return Ok(false);
        }
        self.mark(offset, len).await.map(|()| true)
    }

    /// The write ended (completed or failed): out of the activity log and the order.
    fn finish(&self, offset: u64, len: u64) {
        if let Some(al) = &self.activity
            && len > 0
        {
            al.leave(offset, len);
        }
        if self.order.lock().expect("order").core.complete(offset, len) {
            self.idle.notify_one();
        }
        self.range_freed.notify_waiters();
    }

    /// Marks a write's blocks before its local write (change-map mode); the caller tells the map
    /// when the local write is done (`ChangeMap::write_done`).
    async fn mark(&self, offset: u64, len: u64) -> Result<(), AgentError> {
        let Some(map) = self.map.clone() else {
            return Err(AgentError::Unprotected { offset, why: "not connected to staging".into() });
        };
        self.stats.mapped_writes.fetch_add(1, Ordering::Relaxed);
        blocking(offset, move || map.mark_write(offset, len)).await
    }

    /// The change map, which `what` needs.
    fn state_map(&self, what: &str) -> Result<&Arc<ChangeMap>, AgentError> {
        self.map.as_ref().ok_or_else(|| AgentError::Unprotected {
            offset: 0,
            why: format!("{what} needs the agent's state directory"),
        })
    }

    /// Leaves sync mode so that the reconnect task opens a fresh session and resyncs what the
    /// change map holds (a no-op in change-map or resync mode: that ships the map anyway).
    fn leave_sync(&self, why: &str) {
        let mut o = self.order.lock().expect("order");
        if o.core.leave_sync() {
            if let Some(s) = o.session.take() {
                s.fail(why.into(), AgentError::Disconnected);
            }
            self.degraded.notify_one();
        }
    }

    /// Staging failed a write: leave sync mode (once), so the reconnect task takes over.
    fn degrade(&self, why: &AgentError) -> Result<(), AgentError> {
        if self.map.is_none() {
            return Err(AgentError::Unprotected { offset: 0, why: why.to_string() });
        }
        let mut o = self.order.lock().expect("order");
        self.switch_to_map(&mut o, why);
        Ok(())
    }

    /// Sync mode ends: the session is dropped and the reconnect task takes over.
    pub(crate) fn switch_to_map(&self, o: &mut Ordered, why: &dyn std::fmt::Display) {
        // Why the session ended says more than what a write saw of it ("the connection to
        // staging is gone"): say that, once.
        let why = o.broken_reason().unwrap_or_else(|| why.to_string());
        if o.core.leave_sync() {
            tracing::warn!(volume = self.volume_id, "switching to the change map: {why}");
            if let Some(s) = o.session.take() {
                s.fail(format!("left sync mode: {why}"), AgentError::Disconnected);
            }
            self.stats.mode_switches.fetch_add(1, Ordering::Relaxed);
            self.degraded.notify_one();
        }
    }

    fn close_idle_epoch(&self) {
        let mut o = self.order.lock().expect("order");
        let Some(stamp) = o.core.close_idle() else { return };
        if o.send(stamp, epoch_end(self.volume_id)).is_some() {
            self.stats.epochs_closed.fetch_add(1, Ordering::Relaxed);
        }
    }
}
