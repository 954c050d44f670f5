//! The eBPF cross-check of a capture path that assigns epochs without seeing the kernel's order
//! (the userspace device: the agent sees each write when FUSE hands it over, not when the kernel
//! issued it to the loop device): its epochs are checked against the kernel's own issue/complete
//! order of that device ([`Checker`]: a write the kernel completed before another was issued must
//! have a lower epoch).
//!
//! [`CrossCheck`] is the matching, I/O-free, with time as an input: a kernel issue waits up to
//! [`MATCH_WAIT_NS`] for the capture path's epoch of the same (offset, length) (FUSE delivers the
//! write after the kernel issued it); after that it counts as unmatched (a write FUSE split, or an
//! epoch dropped on the way), never as checked. [`OrderCheck`] runs it on a thread fed by the
//! [`Tracer`]'s ring buffer (drained every 10 ms) and by the capture path's epochs (a bounded
//! channel), and hands the figures to a callback every second and when it stops.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::order::Checker;
use crate::{Op, Request, Tracer, TracerError};

/// How long a kernel issue waits for the capture path's epoch of the same write.
pub const MATCH_WAIT_NS: u64 = 5_000_000_000;
/// Kernel events held back at most (waiting for the epoch of the one in front).
const PENDING_LIMIT: usize = 1 << 20;
/// Bound of the epoch channel and of the unmatched epochs kept.
const LIMIT: usize = 1 << 16;
/// Unmatched kernel issues named in the summary.
const EXAMPLES: usize = 8;

/// The figures of a cross-check.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub device: String,
    pub mode: String,
    /// Writes whose epoch was checked against the kernel's order.
    pub checked: u64,
    pub violations: u64,
    pub first_violation: Option<String>,
    /// Kernel issues with no epoch from the capture path (split by FUSE, or an epoch dropped).
    pub unmatched: u64,
    /// The first few of them (offset+length).
    pub unmatched_examples: Vec<String>,
    /// Epochs dropped on the way (the channel was full).
    pub tap_dropped: u64,
    /// Epochs that arrived after their kernel issue was declared unmatched (dropped, never
    /// matched with a later write of the same range).
    pub stale: u64,
    /// Events the kernel lost (ring buffer full, recursion misses): their writes are unchecked.
    pub lost: u64,
}

/// The matching of the capture path's epochs with the kernel's events of one device.
#[derive(Debug)]
pub struct CrossCheck {
    dev: u32,
    checker: Checker,
    /// Kernel events in arrival order, with when they arrived (ns).
    pending: VecDeque<(u64, Request)>,
    sum: Summary,
}

impl CrossCheck {
    pub fn new(dev: u32, device: String, mode: String) -> CrossCheck {
        CrossCheck {
            dev,
            checker: Checker::new(dev),
            pending: VecDeque::new(),
            sum: Summary { device, mode, ..Summary::default() },
        }
    }

    /// The capture path gave `epoch` to a write, at `ts_ns` (CLOCK_MONOTONIC, the clock of the
    /// kernel's events).
    pub fn given(&mut self, offset: u64, len: u64, epoch: u64, ts_ns: u64) {
        self.checker.given_at(offset, len, epoch, ts_ns);
        if self.checker.pending_given() > LIMIT {
            tracing::warn!("order check: {LIMIT} epochs never matched a kernel issue; starting over");
            let (unmatched, stale) = (self.checker.unmatched, self.checker.stale);
            self.checker = Checker::new(self.dev);
            (self.checker.unmatched, self.checker.stale) = (unmatched, stale);
        }
    }

    /// A kernel event arrived at `now_ns`.
    pub fn kernel(&mut self, now_ns: u64, r: Request) {
        self.pending.push_back((now_ns, r));
    }

    /// Checks the kernel events that are ready at `now_ns` (their epoch came, or waited long
    /// enough; with `last`, all of them).
    pub fn settle(&mut self, now_ns: u64, last: bool) {
        while let Some((at, r)) = self.pending.front() {
            let ready = r.complete
                || self.checker.has_given_for(r)
                || now_ns.saturating_sub(*at) >= MATCH_WAIT_NS
                || self.pending.len() > PENDING_LIMIT
                || last;
            if !ready {
                break;
            }
            let (_, r) = self.pending.pop_front().expect("front exists");
            self.check(&r);
        }
        self.sum.unmatched = self.checker.unmatched;
        self.sum.stale = self.checker.stale;
    }

    fn check(&mut self, r: &Request) {
        let before = self.checker.unmatched;
        if let Err(v) = self.checker.on(r) {
            self.sum.violations += 1;
            if self.sum.violations <= 10 {
                tracing::error!("order check of {}: {v}", self.sum.device);
            }
            self.sum.first_violation.get_or_insert_with(|| v.to_string());
        }
        if r.complete || r.op != Op::Write || r.len == 0 {
            return;
        }
        if self.checker.unmatched == before {
            self.sum.checked += 1;
            return;
        }
        if self.sum.unmatched_examples.len() < EXAMPLES {
            self.sum.unmatched_examples.push(format!("{}+{}", r.offset, r.len));
        }
        // The epochs of pieces of this request (FUSE split it) would otherwise wait for a kernel
        // issue of their own that never comes, and be matched with a later write of the range.
        self.checker.forget_within(r.offset, r.len);
    }

