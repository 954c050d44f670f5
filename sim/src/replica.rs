//! The simulated replica: the volume sequencer (`drv_proto::Sequencer`) in front of its DR log (the
//! real WRL, driven), and the apply step: the DR log's records grouped into units
//! (`drv_proto::Units`), each unit written to the target and synced, then the applied position
//! stored (a small file replaced whole: it survives a crash once stored), then confirmed to the
//! DR log. A crash rebuilds the DR log's and the target's disks as a power cut could leave them.
//!
//! Snapshots: the copy-on-write rules of `drv_proto::cow` around a store whose commits are
//! atomic and durable (the real one is redb), preserving old blocks before the target is written;
//! each snapshot remembers the image it was taken of, and the world checks every snapshot's image
//! against it after every apply and every crash.

use std::sync::{Arc, Mutex};

use drv_format::crypto::VolumeKey;
use drv_format::record::Flags;
use drv_proto::cow::{self, Points, Source, Version};
use drv_proto::units::{Entry, Units};
use drv_proto::{Admit, Sequencer};
use drv_wrl::storage::Storage;
use drv_wrl::storage::sim::{SimStorage, SimWorld};
use drv_wrl::{LogRecord, Wrl, WrlOptions};

use crate::net::Rng;
use crate::staging::{ToRelay, VOLUME, crash_images, create_log};

const SEGMENT: u64 = 1 << 20;
const SLOTS: u64 = 6;
const DEVICE: u64 = (64 << 10) + SLOTS * SEGMENT;

type Done = Arc<Mutex<Vec<(u64, Result<(), String>)>>>;

/// The id of the snapshot the replica keeps of the last consistent image while a resync run is
/// applied in part.
pub const AUTO_SNAPSHOT: u64 = u64::MAX;

/// Blocks of the snapshot store.
pub const COW_BLOCK: u64 = 16 << 10;

/// The snapshot store: what a commit made durable survives every crash.
#[derive(Clone, Debug, Default)]
pub struct Store {
    pub points: Points,
    /// Per block, its versions with their contents.
    pub versions: std::collections::BTreeMap<u64, Vec<(Version, Vec<u8>)>>,
    /// Snapshots: (id, position, the image when taken).
    pub snapshots: Vec<(u64, u64, Vec<u8>)>,
    /// The retention window's points (unit ends, recorded with a batch's last pass; its start is
    /// `points.window()`).
    pub window: std::collections::BTreeSet<u64>,
}

impl Store {
    fn bound(&self, block: u64) -> u64 {
        self.versions.get(&block).and_then(|v| v.iter().map(|(x, _)| x.hi).max()).unwrap_or(0)
    }

    /// The image of the snapshot at `position`, read the way the replica reads it.
    pub fn image(&self, position: u64, target: &[u8]) -> Vec<u8> {
        let mut img = target.to_vec();
        for (block, vs) in &self.versions {
            if let Source::Version(v) = cow::read_source(position, vs.iter().map(|(x, _)| x)) {
                let data = &vs.iter().find(|(x, _)| *x == v).expect("found").1;
                let off = (block * COW_BLOCK) as usize;
                img[off..off + data.len()].copy_from_slice(data);
            }
        }
        img
    }
}

pub struct Replica {
    pub log_world: Arc<Mutex<SimWorld>>,
    drlog: Wrl,
    pub seq: Sequencer,
    done: Done,
    target_world: Arc<Mutex<SimWorld>>,
    target: SimStorage,
    /// The applied position `(seq, epoch)`, as stored (durable).
    pub applied: (u64, u64),
    cursor: u64,
    units: Units<LogRecord>,
    key: VolumeKey,
    /// A relay connection waits for its first position report.
    open_pending: bool,
    /// Apply each record as it comes, not whole units (an injected bug).
    pub unit_bug: bool,
    /// Preserve a whole batch in one pass, even with a window point between two writes of a
    /// block (an injected bug).
    pub one_pass_bug: bool,
    /// The stored position is inside a RESYNC run applied in part (stored with it).
    partial: bool,
    /// How many times a resync run was applied in part.
    pub partial_applies: u64,
    /// The snapshot store (kept across crashes: its commits are durable).
    pub store: Store,
    /// Write the target before preserving its old blocks (an injected bug).
    pub cow_bug: bool,
}

