//! Files the drv nodes keep on disk, and the rules every writer of them follows:
//!
//! - **One process per data.** A node holds an exclusive lock ([`lock_exclusive`], `flock`) on
//!   what it writes (the replica on its data directory, staging on each WRL device, the agent on
//!   its state directory) for as long as it runs; a second process is refused with the holder's
//!   PID and command line ([`LockError::Held`]), read from `/proc/locks`. The kernel drops a lock
//!   when its holder dies, so a crash never leaves a stale lock behind.
//! - **Small files are replaced whole** ([`replace`]): written to a temporary file, `fsync`,
//!   renamed over the old one, directory `fsync`. A crash leaves the old or the new contents.
//! - **Temporary names are unique** ([`temp_path`]: `.NAME.drvtmp.PID.N` beside `NAME`), so no
//!   two writers ever share one; [`sweep_temps`] removes those of writers that died.
//! - **Files are created whole** ([`install`]): formatted under a temporary name, then linked to
//!   their real name only if nothing has that name yet. A start that fails half-way leaves no
//!   half-made file that would block the next start.

pub mod aligned;
pub mod freeze;

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A lock that could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("{what} {path} is locked by {holder}")]
    Held { what: String, path: String, holder: String },
    /// The lock file could not be opened or the lock call failed.
    #[error("lock {what} {path}: {err}")]
    Io { what: String, path: String, err: io::Error },
}

impl LockError {
    /// Whether another process holds the lock (as opposed to an I/O failure).
    pub fn is_held(&self) -> bool {
        matches!(self, LockError::Held { .. })
    }
}

/// Takes an exclusive lock on the open `file` (`what` and `path` name it in errors), held until
/// the file (every descriptor of this open) is closed.
pub fn lock_exclusive(file: &File, what: &str, path: &Path) -> Result<(), LockError> {
    lock(file, what, path, false)
}

/// Takes a shared lock on `file`: several readers may hold one, never beside an exclusive one.
pub fn lock_shared(file: &File, what: &str, path: &Path) -> Result<(), LockError> {
    lock(file, what, path, true)
}

/// How long a lock found held is tried again before it is reported held: a process that forks
/// (to start a helper) lends its descriptors, and so its locks, to the child until the child
/// execs (they are close-on-exec); a lock seen in that window is not really held.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

fn lock(file: &File, what: &str, path: &Path, shared: bool) -> Result<(), LockError> {
    let started = std::time::Instant::now();
    loop {
        let r = if shared { file.try_lock_shared() } else { file.try_lock() };
        match r {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) if started.elapsed() < LOCK_PATIENCE => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = holder(file);
                return Err(LockError::Held { what: what.into(), path: path.display().to_string(), holder });
            }
            Err(std::fs::TryLockError::Error(err)) => {
                return Err(LockError::Io { what: what.into(), path: path.display().to_string(), err });
            }
        }
    }
}

/// A directory's lock (`DIR/lock`), held while this value lives.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Locks directory `dir` for this process (creating `DIR/lock`; it also holds the PID, for people
/// looking).
pub fn lock_dir(dir: &Path, what: &str) -> Result<DirLock, LockError> {
    let path = dir.join("lock");
    let io = |err| LockError::Io { what: what.into(), path: dir.display().to_string(), err };
    let mut file =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
    lock_exclusive(&file, what, dir)?;
    file.set_len(0).and_then(|()| writeln!(file, "{}", std::process::id())).map_err(io)?;
    Ok(DirLock { _file: file })
}

/// Who holds a lock on `file`: `process PID (COMMAND LINE)` from `/proc/locks` and
/// `/proc/PID/cmdline` (`this process` when it is the caller's own, through another open of the
/// file), or `another process` where those do not tell.
pub fn holder(file: &File) -> String {
    let Ok(meta) = file.metadata() else { return "another process".into() };
    let me = std::process::id();
    let pids = std::fs::read_to_string("/proc/locks")
        .map(|text| lock_holders(&text, meta.dev(), meta.ino()))
        .unwrap_or_default();
    match pids.iter().find(|p| **p != me) {
        Some(pid) => match command_line(*pid) {
            Some(cmd) => format!("process {pid} ({cmd})"),
            None => format!("process {pid}"),
        },
        None if pids.contains(&me) => format!("this process ({me}) already"),
        None => "another process".into(),
    }
}

/// PIDs holding granted locks on the inode `(dev, ino)`, from the text of `/proc/locks`.
///
/// A line is `ID: CLASS MODE ACCESS PID MAJOR:MINOR:INODE START END`, `MAJOR` and `MINOR` in hex;
/// waiters carry `->` after the id and are skipped.
pub fn lock_holders(text: &str, dev: u64, ino: u64) -> Vec<u32> {
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(1) == Some(&"->") || f.len() < 6 || f[5] != want {
                return None;
            }
            f[4].parse().ok()
        })
        .collect()
}

