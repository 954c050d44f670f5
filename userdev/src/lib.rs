//! A block device served from userspace on a stock kernel: one file in a FUSE mount, and a loop
//! device (direct I/O) bound to it. The agent serves its protected volume this way
//! (`drv attach --mode user`, writes held until staging has them), the replica its snapshots
//! (`drv snapshot mount`), and `drv restore` the target it fills.
//!
//! ```text
//!  application ─► /dev/loopN (direct I/O) ─► FUSE file STATE/fuse/volume ─► a Backend
//! ```
//!
//! - The FUSE file is opened with `FOPEN_DIRECT_IO` (never a page cache between the loop device
//!   and the backend) and `FOPEN_PARALLEL_DIRECT_WRITES` with `FUSE_ASYNC_DIO`, so the loop
//!   device's queue depth reaches the backend.
//! - The loop device turns a block FLUSH (and the post-flush of a FUA write: loop announces no
//!   FUA) into `fsync` of its backing file, which FUSE delivers as `FSYNC`: [`Backend::fsync`].
//! - A read-only device is a read-only loop device over a file whose writes fail with `EROFS`.
//!
//! **Crash of the serving process.** The kernel aborts the FUSE connection: every request in
//! flight and every later one to the loop device fails with EIO; nothing reaches the backend's
//! storage behind its back. The marker `STATE/user-attached` names the loop device; [`recover`]
//! detaches it (only if its backing file is still this state directory's FUSE file) and lazily
//! unmounts the dead FUSE mount.

pub mod nbd;

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags, KernelConfig, LockOwner,
    MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};

/// The file's name inside the FUSE mount.
pub const FILE_NAME: &str = "volume";
/// The marker of an attached userspace device, in its state directory.
pub const MARKER: &str = "user-attached";
/// Largest FUSE write: a whole loop request of up to 1 MiB arrives as one write.
const MAX_WRITE: u32 = 1 << 20;
const FILE_INO: u64 = 2;
const TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("{what}: {err}")]
    Io { what: String, err: io::Error },
    #[error("losetup {args}: {message}")]
    Losetup { args: String, message: String },
    #[error(
        "{dev} is in use (a mounted filesystem or an open program): unmount it and close every program using it, then detach again"
    )]
    Busy { dev: String },
    #[error("this host cannot serve a userspace device: {0} (`drv doctor` lists the capture paths it supports)")]
    Unsupported(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> UserError {
    let what = what.into();
    move |err| UserError::Io { what, err }
}

/// What `STATE/user-attached` records: the loop device bound, over which FUSE file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Marker {
    pub loop_dev: PathBuf,
    pub backing: PathBuf,
}

/// Counters of the FUSE server (a request counts when it is answered).
#[derive(Debug, Default)]
pub struct UserStats {
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub reads: AtomicU64,
    pub failed: AtomicU64,
}

/// What serves the device's bytes. Each call gets the FUSE reply to answer, from any thread and
/// at any time (the FUSE threads must not wait on slow work: hand it to a pool and answer there).
/// Requests never reach past the device's size.
pub trait Backend: Send + Sync + 'static {
    fn read(&self, offset: u64, len: usize, reply: ReadReply);
    /// Never called on a read-only device.
    fn write(&self, offset: u64, data: &[u8], reply: Done);
    /// Makes every write answered so far durable.
    fn fsync(&self, reply: Done);
}

/// Any NBD [`nbd::Image`] as a device: each request on the blocking pool of `rt` (an image read
/// may wait for its storage; the FUSE threads must not).
pub struct ImageBackend {
    pub image: Arc<dyn nbd::Image>,
    pub rt: tokio::runtime::Handle,
}

impl Backend for ImageBackend {
    fn read(&self, offset: u64, len: usize, reply: ReadReply) {
        let image = self.image.clone();
        self.rt.spawn_blocking(move || {
            let mut b = vec![0u8; len];
            match image.read(offset, &mut b) {
                Ok(()) => reply.data(&b),
                Err(e) => {
                    tracing::error!(image = %image.label(), offset, "device read: {e}");
                    reply.error(libc::EIO)
                }
            }
        });
    }

