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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use drv_format::frame::{Frame, code};
use drv_format::record::{Flags, MAX_WRITE_BYTES};
use drv_transport::link::{self, Link};
use drv_transport::{Identity, Role, TransportError, tls};
use tokio::sync::{Notify, RwLock, Semaphore, oneshot};

use crate::changemap::{ChangeMap, ChangeMapError};
use drv_proto::EpochClock;

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
    /// A resync used up the room staging reported for its session (it asks again; never shown).
    #[error("the room staging's log reported for this session is used up")]
    RoomUsed,
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
    /// Test hook: after staging acknowledges the n-th write of this agent, the agent stops before
    /// the local write (the test kills it there, making that write "in doubt").
    #[doc(hidden)]
    pub test_hang_after_ack: Option<u64>,
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
            test_hang_after_ack: None,
        }
    }
}

/// Where the volume's writes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// To staging, then the local disk.
    Sync,
    /// Local only, marked in the change map (staging away, too slow, or full).
    ChangeMap,
    /// Local only and marked, while the marked blocks are shipped to staging.
    Resyncing,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Sync => "sync",
            Mode::ChangeMap => "change-map",
            Mode::Resyncing => "resyncing",
        })
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

/// Per write in flight: when it was sent, and how to resolve its writer.
type Waiters = BTreeMap<u64, (std::time::Instant, oneshot::Sender<Result<(), AgentError>>)>;
/// Resolves when staging acknowledged the write (or the session failed).
type AckWait = oneshot::Receiver<Result<(), AgentError>>;

/// One connection to staging.
struct Session {
    out: Arc<Link>,
    waiters: Mutex<Waiters>,
    broken: Mutex<Option<String>>,
}

impl Drop for Session {
    /// Closes the link: the reader task sees the end, staging sees the agent go.
    fn drop(&mut self) {
        self.out.shutdown();
    }
}

impl Session {
    fn acked(&self, seq: u64) {
        let mut w = self.waiters.lock().expect("waiters");
        let rest = w.split_off(&(seq + 1));
        let done = std::mem::replace(&mut *w, rest);
        drop(w);
        for (_, (_, tx)) in done {
            let _ = tx.send(Ok(()));
        }
    }

    /// The stream is gone: every waiting write fails (the oldest with `first`).
    /// Not logged here: what the agent does about it (`switch_to_map`, a resync that stops) says
    /// it once, with this reason.
    fn fail(&self, why: String, first: AgentError) {
        let mut b = self.broken.lock().expect("broken");
        if b.is_none() {
            tracing::debug!("agent stream to staging ended: {why}");
            *b = Some(why);
        }
        drop(b);
        let waiters = std::mem::take(&mut *self.waiters.lock().expect("waiters"));
        let mut first = Some(first);
        for (_, (_, tx)) in waiters {
            let _ = tx.send(Err(first.take().unwrap_or(AgentError::Disconnected)));
        }
    }

    fn is_broken(&self) -> bool {
        self.broken.lock().expect("broken").is_some()
    }

    /// Why the session broke, if it did.
    fn broken_reason(&self) -> Option<String> {
        self.broken.lock().expect("broken").clone()
    }

    /// Queues a frame after registering its waiter.
    fn send(&self, seq: u64, f: Frame) -> Option<AckWait> {
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().expect("waiters").insert(seq, (std::time::Instant::now(), tx));
        if self.is_broken() || self.out.send(&f).is_err() {
            self.waiters.lock().expect("waiters").remove(&seq);
            return None;
        }
        Some(rx)
    }
}

/// Local writes up to this size without FLUSH/FUA run inline on the async worker.
const INLINE_WRITE_BYTES: u64 = 64 << 10;

/// The largest frame body accepted from staging (acknowledgements and errors are small).
const ACK_FRAME_BYTES_LIMIT: u32 = 1 << 20;

/// How long a connection attempt to staging may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A session just opened, and what staging said of the volume.
struct Opened {
    session: Arc<Session>,
    last_seq: u64,
    last_epoch: u64,
    /// Free bytes of staging's log, and all of its bytes.
    room_bytes: u64,
    capacity_bytes: u64,
}

