//! Block storage under a WRL: preallocated files and raw block devices opened with `O_DIRECT`,
//! and the simulated storage used by the crash-state tests.
//!
//! A [`Storage`] is positional (`pread`/`pwrite`) and `Sync`: the committer writes while relay
//! readers read other offsets. Writes must be aligned to the WRL's `io_align`; the buffers come from
//! [`AlignedBuf`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Positional, syncable block storage.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Usable bytes.
    fn len(&self) -> u64;
    /// Whether the storage has no usable bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Writes all of `buf` at `offset`. Offset and length are multiples of the WRL's `io_align`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Fills all of `buf` from `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Makes every completed write durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
    /// A name for messages (the path).
    fn name(&self) -> String;
}

pub use drv_files::aligned::{AlignedBuf, BUF_ALIGN};

/// Why a file or device could not be opened or created.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The system call failed (names the path and the call).
    #[error("{what} {path}: {err}")]
    Io { what: &'static str, path: String, err: io::Error },
    /// Another process has it open for writing (names that process).
    #[error(transparent)]
    Locked(#[from] drv_files::LockError),
}

/// What the lock errors call a log device.
const WHAT: &str = "log device";

/// A preallocated file or a raw block device.
///
/// **One writer.** A `FileStorage` opened for writing holds an exclusive lock (`flock`) on the
/// device for as long as it lives, so no second process (a second staging server, an offline
/// tool) can open the same log for writing; one opened read-only takes a shared lock when it can,
/// and reports the writer that holds the device when it cannot (the log may then change while it
/// is read).
#[derive(Debug)]
pub struct FileStorage {
    path: PathBuf,
    /// Opened with `O_DIRECT` where the filesystem allows it; used for writes. It holds the lock.
    direct: File,
    /// Buffered descriptor for reads of unaligned lengths into ordinary buffers.
    buffered: File,
    len: u64,
    is_direct: bool,
}

impl FileStorage {
    /// Opens an existing file or block device for reading and writing, locked for this process.
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        let s = Self::open_mode(path, true)?;
        drv_files::lock_exclusive(&s.direct, WHAT, path)?;
        Ok(s)
    }

    /// Opens an existing file or block device for reading only. The second value names the
    /// process that has it open for writing, if one does (a running server): what is read then
    /// may change while it is read.
    pub fn open_read_only(path: &Path) -> Result<(Self, Option<String>), OpenError> {
        let s = Self::open_mode(path, false)?;
        let writer = match drv_files::lock_shared(&s.direct, WHAT, path) {
            Ok(()) => None,
            Err(e) if e.is_held() => Some(drv_files::holder(&s.direct)),
            Err(e) => return Err(e.into()),
        };
        Ok((s, writer))
    }

    fn open_mode(path: &Path, write: bool) -> Result<Self, OpenError> {
        let io = |what, err| OpenError::Io { what, path: path.display().to_string(), err };
        let buffered = OpenOptions::new().read(true).write(write).open(path).map_err(|e| io("open", e))?;
        // A block device opened for writing is also claimed from the kernel (O_EXCL): refused
        // while it is mounted or claimed by another program, and nothing mounts it meanwhile.
        let excl = if write && drv_files::is_block_device(&buffered) { libc::O_EXCL } else { 0 };
        let len = {
            use std::io::Seek;
            let mut f = &buffered;
            f.seek(io::SeekFrom::End(0)).map_err(|e| io("size of", e))?
        };
        let (direct, is_direct) =
            match OpenOptions::new().read(true).write(write).custom_flags(libc::O_DIRECT | excl).open(path) {
                Ok(f) => (f, true),
                // tmpfs and a few others refuse O_DIRECT; fdatasync still gives durability.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!(path = %path.display(), "O_DIRECT not supported here; using buffered writes");
                    (OpenOptions::new().read(true).write(write).open(path).map_err(|e| io("open", e))?, false)
                }
                Err(e) => return Err(io("open", drv_files::busy_device(e))),
            };
        Ok(FileStorage { path: path.to_owned(), direct, buffered, len, is_direct })
    }

    /// Creates a new file of `len` bytes and writes it full of zeros once, so later writes never
    /// allocate and `fdatasync` has no file metadata to flush. Refuses to overwrite an existing file.
    pub fn create_file(path: &Path, len: u64) -> Result<Self, OpenError> {
        let io = |what, err| OpenError::Io { what, path: path.display().to_string(), err };
        let f = OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| io("create", e))?;
        f.set_len(len).map_err(|e| io("set the size of", e))?;
        drop(f);
        let s = Self::open(path)?;
        let mut zeros = AlignedBuf::with_capacity(8 << 20);
        zeros.resize(8 << 20);
        let mut off = 0;
        while off < len {
            let n = (len - off).min(zeros.len() as u64) as usize;
            s.write_at(off, &zeros[..n]).map_err(|e| io("write zeros to", e))?;
            off += n as u64;
        }
        s.sync().map_err(|e| io("fdatasync", e))?;
        drv_files::sync_dir(path).map_err(|e| io("fsync the directory of", e))?;
        Ok(s)
    }

    pub fn is_direct(&self) -> bool {
        self.is_direct
    }
}

