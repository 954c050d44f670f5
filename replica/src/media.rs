//! Media resync on the replica side: an initial copy made "by any means" (a backup restored onto
//! the target, a disk shipped by courier, `dd`) instead of over the network.
//!
//! 1. `begin`: from the next unit boundary on, the apply step does not write the target (the
//!    operator is about to overwrite it); it marks the blocks of every record it applies in a change
//!    map instead. The operator then takes a backup of the source (after `begin` returned) and
//!    copies it onto the target.
//! 2. `complete`: the target is written again by the apply step; the change map now names every
//!    block the copy may lack: written on the source after `begin`, so possibly after the backup
//!    read it. `drv media-resync complete` hands these ranges to the agent, which ships them from
//!    the local disk as a resync run (`Agent::resync_ranges`); `complete` may be repeated and
//!    returns the same ranges until `release`.
//! 3. `release { through_seq }`: the agent has shipped every range (its resync ended below
//!    `through_seq`); the map is dropped and the volume is consistent once `through_seq` is applied.
//!
//! Snapshots are refused from `begin` until then: the target shows no state the source had.
//!
//! Files beside the volume's applied position, in the replica's data directory:
//!
//! ```text
//! NAME.media        a change map (drv-changemap format), the volume's block size
//! NAME.media.json   {"phase": "tracking" | "completed" | "pending", ...}  (Phase below)
//! ```
//!
//! Crash analysis. `NAME.media.json` decides the phase; it is replaced atomically (temporary file,
//! fsync, rename, fsync of the directory).
//! - begin: an old map file is removed, a new empty map is created and synced, then the phase file
//!   is written. A crash in between leaves a map without a phase file: no media resync, and the map
//!   is removed at the next start or `begin`.
//! - tracking: the marks of a unit are durable (`mark_ranges` fsyncs) before the applied position
//!   moves past it, so a crash replays the unit and marks the same blocks again.
//! - complete: the phase file is replaced; a crash before leaves `tracking` (nothing was written to
//!   the target meanwhile), and `complete` is simply run again.
//! - release: the phase file says `pending` before the map is removed; a `pending` phase with a map
//!   file left over removes it at start.

use std::path::{Path, PathBuf};

use drv_changemap::ChangeMap;
use serde::{Deserialize, Serialize};

/// Most extents in one `complete` reply (a client asks again from `next`).
pub const MAX_EXTENTS: usize = 65536;

pub use drv_proto::status::Phase;

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The request does not fit the phase the volume is in.
    #[error("volume {volume}: {reason}")]
    Phase { volume: String, reason: String },
    #[error("media resync of volume {volume}: {path}: {reason}")]
    Io { volume: String, path: String, reason: String },
}

/// What `begin`, `complete` and `release` answer (JSON to the admin).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MediaReport {
    pub volume: String,
    pub phase: Option<Phase>,
    pub block_bytes: u64,
    /// Bytes of the blocks marked (all of them, not only this page).
    pub marked_bytes: u64,
    /// `complete` only: ranges `(offset, len)` starting at the requested offset.
    #[serde(default)]
    pub extents: Vec<(u64, u64)>,
    /// `complete` only: where the next page starts, if there is one.
    #[serde(default)]
    pub next: Option<u64>,
}

/// The media-resync state of one volume (inside the volume's `media` lock).
pub struct Media {
    volume: String,
    volume_id: u64,
    volume_bytes: u64,
    block_bytes: u64,
    map_path: PathBuf,
    phase_path: PathBuf,
    pub phase: Option<Phase>,
    map: Option<ChangeMap>,
}

impl Media {
    /// Loads the state of volume `name` from `dir` (and tidies what a crash left).
    pub fn load(
        dir: &Path,
        name: &str,
        volume_id: u64,
        volume_bytes: u64,
        block_bytes: u64,
    ) -> Result<Media, MediaError> {
        let mut m = Media {
            volume: name.to_owned(),
            volume_id,
            volume_bytes,
            block_bytes,
            map_path: dir.join(format!("{name}.media")),
            phase_path: dir.join(format!("{name}.media.json")),
            phase: None,
            map: None,
        };
        m.phase = match std::fs::read(&m.phase_path) {
            Ok(b) => {
                Some(serde_json::from_slice(&b).map_err(|e| m.io(&m.phase_path, format!("not a media phase: {e}")))?)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(m.io(&m.phase_path, e.to_string())),
        };
        match m.phase {
            Some(Phase::Tracking { .. } | Phase::Completed { .. }) => {
                m.map = Some(
                    ChangeMap::open(&m.map_path, volume_id, volume_bytes, block_bytes)
                        .map_err(|e| m.io(&m.map_path, e.to_string()))?,
                );
            }
            None | Some(Phase::Pending { .. }) => m.remove_map()?,
        }
        Ok(m)
    }

    fn io(&self, path: &Path, reason: String) -> MediaError {
        MediaError::Io { volume: self.volume.clone(), path: path.display().to_string(), reason }
    }

    fn phase_err(&self, reason: String) -> MediaError {
        MediaError::Phase { volume: self.volume.clone(), reason }
    }

    fn remove_map(&mut self) -> Result<(), MediaError> {
        self.map = None;
        match std::fs::remove_file(&self.map_path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(&self.map_path, e.to_string())),
        }
    }

