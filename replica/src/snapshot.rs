//! Snapshots of the replica's volumes, copy-on-write: taking one records the applied position (one
//! small commit, whatever the volume's size); from then on the apply step preserves a block's old
//! content in the volume's store the first time it overwrites it ([`Snapshots`] is the apply
//! step's [`OverwriteObserver`]), and the snapshot's image is the target plus what the store
//! preserved for it. One preserved block serves every snapshot taken between two writes of it.
//! The store is `cow.rs`; the rules are `drv_proto::cow`'s.
//!
//! Layout under the replica's data directory: `snapshots/VOLUME/cow.redb` and
//! `snapshots/VOLUME/cow.data` (docs/formats.md, "Snapshot store").

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use drv_proto::cow::{UnitEnd, Write};
use drv_proto::status::{RecoveryPoint, RecoveryPoints, RecoveryWindow, SnapshotDeleted, SnapshotDigest};

use crate::apply::{OverwriteObserver, ReplicaVolume};
use crate::cow::{At, CowError, CowStore, SnapshotMeta};

pub use drv_proto::status::SnapshotInfo;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The volume is in a state where no consistent snapshot can be taken.
    #[error("{0}")]
    Refused(String),
    #[error(
        "snapshot name {0:?}: use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.' or 'auto-resync-' (the replica's own)"
    )]
    BadName(String),
    #[error("snapshot {0} of volume {1} exists already")]
    Exists(String, String),
    #[error("volume {volume} has no snapshot {name}")]
    NotFound { name: String, volume: String },
    #[error(transparent)]
    Store(CowError),
}

/// The names of the snapshots the replica keeps of the last consistent image while a resync run
/// is applied in part (reserved: no operator's snapshot starts so).
pub const AUTO_PREFIX: &str = "auto-resync-";

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && !name.starts_with(AUTO_PREFIX)
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The snapshot stores of a replica's volumes.
pub struct Snapshots {
    root: PathBuf,
    /// By volume id; volumes are added while the server runs.
    stores: RwLock<HashMap<u64, Arc<RwLock<CowStore>>>>,
}

