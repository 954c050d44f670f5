//! Per-device telemetry from the event stream, one window at a time (`drv trace`): IOPS and
//! bytes per operation, flushes and FUA writes, queue depth (time-weighted mean and peak) and
//! the latency of each request from issue to completion, as a biolatency-style log2 histogram
//! and exact percentiles. I/O-free: events in, [`Window`]s out.
//!
//! Issue and completion are matched by (device, first sector, reads vs writes): the classic
//! tracepoints carry no request pointer. Two requests in flight at once at the same sector
//! complete in issue order (FIFO per key), which is what a queue does in all but rare reorders;
//! a reorder there swaps two latencies, nothing else.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::rwbs::{Op, Request};

/// log2 buckets of microseconds: bucket `i` counts latencies in `[2^i, 2^(i+1))` us (bucket 0
/// also takes 0 us).
pub const BUCKETS: usize = 32;
/// Requests in flight tracked per device; beyond it completions go unmatched (counted).
pub const MAX_INFLIGHT: usize = 1 << 16;
/// Latencies kept per window for exact percentiles; beyond it only the histogram counts.
pub const MAX_SAMPLES: usize = 1 << 20;

/// One device's figures over one window.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Window {
    /// `major:minor`.
    pub dev: String,
    pub seconds: f64,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Requests that flush the cache (a flush alone, or PREFLUSH on a write).
    pub flushes: u64,
    pub fua_writes: u64,
    /// Discards, secure erases and other writes that carry no data (write-zeroes).
    pub other_writes: u64,
    pub errors: u64,
    /// Time-weighted mean and peak of requests between issue and completion.
    pub queue_depth_mean: f64,
    pub queue_depth_max: u64,
    /// Latency from issue to completion, microseconds.
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    pub latency_max_us: f64,
    /// Non-empty buckets: (lowest microseconds of the bucket, count).
    pub histogram: Vec<(u64, u64)>,
    /// Completions without an issue seen (started before tracing, or the issue was lost).
    pub unmatched: u64,
}

impl Window {
    pub fn iops(&self) -> f64 {
        if self.seconds > 0.0 { (self.reads + self.writes) as f64 / self.seconds } else { 0.0 }
    }
}

/// A fast hasher for the in-flight table (keys are sector numbers, not attacker-chosen; SipHash
/// cost a visible share of the consumer at 100k events/s).
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }
}

type Key = (u64, u8);
type FastMap<V> = HashMap<Key, V, std::hash::BuildHasherDefault<KeyHasher>>;

#[derive(Default)]
struct Device {
    /// Issue time of the oldest request in flight per key; later ones with the same key (rare)
    /// wait in `dups`, in issue order.
    inflight: FastMap<u64>,
    dups: FastMap<VecDeque<u64>>,
    depth: u64,
    w: Window,
    hist: [u64; BUCKETS],
    samples: Vec<u64>,
    depth_area: f64,
    last_ns: u64,
    /// Cumulative since start (for metrics): same fields as the window.
    total: Totals,
}

/// Counters since tracing started (Prometheus counters want monotonic values).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Totals {
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub fua_writes: u64,
    pub errors: u64,
    /// Cumulative latency histogram (not cumulative over buckets).
    pub hist: Vec<u64>,
    pub latency_sum_us: f64,
    pub latency_count: u64,
    pub queue_depth: u64,
}

/// Aggregates events per device.
#[derive(Default)]
pub struct Stats {
    devices: BTreeMap<u32, Device>,
    window_start_ns: Option<u64>,
}

impl Stats {
    pub fn new() -> Stats {
        Stats::default()
    }

