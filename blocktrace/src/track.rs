//! Change tracking from the event stream, without holding writes (`drv track`). I/O-free: the
//! caller feeds events and loss reports, persists what [`Tracker::take_marks`] returns in its
//! change map, and ships at a cut.
//!
//! # Rules
//! - A request that may change data (write, discard, write-zeroes: anything but a read or a
//!   flush) marks its extent when it is **issued**, before the device can have changed, and
//!   again at its completion if its issue was never seen.
//! - At a cut (`drv track sync`), the caller ships every marked extent by reading the device.
//!   A write issued before the cut but not yet completed may land after that read, so its
//!   extent stays marked for the next cut ([`Tracker::in_flight`]). A write that completed
//!   before the cut is on the device before any read of the cut starts.
//! - A loss makes the lost requests' extents unknown: a dropped event (full ring buffer) marks
//!   its device's lost range; a skipped run of the issue program (recursion guard: no device or
//!   range known) or an overflowing in-flight table marks the whole volume. A skipped
//!   completion needs nothing: its write stays in flight, so it stays marked at every cut.
//!   Nothing lost is ever treated as clean.
//!
//! The guarantee is weaker than the synchronous paths' (module, userspace device): writes reach
//! the disk without waiting for staging, so a disaster loses everything since the last cut
//! completed (the RPO is the time since then), and the replica is crash-consistent only at cuts
//! taken with the filesystem frozen (`--freeze`). See ARCHITECTURE.md.

use std::collections::HashMap;

use crate::LossReport;
use crate::rwbs::Request;

/// Most writes in flight at once; more means completions are being lost, and the tracker falls
/// back to marking everything.
pub const MAX_IN_FLIGHT: usize = 1 << 16;

/// What a loss report asks the caller to mark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LossAction {
    None,
    /// Byte ranges of the volume.
    Ranges(Vec<(u64, u64)>),
    /// Everything: the lost requests' ranges are unknown.
    All,
}

pub struct Tracker {
    dev: u32,
    volume_bytes: u64,
    in_flight: HashMap<(u64, u64), u32>,
    in_flight_total: usize,
    marks: Vec<(u64, u64)>,
    oldest_unshipped_ns: Option<u64>,
    changes: u64,
    seen: LossReport,
    overflowed: bool,
}

impl Tracker {
    /// Tracks device `dev` (kernel device number) whose first `volume_bytes` are the volume.
    pub fn new(dev: u32, volume_bytes: u64) -> Tracker {
        Tracker {
            dev,
            volume_bytes,
            in_flight: HashMap::new(),
            in_flight_total: 0,
            marks: Vec::new(),
            oldest_unshipped_ns: None,
            changes: 0,
            seen: LossReport::default(),
            overflowed: false,
        }
    }

    /// The extent of a request within the volume, if any.
    fn clamp(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let end = offset.saturating_add(len).min(self.volume_bytes);
        (offset < end).then(|| (offset, end - offset))
    }

    /// Feeds one event (of any device: others are ignored).
    pub fn on(&mut self, r: &Request) {
        if r.dev != self.dev || !r.op.changes_data() {
            return;
        }
        let key = (r.offset, r.len);
        if !r.complete {
            let Some(extent) = self.clamp(r.offset, r.len) else { return };
            self.marks.push(extent);
            self.changes += 1;
            self.oldest_unshipped_ns.get_or_insert(r.ts_ns);
            if self.in_flight_total >= MAX_IN_FLIGHT {
                self.overflowed = true;
                return;
            }
            *self.in_flight.entry(key).or_default() += 1;
            self.in_flight_total += 1;
        } else if let Some(n) = self.in_flight.get_mut(&key) {
            *n -= 1;
            self.in_flight_total -= 1;
            if *n == 0 {
                self.in_flight.remove(&key);
            }
        } else if let Some(extent) = self.clamp(r.offset, r.len) {
            // A completion without its issue: issued before tracing started, or its issue event
            // went missing. The data changed either way: mark it.
            self.marks.push(extent);
            self.changes += 1;
            self.oldest_unshipped_ns.get_or_insert(r.ts_ns);
        }
        // A write whose completion goes missing stays in flight, so it stays marked across
        // every cut: shipped again each time, never lost.
    }

    /// What the caller must mark after the programs reported `r` (cumulative since load).
    pub fn on_losses(&mut self, r: &LossReport) -> LossAction {
        // Only a skipped issue can hide a change (see the rules above). The counters are per
        // program, for every device: a miss on another device marks this one too.
        let more_misses = r.issue_misses > self.seen.issue_misses;
        let more_drops = r.reserve_failed > self.seen.reserve_failed;
        self.seen = r.clone();
        if more_misses || (more_drops && r.mixed_devices) || std::mem::take(&mut self.overflowed) {
            // The in-flight table cannot be trusted either: completions may be among the lost.
            self.in_flight.clear();
            self.in_flight_total = 0;
            return LossAction::All;
        }
        if !more_drops {
            return LossAction::None;
        }
        let ranges: Vec<_> = r
            .lost_ranges
            .iter()
            .filter(|(d, _, _)| *d == self.dev)
            .filter_map(|&(_, lo, hi)| self.clamp(lo, hi.saturating_sub(lo)))
            .collect();
        if ranges.is_empty() { LossAction::None } else { LossAction::Ranges(ranges) }
    }

