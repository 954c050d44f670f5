//! The agent's core: the rules of the synchronous path, the change map and resync, with no I/O,
//! no clock and no threads. `drv-agent` wraps it in tokio, the TLS link and the change-map files;
//! the simulator drives the same code.
//!
//! - [`Order`]: sequence numbers, epochs ([`EpochClock`]), the overlap rule (overlapping writes are
//!   never in flight together: the local disk and staging would otherwise see them in different
//!   orders) and the mode machine:
//!
//!   ```text
//!            session opened, map clear            leave_sync (staging failed a write, the link
//!   start ─────────────────────────────► Sync ───broke, its log is full; a resync is requested)──┐
//!     │                                    ▲                                                     │
//!     │ (staging away, or blocks marked)   │ resync_end: map clear, EPOCH_END ends the run       ▼
//!     └───────────────────────────► ChangeMap ◄──── resync_stopped ──── Resyncing ◄── resync_begin
//!                                        └──────────────────────────────────────────────────┘
//!   ```
//! - [`AckQueue`]: writes sent and not yet acknowledged, resolved by staging's cumulative `Ack`,
//!   and the ack timeout (the oldest one waiting too long fails the session).
//! - [`Activity`]: the activity log's rules (which extents may hold writes that staging has and
//!   the local disk lacks, and when a FLUSH makes them stable).
//! - [`resync_budget`], [`last_pass`], [`pace`]: how much a resync ships, when its pass is the last,
//!   and the bandwidth limit.
//!
//! **Invariants** (asserted): sequence numbers go up by one per record sent on a session; two
//! writes in flight never overlap; a resync begins only outside sync mode and ends only in
//! resyncing mode.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::EpochClock;

/// Where the volume's writes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// To staging, then the local disk.
    Sync,
    /// Local only, marked in the change map (staging away, too slow, or full).
    ChangeMap,
    /// Local only and marked, while the marked blocks are shipped to staging.
    Resyncing,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Sync => "sync",
            Mode::ChangeMap => "change-map",
            Mode::Resyncing => "resyncing",
        })
    }
}

/// Staging reopened the volume holding less than it had acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "staging acknowledged this volume up to seq {acked} but its log holds it only up to seq {holds}: it lost acknowledged writes (a damaged, re-created or replaced write log); nothing more is sent to it, and the change map keeps every write"
)]
pub struct StagingLost {
    pub acked: u64,
    pub holds: u64,
}

/// Whether staging, reporting `last_seq`, still holds everything it acknowledged (up to `acked`).
pub fn staging_holds(last_seq: u64, acked: u64) -> Result<(), StagingLost> {
    if last_seq < acked {
        return Err(StagingLost { acked, holds: last_seq });
    }
    Ok(())
}

/// How a write was issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Issue {
    /// To staging with this sequence number (the caller sends it; if it cannot, it calls
    /// [`Order::leave_sync`] and handles the write like a [`Issue::Local`] one).
    Staging { seq: u64, epoch: u64 },
    /// To the change map, then the local disk.
    Local { epoch: u64 },
}

/// A record the agent sends on its own (`EPOCH_END`, `RESYNC`): its sequence number and epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub seq: u64,
    pub epoch: u64,
}

/// A volume's order: what is in flight, the next sequence number, the epoch clock and the mode.
#[derive(Clone, Debug)]
pub struct Order {
    next_seq: u64,
    clock: EpochClock,
    /// Byte ranges of writes in flight, `start -> end`; they never overlap.
    ranges: BTreeMap<u64, u64>,
    mode: Mode,
    /// Writes issued over one in flight ([`Order::inject_no_overlap_wait`]), `(offset, len)`.
    overlapping: Vec<(u64, u64)>,
    no_overlap_wait: bool,
}

impl Default for Order {
    fn default() -> Self {
        Order::new()
    }
}

