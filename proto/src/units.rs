//! Units of apply: the replica applies a volume's records a whole unit at a time, so its target is
//! always the source as of an epoch boundary. A unit is one epoch, or one whole run of RESYNC
//! records (they carry no order among themselves, so a run is only a state of the source once it
//! ended). A unit is complete when a record of another unit follows it (records arrive in
//! sequence order, so all of it came first) or when its last record is an `EPOCH_END`.
//!
//! [`Units`] takes a volume's records in sequence order and hands back the ones of complete
//! units; the replica's apply step reads its DR log and wraps the target writes around it.
//!
//! **Invariants** (asserted): records are taken with consecutive sequence numbers; what is handed
//! back always ends at a unit boundary, except what [`Units::take_partial_resync`] hands back on
//! purpose.

/// What grouping needs to know of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub epoch: u64,
    /// A RESYNC record: part of a run, whatever its epoch.
    pub resync: bool,
    /// The last record of its epoch (`EPOCH_END`).
    pub epoch_end: bool,
}

impl Entry {
    /// The unit the record belongs to: a resync run (any epoch), or its epoch.
    fn unit(&self) -> (bool, u64) {
        (self.resync, if self.resync { 0 } else { self.epoch })
    }
}

/// A volume's records waiting for their unit to complete.
#[derive(Clone, Debug)]
pub struct Units<T> {
    pending: Vec<(Entry, T)>,
    last_seq: u64,
}

impl<T> Units<T> {
    /// Grouping that continues after `last_seq` (the applied position).
    pub fn new(last_seq: u64) -> Units<T> {
        Units { pending: Vec::new(), last_seq }
    }

    /// The last sequence taken.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Records waiting for their unit to complete.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Whether what waits is an incomplete RESYNC run.
    pub fn pending_resync(&self) -> bool {
        self.pending.first().is_some_and(|(e, _)| e.resync)
    }

    /// Takes the next record of the volume (`seq` = the last one's + 1): moves the records of every
    /// unit it completes to `ready`, in order. Returns how many units it completed (0, 1 or 2).
    pub fn push(&mut self, e: Entry, item: T, ready: &mut Vec<T>) -> u64 {
        assert_eq!(e.seq, self.last_seq + 1, "records are grouped in sequence order, without a gap");
        self.last_seq = e.seq;
        let mut units = 0;
        if self.pending.first().is_some_and(|(first, _)| first.unit() != e.unit()) {
            ready.extend(self.pending.drain(..).map(|(_, t)| t));
            units += 1;
        }
        self.pending.push((e, item));
        if e.epoch_end {
            // The agent says no later record belongs to this epoch: it is complete now.
            ready.extend(self.pending.drain(..).map(|(_, t)| t));
            units += 1;
        }
        units
    }

    /// Hands back an incomplete RESYNC run as it stands (a run larger than the DR log can hold
    /// must be applied as it arrives; the target is then not a state of the source until the run
    /// ends). `None` when what waits is not a resync run.
    pub fn take_partial_resync(&mut self) -> Option<Vec<T>> {
        if !self.pending_resync() {
            return None;
        }
        Some(self.pending.drain(..).map(|(_, t)| t).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(seq: u64, epoch: u64, resync: bool, epoch_end: bool) -> Entry {
        Entry { seq, epoch, resync, epoch_end }
    }

    #[test]
    fn epochs_runs_and_epoch_ends() {
        let mut u = Units::new(0);
        let mut ready = Vec::new();
        assert_eq!(u.push(e(1, 1, false, false), 1, &mut ready), 0);
        assert_eq!(u.push(e(2, 1, false, false), 2, &mut ready), 0);
        assert_eq!(u.push(e(3, 2, false, false), 3, &mut ready), 1, "a later epoch completes epoch 1");
        assert_eq!(ready, vec![1, 2]);
        assert_eq!(u.push(e(4, 2, false, true), 4, &mut ready), 1, "an EPOCH_END completes its epoch");
        assert_eq!(ready, vec![1, 2, 3, 4]);
        // A resync run, epochs changing inside it, is one unit until a write of an epoch follows.
        for (s, ep) in [(5, 2), (6, 3), (7, 5)] {
            assert_eq!(u.push(e(s, ep, true, false), s, &mut ready), 0);
        }
        assert!(u.pending_resync());
        assert_eq!(u.push(e(8, 5, false, false), 8, &mut ready), 1);
        assert_eq!(ready, (1..=7).collect::<Vec<_>>());
        assert!(u.take_partial_resync().is_none());
        assert_eq!(u.push(e(9, 6, true, false), 9, &mut ready), 1);
        assert_eq!(u.take_partial_resync(), Some(vec![9]));
        assert_eq!(u.pending_len(), 0);
    }

    #[test]
    #[should_panic(expected = "without a gap")]
    fn a_gap_is_a_broken_invariant() {
        let mut u = Units::new(3);
        u.push(e(5, 1, false, false), (), &mut Vec::new());
    }
}