/// Connects and opens the volume.
async fn open_session(
    id: &Identity,
    staging: SocketAddr,
    volume_id: u64,
    ack_timeout: Duration,
) -> Result<Opened, AgentError> {
    let cfg = tls::client_config(id, Role::Staging)?;
    let timeout = |_| TransportError::Connect {
        peer: staging.to_string(),
        reason: format!("no answer within {CONNECT_TIMEOUT:?}"),
    };
    // A refused connection is retried within the timeout: staging may be starting (or restarting).
    let connect = async {
        loop {
            match link::connect(staging, cfg.clone(), ACK_FRAME_BYTES_LIMIT).await {
                Err(TransportError::NotListening { .. }) => tokio::time::sleep(Duration::from_millis(50)).await,
                r => return r,
            }
        }
    };
    let (out, mut r) = tokio::time::timeout(CONNECT_TIMEOUT, connect).await.map_err(timeout)??;
    out.send(&Frame::OpenVolume { volume_id })?;
    let answer = tokio::time::timeout(CONNECT_TIMEOUT, r.next()).await.map_err(timeout)?;
    let (last_seq, last_epoch, room_bytes, capacity_bytes) = match answer? {
        Some(Frame::VolumeState { last_seq, last_epoch, room_bytes, capacity_bytes, .. }) => {
            (last_seq, last_epoch, room_bytes, capacity_bytes)
        }
        Some(Frame::Error { message, .. }) => return Err(AgentError::Refused { volume: volume_id, message }),
        _ => return Err(AgentError::Disconnected),
    };
    let s = Arc::new(Session { out, waiters: Mutex::default(), broken: Mutex::default() });
    // The ack timeout: one watchdog per session, not a timer per write. The oldest write in
    // flight waiting longer than `ack_timeout` fails the session (within a quarter more).
    let ws = Arc::downgrade(&s);
    tokio::spawn(async move {
        let tick = (ack_timeout / 4).max(Duration::from_millis(1));
        loop {
            tokio::time::sleep(tick).await;
            let Some(s) = ws.upgrade() else { return };
            if s.is_broken() {
                return;
            }
            let overdue = s
                .waiters
                .lock()
                .expect("waiters")
                .first_key_value()
                .and_then(|(seq, (sent, _))| (sent.elapsed() >= ack_timeout).then_some(*seq));
            if let Some(seq) = overdue {
                let e = AgentError::AckTimeout { seq, timeout: ack_timeout };
                return s.fail(e.to_string(), e);
            }
        }
    });
    let rs = Arc::downgrade(&s);
    tokio::spawn(async move {
        loop {
            let m = r.next().await;
            let Some(s) = rs.upgrade() else { return };
            match m {
                Ok(Some(Frame::Ack { seq, .. })) => s.acked(seq),
                Ok(Some(Frame::Error { code: c, message })) => {
                    let e = if c == code::LOG_FULL {
                        AgentError::LogFull(message.clone())
                    } else {
                        AgentError::Refused { volume: volume_id, message: message.clone() }
                    };
                    return s.fail(message, e);
                }
                Ok(Some(other)) => {
                    return s
                        .fail(format!("unexpected {:?} frame from staging", other.ftype()), AgentError::Disconnected);
                }
                Ok(None) => return s.fail("staging closed the stream".into(), AgentError::Disconnected),
                Err(e) => return s.fail(format!("receive from staging: {e}"), AgentError::Disconnected),
            }
        }
    });
    Ok(Opened { session: s, last_seq, last_epoch, room_bytes, capacity_bytes })
}

/// How many bytes a resync may ship on a session whose staging reported `room` free bytes of its
/// log's `capacity`, with `dirty` bytes to ship; `None`: wait for more room. It starts when all of
/// it fits, or when an eighth of the log is free. So a log that is full (its replica away) is left
/// alone until relaying frees room, instead of being filled and refused again and again, and a
/// resync never ships more than staging can take before it asks again.
fn resync_budget(room: u64, capacity: u64, dirty: u64) -> Option<u64> {
    // Record headers and tags (112 bytes per block), batch headers and padding take some room.
    let budget = room - room / 16;
    (budget >= dirty + dirty / 64 || room >= capacity / 8).then_some(budget)
}

struct Order {
    next_seq: u64,
    clock: EpochClock,
    /// Byte ranges of writes in flight, `start -> end`; they never overlap.
    ranges: BTreeMap<u64, u64>,
    mode: Mode,
    session: Option<Arc<Session>>,
}

