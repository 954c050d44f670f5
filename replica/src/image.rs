//! What an export or a mount of a snapshot reads and writes: the snapshot's image ([`SnapImage`],
//! read from the snapshot store while replication goes on) and, when writable, a private overlay
//! on top ([`Overlay`]): a failover test can write, even `fsck -y`, without changing the snapshot
//! or the replica.
//!
//! **The overlay.** A sparse file in `DATA/overlays/`, unlinked as soon as it is open (nothing is
//! left behind by a crash), and a bitmap in memory of its 4 KiB blocks that hold written data.
//! A read takes each block from the overlay when its bit is set, else from the snapshot. A write
//! that covers only part of a block not yet in the overlay first copies the snapshot's block
//! there, so the overlay's blocks are always whole. Writes are serialized (one at a time holds the
//! bitmap); reads run beside them. It lives as long as its export or mount: a replica restart or
//! `unmount` discards it, and FLUSH promises nothing more (a test's writes are not kept).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::apply::ReplicaVolume;
use crate::snapshot::Snapshots;

/// The overlay's unit: a block of the overlay holds written data or not at all.
pub const OVERLAY_BLOCK: u64 = 4096;

/// A snapshot's image.
pub struct SnapImage {
    pub snaps: Arc<Snapshots>,
    pub v: Arc<ReplicaVolume>,
    pub name: String,
    pub seq: u64,
    /// A descriptor of the target of this image's own (one NBD client's: the kernel's readahead
    /// follows each client's sequential reads apart); `None`: the volume's.
    target: Option<File>,
}

impl SnapImage {
    pub fn new(snaps: Arc<Snapshots>, v: Arc<ReplicaVolume>, name: &str, seq: u64) -> SnapImage {
        SnapImage { snaps, v, name: name.to_owned(), seq, target: None }
    }

    /// Reads `buf.len()` bytes at `offset`, while a snapshot pins its position (the replica
    /// deletes an `auto-resync-` one itself when its run ends: its blocks may then be reused).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let target = self.target.as_ref().unwrap_or(self.v.target());
        self.snaps
            .read_from(&self.v, target, self.seq, offset, buf)
            .map_err(|e| format!("snapshot {} of {}: {e}", self.name, self.v.name))
    }

    /// The same image with a descriptor of the target of its own (opened again through
    /// `/proc/self/fd`: the same file, even renamed).
    fn reopened(&self) -> Result<SnapImage, String> {
        use std::os::fd::AsRawFd;
        let path = format!("/proc/self/fd/{}", self.v.target().as_raw_fd());
        let target = File::open(&path).map_err(|e| format!("open the target of {} again: {e}", self.v.name))?;
        let (snaps, v) = (self.snaps.clone(), self.v.clone());
        Ok(SnapImage { snaps, v, name: self.name.clone(), seq: self.seq, target: Some(target) })
    }
}

/// An overlay: written blocks, in a sparse file; private (in memory, discarded) or persistent
/// (a failover's: the blocks it holds are kept in a change map).
pub struct Overlay {
    file: File,
    /// One bit per [`OVERLAY_BLOCK`]: set when the overlay holds the block. Writers hold it for
    /// their whole write.
    written: Mutex<Vec<u64>>,
    /// A persistent overlay's record of the blocks it holds (blocks of [`OVERLAY_BLOCK`]).
    map: Option<drv_changemap::ChangeMap>,
}

fn bit(bits: &[u64], b: u64) -> bool {
    bits[(b / 64) as usize] & (1 << (b % 64)) != 0
}

