//! Filesystem freezing (`FIFREEZE`/`FITHAW`), for a consistent point of a filesystem whose writes
//! are tracked rather than held (`drv track sync --freeze`): once the freeze returns, every write
//! of the filesystem has completed, and none starts until the thaw.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

// From <linux/fs.h>: _IOWR('X', 119, int) and _IOWR('X', 120, int).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// A filesystem frozen with FIFREEZE; thawed on drop if not thawed before.
pub struct Frozen {
    dir: File,
    path: PathBuf,
    /// When the freeze took effect.
    pub since: Instant,
    thawed: bool,
}

/// What went wrong freezing or thawing, naming the mount point.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("open mount point {path}: {err}")]
    Open { path: String, err: io::Error },
    #[error("freeze the filesystem at {path}: {err} (is it a mount point of a filesystem that supports freezing?)")]
    Freeze { path: String, err: io::Error },
    #[error("thaw the filesystem at {path}: {err} (fsfreeze -u it by hand)")]
    Thaw { path: String, err: io::Error },
}

impl Frozen {
    pub fn freeze(mount: &Path) -> Result<Frozen, FreezeError> {
        let path = || mount.display().to_string();
        let dir = File::open(mount).map_err(|err| FreezeError::Open { path: path(), err })?;
        ioctl(&dir, FIFREEZE).map_err(|err| FreezeError::Freeze { path: path(), err })?;
        Ok(Frozen { dir, path: mount.to_path_buf(), since: Instant::now(), thawed: false })
    }

    pub fn thaw(mut self) -> Result<(), FreezeError> {
        self.thawed = true;
        ioctl(&self.dir, FITHAW).map_err(|err| FreezeError::Thaw { path: self.path.display().to_string(), err })
    }
}

/// An ioctl without argument data on an open descriptor.
fn ioctl(f: &File, request: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the descriptor is open for the call; the request takes no pointer (argument 0).
    if unsafe { libc::ioctl(f.as_raw_fd(), request, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.thawed
            && let Err(e) = ioctl(&self.dir, FITHAW)
        {
            eprintln!("drv: could not thaw {}: {e} (run fsfreeze -u {})", self.path.display(), self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_ioctl_numbers_are_linuxs() {
        // _IOWR('X', 119, int): direction 3 << 30, size 4 << 16, type 'X' << 8, number 119.
        let iowr = |nr: u64| (3u64 << 30) | (4 << 16) | ((b'X' as u64) << 8) | nr;
        assert_eq!(super::FIFREEZE, iowr(119) as libc::c_ulong);
        assert_eq!(super::FITHAW, iowr(120) as libc::c_ulong);
    }
}