impl Replica {
    pub fn new(key: VolumeKey, volume_bytes: u64) -> Replica {
        let target = SimWorld::new(&[volume_bytes]);
        Replica::open(create_log(DEVICE, 0, SEGMENT), target, (0, 0), key).expect("a new DR log opens")
    }

    fn open(
        log_world: Arc<Mutex<SimWorld>>,
        target_world: Arc<Mutex<SimWorld>>,
        applied: (u64, u64),
        key: VolumeKey,
    ) -> Result<Replica, String> {
        let (drlog, _) = Wrl::open_driven(SimStorage::all(&log_world), WrlOptions::default())
            .map_err(|e| format!("the DR log refused to open: {e}"))?;
        let log = drlog.volume(VOLUME).map(|v| v.log).unwrap_or_default();
        let (durable, epoch) = if log.last_seq >= applied.0 { (log.last_seq, log.last_epoch) } else { applied };
        drlog.resume_volume(VOLUME, durable);
        let cursor = drlog.status().first_lsn;
        Ok(Replica {
            target: SimStorage::new(target_world.clone(), 0),
            log_world,
            drlog,
            seq: Sequencer::new(durable, epoch),
            done: Done::default(),
            target_world,
            applied,
            cursor,
            units: Units::new(applied.0),
            key,
            open_pending: false,
            unit_bug: false,
            store: Store::default(),
            cow_bug: false,
            one_pass_bug: false,
            partial: false,
            partial_applies: 0,
        })
    }

    /// A relay connection opened: its first position report follows once what is in flight is
    /// durable.
    pub fn relay_opened(&mut self) {
        self.open_pending = true;
    }

    /// Records from the relay, logged in order. `Err`: the connection breaks.
    pub fn records(&mut self, recs: Vec<LogRecord>) -> Result<(), String> {
        for r in recs {
            let d = r.header.desc;
            match self.seq.admit(d.volume_seq, d.epoch).map_err(|e| e.to_string())? {
                Admit::Duplicate => continue,
                Admit::Append => {}
            }
            let (done, seq) = (self.done.clone(), d.volume_seq);
            let cb = Box::new(move |x: drv_wrl::Result<drv_wrl::Appended>| {
                done.lock().expect("done").push((seq, x.map(|_| ()).map_err(|e| e.to_string())))
            });
            self.drlog.submit_sealed(d, r.payload, r.header.payload_crc, cb).hand_off();
        }
        Ok(())
    }

    /// One group commit of the DR log; the position report (if any) to `out`.
    pub fn commit(&mut self, out: &mut Vec<ToRelay>) -> Result<(), String> {
        self.drlog.commit();
        let done = std::mem::take(&mut *self.done.lock().expect("done"));
        let mut moved = false;
        for (seq, r) in done {
            match r {
                Ok(()) => {
                    self.seq.durable_through(seq);
                    moved = true;
                }
                Err(e) => {
                    self.seq.failed(seq);
                    return Err(format!("DR log: {e}"));
                }
            }
        }
        let settled = self.seq.durable() >= self.seq.submitted();
        if (moved || self.open_pending) && settled {
            self.open_pending = false;
            out.push(ToRelay::Position { durable: self.seq.durable() });
        }
        Ok(())
    }

