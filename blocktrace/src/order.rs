//! Ordering metadata from the kernel's event stream, for capture paths that see writes without
//! their issue/complete order (a userspace-served device sees the writes its FUSE or ublk server
//! is handed, possibly reordered by the kernel's queues). I/O-free.
//!
//! The ring buffer's reservation order is a total order of issues and completions across CPUs,
//! without a clock. From it:
//! - [`Assigner`] gives each write the epoch of the agent's partial-write-order rule (see
//!   `drv_agent::epoch`): a write issued after any write completed starts a new epoch;
//! - [`Checker`] verifies epochs assigned elsewhere (by the capture path) against the kernel's
//!   order: if write A completed before write B was issued, `epoch(A) < epoch(B)`. One pass: it
//!   keeps the highest epoch among completed writes, and every issue must be above it.
//!
//! Writes are matched by (offset, length), in issue order per extent. A stream with a loss (a
//! dropped or skipped event) cannot be checked: the caller treats the affected range as dirty
//! (see [`crate::track`]) rather than trusting an order it did not see.

use std::collections::{HashMap, VecDeque};

use crate::rwbs::{Op, Request};

/// One write with its epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ordered {
    pub offset: u64,
    pub len: u64,
    pub epoch: u64,
}

/// Assigns epochs to the writes of one device from its event stream.
#[derive(Debug)]
pub struct Assigner {
    dev: u32,
    epoch: u64,
    completed_since: bool,
}

impl Assigner {
    /// Epochs start after `last_epoch`.
    pub fn new(dev: u32, last_epoch: u64) -> Assigner {
        Assigner { dev, epoch: last_epoch + 1, completed_since: false }
    }

    /// Feeds one event; an issued write of the device gets its epoch.
    pub fn on(&mut self, r: &Request) -> Option<Ordered> {
        if r.dev != self.dev || !r.op.changes_data() || r.len == 0 {
            return None;
        }
        if r.complete {
            self.completed_since = true;
            return None;
        }
        if std::mem::take(&mut self.completed_since) {
            self.epoch += 1;
        }
        Some(Ordered { offset: r.offset, len: r.len, epoch: self.epoch })
    }
}

/// A pair of writes whose epochs contradict the kernel's order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "write at {offset} (+{len}) has epoch {epoch}, but a write in epoch {completed_epoch} (at {completed_offset} +{completed_len}) completed before it was issued"
)]
pub struct Violation {
    pub offset: u64,
    pub len: u64,
    pub epoch: u64,
    pub completed_epoch: u64,
    pub completed_offset: u64,
    pub completed_len: u64,
}

/// An epoch given by the capture path, with the time it was given (if known).
type Given = (u64, Option<u64>);

/// Checks epochs given by a capture path against the kernel's order.
#[derive(Debug, Default)]
pub struct Checker {
    dev: u32,
    /// The capture path's epochs per extent, in its issue order, with the time each was given.
    given: HashMap<(u64, u64), VecDeque<Given>>,
    /// Epochs of writes issued (per the kernel) and not yet completed, per extent.
    in_flight: HashMap<(u64, u64), VecDeque<u64>>,
    max_completed: Option<u64>,
    /// The write that completed with `max_completed`.
    max_completed_at: (u64, u64),
    /// Kernel issues the capture path gave no epoch for (yet).
    pub unmatched: u64,
    /// Epochs dropped because they were given before the kernel issue being matched: they
    /// belonged to an earlier write of the same range, whose issue went unmatched.
    pub stale: u64,
}

impl Checker {
    pub fn new(dev: u32) -> Checker {
        Checker { dev, ..Checker::default() }
    }

    /// The capture path assigned `epoch` to a write of `len` bytes at `offset`.
    pub fn given(&mut self, offset: u64, len: u64, epoch: u64) {
        self.given.entry((offset, len)).or_default().push_back((epoch, None));
    }

