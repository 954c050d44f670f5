//! The write log (WRL): a segmented, append-only log over one or more preallocated files or raw
//! block devices, with group commit, a bounded cache of not-yet-relayed records, trimming once
//! downstream confirms, and recovery that tells a torn tail from corruption. Staging logs agents'
//! writes in it; the replica keeps its DR log in one. Its own crate, so the replica does not link
//! the staging server.
//!
//! Layers:
//! - `storage.rs`: [`Storage`] (positional, syncable), `FileStorage` (files and block devices, locked
//!   for one writer), and the simulated storage of the crash-state tests.
//! - `core.rs`: the single-threaded log (create, recover, append one batch, trim, read back). All I/O
//!   goes through [`Storage`], so the crash-state tests run it over simulated storage.
//! - this file: [`Wrl`], the concurrent front. Appenders encrypt in their own thread, queue, and wait;
//!   one committer thread takes everything queued (no artificial delay), writes it as one batch with
//!   one `pwrite` and one `fdatasync`, and then completes every appender of the batch. When the
//!   committer is idle, an appender may commit on its own thread instead ([`Submitted::commit_here`]):
//!   at low load that saves two thread hand-offs (to the committer and back) on every write's path.
//!
//! **Invariant:** an append completes with `Ok` only after the record's batch is durable.

#![forbid(unsafe_code)]

mod cache;
pub mod core;
pub mod error;
pub mod scan;
pub mod storage;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;

use bytes::Bytes;
use drv_format::crypto::{VolumeKey, nonce};
use drv_format::record::{Flags, RecordHeader, TAG_LEN, WriteDesc};

use self::cache::Cache;
use self::core::LogCore;
pub use self::core::{CreateOptions, LogRecord, PendingRecord, Recovery, Table, Tail, VolumeLog, create, recover};
pub use self::error::{Result, WrlError};
pub use crate::storage::{FileStorage, Storage};

/// Limits of a running WRL. Every queue is bounded.
#[derive(Clone, Debug)]
pub struct WrlOptions {
    /// Bytes of appends admitted but not yet durable; appenders wait beyond it (backpressure).
    pub queue_bytes_limit: u64,
    /// Largest batch one group commit writes (one record always goes, whatever its size).
    pub batch_bytes_limit: u64,
    /// Bytes of durable, unconfirmed records kept in memory for the relay.
    pub cache_bytes_limit: u64,
}

impl Default for WrlOptions {
    fn default() -> Self {
        WrlOptions { queue_bytes_limit: 64 << 20, batch_bytes_limit: 8 << 20, cache_bytes_limit: 256 << 20 }
    }
}

/// One write to log.
#[derive(Clone, Copy, Debug)]
pub struct AppendRequest<'a> {
    pub volume_id: u64,
    pub volume_seq: u64,
    pub epoch: u64,
    pub offset: u64,
    pub flags: Flags,
    pub data: &'a [u8],
    /// The agent's clock at capture, seconds since the UNIX epoch (0: unknown).
    pub capture_unix: u32,
}

/// A durable record.
#[derive(Clone, Copy, Debug)]
pub struct Appended {
    pub header: RecordHeader,
    /// No later record of the same volume is in this record's batch: a sender of cumulative
    /// acknowledgements answers here, once per batch and volume.
    pub last_of_volume: bool,
}

/// Called once with the outcome of an append, from the committer thread: keep it short.
pub type Completion = Box<dyn FnOnce(Result<Appended>) + Send>;

/// Per-volume positions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VolumeState {
    pub log: VolumeLog,
    /// Downstream has every record of this volume up to this lsn.
    pub confirmed_lsn: u64,
    /// The sequence number the volume's next record must have, once the log knows it (from a
    /// record of the volume, or [`Wrl::resume_volume`]): the log never holds a gap.
    pub next_seq: Option<u64>,
    /// Removed from the configuration ([`Wrl::retire_volume`]): never holds trimming back.
    pub retired: bool,
}

/// Counters for status and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    pub appends: AtomicU64,
    pub batches: AtomicU64,
    pub payload_bytes: AtomicU64,
    pub cache_reads: AtomicU64,
    pub disk_reads: AtomicU64,
}