    fn store(&mut self, phase: Option<Phase>) -> Result<(), MediaError> {
        let p = self.phase_path.clone();
        let r = match phase {
            Some(ph) => drv_files::replace(&p, &serde_json::to_vec_pretty(&ph).expect("serializable")),
            None => std::fs::remove_file(&p)
                .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) }),
        };
        r.map_err(|e| self.io(&p, e.to_string()))?;
        self.phase = phase;
        Ok(())
    }

    /// The target is left to the operator (the apply step only marks blocks).
    pub fn tracking(&self) -> bool {
        matches!(self.phase, Some(Phase::Tracking { .. }))
    }

    /// Marks `ranges` durably (tracking only).
    pub fn mark(&self, ranges: &[(u64, u64)]) -> Result<(), MediaError> {
        let map = self.map.as_ref().expect("a tracking volume has its map");
        map.mark_ranges(ranges).map_err(|e| self.io(&self.map_path, e.to_string()))
    }

    /// The apply step reached `applied_seq`: a pending media resync is over once it covers the
    /// agent's resync run.
    pub fn applied(&mut self, applied_seq: u64) -> Result<(), MediaError> {
        if let Some(Phase::Pending { through_seq }) = self.phase
            && applied_seq >= through_seq
        {
            self.store(None)?;
            tracing::info!(volume = %self.volume, applied_seq, "media resync finished: the volume is consistent again");
        }
        Ok(())
    }

    /// Starts tracking (the caller holds the apply gate, so it starts at a unit boundary).
    pub fn begin(&mut self, applied_seq: u64) -> Result<MediaReport, MediaError> {
        if let Some(Phase::Tracking { .. } | Phase::Completed { .. }) = self.phase {
            return Err(self.phase_err(format!(
                "a media resync is in progress ({}): run `drv media-resync complete` first",
                phase_name(self.phase)
            )));
        }
        self.remove_map()?;
        let map = ChangeMap::open(&self.map_path, self.volume_id, self.volume_bytes, self.block_bytes)
            .map_err(|e| self.io(&self.map_path, e.to_string()))?;
        self.map = Some(map);
        let begun_unix =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.store(Some(Phase::Tracking { begun_seq: applied_seq, begun_unix }))?;
        tracing::info!(volume = %self.volume, applied_seq, "media resync begun: tracking changed blocks, the target is left alone");
        Ok(self.report(Vec::new(), None))
    }

    /// Ends tracking (once) and returns a page of the ranges to ship, from byte offset `from`.
    pub fn complete(&mut self, applied_seq: u64, from: u64) -> Result<MediaReport, MediaError> {
        match self.phase {
            Some(Phase::Tracking { begun_seq, .. }) => {
                self.store(Some(Phase::Completed { begun_seq, completed_seq: applied_seq }))?;
                tracing::info!(volume = %self.volume, marked_bytes = self.marked_bytes(), "media resync complete: the agent ships the changed blocks");
            }
            Some(Phase::Completed { .. }) => {}
            _ => return Err(self.phase_err("no media resync to complete: run `drv media-resync begin` first".into())),
        }
        let all = self.map.as_ref().expect("completed has its map").dirty_extents();
        let start = all.partition_point(|(o, l)| o + l <= from);
        let page: Vec<(u64, u64)> = all[start..].iter().take(MAX_EXTENTS).copied().collect();
        let next = all.get(start + MAX_EXTENTS).map(|(o, _)| *o);
        Ok(self.report(page, next))
    }

    /// The agent shipped every range in records before `through_seq`: drop the map.
    pub fn release(&mut self, through_seq: u64) -> Result<MediaReport, MediaError> {
        if !matches!(self.phase, Some(Phase::Completed { .. })) {
            return Err(self.phase_err(format!("no completed media resync to release ({})", phase_name(self.phase))));
        }
        self.store(Some(Phase::Pending { through_seq }))?;
        self.remove_map()?;
        Ok(self.report(Vec::new(), None))
    }

    fn marked_bytes(&self) -> u64 {
        self.map.as_ref().map(|m| m.dirty_bytes().min(self.volume_bytes)).unwrap_or(0)
    }

    pub fn report(&self, extents: Vec<(u64, u64)>, next: Option<u64>) -> MediaReport {
        MediaReport {
            volume: self.volume.clone(),
            phase: self.phase,
            block_bytes: self.block_bytes,
            marked_bytes: self.marked_bytes(),
            extents,
            next,
        }
    }
}

/// `tracking`, `completed`, `pending` or `none`.
pub fn phase_name(p: Option<Phase>) -> &'static str {
    match p {
        None => "none",
        Some(Phase::Tracking { .. }) => "tracking",
        Some(Phase::Completed { .. }) => "completed",
        Some(Phase::Pending { .. }) => "pending",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_survive_reopen_and_refuse_out_of_order() {
        let dir = tempfile::tempdir().unwrap();
        let open = || Media::load(dir.path(), "v", 1, 1 << 20, 64 << 10).unwrap();
        let mut m = open();
        assert!(m.complete(0, 0).is_err(), "complete before begin");
        m.begin(10).unwrap();
        assert!(m.begin(11).is_err(), "begin twice");
        m.mark(&[(0, 1), (200 << 10, 4096)]).unwrap();
        drop(m);
        let mut m = open();
        assert!(m.tracking());
        let r = m.complete(12, 0).unwrap();
        assert_eq!(r.extents, vec![(0, 64 << 10), (192 << 10, 64 << 10)]);
        assert_eq!(r.marked_bytes, 128 << 10);
        let r = m.complete(13, 100 << 10).unwrap();
        assert_eq!(r.extents, vec![(192 << 10, 64 << 10)], "a page from an offset");
        drop(m);
        let mut m = open();
        assert_eq!(m.phase, Some(Phase::Completed { begun_seq: 10, completed_seq: 12 }));
        m.release(20).unwrap();
        assert!(!dir.path().join("v.media").exists());
        m.applied(19).unwrap();
        assert_eq!(m.phase, Some(Phase::Pending { through_seq: 20 }));
        m.applied(20).unwrap();
        assert_eq!(open().phase, None);
    }
}
