//! Copy-on-write for the replica's recovery points: which blocks the apply step must preserve
//! before it overwrites them, and where a point's block is read from. No I/O: the replica's
//! snapshot store (`drv_replica::cow`) and the simulator run these rules.
//!
//! **Positions.** The replica's target moves from one applied position to the next (a position is
//! the sequence number that ends a unit). A *point* is a position whose image must stay
//! readable: a snapshot's position (pinned until the snapshot is deleted). The image at point `P`
//! is the target as it was right after the unit ending at `P` was applied.
//!
//! **Versions.** Before the apply step overwrites block `b` in the unit ending at `e`, the block
//! still holds what the unit ending at `w` (its last writer) put there, and that content is the
//! block's content at every position `p` with `w <= p < e`. If some point lies in `[w, e)`, the
//! old content is preserved as a [`Version`] `{ block: b, lo: w, hi: e }`. One version serves every
//! point in its range: the cost of a write is at most one copy, whatever the number of points
//! (the birth-time idea of ZFS; LVM's classic snapshots copy once per snapshot).
//!
//! **Where `w` comes from.** The store does not track every block's last writer; it uses the `hi`
//! of the block's newest version (0 when it has none), a lower bound of `w`. That bound is exact
//! enough: points are created at the current position only, so a point `P` older than the real
//! `w` existed when that write happened, which would then have preserved the block and moved the
//! bound to `w`. Hence for every live point `P`: `P` in `[bound, e)` iff `P` in `[w, e)`.
//!
//! **Reading point `P`, block `b`.** The version of `b` with `lo <= P < hi`, if there is one (the
//! block was overwritten after `P`); else the target (it was not). Versions of a block never
//! overlap. A reader of the target races the apply step: it looks for a version again after
//! reading the target (preservation is durable before the target is written), see
//! [`read_source`].
//!
//! **Freeing.** A version is needed while a live point lies in its range; when the last one is
//! deleted, its slot is free.
//!
//! **Any point in time.** A volume may keep a *window*: every unit end at or after its start
//! `from` (itself a unit end) is a point. A version `[lo, hi)` holds a window point iff
//! `from < hi` (if `lo >= from`, `lo` is one; otherwise `from` lies inside), so the window costs
//! one copy per overwritten block per unit, and a snapshot can be pinned *afterwards* at any unit
//! end `p >= from`: every version it needs exists already. The bound argument above holds for
//! window points too as long as `from` never starts below the position the window was opened at
//! (every write after it was applied under the window) and only moves forward. When the window's
//! start moves forward ("expiry"), the versions with `hi <= from` that no pinned point needs are
//! garbage.

use std::collections::BTreeMap;

use drv_format::record::{Flags, WriteDesc};

/// The preserved content of one block: what the block held at every position `p` with
/// `lo <= p < hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version {
    pub block: u64,
    pub lo: u64,
    pub hi: u64,
}

impl Version {
    /// Whether it holds the block's content at position `p`.
    pub fn covers(&self, p: u64) -> bool {
        self.lo <= p && p < self.hi
    }
}

/// The live points of one volume: the pinned ones (snapshots) and the window, if one is kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Points {
    pinned: BTreeMap<u64, u32>,
    /// Every unit end at or after this position is a point (a retention window).
    window_from: Option<u64>,
}

impl Points {
    pub fn new(positions: impl IntoIterator<Item = u64>) -> Points {
        let mut p = Points::default();
        for x in positions {
            p.pin(x);
        }
        p
    }

    /// A point at `position` (a snapshot taken there; several may share a position).
    pub fn pin(&mut self, position: u64) {
        *self.pinned.entry(position).or_default() += 1;
    }

    /// Whether a point is pinned at `position` (a snapshot's image is kept there).
    pub fn is_pinned(&self, position: u64) -> bool {
        self.pinned.contains_key(&position)
    }

    /// One point at `position` is gone.
    pub fn unpin(&mut self, position: u64) {
        let n = self.pinned.get_mut(&position).unwrap_or_else(|| panic!("no point at position {position}"));
        *n -= 1;
        if *n == 0 {
            self.pinned.remove(&position);
        }
    }

    /// No point at all: nothing to preserve.
    pub fn is_empty(&self) -> bool {
        self.pinned.is_empty() && self.window_from.is_none()
    }