/// A snapshot for `status`/`inspect`.
#[derive(Clone, Debug)]
pub struct WrlStatus {
    pub first_lsn: u64,
    pub durable_lsn: u64,
    pub trim_lsn: u64,
    pub used_segments: u64,
    pub total_segments: u64,
    pub segment_bytes: u64,
    pub queued_bytes: u64,
    pub cache_bytes: u64,
    pub appends: u64,
    pub batches: u64,
    pub payload_bytes: u64,
    pub cache_reads: u64,
    pub disk_reads: u64,
    pub failed: Option<String>,
}

struct Queued {
    rec: PendingRecord,
    done: Completion,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    /// Bytes admitted: queued plus being encrypted.
    admitted_bytes: u64,
    failed: Option<String>,
    closing: bool,
    /// Highest lsn that every volume confirmed; the committer trims up to it.
    trim_target: u64,
    used_segments: u64,
    /// No committer thread: the owner commits ([`Wrl::commit`]).
    driven: bool,
}

struct Shared {
    state: Mutex<State>,
    /// The log itself; whoever commits a batch holds it (the committer thread, or an appender
    /// committing on its own thread while the committer is idle).
    core: Mutex<LogCore>,
    work: Condvar,
    room: Condvar,
    table: Arc<RwLock<Table>>,
    cache: Mutex<Cache>,
    volumes: Mutex<BTreeMap<u64, VolumeState>>,
    devices: Vec<Arc<dyn Storage>>,
    nonce_next: AtomicU64,
    wrl_id: u32,
    record_bytes_limit: u64,
    total_segments: u64,
    segment_bytes: u64,
    opts: WrlOptions,
    stats: Stats,
}

/// An open write log.
pub struct Wrl {
    shared: Arc<Shared>,
    committer: Option<JoinHandle<()>>,
}

impl Wrl {
    /// Opens (recovers) a WRL and starts its committer thread.
    pub fn open(devices: Vec<Arc<dyn Storage>>, opts: WrlOptions) -> Result<(Wrl, Recovery)> {
        let (mut w, rec) = Self::open_driven(devices, opts)?;
        let s = w.shared.clone();
        s.state.lock().expect("wrl state").driven = false;
        let committer = std::thread::Builder::new()
            .name("wrl-commit".into())
            .spawn(move || committer(s))
            .map_err(|e| WrlError::io("spawn WRL committer thread", e))?;
        w.committer = Some(committer);
        Ok((w, rec))
    }