impl Order {
    /// Before any session: writes go to the change map.
    pub fn new() -> Order {
        Order {
            next_seq: 1,
            clock: EpochClock::new(0),
            ranges: BTreeMap::new(),
            mode: Mode::ChangeMap,
            overlapping: Vec::new(),
            no_overlap_wait: false,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The next sequence number and the current epoch.
    pub fn position(&self) -> (u64, u64) {
        (self.next_seq, self.clock.current())
    }

    /// Writes issued and not yet complete.
    pub fn inflight(&self) -> u64 {
        self.clock.inflight()
    }

    /// A bug to inject (the simulator shows it is caught): overlapping writes no longer wait for
    /// each other.
    #[doc(hidden)]
    pub fn inject_no_overlap_wait(&mut self) {
        self.no_overlap_wait = true;
    }

    /// The first session opened, nothing marked: sync mode, continuing after what staging holds.
    pub fn connected(&mut self, last_seq: u64, last_epoch: u64) {
        assert_eq!(self.mode, Mode::ChangeMap, "connected twice");
        self.next_seq = last_seq + 1;
        self.clock = EpochClock::new(last_epoch);
        self.mode = Mode::Sync;
    }

    /// Whether `[start, end)` overlaps a write in flight.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        if start == end {
            return false;
        }
        self.ranges.range(..=start).next_back().is_some_and(|(_, e)| *e > start)
            || self.ranges.range(start..end).next().is_some()
    }

    /// Issues the write of `len` bytes at `offset` (a FLUSH has none): `None` while a write in
    /// flight overlaps it (wait for one to complete and ask again).
    pub fn try_issue(&mut self, offset: u64, len: u64) -> Option<Issue> {
        let end = offset + len;
        let overlaps = self.overlaps(offset, end);
        if overlaps && !self.no_overlap_wait {
            return None;
        }
        let epoch = self.clock.issue();
        if overlaps {
            self.overlapping.push((offset, len));
        } else if end > offset {
            self.ranges.insert(offset, end);
        }
        Some(match self.mode {
            Mode::Sync => Issue::Staging { seq: self.take_seq(), epoch },
            Mode::ChangeMap | Mode::Resyncing => Issue::Local { epoch },
        })
    }

    fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// The write issued at `offset` (`len` bytes) completed (or failed). Returns whether nothing
    /// is in flight now (the cue for the idle close).
    pub fn complete(&mut self, offset: u64, len: u64) -> bool {
        self.clock.complete();
        if let Some(i) = self.overlapping.iter().position(|w| *w == (offset, len)) {
            self.overlapping.swap_remove(i);
        } else if len > 0 {
            let end = self.ranges.remove(&offset);
            assert_eq!(end, Some(offset + len), "completed a write that was not in flight");
        }
        self.clock.inflight() == 0
    }

    /// Ends the current epoch when nothing is in flight, in sync mode: the `EPOCH_END` record to
    /// send.
    pub fn close_idle(&mut self) -> Option<Stamp> {
        if self.mode != Mode::Sync {
            return None;
        }
        let epoch = self.clock.close_idle()?;
        Some(Stamp { seq: self.take_seq(), epoch })
    }

    /// Sync mode ends (staging failed a write, the link broke, a resync was requested). Returns
    /// whether it was in sync mode (then the caller drops the session and says why, once).
    pub fn leave_sync(&mut self) -> bool {
        let was = self.mode == Mode::Sync;
        if was {
            self.mode = Mode::ChangeMap;
        }
        was
    }

    /// A resync begins on a new session; staging holds the volume up to `last_seq`/`last_epoch`
    /// and once acknowledged it up to `acked`. Staging holding less than it acknowledged lost
    /// acknowledged writes: numbering on from its position would reuse sequence numbers a replica
    /// may hold with other data, so the resync does not begin ([`StagingLost`]).
    pub fn resync_begin(&mut self, last_seq: u64, last_epoch: u64, acked: u64) -> Result<(), StagingLost> {
        assert_eq!(self.mode, Mode::ChangeMap, "a resync begins only in change-map mode");
        staging_holds(last_seq, acked)?;
        self.next_seq = last_seq + 1;
        self.clock.resume_after(last_epoch);
        self.mode = Mode::Resyncing;
        Ok(())
    }