impl Order {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        if start == end {
            return false;
        }
        self.ranges.range(..=start).next_back().is_some_and(|(_, e)| *e > start)
            || self.ranges.range(start..end).next().is_some()
    }

    /// Queues the zero-length `EPOCH_END` record that ends `epoch`.
    fn send_epoch_end(&mut self, volume_id: u64, epoch: u64) -> Option<(u64, AckWait)> {
        self.send(|seq| Frame::Write {
            volume_id,
            seq,
            epoch,
            offset: 0,
            flags: Flags::EPOCH_END.0,
            data: Bytes::new(),
        })
    }

    /// Assigns a sequence number and queues `f` (built from it) on the session.
    fn send(&mut self, f: impl FnOnce(u64) -> Frame) -> Option<(u64, AckWait)> {
        let s = self.session.clone()?;
        let seq = self.next_seq;
        let rx = s.send(seq, f(seq))?;
        self.next_seq += 1;
        Some((seq, rx))
    }
}

/// Extents with writes that staging may have and the local disk may not (yet, or durably): marked
/// before a write goes to staging, cleared after a FLUSH covering every write to the extent. After
/// a crash of the agent or the host, these extents are "in doubt" and are resynced from the local
/// disk, so the replica cannot keep a write the local disk lost.
struct ActivityLog {
    map: ChangeMap,
    state: Mutex<ActivityState>,
}

#[derive(Default)]
struct ActivityState {
    /// Writes in progress per extent.
    active: BTreeMap<u64, u32>,
    /// Per extent: the flush generation current when its last write completed.
    completed_in: BTreeMap<u64, u64>,
    flush_gen: u64,
}

impl ActivityLog {
    fn extents(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let e = self.map.block_bytes;
        offset / e..(offset + len.max(1)).div_ceil(e)
    }

    fn enter(&self, offset: u64, len: u64) -> Result<(), ChangeMapError> {
        {
            let mut st = self.state.lock().expect("activity");
            for x in self.extents(offset, len) {
                *st.active.entry(x).or_default() += 1;
            }
        }
        self.map.mark(offset, len)
    }

    fn leave(&self, offset: u64, len: u64) {
        let mut st = self.state.lock().expect("activity");
        let g = st.flush_gen;
        for x in self.extents(offset, len) {
            if let Some(n) = st.active.get_mut(&x) {
                *n -= 1;
                if *n == 0 {
                    st.active.remove(&x);
                }
            }
            st.completed_in.insert(x, g);
        }
    }

    fn flush_begin(&self) -> u64 {
        let mut st = self.state.lock().expect("activity");
        st.flush_gen += 1;
        st.flush_gen
    }

    /// A flush begun at generation `g` completed: every extent whose writes all completed before
    /// it began is stable locally.
    fn flush_done(&self, g: u64) -> Result<(), ChangeMapError> {
        let done: Vec<u64> = {
            let mut st = self.state.lock().expect("activity");
            let done: Vec<u64> = st
                .completed_in
                .iter()
                .filter(|(x, cg)| **cg < g && !st.active.contains_key(x))
                .map(|(x, _)| *x)
                .collect();
            for x in &done {
                st.completed_in.remove(x);
            }
            done
        };
        self.map.clear_lazily(&done)
    }
}