    /// Opens (recovers) a WRL without a committer thread: nothing is written until the caller
    /// calls [`Wrl::commit`], on its own thread (the simulator drives it so, one step at a time).
    /// An append over the queue limit commits inline instead of waiting.
    pub fn open_driven(devices: Vec<Arc<dyn Storage>>, opts: WrlOptions) -> Result<(Wrl, Recovery)> {
        let (core, rec) = LogCore::open(devices.clone())?;
        let volumes = rec
            .volumes
            .iter()
            .map(|(id, log)| {
                let next_seq = Some(log.last_seq + 1);
                (*id, VolumeState { log: *log, confirmed_lsn: rec.meta.trim_lsn, next_seq, retired: false })
            })
            .collect();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                trim_target: rec.meta.trim_lsn,
                used_segments: core.used_segments(),
                driven: true,
                ..State::default()
            }),
            work: Condvar::new(),
            room: Condvar::new(),
            table: core.table(),
            cache: Mutex::new(Cache::new(opts.cache_bytes_limit)),
            volumes: Mutex::new(volumes),
            devices,
            // Every counter below the durable high-water mark may be on disk already.
            nonce_next: AtomicU64::new(core.nonce_hwm()),
            wrl_id: core.wrl_id(),
            record_bytes_limit: core.record_bytes_limit(),
            total_segments: core.total_slots(),
            segment_bytes: core.segment_bytes(),
            opts,
            stats: Stats::default(),
            core: Mutex::new(core),
        });
        Ok((Wrl { shared, committer: None }, rec))
    }

    /// Driven mode ([`Wrl::open_driven`]): commits what is queued (one batch) and trims when due,
    /// on this thread; completions run here. Returns whether anything was queued.
    pub fn commit(&self) -> bool {
        let sh = &*self.shared;
        let queued = !sh.state.lock().expect("wrl state").queue.is_empty();
        commit_step(sh, &mut sh.core.lock().expect("WRL core"));
        queued
    }

    /// The largest write one record may hold.
    pub fn record_bytes_limit(&self) -> u64 {
        self.shared.record_bytes_limit
    }

    pub fn wrl_id(&self) -> u32 {
        self.shared.wrl_id
    }

    /// Encrypts `req.data` with `key` and queues it; `done` runs once the record is durable (or
    /// failed). Waits while the admitted bytes are over `queue_bytes_limit`. Appends submitted by one
    /// thread are logged in the order submitted.
    pub fn submit(&self, key: &VolumeKey, req: AppendRequest<'_>, done: Completion) -> Submitted {
        self.submit_inner(key, req, done);
        Submitted { shared: self.shared.clone(), armed: true }
    }

    fn submit_inner(&self, key: &VolumeKey, req: AppendRequest<'_>, done: Completion) {
        let sh = &self.shared;
        let len = req.data.len() as u64;
        if len > sh.record_bytes_limit {
            return refuse(done, WrlError::RecordTooLarge { bytes: len, limit: sh.record_bytes_limit });
        }
        // CHECKPOINT records are the log's own (`checkpoint_idle_volumes`), never appended.
        if req.flags.0 & !Flags::AGENT.0 != 0 {
            return refuse(done, WrlError::InvalidAppend(format!("flags {:#x} are not a write's", req.flags.0)));
        }
        if let Err(e) = self.admit(len + TAG_LEN as u64 + 96) {
            return refuse(done, e);
        }
        let counter = sh.nonce_next.fetch_add(1, Ordering::Relaxed);
        let desc = WriteDesc {
            volume_id: req.volume_id,
            volume_seq: req.volume_seq,
            epoch: req.epoch,
            offset: req.offset,
            length: req.data.len() as u32,
            flags: req.flags,
            key_id: key.id(),
            nonce: nonce(sh.wrl_id, counter),
            capture_unix: req.capture_unix,
        };
        let mut payload = Vec::with_capacity(req.data.len() + TAG_LEN);
        key.seal(&desc, req.data, &mut payload);
        self.enqueue(PendingRecord::new(desc, Bytes::from(payload)), done);
    }

    /// Queues a record that was sealed elsewhere (a replica logging what staging relayed): the
    /// descriptor and stored payload are logged unchanged. Same admission limits and order rules
    /// as [`Wrl::submit`].
    /// `payload_crc` is the record's checksum as received (the caller checked it against the payload).
    pub fn submit_sealed(&self, desc: WriteDesc, payload: Bytes, payload_crc: u32, done: Completion) -> Submitted {
        self.submit_sealed_inner(desc, payload, payload_crc, done);
        Submitted { shared: self.shared.clone(), armed: true }
    }

    fn submit_sealed_inner(&self, desc: WriteDesc, payload: Bytes, payload_crc: u32, done: Completion) {
        let sh = &self.shared;
        if desc.length as u64 > sh.record_bytes_limit {
            return refuse(done, WrlError::RecordTooLarge { bytes: desc.length as u64, limit: sh.record_bytes_limit });
        }
        if payload.len() != desc.length as usize + TAG_LEN || desc.flags.0 & !Flags::AGENT.0 != 0 {
            return refuse(
                done,
                WrlError::InvalidAppend(format!(
                    "sealed record of volume {} seq {}: payload of {} bytes for length {}, flags {}",
                    desc.volume_id,
                    desc.volume_seq,
                    payload.len(),
                    desc.length,
                    desc.flags
                )),
            );
        }
        if let Err(e) = self.admit(payload.len() as u64 + 96) {
            return refuse(done, e);
        }
        self.enqueue(PendingRecord { desc, payload, payload_crc }, done);
    }

    /// Waits until `need` more bytes fit under `queue_bytes_limit`, then counts them as admitted.
    fn admit(&self, need: u64) -> Result<()> {
        let sh = &self.shared;
        let mut st = sh.state.lock().expect("wrl state");
        loop {
            if let Some(f) = &st.failed {
                return Err(WrlError::Failed(f.clone()));
            }
            if st.closing {
                return Err(WrlError::Closed);
            }
            if st.admitted_bytes == 0 || st.admitted_bytes + need <= sh.opts.queue_bytes_limit {
                break;
            }
            if st.driven {
                // No committer to wait for: make the room here.
                drop(st);
                self.commit();
                st = sh.state.lock().expect("wrl state");
                continue;
            }
            st = sh.room.wait(st).expect("wrl state");
        }
        st.admitted_bytes += need;
        Ok(())
    }

    fn enqueue(&self, rec: PendingRecord, done: Completion) {
        let sh = &self.shared;
        let mut st = sh.state.lock().expect("wrl state");
        st.queue.push_back(Queued { rec, done });
    }

    /// Appends and waits until the record is durable.
    pub fn append(&self, key: &VolumeKey, req: AppendRequest<'_>) -> Result<Appended> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(
            key,
            req,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .hand_off();
        // Driven: commit until this append completed (nobody else will).
        while self.shared.state.lock().expect("wrl state").driven {
            match rx.try_recv() {
                Ok(r) => return r,
                Err(_) => {
                    self.commit();
                }
            }
        }
        rx.recv().unwrap_or(Err(WrlError::Closed))
    }

    /// Durable records from `from_lsn` on, about `max_bytes` of payload (at least one record if any;
    /// whole batches when read back from the devices). Served from the cache when it holds `from_lsn`.
    pub fn read(&self, from_lsn: u64, max_bytes: u64) -> Result<Vec<LogRecord>> {
        let sh = &self.shared;
        if let Some(recs) = sh.cache.lock().expect("cache").read(from_lsn, max_bytes) {
            sh.stats.cache_reads.fetch_add(1, Ordering::Relaxed);
            return Ok(recs);
        }
        let durable = sh.table.read().expect("table").durable_lsn;
        if from_lsn > durable {
            return Ok(Vec::new());
        }
        sh.stats.disk_reads.fetch_add(1, Ordering::Relaxed);
        core::read_from_disk(&sh.devices, &sh.table, from_lsn, durable, max_bytes)
    }

    /// Downstream holds every record of `volume_id` up to `lsn` durably. Records every volume has
    /// confirmed leave the cache and, a segment at a time, the log.
    pub fn confirm(&self, volume_id: u64, lsn: u64) {
        let sh = &self.shared;
        let durable = sh.table.read().expect("table").durable_lsn;
        let target = {
            let mut vols = sh.volumes.lock().expect("volumes");
            let v = vols.entry(volume_id).or_default();
            v.confirmed_lsn = v.confirmed_lsn.max(lsn.min(durable));
            // Every record up to `target` is confirmed by its volume.
            vols.values()
                .filter(|v| !v.retired && v.log.last_lsn > v.confirmed_lsn)
                .map(|v| v.confirmed_lsn)
                .min()
                .unwrap_or(durable)
        };
        sh.cache.lock().expect("cache").drop_through(target);
        let mut st = sh.state.lock().expect("wrl state");
        if target > st.trim_target {
            st.trim_target = target;
            drop(st);
            sh.work.notify_one();
        }
    }

    /// Declares where volume `volume_id` stands when the log holds none of its records (a new
    /// volume: 0; a replica's DR log after its records were applied and trimmed: the applied
    /// position): its next record must be `last_seq + 1`. A volume the log holds records of keeps
    /// the position they give.
    pub fn resume_volume(&self, volume_id: u64, last_seq: u64) {
        let mut vols = self.shared.volumes.lock().expect("volumes");
        let v = vols.entry(volume_id).or_default();
        v.retired = false;
        v.next_seq.get_or_insert(last_seq + 1);
    }

    /// A volume removed from the configuration: its records, those in the log and those still
    /// being appended, never hold trimming back again (until [`Wrl::resume_volume`] takes it
    /// back).
    pub fn retire_volume(&self, volume_id: u64) {
        self.shared.volumes.lock().expect("volumes").entry(volume_id).or_default().retired = true;
        self.confirm(volume_id, u64::MAX);
    }

    /// A volume the log holds no record of goes on after `last_seq` (a replica that starts at a
    /// full resync run); refused, naming why, if the log holds any record of it.
    pub fn rebase_volume(&self, volume_id: u64, last_seq: u64) -> Result<(), String> {
        let mut vols = self.shared.volumes.lock().expect("volumes");
        let v = vols.entry(volume_id).or_default();
        if v.log.records > 0 {
            return Err(format!(
                "the log holds {} records of volume {volume_id} (up to seq {})",
                v.log.records, v.log.last_seq
            ));
        }
        v.next_seq = Some(last_seq + 1);
        Ok(())
    }

    pub fn volume(&self, volume_id: u64) -> Option<VolumeState> {
        self.shared.volumes.lock().expect("volumes").get(&volume_id).copied()
    }

    pub fn volumes(&self) -> BTreeMap<u64, VolumeState> {
        self.shared.volumes.lock().expect("volumes").clone()
    }

    /// Bytes the log can take for certain: its free segments (the open segment's remainder is not
    /// counted). A receiver that must not be refused for a full log waits for this to grow.
    pub fn room_bytes(&self) -> u64 {
        let used = self.shared.state.lock().expect("wrl state").used_segments;
        self.shared.total_segments.saturating_sub(used) * self.shared.segment_bytes
    }

    /// Bytes of all segments together.
    pub fn capacity_bytes(&self) -> u64 {
        self.shared.total_segments * self.shared.segment_bytes
    }

    pub fn status(&self) -> WrlStatus {
        let sh = &self.shared;
        // One lock at a time: the committer takes state, then table.
        let (first_lsn, durable_lsn, trim_lsn) = {
            let t = sh.table.read().expect("table");
            ((t.trim_lsn + 1).max(t.segments.first().map(|s| s.first_lsn).unwrap_or(1)), t.durable_lsn, t.trim_lsn)
        };
        let cache_bytes = sh.cache.lock().expect("cache").bytes();
        let st = sh.state.lock().expect("wrl state");
        let s = &sh.stats;
        WrlStatus {
            first_lsn,
            durable_lsn,
            trim_lsn,
            used_segments: st.used_segments,
            total_segments: sh.total_segments,
            segment_bytes: sh.segment_bytes,
            queued_bytes: st.admitted_bytes,
            cache_bytes,
            appends: s.appends.load(Ordering::Relaxed),
            batches: s.batches.load(Ordering::Relaxed),
            payload_bytes: s.payload_bytes.load(Ordering::Relaxed),
            cache_reads: s.cache_reads.load(Ordering::Relaxed),
            disk_reads: s.disk_reads.load(Ordering::Relaxed),
            failed: st.failed.clone(),
        }
    }
}

