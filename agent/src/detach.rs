//! `drv detach` with no agent running: what a dead agent left of its capture device goes away.
//! A user-mode device (its I/O fails since the agent died) is detached and its dead FUSE mount
//! removed; a kernel module device is removed (what it marked dirty is not resynced then: the
//! operator asked to stop protecting the volume).

use std::path::{Path, PathBuf};

use crate::kmod::{self, KmodError};
use crate::user::{self, UserError};

/// What was found and removed.
#[derive(Debug, PartialEq, Eq)]
pub enum Orphan {
    /// A user-mode device: its loop device (`None`: the agent died before binding one) and its
    /// FUSE mount.
    User { loop_dev: Option<PathBuf> },
    /// The kernel module's device, with the blocks it had marked dirty.
    Kmod { path: String, dirty_blocks: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    #[error("detach the user-mode device: {0}")]
    User(#[from] UserError),
    #[error(transparent)]
    Kmod(#[from] KmodError),
    #[error("volume {volume} has no drv device")]
    NoDevice { volume: String },
}

/// Removes the capture device a dead agent of `volume` (state directory `state`) left behind.
pub fn detach_orphan(volume: &str, state: &Path) -> Result<Orphan, DetachError> {
    if state.join(user::MARKER).exists() {
        let m = user::recover(state)?;
        let loop_dev = m.map(|m| m.loop_dev).filter(|d| !d.as_os_str().is_empty());
        return Ok(Orphan::User { loop_dev });
    }
    let ctl = kmod::Control::open()?;
    let d = ctl.find(volume)?.ok_or_else(|| DetachError::NoDevice { volume: volume.to_owned() })?;
    ctl.remove(d.index)?;
    Ok(Orphan::Kmod { path: d.path(), dirty_blocks: d.dirty_blocks })
}