    /// Feeds one event.
    pub fn on(&mut self, r: &Request) {
        let start = *self.window_start_ns.get_or_insert(r.ts_ns);
        let d = self.devices.entry(r.dev).or_default();
        if d.last_ns == 0 {
            d.last_ns = start.min(r.ts_ns);
        }
        // Time-weighted queue depth up to this event.
        let now = r.ts_ns.max(d.last_ns);
        d.depth_area += d.depth as f64 * (now - d.last_ns) as f64;
        d.last_ns = now;
        // A request without data (a flush) has no meaningful sector (-1 or 0, differing between
        // issue and completion): flushes match each other in order. The empty write that carried
        // a PREFLUSH completes after its flush without an issue of its own: not a request here.
        if r.len == 0 && r.op != Op::Flush {
            return;
        }
        let key = if r.len == 0 { (u64::MAX, 2) } else { (r.offset, u8::from(r.op != Op::Read)) };
        if !r.complete {
            if d.depth < MAX_INFLIGHT as u64 {
                match d.inflight.entry(key) {
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(r.ts_ns);
                    }
                    std::collections::hash_map::Entry::Occupied(_) => d.dups.entry(key).or_default().push_back(r.ts_ns),
                }
                d.depth += 1;
                d.w.queue_depth_max = d.w.queue_depth_max.max(d.depth);
            }
            return;
        }
        let issued = d.inflight.remove(&key);
        if issued.is_some()
            && let Some(q) = d.dups.get_mut(&key)
        {
            let next = q.pop_front().expect("no empty queue is kept");
            if q.is_empty() {
                d.dups.remove(&key);
            }
            d.inflight.insert(key, next);
        }
        let t = &mut d.total;
        if t.hist.is_empty() {
            t.hist = vec![0; BUCKETS];
        }
        match issued {
            None => d.w.unmatched += 1,
            Some(issued) => {
                d.depth -= 1;
                let lat_ns = r.ts_ns.saturating_sub(issued);
                let us = lat_ns / 1000;
                let b = (64 - us.leading_zeros() as usize).saturating_sub(1).min(BUCKETS - 1);
                d.hist[b] += 1;
                if d.samples.len() < MAX_SAMPLES {
                    d.samples.push(lat_ns);
                }
                t.hist[b] += 1;
                t.latency_sum_us += lat_ns as f64 / 1000.0;
                t.latency_count += 1;
            }
        }
        if r.error != 0 {
            d.w.errors += 1;
            t.errors += 1;
        }
        if r.preflush || r.op == Op::Flush {
            d.w.flushes += 1;
            t.flushes += 1;
        }
        match r.op {
            Op::Read => {
                d.w.reads += 1;
                d.w.read_bytes += r.len;
                t.reads += 1;
                t.read_bytes += r.len;
            }
            Op::Write => {
                d.w.writes += 1;
                d.w.write_bytes += r.len;
                t.writes += 1;
                t.write_bytes += r.len;
                if r.fua {
                    d.w.fua_writes += 1;
                    t.fua_writes += 1;
                }
            }
            Op::Flush => {}
            Op::Discard | Op::SecureErase | Op::Other => d.w.other_writes += 1,
        }
    }

    /// Ends the window at `now_ns` (monotonic, as the events' timestamps) and returns each
    /// device's figures; the next window starts there.
    pub fn take_window(&mut self, now_ns: u64) -> Vec<Window> {
        let start = self.window_start_ns.replace(now_ns).unwrap_or(now_ns);
        let secs = now_ns.saturating_sub(start) as f64 / 1e9;
        let mut out = Vec::new();
        for (&dev, d) in &mut self.devices {
            let now = now_ns.max(d.last_ns);
            d.depth_area += d.depth as f64 * (now - d.last_ns) as f64;
            d.last_ns = now;
            let mut w = std::mem::take(&mut d.w);
            w.dev = crate::dev_name(dev);
            w.seconds = secs;
            w.queue_depth_mean = if secs > 0.0 { d.depth_area / (secs * 1e9) } else { 0.0 };
            w.queue_depth_max = w.queue_depth_max.max(d.depth);
            d.depth_area = 0.0;
            d.samples.sort_unstable();
            let pct = |p: f64| -> f64 {
                if d.samples.is_empty() {
                    return 0.0;
                }
                let i = ((d.samples.len() as f64 * p).ceil() as usize).clamp(1, d.samples.len()) - 1;
                d.samples[i] as f64 / 1000.0
            };
            w.latency_p50_us = pct(0.50);
            w.latency_p99_us = pct(0.99);
            w.latency_max_us = d.samples.last().map_or(0.0, |&v| v as f64 / 1000.0);
            // Bucket i starts at 2^i us, except bucket 0 which starts at 0.
            w.histogram = d
                .hist
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, &c)| (if i == 0 { 0 } else { 1u64 << i }, c))
                .collect();
            d.hist = [0; BUCKETS];
            d.samples.clear();
            d.total.queue_depth = d.depth;
            out.push(w);
        }
        out
    }

    /// Counters since the first event, per device.
    pub fn totals(&self) -> Vec<(String, Totals)> {
        self.devices.iter().map(|(&dev, d)| (crate::dev_name(dev), d.total.clone())).collect()
    }
}