impl Snapshots {
    /// Opens the store of every volume under `root` (the data directory), each allowed at most
    /// its volume's `snapshot_bytes_limit`.
    pub fn open<'a>(root: &Path, volumes: impl IntoIterator<Item = &'a ReplicaVolume>) -> Result<Snapshots, CowError> {
        let mut stores = HashMap::new();
        let mut consistent = Vec::new();
        for v in volumes {
            let store = CowStore::open(&volume_dir(root, v), v.id, v.block_bytes, v.limits().snapshot_bytes_limit)?;
            stores.insert(v.id, Arc::new(RwLock::new(store)));
            if !v.state.lock().expect("apply state").applied.partial_resync {
                consistent.push(v);
            }
        }
        let s = Snapshots { root: root.to_path_buf(), stores: RwLock::new(stores) };
        // A run that ended just before a crash: its consistent point was not released yet.
        for v in consistent {
            s.release_consistent_point(v);
        }
        Ok(s)
    }

    /// Sets the limit of `v`'s snapshot store (its `snapshot_bytes_limit` changed).
    pub fn set_limit(&self, v: &ReplicaVolume, limit: Option<u64>) {
        self.store(v).write().expect("store").set_limit(limit);
    }

    fn store(&self, v: &ReplicaVolume) -> Arc<RwLock<CowStore>> {
        let stores = self.stores.read().expect("stores");
        stores.get(&v.id).cloned().unwrap_or_else(|| panic!("volume {} has no snapshot store", v.id))
    }

    /// Opens the store of a volume added while the server runs (kept if it is there already).
    pub fn add(&self, root: &Path, v: &ReplicaVolume) -> Result<(), CowError> {
        if self.stores.read().expect("stores").contains_key(&v.id) {
            return Ok(());
        }
        let store = CowStore::open(&volume_dir(root, v), v.id, v.block_bytes, v.limits().snapshot_bytes_limit)?;
        self.stores.write().expect("stores").insert(v.id, Arc::new(RwLock::new(store)));
        if !v.state.lock().expect("apply state").applied.partial_resync {
            self.release_consistent_point(v);
        }
        Ok(())
    }

    fn info(&self, v: &ReplicaVolume, name: String, m: &SnapshotMeta, own_bytes: Option<u64>) -> SnapshotInfo {
        SnapshotInfo {
            volume: v.name.clone(),
            volume_id: v.id,
            name,
            seq: m.seq,
            epoch: m.epoch,
            bytes: v.size_bytes,
            created_unix: m.created_unix,
            capture_unix: m.capture_unix,
            path: volume_dir(&self.root, v).display().to_string(),
            own_bytes,
            check: None,
        }
    }

    /// Takes snapshot `name` of `v` at its applied position, or with `at` at a point of the
    /// retention window. Refused while the volume is resyncing or in a media resync (its target
    /// shows no state the source had) or stopped by an apply error (a point of the window is
    /// consistent whatever the target does now: those refusals do not apply to `at`).
    pub fn create(&self, v: &ReplicaVolume, name: &str, at: Option<At>) -> Result<SnapshotInfo, SnapshotError> {
        if !valid_name(name) {
            return Err(SnapshotError::BadName(name.to_owned()));
        }
        // Hold the apply step: the position read below does not move until the snapshot is in.
        let _gate = v.apply_gate.lock().expect("apply gate");
        let held = self.store(v);
        let (point, mut store) = match at {
            Some(at) => {
                let applied = v.state.lock().expect("apply state").applied.seq;
                let store = held.write().expect("store");
                let p = store.resolve(at, applied).map_err(SnapshotError::Store)?;
                (p, store)
            }
            None => {
                let applied = self.current_point(v)?;
                let store = held.write().expect("store");
                let capture_unix =
                    store.point(applied.seq).map_err(SnapshotError::Store)?.map_or(0, |p| p.capture_unix);
                (RecoveryPoint { seq: applied.seq, epoch: applied.epoch, capture_unix, ..Default::default() }, store)
            }
        };
        if let Some(limit) = v.limits().snapshot_bytes_limit {
            let used = store.usage().map_err(SnapshotError::Store)?.used_bytes;
            // A window gives its space back first; refused once it has nothing left to give.
            let window_points = match store.window() {
                Some(_) => store.window_bounds().map_err(SnapshotError::Store)?.points,
                None => 0,
            };
            if used >= limit / 10 * 9 && window_points <= 1 {
                return Err(SnapshotError::Refused(format!(
                    "the snapshot store of volume {} holds {used} of its {limit} bytes (snapshot_bytes_limit): delete a snapshot (drv snapshot list shows what each holds alone) before taking another",
                    v.name
                )));
            }
        }
        let meta = store.create(name, point.seq, point.epoch, point.capture_unix).map_err(|e| match e {
            CowError::Exists(_) => SnapshotError::Exists(name.to_owned(), v.name.clone()),
            e => SnapshotError::Store(e),
        })?;
        tracing::info!(volume = %v.name, snapshot = name, seq = meta.seq, epoch = meta.epoch, "snapshot taken");
        Ok(self.info(v, name.to_owned(), &meta, None))
    }

    /// The applied position, if the target shows a state the source had (the caller holds the
    /// apply gate).
    fn current_point(&self, v: &ReplicaVolume) -> Result<crate::apply::Applied, SnapshotError> {
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
        Ok(applied)
    }

    /// What `v`'s retention window holds: its oldest and newest points, and the newest `limit`
    /// that end with a flush.
    pub fn points(&self, v: &ReplicaVolume, limit: usize) -> Result<RecoveryPoints, SnapshotError> {
        let snapshots = self.list(v, false)?;
        let consistent = {
            let media = v.media.lock().expect("media").phase.is_some();
            let s = v.state.lock().expect("apply state");
            (!media && !s.resyncing && !s.applied.partial_resync && s.error.is_none()).then_some(s.applied)
        };
        let held = self.store(v);
        let store = held.read().expect("store");
        let current = match consistent {
            Some(a) => {
                let capture_unix = store.point(a.seq).map_err(SnapshotError::Store)?.map_or(0, |p| p.capture_unix);
                Some(RecoveryPoint { seq: a.seq, epoch: a.epoch, capture_unix, ..Default::default() })
            }
            None => None,
        };
        let window = match store.window() {
            Some(_) => Some(store.window_info(limit).map_err(SnapshotError::Store)?),
            None => None,
        };
        Ok(RecoveryPoints { volume: v.name.clone(), current, window, snapshots })
    }

    /// The window's summary for status (no flush points listed).
    pub fn window_summary(&self, v: &ReplicaVolume) -> Option<RecoveryWindow> {
        let held = self.store(v);
        let store = held.read().expect("store");
        store.window()?;
        store.window_info(0).ok()
    }

    /// Closes `v`'s window (a media resync writes the target outside the apply step).
    pub fn close_window(&self, v: &ReplicaVolume) {
        match self.store(v).write().expect("store").close_window() {
            Ok(0) => {}
            Ok(freed) => tracing::info!(volume = %v.name, freed, "the retention window was closed"),
            Err(e) => tracing::error!(volume = %v.name, "close the retention window: {e}"),
        }
    }

    /// Deletes snapshot `name` of `v`.
    pub fn delete(&self, v: &ReplicaVolume, name: &str) -> Result<SnapshotDeleted, SnapshotError> {
        let freed_bytes = self.store(v).write().expect("store").delete(name).map_err(|e| self.not_found(v, name, e))?;
        tracing::info!(volume = %v.name, snapshot = name, freed_bytes, "snapshot deleted");
        Ok(SnapshotDeleted { volume: v.name.clone(), name: name.to_owned(), freed_bytes })
    }

    fn not_found(&self, v: &ReplicaVolume, name: &str, e: CowError) -> SnapshotError {
        match e {
            CowError::NotFound(_) => SnapshotError::NotFound { name: name.to_owned(), volume: v.name.clone() },
            e => SnapshotError::Store(e),
        }
    }

    /// Snapshot `name` of `v`.
    pub fn get(&self, v: &ReplicaVolume, name: &str) -> Result<SnapshotMeta, SnapshotError> {
        self.store(v).read().expect("store").get(name).map_err(|e| self.not_found(v, name, e))
    }

    /// Reads `buf.len()` bytes at `offset` of the image at position `seq` (a snapshot's), the
    /// covering blocks at once (read while replication goes on). Fails once no snapshot pins `seq`
    /// (the replica deletes an `auto-resync-` one itself when its run ends: its blocks may then
    /// be reused).
    pub fn read(&self, v: &ReplicaVolume, seq: u64, offset: u64, buf: &mut [u8]) -> Result<(), CowError> {
        self.read_from(v, v.target(), seq, offset, buf)
    }

    /// [`Snapshots::read`] through `target`, a descriptor of `v`'s target.
    pub fn read_from(
        &self,
        v: &ReplicaVolume,
        target: &std::fs::File,
        seq: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), CowError> {
        let end = offset + buf.len() as u64;
        assert!(end <= v.size_bytes, "a read past the end of volume {}", v.name);
        if buf.is_empty() {
            return Ok(());
        }
        let held = self.store(v);
        let store = held.read().expect("store");
        // Deletes hold the store for writing: pinned now, the image stays while this read lasts.
        if !store.pinned(seq) {
            return Err(CowError::NoPoint(format!("no snapshot of {} is at seq {seq} any more", v.name)));
        }
        store.read_range_at_point(target, seq, offset, buf)
    }

    /// The xxh3-128 digest of snapshot `name`'s image (read while replication goes on).
    pub fn digest(&self, v: &ReplicaVolume, name: &str) -> Result<SnapshotDigest, SnapshotError> {
        let held = self.store(v);
        let store = held.read().expect("store");
        let meta = store.get(name).map_err(|e| self.not_found(v, name, e))?;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; v.block_bytes as usize];
        for block in 0..v.size_bytes.div_ceil(v.block_bytes) {
            let len = v.block_bytes.min(v.size_bytes - block * v.block_bytes) as usize;
            store.read_at_point(v.target(), meta.seq, block, &mut buf[..len]).map_err(SnapshotError::Store)?;
            h.update(&buf[..len]);
        }
        Ok(SnapshotDigest {
            volume: v.name.clone(),
            name: name.to_owned(),
            seq: meta.seq,
            epoch: meta.epoch,
            bytes: v.size_bytes,
            xxh3_128: format!("{:032x}", h.digest128()),
        })
    }

    /// The snapshots of `v`, oldest first; with the bytes each holds alone when `space`.
    pub fn list(&self, v: &ReplicaVolume, space: bool) -> Result<Vec<SnapshotInfo>, SnapshotError> {
        let held = self.store(v);
        let store = held.read().expect("store");
        let own = if space { Some(store.own_bytes().map_err(SnapshotError::Store)?) } else { None };
        let mut out: Vec<SnapshotInfo> = store
            .list()
            .map_err(SnapshotError::Store)?
            .into_iter()
            .map(|(name, m)| {
                let own = own.as_ref().map(|o| o.get(&m.seq).copied().unwrap_or(0));
                self.info(v, name, &m, own)
            })
            .collect();
        out.sort_by_key(|s| (s.seq, s.created_unix));
        Ok(out)
    }

    /// Bytes `v`'s store holds for all of its snapshots.
    pub fn store_bytes(&self, v: &ReplicaVolume) -> u64 {
        self.store(v).read().expect("store").usage().map(|u| u.used_bytes).unwrap_or(0)
    }
}