    /// Whether the in-flight table overflowed since the last loss check (call
    /// [`Tracker::on_losses`] to act on it).
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// The extents marked since the last call, in the order their writes were issued.
    pub fn take_marks(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.marks)
    }

    /// Extents of writes issued and not yet completed: they stay marked across a cut.
    pub fn in_flight(&self) -> Vec<(u64, u64)> {
        self.in_flight.keys().filter_map(|&(o, l)| self.clamp(o, l)).collect()
    }

    /// A cut at `now_ns`: returns the age of the oldest change it covers (the data a disaster
    /// just before the cut would have lost), in nanoseconds; writes still in flight start the
    /// next period.
    pub fn cut(&mut self, now_ns: u64) -> Option<u64> {
        let age = self.oldest_unshipped_ns.map(|t| now_ns.saturating_sub(t));
        self.oldest_unshipped_ns = if self.in_flight.is_empty() { None } else { Some(now_ns) };
        age
    }

    /// When the oldest change not yet covered by a cut was issued (monotonic ns).
    pub fn oldest_unshipped_ns(&self) -> Option<u64> {
        self.oldest_unshipped_ns
    }

    /// Changes seen since tracking started.
    pub fn changes(&self) -> u64 {
        self.changes
    }
}

/// A tracker with its marks in memory (a restart ships everything anyway): what `drv track`
/// keeps, and the cut rule.
pub struct Marked {
    pub tracker: Tracker,
    marks: drv_changemap::Bits,
    /// Events the kernel reported lost so far.
    pub lost: u64,
}

/// What a cut ships.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cut {
    /// The marked extents (merged runs of blocks).
    pub extents: Vec<(u64, u64)>,
    /// The age of the oldest change the cut covers, in nanoseconds.
    pub rpo_before_ns: Option<u64>,
    pub lost: u64,
}

impl Marked {
    pub fn new(dev: u32, volume_bytes: u64, block_bytes: u64) -> Marked {
        Marked {
            tracker: Tracker::new(dev, volume_bytes),
            marks: drv_changemap::Bits::new(volume_bytes, block_bytes),
            lost: 0,
        }
    }

    /// One kernel event.
    pub fn on(&mut self, r: &Request) {
        self.tracker.on(r);
        for (o, l) in self.tracker.take_marks() {
            self.marks.mark_range(o, l);
        }
    }

    /// The kernel's loss counters: what they say was lost is marked (a range, or everything).
    pub fn on_losses(&mut self, l: &LossReport) -> LossAction {
        self.lost = l.total();
        let action = self.tracker.on_losses(l);
        match &action {
            LossAction::None => {}
            LossAction::Ranges(r) => r.iter().for_each(|&(o, l)| self.marks.mark_range(o, l)),
            LossAction::All => self.marks.mark_range(0, self.marks.volume_bytes),
        }
        action
    }

    /// A cut at `now_ns` (every event up to now fed): the marked extents, cleared, except the
    /// writes still in flight, which stay marked for the next cut.
    pub fn cut(&mut self, now_ns: u64) -> Cut {
        let extents = self.marks.take_extents();
        for (o, l) in self.tracker.in_flight() {
            self.marks.mark_range(o, l);
        }
        Cut { extents, rpo_before_ns: self.tracker.cut(now_ns), lost: self.lost }
    }

