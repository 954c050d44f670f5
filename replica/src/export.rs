//! NBD exports of snapshots (`drv snapshot export VOLUME NAME --listen ADDR`): the replica serves a
//! snapshot's image over NBD, read-only, from its own process (the snapshot store has one
//! writer), while replication goes on. The protocol is `drv_proto::nbd`'s; this is its tokio and
//! TCP shell: one listener per export, at most [`CLIENTS_LIMIT`] clients each, every READ served
//! from the snapshot store (`Snapshots::read`) on the blocking pool. There is no TLS: the
//! operator's documentation says to listen on a trusted network only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use drv_proto::nbd::{self, Action, Export, Handshake, Refuse, Request, Step};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::apply::ReplicaVolume;
use crate::image::{Overlay, SnapImage, View};
use crate::snapshot::Snapshots;

/// Clients of one export at once at most (more are closed at once).
pub const CLIENTS_LIMIT: usize = 16;

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
    ) -> Result<ExportInfo, String> {
        let key = (v.id, name.to_owned());
        if let Some(r) = self.running.lock().expect("exports").get(&key) {
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
        let overlay = overlay_dir.map(|d| Overlay::create(d, v.size_bytes)).transpose()?;
        let export = Export {
            name: name.to_owned(),
            size: v.size_bytes,
            writable: overlay.is_some(),
            description: format!("{} at seq {seq}", v.name),
        };
        let base = SnapImage { snaps, v: v.clone(), name: name.to_owned(), seq };
        let image = Arc::new(View { base, overlay });
        let task = tokio::spawn(accept(listener, export, image));
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

async fn accept(listener: TcpListener, export: Export, image: Arc<View>) {
    let clients = Arc::new(AtomicUsize::new(0));
    // The connection tasks end with the listener's (an aborted export disconnects them).
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        if clients.load(Ordering::Relaxed) >= CLIENTS_LIMIT {
            tracing::warn!(%peer, export = %export.name, "NBD client refused: {CLIENTS_LIMIT} are connected");
            continue;
        }
        clients.fetch_add(1, Ordering::Relaxed);
        let (export, image, clients) = (export.clone(), image.clone(), clients.clone());
        tasks.spawn(async move {
            if let Err(e) = serve(stream, &export, image).await {
                tracing::info!(%peer, export = %export.name, "NBD client: {e}");
            }
            clients.fetch_sub(1, Ordering::Relaxed);
        });
        while tasks.try_join_next().is_some() {}
    }
}

/// One client: the handshake, then requests until it disconnects or breaks the protocol.
async fn serve(mut s: TcpStream, export: &Export, image: Arc<View>) -> Result<(), String> {
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.write_all(&nbd::greeting()).await.map_err(|e| e.to_string())?;
    let exports = std::slice::from_ref(export);
    let mut h = Handshake::new();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        match h.step(&buf, exports) {
            Step::Need(n) => {
                let have = buf.len();
                buf.resize(n, 0);
                s.read_exact(&mut buf[have..]).await.map_err(|e| format!("handshake: {e}"))?;
            }
            Step::Reply { consumed, reply } => {
                s.write_all(&reply).await.map_err(|e| e.to_string())?;
                buf.drain(..consumed);
            }
            Step::Go { reply, .. } => {
                s.write_all(&reply).await.map_err(|e| e.to_string())?;
                break;
            }
            Step::Close { reply, why } => {
                let _ = s.write_all(&reply).await;
                return why.map_or(Ok(()), Err);
            }
        }
    }
    transmission(s, export, image).await
}

async fn transmission(mut s: TcpStream, export: &Export, image: Arc<View>) -> Result<(), String> {
    let mut head = [0u8; nbd::REQUEST_LEN];
    loop {
        s.read_exact(&mut head).await.map_err(|e| format!("request: {e}"))?;
        let r = Request::decode(&head).ok_or("a request with the wrong magic")?;
        let action = match nbd::check(&r, export) {
            Ok(Action::Disconnect) => return Ok(()),
            Ok(a) => a,
            Err(Refuse::Error(errno)) => {
                if r.command == nbd::cmd::WRITE {
                    // Its data follows: read and drop it, to stay in step.
                    let mut skip = (&mut s).take(u64::from(r.length));
                    tokio::io::copy(&mut skip, &mut tokio::io::sink()).await.map_err(|e| e.to_string())?;
                }
                s.write_all(&nbd::simple_reply(r.cookie, errno)).await.map_err(|e| e.to_string())?;
                continue;
            }
            Err(Refuse::Close) => return Err(format!("a write of {} bytes (over the limit)", r.length)),
        };
        let data = match action {
            Action::Write { len, .. } => {
                let mut b = vec![0u8; len as usize];
                s.read_exact(&mut b).await.map_err(|e| format!("write data: {e}"))?;
                b
            }
            _ => Vec::new(),
        };
        let img = image.clone();
        let done = tokio::task::spawn_blocking(move || perform(&img, action, data)).await.map_err(|e| e.to_string())?;
        match done {
            Ok(out) => {
                s.write_all(&nbd::simple_reply(r.cookie, 0)).await.map_err(|e| e.to_string())?;
                s.write_all(&out).await.map_err(|e| e.to_string())?;
            }
            Err(e) => {
                tracing::error!(volume = %image.base.v.name, export = %export.name, ?action, "NBD request: {e}");
                s.write_all(&nbd::simple_reply(r.cookie, nbd::errno::EIO)).await.map_err(|e| e.to_string())?;
            }
        }
    }
}

/// Carries out a checked request on the image (on the blocking pool): a READ's data.
fn perform(image: &View, action: Action, data: Vec<u8>) -> Result<Vec<u8>, String> {
    match action {
        Action::Read { offset, len } => {
            let mut b = vec![0u8; len as usize];
            image.read(offset, &mut b)?;
            Ok(b)
        }
        Action::Write { offset, .. } => image.write(offset, &data).map(|()| Vec::new()),
        Action::WriteZeroes { offset, len, .. } => image.write_zeroes(offset, u64::from(len)).map(|()| Vec::new()),
        // The overlay is private and discarded with the export: nothing to make durable, and a
        // TRIM is advice a server may ignore.
        Action::Flush | Action::Trim { .. } | Action::Disconnect => Ok(Vec::new()),
    }
}
