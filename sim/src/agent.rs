//! The simulated host: an application issuing writes to a protected volume through the agent's
//! core (`drv_proto::agent::Order`, `AckQueue`, the resync's budget and passes) and the change
//! map's (`drv_changemap::{Bits, Todo}`), the same code the real agent runs. In sync mode a write
//! goes to staging, reaches the local disk after staging acknowledged it, and completes after
//! both. When the connection breaks, the writes not acknowledged are marked in the change map and
//! go local; the next session resyncs the marked blocks from the local disk as RESYNC records, in
//! passes, the last one holding new writes back, then returns to sync mode with an `EPOCH_END`.
//!
//! The host can crash (`crash`): the writes in flight fail, the local disk keeps what the last
//! FLUSH made stable and any of the writes completed after it, and the restarted agent marks the
//! extents its activity log (`drv_proto::Activity`) held as in doubt, resyncing them from the
//! local disk, so that staging and the replica converge to what the disk kept.
//!
//! The records as staging logged them (by sequence number) are the model the invariants check
//! the replica against; the local disk is what it must converge to.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use drv_changemap::{Bits, Todo};
use drv_proto::agent::{last_pass, resync_budget};
use drv_proto::{AckQueue, Activity, Issue, Mode, Order, Stamp};

use crate::net::Rng;

/// Change-map blocks of the simulated volume (256 of them on 1 MiB).
const BLOCK: u64 = 4 << 10;
/// A resync pass this small (in blocks) is the last.
const FINAL_PASS_BLOCKS: usize = 32;
/// Writes in flight at most.
const INFLIGHT_LIMIT: usize = 8;
/// Extents of the activity log (16 of them on 1 MiB).
const AL_EXTENT: u64 = 64 << 10;

/// One record as sent (the model).
#[derive(Clone, Debug)]
pub struct Sent {
    pub seq: u64,
    pub epoch: u64,
    pub offset: u64,
    pub data: Bytes,
    /// A zero-length `EPOCH_END` record (the volume went idle, or a resync run ended).
    pub epoch_end: bool,
    /// A block shipped by a resync.
    pub resync: bool,
    /// The agent's clock at capture (the simulated clock from [`SIM_CLOCK_BASE`]), in seconds.
    pub capture_unix: u32,
}

/// The simulated wall clock at step 0 (2026-01-01T00:00:00Z), in seconds since the UNIX epoch.
pub const SIM_CLOCK_BASE: u32 = 1_767_225_600;

/// What the agent sends to staging.
#[derive(Clone, Debug)]
pub enum ToStaging {
    Open,
    Write(Sent),
}

/// What staging answers.
#[derive(Clone, Debug)]
pub enum ToAgent {
    State { last_seq: u64, last_epoch: u64, room_bytes: u64, capacity_bytes: u64 },
    Ack { seq: u64 },
}

/// A write of the application, issued and not complete.
struct Write {
    offset: u64,
    data: Bytes,
    /// Waiting for staging's acknowledgement.
    waiting: bool,
    /// Marked in the change map (its local write then tells the map when done).
    marked: bool,
}

/// A resync on the current session.
struct Resync {
    pass: u64,
    /// Bytes staging's room still allows.
    budget: u64,
    /// Blocks of this pass not yet sent.
    queue: Vec<u64>,
    last: bool,
    /// The last pass waits for the writes in flight before taking its blocks.
    draining: bool,
}

/// What an ack resolves.
#[derive(Clone, Copy, Debug)]
enum Waiter {
    Write(u64),
    Block(u64),
    EpochEnd,
}

pub struct Agent {
    pub volume_bytes: u64,
    order: Order,
    acks: AckQueue<Waiter>,
    bits: Bits,
    todo: Todo,
    writes: BTreeMap<u64, Write>,
    next_write: u64,
    resync: Option<Resync>,
    /// Whether the first session was tried (the agent's start: with a clean map it goes
    /// straight to sync mode; once it failed, or after a restart, every session resyncs, an
    /// empty map too).
    started: bool,
    /// The activity log's rules, and the extents it holds marked (durably: before a write goes
    /// on; cleared when a FLUSH made them stable).
    activity: Activity,
    al_marks: BTreeSet<u64>,
    /// The local disk as a crash leaves it: what the last FLUSH made stable, and the local writes
    /// completed since, in order (a crash keeps any of them).
    stable: Vec<u8>,
    unflushed: Vec<(u64, Bytes)>,
    /// Injected bugs: an extent leaves the activity log when its write completes (before a FLUSH
    /// made it stable); overlapping writes in flight together.
    pub activity_bug: bool,
    overlap_bug: bool,
    /// Every record sent, by `seq - 1`; cut back to what staging holds when a session opens.
    pub history: Vec<Sent>,
    /// Every record up to here is acknowledged by staging.
    pub acked: u64,
    /// The application's disk.
    pub local: Vec<u8>,
    /// The volume as the records sent leave it, in sequence order (`image_at` of them all).
    source: Vec<u8>,
    /// Whether the current connection has its volume open.
    pub open: bool,
    pub resync_runs: u64,
    pub mapped_writes: u64,
    /// The simulated clock (a step is a millisecond).
    now: std::time::Duration,
}

