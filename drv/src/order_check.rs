//! The eBPF cross-check of the userspace capture path (`drv attach --mode user`): the agent sees
//! each write when FUSE hands it over, not when the kernel issued it to the loop device, so its
//! epochs are checked against the kernel's own issue/complete order of that loop device
//! ([`drv_blocktrace::order::Checker`]: a write the kernel completed before another was issued
//! must have a lower epoch).
//!
//! The agent's epochs come through [`drv_agent::Agent::set_issue_tap`] (a bounded channel); the
//! kernel's events through the ring buffer, drained every 10 ms. A kernel issue waits up to
//! [`MATCH_WAIT`] for the agent's epoch of the same (offset, length) (FUSE delivers the write
//! after the kernel issued it); after that it counts as unmatched (a write FUSE split, or a tap
//! record dropped because the channel was full), never as checked. The figures are written to
//! `STATE/order-check.json` every second and printed when the agent stops.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use drv_blocktrace::Request;
use drv_blocktrace::loader::Tracer;
use drv_blocktrace::order::Checker;

/// How long a kernel issue waits for the agent's epoch of the same write.
const MATCH_WAIT: Duration = Duration::from_secs(5);
/// Kernel events held back at most (waiting for the agent's epoch of the one in front).
const PENDING_LIMIT: usize = 1 << 20;
/// Bound of the tap channel and of the agent's unmatched epochs kept.
const LIMIT: usize = 1 << 16;

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Summary {
    pub device: String,
    pub mode: String,
    /// Writes whose epoch was checked against the kernel's order.
    pub checked: u64,
    pub violations: u64,
    pub first_violation: Option<String>,
    /// Kernel issues with no epoch from the agent (split by FUSE, or a tap record dropped).
    pub unmatched: u64,
    /// The first few of them (offset+length).
    pub unmatched_examples: Vec<String>,
    /// Tap records dropped (the channel was full).
    pub tap_dropped: u64,
    /// Epochs that arrived after their kernel issue was declared unmatched (dropped, never
    /// matched with a later write of the same range).
    pub stale: u64,
    /// Events the kernel lost (ring buffer full, recursion misses): their writes are unchecked.
    pub lost: u64,
}

pub struct OrderCheck {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Summary>>,
}

impl OrderCheck {
    /// Starts checking the agent's epochs against the kernel's order of `loop_dev`.
    pub fn start(agent: &drv_agent::Agent, loop_dev: &Path, state: &Path) -> Result<OrderCheck> {
        drv_blocktrace::ebpf_built_in().map_err(anyhow::Error::msg)?;
        let dev = drv_blocktrace::block_dev_of(loop_dev).with_context(|| format!("{}", loop_dev.display()))?;
        let mut tracer = Tracer::start(&[dev]).context("start the eBPF programs")?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, u64, u64, u64)>(LIMIT);
        let dropped = Arc::new(AtomicU64::new(0));
        let d = dropped.clone();
        agent.set_issue_tap(Box::new(move |offset, len, epoch| {
            // The kernel's events carry bpf_ktime_get_ns (CLOCK_MONOTONIC): the same clock.
            if tx.try_send((offset, len, epoch, crate::trace_cmd::monotonic_ns())).is_err() {
                d.fetch_add(1, Ordering::Relaxed);
            }
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let out: PathBuf = state.join("order-check.json");
        let mut sum = Summary {
            device: loop_dev.display().to_string(),
            mode: format!("{}", tracer.mode()),
            ..Summary::default()
        };
        let thread = std::thread::Builder::new().name("order-check".into()).spawn(move || {
            let mut checker = Checker::new(dev);
            let mut pending: VecDeque<(Instant, Request)> = VecDeque::new();
            let mut next_write = Instant::now();
            loop {
                let last = st.load(Ordering::SeqCst);
                // The agent's epochs first: each was issued before FUSE replied, so before the
                // kernel completed that write.
                while let Ok((o, l, e, t)) = rx.try_recv() {
                    checker.given_at(o, l, e, t);
                }
                if checker.pending_given() > LIMIT {
                    tracing::warn!("order check: {} epochs never matched a kernel issue; starting over", LIMIT);
                    checker = Checker::new(dev);
                }
                let now = Instant::now();
                tracer.drain(|e| pending.push_back((now, Request::from_event(e))));
                while let Some((at, r)) = pending.front() {
                    let ready = r.complete
                        || checker.has_given_for(r)
                        || at.elapsed() >= MATCH_WAIT
                        || pending.len() > PENDING_LIMIT
                        || last;
                    if !ready {
                        break;
                    }
                    let (_, r) = pending.pop_front().expect("front exists");
                    let before = checker.unmatched;
                    match checker.on(&r) {
                        Ok(()) => {}
                        Err(v) => {
                            sum.violations += 1;
                            if sum.violations <= 10 {
                                tracing::error!("order check of {}: {v}", sum.device);
                            }
                            sum.first_violation.get_or_insert_with(|| v.to_string());
                        }
                    }
                    if !r.complete && r.op == drv_blocktrace::Op::Write && r.len > 0 {
                        if checker.unmatched == before {
                            sum.checked += 1;
                        } else {
                            if sum.unmatched_examples.len() < 8 {
                                sum.unmatched_examples.push(format!("{}+{}", r.offset, r.len));
                            }
                            // The agent's epochs for pieces of this request (FUSE split it) would
                            // otherwise wait for a kernel issue of their own that never comes,
                            // and be matched with a later write of the same range.
                            checker.forget_within(r.offset, r.len);
                        }
                    }
                }
                sum.unmatched = checker.unmatched;
                sum.stale = checker.stale;
                sum.tap_dropped = dropped.load(Ordering::Relaxed);
                if last || Instant::now() >= next_write {
                    next_write = Instant::now() + Duration::from_secs(1);
                    sum.lost = tracer.losses().map(|l| l.total()).unwrap_or(sum.lost);
                    let tmp = drv_files::temp_path(&out);
                    let text = serde_json::to_string(&sum).expect("summary serializes");
                    if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &out)) {
                        tracing::warn!("write {}: {e}", out.display());
                    }
                }
                if last {
                    return sum;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })?;
        Ok(OrderCheck { stop, thread: Some(thread) })
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
