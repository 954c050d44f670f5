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

/// The live points of one volume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Points {
    pinned: BTreeMap<u64, u32>,
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

    /// One point at `position` is gone.
    pub fn unpin(&mut self, position: u64) {
        let n = self.pinned.get_mut(&position).unwrap_or_else(|| panic!("no point at position {position}"));
        *n -= 1;
        if *n == 0 {
            self.pinned.remove(&position);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pinned.is_empty()
    }

    /// Whether a point needs the content a block had over positions `[lo, hi)`.
    pub fn need(&self, lo: u64, hi: u64) -> bool {
        lo < hi && self.pinned.range(lo..hi).next().is_some()
    }

    /// The position of the one point in `[lo, hi)`, when exactly one lies there (a version only
    /// it needs: deleting it frees the version).
    pub fn sole(&self, lo: u64, hi: u64) -> Option<u64> {
        if lo >= hi {
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

/// The versions to preserve before the target takes `writes` (in apply order), given each
/// block's bound (the `hi` of its newest version, 0 if none: `bound(b)`), with blocks of
/// `block_bytes`. Each block is preserved at most once per batch unless a point lies between
/// two of its writes (never, while points are created between batches).
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
        for block in w.offset / block_bytes..(w.offset + w.len).div_ceil(block_bytes) {
            let lo = *moved.entry(block).or_insert_with(|| bound(block));
            assert!(
                lo <= w.unit_end,
                "block {block}: a version up to position {lo} is newer than the write at {}",
                w.unit_end
            );
            if points.need(lo, w.unit_end) {
                out.push(Version { block, lo, hi: w.unit_end });
                moved.insert(block, w.unit_end);
            }
        }
    }
    out
}

/// The writes of records `descs` (whole units, in order), each with the position that ends its
/// unit (a resync run is one unit whatever its epochs; an epoch is one otherwise).
pub fn unit_writes<'a>(descs: impl DoubleEndedIterator<Item = &'a WriteDesc>) -> Vec<Write> {
    let unit = |d: &WriteDesc| if d.flags.contains(Flags::RESYNC) { (true, 0) } else { (false, d.epoch) };
    let mut out = Vec::new();
    let (mut end, mut current) = (0, None);
    for d in descs.rev() {
        if current != Some(unit(d)) {
            (end, current) = (d.volume_seq, Some(unit(d)));
        }
        if d.length > 0 {
            out.push(Write { offset: d.offset, len: d.length as u64, unit_end: end });
        }
    }
    out.reverse();
    out
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
}

#[cfg(test)]
impl Model {
    /// Applies a batch of writes (block, value, unit end) the way the replica does: plan,
    /// preserve, write.
    pub fn apply(&mut self, block_bytes: u64, writes: &[(u64, u64, u64)]) {
        let ws: Vec<Write> =
            writes.iter().map(|&(b, _, e)| Write { offset: b * block_bytes, len: block_bytes, unit_end: e }).collect();
        let versions = &self.versions;
        let plan = plan(&self.points, block_bytes, &ws, |b| {
            versions.get(&b).and_then(|v| v.iter().map(|(x, _)| x.hi).max()).unwrap_or(0)
        });
        for v in plan {
            let old = self.target.get(&v.block).copied().unwrap_or(0);
            self.versions.entry(v.block).or_default().push((v, old));
        }
        for &(b, value, _) in writes {
            self.target.insert(b, value);
        }
    }

    /// A point at the current position `p`: its image is remembered to check reads against.
    pub fn pin(&mut self, p: u64) {
        self.points.pin(p);
        self.images.insert(p, self.target.clone());
    }

    pub fn unpin(&mut self, p: u64) {
        self.points.unpin(p);
        for vs in self.versions.values_mut() {
            let dead = garbage(&self.points, vs.iter().map(|(v, _)| v));
            vs.retain(|(v, _)| !dead.contains(v));
            self.freed.extend(dead);
        }
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
            capture_unix: 0,
        };
        let descs = [
            d(1, 1, Flags::default(), 4096),
            d(2, 1, Flags::default(), 4096),
            d(3, 2, Flags::RESYNC, 4096),
            d(4, 3, Flags::RESYNC, 4096),
            d(5, 3, Flags::EPOCH_END, 0),
            d(6, 4, Flags::default(), 4096),
        ];
        let ends: Vec<(u64, u64)> = unit_writes(descs.iter()).iter().map(|w| (w.offset / 4096, w.unit_end)).collect();
        assert_eq!(ends, [(1, 2), (2, 2), (3, 4), (4, 4), (6, 6)], "a run is one unit across epochs");
    }

    proptest! {
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