impl Agent {
    pub fn new(volume_bytes: u64) -> Agent {
        Agent {
            volume_bytes,
            order: Order::new(),
            acks: AckQueue::default(),
            bits: Bits::new(volume_bytes, BLOCK),
            todo: Todo::default(),
            writes: BTreeMap::new(),
            next_write: 0,
            resync: None,
            started: false,
            activity: Activity::new(AL_EXTENT),
            al_marks: BTreeSet::new(),
            stable: vec![0; volume_bytes as usize],
            unflushed: Vec::new(),
            activity_bug: false,
            overlap_bug: false,
            history: Vec::new(),
            acked: 0,
            local: vec![0; volume_bytes as usize],
            source: vec![0; volume_bytes as usize],
            open: false,
            resync_runs: 0,
            mapped_writes: 0,
            now: std::time::Duration::ZERO,
        }
    }

    /// The clock moves to `step` (milliseconds).
    pub fn tick(&mut self, step: u64) {
        self.now = std::time::Duration::from_millis(step);
    }

    /// The oldest record waiting for staging longer than `timeout`: the session fails (the real
    /// agent's watchdog, on the same `AckQueue`).
    pub fn ack_overdue(&self, timeout: std::time::Duration) -> Option<u64> {
        self.acks.overdue(self.now, timeout)
    }

    /// Injects a bug: overlapping writes in flight together.
    pub fn inject_no_overlap_wait(&mut self) {
        self.overlap_bug = true;
        self.order.inject_no_overlap_wait();
    }

    pub fn mode(&self) -> Mode {
        self.order.mode()
    }

    /// Writes issued and not yet complete.
    pub fn busy(&self) -> usize {
        self.writes.len()
    }

    /// Nothing left to do: sync mode, nothing in flight or marked, everything acknowledged.
    pub fn idle(&self) -> bool {
        self.order.mode() == Mode::Sync
            && self.writes.is_empty()
            && self.acks.is_empty()
            && self.bits.marked_bytes() == 0
            && self.acked == self.history.len() as u64
    }

    fn record(&mut self, stamp: Stamp, offset: u64, data: Bytes, epoch_end: bool, resync: bool) -> Sent {
        let capture_unix = SIM_CLOCK_BASE + self.now.as_secs() as u32;
        let s = Sent { seq: stamp.seq, epoch: stamp.epoch, offset, data, epoch_end, resync, capture_unix };
        assert_eq!(stamp.seq, self.history.len() as u64 + 1, "records are sent in sequence order");
        self.history.push(s.clone());
        self.source[offset as usize..offset as usize + s.data.len()].copy_from_slice(&s.data);
        s
    }

    /// Issues a new write (up to 8 in flight), unless it would overlap one in flight or the last
    /// resync pass holds writes back.
    pub fn issue(&mut self, rng: &mut Rng) -> Option<ToStaging> {
        if self.writes.len() >= INFLIGHT_LIMIT || self.resync.as_ref().is_some_and(|r| r.last) {
            return None;
        }
        let len = 4096 * (1 + rng.below(16));
        // Most writes go to a hot eighth of the volume (as file systems' do: a journal, metadata),
        // the rest anywhere.
        let span = if rng.one_in(8) { self.volume_bytes } else { self.volume_bytes / 8 + len };
        let offset = rng.below((span - len) / 4096 + 1) * 4096;
        let data = Bytes::from(drv_format::pattern(rng.next_u64(), len as usize));
        let id = self.next_write;
        let issued = self.order.try_issue(offset, len)?;
        // Marked in the activity log before it goes anywhere (the real agent's `activity_enter`).
        self.activity.enter(offset, len);
        self.al_marks.extend(self.activity.extents(offset, len));
        match issued {
            Issue::Staging { seq, epoch } if self.open => {
                self.next_write += 1;
                self.writes.insert(id, Write { offset, data: data.clone(), waiting: true, marked: false });
                self.acks.sent(seq, self.now, Waiter::Write(id));
                Some(ToStaging::Write(self.record(Stamp { seq, epoch }, offset, data, false, false)))
            }
            issue => {
                // The link is down (its break not yet seen), or not in sync mode: the change map.
                if matches!(issue, Issue::Staging { .. }) {
                    self.session_lost();
                }
                self.next_write += 1;
                self.writes.insert(id, Write { offset, data, waiting: false, marked: false });
                self.mark(id);
                None
            }
        }
    }

