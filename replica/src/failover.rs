//! Failover and failover tests (`drv failover VOLUME [--at POINT] [--test]`, `status`, `end`).
//!
//! Both take a snapshot of the point (`failover-UNIXTIME`, or `failover-test-UNIXTIME`) and serve
//! it as a writable loop device on the replica host through a *persistent* overlay (`image.rs`):
//! `DATA/failover/VOLUME_ID.overlay` holds the blocks written, `DATA/failover/VOLUME_ID.map` (the
//! change-map format, 4 KiB blocks) says which: the record a later failback ships back. A test
//! leaves replication running (what ASR and Zerto call a test failover); a failover holds the
//! volume's apply step (records are still logged, the target does not move) until `end`.
//!
//! `DATA/failover/VOLUME_ID.json` (replaced whole) records the failover; written before the device
//! exists and removed after it is gone, so a replica restarted during a failover holds apply again
//! and serves the same point with the same overlay on a new loop device. `end` detaches the device
//! (refused while in use), deletes the snapshot and the files, and releases apply; a failover
//! whose device took writes ends only with `--discard-writes` (they are the only copy).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use drv_proto::status::FailoverInfo;
use drv_userdev::{Attach, UserDevice};
use serde::{Deserialize, Serialize};

use crate::apply::ReplicaVolume;
use crate::cow::At;
use crate::image::{Overlay, SnapImage, View};
use crate::snapshot::Snapshots;

/// What `DATA/failover/VOLUME_ID.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    test: bool,
    snapshot: String,
    seq: u64,
    capture_unix: u32,
    started_unix: u64,
}

struct Active {
    record: Record,
    view: Arc<View>,
    dev: Option<UserDevice>,
}

/// The failovers of a replica's volumes.
pub struct Failovers {
    dir: PathBuf,
    active: Mutex<HashMap<u64, Active>>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Failovers {
    pub fn new(data: &Path) -> Failovers {
        Failovers { dir: data.join("failover"), active: Mutex::default() }
    }

    fn paths(&self, v: &ReplicaVolume) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
        let d = &self.dir;
        (
            d.join(format!("{}.json", v.id)),
            d.join(format!("{}.overlay", v.id)),
            d.join(format!("{}.map", v.id)),
            d.join(format!("dev-{}", v.id)),
        )
    }

