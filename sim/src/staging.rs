//! The simulated staging server: the volume sequencer (`drv_proto::Sequencer`) in front of the real
//! WRL (`drv_wrl::Wrl`, driven: one commit per step) on simulated disks, and the relay window
//! (`drv_proto::RelayWindow`) towards the replica. A crash rebuilds the disks as a power cut could
//! leave them (unsynced writes lost, kept or torn per sector) and recovers the log from them.

use std::sync::{Arc, Mutex};

use drv_format::crypto::VolumeKey;
use drv_format::record::Flags;
use drv_proto::relay::Record;
use drv_proto::{Admit, Offer, RelayWindow, Sequencer};
use drv_wrl::storage::sim::{Fate, SimStorage, SimWorld};
use drv_wrl::{AppendRequest, CreateOptions, LogRecord, Wrl, WrlOptions};

use crate::agent::{Sent, ToAgent};
use crate::net::Rng;

/// Messages from staging's relay to the replica, and back.
#[derive(Clone, Debug)]
pub enum ToReplica {
    Open,
    Records(Vec<LogRecord>),
}

#[derive(Clone, Debug)]
pub enum ToRelay {
    Position { durable: u64 },
    Refused(String),
}

pub const VOLUME: u64 = 1;
/// Segments of the WRL: small, so it fills and trims.
const SEGMENT: u64 = 1 << 20;
const SLOTS: u64 = 3;
pub const DEVICE: u64 = (64 << 10) + SLOTS * SEGMENT;

/// The outcome of one append, from the log's completion.
type Done = Arc<Mutex<Vec<(u64, Result<bool, String>)>>>;

pub struct Staging {
    pub world: Arc<Mutex<SimWorld>>,
    pub wrl: Wrl,
    pub seq: Sequencer,
    key: VolumeKey,
    done: Done,
    /// Resends of writes in flight: acknowledged once durable.
    dup_acks: Vec<u64>,
    /// The relay: its window and where it reads the log next.
    pub relay: Option<(RelayWindow, u64)>,
    /// Acknowledge on arrival, before the log has it (an injected bug).
    pub ack_early_bug: bool,
}

/// A fresh log on fresh disks.
pub fn create_log(device: u64, wrl_id: u32, segment: u64) -> Arc<Mutex<SimWorld>> {
    let world = SimWorld::new(&[device]);
    let opts = CreateOptions {
        uuid: [wrl_id as u8; 16],
        wrl_id,
        segment_bytes: segment,
        io_align: 4096,
        capacity_bytes: None,
    };
    drv_wrl::create(&SimStorage::all(&world), &opts).expect("create the simulated log");
    world
}

impl Staging {
    pub fn new(key: VolumeKey) -> Staging {
        Staging::open(create_log(DEVICE, 7, SEGMENT), key).expect("a new log opens")
    }

    /// Recovers the log on `world`'s disks; `Err`: the log refuses to open (damage it names).
    fn open(world: Arc<Mutex<SimWorld>>, key: VolumeKey) -> Result<Staging, String> {
        let opts = WrlOptions { queue_bytes_limit: 4 << 20, batch_bytes_limit: 256 << 10, cache_bytes_limit: 1 << 20 };
        let (wrl, _) = Wrl::open_driven(SimStorage::all(&world), opts).map_err(|e| e.to_string())?;
        let log = wrl.volume(VOLUME).map(|v| v.log).unwrap_or_default();
        wrl.resume_volume(VOLUME, log.last_seq);
        Ok(Staging {
            world,
            wrl,
            seq: Sequencer::new(log.last_seq, log.last_epoch),
            key,
            done: Done::default(),
            dup_acks: Vec::new(),
            relay: None,
            ack_early_bug: false,
        })
    }

    /// A write from the agent link; the answers go to `out`. `Err`: the connection breaks.
    pub fn write(&mut self, w: &Sent, out: &mut Vec<ToAgent>) -> Result<(), String> {
        match self.seq.admit(w.seq, w.epoch).map_err(|r| r.to_string())? {
            Admit::Duplicate => {
                self.dup_acks.push(w.seq);
                Ok(())
            }
            Admit::Append => {
                let flags = match (w.epoch_end, w.resync) {
                    (true, _) => Flags::EPOCH_END,
                    (false, true) => Flags::RESYNC,
                    (false, false) => Flags::default(),
                };
                let req = AppendRequest {
                    volume_id: VOLUME,
                    volume_seq: w.seq,
                    epoch: w.epoch,
                    offset: w.offset,
                    flags,
                    data: &w.data,
                    capture_unix: w.capture_unix,
                };
                let (done, seq) = (self.done.clone(), w.seq);
                let cb = Box::new(move |r: drv_wrl::Result<drv_wrl::Appended>| {
                    done.lock().expect("done").push((seq, r.map(|a| a.last_of_volume).map_err(|e| e.to_string())))
                });
                self.wrl.submit(&self.key, req, cb).hand_off();
                if self.ack_early_bug {
                    out.push(ToAgent::Ack { seq: w.seq });
                }
                Ok(())
            }
        }
    }