    /// Bytes marked for the next cut.
    pub fn pending_bytes(&self) -> u64 {
        self.marks.marked_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rwbs::Op;
    use proptest::prelude::*;

    const DEV: u32 = 7 << 20;

    fn ev(complete: bool, offset: u64, len: u64, op: Op) -> Request {
        Request {
            complete,
            dev: DEV,
            ts_ns: 1,
            cpu: 0,
            offset,
            len,
            op,
            preflush: false,
            fua: false,
            sync: false,
            error: 0,
        }
    }

    #[test]
    fn a_cut_ships_what_completed_and_keeps_what_is_in_flight() {
        let mut m = Marked::new(DEV, 1 << 20, 4096);
        m.on(&ev(false, 0, 4096, Op::Write));
        m.on(&ev(false, 8192, 4096, Op::Write));
        m.on(&ev(true, 0, 4096, Op::Write));
        let c = m.cut(11);
        assert_eq!(c.extents, vec![(0, 4096), (8192, 4096)]);
        assert_eq!(c.rpo_before_ns, Some(10), "the oldest change was issued at 1");
        assert_eq!(m.pending_bytes(), 4096, "the write in flight stays marked for the next cut");
        m.on(&ev(true, 8192, 4096, Op::Write));
        assert_eq!(m.cut(20).extents, vec![(8192, 4096)]);
        assert_eq!(m.cut(30).extents, vec![], "a completed write is in one cut only");
    }

    #[test]
    fn a_loss_without_a_range_makes_the_next_cut_the_whole_volume() {
        let mut m = Marked::new(DEV, 1 << 20, 4096);
        let r = LossReport { issue_misses: 1, ..Default::default() };
        assert_eq!(m.on_losses(&r), LossAction::All);
        assert_eq!(m.cut(1), Cut { extents: vec![(0, 1 << 20)], rpo_before_ns: None, lost: r.total() });
    }

    #[test]
    fn writes_mark_at_issue_and_stay_marked_while_in_flight() {
        let mut t = Tracker::new(DEV, 1 << 20);
        t.on(&ev(false, 0, 4096, Op::Write));
        t.on(&ev(false, 8192, 4096, Op::Other)); // write-zeroes shows as N
        t.on(&ev(false, 65536, 4096, Op::Read));
        t.on(&ev(false, 0, 0, Op::Flush));
        t.on(&ev(true, 0, 4096, Op::Write));
        assert_eq!(t.take_marks(), vec![(0, 4096), (8192, 4096)]);
        // A completion whose issue was never seen marks its extent too.
        t.on(&ev(true, 32768, 4096, Op::Write));
        assert_eq!(t.take_marks(), vec![(32768, 4096)]);
        assert_eq!(t.in_flight(), vec![(8192, 4096)]);
        assert!(t.take_marks().is_empty());
    }

    #[test]
    fn other_devices_and_bytes_past_the_volume_are_ignored() {
        let mut t = Tracker::new(DEV, 8192);
        let mut other = ev(false, 0, 4096, Op::Write);
        other.dev = DEV + 1;
        t.on(&other);
        t.on(&ev(false, 4096, 8192, Op::Write));
        t.on(&ev(false, 16384, 4096, Op::Write));
        assert_eq!(t.take_marks(), vec![(4096, 4096)]);
    }

    #[test]
    fn losses_mark_their_range_or_everything() {
        let mut t = Tracker::new(DEV, 1 << 20);
        assert_eq!(t.on_losses(&LossReport::default()), LossAction::None);
        let mut r = LossReport {
            reserve_failed: 2,
            lost_ranges: vec![(DEV, 4096, 12288), (DEV + 1, 0, 512)],
            ..Default::default()
        };
        assert_eq!(t.on_losses(&r), LossAction::Ranges(vec![(4096, 8192)]));
        assert_eq!(t.on_losses(&r), LossAction::None, "nothing new");
        r.recursion_misses = 1; // a completion skipped: its write stays in flight, marked
        assert_eq!(t.on_losses(&r), LossAction::None);
        r.recursion_misses = 2;
        r.issue_misses = 1;
        assert_eq!(t.on_losses(&r), LossAction::All);
        r.reserve_failed = 3;
        r.mixed_devices = true;
        assert_eq!(t.on_losses(&r), LossAction::All);
    }

    #[test]
    fn the_cut_reports_the_age_of_the_oldest_change() {
        let mut t = Tracker::new(DEV, 1 << 20);
        assert_eq!(t.cut(10), None);
        let mut w = ev(false, 0, 4096, Op::Write);
        w.ts_ns = 100;
        t.on(&w);
        w.ts_ns = 300;
        w.offset = 4096;
        t.on(&w);
        w.complete = true;
        w.offset = 0;
        t.on(&w);
        // The write at 4096 is still in flight: it starts the next period at the cut.
        assert_eq!(t.cut(1000), Some(900));
        assert_eq!(t.oldest_unshipped_ns(), Some(1000));
    }

    proptest! {
        /// Model: a block is shipped correctly by a cut if it was marked since the previous cut
        /// or is still in flight; a write that completed before a cut and was issued after the
        /// previous cut is always in the marked set of that cut.
        #[test]
        fn every_write_completed_before_a_cut_is_in_that_cut(ops in proptest::collection::vec((0u64..16, any::<bool>(), any::<bool>()), 1..200)) {
            let mut t = Tracker::new(DEV, 16 * 4096);
            let mut marked: std::collections::BTreeSet<u64> = Default::default();
            let mut open: Vec<u64> = Vec::new(); // blocks of writes in flight
            let mut completed_since_cut: std::collections::BTreeSet<u64> = Default::default();
            for (block, complete_one, cut) in ops {
                if complete_one && !open.is_empty() {
                    let b = open.remove(0);
                    t.on(&ev(true, b * 4096, 4096, Op::Write));
                    completed_since_cut.insert(b);
                } else {
                    t.on(&ev(false, block * 4096, 4096, Op::Write));
                    open.push(block);
                }
                marked.extend(t.take_marks().iter().map(|(o, _)| o / 4096));
                if cut {
                    for b in &completed_since_cut {
                        prop_assert!(marked.contains(b), "block {b} completed before the cut but is not marked");
                    }
                    // The caller clears everything but the in-flight extents.
                    marked = t.in_flight().iter().map(|(o, _)| o / 4096).collect();
                    completed_since_cut.clear();
                    for b in &open {
                        prop_assert!(marked.contains(b), "in-flight block {b} was cleared");
                    }
                    t.cut(0);
                }
            }
        }
    }
}
