//! Snapshots of a replica volume: a full, point-in-time copy of the target taken at a unit
//! boundary (the apply step is held while it is copied), with its metadata beside it.
//!
//! Layout under the replica's data directory:
//!
//! ```text
//! snapshots/VOLUME/NAME.img    the copy (same size as the volume)
//! snapshots/VOLUME/NAME.json   {"volume", "volume_id", "name", "seq", "epoch", "bytes", "created_unix"}
//! ```
//!
//! Crash analysis: the copy is written to a temporary file of its own (`drv_files::temp_path`),
//! synced, renamed, then the metadata is replaced the same way and the directory synced. A snapshot
//! exists only once `NAME.json` does; a crash before that leaves a temporary file (removed at the
//! next start, `sweep`) or an `.img` without metadata, which `list` ignores and the next `create`
//! of that name replaces.
//!
//! Copy-on-write snapshots hook into the apply step's `OverwriteObserver` instead of copying; this
//! full copy is what works on any file system and block device.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::apply::ReplicaVolume;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The volume is in a state where no consistent snapshot can be taken.
    #[error("{0}")]
    Refused(String),
    #[error("snapshot name {0:?}: use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'")]
    BadName(String),
    #[error("snapshot {0} of volume {1} exists already")]
    Exists(String, String),
    #[error("snapshot {path}: {reason}")]
    Io { path: String, reason: String },
}

pub use drv_proto::status::SnapshotInfo;

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn volume_dir(root: &Path, v: &ReplicaVolume) -> PathBuf {
    root.join("snapshots").join(&v.name)
}

/// Removes what copies interrupted by a crash left in `v`'s snapshot directory.
pub fn sweep(root: &Path, v: &ReplicaVolume) {
    let _ = drv_files::sweep_temps(&volume_dir(root, v));
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |e| SnapshotError::Io { path: path.display().to_string(), reason: e.to_string() }
}

/// Takes a snapshot named `name` of `v` under `root` (the replica's data directory). Refused while
/// the volume is resyncing (its target would not show any state the source had) or stopped by an
/// apply error.
pub fn create(root: &Path, v: &ReplicaVolume, name: &str) -> Result<SnapshotInfo, SnapshotError> {
    if !valid_name(name) {
        return Err(SnapshotError::BadName(name.to_owned()));
    }
    let dir = volume_dir(root, v);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let meta_path = dir.join(format!("{name}.json"));
    if meta_path.exists() {
        return Err(SnapshotError::Exists(name.to_owned(), v.name.clone()));
    }
    // Hold the apply step: the target stays at the unit boundary read below.
    let _gate = v.apply_gate.lock().expect("apply gate");
    let media = v.media.lock().expect("media").phase;
    if media.is_some() {
        return Err(SnapshotError::Refused(format!(
            "volume {} is in a media resync ({}): its target shows no state the source had until it finishes",
            v.name,
            crate::media::phase_name(media)
        )));
    }
    let applied = {
        let s = v.state.lock().expect("apply state");
        if s.resyncing {
            return Err(SnapshotError::Refused(format!(
                "volume {} is resyncing: a snapshot now would not be consistent with any state of the source",
                v.name
            )));
        }
        if let Some(e) = &s.error {
            return Err(SnapshotError::Refused(format!("volume {}: apply is stopped: {e}", v.name)));
        }
        s.applied
    };
    let img = dir.join(format!("{name}.img"));
    // A temporary name of its own: two copies never write one file.
    let tmp = drv_files::temp_path(&img);
    let copied = (|| {
        let mut src = File::open(&v.target_path).map_err(io_err(&v.target_path))?;
        let mut dst = File::create(&tmp).map_err(io_err(&tmp))?;
        // std::io::copy uses copy_file_range between files: the kernel copies, no user buffer.
        let n = std::io::copy(&mut src, &mut dst).map_err(io_err(&tmp))?;
        dst.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &img).map_err(io_err(&img))?;
        Ok(n)
    })();
    if copied.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let bytes = copied?;
    let info = SnapshotInfo {
        volume: v.name.clone(),
        volume_id: v.id,
        name: name.to_owned(),
        seq: applied.seq,
        epoch: applied.epoch,
        bytes,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        path: img.display().to_string(),
    };
    drv_files::replace(&meta_path, serde_json::to_string_pretty(&info).expect("serializable").as_bytes())
        .map_err(io_err(&meta_path))?;
    tracing::info!(volume = %v.name, snapshot = name, seq = applied.seq, epoch = applied.epoch, "snapshot taken");
    Ok(info)
}

/// The snapshots of `v` (those whose metadata was written), oldest first.
pub fn list(root: &Path, v: &ReplicaVolume) -> Vec<SnapshotInfo> {
    let Ok(rd) = std::fs::read_dir(volume_dir(root, v)) else { return Vec::new() };
    let mut out: Vec<SnapshotInfo> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    out.sort_by_key(|s| (s.created_unix, s.seq));
    out
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn names() {
        for ok in ["a", "before-upgrade", "2026-11-26_0900", "x.y"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "../x", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