    /// One group commit; acknowledgements (or refusals) to `out`. `Err`: the connection breaks.
    pub fn commit(&mut self, out: &mut Vec<ToAgent>) -> Result<(), String> {
        self.wrl.commit();
        let done = std::mem::take(&mut *self.done.lock().expect("done"));
        let mut refused = None;
        for (seq, r) in done {
            match r {
                Ok(last_of_volume) => {
                    self.seq.durable_through(seq);
                    if last_of_volume {
                        out.push(ToAgent::Ack { seq });
                    }
                }
                Err(e) => {
                    self.seq.failed(seq);
                    refused.get_or_insert(e);
                }
            }
        }
        let durable = self.seq.durable();
        self.dup_acks.retain(|s| {
            let ack = *s <= durable;
            if ack {
                out.push(ToAgent::Ack { seq: *s });
            }
            !ack
        });
        match refused {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// What the agent hears on opening the volume: the position, once nothing is in flight, and
    /// never while the log has failed (records it reported failed may still be on its disks: the
    /// position is known again once it recovered).
    pub fn volume_state(&self) -> Option<ToAgent> {
        let settled = self.seq.durable() >= self.seq.submitted() && self.wrl.status().failed.is_none();
        settled.then(|| ToAgent::State {
            last_seq: self.seq.submitted(),
            last_epoch: self.seq.last_epoch(),
            room_bytes: self.wrl.room_bytes(),
            capacity_bytes: self.wrl.capacity_bytes(),
        })
    }

    /// The replica's position on a new relay connection: the window resumes after it.
    pub fn relay_open(&mut self, durable: u64) -> Result<(), String> {
        let w = RelayWindow::resume(VOLUME, durable, self.seq.submitted(), 256 << 10).map_err(|e| e.to_string())?;
        self.relay = Some((w, self.wrl.status().first_lsn));
        Ok(())
    }

    /// Reads the log on and sends what the window lets go. `Err`: the relay connection breaks.
    pub fn relay_pump(&mut self) -> Result<Option<ToReplica>, String> {
        let Some((window, cursor)) = &mut self.relay else { return Ok(None) };
        if window.is_full() {
            return Ok(None);
        }
        let recs = self.wrl.read(*cursor, 64 << 10).map_err(|e| e.to_string())?;
        let mut send = Vec::new();
        for r in recs {
            *cursor = r.header.lsn + 1;
            let rec = Record::of(&r.header.desc, r.header.lsn);
            if window.offer(&rec).map_err(|e| e.to_string())? == Offer::Send {
                send.push(r);
            }
        }
        self.confirm();
        Ok((!send.is_empty()).then_some(ToReplica::Records(send)))
    }

    /// A position report of the replica.
    pub fn relay_position(&mut self, durable: u64) -> Result<(), String> {
        let Some((window, _)) = &mut self.relay else { return Err("a position before the relay opened".into()) };
        window.acknowledged(durable).map_err(|e| e.to_string())?;
        self.confirm();
        Ok(())
    }

    fn confirm(&self) {
        if let Some((w, _)) = &self.relay
            && w.confirmed_lsn() > 0
        {
            self.wrl.confirm(VOLUME, w.confirmed_lsn());
        }
    }

    /// Power cut and restart: the disks as the cut leaves them, the log recovered from them.
    /// `Err`: the log refused to open.
    pub fn crash(&mut self, rng: &mut Rng) -> Result<(), String> {
        let images = crash_images(&self.world, rng);
        let bug = self.ack_early_bug;
        *self = Staging::open(SimWorld::from_images(images), self.key.clone())?;
        self.ack_early_bug = bug;
        Ok(())
    }
}

/// The images a power cut leaves of `world`'s devices now: each unsynced write lost, kept or torn.
pub fn crash_images(world: &Arc<Mutex<SimWorld>>, rng: &mut Rng) -> Vec<Vec<u8>> {
    let w = world.lock().expect("sim world");
    let fates: Vec<Fate> = (0..w.trace.len())
        .map(|_| match rng.below(3) {
            0 => Fate::Lost,
            1 => Fate::Kept,
            _ => Fate::Torn(rng.next_u64()),
        })
        .collect();
    w.crash_image(w.trace.len(), &|i| fates[i])
}
