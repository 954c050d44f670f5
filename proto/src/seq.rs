//! The volume sequencer: the one rule for a volume's stream of numbered writes, at staging (agents'
//! writes into the WRL) and at the replica (relayed records into the DR log).
//!
//! Writes of a volume carry consecutive sequence numbers from 1 and non-decreasing epochs. A log
//! holds them in sequence order; this core decides, for each one that arrives, whether it is
//! appended next ([`Admit::Append`]), was appended already ([`Admit::Duplicate`]: a resend after a
//! reconnect, acknowledged once durable, never logged twice), or is refused ([`Refusal`]).
//!
//! Positions: `submitted` (handed to the log, in order), `durable` (the log made it durable;
//! `durable <= submitted` always). An append the log fails rolls `submitted` back to just before
//! it, so the sender resends from there and no gap is ever logged.
//!
//! **Invariants** (asserted in release builds): `durable <= submitted`; `durable` never moves
//! back; what is admitted as [`Admit::Append`] is exactly `submitted + 1`; epochs of appended
//! writes never go back. A rollback restores the epoch of the last write still submitted, so that
//! the resend of the failed write (with its own, earlier epoch) is taken: a relay resends exactly
//! what it sent.

/// Why a write is not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// It would leave a gap: the log holds up to `have`, so `have + 1` comes next.
    #[error("seq {seq} leaves a gap: the log holds up to seq {have} (expected {})", have + 1)]
    Gap { seq: u64, have: u64 },
    /// Its epoch is before the last one appended (the partial write order forbids it).
    #[error("seq {seq}: epoch {epoch} is before epoch {last}")]
    EpochBack { seq: u64, epoch: u64, last: u64 },
}

/// What to do with a write that is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Append it to the log: it is the next one. The sequencer counts it as submitted.
    Append,
    /// It is in the log already (a resend): acknowledge it once `durable >= seq`, do not append.
    Duplicate,
}

/// The sequence positions of one volume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sequencer {
    submitted: u64,
    durable: u64,
    last_epoch: u64,
    /// The epoch of the last durable write.
    durable_epoch: u64,
    /// `(seq, epoch)` of the writes submitted and not yet durable, in order (as many as the
    /// sender keeps in flight: its window bounds this).
    pending: std::collections::VecDeque<(u64, u64)>,
}

impl Sequencer {
    /// A volume whose log holds (durably) every write up to `last_seq`, the last in `last_epoch`.
    pub fn new(last_seq: u64, last_epoch: u64) -> Sequencer {
        Sequencer {
            submitted: last_seq,
            durable: last_seq,
            last_epoch,
            durable_epoch: last_epoch,
            pending: Default::default(),
        }
    }

    /// The highest sequence handed to the log (durable or not yet).
    pub fn submitted(&self) -> u64 {
        self.submitted
    }

    /// The highest sequence the log made durable (every one before it is durable too).
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// The epoch of the last write appended.
    pub fn last_epoch(&self) -> u64 {
        self.last_epoch
    }

    /// Decides about write `seq` of `epoch`; on [`Admit::Append`] it counts as submitted.
    pub fn admit(&mut self, seq: u64, epoch: u64) -> Result<Admit, Refusal> {
        if seq <= self.submitted {
            return Ok(Admit::Duplicate);
        }
        if seq != self.submitted + 1 {
            return Err(Refusal::Gap { seq, have: self.submitted });
        }
        if epoch < self.last_epoch {
            return Err(Refusal::EpochBack { seq, epoch, last: self.last_epoch });
        }
        self.submitted = seq;
        self.last_epoch = epoch;
        self.pending.push_back((seq, epoch));
        Ok(Admit::Append)
    }

    /// The log made every write up to `seq` durable. Positions only move forward: an older
    /// report (a batch completing late) changes nothing.
    pub fn durable_through(&mut self, seq: u64) {
        assert!(seq <= self.submitted, "durable seq {seq} beyond submitted seq {}", self.submitted);
        self.durable = self.durable.max(seq);
        while self.pending.front().is_some_and(|p| p.0 <= seq) {
            self.durable_epoch = self.pending.pop_front().expect("front").1;
        }
    }

    /// A volume that holds nothing starts after `base` instead of 0 (a replica added after its
    /// staging server trimmed the first records starts at a full resync run, `Flags::FULL`).
    pub fn rebase(&mut self, base: u64) {
        assert!(
            self.submitted == 0 && self.durable == 0 && self.pending.is_empty(),
            "only a volume that holds nothing is rebased (submitted {}, durable {})",
            self.submitted,
            self.durable
        );
        self.submitted = base;
        self.durable = base;
    }