    pub fn summary(&self) -> &Summary {
        &self.sum
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Told the figures every second and when the check stops.
pub type Report = Box<dyn FnMut(&Summary) + Send>;

/// Where the capture path gives its epochs: `(offset, len, epoch)`; it never blocks.
pub type Tap = Box<dyn Fn(u64, u64, u64) + Send + Sync>;

/// A [`CrossCheck`] running on its own thread.
pub struct OrderCheck {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Summary>>,
}

impl OrderCheck {
    /// Starts checking epochs against the kernel's order of block device `dev` (named `device`).
    /// Returns the check and the tap the capture path gives its epochs to.
    pub fn start(dev: u32, device: String, mut report: Report) -> Result<(OrderCheck, Tap), TracerError> {
        let mut tracer = Tracer::start(&[dev])?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, u64, u64, u64)>(LIMIT);
        let dropped = Arc::new(AtomicU64::new(0));
        let d = dropped.clone();
        let tap: Tap = Box::new(move |offset, len, epoch| {
            if tx.try_send((offset, len, epoch, monotonic_ns())).is_err() {
                d.fetch_add(1, Ordering::Relaxed);
            }
        });
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let mut cc = CrossCheck::new(dev, device, format!("{}", tracer.mode()));
        let thread = std::thread::Builder::new()
            .name("order-check".into())
            .spawn(move || {
                let mut next_report = 0;
                loop {
                    let last = st.load(Ordering::SeqCst);
                    // The epochs first: each was given before FUSE replied, so before the kernel
                    // completed that write.
                    while let Ok((o, l, e, t)) = rx.try_recv() {
                        cc.given(o, l, e, t);
                    }
                    let now = monotonic_ns();
                    tracer.drain(|e| cc.kernel(now, Request::from_event(e)));
                    cc.settle(now, last);
                    cc.sum.tap_dropped = dropped.load(Ordering::Relaxed);
                    if last || now >= next_report {
                        next_report = now + 1_000_000_000;
                        cc.sum.lost = tracer.losses().map(|l| l.total()).unwrap_or(cc.sum.lost);
                        report(&cc.sum);
                    }
                    if last {
                        return cc.sum;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
            .map_err(TracerError::Thread)?;
        Ok((OrderCheck { stop, thread: Some(thread) }, tap))
    }

    /// Stops checking; the final figures.
    pub fn finish(mut self) -> Option<Summary> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for OrderCheck {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: u32 = 7;
    const S: u64 = 1_000_000_000;

    fn ev(complete: bool, offset: u64, len: u64, ts_ns: u64) -> Request {
        Request {
            complete,
            dev: DEV,
            ts_ns,
            cpu: 0,
            offset,
            len,
            op: Op::Write,
            preflush: false,
            fua: false,
            sync: false,
            error: 0,
        }
    }

    fn cc() -> CrossCheck {
        CrossCheck::new(DEV, "loop9".into(), "test".into())
    }

    #[test]
    fn an_issue_waits_for_its_epoch_and_is_checked() {
        let mut c = cc();
        c.kernel(S, ev(false, 0, 4096, S));
        c.settle(S + 1, false);
        assert_eq!(c.summary().checked, 0, "its epoch is not there yet: it waits");
        c.given(0, 4096, 1, S + 2);
        c.settle(S + 3, false);
        assert_eq!((c.summary().checked, c.summary().unmatched), (1, 0));
    }

    #[test]
    fn an_issue_whose_epoch_never_comes_is_unmatched_and_its_late_pieces_are_forgotten() {
        let mut c = cc();
        c.kernel(S, ev(false, 0, 8192, S));
        c.settle(S + MATCH_WAIT_NS - 1, false);
        assert_eq!(c.summary().unmatched, 0, "still waiting");
        // FUSE split it: epochs for the two halves, which no kernel issue of their own matches.
        c.given(0, 4096, 1, S + 1);
        c.given(4096, 4096, 1, S + 1);
        c.settle(S + MATCH_WAIT_NS, false);
        assert_eq!(c.summary().unmatched, 1);
        assert_eq!(c.summary().unmatched_examples, vec!["0+8192".to_string()]);
        // A later write of the first half does not take the forgotten epoch.
        c.kernel(2 * S + MATCH_WAIT_NS, ev(false, 0, 4096, 2 * S + MATCH_WAIT_NS));
        c.settle(2 * S + MATCH_WAIT_NS, false);
        assert_eq!(c.summary().checked, 0);
    }

    #[test]
    fn an_epoch_that_contradicts_the_kernels_order_is_a_violation() {
        let mut c = cc();
        c.given(0, 4096, 1, S);
        c.given(4096, 4096, 1, S + 3); // wrong: issued after the first completed
        c.kernel(S, ev(false, 0, 4096, S));
        c.kernel(S, ev(true, 0, 4096, S + 1));
        c.kernel(S, ev(false, 4096, 4096, S + 2));
        c.settle(S, false);
        let s = c.summary();
        assert_eq!((s.checked, s.violations), (2, 1));
        assert!(s.first_violation.as_deref().is_some_and(|v| v.contains("completed before it was issued")), "{s:?}");
    }

    #[test]
    fn the_last_settle_drains_everything_and_only_issued_writes_count() {
        let mut c = cc();
        c.kernel(S, ev(false, 0, 4096, S));
        c.kernel(S, Request { op: Op::Read, ..ev(false, 8192, 4096, S) });
        c.kernel(S, ev(false, 12288, 0, S));
        c.settle(S, true);
        let s = c.summary();
        assert_eq!((s.checked, s.unmatched), (0, 1), "reads and empty writes are neither checked nor unmatched");
    }
}
