//! The relay window: what of a volume's log goes to one replica, in order, with how many bytes
//! unacknowledged at most, and which log positions the replica's acknowledgements confirm (what
//! the log may trim for it). Staging's relay task wraps it in a QUIC stream and WRL reads; the
//! simulator drives it with simulated ones.
//!
//! The replica reports the highest sequence it holds durably when the relay connects
//! ([`RelayWindow::resume`]) and as it logs more ([`RelayWindow::acknowledged`]). Records are
//! offered in log order ([`RelayWindow::offer`]): another volume's are passed over, those the
//! replica holds already count as confirmed, the next one is sent; anything else means the log no
//! longer holds what the replica needs.
//!
//! **Invariants** (asserted): the records sent have consecutive sequence numbers; an
//! acknowledgement never covers more than was sent; the confirmed position never moves back.

use std::collections::VecDeque;

use drv_format::record::{Flags, RECORD_HEADER_LEN, TAG_LEN, WriteDesc};

/// Log bytes of a record beyond its data: header and tag.
pub const RECORD_OVERHEAD_BYTES: u64 = (RECORD_HEADER_LEN + TAG_LEN) as u64;

/// What the window needs to know of a record read from the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub volume_id: u64,
    pub seq: u64,
    pub lsn: u64,
    /// Data bytes (the record's `length`).
    pub length: u64,
    /// The log's own record of a position (`Flags::CHECKPOINT`): never sent.
    pub checkpoint: bool,
    /// The first record of a resync run that ships every block (`Flags::FULL`): a replica that
    /// holds nothing of the volume may start here.
    pub full: bool,
}

impl Record {
    /// The record at `lsn` described by `d`.
    pub fn of(d: &WriteDesc, lsn: u64) -> Record {
        Record {
            volume_id: d.volume_id,
            seq: d.volume_seq,
            lsn,
            length: d.length as u64,
            checkpoint: d.flags.contains(Flags::CHECKPOINT),
            full: d.flags.contains(Flags::FULL) && !d.flags.contains(Flags::CHECKPOINT),
        }
    }
}

/// What to do with a record offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Another volume's: pass over it.
    Other,
    /// The replica holds it already: pass over it (it counts as confirmed).
    Held,
    /// Send it: it is the next the replica needs. The window counts it in flight.
    Send,
}

/// Why the relay cannot go on with this replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RelayRefusal {
    /// The replica holds the volume further than this log: the log was lost or replaced.
    #[error(
        "replica holds this volume up to seq {replica}, but this staging server's log only reaches seq {ours}: the WRL was lost or replaced; nothing is relayed (the replica would skip every write up to seq {replica} as already held)"
    )]
    Behind { replica: u64, ours: u64 },
    /// The replica needs records this log no longer holds (trimmed, or a new replica).
    #[error("replica needs seq {need} but the log holds this volume from seq {first}: a full resync is required")]
    Missing { need: u64, first: u64 },
    /// The replica acknowledged more than was sent.
    #[error("replica reports durable seq {got}, but only up to {sent} was sent")]
    Ahead { got: u64, sent: u64 },
}

/// One volume's relay to one replica.
#[derive(Clone, Debug)]
pub struct RelayWindow {
    volume_id: u64,
    sent_seq: u64,
    durable_seq: u64,
    /// `(seq, lsn, log bytes)` sent and not yet durable at the replica, in order.
    inflight: VecDeque<(u64, u64, u64)>,
    inflight_bytes: u64,
    limit_bytes: u64,
    confirmed_lsn: u64,
    /// The replica holds nothing and the log no longer holds the volume's first records: the
    /// window passes over records until a `FULL` one (see [`RelayWindow::offer`]).
    seeking: bool,
}

impl RelayWindow {
    /// A relay that resumes after `replica_durable` (the replica's report on connecting), for a
    /// log that holds the volume up to `log_last_seq`, with at most `limit_bytes` in flight.
    pub fn resume(
        volume_id: u64,
        replica_durable: u64,
        log_last_seq: u64,
        limit_bytes: u64,
    ) -> Result<RelayWindow, RelayRefusal> {
        if replica_durable > log_last_seq {
            return Err(RelayRefusal::Behind { replica: replica_durable, ours: log_last_seq });
        }
        Ok(RelayWindow {
            volume_id,
            sent_seq: replica_durable,
            durable_seq: replica_durable,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            limit_bytes,
            confirmed_lsn: 0,
            seeking: false,
        })
    }

    /// Whether the in-flight limit is used up (wait for an acknowledgement before sending more).
    pub fn is_full(&self) -> bool {
        self.inflight_bytes >= self.limit_bytes
    }

    /// Decides about the next record of the log (records are offered in lsn order).
    pub fn offer(&mut self, r: &Record) -> Result<Offer, RelayRefusal> {
        if r.volume_id != self.volume_id {
            return Ok(Offer::Other);
        }
        if r.seq <= self.sent_seq {
            // Only a record the replica reported at resume, or a checkpoint of a position it
            // holds: what is in flight was sent in order and is never offered twice.
            assert!(r.seq <= self.durable_seq, "record seq {} offered twice (sent {})", r.seq, self.sent_seq);
            self.confirmed_lsn = self.confirmed_lsn.max(r.lsn);
            return Ok(Offer::Held);
        }
        // A checkpoint past the replica's position: the records up to it are gone from this log.
        if r.checkpoint || r.seq != self.sent_seq + 1 {
            if self.sent_seq != 0 || self.durable_seq != 0 {
                let first = if r.checkpoint { r.seq + 1 } else { r.seq };
                return Err(RelayRefusal::Missing { need: self.sent_seq + 1, first });
            }
            // A replica that holds nothing (one added after the first records were trimmed)
            // starts at a run that ships every block; until one comes, nothing is sent, and
            // what is passed over counts as confirmed for it: it will never need it (so the
            // log's trimming is not held back by a replica that waits).
            if r.checkpoint || !r.full {
                self.seeking = true;
                self.confirmed_lsn = self.confirmed_lsn.max(r.lsn);
                return Ok(Offer::Other);
            }
            self.seeking = false;
            self.sent_seq = r.seq - 1;
            self.durable_seq = r.seq - 1;
        }
        self.sent_seq = r.seq;
        let bytes = r.length + RECORD_OVERHEAD_BYTES;
        self.inflight.push_back((r.seq, r.lsn, bytes));
        self.inflight_bytes += bytes;
        Ok(Offer::Send)
    }