    /// The start of the window (`None`: no window).
    pub fn window(&self) -> Option<u64> {
        self.window_from
    }

    /// Opens the window at `from` (the applied position, a unit end), moves its start forward, or
    /// closes it (`None`). A window never starts earlier than it did: the positions before its
    /// start were applied without preserving for it.
    pub fn set_window(&mut self, from: Option<u64>) {
        if let (Some(old), Some(new)) = (self.window_from, from) {
            assert!(new >= old, "the window's start would move back from {old} to {new}");
        }
        self.window_from = from;
    }

    /// Whether a snapshot may be pinned at `p`, a unit end no later than the applied position:
    /// inside the window, or no older than the newest pinned point.
    pub fn can_pin(&self, p: u64) -> bool {
        self.window_from.is_some_and(|w| p >= w) || self.newest().is_none_or(|n| p >= n)
    }

    /// Whether a point needs the content a block had over positions `[lo, hi)`.
    pub fn need(&self, lo: u64, hi: u64) -> bool {
        lo < hi && (self.window_from.is_some_and(|w| w < hi) || self.pinned.range(lo..hi).next().is_some())
    }

    /// The position of the one point in `[lo, hi)`, when exactly one lies there (a version only
    /// it needs: deleting it frees the version; never one the window needs).
    pub fn sole(&self, lo: u64, hi: u64) -> Option<u64> {
        if lo >= hi || self.window_from.is_some_and(|w| w < hi) {
            return None;
        }
        let mut r = self.pinned.range(lo..hi);
        match (r.next(), r.next()) {
            (Some((p, 1)), None) => Some(*p),
            _ => None,
        }
    }

    /// The newest point (a new point is never older).
    pub fn newest(&self) -> Option<u64> {
        self.pinned.keys().next_back().copied()
    }
}

/// One write of an apply batch: `len` bytes at `offset`, in the unit ending at position `unit_end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Write {
    pub offset: u64,
    pub len: u64,
    pub unit_end: u64,
}

/// The blocks a write covers.
fn blocks(w: &Write, block_bytes: u64) -> std::ops::Range<u64> {
    w.offset / block_bytes..(w.offset + w.len).div_ceil(block_bytes)
}

/// How many of `writes` (in apply order) one *pass* of the apply step takes: the preserve step
/// reads a block's old content from the target, so a pass must not write a block twice with a
/// point in between (the content between the two writes would be needed, and it exists only once
/// the pass's first write is on the target). Pinned points are created between batches, so this
/// splits only under a window (a point at every unit end). At least one write.
pub fn pass_len(points: &Points, block_bytes: u64, writes: &[Write]) -> usize {
    assert!(block_bytes > 0, "blocks of zero bytes");
    if points.window().is_none() {
        return writes.len();
    }
    let mut written: BTreeMap<u64, u64> = BTreeMap::new();
    for (i, w) in writes.iter().enumerate() {
        let conflict = blocks(w, block_bytes).any(|b| written.get(&b).is_some_and(|&e| points.need(e, w.unit_end)));
        if conflict {
            return i.max(1);
        }
        for b in blocks(w, block_bytes) {
            written.insert(b, w.unit_end);
        }
    }
    writes.len()
}

/// The versions to preserve before the target takes `writes` (one pass, in apply order: see
/// [`pass_len`]), given each block's bound (the `hi` of its newest version, 0 if none:
/// `bound(b)`), with blocks of `block_bytes`. A block whose bound is at or past its write's unit
/// end was preserved for this write already (a pass replayed after a crash): nothing to do.
pub fn plan(points: &Points, block_bytes: u64, writes: &[Write], mut bound: impl FnMut(u64) -> u64) -> Vec<Version> {
    assert!(block_bytes > 0, "blocks of zero bytes");
    if points.is_empty() {
        return Vec::new();
    }
    let mut moved: BTreeMap<u64, u64> = BTreeMap::new();
    let mut out = Vec::new();
    for w in writes {
        if w.len == 0 {
            continue;
        }
        for block in blocks(w, block_bytes) {
            let lo = *moved.entry(block).or_insert_with(|| bound(block));
            if points.need(lo, w.unit_end) {
                out.push(Version { block, lo, hi: w.unit_end });
                moved.insert(block, w.unit_end);
            }
        }
    }
    out
}

