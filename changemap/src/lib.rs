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

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

pub mod marks;

use marks::PAGE;
pub use marks::{Bits, Todo};

const MAGIC: &[u8; 8] = b"DRVCMAP\x01";
const VERSION: u32 = 1;
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
    /// Held while its pages are written and synced (lock order: `bits`, then `todo`).
    bits: Mutex<Bits>,
    todo: Mutex<Todo>,
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
        let map_bytes = Bits::map_bytes(volume_bytes, block_bytes);
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
        let bits = Bits::from_bytes(bits, volume_bytes, block_bytes);
        let m = ChangeMap { file, path: p, block_bytes, volume_bytes, bits: Mutex::new(bits), todo: Mutex::default() };
        m.reset_todo();
        Ok(m)
    }

    fn io(&self, err: std::io::Error) -> ChangeMapError {
        ChangeMapError::Io { path: self.path.clone(), err }
    }

    fn blocks_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        marks::blocks_of(offset, len, self.block_bytes, self.volume_bytes.div_ceil(self.block_bytes))
    }

    /// Writes the pages `pages` of `bits` (under its lock).
    fn write_pages(&self, bits: &Bits, pages: &BTreeSet<u64>) -> Result<(), ChangeMapError> {
        for &p in pages {
            self.file.write_all_at(bits.page(p), BITMAP_AT + p * PAGE).map_err(|e| self.io(e))?;
        }
        Ok(())
    }

    /// Marks the blocks of `[offset, offset + len)` and makes the marks durable before returning.
    pub fn mark(&self, offset: u64, len: u64) -> Result<(), ChangeMapError> {
        self.mark_ranges(&[(offset, len)])
    }

    /// Marks the blocks of every `(offset, len)` range with one `fdatasync` for all of them.
    pub fn mark_ranges(&self, ranges: &[(u64, u64)]) -> Result<(), ChangeMapError> {
        let mut bits = self.bits.lock().expect("bits");
        let mut pages = BTreeSet::new();
        {
            let mut todo = self.todo.lock().expect("todo");
            for &(offset, len) in ranges {
                todo.marked(self.blocks_of(offset, len));
                bits.set(self.blocks_of(offset, len), &mut pages);
            }
        }
        if pages.is_empty() {
            return Ok(()); // already durable
        }
        self.write_pages(&bits, &pages)?;
        // Under the lock: a concurrent mark of the same page returns only after this sync.
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
        self.blocks_of(offset, len).all(|b| bits.is_set(b))
    }

    /// Marks every block of the volume, durably (an initial sync ships them all).
    pub fn mark_all(&self) -> Result<(), ChangeMapError> {
        let mut bits = self.bits.lock().expect("bits");
        let all = 0..bits.blocks();
        self.todo.lock().expect("todo").marked(all.clone());
        bits.set(all, &mut BTreeSet::new());
        self.file.write_all_at(bits.as_bytes(), BITMAP_AT).map_err(|e| self.io(e))?;
        self.file.sync_data().map_err(|e| self.io(e))
    }

    /// Marks the blocks of a write about to go to the local disk without staging (durably, like
    /// [`ChangeMap::mark`]) and notes it in progress until [`ChangeMap::write_done`]: until then
    /// its blocks are never cleared as shipped.
    pub fn mark_write(&self, offset: u64, len: u64) -> Result<(), ChangeMapError> {
        self.todo.lock().expect("todo").write_begins(self.blocks_of(offset, len));
        let r = self.mark(offset, len);
        if r.is_err() {
            self.write_done(offset, len);
        }
        r
    }

    /// The local write of a [`ChangeMap::mark_write`] is done (or failed): its blocks are left to
    /// ship again, since a copy read while it ran may lack it.
    pub fn write_done(&self, offset: u64, len: u64) {
        self.todo.lock().expect("todo").write_done(self.blocks_of(offset, len));
    }

    /// Takes the blocks marked since the last take (a resync pass ships them).
    pub fn take_todo(&self) -> Vec<u64> {
        self.todo.lock().expect("todo").take()
    }

    /// Blocks marked since the last take.
    pub fn todo_len(&self) -> usize {
        self.todo.lock().expect("todo").len()
    }

    /// Blocks left to ship: everything the map has marked (after an interrupted pass; blocks
    /// already shipped and acknowledged were cleared by [`ChangeMap::clear_shipped`], so the next
    /// pass resumes where this one stopped).
    pub fn reset_todo(&self) {
        let all = self.dirty_blocks();
        self.todo.lock().expect("todo").reset(all);
    }

    /// Clears, lazily, the blocks of `shipped` that staging acknowledged (durable in its log),
    /// except those marked again since they were taken or with a write in progress: the copy
    /// shipped may lack that write. A clear that a crash loses only ships a block again.
    pub fn clear_shipped(&self, shipped: &[u64]) -> Result<(), ChangeMapError> {
        let mut bits = self.bits.lock().expect("bits");
        let clear = self.todo.lock().expect("todo").clearable(shipped);
        self.clear_locked(&mut bits, &clear)
    }

    /// The marked blocks, in order.
    pub fn dirty_blocks(&self) -> Vec<u64> {
        self.bits.lock().expect("bits").marked()
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.bits.lock().expect("bits").marked_bytes()
    }

    /// Clears the bits of `blocks` in memory and writes their pages without waiting for them to be
    /// stable: a clear that a crash loses only leaves an extra block marked.
    pub fn clear_lazily(&self, blocks: &[u64]) -> Result<(), ChangeMapError> {
        let mut bits = self.bits.lock().expect("bits");
        self.clear_locked(&mut bits, blocks)
    }

    fn clear_locked(&self, bits: &mut Bits, blocks: &[u64]) -> Result<(), ChangeMapError> {
        let mut pages = BTreeSet::new();
        bits.clear(blocks, &mut pages);
        self.write_pages(bits, &pages)
    }

    /// Clears every bit, durably: call only when every marked block was shipped and acknowledged
    /// and no write is in progress.
    pub fn clear_all(&self) -> Result<(), ChangeMapError> {
        let mut bits = self.bits.lock().expect("bits");
        bits.clear_all();
        self.todo.lock().expect("todo").clear_all(&format!("change map {}", self.path));
        self.file.write_all_at(bits.as_bytes(), BITMAP_AT).map_err(|e| self.io(e))?;
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