struct Inner {
    volume_id: u64,
    volume_bytes: u64,
    id: Identity,
    staging: SocketAddr,
    disk: Arc<dyn LocalDisk>,
    map: Option<Arc<ChangeMap>>,
    activity: Option<Arc<ActivityLog>>,
    order: Mutex<Order>,
    /// Writes hold it shared; the last resync pass holds it exclusively.
    gate: RwLock<()>,
    inflight: Semaphore,
    range_freed: Notify,
    idle: Arc<Notify>,
    degraded: Arc<Notify>,
    opts: AgentOptions,
    stats: AgentStats,
    /// Writes acknowledged by staging (for the test hook).
    acks: AtomicU64,
    /// Resync bandwidth limit in bytes per second (0: none).
    bwlimit: AtomicU64,
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
fn units(bytes: usize) -> u32 {
    (bytes.div_ceil(4096).max(1)).min(u32::MAX as usize) as u32
}

/// How one attempt of the reconnect task ended.
enum Attempt {
    Unreachable,
    /// Staging's log has no room for the resync yet.
    NoRoom,
    /// The resync used the room it was given: ask for more at once.
    Again,
    /// The resync completed, or failed (and goes on at the next attempt).
    Resynced,
}

/// How a write was issued.
enum Issued {
    Staging(u64, AckWait),
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
        let (map, activity, lock) = match state_dir {
            None => (None, None, None),
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|err| AgentError::Local { offset: 0, err })?;
                // One agent per state directory: two would each clear the other's marks.
                let lock = drv_files::lock_dir(dir, "agent state directory")?;
                let map = ChangeMap::open(&dir.join("changemap"), volume_id, volume_bytes, opts.change_block_bytes)?;
                let al = ChangeMap::open(&dir.join("activity"), volume_id, volume_bytes, opts.activity_extent_bytes)?;
                // Writes in doubt: staging may hold writes of these extents that the local disk
                // lacks. Resync them from the local disk before anything else.
                let doubt = al.dirty_blocks();
                if !doubt.is_empty() {
                    tracing::warn!(
                        volume_id,
                        extents = doubt.len(),
                        "writes in doubt from an earlier run: resyncing their extents"
                    );
                    for x in &doubt {
                        let off = x * al.block_bytes;
                        map.mark(off, al.block_bytes.min(volume_bytes - off))?;
                    }
                    al.clear_all()?;
                }
                (Some(Arc::new(map)), Some(Arc::new(ActivityLog { map: al, state: Mutex::default() })), Some(lock))
            }
        };
        let dirty = map.as_ref().is_some_and(|m| m.dirty_bytes() > 0);
        let inner = Arc::new(Inner {
            volume_id,
            volume_bytes,
            id: id.clone(),
            staging,
            disk,
            map,
            activity,
            order: Mutex::new(Order {
                next_seq: 1,
                clock: EpochClock::new(0),
                ranges: BTreeMap::new(),
                mode: Mode::ChangeMap,
                session: None,
            }),
            gate: RwLock::new(()),
            inflight: Semaphore::new(permits),
            range_freed: Notify::new(),
            idle: Arc::default(),
            degraded: Arc::default(),
            opts,
            stats: AgentStats::default(),
            acks: AtomicU64::new(0),
            tap: std::sync::OnceLock::new(),
            bwlimit: AtomicU64::new(0),
            _lock: lock,
        });
        let first = open_session(id, staging, volume_id, inner.opts.ack_timeout).await;
        match first {
            Ok(o) if !dirty => {
                let (last_seq, last_epoch) = (o.last_seq, o.last_epoch);
                let mut ord = inner.order.lock().expect("order");
                ord.next_seq = last_seq + 1;
                ord.clock = EpochClock::new(last_epoch);
                ord.session = Some(o.session);
                ord.mode = Mode::Sync;
                tracing::info!(volume_id, last_seq, last_epoch, "agent connected to staging {staging}");
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
        // Idle epoch closer.
        let (ci, idle_n, wait) = (Arc::downgrade(&inner), inner.idle.clone(), inner.opts.epoch_close_idle);
        tokio::spawn(async move {
            loop {
                // The timer only rechecks that the agent still exists.
                tokio::select! {
                    _ = idle_n.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        if ci.strong_count() == 0 { return }
                        continue;
                    }
                }
                tokio::time::sleep(wait).await;
                let Some(i) = ci.upgrade() else { return };
                i.close_idle_epoch();
            }
        });
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
        let end = offset + len;
        if let Some(al) = i.activity.clone()
            && len > 0
        {
            // Usually the extent is marked already: no I/O, no thread hand-off.
            if al.map.is_marked(offset, len) {
                al.enter(offset, len)?;
            } else {
                tokio::task::spawn_blocking(move || al.enter(offset, len))
                    .await
                    .map_err(|e| AgentError::Local { offset, err: std::io::Error::other(e.to_string()) })??;
            }
        }
        let mut data = Some(data);
        let issued = loop {
            let freed = i.range_freed.notified();
            if let Some(x) = i.try_issue(offset, flags, &mut data) {
                break x;
            }
            freed.await;
        };
        // Marked in the change map: the map is told when the local write is done.
        let mut marked = false;
        let mut result = match issued {
            Issued::Staging(seq, rx) => {
                // Bounded by the session's watchdog (`ack_timeout`).
                let acked = rx.await.unwrap_or(Err(AgentError::Disconnected));
                if acked.is_ok() && i.opts.test_hang_after_ack == Some(i.acks.fetch_add(1, Ordering::Relaxed) + 1) {
                    println!("HANG after ack of seq {seq}");
                    std::future::pending::<()>().await;
                }
                match acked {
                    Ok(()) => Ok(()),
                    // Staging may or may not have it: the change map covers it either way.
                    Err(e) => match i.degrade(&e) {
                        Ok(()) if len == 0 => Ok(()),
                        Ok(()) => i.mark(offset, len).await.map(|()| marked = true),
                        Err(x) => Err(x),
                    },
                }
            }
            // A flush (no data) changes no block: nothing to mark.
            Issued::Local if len == 0 => Ok(()),
            Issued::Local => i.mark(offset, len).await.map(|()| marked = true),
        };
        if result.is_ok() {
            let flush_gen = match &i.activity {
                Some(al) if flags.contains(Flags::FLUSH) => Some(al.flush_begin()),
                _ => None,
            };
            result = local().await.map_err(|err| AgentError::Local { offset, err });
            if let (Some(map), true) = (&i.map, marked) {
                map.write_done(offset, len);
            }
            if let (Some(al), Some(g), true) = (&i.activity, flush_gen, result.is_ok()) {
                al.flush_done(g)?;
            }
        }
        if let Some(al) = &i.activity
            && len > 0
        {
            al.leave(offset, len);
        }
        {
            let mut o = i.order.lock().expect("order");
            o.clock.complete();
            if end > offset {
                o.ranges.remove(&offset);
            }
            if o.clock.inflight() == 0 {
                i.idle.notify_one();
            }
        }
        i.range_freed.notify_waiters();
        drop(permit);
        if result.is_ok() {
            i.stats.writes.fetch_add(1, Ordering::Relaxed);
            i.stats.bytes.fetch_add(len, Ordering::Relaxed);
        }
        result
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
        i.bwlimit.store(bwlimit.unwrap_or(0), Ordering::Relaxed);
        let m = map.clone();
        tokio::task::spawn_blocking(move || m.mark_all())
            .await
            .map_err(|e| AgentError::Local { offset: 0, err: std::io::Error::other(e.to_string()) })??;
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
        tokio::task::spawn_blocking(move || m.mark_ranges(&r))
            .await
            .map_err(|e| AgentError::Local { offset: 0, err: std::io::Error::other(e.to_string()) })??;
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
        let o = self.inner.order.lock().expect("order");
        (o.next_seq, o.clock.current())
    }

    pub fn mode(&self) -> Mode {
        self.inner.order.lock().expect("order").mode
    }

    /// Bytes marked in the change map (what a resync will ship).
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
        }
    }
}