/// The end of a unit: a position the target passes through, with what labels it as a recovery
/// point.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnitEnd {
    /// The unit's last sequence number (the position).
    pub seq: u64,
    pub epoch: u64,
    /// The latest capture time of the unit's records (the agent's clock, seconds since the UNIX
    /// epoch; 0: unknown).
    pub capture_unix: u32,
    /// The unit holds a cache flush: what a file system or database on the volume wrote before
    /// it was durable there (a point worth choosing).
    pub flush: bool,
}

/// One apply batch: its writes (in order, each with the end of its unit) and its unit ends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub writes: Vec<Write>,
    pub ends: Vec<UnitEnd>,
}

/// The batch of records `descs` (whole units, in order): a resync run is one unit whatever its
/// epochs; an epoch is one otherwise.
pub fn unit_writes<'a>(descs: impl DoubleEndedIterator<Item = &'a WriteDesc>) -> Batch {
    let unit = |d: &WriteDesc| if d.flags.contains(Flags::RESYNC) { (true, 0) } else { (false, d.epoch) };
    let mut b = Batch::default();
    let mut current = None;
    for d in descs.rev() {
        if current != Some(unit(d)) {
            current = Some(unit(d));
            b.ends.push(UnitEnd { seq: d.volume_seq, epoch: d.epoch, ..UnitEnd::default() });
        }
        let end = b.ends.last_mut().expect("a unit");
        end.capture_unix = end.capture_unix.max(d.capture_unix);
        end.flush |= d.flags.contains(Flags::FLUSH);
        if d.length > 0 {
            b.writes.push(Write { offset: d.offset, len: d.length as u64, unit_end: end.seq });
        }
    }
    b.writes.reverse();
    b.ends.reverse();
    b
}

/// Where the image of point `p` reads a block from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The preserved version.
    Version(Version),
    /// The target (not overwritten since `p`).
    Target,
}

/// Where point `p` reads block `b`, given the block's versions (any order; they never overlap).
/// A reader of the target asks again after reading it: a version that appeared meanwhile (the
/// apply step preserves before it writes the target) means the target read may be newer.
pub fn read_source<'a>(p: u64, versions: impl IntoIterator<Item = &'a Version>) -> Source {
    versions.into_iter().find(|v| v.covers(p)).map_or(Source::Target, |v| Source::Version(*v))
}

/// The versions no live point needs any more.
pub fn garbage<'a>(points: &Points, versions: impl IntoIterator<Item = &'a Version>) -> Vec<Version> {
    versions.into_iter().filter(|v| !points.need(v.lo, v.hi)).copied().collect()
}

/// A model of a volume under apply, for tests of these rules: the target, the versions, and the
/// images the points must keep.
#[cfg(test)]
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub target: BTreeMap<u64, u64>,
    pub versions: BTreeMap<u64, Vec<(Version, u64)>>,
    pub points: Points,
    pub images: BTreeMap<u64, BTreeMap<u64, u64>>,
    pub freed: std::collections::BTreeSet<Version>,
    /// While a window is open: the image at every unit end since it opened.
    pub history: BTreeMap<u64, BTreeMap<u64, u64>>,
}

#[cfg(test)]
impl Model {
    /// Applies a batch of writes (block, value, unit end) the way the replica does: plan,
    /// preserve, write.
    pub fn apply(&mut self, block_bytes: u64, writes: &[(u64, u64, u64)]) {
        let ws: Vec<Write> =
            writes.iter().map(|&(b, _, e)| Write { offset: b * block_bytes, len: block_bytes, unit_end: e }).collect();
        let mut done = 0;
        while done < ws.len() {
            let n = pass_len(&self.points, block_bytes, &ws[done..]);
            let versions = &self.versions;
            let plan = plan(&self.points, block_bytes, &ws[done..done + n], |b| {
                versions.get(&b).and_then(|v| v.iter().map(|(x, _)| x.hi).max()).unwrap_or(0)
            });
            for v in plan {
                let old = self.target.get(&v.block).copied().unwrap_or(0);
                self.versions.entry(v.block).or_default().push((v, old));
            }
            for (i, &(b, value, end)) in writes.iter().enumerate().skip(done).take(n) {
                self.target.insert(b, value);
                let unit_done = writes.get(i + 1).is_none_or(|w| w.2 != end);
                if unit_done && self.points.window().is_some() {
                    self.history.insert(end, self.target.clone());
                }
            }
            done += n;
        }
    }

