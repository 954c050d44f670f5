//! The simulated host: an application issuing writes to a protected volume through the agent's
//! synchronous path. A write gets a sequence number and an epoch (`drv_proto::EpochClock`, the
//! agent's own rule), goes to staging, reaches the local disk only after staging acknowledged it,
//! and completes after both. Overlapping writes are never in flight together. When the connection
//! breaks, the writes not acknowledged are sent again, unchanged, on the next one (staging takes a
//! resend it logged already as a duplicate).
//!
//! The history of every write issued is the model the invariants check the replica against.

use std::collections::BTreeMap;

use bytes::Bytes;
use drv_proto::EpochClock;

use crate::net::Rng;

/// One write as issued (the model).
#[derive(Clone, Debug)]
pub struct Issued {
    pub seq: u64,
    pub epoch: u64,
    pub offset: u64,
    pub data: Bytes,
    /// A zero-length `EPOCH_END` record (the volume went idle).
    pub epoch_end: bool,
}

/// What the writer sends to staging.
#[derive(Clone, Debug)]
pub enum ToStaging {
    Open,
    Write(Issued),
}

/// What staging answers.
#[derive(Clone, Debug)]
pub enum ToWriter {
    State { last_seq: u64 },
    Ack { seq: u64 },
}

pub struct Writer {
    pub volume_bytes: u64,
    clock: EpochClock,
    /// Every write issued, by `seq - 1`.
    pub history: Vec<Issued>,
    /// Sent, not yet acknowledged.
    inflight: BTreeMap<u64, ()>,
    /// Acknowledged, local write not yet done.
    to_local: Vec<u64>,
    /// Every write up to here is acknowledged by staging.
    pub acked: u64,
    /// The application's disk.
    pub local: Vec<u8>,
    /// Whether the current connection has its volume open.
    pub open: bool,
    /// Allow overlapping writes in flight together (an injected bug).
    pub overlap_bug: bool,
}

impl Writer {
    pub fn new(volume_bytes: u64) -> Writer {
        Writer {
            volume_bytes,
            clock: EpochClock::new(0),
            history: Vec::new(),
            inflight: BTreeMap::new(),
            to_local: Vec::new(),
            acked: 0,
            local: vec![0; volume_bytes as usize],
            open: false,
            overlap_bug: false,
        }
    }

    /// Writes issued and not yet complete (sent, or acknowledged and not yet written locally).
    pub fn busy(&self) -> usize {
        self.inflight.len() + self.to_local.len()
    }

    fn overlaps(&self, offset: u64, len: u64) -> bool {
        let busy = self.inflight.keys().chain(&self.to_local).map(|s| &self.history[*s as usize - 1]);
        busy.filter(|w| !w.data.is_empty()).any(|w| offset < w.offset + w.data.len() as u64 && w.offset < offset + len)
    }

    /// Issues a new write (up to 8 in flight), unless it would overlap one in flight.
    pub fn issue(&mut self, rng: &mut Rng) -> Option<ToStaging> {
        if !self.open || self.busy() >= 8 {
            return None;
        }
        let len = 4096 * (1 + rng.below(16));
        let offset = rng.below((self.volume_bytes - len) / 4096 + 1) * 4096;
        if self.overlaps(offset, len) && !self.overlap_bug {
            return None;
        }
        let epoch = self.clock.issue();
        let seq = self.history.len() as u64 + 1;
        let data = Bytes::from(drv_format::pattern(rng.next_u64(), len as usize));
        let w = Issued { seq, epoch, offset, data, epoch_end: false };
        self.history.push(w.clone());
        self.inflight.insert(seq, ());
        Some(ToStaging::Write(w))
    }

    /// Ends the current epoch when nothing is in flight (the agent's idle close).
    pub fn close_idle(&mut self) -> Option<ToStaging> {
        if !self.open || self.busy() > 0 {
            return None;
        }
        let epoch = self.clock.close_idle()?;
        let seq = self.history.len() as u64 + 1;
        let w = Issued { seq, epoch, offset: 0, data: Bytes::new(), epoch_end: true };
        self.history.push(w.clone());
        self.inflight.insert(seq, ());
        Some(ToStaging::Write(w))
    }

    /// Staging acknowledged every write up to `seq`.
    fn acknowledged(&mut self, seq: u64) {
        let done: Vec<u64> = self.inflight.range(..=seq).map(|(s, _)| *s).collect();
        for s in done {
            self.inflight.remove(&s);
            self.to_local.push(s);
        }
        self.acked = self.acked.max(seq);
    }

    /// The connection opened the volume: staging holds everything up to `last_seq` durably. What
    /// it lacks of what was sent goes again, unchanged. Returns the resends, or an error when
    /// staging lost writes it had acknowledged.
    pub fn opened(&mut self, last_seq: u64) -> Result<Vec<ToStaging>, String> {
        if last_seq < self.acked {
            return Err(format!("staging acknowledged seq {} but holds only up to seq {last_seq}", self.acked));
        }
        self.acknowledged(last_seq);
        self.open = true;
        let resend = self.inflight.keys().map(|s| ToStaging::Write(self.history[*s as usize - 1].clone())).collect();
        Ok(resend)
    }

    /// An answer from staging; `Err` breaks the connection.
    pub fn receive(&mut self, m: ToWriter) -> Result<(), String> {
        match m {
            ToWriter::State { .. } => Err("a second VolumeState on one connection".into()),
            ToWriter::Ack { seq } => {
                self.acknowledged(seq);
                Ok(())
            }
        }
    }

    /// One acknowledged write reaches the local disk (any of them: writes in flight together
    /// complete in any order) and completes.
    pub fn local_write(&mut self, rng: &mut Rng) {
        if self.to_local.is_empty() {
            return;
        }
        let seq = self.to_local.swap_remove(rng.below(self.to_local.len() as u64) as usize);
        let w = &self.history[seq as usize - 1];
        let (o, d) = (w.offset as usize, w.data.clone());
        self.local[o..o + d.len()].copy_from_slice(&d);
        // The EPOCH_END marker is no write of the clock's (`EpochClock::close_idle`).
        if !w.epoch_end {
            self.clock.complete();
        }
    }

    /// The volume as the writes `1..=seq` leave it, in sequence order.
    pub fn image_at(&self, seq: u64) -> Vec<u8> {
        let mut img = vec![0u8; self.volume_bytes as usize];
        for w in &self.history[..seq as usize] {
            img[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(&w.data);
        }
        img
    }
}