impl Drop for Wrl {
    fn drop(&mut self) {
        self.shared.state.lock().expect("wrl state").closing = true;
        self.shared.work.notify_all();
        self.shared.room.notify_all();
        if let Some(h) = self.committer.take() {
            let _ = h.join();
        }
    }
}

/// A queued append. Dropping it (or [`Submitted::hand_off`]) wakes the committer thread;
/// [`Submitted::commit_here`] commits on the calling thread instead when the committer is idle.
#[must_use = "dropping it wakes the committer; `commit_here` may commit on this thread"]
pub struct Submitted {
    shared: Arc<Shared>,
    armed: bool,
}

impl Submitted {
    /// Leaves the commit to the committer thread (what dropping does).
    pub fn hand_off(self) {}

    /// Whether `other` was queued on the same log.
    pub fn same_log(&self, other: &Submitted) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Drops this one without waking anyone: for an append followed by `later` on the same log,
    /// whose commit (or wake-up) takes this one's record along.
    pub fn covered_by(mut self, later: &Submitted) {
        assert!(self.same_log(later), "covered_by: a later append on another log commits nothing of this one");
        self.armed = false;
    }

    /// Commits what is queued on this thread if no batch is being committed (else the committer
    /// takes it). Completions of the batch run here, so the caller must not hold a lock that a
    /// completion takes. Meant for plain threads: on an async runtime's worker the wait for the
    /// disk would stall the worker's other tasks.
    pub fn commit_here(mut self) {
        self.armed = false;
        let sh = &*self.shared;
        match sh.core.try_lock() {
            Ok(mut core) => {
                commit_step(sh, &mut core);
                drop(core);
                // Queued meanwhile: the committer takes it.
                if !sh.state.lock().expect("wrl state").queue.is_empty() {
                    sh.work.notify_one();
                }
            }
            Err(std::sync::TryLockError::WouldBlock) => sh.work.notify_one(),
            Err(std::sync::TryLockError::Poisoned(e)) => panic!("WRL core lock poisoned: {e}"),
        }
    }
}