    /// A RESYNC record of the running resync.
    pub fn resync_record(&mut self) -> Stamp {
        assert_eq!(self.mode, Mode::Resyncing, "a RESYNC record outside a resync");
        Stamp { seq: self.take_seq(), epoch: self.clock.current() }
    }

    /// The last pass shipped everything (and the map is clear): sync mode again. Returns the
    /// `EPOCH_END` record that ends the run (the replica applies a run once a later record
    /// arrives); later writes go to a new epoch.
    pub fn resync_end(&mut self) -> Stamp {
        assert_eq!(self.mode, Mode::Resyncing, "a resync ended outside a resync");
        self.mode = Mode::Sync;
        let epoch = self.clock.current();
        let s = Stamp { seq: self.take_seq(), epoch };
        self.clock.resume_after(epoch);
        s
    }

    /// The resync stopped before its end (the link failed, the room staging gave is used up).
    pub fn resync_stopped(&mut self) {
        assert_eq!(self.mode, Mode::Resyncing, "a resync stopped outside a resync");
        self.mode = Mode::ChangeMap;
    }
}

/// Records sent on a session and not yet acknowledged, each with when it was sent and what
/// resolves its writer.
#[derive(Debug)]
pub struct AckQueue<T> {
    waiting: BTreeMap<u64, (Duration, T)>,
}

impl<T> Default for AckQueue<T> {
    fn default() -> Self {
        AckQueue { waiting: BTreeMap::new() }
    }
}

impl<T> AckQueue<T> {
    /// Record `seq` was sent at `now`.
    pub fn sent(&mut self, seq: u64, now: Duration, t: T) {
        let before = self.waiting.insert(seq, (now, t));
        assert!(before.is_none(), "seq {seq} sent twice on one session");
    }

    /// Record `seq` could not be sent after all.
    pub fn unsent(&mut self, seq: u64) -> Option<T> {
        self.waiting.remove(&seq).map(|(_, t)| t)
    }

    /// Staging acknowledged every record up to `seq`: their waiters, in order.
    pub fn acked(&mut self, seq: u64) -> Vec<T> {
        let rest = self.waiting.split_off(&(seq + 1));
        std::mem::replace(&mut self.waiting, rest).into_values().map(|(_, t)| t).collect()
    }

    /// The oldest record waiting longer than `timeout` at `now`, if any.
    pub fn overdue(&self, now: Duration, timeout: Duration) -> Option<u64> {
        let (seq, (sent, _)) = self.waiting.first_key_value()?;
        (now.saturating_sub(*sent) >= timeout).then_some(*seq)
    }