/// Creates the files `paths` (each `len` bytes, zeroed) and formats them with `format`, all under
/// temporary names; only when everything succeeded are they given their real names (the first
/// device last: it holds the meta block, so a crash between two renames leaves no file that looks
/// like a whole log). On failure the temporary files are removed: a failed start leaves nothing
/// that would block the next one.
pub fn create_files<E: From<OpenError>>(
    paths: &[&Path],
    len: u64,
    format: impl FnOnce(&[Arc<dyn Storage>]) -> Result<(), E>,
) -> Result<(), E> {
    let tmps: Vec<PathBuf> = paths.iter().map(|p| drv_files::temp_path(p)).collect();
    let r = (|| -> Result<(), E> {
        let devs: Vec<Arc<dyn Storage>> = tmps
            .iter()
            .zip(paths)
            .map(|(t, p)| match FileStorage::create_file(t, len) {
                Ok(s) => Ok(Arc::new(s) as Arc<dyn Storage>),
                // Named by the path the administrator configured, not the temporary one.
                Err(OpenError::Io { what, err, .. }) => Err(OpenError::Io { what, path: p.display().to_string(), err }),
                Err(e) => Err(e),
            })
            .collect::<Result<_, _>>()?;
        format(&devs)?;
        drop(devs);
        for (tmp, path) in tmps.iter().zip(paths).rev() {
            drv_files::install(tmp, path).map_err(|err| OpenError::Io {
                what: "give its name to",
                path: path.display().to_string(),
                err,
            })?;
        }
        Ok(())
    })();
    if r.is_err() {
        for t in &tmps {
            let _ = std::fs::remove_file(t);
        }
    }
    r
}

impl Storage for FileStorage {
    fn len(&self) -> u64 {
        self.len
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.direct.write_all_at(buf, offset)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // Aligned reads into aligned memory go around the page cache (one DMA, no copy).
        let aligned = self.is_direct
            && offset.is_multiple_of(BUF_ALIGN as u64)
            && buf.len().is_multiple_of(BUF_ALIGN)
            && (buf.as_ptr() as usize).is_multiple_of(BUF_ALIGN);
        if aligned { self.direct.read_exact_at(buf, offset) } else { self.buffered.read_exact_at(buf, offset) }
    }
    fn sync(&self) -> io::Result<()> {
        self.direct.sync_data()
    }
    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

pub mod sim {
    //! Simulated storage for crash-state enumeration: every write and sync of every device goes into
    //! one global trace, and [`SimWorld::crash_image`] rebuilds what a device could hold after a
    //! power failure at any point of that trace, with unsynced writes kept, lost or torn per sector.

    use super::Storage;
    use std::io;
    use std::sync::{Arc, Mutex};

    pub const SECTOR: usize = 512;

    #[derive(Clone, Debug)]
    pub enum Op {
        Write { device: usize, offset: u64, data: Arc<Vec<u8>> },
        Sync { device: usize },
    }

    #[derive(Debug, Default)]
    pub struct SimWorld {
        pub initial: Vec<Vec<u8>>,
        /// Current contents as a reader sees them (every completed write).
        pub current: Vec<Vec<u8>>,
        pub trace: Vec<Op>,
        /// Fail the write or sync with this trace index (I/O error injection).
        pub fail_at: Option<usize>,
        /// The first write at or after this trace index lands at the other offset of the same
        /// device instead, and reports success (a misdirected write, as a firmware bug makes it).
        pub misdirect_at: Option<(usize, u64)>,
    }

    /// What happens to one unsynced write at the crash.
    #[derive(Clone, Copy, Debug)]
    pub enum Fate {
        Lost,
        Kept,
        /// Each sector is kept when the bit of `mask` for (sector index % 64) is set.
        Torn(u64),
    }

    impl SimWorld {
        pub fn new(device_bytes: &[u64]) -> Arc<Mutex<SimWorld>> {
            let initial: Vec<Vec<u8>> = device_bytes.iter().map(|n| vec![0u8; *n as usize]).collect();
            Arc::new(Mutex::new(SimWorld { current: initial.clone(), initial, ..SimWorld::default() }))
        }

        /// Starts a new run from the given images (the result of a crash), with an empty trace.
        pub fn from_images(images: Vec<Vec<u8>>) -> Arc<Mutex<SimWorld>> {
            Arc::new(Mutex::new(SimWorld { current: images.clone(), initial: images, ..SimWorld::default() }))
        }