    /// One apply step: every complete unit the DR log holds beyond the cursor is written to the
    /// target and synced, then the position is stored and confirmed. Returns the positions stored.
    pub fn apply(&mut self) -> Result<Vec<(u64, u64)>, String> {
        self.cursor = self.cursor.max(self.drlog.status().first_lsn);
        let recs = self.drlog.read(self.cursor, 256 << 10).map_err(|e| e.to_string())?;
        let mut ready = Vec::new();
        for r in recs {
            self.cursor = r.header.lsn + 1;
            let d = r.header.desc;
            if d.volume_seq <= self.units.last_seq() || d.flags.contains(Flags::CHECKPOINT) {
                continue;
            }
            let e = Entry {
                seq: d.volume_seq,
                epoch: d.epoch,
                resync: d.flags.contains(Flags::RESYNC),
                epoch_end: d.flags.contains(Flags::EPOCH_END) || self.unit_bug,
            };
            self.units.push(e, r, &mut ready);
        }
        let Some(last) = ready.last() else { return self.apply_partial_resync() };
        let (lsn, position) = (last.header.lsn, (last.header.desc.volume_seq, last.header.desc.epoch));
        self.write_target(&ready, false)?;
        self.applied = position;
        self.drlog.confirm(VOLUME, lsn);
        if std::mem::replace(&mut self.partial, false) {
            // The run ended: the target is consistent again; its last consistent image goes.
            let autos: Vec<u64> = self.store.snapshots.iter().filter(|s| s.0 == AUTO_SNAPSHOT).map(|s| s.1).collect();
            self.store.snapshots.retain(|s| s.0 != AUTO_SNAPSHOT);
            for p in autos {
                self.store.points.unpin(p);
            }
            self.collect();
        }
        Ok(vec![position])
    }

    /// A RESYNC run filling more than half the DR log is applied as far as it came (as the real
    /// replica does), after the last consistent image was kept as a snapshot. Stores a position
    /// inside the run (not reported: it ends no unit).
    fn apply_partial_resync(&mut self) -> Result<Vec<(u64, u64)>, String> {
        if self.drlog.room_bytes() >= self.drlog.capacity_bytes() / 2 {
            return Ok(Vec::new());
        }
        let Some(part) = self.units.take_partial_resync() else { return Ok(Vec::new()) };
        let last = part.last().expect("a run is not empty");
        let (lsn, position) = (last.header.lsn, (last.header.desc.volume_seq, last.header.desc.epoch));
        if !self.partial {
            let p = self.applied.0;
            self.store.points.pin(p);
            self.store.snapshots.push((AUTO_SNAPSHOT, p, self.target_image()));
        }
        self.write_target(&part, true)?;
        (self.applied, self.partial) = (position, true);
        self.partial_applies += 1;
        self.drlog.confirm(VOLUME, lsn);
        Ok(Vec::new())
    }

    /// Writes `records` (whole units) to the target in passes, each after preserving what the
    /// snapshots need of the blocks it overwrites (before, unless the injected bug says after),
    /// then syncs it.
    fn write_target(&mut self, records: &[LogRecord], partial: bool) -> Result<(), String> {
        let mut plain = Vec::new();
        for r in records {
            let p = self.key.open(&r.header.desc, &r.payload).map_err(|e| e.to_string())?;
            if !p.is_empty() {
                plain.push((r.header.desc.offset, p));
            }
        }
        let batch = cow::unit_writes(records.iter().map(|r| &r.header.desc));
        if self.store.points.window().is_some() && !partial {
            // Recorded with the last pass's commit (before its writes reach the target).
            self.store.window.extend(batch.ends.iter().map(|e| e.seq));
        }
        let mut done = 0;
        while done < batch.writes.len() {
            let n = match self.one_pass_bug {
                true => batch.writes.len() - done,
                false => cow::pass_len(&self.store.points, COW_BLOCK, &batch.writes[done..]),
            };
            if !self.cow_bug {
                self.preserve(&batch.writes[done..done + n]);
            }
            for (offset, data) in &plain[done..done + n] {
                self.target.write_at(*offset, data).map_err(|e| e.to_string())?;
            }
            if self.cow_bug {
                self.preserve(&batch.writes[done..done + n]);
            }
            done += n;
        }
        self.target.sync().map_err(|e| e.to_string())
    }

    /// Preserves what the snapshots need of the blocks `writes` (one pass) overwrite (one commit).
    fn preserve(&mut self, writes: &[cow::Write]) {
        let store = &self.store;
        let plan = cow::plan(&store.points, COW_BLOCK, writes, |b| store.bound(b));
        let target = self.target_image();
        for v in plan {
            let off = (v.block * COW_BLOCK) as usize;
            let old = target[off..(off + COW_BLOCK as usize).min(target.len())].to_vec();
            self.store.versions.entry(v.block).or_default().push((v, old));
        }
    }

