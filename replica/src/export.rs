//! NBD exports of snapshots (`drv snapshot export VOLUME NAME --listen ADDR [--writable]`): the
//! replica serves a snapshot's image over NBD from its own process (the snapshot store has one
//! writer), while replication goes on: read-only, or writable through a private overlay
//! (`image.rs`). The server is `drv_userdev::nbd`'s (the protocol `drv_proto::nbd`'s): one
//! listener per export, at most [`CLIENTS_LIMIT`] clients each. There is no TLS: the operator's
//! documentation says to listen on a trusted network only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use drv_proto::nbd::Export;
pub use drv_userdev::nbd::CLIENTS_LIMIT;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::apply::ReplicaVolume;
use crate::image::{Overlay, SnapImage, View};
use crate::snapshot::Snapshots;

/// What `drv snapshot export` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportInfo {
    pub volume: String,
    pub name: String,
    /// Where it listens (`nbd://LISTEN/NAME`).
    pub listen: String,
    pub seq: u64,
    pub bytes: u64,
    /// Clients write to a private overlay (discarded when the export ends), never the snapshot.
    #[serde(default)]
    pub writable: bool,
}

struct Running {
    info: ExportInfo,
    task: tokio::task::JoinHandle<()>,
}

/// The exports a replica serves, by (volume id, snapshot name).
#[derive(Default)]
pub struct Exports {
    running: Mutex<HashMap<(u64, String), Running>>,
}

impl Exports {
    /// Starts serving snapshot `name` of `v` on `listen`.
    pub async fn start(
        &self,
        snaps: Arc<Snapshots>,
        v: Arc<ReplicaVolume>,
        name: &str,
        listen: &str,
        overlay_dir: Option<&std::path::Path>,
        reuse: bool,
    ) -> Result<ExportInfo, String> {
        let key = (v.id, name.to_owned());
        if let Some(r) = self.running.lock().expect("exports").get(&key) {
            // `drv restore` resuming: the read-only export its first run asked for serves it.
            if reuse && !r.info.writable && overlay_dir.is_none() {
                return Ok(r.info.clone());
            }
            return Err(format!("snapshot {name} of {} is exported already, on {}", v.name, r.info.listen));
        }
        let seq = snaps.get(&v, name).map_err(|e| e.to_string())?.seq;
        let addr: SocketAddr = listen.parse().map_err(|e| format!("--listen {listen:?}: not an address: {e}"))?;
        let listener = TcpListener::bind(addr).await.map_err(|e| format!("listen on {addr}: {e}"))?;
        let bound = listener.local_addr().map_err(|e| e.to_string())?;
        let info = ExportInfo {
            volume: v.name.clone(),
            name: name.to_owned(),
            listen: bound.to_string(),
            seq,
            bytes: v.size_bytes,
            writable: overlay_dir.is_some(),
        };
        let overlay = overlay_dir.map(|d| Overlay::create(d, v.size_bytes).map(Arc::new)).transpose()?;
        let export = Export {
            name: name.to_owned(),
            size: v.size_bytes,
            writable: overlay.is_some(),
            description: format!("{} at seq {seq}", v.name),
        };
        let base = SnapImage::new(snaps, v.clone(), name, seq);
        let image: Arc<dyn drv_userdev::nbd::Image> = Arc::new(View { base, overlay });
        let task = tokio::spawn(drv_userdev::nbd::serve_listener(listener, export, image));
        tracing::info!(volume = %v.name, snapshot = name, listen = %bound, writable = info.writable, "snapshot exported over NBD");
        self.running.lock().expect("exports").insert(key, Running { info: info.clone(), task });
        Ok(info)
    }

    /// Stops the export of snapshot `name` of `v` (its clients are disconnected).
    pub fn stop(&self, v: &ReplicaVolume, name: &str) -> Result<ExportInfo, String> {
        let r = self.running.lock().expect("exports").remove(&(v.id, name.to_owned()));
        let r = r.ok_or_else(|| format!("snapshot {name} of {} is not exported", v.name))?;
        r.task.abort();
        tracing::info!(volume = %v.name, snapshot = name, "snapshot export stopped");
        Ok(r.info)
    }

    /// Where snapshot `name` of `v` is exported, if it is.
    pub fn exported(&self, v: &ReplicaVolume, name: &str) -> Option<String> {
        self.running.lock().expect("exports").get(&(v.id, name.to_owned())).map(|r| r.info.listen.clone())
    }
}

impl Drop for Exports {
    fn drop(&mut self) {
        for r in self.running.lock().expect("exports").values() {
            r.task.abort();
        }
    }
}
