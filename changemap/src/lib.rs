//! The persistent change map: one bit per block of the volume, set durably before a write that
//! staging does not have reaches the local disk, cleared only once every marked block was shipped.
//! The agent keeps two (the change map and the activity log of writes in doubt); the replica keeps
//! one while a media resync runs (the blocks changed since `drv media-resync begin`).
//!
//! File layout (little endian):
//!
//! ```text
//!  0          8         12        16             24             32         36      4096
//!  +----------+---------+---------+--------------+--------------+----------+-- ... --+------ ...
//!  |"DRVCMAP" | version | block   | volume_bytes | volume_id    | crc32c   | zero    | bitmap:
//!  |  0x01    | u32 = 1 | bytes   | u64          | u64          | of 0..32 |         | 1 bit per
//!  |          |         | u32     |              |              |          |         | block, LSB
//!  +----------+---------+---------+--------------+--------------+----------+-- ... --+------ ...
//! ```
//!
//! The header is written once at creation; the bitmap starts at 4096 and is written in whole 4 KiB
//! pages at 4 KiB offsets.
//!
//! Crash analysis. `mark` sets the bits in memory, writes every page whose bits changed and calls
//! `fdatasync` before it returns; the caller performs the local write only after that, so a block
//! the local disk may hold newer than staging is always marked on disk. A crash between the page
//! write and the local write leaves a marked block that did not change (an extra block resynced).
//! `clear_all` is called only when every marked block was shipped and staging acknowledged it, with
//! no write in progress; a crash during it leaves some bits set (extra resync), never a changed
//! block unmarked. Assumption: a 4 KiB page write is not torn into a state that clears a bit that
//! was set before it (true of 4 KiB-sector and of 512-byte-sector devices that write sectors whole,
//! since a set bit only ever stays set in every sector version the page write can leave).

#![forbid(unsafe_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

const MAGIC: &[u8; 8] = b"DRVCMAP\x01";
const VERSION: u32 = 1;
const PAGE: u64 = 4096;
const BITMAP_AT: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ChangeMapError {
    #[error("change map {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("change map {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// The byte ranges `(offset, len)` of `blocks` (ascending block numbers of `block_bytes` each),
/// adjacent blocks merged, cut at `limit` (the volume's end): the one conversion from a set of
/// blocks to what is read and shipped (change map, the kernel module's dirty bitmap, eBPF marks).
pub fn extents(blocks: impl IntoIterator<Item = u64>, block_bytes: u64, limit: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for b in blocks {
        let (off, end) = (b * block_bytes, ((b + 1) * block_bytes).min(limit));
        if off >= end {
            continue;
        }
        match out.last_mut() {
            Some((o, l)) if *o + *l == off => *l += end - off,
            _ => out.push((off, end - off)),
        }
    }
    out
}

/// The numbers of the set bits of a byte bitmap (bit `i` is bit `i % 8` of byte `i / 8`), below
/// `blocks`.
pub fn set_bits(bitmap: &[u8], blocks: u64) -> impl Iterator<Item = u64> + '_ {
    (0..blocks.min(bitmap.len() as u64 * 8)).filter(|b| bitmap[(b / 8) as usize] & (1 << (b % 8)) != 0)
}

/// A volume's change map, open.
pub struct ChangeMap {
    file: File,
    path: String,
    pub block_bytes: u64,
    pub volume_bytes: u64,
    bits: Mutex<Vec<u8>>,
    /// In memory only (lock order: `bits`, then `todo`).
    todo: Mutex<Todo>,
}

/// What a resync still has to ship, in memory.
#[derive(Default)]
struct Todo {
    /// Blocks marked since they were last taken for shipping (a resync pass). Starts as everything
    /// the file has marked.
    blocks: std::collections::BTreeSet<u64>,
    /// Blocks with a write in progress (marked by [`ChangeMap::mark_write`], local write not yet
    /// done): a copy read from the disk now may lack that write.
    writing: std::collections::BTreeMap<u64, u32>,
}