    /// The log failed to append `seq` (and so every later one): they count as not submitted, and
    /// the sender must resend from `seq`. Nothing at or before `durable` is ever taken back.
    pub fn failed(&mut self, seq: u64) {
        assert!(
            seq > self.durable,
            "append of seq {seq} failed, but the log holds it durably (durable {})",
            self.durable
        );
        self.submitted = self.submitted.min(seq - 1);
        while self.pending.back().is_some_and(|p| p.0 >= seq) {
            self.pending.pop_back();
        }
        self.last_epoch = self.pending.back().map(|p| p.1).unwrap_or(self.durable_epoch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn resends_gaps_and_epochs() {
        let mut s = Sequencer::new(10, 4);
        assert_eq!(s.admit(9, 4), Ok(Admit::Duplicate));
        assert_eq!(s.admit(12, 4), Err(Refusal::Gap { seq: 12, have: 10 }));
        assert_eq!(s.admit(11, 3), Err(Refusal::EpochBack { seq: 11, epoch: 3, last: 4 }));
        assert_eq!(s.submitted(), 10, "a refusal changes nothing");
        assert_eq!(s.admit(11, 5), Ok(Admit::Append));
        assert_eq!(s.admit(12, 5), Ok(Admit::Append));
        s.durable_through(11);
        s.failed(12);
        assert_eq!((s.submitted(), s.durable()), (11, 11));
        assert_eq!(s.admit(12, 5), Ok(Admit::Append), "resent from where the log failed");
        assert_eq!(
            Refusal::Gap { seq: 12, have: 10 }.to_string(),
            "seq 12 leaves a gap: the log holds up to seq 10 (expected 11)"
        );
    }

    /// What a sender does and what the log does, in any order the servers allow.
    #[derive(Clone, Debug)]
    enum Event {
        /// The sender sends seq `next + k - 2` (k=0,1: a resend; 2: next; 3, 4: ahead).
        Send { k: u64, epoch_step: u64 },
        /// The log completes the oldest pending append (ok or failed).
        Complete { ok: bool },
        /// A broken sender: the next seq with an epoch before the last one.
        SendOldEpoch,
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (0u64..5, 0u64..3).prop_map(|(k, epoch_step)| Event::Send { k, epoch_step }),
            any::<bool>().prop_map(|ok| Event::Complete { ok }),
            Just(Event::SendOldEpoch),
        ]
    }

    proptest! {
        /// Against a model log and a sender that behaves like a relay (a resend carries the epoch
        /// it was first sent with): whatever arrives, the log holds exactly the writes 1..=n in
        /// order (no gap, none twice) with non-decreasing epochs, `durable` is what the log holds,
        /// and the write after the log's last is always taken (never refused for its epoch, after
        /// a failure too).
        #[test]
        fn the_log_never_gets_a_gap_or_a_duplicate(events in proptest::collection::vec(event(), 1..200)) {
            let mut s = Sequencer::new(0, 0);
            let mut log: Vec<(u64, u64)> = Vec::new(); // (seq, epoch), durable
            let mut pending: std::collections::VecDeque<(u64, u64)> = Default::default();
            let mut epochs: Vec<u64> = Vec::new(); // the sender's: epochs[seq - 1]
            for e in events {
                match e {
                    Event::Send { k, epoch_step } => {
                        let seq = (s.submitted() + k).saturating_sub(1).max(1);
                        while epochs.len() < seq as usize {
                            let last = epochs.last().copied().unwrap_or(0);
                            epochs.push(last + epoch_step);
                        }
                        let ep = epochs[seq as usize - 1];
                        match s.admit(seq, ep) {
                            Ok(Admit::Append) => {
                                prop_assert_eq!(seq, log.len() as u64 + pending.len() as u64 + 1);
                                pending.push_back((seq, ep));
                            }
                            Ok(Admit::Duplicate) => prop_assert!(seq <= s.submitted()),
                            Err(Refusal::Gap { .. }) => prop_assert!(seq > s.submitted() + 1),
                            Err(r @ Refusal::EpochBack { .. }) => prop_assert!(false, "{} refused: {}", seq, r),
                        }
                    }
                    Event::SendOldEpoch => {
                        let seq = s.submitted() + 1;
                        if let Some(old) = s.last_epoch().checked_sub(1) {
                            prop_assert_eq!(
                                s.admit(seq, old),
                                Err(Refusal::EpochBack { seq, epoch: old, last: s.last_epoch() })
                            );
                        }
                    }
                    Event::Complete { ok } => {
                        let Some((seq, ep)) = pending.pop_front() else { continue };
                        if ok {
                            log.push((seq, ep));
                            s.durable_through(seq);
                        } else {
                            // The log fails this append and every one queued after it.
                            s.failed(seq);
                            pending.clear();
                        }
                    }
                }
                prop_assert!(s.durable() <= s.submitted());
                prop_assert_eq!(s.durable(), log.len() as u64);
            }
            for (i, (seq, _)) in log.iter().enumerate() {
                prop_assert_eq!(*seq, i as u64 + 1, "the log holds 1..=n in order");
            }
            prop_assert!(log.windows(2).all(|w| w[0].1 <= w[1].1), "epochs never go back");
        }
    }
}