    /// Marks write `id` in the change map (before its local write).
    fn mark(&mut self, id: u64) {
        let w = self.writes.get_mut(&id).expect("a write in flight");
        let blocks = self.bits.blocks_of(w.offset, w.data.len() as u64);
        self.todo.write_begins(blocks.clone());
        self.todo.marked(blocks.clone());
        self.bits.set(blocks, &mut Default::default());
        w.marked = true;
        self.mapped_writes += 1;
    }

    /// Ends the current epoch when nothing is in flight (the agent's idle close).
    pub fn close_idle(&mut self) -> Option<ToStaging> {
        if !self.open {
            return None;
        }
        let stamp = self.order.close_idle()?;
        self.acks.sent(stamp.seq, self.now, Waiter::EpochEnd);
        Some(ToStaging::Write(self.record(stamp, 0, Bytes::new(), true, false)))
    }

    /// The session is gone (its link broke, or staging refused): sync mode ends, and every write
    /// waiting for staging is marked in the change map instead (staging may or may not have it).
    pub fn session_lost(&mut self) {
        self.open = false;
        self.started = true;
        self.order.leave_sync();
        if self.resync.take().is_some() {
            self.order.resync_stopped();
            self.todo.reset(self.bits.marked());
        }
        for w in self.acks.take_all() {
            if let Waiter::Write(id) = w {
                self.writes.get_mut(&id).expect("a write in flight").waiting = false;
                self.mark(id);
            }
        }
    }

    /// The connection opened the volume: staging holds everything up to `last_seq` durably (what
    /// was sent after it is gone with the old connection). Returns whether the session stays (no
    /// room for a resync: it closes and a later one asks again), or an error when staging lost
    /// records it had acknowledged.
    pub fn opened(&mut self, m: ToAgent) -> Result<bool, String> {
        let ToAgent::State { last_seq, last_epoch, room_bytes, capacity_bytes } = m else {
            return Err("an Ack before the volume was opened".into());
        };
        drv_proto::agent::staging_holds(last_seq, self.acked).map_err(|e| e.to_string())?;
        assert!(self.acks.is_empty(), "a new session with records of the old one waiting");
        if self.history.len() as u64 > last_seq {
            self.history.truncate(last_seq as usize);
            self.source = self.image_at(last_seq);
        }
        self.acked = last_seq;
        self.open = true;
        if !self.started && self.bits.marked_bytes() == 0 {
            self.started = true;
            self.order.connected(last_seq, last_epoch);
            return Ok(true);
        }
        let Some(budget) = resync_budget(room_bytes, capacity_bytes, self.bits.marked_bytes()) else {
            self.open = false;
            return Ok(false);
        };
        self.started = true;
        self.order.resync_begin(last_seq, last_epoch, self.acked).map_err(|e| e.to_string())?;
        self.resync = Some(Resync { pass: 0, budget, queue: Vec::new(), last: false, draining: false });
        self.resync_runs += 1;
        Ok(true)
    }

    /// An acknowledgement from staging.
    pub fn receive(&mut self, m: ToAgent) -> Result<(), String> {
        let ToAgent::Ack { seq } = m else { return Err("a second VolumeState on one connection".into()) };
        self.acked = self.acked.max(seq);
        let mut shipped = Vec::new();
        for w in self.acks.acked(seq) {
            match w {
                Waiter::Write(id) => self.writes.get_mut(&id).expect("a write in flight").waiting = false,
                Waiter::Block(b) => shipped.push(b),
                Waiter::EpochEnd => {}
            }
        }
        let clear = self.todo.clearable(&shipped);
        self.bits.clear(&clear, &mut Default::default());
        Ok(())
    }

    /// One step of the resync, if one runs: the next block, or the next pass, or its end.
    /// `Err(())`: the room staging gave is used up (the caller opens a new session).
    pub fn resync_step(&mut self) -> Result<Option<ToStaging>, ()> {
        let Some(mut r) = self.resync.take() else { return Ok(None) };
        let out = self.resync_advance(&mut r);
        if !matches!(out, Ok(Some(ToStaging::Write(Sent { epoch_end: true, .. })))) {
            self.resync = Some(r);
        }
        out
    }