impl ChangeMap {
    /// Opens the map at `path`, creating it (all clear) if it does not exist. An existing map must
    /// describe the same volume and block size.
    pub fn open(path: &Path, volume_id: u64, volume_bytes: u64, block_bytes: u64) -> Result<ChangeMap, ChangeMapError> {
        let p = path.display().to_string();
        let io = |err| ChangeMapError::Io { path: p.clone(), err };
        let invalid = |reason: String| ChangeMapError::Invalid { path: p.clone(), reason };
        if !block_bytes.is_power_of_two() || !(512..=(64 << 20)).contains(&block_bytes) {
            return Err(invalid(format!("block size {block_bytes} is not a power of two from 512 B to 64 MiB")));
        }
        let blocks = volume_bytes.div_ceil(block_bytes);
        let map_bytes = blocks.div_ceil(8).next_multiple_of(PAGE);
        let exists = path.exists();
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
        if !exists || file.metadata().map_err(io)?.len() == 0 {
            let mut h = vec![0u8; PAGE as usize];
            h[..8].copy_from_slice(MAGIC);
            h[8..12].copy_from_slice(&VERSION.to_le_bytes());
            h[12..16].copy_from_slice(&(block_bytes as u32).to_le_bytes());
            h[16..24].copy_from_slice(&volume_bytes.to_le_bytes());
            h[24..32].copy_from_slice(&volume_id.to_le_bytes());
            let crc = crc32c::crc32c(&h[..32]);
            h[32..36].copy_from_slice(&crc.to_le_bytes());
            file.set_len(BITMAP_AT + map_bytes).map_err(io)?;
            file.write_all_at(&h, 0).map_err(io)?;
            file.sync_all().map_err(io)?;
            if let Some(dir) = path.parent() {
                File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
            }
        }
        let len = file.metadata().map_err(io)?.len();
        if len < BITMAP_AT + map_bytes {
            return Err(invalid(format!(
                "{len} bytes: too short for a change map of this volume (bad magic or truncated)"
            )));
        }
        let mut h = [0u8; 36];
        file.read_exact_at(&mut h, 0).map_err(io)?;
        if &h[..8] != MAGIC {
            return Err(invalid("not a drv change map (bad magic)".into()));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().expect("4"));
        if version != VERSION {
            return Err(invalid(format!("version {version}, this drv reads version {VERSION}")));
        }
        let stored = u32::from_le_bytes(h[32..36].try_into().expect("4"));
        if crc32c::crc32c(&h[..32]) != stored {
            return Err(invalid("header checksum mismatch".into()));
        }
        let (bb, vb, vid) = (
            u32::from_le_bytes(h[12..16].try_into().expect("4")) as u64,
            u64::from_le_bytes(h[16..24].try_into().expect("8")),
            u64::from_le_bytes(h[24..32].try_into().expect("8")),
        );
        if (bb, vb, vid) != (block_bytes, volume_bytes, volume_id) {
            return Err(invalid(format!(
                "made for volume {vid} ({vb} bytes, {bb}-byte blocks), not volume {volume_id} ({volume_bytes} bytes, {block_bytes}-byte blocks)"
            )));
        }
        let mut bits = vec![0u8; map_bytes as usize];
        file.read_exact_at(&mut bits, BITMAP_AT).map_err(io)?;
        let m = ChangeMap { file, path: p, block_bytes, volume_bytes, bits: Mutex::new(bits), todo: Mutex::default() };
        m.reset_todo();
        Ok(m)
    }

    fn io(&self, err: std::io::Error) -> ChangeMapError {
        ChangeMapError::Io { path: self.path.clone(), err }
    }