    /// At start: the failovers a previous process left go on (apply held again for a failover,
    /// the device served anew).
    pub fn resume(
        &self,
        snaps: &Arc<Snapshots>,
        volumes: &HashMap<u64, Arc<ReplicaVolume>>,
        rt: &tokio::runtime::Handle,
    ) {
        for v in volumes.values() {
            let (json, ..) = self.paths(v);
            let Ok(text) = std::fs::read(&json) else { continue };
            let record: Record = match serde_json::from_slice(&text) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(volume = %v.name, "{}: {e}: the failover is not resumed", json.display());
                    continue;
                }
            };
            if !record.test {
                v.held.store(true, Ordering::Release);
            }
            match self.serve(snaps, v, record, rt.clone()) {
                Ok(info) => {
                    tracing::warn!(volume = %v.name, device = %info.device, test = info.test, "failover resumed after a restart")
                }
                Err(e) => tracing::error!(volume = %v.name, "resume the failover: {e}"),
            }
        }
    }

    /// Begins a failover (or a test with `test`) of `v` at `at` (the image now when `None`).
    pub fn start(
        &self,
        snaps: &Arc<Snapshots>,
        v: &Arc<ReplicaVolume>,
        at: Option<At>,
        test: bool,
        rt: tokio::runtime::Handle,
    ) -> Result<FailoverInfo, String> {
        if let Some(a) = self.active.lock().expect("failovers").get(&v.id) {
            let what = if a.record.test { "a failover test" } else { "a failover" };
            return Err(format!(
                "volume {} is in {what} since {} (`drv failover end` first)",
                v.name, a.record.started_unix
            ));
        }
        let started_unix = now_unix();
        let name = format!("{}-{started_unix}", if test { "failover-test" } else { "failover" });
        let snap = snaps.create(v, &name, at).map_err(|e| e.to_string())?;
        let record =
            Record { test, snapshot: name.clone(), seq: snap.seq, capture_unix: snap.capture_unix, started_unix };
        let (json, overlay, map, _) = self.paths(v);
        let fresh = std::fs::create_dir_all(&self.dir)
            .and_then(|()| remove_if_present(&overlay))
            .and_then(|()| remove_if_present(&map))
            .map_err(|e| format!("{}: {e}", self.dir.display()));
        let recorded = fresh.and_then(|()| {
            drv_files::replace(&json, &serde_json::to_vec(&record).expect("serializable"))
                .map_err(|e| format!("write {}: {e}", json.display()))
        });
        if let Err(e) = recorded {
            let _ = snaps.delete(v, &name);
            return Err(e);
        }
        if !test {
            v.held.store(true, Ordering::Release);
            // A unit being applied finishes; none starts after.
            drop(v.apply_gate.lock().expect("apply gate"));
        }
        self.serve(snaps, v, record, rt)
    }

    /// Serves the record's point with its persistent overlay as a loop device.
    fn serve(
        &self,
        snaps: &Arc<Snapshots>,
        v: &Arc<ReplicaVolume>,
        record: Record,
        rt: tokio::runtime::Handle,
    ) -> Result<FailoverInfo, String> {
        let (_, overlay, map, state) = self.paths(v);
        let overlay = Overlay::persistent(&overlay, &map, v.id, v.size_bytes)?;
        let base = SnapImage::new(snaps.clone(), v.clone(), &record.snapshot, record.seq);
        let view = Arc::new(View { base, overlay: Some(Arc::new(overlay)) });
        let _ = drv_userdev::recover(&state);
        std::fs::create_dir_all(&state).map_err(|e| format!("create {}: {e}", state.display()))?;
        let label = format!("failover:{}@{}", v.name, record.snapshot);
        let attach = Attach { label: &label, size: v.size_bytes, state: &state, read_only: false };
        let (dev, err) = match UserDevice::attach(attach, drv_userdev::ImageBackend { image: view.clone(), rt }) {
            Ok(d) => (Some(d), None),
            Err(e) => (None, Some(e.to_string())),
        };
        // Recorded even without a device: `end` cleans up.
        let mut g = self.active.lock().expect("failovers");
        g.insert(v.id, Active { record, view, dev });
        if let Some(e) = err {
            return Err(format!("{e} (`drv failover end {}` cleans up)", v.name));
        }
        Ok(self.info(v, &g[&v.id]))
    }

    fn info(&self, v: &ReplicaVolume, a: &Active) -> FailoverInfo {
        FailoverInfo {
            volume: v.name.clone(),
            test: a.record.test,
            snapshot: a.record.snapshot.clone(),
            seq: a.record.seq,
            capture_unix: a.record.capture_unix,
            started_unix: a.record.started_unix,
            device: a.dev.as_ref().map(|d| d.loop_dev.display().to_string()).unwrap_or_default(),
            changed_bytes: a.view.overlay.as_ref().map_or(0, |o| o.bytes()),
            change_map: self.paths(v).2.display().to_string(),
        }
    }

    /// The failover of `v`, if one lasts.
    pub fn status(&self, v: &ReplicaVolume) -> Option<FailoverInfo> {
        let g = self.active.lock().expect("failovers");
        g.get(&v.id).map(|a| self.info(v, a))
    }

    /// Whether snapshot `name` of `v` is a failover's point.
    pub fn uses(&self, v: &ReplicaVolume, name: &str) -> bool {
        self.active.lock().expect("failovers").get(&v.id).is_some_and(|a| a.record.snapshot == name)
    }

    /// Ends the failover of `v`: the device detached, the snapshot and the overlay gone, apply
    /// released. Refused while the device is in use, and for a failover whose device took writes
    /// unless `discard`.
    pub fn end(&self, snaps: &Arc<Snapshots>, v: &ReplicaVolume, discard: bool) -> Result<FailoverInfo, String> {
        let mut g = self.active.lock().expect("failovers");
        let a = g.get_mut(&v.id).ok_or_else(|| format!("volume {} is not failed over", v.name))?;
        let info = self.info(v, a);
        if !a.record.test && info.changed_bytes > 0 && !discard {
            return Err(format!(
                "{} bytes were written on the failover device of {} since it began: they are the only copy of that data (failback, which ships them back, comes later); copy them off, or end with --discard-writes",
                info.changed_bytes, v.name
            ));
        }
        if let Some(d) = a.dev.as_mut() {
            d.detach().map_err(|e| e.to_string())?;
        }
        g.remove(&v.id);
        drop(g);
        let (json, overlay, map, state) = self.paths(v);
        remove_if_present(&json).map_err(|e| format!("remove {}: {e}", json.display()))?;
        for p in [&overlay, &map] {
            let _ = remove_if_present(p);
        }
        let _ = std::fs::remove_dir_all(state);
        if let Err(e) = snaps.delete(v, &info.snapshot) {
            tracing::warn!(volume = %v.name, snapshot = %info.snapshot, "delete the failover's snapshot: {e}");
        }
        v.held.store(false, Ordering::Release);
        v.changed.notify_all();
        tracing::info!(volume = %v.name, test = info.test, "failover ended");
        Ok(info)
    }
}

fn remove_if_present(p: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
