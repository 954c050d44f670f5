//! Epoch-atomic apply: takes a volume's records from the DR log in sequence order, groups them into
//! units (one epoch; or one whole run of RESYNC records), and applies a unit only when it is
//! complete (the next record belongs to a later unit, or it ends with an EPOCH_END record) and every
//! record of it is durable in the DR log.
//! After a unit's writes are synced, the applied position is persisted; a crash in between replays
//! the unit from the DR log on restart (the writes are idempotent).
//!
//! **Invariant:** the target is written only with records of complete units, in unit order; the
//! persisted applied position always ends a unit, with one exception, recorded as such:
//!
//! **A RESYNC run larger than the DR log.** A run is one unit, but it may be larger than the DR
//! log can hold (an initial sync of a volume larger than the DR log; a long outage's change map).
//! Waiting for its end would then wait forever (the receive side waits for room that only apply
//! frees). So when the DR log is half full and its head is an incomplete RESYNC run, the records
//! received so far are applied and the position is stored with `partial_resync: true`: the
//! target no longer shows a state the source had, until the run ends. Status says `resyncing`,
//! snapshots are refused, and this survives a restart (the flag is persisted with the position).
//! Before the first part is applied, the observer keeps the last consistent image as a snapshot
//! of its own (`auto-resync-SEQ`, `OverwriteObserver::hold_consistent_point`), released when the
//! run ends: the replica always has a consistent image to recover.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use drv_format::crypto::VolumeKey;
use drv_format::record::Flags;
use drv_proto::Sequencer;
use drv_proto::cow::{Batch, UnitEnd, Write};
use drv_proto::units::{Entry, Units};
use drv_wrl::{LogRecord, Wrl};
use serde::{Deserialize, Serialize};

use crate::media::{Media, MediaError};

/// Why the apply step of a volume stopped (the volume's status shows it; nothing acknowledged is
/// lost: the DR log keeps every record not applied).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("read DR log: {0}")]
    ReadLog(#[source] drv_wrl::WrlError),
    #[error(
        "the DR log holds volume {volume} seq {seq} after seq {after}: a gap (the log refuses them, so it is damaged)"
    )]
    Gap { volume: u64, seq: u64, after: u64 },
    #[error("volume {volume} seq {seq}: {err}")]
    Decrypt { volume: u64, seq: u64, err: drv_format::crypto::KeyError },
    #[error(transparent)]
    Media(#[from] MediaError),
    /// The snapshot store could not preserve what a snapshot needs (nothing was overwritten).
    #[error("preserve blocks for snapshots: {0}")]
    Preserve(#[from] crate::cow::CowError),
    #[error("write {path} at offset {offset}: {err}")]
    Write { path: String, offset: u64, err: std::io::Error },
    #[error("fdatasync {path}: {err}")]
    Sync { path: String, err: std::io::Error },
    #[error("store {path}: {err}")]
    StorePosition { path: String, err: std::io::Error },
}

/// Told every batch of writes the apply step is about to make, before any reaches the target:
/// where copy-on-write snapshots save the old blocks (`snapshot::Snapshots`).
pub trait OverwriteObserver: Send + Sync {
    /// `writes` (one pass, see [`OverwriteObserver::pass_len`]) are about to reach the target;
    /// `ends` are the batch's unit ends (given with its last pass; none for a resync run applied
    /// in part: it ends no unit).
    fn before_apply(
        &self,
        volume_id: u64,
        target: &File,
        writes: &[Write],
        ends: &[UnitEnd],
    ) -> Result<(), crate::cow::CowError>;

    /// How many of `writes` one pass may take (all, unless the observer must see the target
    /// between two writes of a block).
    fn pass_len(&self, _volume_id: u64, writes: &[Write]) -> usize {
        writes.len()
    }

    /// Called by the apply thread about once a second between steps (upkeep: expiry).
    fn tick(&self, _v: &ReplicaVolume) {}

    /// A resync run is about to be applied in part (the target then shows no state the source
    /// had until it ends): keep the image at `applied`, the last consistent one, readable.
    fn hold_consistent_point(&self, _v: &ReplicaVolume, _applied: Applied) -> Result<(), crate::cow::CowError> {
        Ok(())
    }

    /// The run ended: the target is consistent again, and what `hold_consistent_point` kept goes.
    fn release_consistent_point(&self, _v: &ReplicaVolume) {}
}

/// The observer of a replica without snapshot stores (tools that replay a DR log).
pub struct NoSnapshots;

impl OverwriteObserver for NoSnapshots {
    fn before_apply(&self, _: u64, _: &File, _: &[Write], _: &[UnitEnd]) -> Result<(), crate::cow::CowError> {
        Ok(())
    }
}

/// The writes of `records` (whole units, in order), each with the position ending its unit, and
/// the unit ends.
pub fn unit_writes(records: &[LogRecord]) -> Batch {
    drv_proto::cow::unit_writes(records.iter().map(|r| &r.header.desc))
}

/// The durable applied position of a volume (`NAME.applied`, replaced atomically).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub seq: u64,
    pub epoch: u64,
    /// The position is inside a RESYNC run applied in part (see the module docs): the target is
    /// not consistent until the run ends.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial_resync: bool,
}

