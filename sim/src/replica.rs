//! The simulated replica: the volume sequencer (`drv_proto::Sequencer`) in front of its DR log (the
//! real WRL, driven), and the apply step: the DR log's records grouped into units
//! (`drv_proto::Units`), each unit written to the target and synced, then the applied position
//! stored (a small file replaced whole: it survives a crash once stored), then confirmed to the
//! DR log. A crash rebuilds the DR log's and the target's disks as a power cut could leave them.

use std::sync::{Arc, Mutex};

use drv_format::crypto::VolumeKey;
use drv_format::record::Flags;
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
        let Some(last) = ready.last() else { return Ok(Vec::new()) };
        let (lsn, position) = (last.header.lsn, (last.header.desc.volume_seq, last.header.desc.epoch));
        for r in &ready {
            let plain = self.key.open(&r.header.desc, &r.payload).map_err(|e| e.to_string())?;
            if !plain.is_empty() {
                self.target.write_at(r.header.desc.offset, &plain).map_err(|e| e.to_string())?;
            }
        }
        self.target.sync().map_err(|e| e.to_string())?;
        self.applied = position;
        self.drlog.confirm(VOLUME, lsn);
        Ok(vec![position])
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
        let bug = self.unit_bug;
        *self =
            Replica::open(SimWorld::from_images(log), SimWorld::from_images(target), self.applied, self.key.clone())?;
        self.unit_bug = bug;
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