/// `/proc/PID/cmdline` as one line (cut at 120 characters).
fn command_line(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut s: String = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a))
        .collect::<Vec<_>>()
        .join(" ");
    if s.chars().count() > 120 {
        s = s.chars().take(117).collect::<String>() + "...";
    }
    (!s.is_empty()).then_some(s)
}

/// Whether `file` is a block device.
pub fn is_block_device(file: &File) -> bool {
    use std::os::unix::fs::FileTypeExt;
    file.metadata().is_ok_and(|m| m.file_type().is_block_device())
}

/// The error of an exclusive (`O_EXCL`) open of a block device, with what `EBUSY` means there.
pub fn busy_device(e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::EBUSY) {
        io::Error::new(
            e.kind(),
            format!("{e}: it is mounted or claimed by another program (a filesystem, RAID, device mapper)"),
        )
    } else {
        e
    }
}

/// Marks the temporary names [`temp_path`] gives.
const TEMP_MARK: &str = ".drvtmp.";

/// A temporary name for `path`, beside it and unique to this call: `DIR/.NAME.drvtmp.PID.N`.
pub fn temp_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}{TEMP_MARK}{}.{n}", std::process::id()))
}

/// Replaces the contents of `path` with `bytes`, atomically and durably: a temporary file,
/// `fsync`, rename over `path`, directory `fsync`. A crash leaves the old or the new contents.
pub fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_path(path);
    let r = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Gives the finished file `tmp` its real name `path`, only if nothing has that name yet (else
/// `AlreadyExists`, and `tmp` stays), then makes the name durable.
pub fn install(tmp: &Path, path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (from, to) = (c(tmp)?, c(path)?);
    // SAFETY: two NUL-terminated paths that live across the call.
    let r =
        unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_NOREPLACE) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
        // A filesystem without RENAME_NOREPLACE: a hard link also fails if the name exists.
        std::fs::hard_link(tmp, path)?;
        std::fs::remove_file(tmp)?;
    }
    sync_dir(path)
}

/// Removes `path` (if it exists) and makes the removal durable.
pub fn remove_durably(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// `fsync` of the directory holding `path`, so a rename or creation in it is durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// Removes the temporary files (see [`temp_path`]) that writers left in `dir` when they died (a
/// file whose writer's PID no longer runs), so that crashes do not pile them up. Safe beside live
/// writers: their files are left alone. Returns how many were removed.
pub fn sweep_temps(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        let Some((_, rest)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(TEMP_MARK)) else { continue };
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if Path::new(&format!("/proc/{pid}")).exists() || !e.file_type()?.is_file() {
            continue;
        }
        std::fs::remove_file(e.path())?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines_give_the_holders_of_one_inode() {
        let dev = libc::makedev(0xfd, 0x01);
        let text = "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 777 fd:01:1234 0 EOF\n\
                    2: POSIX  ADVISORY  READ 99 fd:01:99 0 EOF\n\
                    3: OFDLCK ADVISORY  WRITE -1 00:2a:1234 0 EOF\n";
        assert_eq!(lock_holders(text, dev, 1234), vec![4242]);
        assert_eq!(lock_holders(text, dev, 5), Vec::<u32>::new());
    }

    #[test]
    fn a_second_lock_is_refused_naming_this_process() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_dir(dir.path(), "test directory").unwrap();
        // Another open file description conflicts even within one process (flock semantics).
        let f = File::open(dir.path().join("lock")).unwrap();
        let e = lock_exclusive(&f, "test directory", dir.path()).unwrap_err();
        assert!(e.is_held(), "{e}");
        let me = format!("locked by this process ({}) already", std::process::id());
        assert!(e.to_string().contains(&me), "{e}");
        drop(held);
        lock_exclusive(&f, "test directory", dir.path()).unwrap();
    }

    #[test]
    fn temp_names_are_unique_and_install_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.img");
        let (t1, t2) = (temp_path(&p), temp_path(&p));
        assert_ne!(t1, t2);
        std::fs::write(&t1, b"one").unwrap();
        std::fs::write(&t2, b"two").unwrap();
        install(&t1, &p).unwrap();
        let e = install(&t2, &p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        replace(&p, b"three").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"three");
        // t2 is left for the sweep, which takes it only once its writer is gone.
        assert_eq!(sweep_temps(dir.path()).unwrap(), 0, "this process still runs");
        let dead = dir.path().join(format!(".a.img{TEMP_MARK}{}.0", u32::MAX - 1));
        std::fs::rename(&t2, &dead).unwrap();
        assert_eq!(sweep_temps(dir.path()).unwrap(), 1);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("a.img")]);
    }
}