impl Applied {
    pub fn load(path: &Path) -> std::io::Result<Applied> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| std::io::Error::other(format!("{}: not an applied-position file: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Applied::default()),
            Err(e) => Err(e),
        }
    }

    /// Replaces the file atomically and durably (`drv_files::replace`).
    pub fn store(&self, path: &Path) -> std::io::Result<()> {
        drv_files::replace(path, serde_json::to_string(self).expect("serializable").as_bytes())
    }
}

/// What the status shows about a volume's apply.
#[derive(Clone, Debug, Default)]
pub struct ApplyState {
    /// The sequence gate of what is relayed in, and its positions: submitted to the DR log (in
    /// order; may not be durable yet) and durable there.
    pub seq: Sequencer,
    pub applied: Applied,
    /// A RESYNC run has been received in part: it is applied only when complete.
    pub resyncing: bool,
    /// Records waiting for their unit to complete.
    pub pending_records: u64,
    /// An error that stopped apply (e.g. a payload that does not authenticate).
    pub error: Option<String>,
    pub applied_records: u64,
    pub applied_units: u64,
    /// The volume was rebased to start after this sequence (a full run); its apply thread
    /// takes it before it reads on.
    pub rebased: Option<u64>,
}

/// A volume's limits from its configuration: each read where it is used, so a change applies at
/// the next use (the window's upkeep, about every second; the next check; the next snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes its snapshot store may hold (`None`: no limit).
    pub snapshot_bytes_limit: Option<u64>,
    /// The retention window (any point in time): how long, in seconds, and most bytes.
    pub retention_secs: Option<u64>,
    pub retention_bytes: Option<u64>,
    /// Scheduled recovery checks, in seconds.
    pub check_interval_secs: Option<u64>,
}

impl Limits {
    pub fn of(v: &drv_config::Volume) -> Limits {
        Limits {
            snapshot_bytes_limit: v.snapshot_bytes_limit,
            retention_secs: v.retention,
            retention_bytes: v.retention_bytes,
            check_interval_secs: v.check_interval,
        }
    }
}

/// One volume on the replica.
pub struct ReplicaVolume {
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    /// The volume's block size (change maps, snapshot stores).
    pub block_bytes: u64,
    /// Its limits from the configuration, which change while it runs ([`ReplicaVolume::limits`]).
    limits: Mutex<Limits>,
    /// Removed from the configuration: its apply thread ends.
    retired: std::sync::atomic::AtomicBool,
    /// Failed over: the apply step holds (records are still logged), the target does not change.
    pub held: std::sync::atomic::AtomicBool,
    pub key: VolumeKey,
    pub target_path: PathBuf,
    target: File,
    applied_path: PathBuf,
    pub state: Mutex<ApplyState>,
    pub changed: Condvar,
    /// The applied sequence, for relay streams that report it back to staging as it moves.
    pub applied_tx: tokio::sync::watch::Sender<u64>,
    /// Held while units are applied: whoever else holds it (a snapshot) sees the target at a unit
    /// boundary that does not move.
    pub apply_gate: Mutex<()>,
    /// Media resync state (lock order: `apply_gate`, then `media`, then `state`).
    pub media: Mutex<Media>,
}