    fn write(&self, offset: u64, data: &[u8], reply: Done) {
        let (image, data) = (self.image.clone(), data.to_vec());
        self.rt.spawn_blocking(move || match image.write(offset, &data) {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing::error!(image = %image.label(), offset, "device write: {e}");
                reply.error(libc::EIO)
            }
        });
    }

    fn fsync(&self, reply: Done) {
        let image = self.image.clone();
        self.rt.spawn_blocking(move || match image.flush() {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing::error!(image = %image.label(), "device flush: {e}");
                reply.error(libc::EIO)
            }
        });
    }
}

/// The answer to a read.
pub struct ReadReply {
    reply: ReplyData,
    stats: Arc<UserStats>,
}

impl ReadReply {
    pub fn data(self, b: &[u8]) {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.reply.data(b)
    }

    /// Fails the read with `errno` (EIO, say).
    pub fn error(self, errno: i32) {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        self.reply.error(Errno::from_i32(errno))
    }
}

enum DoneKind {
    Write(ReplyWrite, u32),
    Fsync(ReplyEmpty),
}

/// The answer to a write or an fsync.
pub struct Done {
    kind: DoneKind,
    stats: Arc<UserStats>,
}

impl Done {
    pub fn ok(self) {
        match self.kind {
            DoneKind::Write(r, n) => {
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
                r.written(n)
            }
            DoneKind::Fsync(r) => {
                self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                r.ok()
            }
        }
    }

    pub fn error(self, errno: i32) {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        match self.kind {
            DoneKind::Write(r, _) => r.error(Errno::from_i32(errno)),
            DoneKind::Fsync(r) => r.error(Errno::from_i32(errno)),
        }
    }
}

/// The FUSE file system: one directory with one file, the device's image.
struct DeviceFs<B: Backend> {
    backend: B,
    size: u64,
    read_only: bool,
    stats: Arc<UserStats>,
    uid: u32,
    gid: u32,
}

impl<B: Backend> DeviceFs<B> {
    fn attr(&self, ino: u64) -> FileAttr {
        let now = SystemTime::now();
        let file_perm = if self.read_only { 0o400 } else { 0o600 };
        let (kind, size, perm, nlink) = if ino == FILE_INO {
            (FileType::RegularFile, self.size, file_perm, 1)
        } else {
            (FileType::Directory, 0, 0o700, 2)
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }
}

impl<B: Backend> Filesystem for DeviceFs<B> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Each is best effort: an older kernel keeps its smaller limits, and still works.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_background(128);
        let _ = config.set_congestion_threshold(96);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if u64::from(parent) == 1 && name == FILE_NAME {
            reply.entry(&TTL, &self.attr(FILE_INO), fuser::Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match u64::from(ino) {
            1 | FILE_INO => reply.attr(&TTL, &self.attr(u64::from(ino))),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The device's size is fixed; times and modes are not kept.
        if size.is_some_and(|s| s != self.size) {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &self.attr(u64::from(ino)));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if u64::from(ino) != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only && flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // Never a page cache between the loop device and the backend; writes to different
        // ranges in parallel (the backend orders overlapping ones).
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let len = (size as u64).min(self.size.saturating_sub(offset)) as usize;
        self.backend.read(offset, len, ReadReply { reply, stats: self.stats.clone() });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let len = data.len();
        let done = Done { kind: DoneKind::Write(reply, len as u32), stats: self.stats.clone() };
        if self.read_only {
            return done.error(libc::EROFS);
        }
        if offset.checked_add(len as u64).is_none_or(|end| end > self.size) {
            tracing::error!("write of {len} bytes at {offset} is beyond the device ({} bytes)", self.size);
            return done.error(libc::ENOSPC);
        }
        self.backend.write(offset, data, done);
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close(): nothing is cached here.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        if self.read_only {
            return reply.ok();
        }
        self.backend.fsync(Done { kind: DoneKind::Fsync(reply), stats: self.stats.clone() });
    }
}

/// A backend served through FUSE with a loop device bound to it.
pub struct UserDevice {
    session: Option<fuser::BackgroundSession>,
    mount: PathBuf,
    pub loop_dev: PathBuf,
    marker: PathBuf,
    pub stats: Arc<UserStats>,
}

/// The FUSE mount point of a state directory (absolute: the kernel shows loop devices' backing
/// files by absolute path).
pub fn mount_point(state: &Path) -> PathBuf {
    std::path::absolute(state).unwrap_or_else(|_| state.to_path_buf()).join("fuse")
}

/// The loop devices whose backing file is `backing`.
fn loops_over(backing: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/sys/block") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let dev = Path::new("/dev").join(&name);
            if name.starts_with("loop") && backing_of(&dev).as_deref() == Some(backing) {
                found.push(dev);
            }
        }
    }
    found.sort();
    found
}