        /// Folds the part of the trace every later crash keeps whole (everything before the oldest
        /// write not yet synced) into the initial images, so a long run's trace stays short.
        pub fn compact(&mut self) {
            let keep_from = self.unsynced_writes(self.trace.len()).first().copied().unwrap_or(self.trace.len());
            for op in self.trace.drain(..keep_from) {
                if let Op::Write { device, offset, data } = op {
                    let off = offset as usize;
                    self.initial[device][off..off + data.len()].copy_from_slice(&data);
                }
            }
            self.fail_at = self.fail_at.and_then(|f| f.checked_sub(keep_from));
            self.misdirect_at = self.misdirect_at.map(|(i, to)| (i.saturating_sub(keep_from), to));
        }

        /// The indices of unsynced writes at crash point `at` (a crash before trace op `at`).
        pub fn unsynced_writes(&self, at: usize) -> Vec<usize> {
            let mut pending: Vec<Vec<usize>> = vec![Vec::new(); self.initial.len()];
            for (i, op) in self.trace[..at].iter().enumerate() {
                match op {
                    Op::Write { device, .. } => pending[*device].push(i),
                    Op::Sync { device } => pending[*device].clear(),
                }
            }
            let mut all: Vec<usize> = pending.into_iter().flatten().collect();
            all.sort_unstable();
            all
        }

        /// The device images after a crash before trace op `at`. `fate(i)` decides what happened to
        /// unsynced write `i`; synced writes are always kept.
        pub fn crash_image(&self, at: usize, fate: &dyn Fn(usize) -> Fate) -> Vec<Vec<u8>> {
            let unsynced = self.unsynced_writes(at);
            let mut images = self.initial.clone();
            for (i, op) in self.trace[..at].iter().enumerate() {
                let Op::Write { device, offset, data } = op else { continue };
                let f = if unsynced.binary_search(&i).is_ok() { fate(i) } else { Fate::Kept };
                let img = &mut images[*device];
                let off = *offset as usize;
                match f {
                    Fate::Lost => {}
                    Fate::Kept => img[off..off + data.len()].copy_from_slice(data),
                    Fate::Torn(mask) => {
                        for (s, chunk) in data.chunks(SECTOR).enumerate() {
                            if mask & (1 << (s % 64)) != 0 {
                                let o = off + s * SECTOR;
                                img[o..o + chunk.len()].copy_from_slice(chunk);
                            }
                        }
                    }
                }
            }
            images
        }
    }

    /// One device of a [`SimWorld`].
    #[derive(Debug, Clone)]
    pub struct SimStorage {
        world: Arc<Mutex<SimWorld>>,
        device: usize,
    }

    impl SimStorage {
        pub fn new(world: Arc<Mutex<SimWorld>>, device: usize) -> Self {
            SimStorage { world, device }
        }
        /// One storage per device of the world.
        pub fn all(world: &Arc<Mutex<SimWorld>>) -> Vec<Arc<dyn Storage>> {
            let n = world.lock().expect("sim lock").initial.len();
            (0..n).map(|d| Arc::new(SimStorage::new(world.clone(), d)) as Arc<dyn Storage>).collect()
        }
    }

    fn injected() -> io::Error {
        io::Error::other("simulated I/O error")
    }

    impl Storage for SimStorage {
        fn len(&self) -> u64 {
            self.world.lock().expect("sim lock").current[self.device].len() as u64
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
            let mut w = self.world.lock().expect("sim lock");
            if w.fail_at == Some(w.trace.len()) {
                return Err(injected());
            }
            assert!((offset as usize).is_multiple_of(SECTOR) && buf.len().is_multiple_of(SECTOR), "unaligned write");
            let mut offset = offset;
            if let Some((at, to)) = w.misdirect_at
                && w.trace.len() >= at
            {
                w.misdirect_at = None;
                let len = w.current[self.device].len() as u64;
                offset = (to % (len - buf.len() as u64 + 1)) / SECTOR as u64 * SECTOR as u64;
            }
            let off = offset as usize;
            w.current[self.device][off..off + buf.len()].copy_from_slice(buf);
            w.trace.push(Op::Write { device: self.device, offset, data: Arc::new(buf.to_vec()) });
            Ok(())
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let w = self.world.lock().expect("sim lock");
            let img = &w.current[self.device];
            let off = offset as usize;
            if off + buf.len() > img.len() {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            buf.copy_from_slice(&img[off..off + buf.len()]);
            Ok(())
        }
        fn sync(&self) -> io::Result<()> {
            let mut w = self.world.lock().expect("sim lock");
            if w.fail_at == Some(w.trace.len()) {
                return Err(injected());
            }
            w.trace.push(Op::Sync { device: self.device });
            Ok(())
        }
        fn name(&self) -> String {
            format!("sim{}", self.device)
        }
    }
}