impl ReplicaVolume {
    /// A volume that holds nothing (nothing applied, nothing logged) starts at record
    /// `first`, the `FULL` record of a resync run that ships every block, instead of seq 1 (its
    /// staging server trimmed the records before it). The position `first - 1` is stored first,
    /// marked inside a run applied in part (the target shows no state of the source until the
    /// run is applied), so a restart reads on from there. `st` is this volume's state, locked.
    pub fn rebase(&self, st: &mut ApplyState, drlog: &Wrl, first: u64, epoch: u64) -> Result<(), String> {
        if st.applied.seq != 0 || st.seq.submitted() != 0 {
            return Err(format!("it holds the volume up to seq {}", st.applied.seq.max(st.seq.submitted())));
        }
        let base = Applied { seq: first - 1, epoch, partial_resync: true };
        drlog.rebase_volume(self.id, base.seq)?;
        base.store(&self.applied_path).map_err(|e| format!("{}: {e}", self.applied_path.display()))?;
        st.applied = base;
        st.seq.rebase(base.seq);
        st.rebased = Some(base.seq);
        tracing::warn!(volume = %self.name, seq = first, "this replica held nothing of the volume and its first records are gone from staging: it starts at the full resync run at seq {first}; consistent once the run is applied");
        Ok(())
    }

    /// Ends its apply thread (it was removed from the configuration).
    pub fn retire(&self) {
        self.retired.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether it was removed from the configuration.
    pub fn is_retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Its limits now.
    pub fn limits(&self) -> Limits {
        *self.limits.lock().expect("limits")
    }

    /// Sets its limits (a configuration change); the snapshot store's own limit is set by
    /// `Snapshots::set_limit`.
    pub fn set_limits(&self, l: Limits) {
        *self.limits.lock().expect("limits") = l;
    }

    /// Opens volume `name` (configured as `vol`) with its target and its applied position.
    pub fn open(
        name: &str,
        vol: &drv_config::Volume,
        key: VolumeKey,
        target_path: PathBuf,
        applied_path: PathBuf,
        drlog: &Wrl,
    ) -> std::io::Result<ReplicaVolume> {
        let (id, size_bytes, block_bytes) = (vol.id, vol.size_bytes, vol.block_bytes);
        let media = Media::load(applied_path.parent().unwrap_or(Path::new(".")), name, id, size_bytes, block_bytes)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("target {}: {e}", target_path.display()));
        let is_dev = {
            use std::os::unix::fs::FileTypeExt;
            std::fs::metadata(&target_path).is_ok_and(|m| m.file_type().is_block_device())
        };
        // A target device is also claimed from the kernel: never written while it is mounted.
        let target = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(!is_dev)
            .truncate(false)
            .custom_flags(if is_dev { libc::O_EXCL } else { 0 })
            .open(&target_path)
            .map_err(|e| named(drv_files::busy_device(e)))?;
        // One writer per target, even one outside the data directory (a block device two replica
        // endpoints on one host were given).
        drv_files::lock_exclusive(&target, "replica target", &target_path).map_err(std::io::Error::other)?;
        let len = {
            use std::io::Seek;
            (&target).seek(std::io::SeekFrom::End(0)).map_err(named)?
        };
        if len < size_bytes {
            if !target.metadata().map_err(named)?.is_file() {
                return Err(std::io::Error::other(format!(
                    "target {} is {len} bytes, smaller than the volume ({size_bytes} bytes)",
                    target_path.display()
                )));
            }
            target.set_len(size_bytes).map_err(named)?;
        }
        let applied = Applied::load(&applied_path)?;
        let log = drlog.volume(id).map(|s| s.log).unwrap_or_default();
        let durable = log.last_seq.max(applied.seq);
        let last_epoch = if log.last_seq >= applied.seq { log.last_epoch } else { applied.epoch };
        // A DR log that holds nothing of the volume (new, or recreated) continues after what was
        // applied: the next relayed record must follow it.
        drlog.resume_volume(id, durable);
        Ok(ReplicaVolume {
            id,
            name: name.to_owned(),
            size_bytes,
            block_bytes,
            limits: Mutex::new(Limits::of(vol)),
            retired: Default::default(),
            held: std::sync::atomic::AtomicBool::new(false),
            key,
            target_path,
            target,
            applied_path,
            state: Mutex::new(ApplyState {
                seq: Sequencer::new(durable, last_epoch),
                applied,
                resyncing: applied.partial_resync,
                ..Default::default()
            }),
            changed: Condvar::new(),
            applied_tx: tokio::sync::watch::channel(applied.seq).0,
            apply_gate: Mutex::new(()),
            media: Mutex::new(media),
        })
    }

