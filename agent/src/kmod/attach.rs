//! Attaching to the volume's drv device and the crash-recovery rule around it, kept in two files of
//! the agent's state directory:
//!
//! - `STATE/kmod-attached` ([`ATTACH_MARKER`]): written durably before the agent creates or finds
//!   the device, removed when it is detached cleanly. A device the agent has to create while the
//!   marker is there went away without `drv detach` (host crash or reboot, module reloaded) and
//!   took its dirty bitmap with it.
//! - `STATE/full-resync-pending` ([`FULL_RESYNC_MARKER`]): a full resync was decided and is not yet
//!   marked in the change map. Written durably right after the device is created, removed once the
//!   whole volume is marked: an attach that fails in between decides it again.
//!
//! Crash analysis, in the order an attach runs: a crash before the marker is written leaves no
//! device this attach made; a crash after it (device created or not) makes the next attach that
//! creates the device decide a full resync; a crash after the full-resync marker keeps the decision
//! whatever the next attach finds; once the change map holds the whole volume (durably) the marker
//! goes, and the map keeps the decision.

use std::path::{Path, PathBuf};

use super::{Control, DeviceInfo, KmodError};

/// See the module docs.
pub const ATTACH_MARKER: &str = "kmod-attached";

/// See the module docs.
pub const FULL_RESYNC_MARKER: &str = "full-resync-pending";

/// What an agent attaching to the volume's drv device does about writes it did not see (with no
/// agent attached, the module lets writes through and marks them in its dirty bitmap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// The device was there: its dirty bitmap holds what passed through meanwhile.
    Resume,
    /// A new device, and none went away uncleanly: nothing passed through unseen.
    Fresh,
    /// A new device, but an earlier one went away without `drv detach`: what passed through it
    /// is unknown, so the whole volume is shipped again.
    FullResync,
}

/// The crash-recovery rule: `created` (the device had to be created), `marker` (the attach
/// marker was there before this attach wrote it) and `pending` (an earlier attach decided a full
/// resync and failed before marking it).
pub fn recovery(created: bool, marker: bool, pending: bool) -> Recovery {
    match (created, marker, pending) {
        (_, _, true) | (true, true, _) => Recovery::FullResync,
        (false, _, false) => Recovery::Resume,
        (true, false, false) => Recovery::Fresh,
    }
}

/// The state files of one attach, from before the device exists until the decision is kept.
#[derive(Debug)]
pub struct AttachState {
    marker: PathBuf,
    pending: PathBuf,
    /// The marker was there before this attach wrote it.
    was: bool,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> KmodError {
    move |err| KmodError::Io { what, err }
}

impl AttachState {
    /// Writes the attach marker of `volume` into `state` (created if needed), durably, before
    /// the device is created or found.
    pub fn begin(state: &Path, volume: &str) -> Result<AttachState, KmodError> {
        let marker = state.join(ATTACH_MARKER);
        let was = marker.exists();
        std::fs::create_dir_all(state).map_err(io(format!("create {}", state.display())))?;
        drv_files::replace(&marker, format!("{volume}\n").as_bytes())
            .map_err(io(format!("write the attach marker {}", marker.display())))?;
        Ok(AttachState { marker, pending: state.join(FULL_RESYNC_MARKER), was })
    }

    /// The device could not be created or found. When no device exists (`device_exists`, checked
    /// after the failure: creation may fail after the device appeared) and this attach wrote the
    /// first marker, it leaves none behind.
    pub fn abandon(self, device_exists: bool) {
        if !self.was && !device_exists {
            let _ = std::fs::remove_file(&self.marker);
        }
    }

    /// The device is there (`created`: this attach made it): what to do about writes nobody saw.
    /// A full resync is written down durably before anything else can fail.
    pub fn decide(&self, created: bool) -> Result<Recovery, KmodError> {
        let r = recovery(created, self.was, self.pending.exists());
        if r == Recovery::FullResync {
            drv_files::replace(&self.pending, b"the drv device went away without detach\n")
                .map_err(io(format!("write the full-resync marker {}", self.pending.display())))?;
        }
        Ok(r)
    }

