//! Snapshots as local block devices on the replica host (`drv snapshot mount VOLUME NAME
//! [--writable]`): the replica serves the snapshot's image (with a private overlay when writable,
//! see `image.rs`) as a FUSE file with a loop device over it (`drv_userdev`, the technique of
//! `drv attach --mode user`), while replication goes on. A read-only mount is a read-only loop
//! device.
//!
//! Each mount has a state directory `DATA/mounts/VOLUME_ID-NAME/` (its FUSE mount point and the
//! marker naming its loop device). A mount ends with `unmount`, or with the replica process: the
//! kernel then fails the loop device's I/O, and the next start detaches what the previous process
//! left (`Mounts::open`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use drv_userdev::{Attach, ImageBackend, UserDevice};
use serde::{Deserialize, Serialize};

use crate::apply::ReplicaVolume;
use crate::image::{Overlay, SnapImage, View};
use crate::snapshot::Snapshots;

/// What `drv snapshot mount` and `unmount` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountInfo {
    pub volume: String,
    pub name: String,
    /// The loop device, on the replica host.
    pub device: String,
    pub seq: u64,
    pub bytes: u64,
    /// Writes go to a private overlay (discarded at unmount), never the snapshot.
    pub writable: bool,
}

struct Mounted {
    info: MountInfo,
    dev: UserDevice,
}

/// The snapshots a replica serves as local block devices.
pub struct Mounts {
    root: PathBuf,
    running: Mutex<HashMap<(u64, String), Mounted>>,
}

impl Mounts {
    /// The mounts under `DATA/mounts`; what a previous process left there is detached.
    pub fn open(data: &Path) -> Mounts {
        let root = data.join("mounts");
        if let Ok(dir) = std::fs::read_dir(&root) {
            for e in dir.flatten() {
                match drv_userdev::recover(&e.path()) {
                    Ok(Some(m)) if !m.loop_dev.as_os_str().is_empty() => tracing::warn!(
                        "{}: a snapshot mount of the previous replica process, detached (its I/O failed since that process ended)",
                        m.loop_dev.display()
                    ),
                    Ok(_) => {}
                    Err(err) => tracing::warn!("{}: clean up a previous snapshot mount: {err}", e.path().display()),
                }
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Mounts { root, running: Mutex::default() }
    }

    /// Serves snapshot `name` of `v` as a loop device (blocking: binds the device).
    pub fn start(
        &self,
        snaps: Arc<Snapshots>,
        v: Arc<ReplicaVolume>,
        name: &str,
        writable: bool,
        rt: tokio::runtime::Handle,
    ) -> Result<MountInfo, String> {
        let key = (v.id, name.to_owned());
        let mut running = self.running.lock().expect("mounts");
        if let Some(m) = running.get(&key) {
            return Err(format!("snapshot {name} of {} is mounted already, as {}", v.name, m.info.device));
        }
        let seq = snaps.get(&v, name).map_err(|e| e.to_string())?.seq;
        let state = self.root.join(format!("{}-{name}", v.id));
        let overlay = if writable { Some(Arc::new(Overlay::create(&self.root, v.size_bytes)?)) } else { None };
        let base = SnapImage::new(snaps, v.clone(), name, seq);
        let view = Arc::new(View { base, overlay });
        std::fs::create_dir_all(&state).map_err(|e| format!("create {}: {e}", state.display()))?;
        let label = format!("{}@{name}", v.name);
        let attach = Attach { label: &label, size: v.size_bytes, state: &state, read_only: !writable };
        let dev = UserDevice::attach(attach, ImageBackend { image: view, rt }).map_err(|e| e.to_string())?;
        let info = MountInfo {
            volume: v.name.clone(),
            name: name.to_owned(),
            device: dev.loop_dev.display().to_string(),
            seq,
            bytes: v.size_bytes,
            writable,
        };
        tracing::info!(volume = %v.name, snapshot = name, device = %info.device, writable, "snapshot mounted");
        running.insert(key, Mounted { info: info.clone(), dev });
        Ok(info)
    }

    /// Detaches the device of snapshot `name` of `v` (refused while it is in use).
    pub fn stop(&self, v: &ReplicaVolume, name: &str) -> Result<MountInfo, String> {
        let key = (v.id, name.to_owned());
        let mut running = self.running.lock().expect("mounts");
        let m = running.get_mut(&key).ok_or_else(|| format!("snapshot {name} of {} is not mounted", v.name))?;
        m.dev.detach().map_err(|e| e.to_string())?;
        let m = running.remove(&key).expect("present");
        let _ = std::fs::remove_dir_all(self.root.join(format!("{}-{name}", v.id)));
        tracing::info!(volume = %v.name, snapshot = name, device = %m.info.device, "snapshot unmounted");
        Ok(m.info)
    }

    /// The device snapshot `name` of `v` is mounted as, if it is.
    pub fn mounted(&self, v: &ReplicaVolume, name: &str) -> Option<String> {
        self.running.lock().expect("mounts").get(&(v.id, name.to_owned())).map(|m| m.info.device.clone())
    }

    /// Every mount, for the status.
    pub fn list(&self) -> Vec<MountInfo> {
        let mut l: Vec<MountInfo> = self.running.lock().expect("mounts").values().map(|m| m.info.clone()).collect();
        l.sort_by(|a, b| (&a.volume, &a.name).cmp(&(&b.volume, &b.name)));
        l
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for (_, mut m) in self.running.lock().expect("mounts").drain() {
            if let Err(e) = m.dev.detach() {
                tracing::warn!("{}: left attached at shutdown ({e}); its I/O fails from now on", m.info.device);
            }
        }
    }
}