    /// The target, for reads (snapshot images read it where nothing was preserved).
    pub fn target(&self) -> &File {
        &self.target
    }

    /// Notes records durable in the DR log up to `seq` and wakes the apply loop.
    pub fn logged(&self, seq: u64) {
        let mut s = self.state.lock().expect("apply state");
        s.seq.durable_through(seq);
        drop(s);
        self.changed.notify_all();
    }
}

/// The apply cursor of one volume over the DR log, and its records waiting for their unit
/// (`drv_proto::Units`: an epoch, or a whole resync run) to complete.
pub struct Applier {
    cursor: u64,
    units: Units<LogRecord>,
    /// The last step found more than half a step's worth of records: a backlog to work off.
    backlog: bool,
}

/// Bytes of records one apply step reads from the DR log at most.
const STEP_READ_BYTES: u64 = 8 << 20;

impl Applier {
    pub fn new(v: &ReplicaVolume, drlog: &Wrl) -> Applier {
        Applier {
            cursor: drlog.status().first_lsn,
            units: Units::new(v.state.lock().expect("apply state").applied.seq),
            backlog: false,
        }
    }

    /// Reads on after `base` (the volume was rebased, see [`ReplicaVolume::rebase`]).
    pub fn rebase(&mut self, base: u64) {
        assert!(self.units.last_seq() == 0 && self.units.pending_len() == 0, "only an empty volume is rebased");
        self.units = Units::new(base);
    }

    /// The last sequence read from the DR log.
    pub fn last_read_seq(&self) -> u64 {
        self.units.last_seq()
    }

    /// Reads what the DR log holds beyond the cursor and applies every unit that is complete.
    /// Returns whether any record was read.
    pub fn step(
        &mut self,
        v: &ReplicaVolume,
        drlog: &Wrl,
        observer: &dyn OverwriteObserver,
    ) -> Result<bool, ApplyError> {
        // While this volume was idle, other volumes' records moved the DR log on and it trimmed
        // past this cursor. Nothing of this volume was in what it trimmed: the log trims only
        // what every volume confirmed, and this one confirms only what it applied.
        self.cursor = self.cursor.max(drlog.status().first_lsn);
        let recs = drlog.read(self.cursor, STEP_READ_BYTES).map_err(ApplyError::ReadLog)?;
        let read: u64 = recs.iter().map(|r| r.payload.len() as u64).sum();
        self.backlog = read >= STEP_READ_BYTES / 2;
        if recs.is_empty() {
            return Ok(false);
        }
        // Complete units are applied together: one fdatasync and one position update for all of
        // them (the position still ends a unit, and a crash replays from the previous one).
        let mut ready: Vec<LogRecord> = Vec::new();
        let mut units = 0u64;
        for r in recs {
            self.cursor = r.header.lsn + 1;
            let d = r.header.desc;
            // A checkpoint (the log's own record of a position) is never applied.
            if d.volume_id != v.id || d.volume_seq <= self.units.last_seq() || d.flags.contains(Flags::CHECKPOINT) {
                continue;
            }
            if d.volume_seq != self.units.last_seq() + 1 {
                return Err(ApplyError::Gap { volume: v.id, seq: d.volume_seq, after: self.units.last_seq() });
            }
            let e = Entry {
                seq: d.volume_seq,
                epoch: d.epoch,
                resync: d.flags.contains(Flags::RESYNC),
                epoch_end: d.flags.contains(Flags::EPOCH_END),
            };
            units += self.units.push(e, r, &mut ready);
        }
        if !ready.is_empty() {
            apply_units(v, drlog, observer, &ready, units, false)?;
        }
        // An incomplete RESYNC run filling the DR log is applied as far as it came (see the
        // module docs): its end may not fit beside it.
        if drlog.room_bytes() < drlog.capacity_bytes() / 2
            && let Some(part) = self.units.take_partial_resync()
        {
            tracing::info!(
                volume = v.id,
                records = part.len(),
                "a resync run larger than half the DR log: applying it as it arrives (the target is consistent again when it ends)"
            );
            apply_units(v, drlog, observer, &part, 0, true)?;
        }
        let mut s = v.state.lock().expect("apply state");
        s.pending_records = self.units.pending_len() as u64;
        s.resyncing = self.units.pending_resync() || s.applied.partial_resync;
        Ok(true)
    }
}