/// The figures as Prometheus text exposition (for node_exporter's textfile collector or any
/// scraper that reads a file): counters since tracing started, the queue depth as a gauge, the
/// latency as a histogram, and the events lost.
pub fn prometheus(totals: &[(String, Totals)], lost: &crate::LossReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, values: &mut dyn Iterator<Item = (String, f64)>| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in values {
            let _ = writeln!(s, "{name}{labels} {v}");
        }
    };
    let each = |f: fn(&Totals) -> (u64, u64)| {
        totals
            .iter()
            .flat_map(move |(dev, t)| {
                let (r, w) = f(t);
                [
                    (format!("{{dev=\"{dev}\",op=\"read\"}}"), r as f64),
                    (format!("{{dev=\"{dev}\",op=\"write\"}}"), w as f64),
                ]
            })
            .collect::<Vec<_>>()
    };
    metric(
        "drv_block_requests_total",
        "counter",
        "Completed block requests.",
        &mut each(|t| (t.reads, t.writes)).into_iter(),
    );
    metric(
        "drv_block_bytes_total",
        "counter",
        "Bytes of completed block requests.",
        &mut each(|t| (t.read_bytes, t.write_bytes)).into_iter(),
    );
    let per_dev = |f: fn(&Totals) -> f64| {
        totals.iter().map(move |(dev, t)| (format!("{{dev=\"{dev}\"}}"), f(t))).collect::<Vec<_>>()
    };
    metric(
        "drv_block_flushes_total",
        "counter",
        "Cache flushes (PREFLUSH or flush requests).",
        &mut per_dev(|t| t.flushes as f64).into_iter(),
    );
    metric(
        "drv_block_fua_writes_total",
        "counter",
        "Writes with FUA.",
        &mut per_dev(|t| t.fua_writes as f64).into_iter(),
    );
    metric(
        "drv_block_errors_total",
        "counter",
        "Requests completed with an error.",
        &mut per_dev(|t| t.errors as f64).into_iter(),
    );
    metric(
        "drv_block_queue_depth",
        "gauge",
        "Requests between issue and completion.",
        &mut per_dev(|t| t.queue_depth as f64).into_iter(),
    );
    let _ = writeln!(
        s,
        "# HELP drv_block_latency_seconds Issue to completion.\n# TYPE drv_block_latency_seconds histogram"
    );
    for (dev, t) in totals {
        let mut cum = 0;
        for (i, c) in t.hist.iter().enumerate() {
            cum += c;
            let le = (1u64 << (i + 1)) as f64 / 1e6;
            let _ = writeln!(s, "drv_block_latency_seconds_bucket{{dev=\"{dev}\",le=\"{le}\"}} {cum}");
        }
        let _ = writeln!(s, "drv_block_latency_seconds_bucket{{dev=\"{dev}\",le=\"+Inf\"}} {}", t.latency_count);
        let _ = writeln!(s, "drv_block_latency_seconds_sum{{dev=\"{dev}\"}} {}", t.latency_sum_us / 1e6);
        let _ = writeln!(s, "drv_block_latency_seconds_count{{dev=\"{dev}\"}} {}", t.latency_count);
    }
    let _ = writeln!(
        s,
        "# HELP drv_ebpf_events_lost_total Events the eBPF programs could not deliver.\n# TYPE drv_ebpf_events_lost_total counter\n\
         drv_ebpf_events_lost_total{{cause=\"ring_full\"}} {}\ndrv_ebpf_events_lost_total{{cause=\"recursion\"}} {}",
        lost.reserve_failed, lost.recursion_misses
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ts_us: u64, complete: bool, offset: u64, op: Op) -> Request {
        Request {
            complete,
            dev: 7 << 20,
            ts_ns: ts_us * 1000,
            cpu: 0,
            offset,
            len: 4096,
            op,
            preflush: false,
            fua: false,
            sync: false,
            error: 0,
        }
    }

    #[test]
    fn latency_depth_and_counts_over_a_window() {
        let mut s = Stats::new();
        // Two writes in flight together for 100 us, then a read alone for 30 us.
        s.on(&req(0, false, 0, Op::Write));
        s.on(&req(0, false, 4096, Op::Write));
        s.on(&req(100, true, 0, Op::Write));
        s.on(&req(100, true, 4096, Op::Write));
        s.on(&req(200, false, 0, Op::Read));
        s.on(&req(230, true, 0, Op::Read));
        let w = s.take_window(1_000_000);
        assert_eq!(w.len(), 1);
        let w = &w[0];
        assert_eq!((w.writes, w.reads, w.write_bytes), (2, 1, 8192));
        assert_eq!(w.queue_depth_max, 2);
        // depth 2 for 100 us + 1 for 30 us over 1000 us
        assert!((w.queue_depth_mean - 0.23).abs() < 1e-9, "{}", w.queue_depth_mean);
        assert_eq!(w.latency_p50_us, 100.0);
        assert_eq!(w.latency_max_us, 100.0);
        // 30 us in [16, 32), 100 us in [64, 128)
        assert_eq!(w.histogram, vec![(16, 1), (64, 2)]);
        let next = s.take_window(2_000_000);
        assert_eq!((next[0].writes, next[0].queue_depth_max), (0, 0));
    }

    #[test]
    fn a_completion_without_its_issue_counts_but_has_no_latency() {
        let mut s = Stats::new();
        s.on(&req(5, true, 0, Op::Write));
        let w = s.take_window(10);
        assert_eq!((w[0].unmatched, w[0].writes, w[0].histogram.len()), (1, 1, 0));
    }

    #[test]
    fn a_flush_matches_its_completion_whatever_its_sector() {
        let mut s = Stats::new();
        let mut f = req(0, false, 0, Op::Flush);
        f.len = 0;
        f.preflush = true;
        s.on(&f);
        f.complete = true;
        f.offset = u64::MAX; // blk_rq_pos of a flush request: -1
        f.ts_ns = 50_000;
        s.on(&f);
        // The empty write that carried the PREFLUSH completes after it: not a request.
        let mut empty = req(51, true, 0, Op::Write);
        empty.len = 0;
        s.on(&empty);
        let w = s.take_window(100_000);
        assert_eq!((w[0].flushes, w[0].writes, w[0].unmatched, w[0].queue_depth_max), (1, 0, 0, 1));
        assert_eq!(w[0].latency_p50_us, 50.0);
    }

    #[test]
    fn requests_at_the_same_sector_complete_in_issue_order() {
        let mut s = Stats::new();
        s.on(&req(0, false, 0, Op::Write));
        s.on(&req(10, false, 0, Op::Write));
        s.on(&req(20, false, 0, Op::Write));
        s.on(&req(100, true, 0, Op::Write)); // 100 us
        s.on(&req(110, true, 0, Op::Write)); // 100 us
        s.on(&req(140, true, 0, Op::Write)); // 120 us
        let w = s.take_window(1_000_000);
        assert_eq!((w[0].writes, w[0].queue_depth_max, w[0].unmatched), (3, 3, 0));
        assert_eq!((w[0].latency_p50_us, w[0].latency_max_us), (100.0, 120.0));
        assert_eq!(s.take_window(2_000_000)[0].queue_depth_max, 0, "nothing left in flight");
    }

    #[test]
    fn flushes_and_fua_are_counted() {
        let mut s = Stats::new();
        let mut f = req(0, false, 0, Op::Flush);
        f.len = 0;
        s.on(&f);
        f.complete = true;
        s.on(&f);
        let mut w = req(1, false, 8192, Op::Write);
        w.fua = true;
        s.on(&w);
        w.complete = true;
        s.on(&w);
        let out = s.take_window(10);
        assert_eq!((out[0].flushes, out[0].fua_writes, out[0].writes), (1, 1, 1));
        let text = prometheus(&s.totals(), &crate::LossReport::default());
        assert!(text.contains("drv_block_flushes_total{dev=\"7:0\"} 1"), "{text}");
        assert!(text.contains("drv_block_latency_seconds_count{dev=\"7:0\"} 2"), "{text}");
    }
}