impl Drop for Submitted {
    fn drop(&mut self) {
        if self.armed {
            self.shared.work.notify_one();
        }
    }
}

/// The committer: takes whatever is queued, writes it as one batch, completes it. No timer: a
/// batch grows only while the previous one is being written and synced.
fn committer(sh: Arc<Shared>) {
    loop {
        {
            let mut st = sh.state.lock().expect("wrl state");
            while st.queue.is_empty() && !st.closing && !trim_due(&sh, st.trim_target) {
                st = sh.work.wait(st).expect("wrl state");
            }
            if (st.queue.is_empty() && st.closing) || st.failed.is_some() {
                return;
            }
        }
        let mut core = sh.core.lock().expect("WRL core");
        commit_step(&sh, &mut core);
    }
}

/// Takes out of `batch`, and fails, every record that does not follow its volume's last record
/// (`VolumeState::next_seq`), so the log never holds a gap: a sender whose earlier write failed
/// (log full) while a later one was already queued must resend from the failed one. Returns the
/// bytes taken out.
fn refuse_out_of_order(sh: &Shared, batch: &mut Vec<Queued>) -> u64 {
    let mut refused = Vec::new();
    {
        let vols = sh.volumes.lock().expect("volumes");
        let mut next: BTreeMap<u64, Option<u64>> = BTreeMap::new();
        let mut i = 0;
        while i < batch.len() {
            let d = &batch[i].rec.desc;
            let expected = next.entry(d.volume_id).or_insert_with(|| vols.get(&d.volume_id).and_then(|v| v.next_seq));
            if expected.is_some_and(|e| e != d.volume_seq) {
                refused.push((batch.remove(i), expected.expect("some")));
                continue;
            }
            *expected = Some(d.volume_seq + 1);
            i += 1;
        }
    }
    if refused.is_empty() {
        return 0;
    }
    let bytes: u64 = refused.iter().map(|(q, _)| q.rec.log_bytes()).sum();
    sh.state.lock().expect("wrl state").admitted_bytes -= bytes;
    sh.room.notify_all();
    for (q, expected) in refused {
        let (volume_id, seq) = (q.rec.desc.volume_id, q.rec.desc.volume_seq);
        (q.done)(Err(WrlError::OutOfOrder { volume_id, seq, expected }));
    }
    bytes
}