    /// [`Checker::given`], at `ts_ns` on the clock of the kernel's events (CLOCK_MONOTONIC). A
    /// capture path sees a write only after the kernel issued it, so an epoch given before a
    /// kernel issue cannot be that issue's: it is dropped as stale rather than matched (a late
    /// epoch of an earlier write, whose issue was declared unmatched, would otherwise be taken
    /// for a later write of the same range).
    pub fn given_at(&mut self, offset: u64, len: u64, epoch: u64, ts_ns: u64) {
        self.given.entry((offset, len)).or_default().push_back((epoch, Some(ts_ns)));
    }

    /// Whether the capture path gave an epoch that kernel issue `r` can take.
    pub fn has_given_for(&self, r: &Request) -> bool {
        self.given.get(&(r.offset, r.len)).is_some_and(|q| q.iter().any(|(_, t)| t.is_none_or(|t| t >= r.ts_ns)))
    }

    /// Epochs given and not yet matched by a kernel issue (a write the kernel split, or one whose
    /// issue event was lost, stays here).
    pub fn pending_given(&self) -> usize {
        self.given.values().map(VecDeque::len).sum()
    }

    /// Drops the epochs given for writes inside `[offset, offset + len)` (the pieces of a kernel
    /// request the capture path received split): no kernel issue of their own will match them.
    pub fn forget_within(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        self.given.retain(|&(o, l), _| !(o >= offset && o.saturating_add(l) <= end));
    }