    /// The replica holds every record up to `durable` (cumulative; an older report is harmless).
    pub fn acknowledged(&mut self, durable: u64) -> Result<(), RelayRefusal> {
        if durable > self.sent_seq {
            return Err(RelayRefusal::Ahead { got: durable, sent: self.sent_seq });
        }
        while self.inflight.front().is_some_and(|e| e.0 <= durable) {
            let (_, lsn, bytes) = self.inflight.pop_front().expect("front");
            self.inflight_bytes -= bytes;
            self.confirmed_lsn = self.confirmed_lsn.max(lsn);
        }
        self.durable_seq = self.durable_seq.max(durable);
        Ok(())
    }

    /// The highest sequence sent.
    pub fn sent_seq(&self) -> u64 {
        self.sent_seq
    }

    /// The highest sequence the replica holds durably.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// The highest lsn of this volume the replica holds (0: none known yet): the log may trim up
    /// to it for this replica.
    pub fn confirmed_lsn(&self) -> u64 {
        self.confirmed_lsn
    }

    /// Log bytes sent and not yet acknowledged.
    pub fn inflight_bytes(&self) -> u64 {
        self.inflight_bytes
    }

    /// The replica holds nothing and waits for a resync run that ships every block (an initial
    /// sync started after it was added).
    pub fn seeking(&self) -> bool {
        self.seeking
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(volume_id: u64, seq: u64, lsn: u64) -> Record {
        Record { volume_id, seq, lsn, length: 4096, checkpoint: false, full: false }
    }

    /// A replica that holds nothing, on a log that no longer holds seq 1: records pass over it
    /// (confirmed: it never needs them) until a FULL one, from which it is sent everything in order.
    #[test]
    fn a_replica_with_nothing_starts_at_a_full_run() {
        let mut w = RelayWindow::resume(1, 0, 20, 1 << 20).unwrap();
        let cp = Record { checkpoint: true, ..rec(1, 9, 3) };
        assert_eq!(w.offer(&cp), Ok(Offer::Other));
        assert_eq!(w.offer(&rec(1, 10, 4)), Ok(Offer::Other));
        assert!(w.seeking());
        assert_eq!(w.confirmed_lsn(), 4, "what is passed over is never needed: confirmed");
        assert_eq!(w.offer(&Record { full: true, ..rec(1, 11, 5) }), Ok(Offer::Send));
        assert!(!w.seeking());
        assert_eq!(w.offer(&rec(1, 12, 6)), Ok(Offer::Send));
        assert_eq!(w.offer(&rec(1, 14, 7)), Err(RelayRefusal::Missing { need: 13, first: 14 }));
        w.acknowledged(12).unwrap();
        assert_eq!((w.durable_seq(), w.confirmed_lsn()), (12, 6));
        // A replica that holds something is never moved to a later run.
        let mut w = RelayWindow::resume(1, 3, 20, 1 << 20).unwrap();
        let r = Record { full: true, ..rec(1, 11, 5) };
        assert_eq!(w.offer(&r), Err(RelayRefusal::Missing { need: 4, first: 11 }));
    }

    #[test]
    fn resume_send_acknowledge_and_confirm() {
        assert_eq!(RelayWindow::resume(1, 9, 5, 1 << 20).unwrap_err(), RelayRefusal::Behind { replica: 9, ours: 5 });
        let mut w = RelayWindow::resume(1, 2, 10, 3 * (4096 + RECORD_OVERHEAD_BYTES)).unwrap();
        assert_eq!(w.offer(&rec(1, 1, 10)), Ok(Offer::Held));
        assert_eq!(w.offer(&rec(2, 7, 11)), Ok(Offer::Other));
        assert_eq!(w.offer(&rec(1, 2, 12)), Ok(Offer::Held));
        assert_eq!(w.confirmed_lsn(), 12, "held records count as confirmed");
        for (seq, lsn) in [(3, 13), (4, 14), (5, 15)] {
            assert_eq!(w.offer(&rec(1, seq, lsn)), Ok(Offer::Send));
        }
        assert!(w.is_full());
        assert_eq!(w.acknowledged(6), Err(RelayRefusal::Ahead { got: 6, sent: 5 }));
        w.acknowledged(4).unwrap();
        assert_eq!((w.confirmed_lsn(), w.durable_seq(), w.is_full()), (14, 4, false));
        w.acknowledged(3).unwrap();
        assert_eq!(w.confirmed_lsn(), 14, "an older report changes nothing");
        assert_eq!(w.offer(&rec(1, 7, 17)), Err(RelayRefusal::Missing { need: 6, first: 7 }));
        let cp = Record { checkpoint: true, ..rec(1, 9, 18) };
        assert_eq!(w.offer(&cp), Err(RelayRefusal::Missing { need: 6, first: 10 }));
    }
}