/// Applies every complete unit the DR log holds (at start-up, and for `drv replica recover`), so
/// the target is at the last complete epoch before anything else happens.
pub fn catch_up(v: &ReplicaVolume, drlog: &Wrl, observer: &dyn OverwriteObserver) -> Result<Applier, ApplyError> {
    let mut a = Applier::new(v, drlog);
    while a.step(v, drlog, observer)? {}
    Ok(a)
}

/// The apply loop of one volume; runs on its own thread until `stop` is set.
pub fn run(
    v: Arc<ReplicaVolume>,
    drlog: Arc<Wrl>,
    observer: Arc<dyn OverwriteObserver>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    mut applier: Applier,
) {
    lower_priority();
    let mut last_step = std::time::Instant::now();
    let mut last_tick = std::time::Instant::now();
    let mut full_said = false;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && !v.is_retired() {
        if last_tick.elapsed() >= TICK_INTERVAL {
            observer.tick(&v);
            last_tick = std::time::Instant::now();
        }
        {
            let mut s = v.state.lock().expect("apply state");
            if let Some(base) = s.rebased.take() {
                applier.rebase(base);
            }
            let held = v.held.load(std::sync::atomic::Ordering::Acquire);
            if held || s.error.is_some() || s.seq.durable() <= applier.last_read_seq() {
                let _ = v.changed.wait_timeout(s, Duration::from_millis(200)).expect("apply state");
                continue;
            }
        }
        // Pacing: what is durable in the DR log is safe already (the RPO); applying it a few
        // milliseconds later lets units gather, so one target fdatasync and one position update
        // cover many of them instead of one each (at a low write rate every write is its own
        // epoch). Not while there is a backlog (units have gathered already) or the DR log
        // fills: then apply runs flat out.
        let since = last_step.elapsed();
        if since < APPLY_INTERVAL && !applier.backlog && drlog.room_bytes() > drlog.capacity_bytes() / 2 {
            std::thread::sleep(APPLY_INTERVAL - since);
        }
        last_step = std::time::Instant::now();
        match applier.step(&v, &drlog, observer.as_ref()) {
            Ok(true) => full_said = false,
            Ok(false) => std::thread::sleep(Duration::from_millis(2)),
            Err(e @ ApplyError::Preserve(crate::cow::CowError::Full { .. })) => {
                // Never overwrite what a snapshot needs: wait until a snapshot is deleted (or
                // the limit raised), then read the DR log again from the applied position.
                if !std::mem::replace(&mut full_said, true) {
                    tracing::error!(volume = v.id, "apply waits: {e}");
                }
                v.state.lock().expect("apply state").error = Some(e.to_string());
                std::thread::sleep(STORE_FULL_RETRY);
                applier = Applier::new(&v, &drlog);
                v.state.lock().expect("apply state").error = None;
            }
            Err(e) => {
                tracing::error!(volume = v.id, "apply stopped: {e}");
                v.state.lock().expect("apply state").error = Some(e.to_string());
            }
        }
    }
}

/// How often the observer's upkeep runs.
const TICK_INTERVAL: Duration = Duration::from_secs(1);

/// How often apply tries again while the snapshot store is full.
const STORE_FULL_RETRY: Duration = Duration::from_secs(1);

/// Least time between two apply steps while the DR log has room (see `run`).
pub const APPLY_INTERVAL: Duration = Duration::from_millis(50);

/// Receiving into the DR log goes before applying when the two compete for CPU: what is durable in
/// the DR log is already safe (it sets the RPO), applying only moves the replica image forward.
/// The apply thread runs at a lower priority (nice 10): it still gets whatever the receive path
/// leaves, and all of an idle host.
fn lower_priority() {
    // SAFETY: plain syscalls on this thread's own id.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
    if r != 0 {
        tracing::debug!("apply thread keeps its priority: {}", std::io::Error::last_os_error());
    }
}