    /// Feeds one kernel event (after the capture path's epochs for the writes it issues).
    pub fn on(&mut self, r: &Request) -> Result<(), Violation> {
        // Data writes only: a discard or write-zeroes the capture path never saw as a write (the
        // userspace device refuses them) must not take the epoch of a write to the same range
        // (the kernel's fallback after the refusal is exactly such a write).
        if r.dev != self.dev || r.op != Op::Write || r.len == 0 {
            return Ok(());
        }
        let key = (r.offset, r.len);
        if r.complete {
            if let Some(q) = self.in_flight.get_mut(&key) {
                let e = q.pop_front().expect("no empty queue is kept");
                if q.is_empty() {
                    self.in_flight.remove(&key);
                }
                if self.max_completed.is_none_or(|m| e > m) {
                    self.max_completed = Some(e);
                    self.max_completed_at = key;
                }
            }
            return Ok(());
        }
        let mut found = None;
        if let Some(q) = self.given.get_mut(&key) {
            while let Some((e, t)) = q.pop_front() {
                if t.is_some_and(|t| t < r.ts_ns) {
                    self.stale += 1;
                    continue;
                }
                found = Some(e);
                break;
            }
        }
        let Some(epoch) = found else {
            self.given.remove(&key);
            self.unmatched += 1;
            return Ok(());
        };
        if self.given.get(&key).is_some_and(|q| q.is_empty()) {
            self.given.remove(&key);
        }
        self.in_flight.entry(key).or_default().push_back(epoch);
        match self.max_completed {
            Some(m) if epoch <= m => Err(Violation {
                offset: r.offset,
                len: r.len,
                epoch,
                completed_epoch: m,
                completed_offset: self.max_completed_at.0,
                completed_len: self.max_completed_at.1,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rwbs::Op;
    use proptest::prelude::*;

    const DEV: u32 = 7 << 20;

    fn ev(complete: bool, block: u64) -> Request {
        Request {
            complete,
            dev: DEV,
            ts_ns: 0,
            cpu: 0,
            offset: block * 4096,
            len: 4096,
            op: Op::Write,
            preflush: false,
            fua: false,
            sync: false,
            error: 0,
        }
    }

    /// A random history of concurrent writes: (issue or complete, block), every complete after
    /// its issue.
    fn history(steps: Vec<(bool, u64)>) -> Vec<Request> {
        let mut open: Vec<u64> = Vec::new();
        let mut out = Vec::new();
        for (complete, block) in steps {
            if complete && !open.is_empty() {
                let b = open.remove(block as usize % open.len());
                out.push(ev(true, b));
            } else {
                open.push(block);
                out.push(ev(false, block));
            }
        }
        out.extend(open.into_iter().map(|b| ev(true, b)));
        out
    }

    #[test]
    fn writes_in_flight_together_share_an_epoch_and_a_later_one_does_not() {
        let mut a = Assigner::new(DEV, 0);
        let e: Vec<_> = [ev(false, 1), ev(false, 2), ev(true, 1), ev(false, 3), ev(true, 2), ev(true, 3)]
            .iter()
            .filter_map(|r| a.on(r))
            .map(|o| o.epoch)
            .collect();
        assert_eq!(e, vec![1, 1, 2]);
    }

    #[test]
    fn a_write_given_the_epoch_of_one_that_completed_before_it_is_caught() {
        let mut c = Checker::new(DEV);
        c.given(4096, 4096, 1);
        c.given(8192, 4096, 1); // wrong: issued after the first completed
        assert_eq!(c.on(&ev(false, 1)), Ok(()));
        assert_eq!(c.on(&ev(true, 1)), Ok(()));
        let v = c.on(&ev(false, 2)).unwrap_err();
        assert_eq!((v.offset, v.epoch, v.completed_epoch), (8192, 1, 1));
        assert!(v.to_string().contains("completed before it was issued"), "{v}");
    }

    #[test]
    fn a_late_epoch_of_an_unmatched_write_is_not_taken_for_a_later_write_of_the_range() {
        let at = |complete, block, ts| Request { ts_ns: ts, ..ev(complete, block) };
        let mut c = Checker::new(DEV);
        // Block 1 is issued at 10; its epoch comes too late, after the issue was declared
        // unmatched.
        assert_eq!(c.on(&at(false, 1, 10)), Ok(()));
        assert_eq!(c.unmatched, 1);
        c.given_at(4096, 4096, 1, 11);
        assert_eq!(c.on(&at(true, 1, 12)), Ok(()));
        // Block 2 (epoch 2) completes; then block 1 is written again, in epoch 3.
        c.given_at(8192, 4096, 2, 14);
        assert_eq!(c.on(&at(false, 2, 13)), Ok(()));
        assert_eq!(c.on(&at(true, 2, 15)), Ok(()));
        c.given_at(4096, 4096, 3, 21);
        assert!(c.has_given_for(&at(false, 1, 20)));
        assert_eq!(c.on(&at(false, 1, 20)), Ok(()), "the stale epoch 1 is not matched");
        assert_eq!((c.stale, c.unmatched), (1, 1));
    }

    proptest! {
        /// The kernel-derived epochs always pass the check, and merging two consecutive epochs
        /// that a completion separates always fails it.
        #[test]
        fn assigned_epochs_pass_and_merged_ones_fail(steps in proptest::collection::vec((any::<bool>(), 0u64..8), 1..120)) {
            let h = history(steps);
            let mut a = Assigner::new(DEV, 0);
            let ordered: Vec<Ordered> = h.iter().filter_map(|r| a.on(r)).collect();
            let mut c = Checker::new(DEV);
            for o in &ordered {
                c.given(o.offset, o.len, o.epoch);
            }
            for r in &h {
                prop_assert_eq!(c.on(r), Ok(()));
            }
            prop_assert_eq!(c.unmatched, 0);
            // Merge epoch 2 into 1, if there is an epoch 2: a write of epoch 2 was issued after
            // a write of epoch 1 completed (that is why it is in epoch 2), so the check fails.
            if ordered.iter().any(|o| o.epoch == 2) {
                let mut c = Checker::new(DEV);
                for o in &ordered {
                    c.given(o.offset, o.len, if o.epoch == 2 { 1 } else { o.epoch });
                }
                prop_assert!(h.iter().any(|r| c.on(r).is_err()));
            }
        }
    }
}