/// Before a trim up to `target` frees segments: every volume whose last record is in them gets a
/// CHECKPOINT record in the head (its last sequence and epoch again, durable before the segments
/// are freed), so the volume's position survives the trim and a restart recovers it from the log.
/// Without it, a volume that went idle while others kept writing would recover at sequence 0, and
/// its agent would number its next writes from 1 again. Returns how far the trim may go now: all
/// of `target`, or, when the checkpoints do not fit yet, only up to the oldest of those records
/// (the segments before it make room; the rest at the next trim).
fn checkpoint_idle_volumes(sh: &Shared, core: &mut LogCore, target: u64) -> Result<u64> {
    let keep_from = core.trim_keeps_from(target);
    let idle: Vec<(u64, VolumeLog)> = {
        let vols = sh.volumes.lock().expect("volumes");
        vols.iter()
            .filter(|(_, v)| v.log.records > 0 && v.log.last_lsn < keep_from)
            .map(|(id, v)| (*id, v.log))
            .collect()
    };
    let Some(oldest) = idle.iter().map(|(_, l)| l.last_lsn).min() else { return Ok(target) };
    let recs: Vec<PendingRecord> = idle.iter().map(|(id, log)| checkpoint(*id, log)).collect();
    let bytes: u64 = recs.iter().map(|r| r.log_bytes()).sum();
    if !core.can_fit(core.batch_disk_bytes(bytes)) {
        return Ok(target.min(oldest - 1));
    }
    let headers = core.append_batch(&recs)?;
    {
        let mut vols = sh.volumes.lock().expect("volumes");
        for h in &headers {
            let v = vols.entry(h.desc.volume_id).or_default();
            v.log.note(h);
            // Nothing to relay: confirmed as written, so it never holds a trim back.
            v.confirmed_lsn = v.confirmed_lsn.max(h.lsn);
        }
    }
    // The cache holds every durable lsn in order; readers skip checkpoints.
    let mut cache = sh.cache.lock().expect("cache");
    for (h, r) in headers.iter().zip(recs) {
        cache.push(LogRecord { header: *h, payload: r.payload });
    }
    tracing::debug!(volumes = headers.len(), "checkpointed idle volumes before a trim");
    Ok(target)
}