fn write_marker(path: &Path, m: &Marker) -> Result<(), UserError> {
    drv_files::replace(path, serde_json::to_string(m).expect("marker serializes").as_bytes())
        .map_err(io_err(format!("write {}", path.display())))
}

/// Cleans up after a process that died with its device attached: detaches the loop device it
/// bound (only if that device's backing file is still this state directory's FUSE file) and
/// lazily unmounts the dead FUSE mount. Returns the marker it found.
pub fn recover(state: &Path) -> Result<Option<Marker>, UserError> {
    let path = state.join(MARKER);
    let backing = mount_point(state).join(FILE_NAME);
    let marker = match std::fs::read_to_string(&path) {
        Ok(t) => Some(serde_json::from_str::<Marker>(&t).map_err(|e| UserError::Io {
            what: format!("parse {}", path.display()),
            err: io::Error::new(io::ErrorKind::InvalidData, e),
        })?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(format!("read {}", path.display()))(e)),
    };
    // Every loop device over this FUSE file is ours, whatever the marker names (the process may
    // have died between binding one and recording it); no other is touched.
    let ours = loops_over(&backing);
    for dev in &ours {
        // Busy (a filesystem still mounted on it): the kernel detaches it on its last close.
        losetup(&["-d".as_ref(), dev.as_os_str()])?;
    }
    unmount_stale(&mount_point(state));
    if marker.is_some() {
        std::fs::remove_file(&path).map_err(io_err(format!("remove {}", path.display())))?;
    }
    Ok(marker
        .map(|m| {
            if m.loop_dev.as_os_str().is_empty() {
                Marker { loop_dev: ours.first().cloned().unwrap_or_default(), ..m }
            } else {
                m
            }
        })
        .or_else(|| ours.first().map(|d| Marker { loop_dev: d.clone(), backing: backing.clone() })))
}

/// Lazily unmounts a FUSE mount whose server is gone (or any mount left at `dir`).
fn unmount_stale(dir: &Path) {
    if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
        // SAFETY: a valid C string; failure (nothing mounted there) is fine.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The backing file of a loop device, if it has one.
pub fn backing_of(dev: &Path) -> Option<PathBuf> {
    let name = dev.file_name()?.to_str()?;
    let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim_end_matches('\n').trim_end_matches(" (deleted)")))
}