impl Overlay {
    /// A new, empty overlay for an image of `size` bytes, in directory `dir`.
    pub fn create(dir: &Path, size: u64) -> Result<Overlay, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let file = tempfile_in(dir)?;
        file.set_len(size).map_err(|e| format!("size the overlay in {}: {e}", dir.display()))?;
        let blocks = size.div_ceil(OVERLAY_BLOCK);
        Ok(Overlay { file, written: Mutex::new(vec![0; blocks.div_ceil(64) as usize]), map: None })
    }

    /// A persistent overlay: its data in `data` (a sparse file of `size` bytes) and the blocks it
    /// holds in the change map `map` (created empty, or reopened with what it holds).
    ///
    /// Crash analysis: a block is marked in the map only after the overlay holds the whole block
    /// durably (its first write copies the snapshot's block in when it covers only part of it,
    /// then `fdatasync`, then the durable mark), so after a crash a marked block reads its last
    /// written data (flushed, or as a disk would) and an unmarked one the snapshot's.
    pub fn persistent(data: &Path, map: &Path, volume_id: u64, size: u64) -> Result<Overlay, String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(data)
            .map_err(|e| format!("open {}: {e}", data.display()))?;
        file.set_len(size).map_err(|e| format!("size {}: {e}", data.display()))?;
        let map = drv_changemap::ChangeMap::open(map, volume_id, size, OVERLAY_BLOCK).map_err(|e| e.to_string())?;
        let mut bits = vec![0u64; size.div_ceil(OVERLAY_BLOCK).div_ceil(64) as usize];
        for (offset, len) in map.dirty_extents() {
            for b in offset / OVERLAY_BLOCK..(offset + len).div_ceil(OVERLAY_BLOCK) {
                bits[(b / 64) as usize] |= 1 << (b % 64);
            }
        }
        Ok(Overlay { file, written: Mutex::new(bits), map: Some(map) })
    }

    /// Makes the overlay's writes durable (a persistent one's; a private one has nothing to keep).
    pub fn flush(&self) -> Result<(), String> {
        match &self.map {
            Some(_) => self.file.sync_data().map_err(|e| format!("sync the overlay: {e}")),
            None => Ok(()),
        }
    }

    /// Reads `buf.len()` bytes at `offset`: written blocks from the overlay, the rest from
    /// `base`.
    pub fn read(
        &self,
        offset: u64,
        buf: &mut [u8],
        base: impl Fn(u64, &mut [u8]) -> Result<(), String>,
    ) -> Result<(), String> {
        let end = offset + buf.len() as u64;
        // Runs of blocks from one source: (start, end, from the overlay).
        let mut runs = Vec::new();
        {
            let bits = self.written.lock().expect("overlay");
            let mut pos = offset;
            while pos < end {
                let ours = bit(&bits, pos / OVERLAY_BLOCK);
                let mut stop = ((pos / OVERLAY_BLOCK + 1) * OVERLAY_BLOCK).min(end);
                while stop < end && bit(&bits, stop / OVERLAY_BLOCK) == ours {
                    stop = ((stop / OVERLAY_BLOCK + 1) * OVERLAY_BLOCK).min(end);
                }
                runs.push((pos, stop, ours));
                pos = stop;
            }
        }
        for (start, stop, ours) in runs {
            let part = &mut buf[(start - offset) as usize..(stop - offset) as usize];
            if ours {
                self.file.read_exact_at(part, start).map_err(|e| format!("read the overlay at {start}: {e}"))?;
            } else {
                base(start, part)?;
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset` of an image of `size` bytes whose blocks not yet written come
    /// from `base`.
    pub fn write(
        &self,
        offset: u64,
        data: &[u8],
        size: u64,
        base: impl Fn(u64, &mut [u8]) -> Result<(), String>,
    ) -> Result<(), String> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        assert!(end <= size, "a write past the end of the image");
        let mut bits = self.written.lock().expect("overlay");
        let (first, last) = (offset / OVERLAY_BLOCK, (end - 1) / OVERLAY_BLOCK);
        for b in if first == last { vec![first] } else { vec![first, last] } {
            let (bstart, bend) = (b * OVERLAY_BLOCK, ((b + 1) * OVERLAY_BLOCK).min(size));
            let whole = offset <= bstart && end >= bend;
            if !whole && !bit(&bits, b) {
                let mut block = vec![0u8; (bend - bstart) as usize];
                base(bstart, &mut block)?;
                self.file.write_all_at(&block, bstart).map_err(|e| format!("write the overlay at {bstart}: {e}"))?;
            }
        }
        self.file.write_all_at(data, offset).map_err(|e| format!("write the overlay at {offset}: {e}"))?;
        if let Some(map) = &self.map
            && (first..=last).any(|b| !bit(&bits, b))
        {
            // The new blocks are whole in the overlay: durable first, then marked.
            self.file.sync_data().map_err(|e| format!("sync the overlay: {e}"))?;
            map.mark(first * OVERLAY_BLOCK, (last - first + 1) * OVERLAY_BLOCK).map_err(|e| e.to_string())?;
        }
        for b in first..=last {
            bits[(b / 64) as usize] |= 1 << (b % 64);
        }
        Ok(())
    }

    /// Bytes the overlay holds.
    pub fn bytes(&self) -> u64 {
        let bits = self.written.lock().expect("overlay");
        bits.iter().map(|w| u64::from(w.count_ones())).sum::<u64>() * OVERLAY_BLOCK
    }
}

/// An unlinked file in `dir`, opened for reading and writing.
fn tempfile_in(dir: &Path) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .map_err(|e| format!("an overlay file in {}: {e}", dir.display()))
}

/// An export's or a mount's image: a snapshot, with a private overlay when writable.
pub struct View {
    pub base: SnapImage,
    /// Shared by every NBD client's view of one export.
    pub overlay: Option<Arc<Overlay>>,
}

impl View {
    pub fn size(&self) -> u64 {
        self.base.v.size_bytes
    }

    pub fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    /// Reads `buf.len()` bytes at `offset`: written blocks from the overlay, the rest from the
    /// snapshot.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        match &self.overlay {
            Some(o) => o.read(offset, buf, |at, b| self.base.read(at, b)),
            None => self.base.read(offset, buf),
        }
    }

    /// Writes `data` at `offset` into the overlay (refused on a read-only view).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        let Some(o) = &self.overlay else { return Err("a read-only snapshot image".into()) };
        o.write(offset, data, self.size(), |at, b| self.base.read(at, b))
    }

    /// Makes the writes durable (a persistent overlay's; a private one is discarded anyway).
    pub fn flush(&self) -> Result<(), String> {
        self.overlay.as_ref().map_or(Ok(()), |o| o.flush())
    }
}

impl drv_userdev::nbd::Image for View {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        View::read(self, offset, buf)
    }

    fn for_client(&self) -> Option<Arc<dyn drv_userdev::nbd::Image>> {
        match self.base.reopened() {
            Ok(base) => Some(Arc::new(View { base, overlay: self.overlay.clone() })),
            Err(e) => {
                tracing::warn!("{e}; this NBD client reads through the volume's descriptor");
                None
            }
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        View::write(self, offset, data)
    }

    fn flush(&self) -> Result<(), String> {
        View::flush(self)
    }

    fn label(&self) -> String {
        format!("{}@{}", self.base.v.name, self.base.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Through any sequence of writes and reads at any alignment, the overlay over a base
        /// image reads like a plain copy of the image with the writes applied, and the base is
        /// never written.
        #[test]
        fn overlay_reads_like_a_written_copy(
            size in 1u64..40_000,
            ops in proptest::collection::vec((any::<bool>(), 0u64..40_000, 0usize..9_000, any::<u8>()), 1..40),
        ) {
            let base: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            let read_base = |at: u64, b: &mut [u8]| {
                b.copy_from_slice(&base[at as usize..at as usize + b.len()]);
                Ok(())
            };
            let dir = tempfile::tempdir().unwrap();
            let o = Overlay::create(dir.path(), size).unwrap();
            let mut model = base.clone();
            for (write, at, len, fill) in ops {
                let at = at % size;
                let len = len.min((size - at) as usize);
                if write {
                    let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
                    o.write(at, &data, size, read_base).unwrap();
                    model[at as usize..at as usize + len].copy_from_slice(&data);
                } else {
                    let mut b = vec![0u8; len];
                    o.read(at, &mut b, read_base).unwrap();
                    prop_assert_eq!(&b[..], &model[at as usize..at as usize + len]);
                }
            }
            let mut all = vec![0u8; size as usize];
            o.read(0, &mut all, read_base).unwrap();
            prop_assert_eq!(all, model);
            prop_assert!(base.iter().enumerate().all(|(i, &x)| x == (i as u64 * 7 % 251) as u8));
        }
    }

    /// A persistent overlay reopened (as after a restart) reads what was written before, and only
    /// its written blocks are marked in its change map.
    #[test]
    fn a_persistent_overlay_keeps_its_writes_and_marks_only_their_blocks() {
        let size = 100_000u64;
        let base: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let read_base = |at: u64, b: &mut [u8]| {
            b.copy_from_slice(&base[at as usize..at as usize + b.len()]);
            Ok(())
        };
        let dir = tempfile::tempdir().unwrap();
        let (data, map) = (dir.path().join("o"), dir.path().join("m"));
        let mut model = base.clone();
        {
            let o = Overlay::persistent(&data, &map, 7, size).unwrap();
            o.write(5000, &[0xaa; 10_000], size, read_base).unwrap();
            o.write(99_990, &[0xbb; 10], size, read_base).unwrap();
            o.flush().unwrap();
        }
        model[5000..15_000].fill(0xaa);
        model[99_990..].fill(0xbb);
        let o = Overlay::persistent(&data, &map, 7, size).unwrap();
        let mut all = vec![0u8; size as usize];
        o.read(0, &mut all, read_base).unwrap();
        assert!(all == model);
        let m = drv_changemap::ChangeMap::open(&map, 7, size, OVERLAY_BLOCK).unwrap();
        assert_eq!(m.dirty_extents(), vec![(4096, 12_288), (98_304, 1696)]);
    }
}
