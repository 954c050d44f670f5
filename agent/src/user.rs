//! The userspace capture path, for stock kernels without the module: the agent serves the
//! volume's image as one file through FUSE, and a loop device (direct I/O) over that file is the
//! protected block device.
//!
//! ```text
//!  application ─► /dev/loopN (direct I/O) ─► FUSE file STATE/fuse/volume ─► this agent
//!                                                                            │ write: staging, ack,
//!                                                                            ▼ then the image
//!                                                                     image (PATH, the local disk)
//! ```
//!
//! - **Writes** arrive as FUSE `WRITE` requests (`FOPEN_DIRECT_IO`, so never through a page
//!   cache; `FOPEN_PARALLEL_DIRECT_WRITES` and `FUSE_ASYNC_DIO`, so the loop device's queue depth
//!   reaches the agent). Each is handed to [`Agent::write`], which holds it until staging has it
//!   durably and then writes the image; only then does the FUSE reply, and with it the loop
//!   device's completion, go out. The partial write order follows: a write the application issues
//!   after another completed reaches the agent after that one's reply.
//! - **Flushes**: the loop device turns a block FLUSH (and the post-flush of a FUA write: loop
//!   announces no FUA) into `fsync` of its backing file, which FUSE delivers as `FSYNC`: a FLUSH
//!   record for the agent, then `fdatasync` of the image.
//! - **Reads** are served from the image directly.
//!
//! **Crash of the agent.** The kernel aborts the FUSE connection: every request in flight and every
//! later one to the loop device fails with EIO (a mounted filesystem sees I/O errors and stops;
//! nothing is written to the image behind the agent's back, so no write goes unrecorded). The
//! marker `STATE/user-attached` names the loop device. `drv attach` again: it detaches that loop
//! device (only if its backing file is still this volume's FUSE file), lazily unmounts the dead
//! FUSE mount, resyncs the writes in doubt (the agent's activity log) and binds a new loop device;
//! the filesystem is then checked and mounted from the new device. See ARCHITECTURE.md.

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use drv_format::record::Flags;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags, KernelConfig, LockOwner,
    MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};

use crate::Agent;

/// The file's name inside the FUSE mount.
pub const FILE_NAME: &str = "volume";
/// The marker of an attached userspace device, in the agent's state directory.
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

/// What `STATE/user-attached` records: the loop device this agent bound, over which FUSE file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Marker {
    pub loop_dev: PathBuf,
    pub backing: PathBuf,
}

/// Counters of the FUSE server.
#[derive(Debug, Default)]
pub struct UserStats {
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub reads: AtomicU64,
    pub failed: AtomicU64,
}

/// The FUSE file system: one directory with one file, the volume.
struct VolumeFs {
    agent: Agent,
    image: Arc<std::fs::File>,
    size: u64,
    rt: tokio::runtime::Handle,
    stats: Arc<UserStats>,
    uid: u32,
    gid: u32,
}

impl VolumeFs {
    fn attr(&self, ino: u64) -> FileAttr {
        let now = SystemTime::now();
        let (kind, size, perm, nlink) = if ino == FILE_INO {
            (FileType::RegularFile, self.size, 0o600, 1)
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

impl Filesystem for VolumeFs {
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
        // The volume's size is the configuration's; times and modes are not kept.
        if size.is_some_and(|s| s != self.size) {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &self.attr(u64::from(ino)));
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if u64::from(ino) != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        // Never a page cache between the loop device and the agent; writes to different ranges
        // in parallel (the agent orders overlapping ones).
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
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let len = (size as u64).min(self.size.saturating_sub(offset)) as usize;
        let image = self.image.clone();
        // Off the FUSE thread: reads of a large queue run in parallel.
        self.rt.spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            match std::os::unix::fs::FileExt::read_exact_at(&*image, &mut buf, offset) {
                Ok(()) => reply.data(&buf),
                Err(e) => {
                    tracing::error!("read of {len} bytes at {offset} from the image: {e}");
                    reply.error(Errno::EIO)
                }
            }
        });
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
        if offset.checked_add(len as u64).is_none_or(|end| end > self.size) {
            tracing::error!("write of {len} bytes at {offset} is beyond the volume ({} bytes)", self.size);
            return reply.error(Errno::ENOSPC);
        }
        let data = Bytes::copy_from_slice(data);
        let (agent, stats) = (self.agent.clone(), self.stats.clone());
        self.rt.spawn(async move {
            match agent.write(offset, data, Flags::default()).await {
                Ok(()) => {
                    stats.writes.fetch_add(1, Ordering::Relaxed);
                    reply.written(len as u32)
                }
                Err(e) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!("write of {len} bytes at {offset} failed: {e}");
                    reply.error(Errno::EIO)
                }
            }
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close(): nothing is cached here.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let (agent, stats) = (self.agent.clone(), self.stats.clone());
        self.rt.spawn(async move {
            match agent.write(0, Bytes::new(), Flags::FLUSH).await {
                Ok(()) => {
                    stats.flushes.fetch_add(1, Ordering::Relaxed);
                    reply.ok()
                }
                Err(e) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!("flush failed: {e}");
                    reply.error(Errno::EIO)
                }
            }
        });
    }
}