fn losetup(args: &[&OsStr]) -> Result<String, UserError> {
    let shown = args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ");
    let out = std::process::Command::new("losetup").args(args).output().map_err(io_err("run losetup (util-linux)"))?;
    if !out.status.success() {
        return Err(UserError::Losetup {
            args: shown,
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Whether this host can serve a userspace device (FUSE and loop devices).
pub fn supported() -> Result<(), UserError> {
    if !Path::new("/dev/fuse").exists() {
        return Err(UserError::Unsupported(
            "no /dev/fuse: this kernel has no FUSE, or the fuse module is not loaded (modprobe fuse)".into(),
        ));
    }
    if !Path::new("/dev/loop-control").exists() {
        return Err(UserError::Unsupported(
            "no /dev/loop-control: this kernel has no loop devices, or the loop module is not loaded (modprobe loop)"
                .into(),
        ));
    }
    Ok(())
}

/// How to attach a device.
pub struct Attach<'a> {
    /// Shown as the FUSE mount's source (`drv:LABEL`).
    pub label: &'a str,
    /// The image's size in bytes.
    pub size: u64,
    /// The state directory: the FUSE mount and the marker live there.
    pub state: &'a Path,
    pub read_only: bool,
}

impl UserDevice {
    /// Mounts the FUSE file of `backend` under `a.state` and binds a loop device with direct I/O
    /// to it. Call [`recover`] first.
    pub fn attach(a: Attach<'_>, backend: impl Backend) -> Result<UserDevice, UserError> {
        supported()?;
        let mount = mount_point(a.state);
        std::fs::create_dir_all(&mount).map_err(io_err(format!("create {}", mount.display())))?;
        let stats = Arc::new(UserStats::default());
        // SAFETY: no arguments.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let fs = DeviceFs { backend, size: a.size, read_only: a.read_only, stats: stats.clone(), uid, gid };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("drv:{}", a.label)),
            MountOption::Subtype("drv".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        if a.read_only {
            config.mount_options.push(MountOption::RO);
        }
        config.n_threads = Some(2);
        let session = fuser::spawn_mount(fs, &mount, &config).map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::EPERM) { " (mounting needs root: CAP_SYS_ADMIN)" } else { "" };
            io_err(format!("mount FUSE at {}{hint}", mount.display()))(e)
        })?;
        let backing = mount.join(FILE_NAME);
        let mut dev =
            UserDevice { session: Some(session), mount, loop_dev: PathBuf::new(), marker: a.state.join(MARKER), stats };
        // Recorded before the loop device exists: a crash right after binding it still leaves a
        // marker, and `recover` finds the device by its backing file.
        write_marker(&dev.marker, &Marker { loop_dev: PathBuf::new(), backing: backing.clone() })?;
        let mut args: Vec<&OsStr> = vec!["--find".as_ref(), "--show".as_ref(), "--direct-io=on".as_ref()];
        if a.read_only {
            args.push("--read-only".as_ref());
        }
        args.push(backing.as_os_str());
        dev.loop_dev = PathBuf::from(losetup(&args)?);
        if backing_of(&dev.loop_dev).as_deref() != Some(backing.as_path()) {
            return Err(UserError::Losetup {
                args: format!("--find --show {}", backing.display()),
                message: format!("{} does not show {} as its backing file", dev.loop_dev.display(), backing.display()),
            });
        }
        let dio = std::fs::read_to_string(format!(
            "/sys/block/{}/loop/dio",
            dev.loop_dev.file_name().and_then(|n| n.to_str()).unwrap_or_default()
        ))
        .unwrap_or_default();
        if dio.trim() != "1" {
            tracing::warn!(
                "{}: the kernel did not enable direct I/O on the loop device; requests still reach the backend (the FUSE file has no page cache), one at a time",
                dev.loop_dev.display()
            );
        }
        write_marker(&dev.marker, &Marker { loop_dev: dev.loop_dev.clone(), backing })?;
        Ok(dev)
    }

    /// Detaches the loop device (refused while something has it open) and unmounts the FUSE file.
    pub fn detach(&mut self) -> Result<(), UserError> {
        let dev = self.loop_dev.clone();
        if backing_of(&dev).is_some() {
            // O_EXCL on a block device fails with EBUSY while it is mounted or opened exclusively.
            let probe = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(&dev).map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    UserError::Busy { dev: dev.display().to_string() }
                } else {
                    io_err(format!("open {}", dev.display()))(e)
                }
            })?;
            drop(probe);
            losetup(&["-d".as_ref(), dev.as_os_str()])?;
        }
        // The loop device lets go of the FUSE file when its last opener closes it.
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while backing_of(&dev).is_some() {
            if std::time::Instant::now() > end {
                return Err(UserError::Busy { dev: dev.display().to_string() });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(s) = self.session.take() {
            s.umount_and_join().map_err(io_err(format!("unmount {}", self.mount.display())))?;
        }
        match std::fs::remove_file(&self.marker) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(io_err(format!("remove {}", self.marker.display()))(e))
            }
            _ => Ok(()),
        }
    }
}
