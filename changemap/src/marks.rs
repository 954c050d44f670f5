//! The change map's rules in memory, with no I/O: [`Bits`] (which blocks are marked, and which
//! 4 KiB pages of the bitmap a change touched, for the caller to write) and [`Todo`] (what a
//! resync still has to ship, and which blocks have a write in progress so that a copy shipped
//! meanwhile never clears them). [`crate::ChangeMap`] is these two around a file; the simulator
//! uses them as they are.

use std::collections::{BTreeMap, BTreeSet};

/// Bytes of one page of the bitmap (the unit it is written in).
pub const PAGE: u64 = 4096;

/// The blocks of `[offset, offset + len)` (one block at least: a zero-length range at `offset`
/// names its block), cut at the volume's `blocks`.
pub fn blocks_of(offset: u64, len: u64, block_bytes: u64, blocks: u64) -> std::ops::Range<u64> {
    let first = offset / block_bytes;
    let end = (offset + len.max(1)).div_ceil(block_bytes).min(blocks);
    first..end.max(first)
}

/// One bit per block of the volume (bit `i % 8` of byte `i / 8`), padded to whole pages.
#[derive(Clone, Debug)]
pub struct Bits {
    bits: Vec<u8>,
    pub block_bytes: u64,
    pub volume_bytes: u64,
}

impl Bits {
    /// Bitmap bytes of a volume, padded to whole pages.
    pub fn map_bytes(volume_bytes: u64, block_bytes: u64) -> u64 {
        volume_bytes.div_ceil(block_bytes).div_ceil(8).next_multiple_of(PAGE)
    }

    /// All clear.
    pub fn new(volume_bytes: u64, block_bytes: u64) -> Bits {
        Bits::from_bytes(vec![0; Bits::map_bytes(volume_bytes, block_bytes) as usize], volume_bytes, block_bytes)
    }

    /// As read back from a map's file.
    pub fn from_bytes(bits: Vec<u8>, volume_bytes: u64, block_bytes: u64) -> Bits {
        assert_eq!(bits.len() as u64, Bits::map_bytes(volume_bytes, block_bytes), "bitmap of the wrong size");
        Bits { bits, block_bytes, volume_bytes }
    }

    /// Blocks of the volume.
    pub fn blocks(&self) -> u64 {
        self.volume_bytes.div_ceil(self.block_bytes)
    }

    pub fn blocks_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        blocks_of(offset, len, self.block_bytes, self.blocks())
    }

    pub fn is_set(&self, b: u64) -> bool {
        self.bits[(b / 8) as usize] & (1 << (b % 8)) != 0
    }

    /// Sets `blocks`; adds the pages whose bytes changed to `pages`.
    pub fn set(&mut self, blocks: impl IntoIterator<Item = u64>, pages: &mut BTreeSet<u64>) {
        for b in blocks {
            let (byte, bit) = ((b / 8) as usize, 1u8 << (b % 8));
            if self.bits[byte] & bit == 0 {
                self.bits[byte] |= bit;
                pages.insert(byte as u64 / PAGE);
            }
        }
    }

    /// Clears `blocks`; adds the pages whose bytes changed to `pages`.
    pub fn clear(&mut self, blocks: &[u64], pages: &mut BTreeSet<u64>) {
        for &b in blocks {
            let (byte, bit) = ((b / 8) as usize, 1u8 << (b % 8));
            if self.bits[byte] & bit != 0 {
                self.bits[byte] &= !bit;
                pages.insert(byte as u64 / PAGE);
            }
        }
    }

    /// Sets the blocks of `[offset, offset + len)` (nothing for an empty range or one past the
    /// volume's end).
    pub fn mark_range(&mut self, offset: u64, len: u64) {
        if len > 0 && offset < self.volume_bytes {
            self.set(self.blocks_of(offset, len), &mut BTreeSet::new());
        }
    }

    /// The marked blocks as extents (adjacent blocks merged, cut at the volume's end), clearing
    /// them.
    pub fn take_extents(&mut self) -> Vec<(u64, u64)> {
        let e = crate::extents(self.marked(), self.block_bytes, self.volume_bytes);
        self.clear_all();
        e
    }

    pub fn clear_all(&mut self) {
        self.bits.iter_mut().for_each(|b| *b = 0);
    }

    /// The marked blocks, in order.
    pub fn marked(&self) -> Vec<u64> {
        crate::set_bits(&self.bits, self.blocks()).collect()
    }

    pub fn marked_bytes(&self) -> u64 {
        self.bits.iter().map(|b| b.count_ones() as u64).sum::<u64>() * self.block_bytes
    }

    /// The bytes of page `p`.
    pub fn page(&self, p: u64) -> &[u8] {
        &self.bits[(p * PAGE) as usize..((p + 1) * PAGE) as usize]
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }
}