impl OverwriteObserver for Snapshots {
    fn before_apply(&self, volume_id: u64, target: &File, writes: &[Write], ends: &[UnitEnd]) -> Result<(), CowError> {
        let s = self.stores.read().expect("stores").get(&volume_id).cloned();
        match s {
            Some(s) => s.read().expect("store").preserve(target, writes, ends).map(|_| ()),
            None => Ok(()),
        }
    }

    fn pass_len(&self, volume_id: u64, writes: &[Write]) -> usize {
        let s = self.stores.read().expect("stores").get(&volume_id).cloned();
        match s {
            Some(s) => s.read().expect("store").pass_len(writes),
            None => writes.len(),
        }
    }

    /// Opens, moves and closes the retention window as the volume's configuration says.
    fn tick(&self, v: &ReplicaVolume) {
        if let Err(e) = crate::window::upkeep(v, &self.store(v)) {
            tracing::error!(volume = %v.name, "retention window: {e}");
        }
    }

    /// An automatic snapshot `auto-resync-SEQ` of the last consistent image (the caller holds
    /// the apply gate; kept across restarts until the run ends).
    fn hold_consistent_point(&self, v: &ReplicaVolume, applied: crate::apply::Applied) -> Result<(), CowError> {
        let name = format!("{AUTO_PREFIX}{}", applied.seq);
        match self.store(v).write().expect("store").create(&name, applied.seq, applied.epoch, 0) {
            Ok(_) => {
                tracing::info!(
                    volume = %v.name,
                    seq = applied.seq,
                    "a resync run is applied in part: the last consistent image is kept as snapshot {name} until it ends"
                );
                Ok(())
            }
            Err(CowError::Exists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn release_consistent_point(&self, v: &ReplicaVolume) {
        let held = self.store(v);
        let mut store = held.write().expect("store");
        let autos: Vec<String> = match store.list() {
            Ok(l) => l.into_iter().map(|(n, _)| n).filter(|n| n.starts_with(AUTO_PREFIX)).collect(),
            Err(e) => return tracing::warn!(volume = %v.name, "list snapshots: {e}"),
        };
        for name in autos {
            match store.delete(&name) {
                Ok(freed) => tracing::info!(volume = %v.name, freed, "the resync run ended: snapshot {name} released"),
                Err(e) => tracing::warn!(volume = %v.name, "release snapshot {name}: {e} (released at the next start)"),
            }
        }
    }
}

fn volume_dir(root: &Path, v: &ReplicaVolume) -> PathBuf {
    root.join("snapshots").join(&v.name)
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