/// Writes `records` to the target and syncs it, in passes: before each, snapshots preserve what
/// they need of the blocks it overwrites, durably.
fn write_target(
    v: &ReplicaVolume,
    observer: &dyn OverwriteObserver,
    records: &[LogRecord],
    partial_resync: bool,
) -> Result<(), ApplyError> {
    let mut plain = Vec::with_capacity(records.len());
    for r in records {
        let d = &r.header.desc;
        let p =
            v.key.open(d, &r.payload).map_err(|err| ApplyError::Decrypt { volume: v.id, seq: d.volume_seq, err })?;
        if !p.is_empty() {
            plain.push((d.offset, p));
        }
    }
    let mut batch = unit_writes(records);
    if partial_resync {
        batch.ends.clear();
    }
    assert_eq!(plain.len(), batch.writes.len(), "one write per record with data");
    let mut done = 0;
    loop {
        let n = observer.pass_len(v.id, &batch.writes[done..]);
        let last = done + n == batch.writes.len();
        let ends = if last { batch.ends.as_slice() } else { &[] };
        observer.before_apply(v.id, &v.target, &batch.writes[done..done + n], ends)?;
        for (offset, data) in &plain[done..done + n] {
            v.target.write_all_at(data, *offset).map_err(|err| ApplyError::Write {
                path: v.target_path.display().to_string(),
                offset: *offset,
                err,
            })?;
        }
        done += n;
        if last {
            break;
        }
    }
    v.target.sync_data().map_err(|err| ApplyError::Sync { path: v.target_path.display().to_string(), err })
}

/// Applies whole units (`records` ends at a unit boundary), then makes them and the new position durable.
fn apply_units(
    v: &ReplicaVolume,
    drlog: &Wrl,
    observer: &dyn OverwriteObserver,
    records: &[LogRecord],
    units: u64,
    partial_resync: bool,
) -> Result<(), ApplyError> {
    let last = records.last().expect("units are not empty");
    let _gate = v.apply_gate.lock().expect("apply gate");
    let before = v.state.lock().expect("apply state").applied;
    if partial_resync && !before.partial_resync {
        // The target stops showing a state the source had: its last one stays readable.
        observer.hold_consistent_point(v, before)?;
    }
    // The media phase changes only under the apply gate (held here): lock it briefly each time,
    // so that status is not held up by a whole apply.
    if v.media.lock().expect("media").tracking() {
        // A media resync is copying a backup onto the target: leave it alone and note which
        // blocks these records change (the agent ships them at `complete`).
        let mut ranges = Vec::new();
        for r in records {
            let d = &r.header.desc;
            v.key.open(d, &r.payload).map_err(|err| ApplyError::Decrypt { volume: v.id, seq: d.volume_seq, err })?;
            if d.length > 0 {
                ranges.push((d.offset, d.length as u64));
            }
        }
        v.media.lock().expect("media").mark(&ranges)?;
    } else {
        write_target(v, observer, records, partial_resync)?;
    }
    let applied = Applied { seq: last.header.desc.volume_seq, epoch: last.header.desc.epoch, partial_resync };
    assert!(
        applied.seq > before.seq && applied.epoch >= before.epoch,
        "volume {}: the applied position would move back from {before:?} to {applied:?}",
        v.id
    );
    applied
        .store(&v.applied_path)
        .map_err(|err| ApplyError::StorePosition { path: v.applied_path.display().to_string(), err })?;
    v.media.lock().expect("media").applied(applied.seq)?;
    // Applied and recorded: the DR log may drop these records (a retention window for
    // point-in-time recovery would confirm later instead).
    drlog.confirm(v.id, last.header.lsn);
    let mut s = v.state.lock().expect("apply state");
    s.applied = applied;
    s.applied_records += records.len() as u64;
    s.applied_units += units;
    drop(s);
    v.applied_tx.send_replace(applied.seq);
    if before.partial_resync && !partial_resync {
        observer.release_consistent_point(v);
    }
    Ok(())
}