/// The CHECKPOINT record of a volume whose last record is `log`'s last.
fn checkpoint(volume_id: u64, log: &VolumeLog) -> PendingRecord {
    let desc = WriteDesc {
        volume_id,
        volume_seq: log.last_seq,
        epoch: log.last_epoch,
        offset: 0,
        length: 0,
        flags: Flags::CHECKPOINT,
        key_id: 0,
        nonce: [0; 12],
        capture_unix: 0,
    };
    PendingRecord::new(desc, Bytes::from_static(&[0; TAG_LEN]))
}

/// One batch: takes what is queued (and trims when due), writes and syncs it, completes it. On an
/// I/O error the WRL is failed (everything queued and later gets `Failed`).
fn commit_step(sh: &Shared, core: &mut LogCore) {
    let Some((mut batch, mut record_bytes, trim_target)) = take_batch(sh, core) else { return };
    record_bytes -= refuse_out_of_order(sh, &mut batch);
    if trim_due(sh, trim_target)
        && let Err(e) = trim_step(sh, core, trim_target)
    {
        return fail(sh, batch, e);
    }
    if batch.is_empty() {
        return;
    }
    if !core.can_fit(core.batch_disk_bytes(record_bytes)) {
        // Log full: refuse everything queued now, so no volume gets a gap in its order.
        let mut st = sh.state.lock().expect("wrl state");
        batch.extend(st.queue.drain(..));
        let freed: u64 = batch.iter().map(|q| q.rec.log_bytes()).sum();
        st.admitted_bytes -= freed;
        drop(st);
        return refuse_full(sh, core, batch);
    }
    let recs: Vec<PendingRecord> =
        batch.iter().map(|q| PendingRecord { payload: q.rec.payload.clone(), ..q.rec }).collect();
    match core.append_batch(&recs) {
        Ok(headers) => batch_durable(sh, core, batch, &recs, headers, record_bytes),
        Err(WrlError::LogFull { .. }) => {
            sh.state.lock().expect("wrl state").admitted_bytes -= record_bytes;
            refuse_full(sh, core, batch);
        }
        Err(e) => fail(sh, batch, e),
    }
}

/// Takes a batch: everything queued, up to the batch limit and what the log can hold; with its
/// record bytes and the trim target. `None` once the log failed.
fn take_batch(sh: &Shared, core: &LogCore) -> Option<(Vec<Queued>, u64, u64)> {
    let mut st = sh.state.lock().expect("wrl state");
    if st.failed.is_some() {
        return None;
    }
    let mut batch: Vec<Queued> = Vec::new();
    let mut record_bytes = 0u64;
    while let Some(q) = st.queue.front() {
        let next = record_bytes + q.rec.log_bytes();
        if !batch.is_empty() && (next > sh.opts.batch_bytes_limit || !core.can_fit(core.batch_disk_bytes(next))) {
            break;
        }
        record_bytes = next;
        batch.push(st.queue.pop_front().expect("front exists"));
    }
    Some((batch, record_bytes, st.trim_target))
}

