//! Partial write order: which writes share an epoch. I/O-free; the agent drives it.
//!
//! **Rule.** Writes get the current epoch when they are issued. Once any write has *completed*
//! (the application was told it is done), the next write issued starts a new epoch. Writes that
//! were in flight together may therefore share an epoch; a write issued after another completed is
//! always in a later epoch.
//!
//! **Why a replica at any epoch boundary is a state the application could have seen after a crash.**
//! Let `S_k` be the writes with epoch `<= k`. If `B` is in `S_k` and `A` completed before `B` was
//! issued, then `epoch(A) < epoch(B) <= k` (the rule), so `A` is in `S_k`: `S_k` is closed under
//! "completed before issued". An application (or file system) may only rely on the order of writes
//! it waited for; writes in flight together may reach a disk in any order, and a crash may keep any
//! subset of them. So a disk holding exactly `S_k` (each at its last value in issue order, which
//! is sequence order) is one the application could have found after a power cut: every write it
//! saw complete before issuing a write of `S_k` is there. FLUSH and FUA need nothing extra: a
//! flush is issued after the writes it covers completed, so it is already in a later epoch, and
//! every write is durable at staging before it completes.
//!
//! **Closing an epoch.** The replica applies an epoch once it sees that no more of its records can
//! come: a record of a later epoch, or an `EPOCH_END` record. When nothing is in flight, every
//! write of the current epoch has completed, so [`EpochClock::close_idle`] may end it.

/// The epoch state of one volume.
#[derive(Clone, Debug)]
pub struct EpochClock {
    epoch: u64,
    /// Writes issued and not yet completed.
    inflight: u64,
    /// A write completed since the current epoch began: the next issue starts a new epoch.
    completed_since: bool,
    /// Writes issued in the current epoch (0 after it was closed).
    issued_in_epoch: u64,
}

impl EpochClock {
    /// Continues after `last_epoch` (what staging holds for the volume).
    pub fn new(last_epoch: u64) -> EpochClock {
        EpochClock { epoch: last_epoch + 1, inflight: 0, completed_since: false, issued_in_epoch: 0 }
    }

    /// A write is issued: its epoch.
    pub fn issue(&mut self) -> u64 {
        if self.completed_since {
            self.epoch += 1;
            self.completed_since = false;
            self.issued_in_epoch = 0;
        }
        self.inflight += 1;
        self.issued_in_epoch += 1;
        self.epoch
    }

    /// A write issued earlier has completed.
    pub fn complete(&mut self) {
        assert!(self.inflight > 0, "complete without a write in flight");
        self.inflight -= 1;
        self.completed_since = true;
    }

    /// When nothing is in flight and the current epoch has writes: ends it, returning the epoch to
    /// mark `EPOCH_END` (the marker itself is issued and completed in that epoch by the caller).
    pub fn close_idle(&mut self) -> Option<u64> {
        if self.inflight > 0 || self.issued_in_epoch == 0 {
            return None;
        }
        let e = self.epoch;
        // Later writes go to a new epoch (a completion happened, or the epoch would not be idle).
        self.completed_since = true;
        self.issued_in_epoch = 0;
        Some(e)
    }

    /// After reconnecting to staging, which holds epochs up to `epoch`: later writes go to a new
    /// epoch above both it and the current one. Writes in flight stay counted.
    pub fn resume_after(&mut self, epoch: u64) {
        self.epoch = self.epoch.max(epoch);
        self.completed_since = true;
    }

    pub fn current(&self) -> u64 {
        self.epoch
    }

    pub fn inflight(&self) -> u64 {
        self.inflight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A history of concurrent writes: each step issues a new write or completes one in flight
    /// (chosen by index), or closes an idle epoch.
    #[derive(Clone, Debug)]
    enum Step {
        Issue,
        Complete(prop::sample::Index),
        CloseIdle,
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            prop_oneof![
                4 => Just(Step::Issue),
                4 => any::<prop::sample::Index>().prop_map(Step::Complete),
                1 => Just(Step::CloseIdle),
            ],
            0..300,
        )
    }

    proptest! {
        /// Against a model of the history: the happened-before relation (A completed before B
        /// was issued) implies epoch(A) < epoch(B); epochs never go down in issue order; writes
        /// issued with no completion in between share an epoch; every epoch prefix is closed
        /// under happened-before.
        #[test]
        fn epochs_respect_completion_order(history in steps(), start in 0u64..1000) {
            let mut c = EpochClock::new(start);
            // Per write: (epoch, issue time, completion time).
            let mut writes: Vec<(u64, usize, Option<usize>)> = Vec::new();
            let mut inflight: Vec<usize> = Vec::new();
            let mut completions_since_issue = 0;
            let mut closed: Vec<u64> = Vec::new();
            for (t, step) in history.iter().enumerate() {
                match step {
                    Step::Issue => {
                        let e = c.issue();
                        if let Some(prev) = writes.last() {
                            prop_assert!(e >= prev.0, "epochs go down in issue order");
                            if completions_since_issue == 0 && closed.last() != Some(&prev.0) {
                                prop_assert_eq!(e, prev.0, "no completion in between: same epoch");
                            }
                        } else {
                            prop_assert!(e > start);
                        }
                        prop_assert!(closed.iter().all(|k| e > *k), "a write joined a closed epoch");
                        completions_since_issue = 0;
                        writes.push((e, t, None));
                        inflight.push(writes.len() - 1);
                    }
                    Step::Complete(i) if !inflight.is_empty() => {
                        let w = inflight.swap_remove(i.index(inflight.len()));
                        writes[w].2 = Some(t);
                        c.complete();
                        completions_since_issue += 1;
                    }
                    Step::Complete(_) => {}
                    Step::CloseIdle => {
                        if let Some(e) = c.close_idle() {
                            prop_assert!(inflight.is_empty());
                            prop_assert_eq!(Some(e), writes.last().map(|w| w.0));
                            closed.push(e);
                        }
                    }
                }
                prop_assert_eq!(c.inflight(), inflight.len() as u64);
            }
            for a in &writes {
                for b in &writes {
                    if let Some(done) = a.2
                        && done < b.1
                    {
                        prop_assert!(a.0 < b.0, "A completed before B was issued, yet epoch(A) >= epoch(B)");
                    }
                }
            }
            // Closedness of every prefix S_k, checked directly.
            let epochs: std::collections::BTreeSet<u64> = writes.iter().map(|w| w.0).collect();
            for k in epochs {
                for b in writes.iter().filter(|w| w.0 <= k) {
                    for a in writes.iter().filter(|a| a.2.is_some_and(|d| d < b.1)) {
                        prop_assert!(a.0 <= k);
                    }
                }
            }
        }
    }

    #[test]
    fn qd1_gives_one_epoch_per_write_and_idle_close_is_one_shot() {
        let mut c = EpochClock::new(0);
        assert_eq!(c.issue(), 1);
        c.complete();
        assert_eq!(c.issue(), 2);
        assert_eq!(c.close_idle(), None, "a write is in flight");
        c.complete();
        assert_eq!(c.close_idle(), Some(2));
        assert_eq!(c.close_idle(), None, "nothing issued since");
        assert_eq!(c.issue(), 3);
    }
}