/// What `Agent::status` reports.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AgentStatus {
    pub volume_id: u64,
    pub volume_bytes: u64,
    pub mode: Mode,
    pub next_seq: u64,
    pub epoch: u64,
    pub dirty_bytes: u64,
    pub writes: u64,
    pub mapped_writes: u64,
    pub resync_bytes: u64,
}

impl Inner {
    /// Issues the write: to staging in sync mode, else for the change map. `None` while a write in
    /// flight overlaps it.
    fn try_issue(&self, offset: u64, flags: Flags, data: &mut Option<Bytes>) -> Option<Issued> {
        let len = data.as_ref().map(|d| d.len() as u64).unwrap_or(0);
        let end = offset + len;
        let mut o = self.order.lock().expect("order");
        if o.overlaps(offset, end) {
            return None;
        }
        let epoch = o.clock.issue();
        if end > offset {
            o.ranges.insert(offset, end);
            if let Some(tap) = self.tap.get() {
                tap(offset, len, epoch);
            }
        }
        if o.mode == Mode::Sync {
            let d = data.clone().expect("issued once");
            let volume_id = self.volume_id;
            if let Some((seq, rx)) =
                o.send(|seq| Frame::Write { volume_id, seq, epoch, offset, flags: flags.0, data: d })
            {
                return Some(Issued::Staging(seq, rx));
            }
            // The session broke with nothing in flight to notice it (staging closed the link
            // between writes): this write goes to the change map, and the agent with it.
            if self.map.is_some() {
                let why = o.session.as_ref().and_then(|s| s.broken_reason());
                self.switch_to_map(&mut o, &why.unwrap_or_else(|| "the link to staging is gone".into()));
            }
        }
        Some(Issued::Local)
    }