/// A volume served through FUSE with a loop device bound to it.
pub struct UserDevice {
    session: Option<fuser::BackgroundSession>,
    mount: PathBuf,
    pub loop_dev: PathBuf,
    marker: PathBuf,
    pub stats: Arc<UserStats>,
}

/// An attached userspace device shared with the control socket's hooks.
pub struct Served {
    /// `None` once detached.
    pub device: Arc<Mutex<Option<UserDevice>>>,
    /// Resolves when `drv detach` detached it.
    pub ended: tokio::sync::oneshot::Receiver<()>,
    pub detach: crate::control::DetachHook,
    pub capture: crate::control::CaptureHook,
}

impl UserDevice {
    /// Hands the device to the control socket: `detach` detaches it (then `on_detached` runs),
    /// `capture` reports its figures, with `extra()` (the order check's) as `order_check`.
    pub fn serve(
        self,
        state: &Path,
        on_detached: impl Fn() + Send + Sync + 'static,
        extra: impl Fn() -> Option<crate::control::OrderFigures> + Send + Sync + 'static,
    ) -> Served {
        let (stats, loop_dev, fuse) = (self.stats.clone(), self.loop_dev.clone(), mount_point(state).join(FILE_NAME));
        let capture: crate::control::CaptureHook = Arc::new(move || {
            use std::sync::atomic::Ordering::Relaxed;
            crate::control::CaptureReport {
                mode: "user".into(),
                device: loop_dev.display().to_string(),
                fuse: fuse.display().to_string(),
                writes: stats.writes.load(Relaxed),
                flushes: stats.flushes.load(Relaxed),
                reads: stats.reads.load(Relaxed),
                failed: stats.failed.load(Relaxed),
                order_check: extra(),
            }
        });
        let device = Arc::new(Mutex::new(Some(self)));
        let (tx, ended) = tokio::sync::oneshot::channel();
        let (dv, done) = (device.clone(), Mutex::new(Some(tx)));
        let detach: crate::control::DetachHook = Arc::new(move || {
            let mut g = dv.lock().expect("device");
            let Some(d) = g.as_mut() else { return Err("already detached".into()) };
            d.detach()?;
            *g = None;
            on_detached();
            if let Some(tx) = done.lock().expect("done").take() {
                let _ = tx.send(());
            }
            Ok(())
        });
        Served { device, ended, detach, capture }
    }
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

/// Cleans up after an agent that died with its device attached: detaches the loop device it
/// bound (only if that device's backing file is still this volume's FUSE file) and lazily
/// unmounts the dead FUSE mount. Returns the marker it found.
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
    // Every loop device over this volume's FUSE file is ours, whatever the marker names (the
    // agent may have died between binding one and recording it); no other is touched.
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

impl UserDevice {
    /// Mounts the FUSE file of `agent`'s volume (the image `image`, `size` bytes) under `state`
    /// and binds a loop device with direct I/O to it. Call [`recover`] first.
    pub fn attach(
        volume: &str,
        agent: Agent,
        image: std::fs::File,
        size: u64,
        state: &Path,
        rt: tokio::runtime::Handle,
    ) -> Result<UserDevice, UserError> {
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
        let mount = mount_point(state);
        std::fs::create_dir_all(&mount).map_err(io_err(format!("create {}", mount.display())))?;
        let stats = Arc::new(UserStats::default());
        // SAFETY: no arguments.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let fs = VolumeFs { agent, image: Arc::new(image), size, rt, stats: stats.clone(), uid, gid };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("drv:{volume}")),
            MountOption::Subtype("drv".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        config.n_threads = Some(2);
        let session = fuser::spawn_mount(fs, &mount, &config).map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::EPERM) { " (mounting needs root: CAP_SYS_ADMIN)" } else { "" };
            io_err(format!("mount FUSE at {}{hint}", mount.display()))(e)
        })?;
        let backing = mount.join(FILE_NAME);
        let mut dev =
            UserDevice { session: Some(session), mount, loop_dev: PathBuf::new(), marker: state.join(MARKER), stats };
        // Recorded before the loop device exists: a crash right after binding it still leaves a
        // marker, and `recover` finds the device by its backing file.
        write_marker(&dev.marker, &Marker { loop_dev: PathBuf::new(), backing: backing.clone() })?;
        let shown = losetup(&["--find".as_ref(), "--show".as_ref(), "--direct-io=on".as_ref(), backing.as_os_str()])?;
        dev.loop_dev = PathBuf::from(shown);
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
                "{}: the kernel did not enable direct I/O on the loop device; writes still reach the agent (the FUSE file has no page cache), one at a time",
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