    fn resync_advance(&mut self, r: &mut Resync) -> Result<Option<ToStaging>, ()> {
        if let Some(b) = r.queue.pop() {
            let offset = b * BLOCK;
            let len = BLOCK.min(self.volume_bytes - offset);
            if len > r.budget {
                return Err(());
            }
            r.budget -= len;
            let data = Bytes::copy_from_slice(&self.local[offset as usize..(offset + len) as usize]);
            let stamp = self.order.resync_record();
            self.acks.sent(stamp.seq, self.now, Waiter::Block(b));
            return Ok(Some(ToStaging::Write(self.record(stamp, offset, data, false, true))));
        }
        if !self.acks.is_empty() {
            return Ok(None); // the pass waits for every acknowledgement
        }
        if r.last && !r.draining {
            // Everything marked was shipped; no write runs: clear the map, sync mode again.
            self.bits.clear_all();
            self.todo.clear_all("simulated change map");
            let end = self.order.resync_end();
            self.acks.sent(end.seq, self.now, Waiter::EpochEnd);
            return Ok(Some(ToStaging::Write(self.record(end, 0, Bytes::new(), true, false))));
        }
        if !r.last {
            r.pass += 1;
            r.last = last_pass(r.pass, self.todo.len(), FINAL_PASS_BLOCKS);
            r.draining = r.last;
        }
        if r.draining && !self.writes.is_empty() {
            return Ok(None); // the last pass waits for the writes in flight
        }
        r.draining = false;
        r.queue = self.todo.take();
        r.queue.reverse();
        Ok(None)
    }

    /// The room used up: the resync stops (the next session goes on from what is left).
    pub fn resync_paused(&mut self) {
        self.session_lost();
    }

    /// One acknowledged (or marked) write reaches the local disk (any of them: writes in flight
    /// together complete in any order) and completes. Then each of its blocks that no other
    /// write in flight touches and the change map does not hold must read as the source does:
    /// the local disk and staging saw the same writes in the same order.
    pub fn local_write(&mut self, rng: &mut Rng) -> Result<(), String> {
        let ready: Vec<u64> = self.writes.iter().filter(|(_, w)| !w.waiting).map(|(id, _)| *id).collect();
        if ready.is_empty() {
            return Ok(());
        }
        let id = ready[rng.below(ready.len() as u64) as usize];
        let w = self.writes.remove(&id).expect("ready");
        let (o, len) = (w.offset as usize, w.data.len() as u64);
        self.local[o..o + w.data.len()].copy_from_slice(&w.data);
        self.unflushed.push((w.offset, w.data.clone()));
        self.activity.leave(w.offset, len);
        if self.activity_bug {
            for x in self.activity.extents(w.offset, len) {
                self.al_marks.remove(&x);
            }
        }
        if w.marked {
            self.todo.write_done(self.bits.blocks_of(w.offset, len));
        }
        self.order.complete(w.offset, len);
        for b in self.bits.blocks_of(w.offset, len) {
            let (start, end) = (b * BLOCK, ((b + 1) * BLOCK).min(self.volume_bytes));
            let busy = self.writes.values().any(|x| x.offset < end && start < x.offset + x.data.len() as u64);
            let r = start as usize..end as usize;
            if !busy && !self.bits.is_set(b) && self.local[r.clone()] != self.source[r] {
                return Err(format!(
                    "block {b} of the local disk differs from the source after a write at offset {} completed (the local disk and staging saw writes in different orders)",
                    w.offset
                ));
            }
        }
        Ok(())
    }

    /// The application's FLUSH (an fsync): every local write completed so far is stable, and the
    /// activity log lets go of the extents whose writes all completed before it.
    pub fn flush(&mut self) {
        let g = self.activity.flush_begin();
        self.stable.copy_from_slice(&self.local);
        self.unflushed.clear();
        for x in self.activity.flush_done(g) {
            self.al_marks.remove(&x);
        }
    }

    /// The host crashes and the agent starts again: the writes in flight fail (none completed,
    /// none reached the disk), the disk keeps what was stable and any of the later writes, the
    /// session and resync are gone. The change map is durable; the activity log's extents are
    /// in doubt (staging may hold writes the disk lost) and are marked in it to be resynced.
    pub fn crash(&mut self, rng: &mut Rng) {
        let mut disk = self.stable.clone();
        for (offset, data) in std::mem::take(&mut self.unflushed) {
            if rng.one_in(2) {
                disk[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            }
        }
        self.stable.copy_from_slice(&disk);
        self.local = disk;
        self.writes.clear();
        self.acks = AckQueue::default();
        self.resync = None;
        self.open = false;
        self.started = true;
        self.order = Order::new();
        if self.overlap_bug {
            self.order.inject_no_overlap_wait();
        }
        self.activity = Activity::new(AL_EXTENT);
        for x in std::mem::take(&mut self.al_marks) {
            let blocks = self.bits.blocks_of(x * AL_EXTENT, AL_EXTENT.min(self.volume_bytes - x * AL_EXTENT));
            self.bits.set(blocks, &mut Default::default());
        }
        self.todo = Todo::default();
        self.todo.reset(self.bits.marked());
    }

    /// The volume as the records `1..=seq` leave it, in sequence order.
    pub fn image_at(&self, seq: u64) -> Vec<u8> {
        let mut img = vec![0u8; self.volume_bytes as usize];
        for w in &self.history[..seq as usize] {
            img[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(&w.data);
        }
        img
    }
}