    fn blocks_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let first = offset / self.block_bytes;
        let end = (offset + len.max(1)).div_ceil(self.block_bytes).min(self.volume_bytes.div_ceil(self.block_bytes));
        first..end.max(first)
    }

    /// Marks the blocks of `[offset, offset + len)` and makes the marks durable before returning.
    pub fn mark(&self, offset: u64, len: u64) -> Result<(), ChangeMapError> {
        let mut bits = self.bits.lock().expect("bits");
        self.todo.lock().expect("todo").blocks.extend(self.blocks_of(offset, len));
        let mut pages: Vec<u64> = Vec::new();
        for b in self.blocks_of(offset, len) {
            let (byte, bit) = ((b / 8) as usize, 1u8 << (b % 8));
            if bits[byte] & bit == 0 {
                bits[byte] |= bit;
                let page = byte as u64 / PAGE;
                if pages.last() != Some(&page) {
                    pages.push(page);
                }
            }
        }
        if pages.is_empty() {
            return Ok(()); // already durable
        }
        for p in &pages {
            let s = (p * PAGE) as usize;
            self.file.write_all_at(&bits[s..s + PAGE as usize], BITMAP_AT + p * PAGE).map_err(|e| self.io(e))?;
        }
        // Under the lock: a concurrent mark of the same page returns only after this sync.
        self.file.sync_data().map_err(|e| self.io(e))
    }

    /// Marks the blocks of every `(offset, len)` range with one `fdatasync` for all of them.
    pub fn mark_ranges(&self, ranges: &[(u64, u64)]) -> Result<(), ChangeMapError> {
        let mut bits = self.bits.lock().expect("bits");
        let mut pages = std::collections::BTreeSet::new();
        {
            let mut todo = self.todo.lock().expect("todo");
            for &(offset, len) in ranges {
                for b in self.blocks_of(offset, len) {
                    todo.blocks.insert(b);
                    let (byte, bit) = ((b / 8) as usize, 1u8 << (b % 8));
                    if bits[byte] & bit == 0 {
                        bits[byte] |= bit;
                        pages.insert(byte as u64 / PAGE);
                    }
                }
            }
        }
        if pages.is_empty() {
            return Ok(());
        }
        for p in &pages {
            let s = (p * PAGE) as usize;
            self.file.write_all_at(&bits[s..s + PAGE as usize], BITMAP_AT + p * PAGE).map_err(|e| self.io(e))?;
        }
        self.file.sync_data().map_err(|e| self.io(e))
    }

    /// The marked blocks as byte ranges `(offset, len)`, adjacent blocks merged, the last one cut
    /// at the volume's end.
    pub fn dirty_extents(&self) -> Vec<(u64, u64)> {
        extents(self.dirty_blocks(), self.block_bytes, self.volume_bytes)
    }

    /// Whether every block of `[offset, offset + len)` is marked already (no I/O).
    pub fn is_marked(&self, offset: u64, len: u64) -> bool {
        let bits = self.bits.lock().expect("bits");
        self.blocks_of(offset, len).all(|b| bits[(b / 8) as usize] & (1 << (b % 8)) != 0)
    }

    /// Marks every block of the volume, durably (an initial sync ships them all).
    pub fn mark_all(&self) -> Result<(), ChangeMapError> {
        let mut bits = self.bits.lock().expect("bits");
        let total = self.volume_bytes.div_ceil(self.block_bytes);
        for b in 0..total {
            bits[(b / 8) as usize] |= 1 << (b % 8);
        }
        self.todo.lock().expect("todo").blocks.extend(0..total);
        self.file.write_all_at(&bits, BITMAP_AT).map_err(|e| self.io(e))?;
        self.file.sync_data().map_err(|e| self.io(e))
    }

    /// Marks the blocks of a write about to go to the local disk without staging (durably, like
    /// [`ChangeMap::mark`]) and notes it in progress until [`ChangeMap::write_done`]: until then
    /// its blocks are never cleared as shipped.
    pub fn mark_write(&self, offset: u64, len: u64) -> Result<(), ChangeMapError> {
        {
            let mut todo = self.todo.lock().expect("todo");
            for b in self.blocks_of(offset, len) {
                *todo.writing.entry(b).or_default() += 1;
            }
        }
        let r = self.mark(offset, len);
        if r.is_err() {
            self.write_done(offset, len);
        }
        r
    }

    /// The local write of a [`ChangeMap::mark_write`] is done (or failed): its blocks are left to
    /// ship again, since a copy read while it ran may lack it.
    pub fn write_done(&self, offset: u64, len: u64) {
        let mut todo = self.todo.lock().expect("todo");
        for b in self.blocks_of(offset, len) {
            todo.blocks.insert(b);
            if let std::collections::btree_map::Entry::Occupied(mut e) = todo.writing.entry(b) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }

    /// Takes the blocks marked since the last take (a resync pass ships them).
    pub fn take_todo(&self) -> Vec<u64> {
        std::mem::take(&mut self.todo.lock().expect("todo").blocks).into_iter().collect()
    }

    /// Blocks marked since the last take.
    pub fn todo_len(&self) -> usize {
        self.todo.lock().expect("todo").blocks.len()
    }

    /// Blocks left to ship: everything the map has marked (after an interrupted pass; blocks
    /// already shipped and acknowledged were cleared by [`ChangeMap::clear_shipped`], so the next
    /// pass resumes where this one stopped).
    pub fn reset_todo(&self) {
        let all = self.dirty_blocks();
        self.todo.lock().expect("todo").blocks = all.into_iter().collect();
    }

    /// Clears, lazily, the blocks of `shipped` that staging acknowledged (durable in its log),
    /// except those marked again since they were taken or with a write in progress: the copy
    /// shipped may lack that write. A clear that a crash loses only ships a block again.
    pub fn clear_shipped(&self, shipped: &[u64]) -> Result<(), ChangeMapError> {
        let mut bits = self.bits.lock().expect("bits");
        let clear: Vec<u64> = {
            let todo = self.todo.lock().expect("todo");
            shipped.iter().copied().filter(|b| !todo.blocks.contains(b) && !todo.writing.contains_key(b)).collect()
        };
        self.clear_locked(&mut bits, &clear)
    }

    /// The marked blocks, in order.
    pub fn dirty_blocks(&self) -> Vec<u64> {
        let bits = self.bits.lock().expect("bits");
        let total = self.volume_bytes.div_ceil(self.block_bytes);
        let mut out = Vec::new();
        for (i, byte) in bits.iter().enumerate() {
            if *byte == 0 {
                continue;
            }
            for k in 0..8 {
                let b = i as u64 * 8 + k;
                if byte & (1 << k) != 0 && b < total {
                    out.push(b);
                }
            }
        }
        out
    }

    pub fn dirty_bytes(&self) -> u64 {
        let bits = self.bits.lock().expect("bits");
        bits.iter().map(|b| b.count_ones() as u64).sum::<u64>() * self.block_bytes
    }

    /// Clears the bits of `blocks` in memory and writes their pages without waiting for them to be
    /// stable: a clear that a crash loses only leaves an extra block marked.
    pub fn clear_lazily(&self, blocks: &[u64]) -> Result<(), ChangeMapError> {
        let mut bits = self.bits.lock().expect("bits");
        self.clear_locked(&mut bits, blocks)
    }

    fn clear_locked(&self, bits: &mut [u8], blocks: &[u64]) -> Result<(), ChangeMapError> {
        let mut pages: Vec<u64> = Vec::new();
        for &b in blocks {
            let (byte, bit) = ((b / 8) as usize, 1u8 << (b % 8));
            if bits[byte] & bit != 0 {
                bits[byte] &= !bit;
                let page = byte as u64 / PAGE;
                if !pages.contains(&page) {
                    pages.push(page);
                }
            }
        }
        for p in &pages {
            let s = (p * PAGE) as usize;
            self.file.write_all_at(&bits[s..s + PAGE as usize], BITMAP_AT + p * PAGE).map_err(|e| self.io(e))?;
        }
        Ok(())
    }

    /// Clears every bit, durably: call only when every marked block was shipped and acknowledged
    /// and no write is in progress.
    pub fn clear_all(&self) -> Result<(), ChangeMapError> {
        let mut bits = self.bits.lock().expect("bits");
        bits.iter_mut().for_each(|b| *b = 0);
        let mut todo = self.todo.lock().expect("todo");
        // A write in progress would lose its mark: its block may reach the disk without staging.
        assert!(
            todo.writing.is_empty(),
            "change map {}: cleared while {} blocks are being written",
            self.path,
            todo.writing.len()
        );
        todo.blocks.clear();
        drop(todo);
        self.file.write_all_at(&bits, BITMAP_AT).map_err(|e| self.io(e))?;
        self.file.sync_data().map_err(|e| self.io(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_reopen_and_clear_is_durable() {
        let dir = std::env::temp_dir().join(format!("drv-cmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("v.cmap");
        let _ = std::fs::remove_file(&p);
        let m = ChangeMap::open(&p, 7, 10 << 20, 64 << 10).unwrap();
        m.mark(0, 1).unwrap();
        m.mark((64 << 10) - 1, 2).unwrap(); // spans blocks 0 and 1
        m.mark(5 << 20, 200 << 10).unwrap(); // blocks 80..=83
        assert_eq!(m.dirty_blocks(), vec![0, 1, 80, 81, 82, 83]);
        drop(m);
        let m = ChangeMap::open(&p, 7, 10 << 20, 64 << 10).unwrap();
        assert_eq!(m.dirty_blocks(), vec![0, 1, 80, 81, 82, 83]);
        assert_eq!(m.dirty_bytes(), 6 * (64 << 10));
        m.clear_all().unwrap();
        drop(m);
        let m = ChangeMap::open(&p, 7, 10 << 20, 64 << 10).unwrap();
        assert!(m.dirty_blocks().is_empty());
        m.mark_ranges(&[(128 << 10, 1), (192 << 10, 64 << 10), ((10 << 20) - 1, 1)]).unwrap();
        drop(m);
        let m = ChangeMap::open(&p, 7, 10 << 20, 64 << 10).unwrap();
        assert_eq!(m.dirty_extents(), vec![(128 << 10, 128 << 10), ((10 << 20) - (64 << 10), 64 << 10)]);
        let e = ChangeMap::open(&p, 8, 10 << 20, 64 << 10).err().unwrap();
        assert!(e.to_string().contains("not volume 8"), "{e}");
        std::fs::write(&p, b"garbage").unwrap();
        let e = ChangeMap::open(&p, 7, 10 << 20, 64 << 10).err().unwrap();
        assert!(e.to_string().contains("bad magic"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn shipped_blocks_are_cleared_unless_written_again_or_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.cmap");
        let m = ChangeMap::open(&p, 1, 1 << 20, 4096).unwrap();
        m.mark_ranges(&[(0, 4 * 4096)]).unwrap(); // blocks 0..4
        let taken = m.take_todo();
        assert_eq!(taken, vec![0, 1, 2, 3]);
        // Block 1 is written again after it was taken (its shipped copy may be old); block 2 has
        // a write in progress (marked, local write not done).
        m.mark_write(4096, 10).unwrap();
        m.write_done(4096, 10);
        m.mark_write(2 * 4096, 10).unwrap();
        m.clear_shipped(&taken).unwrap();
        assert_eq!(m.dirty_blocks(), vec![1, 2]);
        // An interrupted pass resumes with what is left, not the whole map.
        m.reset_todo();
        assert_eq!(m.take_todo(), vec![1, 2]);
        m.write_done(2 * 4096, 10);
        assert_eq!(m.take_todo(), vec![2], "a finished write leaves its block to ship again");
        m.clear_shipped(&[1, 2]).unwrap();
        assert!(m.dirty_blocks().is_empty());
        drop(m);
        // The clears reached the file (lazily: no fdatasync, but written).
        let m = ChangeMap::open(&p, 1, 1 << 20, 4096).unwrap();
        assert!(m.dirty_blocks().is_empty());
    }
}