    /// A snapshot of the applied position (between apply steps, as the real one holds the apply
    /// gate); `None` inside a partly applied resync run or with a unit pending of one.
    pub fn snapshot(&mut self, id: u64) -> Option<u64> {
        if self.units.pending_resync() || self.partial {
            return None;
        }
        let p = self.applied.0;
        self.store.points.pin(p);
        self.store.snapshots.push((id, p, self.target_image()));
        Some(p)
    }

    /// Opens the retention window at the applied position (a unit end).
    pub fn open_window(&mut self) {
        let p = self.applied.0;
        self.store.points.set_window(Some(p));
        self.store.window.insert(p);
    }

    /// Moves the window's start forward so that at most `keep` points stay, and frees what no
    /// point needs; returns the blocks freed.
    pub fn expire_window(&mut self, keep: usize) -> usize {
        let n = self.store.window.len();
        if self.store.points.window().is_none() || n <= keep {
            return 0;
        }
        let to = *self.store.window.iter().nth(n - keep).expect("a point");
        self.store.points.set_window(Some(to));
        self.store.window = self.store.window.split_off(&to);
        self.collect()
    }

    /// A snapshot pinned afterwards at `p`, a point of the window, with the source's image there.
    pub fn pin_past(&mut self, id: u64, p: u64, image: Vec<u8>) {
        assert!(self.store.points.can_pin(p), "point {p} is not in the window");
        self.store.points.pin(p);
        self.store.snapshots.push((id, p, image));
    }

    /// The window's points up to the applied position (what `--at` may pick).
    pub fn window_points(&self) -> Vec<u64> {
        self.store.window.range(..=self.applied.0).copied().collect()
    }

    /// Frees the versions no point needs; returns how many.
    fn collect(&mut self) -> usize {
        let mut freed = 0;
        for vs in self.store.versions.values_mut() {
            let dead = cow::garbage(&self.store.points, vs.iter().map(|(v, _)| v));
            freed += dead.len();
            vs.retain(|(v, _)| !dead.contains(v));
        }
        freed
    }

    /// Deletes the oldest snapshot and what only it needed; returns the blocks freed.
    pub fn delete_snapshot(&mut self) -> usize {
        let Some(i) = self.store.snapshots.iter().position(|s| s.0 != AUTO_SNAPSHOT) else { return 0 };
        let (_, p, _) = self.store.snapshots.remove(i);
        self.store.points.unpin(p);
        self.collect()
    }

    /// Every snapshot's image is the one it was taken of.
    pub fn check_snapshots(&self) -> Result<(), String> {
        let target = self.target_image();
        for (id, p, want) in &self.store.snapshots {
            if self.store.image(*p, &target) != *want {
                return Err(format!("snapshot {id} (at seq {p}) no longer shows the image it was taken of"));
            }
        }
        Ok(())
    }

    /// The target as written so far (what a reader of it sees).
    pub fn target_image(&self) -> Vec<u8> {
        self.target_world.lock().expect("sim world").current[0].clone()
    }

    /// Power cut and restart: the DR log's and the target's disks as the cut leaves them; the
    /// stored applied position stays. Returns the positions its catch-up stored.
    pub fn crash(&mut self, rng: &mut Rng) -> Result<Vec<(u64, u64)>, String> {
        let log = crash_images(&self.log_world, rng);
        let target = crash_images(&self.target_world, rng);
        let (bugs, store) = ((self.unit_bug, self.cow_bug, self.one_pass_bug), std::mem::take(&mut self.store));
        let partial = self.partial;
        *self =
            Replica::open(SimWorld::from_images(log), SimWorld::from_images(target), self.applied, self.key.clone())?;
        let partial_applies = self.partial_applies;
        ((self.unit_bug, self.cow_bug, self.one_pass_bug), self.store, self.partial) = (bugs, store, partial);
        self.partial_applies = partial_applies;
        let mut stored = Vec::new();
        // Catch up: replay what the DR log holds beyond the applied position.
        loop {
            let p = self.apply()?;
            if p.is_empty() {
                break;
            }
            stored.extend(p);
        }
        Ok(stored)
    }

    /// Keeps the simulated disks' traces short.
    pub fn compact(&self) {
        self.log_world.lock().expect("sim world").compact();
        self.target_world.lock().expect("sim world").compact();
    }
}