/// Checkpoints the idle volumes the trim would drop, then trims up to `trim_target`.
fn trim_step(sh: &Shared, core: &mut LogCore, trim_target: u64) -> Result<()> {
    let target = checkpoint_idle_volumes(sh, core, trim_target)?;
    core.set_reader_hint(target + 1);
    core.trim(target)?;
    sh.state.lock().expect("wrl state").used_segments = core.used_segments();
    Ok(())
}

/// Refuses `batch` (already taken off the admitted bytes): the log is full.
fn refuse_full(sh: &Shared, core: &LogCore, batch: Vec<Queued>) {
    sh.room.notify_all();
    for q in batch {
        (q.done)(Err(core.log_full()));
    }
}

/// `batch` is durable as `headers`: the volumes' positions, the cache, the figures, the room,
/// then the appenders, in log order (staging's lag bookkeeping relies on it).
fn batch_durable(
    sh: &Shared,
    core: &LogCore,
    batch: Vec<Queued>,
    recs: &[PendingRecord],
    headers: Vec<RecordHeader>,
    record_bytes: u64,
) {
    {
        let mut vols = sh.volumes.lock().expect("volumes");
        for h in &headers {
            let v = vols.entry(h.desc.volume_id).or_default();
            v.log.note(h);
            v.next_seq = Some(h.desc.volume_seq + 1);
        }
    }
    {
        let mut cache = sh.cache.lock().expect("cache");
        for (h, r) in headers.iter().zip(recs) {
            cache.push(LogRecord { header: *h, payload: r.payload.clone() });
        }
    }
    let payload: u64 = headers.iter().map(|h| h.desc.length as u64).sum();
    sh.stats.appends.fetch_add(headers.len() as u64, Ordering::Relaxed);
    sh.stats.batches.fetch_add(1, Ordering::Relaxed);
    sh.stats.payload_bytes.fetch_add(payload, Ordering::Relaxed);
    {
        let mut st = sh.state.lock().expect("wrl state");
        st.admitted_bytes -= record_bytes;
        st.used_segments = core.used_segments();
    }
    sh.room.notify_all();
    // Whether a later record of the same volume is in the batch (batches hold few volumes).
    let mut seen: Vec<u64> = Vec::new();
    let mut last_of_volume = vec![false; headers.len()];
    for (i, h) in headers.iter().enumerate().rev() {
        if !seen.contains(&h.desc.volume_id) {
            seen.push(h.desc.volume_id);
            last_of_volume[i] = true;
        }
    }
    for ((q, h), last_of_volume) in batch.into_iter().zip(headers).zip(last_of_volume) {
        (q.done)(Ok(Appended { header: h, last_of_volume }));
    }
}

/// Completes a refused append on a thread of its own: callers submit while holding their own
/// locks (to keep a volume's order), and a completion that takes one of them would deadlock if it
/// ran inside `submit`. Refusals are rare; a thread each is cheap enough.
fn refuse(done: Completion, e: WrlError) {
    let spawned = std::thread::Builder::new().name("wrl-refuse".into()).spawn(move || done(Err(e)));
    if let Err(err) = spawned {
        tracing::error!("cannot start a thread to report a refused append: {err}");
    }
}

/// Whether trimming up to `target` would free at least one whole segment (a trim costs a meta
/// write and an fdatasync, so it is done a segment at a time).
fn trim_due(sh: &Shared, target: u64) -> bool {
    let t = sh.table.read().expect("table");
    t.segments.len() > 1 && target > t.trim_lsn && t.segments[0].next_lsn <= target + 1
}

/// Puts the WRL into the failed state after an I/O error: the batch gets the error, everything
/// queued and everything later gets `Failed`.
fn fail(sh: &Shared, batch: Vec<Queued>, e: WrlError) {
    let msg = e.to_string();
    tracing::error!(error = %msg, "WRL failed; reopen it to recover");
    let queued: Vec<Queued> = {
        let mut st = sh.state.lock().expect("wrl state");
        st.failed = Some(msg.clone());
        st.queue.drain(..).collect()
    };
    sh.room.notify_all();
    let mut first = Some(e);
    for q in batch.into_iter().chain(queued) {
        let err = first.take().unwrap_or_else(|| WrlError::Failed(msg.clone()));
        (q.done)(Err(err));
    }
}