    /// The session failed: every waiter, oldest first.
    pub fn take_all(&mut self) -> Vec<T> {
        std::mem::take(&mut self.waiting).into_values().map(|(_, t)| t).collect()
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// The activity log's rules. An extent is marked (durably, by the caller) before a write to it
/// goes to staging, and may be cleared once a FLUSH that began after every write to it completed
/// has completed: until then staging may hold a write of it that the local disk does not (yet, or
/// durably). After a crash of the agent or the host, the marked extents are "in doubt" and are
/// resynced from the local disk.
#[derive(Clone, Debug)]
pub struct Activity {
    extent_bytes: u64,
    /// Writes in progress per extent.
    active: BTreeMap<u64, u32>,
    /// Per extent: the flush generation current when its last write completed.
    completed_in: BTreeMap<u64, u64>,
    flush_gen: u64,
}

impl Activity {
    pub fn new(extent_bytes: u64) -> Activity {
        assert!(extent_bytes > 0, "extents of zero bytes");
        Activity { extent_bytes, active: BTreeMap::new(), completed_in: BTreeMap::new(), flush_gen: 0 }
    }

    /// The extents `[offset, offset + len)` touches.
    pub fn extents(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        offset / self.extent_bytes..(offset + len.max(1)).div_ceil(self.extent_bytes)
    }

    /// A write begins (the caller marks its extents durably before it goes to staging).
    pub fn enter(&mut self, offset: u64, len: u64) {
        for x in self.extents(offset, len) {
            *self.active.entry(x).or_default() += 1;
        }
    }

    /// A write ended (completed or failed).
    pub fn leave(&mut self, offset: u64, len: u64) {
        let g = self.flush_gen;
        for x in self.extents(offset, len) {
            if let std::collections::btree_map::Entry::Occupied(mut n) = self.active.entry(x) {
                *n.get_mut() -= 1;
                if *n.get() == 0 {
                    n.remove();
                }
            }
            self.completed_in.insert(x, g);
        }
    }

    /// A FLUSH begins: its generation.
    pub fn flush_begin(&mut self) -> u64 {
        self.flush_gen += 1;
        self.flush_gen
    }

    /// The FLUSH of generation `g` completed: the extents whose writes all completed before it
    /// began are stable locally (the caller clears them, lazily).
    pub fn flush_done(&mut self, g: u64) -> Vec<u64> {
        let done: Vec<u64> = self
            .completed_in
            .iter()
            .filter(|(x, cg)| **cg < g && !self.active.contains_key(x))
            .map(|(x, _)| *x)
            .collect();
        for x in &done {
            self.completed_in.remove(x);
        }
        done
    }
}

/// Record headers and tags, batch headers and padding: the share of staging's free room a resync
/// keeps for them (one sixteenth; a 64 KiB block costs 112 bytes of header and tag).
const RESYNC_ROOM_RESERVE_DIVISOR: u64 = 16;

/// How many bytes a resync may ship on a session whose staging reported `room` free bytes of its
/// log's `capacity`, with `dirty` bytes to ship; `None`: wait for more room. It starts when all of
/// it fits, or when an eighth of the log is free. So a log that is full (its replica away) is left
/// alone until relaying frees room, instead of being filled and refused again and again, and a
/// resync never ships more than staging can take before it asks again.
pub fn resync_budget(room: u64, capacity: u64, dirty: u64) -> Option<u64> {
    let budget = room - room / RESYNC_ROOM_RESERVE_DIVISOR;
    (budget >= dirty + dirty / 64 || room >= capacity / 8).then_some(budget)
}

/// Whether resync pass `pass` (from 1), with `todo` blocks to ship, is the last one: after a first
/// pass with writes going on, once what is left is small. The last pass holds new writes back (so
/// nothing changes under it) and runs without the bandwidth limit (so they are held briefly).
pub fn last_pass(pass: u64, todo: usize, final_pass_blocks: usize) -> bool {
    pass > 1 && todo <= final_pass_blocks
}

/// The bandwidth limit: how long to wait before sending more, having sent `sent` bytes in
/// `elapsed` since the pass began, at `limit` bytes per second (0: none).
pub fn pace(sent: u64, limit: u64, elapsed: Duration) -> Option<Duration> {
    if limit == 0 {
        return None;
    }
    Duration::from_secs_f64(sent as f64 / limit as f64).checked_sub(elapsed).filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_writes_wait_and_sequence_numbers_follow_sends() {
        let mut o = Order::new();
        assert_eq!(o.try_issue(0, 4096), Some(Issue::Local { epoch: 1 }), "no session yet: the change map");
        assert!(o.complete(0, 4096));
        o.leave_sync();
        assert_eq!(o.resync_begin(9, 3, 10), Err(StagingLost { acked: 10, holds: 9 }), "staging lost seq 10");
        assert_eq!(o.mode(), Mode::ChangeMap, "and nothing began");
        o.resync_begin(10, 3, 10).unwrap();
        // RESYNC records carry staging's last epoch (a run is one unit, whatever its epochs).
        assert_eq!(o.resync_record(), Stamp { seq: 11, epoch: 3 });
        assert_eq!(o.resync_end(), Stamp { seq: 12, epoch: 3 });
        assert_eq!(o.mode(), Mode::Sync);
        assert_eq!(o.try_issue(8192, 4096), Some(Issue::Staging { seq: 13, epoch: 4 }), "writes after the run");
        assert_eq!(o.try_issue(12287, 2), None, "overlaps the write in flight");
        assert_eq!(o.try_issue(0, 8192), Some(Issue::Staging { seq: 14, epoch: 4 }), "adjacent is fine");
        assert_eq!(o.try_issue(100, 0), Some(Issue::Staging { seq: 15, epoch: 4 }), "a flush overlaps nothing");
        assert!(!o.complete(8192, 4096));
        assert!(!o.complete(0, 8192));
        assert_eq!(o.close_idle(), None, "the flush is in flight");
        assert!(o.complete(100, 0));
        assert_eq!(o.close_idle(), Some(Stamp { seq: 16, epoch: 4 }));
        assert_eq!(o.close_idle(), None, "closed already");
        assert!(o.leave_sync() && !o.leave_sync(), "left once");
        assert_eq!(o.close_idle(), None, "no EPOCH_END outside sync mode");
    }

    #[test]
    #[should_panic(expected = "only in change-map mode")]
    fn a_resync_never_begins_in_sync_mode() {
        let mut o = Order::new();
        o.connected(0, 0);
        let _ = o.resync_begin(0, 0, 0);
    }

    #[test]
    fn acks_are_cumulative_and_the_oldest_times_out() {
        let mut q = AckQueue::default();
        let ms = Duration::from_millis;
        for s in 1..=4 {
            q.sent(s, ms(s * 10), s);
        }
        assert_eq!(q.overdue(ms(50), ms(100)), None);
        assert_eq!(q.overdue(ms(110), ms(100)), Some(1));
        assert_eq!(q.acked(2), vec![1, 2]);
        assert_eq!(q.overdue(ms(125), ms(100)), None);
        assert_eq!(q.unsent(4), Some(4));
        assert_eq!(q.take_all(), vec![3]);
        assert!(q.is_empty());
    }

    #[test]
    fn an_extent_is_stable_after_a_flush_that_began_after_its_writes() {
        let mut a = Activity::new(1 << 20);
        a.enter(0, 4096);
        a.enter((1 << 20) - 1, 2);
        a.leave(0, 4096);
        let g = a.flush_begin();
        assert_eq!(a.flush_done(g), Vec::<u64>::new(), "extent 0 still has a write in progress");
        a.leave((1 << 20) - 1, 2);
        assert_eq!(a.flush_done(g), Vec::<u64>::new(), "the write completed after the flush began");
        let g = a.flush_begin();
        assert_eq!(a.flush_done(g), vec![0, 1]);
    }

    #[test]
    fn a_resync_waits_for_room_and_never_plans_past_it() {
        const MIB: u64 = 1 << 20;
        // A full log (its replica away): wait.
        assert_eq!(resync_budget(0, 64 * MIB, 10 * MIB), None);
        assert_eq!(resync_budget(4 * MIB, 64 * MIB, 10 * MIB), None, "less than an eighth free, and it does not fit");
        // Everything fits: go, even with little room.
        assert_eq!(resync_budget(4 * MIB, 64 * MIB, MIB), Some(4 * MIB - MIB / 4));
        // An eighth free: go, in part, within the room.
        let b = resync_budget(8 * MIB, 64 * MIB, 100 * MIB).unwrap();
        assert!(b < 8 * MIB && b > 7 * MIB, "{b}");
        // Nothing dirty: go (the final pass only clears the map and ends the run).
        assert_eq!(resync_budget(0, 64 * MIB, 0), Some(0));
    }

    #[test]
    fn passes_and_pace() {
        assert!(!last_pass(1, 0, 256), "the first pass is never the last");
        assert!(last_pass(2, 256, 256) && !last_pass(2, 257, 256));
        assert_eq!(pace(1 << 20, 0, Duration::ZERO), None);
        assert_eq!(pace(1 << 20, 1 << 20, Duration::from_millis(250)), Some(Duration::from_millis(750)));
        assert_eq!(pace(1 << 20, 1 << 20, Duration::from_secs(2)), None);
    }
}