    /// Opens the window at the current position `p`.
    pub fn open_window(&mut self, p: u64) {
        self.points.set_window(Some(p));
        self.history.insert(p, self.target.clone());
    }

    /// Moves the window's start to `p` (a unit end inside it) and frees what no point needs.
    pub fn move_window(&mut self, p: u64) {
        self.points.set_window(Some(p));
        self.history = self.history.split_off(&p);
        self.collect();
    }

    /// A snapshot pinned afterwards at `p`, a unit end inside the window.
    pub fn pin_past(&mut self, p: u64) {
        assert!(self.points.can_pin(p));
        self.points.pin(p);
        self.images.insert(p, self.history[&p].clone());
    }

    fn collect(&mut self) {
        for vs in self.versions.values_mut() {
            let dead = garbage(&self.points, vs.iter().map(|(v, _)| v));
            vs.retain(|(v, _)| !dead.contains(v));
            self.freed.extend(dead);
        }
    }

    /// A point at the current position `p`: its image is remembered to check reads against.
    pub fn pin(&mut self, p: u64) {
        self.points.pin(p);
        self.images.insert(p, self.target.clone());
    }

    pub fn unpin(&mut self, p: u64) {
        self.points.unpin(p);
        self.collect();
    }

    /// Block `b` of point `p` as the rules read it.
    pub fn read(&self, p: u64, b: u64) -> u64 {
        let vs = self.versions.get(&b).map(|v| v.as_slice()).unwrap_or(&[]);
        match read_source(p, vs.iter().map(|(v, _)| v)) {
            Source::Version(v) => vs.iter().find(|(x, _)| *x == v).map(|(_, val)| *val).expect("found"),
            Source::Target => self.target.get(&b).copied().unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_copy_serves_every_point_between_two_writes() {
        let mut m = Model::default();
        m.apply(4096, &[(1, 10, 5), (2, 20, 5)]);
        m.pin(5);
        m.pin(5);
        m.apply(4096, &[(3, 30, 7)]);
        m.pin(7);
        m.apply(4096, &[(1, 11, 9), (1, 12, 10)]);
        // One version of block 1 for points 5 and 7 (written at 5, overwritten at 9); none for
        // the second write at 10 (no point in [9, 10)).
        assert_eq!(m.versions[&1].iter().map(|(v, _)| *v).collect::<Vec<_>>(), [Version { block: 1, lo: 0, hi: 9 }]);
        assert_eq!((m.read(5, 1), m.read(7, 1), m.read(7, 3), m.read(5, 3)), (10, 10, 30, 0));
        m.unpin(5);
        assert!(m.freed.is_empty(), "point 5 is pinned twice, and 7 needs the version too");
        m.unpin(5);
        m.unpin(7);
        assert_eq!(m.freed.len(), 2, "no point left (block 3 was preserved for point 5): {m:?}");
    }

    #[test]
    fn a_write_across_blocks_preserves_each_and_none_without_points() {
        let ws = [Write { offset: 4000, len: 200, unit_end: 3 }];
        assert_eq!(plan(&Points::default(), 4096, &ws, |_| 0), []);
        let p = Points::new([2]);
        assert_eq!(
            plan(&p, 4096, &ws, |_| 0),
            [Version { block: 0, lo: 0, hi: 3 }, Version { block: 1, lo: 0, hi: 3 }]
        );
        assert_eq!(plan(&p, 4096, &ws, |b| if b == 0 { 3 } else { 2 }), [Version { block: 1, lo: 2, hi: 3 }]);
    }

    #[test]
    fn each_write_carries_the_end_of_its_unit() {
        let d = |seq: u64, epoch: u64, flags: Flags, length: u32| WriteDesc {
            volume_id: 1,
            volume_seq: seq,
            epoch,
            offset: seq * 4096,
            length,
            flags,
            key_id: 1,
            nonce: [0; 12],
            capture_unix: 100 + seq as u32,
        };
        let descs = [
            d(1, 1, Flags::FLUSH, 4096),
            d(2, 1, Flags::default(), 4096),
            d(3, 2, Flags::RESYNC, 4096),
            d(4, 3, Flags::RESYNC, 4096),
            d(5, 3, Flags::EPOCH_END, 0),
            d(6, 4, Flags::default(), 4096),
        ];
        let b = unit_writes(descs.iter());
        let ends: Vec<(u64, u64)> = b.writes.iter().map(|w| (w.offset / 4096, w.unit_end)).collect();
        assert_eq!(ends, [(1, 2), (2, 2), (3, 4), (4, 4), (6, 6)], "a run is one unit across epochs");
        let units: Vec<(u64, u32, bool)> = b.ends.iter().map(|e| (e.seq, e.capture_unix, e.flush)).collect();
        assert_eq!(units, [(2, 102, true), (4, 104, false), (5, 105, false), (6, 106, false)]);
    }

    proptest! {
        /// A window opened at some position and moved forward at random, snapshots pinned
        /// afterwards at past unit ends inside it: every unit end in the window and every pinned
        /// point reads the image the target had there, and what is freed no point needs.
        #[test]
        fn every_unit_end_in_the_window_keeps_its_image(
            steps in proptest::collection::vec((0u8..6, proptest::collection::vec((0u64..8, 1u64..1000, 0u64..3), 1..6)), 1..40)
        ) {
            let mut m = Model::default();
            let mut position = 0u64;
            let mut live: Vec<u64> = Vec::new();
            for (op, batch) in steps {
                let pick = batch[0].1 as usize;
                match op {
                    0 if m.points.window().is_none() => m.open_window(position),
                    1 if m.points.window().is_some() => {
                        let ends: Vec<u64> = m.history.keys().copied().collect();
                        m.move_window(ends[pick % ends.len()]);
                    }
                    2 if m.points.window().is_some() => {
                        let ends: Vec<u64> = m.history.keys().copied().collect();
                        let p = ends[pick % ends.len()];
                        m.pin_past(p);
                        live.push(p);
                    }
                    3 if !live.is_empty() => {
                        let p = live.remove(pick % live.len());
                        m.unpin(p);
                    }
                    _ => {
                        let mut ws = Vec::new();
                        for (i, (b, value, step)) in batch.into_iter().enumerate() {
                            position += if i == 0 { step + 1 } else { step };
                            ws.push((b, value, position));
                        }
                        m.apply(4096, &ws);
                    }
                }
                let want: Vec<(u64, BTreeMap<u64, u64>)> = m
                    .history
                    .iter()
                    .chain(live.iter().map(|p| (p, &m.images[p])))
                    .map(|(p, img)| (*p, img.clone()))
                    .collect();
                for (p, img) in want {
                    for b in 0..8 {
                        prop_assert_eq!(m.read(p, b), img.get(&b).copied().unwrap_or(0), "point {} block {}", p, b);
                    }
                }
            }
        }

        /// Any history of batches, points pinned between batches and unpinned at random: every
        /// live point reads exactly the image it had when pinned, and freed versions are only
        /// those no live point needs.
        #[test]
        fn every_point_keeps_its_image(
            steps in proptest::collection::vec((0u8..4, proptest::collection::vec((0u64..8, 1u64..1000, 0u64..3), 1..6)), 1..40)
        ) {
            let mut m = Model::default();
            let mut position = 0u64;
            let mut live: Vec<u64> = Vec::new();
            for (op, batch) in steps {
                match op {
                    0 => {
                        m.pin(position);
                        live.push(position);
                    }
                    1 if !live.is_empty() => {
                        let p = live.remove(batch[0].1 as usize % live.len());
                        m.unpin(p);
                    }
                    _ => {
                        // Units of the batch: positions grow within it.
                        let mut ws = Vec::new();
                        for (i, (b, value, step)) in batch.into_iter().enumerate() {
                            // A new unit ends after the last applied position.
                            position += if i == 0 { step + 1 } else { step };
                            ws.push((b, value, position));
                        }
                        m.apply(4096, &ws);
                    }
                }
                for &p in &live {
                    for b in 0..8 {
                        let want = m.images[&p].get(&b).copied().unwrap_or(0);
                        prop_assert_eq!(m.read(p, b), want, "point {} block {}", p, b);
                    }
                }
            }
        }
    }
}