/// What a resync still has to ship, in memory.
#[derive(Clone, Debug, Default)]
pub struct Todo {
    /// Blocks marked since they were last taken for shipping (a resync pass). Starts as everything
    /// the map has marked.
    blocks: BTreeSet<u64>,
    /// Blocks with a write in progress (marked, local write not yet done): a copy read from the
    /// disk now may lack that write.
    writing: BTreeMap<u64, u32>,
}

impl Todo {
    /// Blocks were marked: they are to ship (again).
    pub fn marked(&mut self, blocks: impl IntoIterator<Item = u64>) {
        self.blocks.extend(blocks);
    }

    /// A write to `blocks` begins, marked and without staging: until [`Todo::write_done`] they
    /// are never cleared as shipped.
    pub fn write_begins(&mut self, blocks: std::ops::Range<u64>) {
        for b in blocks {
            *self.writing.entry(b).or_default() += 1;
        }
    }

    /// That write's local write is done (or failed): its blocks are left to ship again, since a
    /// copy read while it ran may lack it.
    pub fn write_done(&mut self, blocks: std::ops::Range<u64>) {
        for b in blocks {
            self.blocks.insert(b);
            if let std::collections::btree_map::Entry::Occupied(mut e) = self.writing.entry(b) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }

    /// Takes the blocks marked since the last take (a resync pass ships them).
    pub fn take(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.blocks).into_iter().collect()
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// After an interrupted pass: what is left to ship is what the map has marked.
    pub fn reset(&mut self, marked: Vec<u64>) {
        self.blocks = marked.into_iter().collect();
    }

    /// Of `shipped` (acknowledged by staging), the blocks that may be cleared: not marked again
    /// since they were taken, and with no write in progress (the copy shipped may lack it).
    pub fn clearable(&self, shipped: &[u64]) -> Vec<u64> {
        shipped.iter().copied().filter(|b| !self.blocks.contains(b) && !self.writing.contains_key(b)).collect()
    }

    /// Everything was shipped; the map is cleared. **Invariant:** no write is in progress (it
    /// would lose its mark: its block may reach the disk without staging).
    pub fn clear_all(&mut self, what: &str) {
        assert!(self.writing.is_empty(), "{what}: cleared while {} blocks are being written", self.writing.len());
        self.blocks.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_into_extents_and_clear() {
        let mut m = Bits::new(10 * 4096 + 100, 4096);
        m.mark_range(4096, 1);
        m.mark_range(8192, 4096);
        m.mark_range(10 * 4096, 4096); // the short last block
        m.mark_range(0, 0);
        m.mark_range(1 << 20, 4096); // past the end
        assert_eq!(m.marked_bytes(), 3 * 4096);
        assert_eq!(m.take_extents(), vec![(4096, 8192), (40960, 100)]);
        assert!(m.take_extents().is_empty());
        m.mark_range(0, 10 * 4096 + 100);
        assert_eq!(m.take_extents(), vec![(0, 10 * 4096 + 100)]);
    }

    #[test]
    fn a_block_written_while_shipped_is_not_cleared() {
        let mut t = Todo::default();
        t.marked(0..4);
        let taken = t.take();
        t.write_begins(1..2);
        t.marked(2..3);
        assert_eq!(t.clearable(&taken), vec![0, 3]);
        t.write_done(1..2);
        assert_eq!(t.take(), vec![1, 2], "a finished write leaves its block to ship again");
    }
}