    /// The whole volume is marked in the change map (durably): the map keeps the decision now.
    pub fn full_resync_marked(&self) -> Result<(), KmodError> {
        drv_files::remove_durably(&self.pending)
            .map_err(io(format!("remove the full-resync marker {}", self.pending.display())))
    }
}

/// The device was detached cleanly: the next attach that creates one starts fresh.
pub fn detached(state: &Path) -> Result<(), KmodError> {
    let marker = state.join(ATTACH_MARKER);
    match std::fs::remove_file(&marker) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(KmodError::Io { what: format!("remove the attach marker {}", marker.display()), err: e })
        }
        _ => Ok(()),
    }
}

/// Creates (or finds) `volume`'s drv device over `device` and decides what to do about writes
/// it did not see, keeping the state files of [`AttachState`] around it (the caller tells it when
/// a full resync is marked).
pub fn attach_device(
    ctl: &Control,
    volume: &str,
    device: &Path,
    block_bytes: u32,
    state: &Path,
) -> Result<(DeviceInfo, Recovery, AttachState), KmodError> {
    let st = AttachState::begin(state, volume)?;
    let (d, created) = match ctl.create_or_find(volume, device, block_bytes) {
        Ok(x) => x,
        Err(e) => {
            st.abandon(!matches!(ctl.find(volume), Ok(None)));
            return Err(e);
        }
    };
    let r = st.decide(created)?;
    Ok((d, r, st))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> (bool, bool) {
        (dir.join(ATTACH_MARKER).exists(), dir.join(FULL_RESYNC_MARKER).exists())
    }

    #[test]
    fn the_rule() {
        assert_eq!(recovery(false, false, false), Recovery::Resume);
        assert_eq!(recovery(false, true, false), Recovery::Resume);
        assert_eq!(recovery(true, false, false), Recovery::Fresh);
        assert_eq!(recovery(true, true, false), Recovery::FullResync);
        for (c, m) in [(false, false), (false, true), (true, false), (true, true)] {
            assert_eq!(recovery(c, m, true), Recovery::FullResync, "a decided full resync is kept");
        }
    }

    /// A first attach, a clean detach, an attach after a crash that fails before the change map
    /// holds the decision, and the attach that keeps it.
    #[test]
    fn a_crash_decides_a_full_resync_and_a_failed_attach_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("vol1");
        let a = AttachState::begin(&state, "vol1").unwrap();
        assert_eq!(files(&state), (true, false), "the marker is written before the device exists");
        assert_eq!(a.decide(true).unwrap(), Recovery::Fresh);
        detached(&state).unwrap();
        assert_eq!(files(&state), (false, false));
        detached(&state).unwrap();

        // Attached, then the host crashed: the marker stays, the device is gone.
        AttachState::begin(&state, "vol1").unwrap().decide(true).unwrap();
        let a = AttachState::begin(&state, "vol1").unwrap();
        assert_eq!(a.decide(true).unwrap(), Recovery::FullResync);
        assert_eq!(files(&state), (true, true), "written down before anything can fail");
        // That attach failed before marking the volume; the device it made is still there.
        let a = AttachState::begin(&state, "vol1").unwrap();
        assert_eq!(a.decide(false).unwrap(), Recovery::FullResync, "the found device does not undo it");
        a.full_resync_marked().unwrap();
        assert_eq!(files(&state), (true, false));
        let a = AttachState::begin(&state, "vol1").unwrap();
        assert_eq!(a.decide(false).unwrap(), Recovery::Resume, "the change map keeps it now");
    }

    #[test]
    fn a_failed_first_attach_leaves_no_marker_and_a_failed_later_one_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("vol1");
        AttachState::begin(&state, "vol1").unwrap().abandon(false);
        assert_eq!(files(&state), (false, false), "no device came of it");
        AttachState::begin(&state, "vol1").unwrap().abandon(true);
        assert_eq!(files(&state), (true, false), "a device appeared before the failure: it is recorded");
        AttachState::begin(&state, "vol1").unwrap().abandon(false);
        assert_eq!(files(&state), (true, false), "an earlier attach's marker is never removed");
        assert_eq!(AttachState::begin(&state, "vol1").unwrap().decide(true).unwrap(), Recovery::FullResync);
    }
}