    /// Marks a write's blocks before its local write (change-map mode); the caller tells the map
    /// when the local write is done (`ChangeMap::write_done`).
    async fn mark(&self, offset: u64, len: u64) -> Result<(), AgentError> {
        let Some(map) = self.map.clone() else {
            return Err(AgentError::Unprotected { offset, why: "not connected to staging".into() });
        };
        self.stats.mapped_writes.fetch_add(1, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || map.mark_write(offset, len))
            .await
            .map_err(|e| AgentError::Local { offset, err: std::io::Error::other(e.to_string()) })??;
        Ok(())
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
        if o.mode == Mode::Sync {
            o.mode = Mode::ChangeMap;
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
    fn switch_to_map(&self, o: &mut Order, why: &dyn std::fmt::Display) {
        if o.mode == Mode::Sync {
            // Why the session ended says more than what a write saw of it ("the connection to
            // staging is gone"): say that, once.
            let why = o.session.as_ref().and_then(|s| s.broken_reason()).unwrap_or_else(|| why.to_string());
            tracing::warn!(volume = self.volume_id, "switching to the change map: {why}");
            o.mode = Mode::ChangeMap;
            if let Some(s) = o.session.take() {
                s.fail(format!("left sync mode: {why}"), AgentError::Disconnected);
            }
            self.stats.mode_switches.fetch_add(1, Ordering::Relaxed);
            self.degraded.notify_one();
        }
    }

    /// Reconnects and resyncs whenever the agent is in change-map mode, until the agent is gone.
    /// While staging's log has no room for the resync it waits, longer each time (up to four
    /// reconnect intervals), and says so once.
    async fn reconnect_task(weak: std::sync::Weak<Inner>) {
        let Some(degraded_n) = weak.upgrade().map(|i| i.degraded.clone()) else { return };
        let mut waiting_for_room = false;
        let mut delay = Duration::ZERO;
        loop {
            let degraded = degraded_n.notified();
            let Some(i) = weak.upgrade() else { return };
            let interval = i.opts.reconnect_interval;
            let mode = {
                let mut o = i.order.lock().expect("order");
                // A link that broke while idle (staging gone between writes): leave sync mode
                // now, so status says so and the reconnect starts, not at the next write.
                let broken = o.session.as_ref().and_then(|s| s.broken_reason());
                if let (Mode::Sync, Some(why), true) = (o.mode, broken, i.map.is_some()) {
                    i.switch_to_map(&mut o, &why);
                }
                o.mode
            };
            if mode == Mode::ChangeMap && i.map.is_some() {
                delay = match i.try_resync(&mut waiting_for_room).await {
                    Attempt::Again => Duration::ZERO,
                    Attempt::NoRoom => (delay * 2).clamp(interval, interval * 4),
                    Attempt::Unreachable | Attempt::Resynced => interval,
                };
                drop(i);
                tokio::time::sleep(delay).await;
            } else {
                drop(i);
                tokio::select! {
                    _ = degraded => {}
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        }
    }

    /// One attempt of the reconnect task: a session, and a resync if staging's log has room.
    async fn try_resync(self: &Arc<Self>, waiting_for_room: &mut bool) -> Attempt {
        let o = match open_session(&self.id, self.staging, self.volume_id, self.opts.ack_timeout).await {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!("staging still unreachable: {e}");
                return Attempt::Unreachable;
            }
        };
        let dirty = self.map.as_ref().map(|m| m.dirty_bytes()).unwrap_or(0);
        let Some(budget) = resync_budget(o.room_bytes, o.capacity_bytes, dirty) else {
            if !std::mem::replace(waiting_for_room, true) {
                tracing::info!(
                    volume = self.volume_id,
                    room_bytes = o.room_bytes,
                    capacity_bytes = o.capacity_bytes,
                    dirty_bytes = dirty,
                    "staging's write log has no room for the resync: waiting until relaying frees some"
                );
            }
            return Attempt::NoRoom;
        };
        *waiting_for_room = false;
        let shipped = self.stats.resync_bytes.load(Ordering::Relaxed);
        match self.resync(o, budget).await {
            // Room for not even one block: wait like for a full log (never a busy loop).
            Err(AgentError::RoomUsed) if self.stats.resync_bytes.load(Ordering::Relaxed) == shipped => Attempt::NoRoom,
            Err(AgentError::RoomUsed) => Attempt::Again,
            _ => Attempt::Resynced,
        }
    }

    /// Ships every marked block over the session `o`, at most `budget` bytes of them, then
    /// returns to sync mode. When it stops before that (the link failed, or the budget is used up)
    /// the agent stays in change-map mode and the reconnect task goes on where it stopped: blocks
    /// shipped and acknowledged are cleared in the map as the acknowledgements come.
    async fn resync(self: &Arc<Self>, o: Opened, mut budget: u64) -> Result<(), AgentError> {
        let map = self.map.clone().expect("resync needs a change map");
        let s = o.session.clone();
        {
            let mut ord = self.order.lock().expect("order");
            // One resync at a time: the session it runs on owns the sequence numbers.
            assert!(
                ord.session.is_none() || ord.session.as_ref().is_some_and(|x| x.is_broken()),
                "a resync started while another session is live"
            );
            ord.next_seq = o.last_seq + 1;
            ord.clock.resume_after(o.last_epoch);
            ord.session = Some(o.session);
            ord.mode = Mode::Resyncing;
        }
        tracing::info!(volume = self.volume_id, dirty_bytes = map.dirty_bytes(), budget, "resync started");
        let r = self.resync_passes(&map, &mut budget).await;
        let mut ord = self.order.lock().expect("order");
        match &r {
            Ok(()) => tracing::info!(volume = self.volume_id, "resync complete: back in sync mode"),
            Err(e) => {
                if matches!(e, AgentError::RoomUsed) {
                    tracing::debug!(volume = self.volume_id, "resync paused: {e}");
                } else {
                    // Why the session ended (staging's refusal, a timeout) says more than what the
                    // resync saw of it.
                    let why = s.broken_reason().unwrap_or_else(|| e.to_string());
                    tracing::warn!(volume = self.volume_id, "resync interrupted: {why}");
                }
                ord.mode = Mode::ChangeMap;
                ord.session = None;
                s.fail(format!("resync paused: {e}"), AgentError::Disconnected);
                map.reset_todo();
            }
        }
        r
    }

    /// Runs on the session installed by `resync` (records are queued through `Order::send`).
    async fn resync_passes(self: &Arc<Self>, map: &Arc<ChangeMap>, budget: &mut u64) -> Result<(), AgentError> {
        let mut pass = 0u64;
        loop {
            pass += 1;
            // After a first pass with writes going on, once what is left is small: the last pass,
            // with new writes held back so nothing changes under it (and no bandwidth limit, so
            // they are held back briefly).
            let last = pass > 1 && map.todo_len() <= self.opts.final_pass_blocks;
            let _exclusive = if last { Some(self.gate.write().await) } else { None };
            let blocks = map.take_todo();
            self.ship(map, &blocks, !last, budget).await?;
            if last {
                // Everything marked was shipped and is durable at staging; no write is running,
                // and none starts before the mode is sync again (the gate is still held).
                map.clear_all()?;
                let mut o = self.order.lock().expect("order");
                o.mode = Mode::Sync;
                self.stats.mode_switches.fetch_add(1, Ordering::Relaxed);
                // End the resync run now (the replica applies a run once a later record arrives).
                let epoch = o.clock.current();
                let _ = o.send_epoch_end(self.volume_id, epoch);
                o.clock.resume_after(epoch);
                return Ok(());
            }
        }
    }

    /// Sends `blocks` as RESYNC records read from the local disk (at most `budget` bytes, which
    /// it counts down), waits for every ack, and clears each block in the map once staging has it.
    async fn ship(
        self: &Arc<Self>,
        map: &Arc<ChangeMap>,
        blocks: &[u64],
        limited: bool,
        budget: &mut u64,
    ) -> Result<(), AgentError> {
        let bs = map.block_bytes;
        let mut waits = std::collections::VecDeque::new();
        let mut acked = Vec::new();
        let started = std::time::Instant::now();
        let mut sent = 0u64;
        let mut result = Ok(());
        for &b in blocks {
            let offset = b * bs;
            let len = bs.min(self.volume_bytes - offset) as usize;
            if (len as u64) > *budget {
                result = Err(AgentError::RoomUsed);
                break;
            }
            *budget -= len as u64;
            // Bandwidth limit: never ahead of `bwlimit` bytes per second since this pass began.
            let limit = self.bwlimit.load(Ordering::Relaxed);
            if limit > 0 && limited {
                let due = Duration::from_secs_f64(sent as f64 / limit as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            match self.send_block(offset, len).await {
                Ok(w) => waits.push_back((b, w)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            sent += len as u64;
            // Keep the waits bounded: the oldest is acknowledged first anyway.
            if waits.len() >= 256 {
                let (b, (w, _permit)) = waits.pop_front().expect("not empty");
                if let Err(e) = wait_ack(w, self.opts.ack_timeout).await {
                    result = Err(e);
                    waits.clear();
                    break;
                }
                acked.push(b);
                if acked.len() >= 64 {
                    map.clear_shipped(&std::mem::take(&mut acked))?;
                }
            }
        }
        for (b, (w, _permit)) in waits {
            if let Err(e) = wait_ack(w, self.opts.ack_timeout).await {
                result = result.and(Err(e));
                break;
            }
            acked.push(b);
        }
        // What staging acknowledged is durable there, even when the pass stops here: an
        // interrupted resync goes on from the rest.
        map.clear_shipped(&acked)?;
        result
    }

    /// Reads one block from the local disk and queues it as a RESYNC record.
    async fn send_block(
        self: &Arc<Self>,
        offset: u64,
        len: usize,
    ) -> Result<((u64, AckWait), tokio::sync::SemaphorePermit<'_>), AgentError> {
        let permit = self.inflight.acquire_many(units(len)).await.map_err(|_| AgentError::Disconnected)?;
        let disk = self.disk.clone();
        let data = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            disk.read_at(offset, &mut buf).map(|_| buf)
        })
        .await
        .map_err(|e| AgentError::Local { offset, err: std::io::Error::other(e.to_string()) })?
        .map_err(|err| AgentError::Local { offset, err })?;
        let rx = {
            let mut o = self.order.lock().expect("order");
            let epoch = o.clock.current();
            let volume_id = self.volume_id;
            let data = Bytes::from(data);
            o.send(|seq| Frame::Write { volume_id, seq, epoch, offset, flags: Flags::RESYNC.0, data })
                .ok_or(AgentError::Disconnected)?
        };
        self.stats.resync_blocks.fetch_add(1, Ordering::Relaxed);
        self.stats.resync_bytes.fetch_add(len as u64, Ordering::Relaxed);
        Ok((rx, permit))
    }

    fn close_idle_epoch(&self) {
        let mut o = self.order.lock().expect("order");
        if o.mode != Mode::Sync {
            return;
        }
        let Some(epoch) = o.clock.close_idle() else { return };
        if o.send_epoch_end(self.volume_id, epoch).is_some() {
            self.stats.epochs_closed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn wait_ack((seq, rx): (u64, AckWait), timeout: Duration) -> Result<(), AgentError> {
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(AgentError::Disconnected),
        Err(_) => Err(AgentError::AckTimeout { seq, timeout }),
    }
}

#[cfg(test)]
mod tests {
    use super::resync_budget;

    #[test]
    fn a_resync_waits_for_room_and_never_plans_past_it() {
        const MIB: u64 = 1 << 20;
        // A full log (its replica away): wait.
        assert_eq!(resync_budget(0, 64 * MIB, 10 * MIB), None);
        assert_eq!(resync_budget(4 * MIB, 64 * MIB, 10 * MIB), None, "less than an eighth free, and it does not fit");
        // Everything fits: go, even with little room.
        assert_eq!(resync_budget(4 * MIB, 64 * MIB, MIB), Some(4 * MIB - MIB / 4));
        // An eighth free: go, in part, within the room.
        let b = resync_budget(8 * MIB, 64 * MIB, 100 * MIB).unwrap();
        assert!(b < 8 * MIB && b > 7 * MIB, "{b}");
        // Nothing dirty: go (the final pass only clears the map and ends the run).
        assert_eq!(resync_budget(0, 64 * MIB, 0), Some(0));
    }
}
