//! The replica server (`drv replica run`): accepts relay streams from staging servers over mTLS
//! QUIC, logs every record unchanged in its DR log (a WRL), reports the durable and applied
//! positions, and runs one apply loop per volume (`apply.rs`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use drv_config::NodeConfig;
use drv_format::crypto::VolumeKey;
use drv_format::frame::{Frame, code, media_op};
use drv_format::record::{Flags, RECORD_HEADER_LEN, RecordHeader};
use drv_proto::Admit;
use drv_proto::status::{self, DrLogSummary, ReplicaStatus, VolumeState};
use drv_transport::{FrameReader, Identity, Outbox, Role, quic, serve};
use drv_wrl::storage::{FileStorage, Storage};
use drv_wrl::{self as wrl, CreateOptions, Wrl, WrlOptions};

use crate::apply::{self, ReplicaVolume};
use crate::cow::{At, CowError};
use crate::media::{MediaError, MediaReport};
use crate::snapshot::{self, Snapshots};

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("replica {0} has no data_dir in its endpoint configuration")]
    NoDataDir(String),
    #[error("DR log {path}: {reason}")]
    DrLog { path: String, reason: String },
    #[error("replica data directory {path}: {reason}")]
    DataDir { path: String, reason: String },
    /// Another process has the data directory (names it).
    #[error(transparent)]
    Locked(#[from] drv_files::LockError),
    #[error("volume {name}: {reason}")]
    Volume { name: String, reason: String },
    #[error("volume {name}: {err}")]
    Apply { name: String, err: Box<apply::ApplyError> },
    #[error(transparent)]
    Transport(#[from] drv_transport::TransportError),
}

/// Why a relay stream from staging was refused (logged once and sent to staging as an `Error`
/// frame; the relay reconnects and resumes from the replica's durable position).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Transport(#[from] drv_transport::TransportError),
    #[error("{what} task: {err}")]
    Task { what: &'static str, err: tokio::task::JoinError },
    #[error("records for volume {0} before RelayOpen on this stream")]
    NoRelayOpen(u64),
    #[error("unexpected {0:?} frame from a staging server")]
    Unexpected(drv_format::frame::FrameType),
    #[error("a records frame of {bytes} bytes does not fit the DR log ({capacity} bytes): raise drlog_bytes")]
    DrLogTooSmall { bytes: u64, capacity: u64 },
    #[error("record in frame: {0}")]
    BadRecord(drv_format::FormatError),
    #[error("volume {volume} record {refusal}")]
    Refused { volume: u64, refusal: drv_proto::Refusal },
    #[error("volume {volume}: cannot start at the full resync run at seq {seq}: {why}")]
    Rebase { volume: u64, seq: u64, why: String },
}

pub struct ReplicaServer {
    pub name: String,
    pub identity: Identity,
    pub drlog: Arc<Wrl>,
    /// The volumes served now (the configuration adds and removes them while running).
    pub volumes: RwLock<HashMap<u64, Arc<ReplicaVolume>>>,
    /// The node's name and data directory for volumes opened later: (name, dir).
    open_args: (String, PathBuf),
    /// The volumes' snapshot stores (the apply step preserves through them).
    pub snapshots: Arc<Snapshots>,
    /// Snapshots served over NBD.
    pub exports: crate::export::Exports,
    pub mounts: crate::mount::Mounts,
    pub checks: crate::check::Checks,
    pub failovers: crate::failover::Failovers,
    /// The data directory (DR log, applied positions, default targets, snapshots).
    pub dir: PathBuf,
    /// The data directory's lock, held while the server lives.
    _lock: drv_files::DirLock,
    frame_bytes_limit: u32,
    max_connections: u32,
    quic: quic::QuicOptions,
    peers: Arc<serve::Peers>,
    stop: Arc<AtomicBool>,
    started: Instant,
    /// Set once `run` has caught every volume up and started its apply thread: configuration
    /// changes are applied only from then on.
    ready: tokio::sync::watch::Sender<bool>,
}

/// Opens the DR log `DATA_DIR/drlog`, creating it (`bytes` long) if it does not exist yet.
fn open_drlog(dir: &Path, bytes: u64) -> Result<Arc<Wrl>, ReplicaError> {
    let path = dir.join("drlog");
    let err = |reason: String| ReplicaError::DrLog { path: path.display().to_string(), reason };
    if !path.exists() {
        let segment = drlog_segment_bytes(bytes);
        let mut uuid = [0u8; 16];
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        uuid.copy_from_slice(&now.to_le_bytes());
        // The DR log never encrypts anything itself: it stores staging's sealed records, so its own
        // nonce domain (0) is never used.
        let opts = CreateOptions { uuid, wrl_id: 0, segment_bytes: segment, io_align: 4096, capacity_bytes: None };
        drv_wrl::storage::create_files(&[path.as_path()], bytes, |devs| wrl::create(devs, &opts))
            .map_err(|e: drv_wrl::WrlError| err(e.to_string()))?;
    }
    let dev: Arc<dyn Storage> = Arc::new(FileStorage::open(&path).map_err(|e| err(e.to_string()))?);
    let (w, rec) = Wrl::open(vec![dev], WrlOptions::default()).map_err(|e| err(e.to_string()))?;
    tracing::info!(first_lsn = rec.first_lsn, last_lsn = rec.last_lsn, tail = ?rec.tail, "DR log recovered");
    Ok(Arc::new(w))
}

/// The segment size of a DR log of `bytes`: eight or more segments of at most 64 MiB, in whole MiB.
pub fn drlog_segment_bytes(bytes: u64) -> u64 {
    ((bytes / 8) >> 20).clamp(1, 64) << 20
}

/// Opens volume `v` of node `node` (its target, its applied position, its place in the DR log).
fn open_volume(
    node: &str,
    dir: &Path,
    v: &drv_config::VolumeView,
    drlog: &Arc<Wrl>,
) -> Result<ReplicaVolume, ReplicaError> {
    let err = |reason: String| ReplicaError::Volume { name: v.name.clone(), reason };
    let key = VolumeKey::load(v.key.key_id, Path::new(&v.key.path)).map_err(|e| err(e.to_string()))?;
    let target = v.volume.targets.get(node).map(PathBuf::from).unwrap_or_else(|| dir.join(format!("{}.img", v.name)));
    ReplicaVolume::open(&v.name, &v.volume, key, target, dir.join(format!("{}.applied", v.name)), drlog)
        .map_err(|e| err(e.to_string()))
}

impl ReplicaServer {
    pub fn new(node: &NodeConfig, identity: Identity) -> Result<Arc<ReplicaServer>, ReplicaError> {
        let dir =
            PathBuf::from(node.endpoint.data_dir.clone().ok_or_else(|| ReplicaError::NoDataDir(node.name.clone()))?);
        let dir_err = |e: &dyn std::fmt::Display| ReplicaError::DataDir {
            path: dir.display().to_string(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(&dir).map_err(|e| dir_err(&e))?;
        // One process per data directory, for as long as it runs: `run`, `recover` and anything
        // else that writes the DR log, the targets or the applied positions.
        let lock = drv_files::lock_dir(&dir, "replica data directory")?;
        let _ = drv_files::sweep_temps(&dir);
        let drlog = open_drlog(&dir, node.endpoint.drlog_bytes)?;
        let mut volumes = HashMap::new();
        for v in &node.volumes {
            volumes.insert(v.volume.id, Arc::new(open_volume(&node.name, &dir, v, &drlog)?));
        }
        let snapshots = Snapshots::open(&dir, volumes.values().map(|v| v.as_ref()))
            .map_err(|e| ReplicaError::DataDir { path: dir.display().to_string(), reason: e.to_string() })?;
        Ok(Arc::new(ReplicaServer {
            name: node.name.clone(),
            identity,
            drlog,
            volumes: RwLock::new(volumes),
            open_args: (node.name.clone(), dir.clone()),
            snapshots: Arc::new(snapshots),
            exports: crate::export::Exports::default(),
            mounts: crate::mount::Mounts::open(&dir),
            checks: crate::check::Checks::open(&dir),
            failovers: crate::failover::Failovers::new(&dir),
            dir,
            _lock: lock,
            frame_bytes_limit: node.endpoint.frame_bytes_limit.min(u32::MAX as u64) as u32,
            max_connections: node.endpoint.max_connections,
            quic: quic::QuicOptions { max_mtu: node.endpoint.max_mtu, ..Default::default() },
            peers: Arc::default(),
            stop: Arc::new(AtomicBool::new(false)),
            started: Instant::now(),
            ready: tokio::sync::watch::Sender::new(false),
        }))
    }

    /// Resolves once `run` has started every volume's apply (configuration changes wait for it).
    pub async fn running(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Volume `id`, if it is served now.
    pub fn volume(&self, id: u64) -> Option<Arc<ReplicaVolume>> {
        self.volumes.read().expect("volumes").get(&id).cloned()
    }

    /// The volumes served now, by id.
    pub fn volume_list(&self) -> Vec<Arc<ReplicaVolume>> {
        let mut vs: Vec<_> = self.volumes.read().expect("volumes").values().cloned().collect();
        vs.sort_by_key(|v| v.id);
        vs
    }

    /// The apply thread of `v`, until the server stops or the volume is removed.
    fn spawn_apply(&self, v: Arc<ReplicaVolume>, applier: apply::Applier) -> Result<(), ReplicaError> {
        let (log, stop, snapshots) = (self.drlog.clone(), self.stop.clone(), self.snapshots.clone());
        std::thread::Builder::new()
            .name(format!("apply-{}", v.name))
            .spawn(move || apply::run(v, log, snapshots, stop, applier))
            .map(drop)
            .map_err(|e| ReplicaError::Volume { name: "apply".into(), reason: e.to_string() })
    }

    /// A volume added to this replica while it runs: opened, its snapshot store too, caught up
    /// from the DR log (a volume it served before keeps its image and position), applied from
    /// then on.
    fn add_volume(&self, new: &NodeConfig, name: &str) -> Result<(), String> {
        let view = new.volumes.iter().find(|v| v.name == name).expect("an added volume is in the new configuration");
        let (node, dir) = &self.open_args;
        let v = Arc::new(open_volume(node, dir, view, &self.drlog).map_err(|e| format!("{e}; at the next restart"))?);
        self.snapshots.add(dir, &v).map_err(|e| format!("its snapshot store: {e}; at the next restart"))?;
        let applier = apply::catch_up(&v, &self.drlog, self.snapshots.as_ref()).map_err(|e| e.to_string())?;
        self.volumes.write().expect("volumes").insert(v.id, v.clone());
        self.spawn_apply(v, applier).map_err(|e| e.to_string())?;
        tracing::info!(volume = %name, "volume added to the running replica");
        Ok(())
    }

    /// A volume removed from this replica while it runs: its apply stops and staging's relay is
    /// refused from now on; its image, snapshots and positions stay on disk. Refused while it is
    /// failed over.
    fn remove_volume(&self, old: &NodeConfig, name: &str) -> Result<(), String> {
        let id = old.volumes.iter().find(|v| v.name == name).map(|v| v.volume.id).expect("a removed volume was there");
        let Some(v) = self.volume(id).filter(|v| v.name == name) else { return Ok(()) };
        if self.failovers.status(&v).is_some() {
            return Err("it is failed over (drv failover end first); at the next restart".into());
        }
        self.volumes.write().expect("volumes").remove(&id);
        v.retire();
        // Its records no longer hold the DR log back (nor do those of a relay frame in flight).
        self.drlog.retire_volume(id);
        tracing::info!(volume = %name, "volume removed from the running replica (its files stay)");
        Ok(())
    }

    /// Applies a newer configuration of this node while it runs: volumes added and removed, a
    /// volume's retention window, snapshot store limit and check schedule. Returns what waits
    /// for a restart, in words (a target, key or size, the endpoint).
    pub fn apply_config(&self, old: &NodeConfig, new: &NodeConfig) -> Vec<String> {
        use drv_config::diff::Change;
        let mut pending = Vec::new();
        for c in drv_config::diff::in_order(drv_config::diff::node_changes(old, new)) {
            let done = match &c {
                Change::VolumeAdded(name) => self.add_volume(new, name),
                Change::VolumeRemoved(name) => self.remove_volume(old, name),
                Change::VolumeChanged { name, fields } => self.change_volume(old, new, name, fields),
                _ => Err("at the next restart".to_owned()),
            };
            if let Err(why) = done {
                pending.push(format!("{c} ({why})"));
            }
        }
        pending
    }

    fn change_volume(&self, old: &NodeConfig, new: &NodeConfig, name: &str, fields: &[String]) -> Result<(), String> {
        let find = |n: &NodeConfig| n.volumes.iter().find(|v| v.name == name).cloned();
        let (Some(o), Some(n)) = (find(old), find(new)) else { return Ok(()) };
        let mine = |v: &drv_config::VolumeView| v.volume.targets.get(&self.name).cloned();
        let restart: Vec<&str> = fields
            .iter()
            .map(String::as_str)
            .filter(|f| {
                ["size_bytes", "key", "block_bytes", "id"].contains(f) || (*f == "targets" && mine(&o) != mine(&n))
            })
            .collect();
        if !restart.is_empty() {
            return Err(format!("{} at the next restart", restart.join(", ")));
        }
        let Some(v) = self.volume(n.volume.id) else { return Err("not served here; at the next restart".into()) };
        let limits = apply::Limits::of(&n.volume);
        if limits != v.limits() {
            if limits.snapshot_bytes_limit != v.limits().snapshot_bytes_limit {
                self.snapshots.set_limit(&v, limits.snapshot_bytes_limit);
            }
            v.set_limits(limits);
            tracing::info!(volume = %name, ?limits, "volume limits changed");
        }
        Ok(())
    }

    /// Applies every complete epoch the DR log holds (replaying one a crash interrupted).
    pub fn catch_up(&self) -> Result<Vec<(u64, apply::Applier)>, ReplicaError> {
        let mut out = Vec::new();
        for v in self.volume_list() {
            let a = apply::catch_up(&v, &self.drlog, self.snapshots.as_ref())
                .map_err(|err| ReplicaError::Apply { name: v.name.clone(), err: Box::new(err) })?;
            let s = v.state.lock().expect("apply state");
            tracing::info!(volume = %v.name, applied_seq = s.applied.seq, applied_epoch = s.applied.epoch, "caught up from the DR log");
            drop(s);
            out.push((v.id, a));
        }
        Ok(out)
    }

    pub async fn run(self: Arc<Self>, addr: SocketAddr) -> Result<(), ReplicaError> {
        let (me, rt) = (self.clone(), tokio::runtime::Handle::current());
        tokio::task::spawn_blocking(move || {
            let volumes = me.volumes.read().expect("volumes").clone();
            me.failovers.resume(&me.snapshots, &volumes, &rt)
        })
        .await
        .map_err(|e| ReplicaError::Volume { name: "failover".into(), reason: e.to_string() })?;
        for (id, applier) in self.catch_up()? {
            let v = self.volume(id).expect("caught up");
            self.spawn_apply(v, applier)?;
        }
        self.ready.send_replace(true);
        self.spawn_check_schedule()?;
        let server = quic::server_with(addr, &self.identity, &[Role::Staging, Role::Admin], &self.quic)?;
        tracing::info!(%addr, "replica server {} listening", self.name);
        let me = self.clone();
        serve::accept_loop(
            server,
            self.max_connections,
            self.frame_bytes_limit,
            self.peers.clone(),
            move |mut r, out| {
                let me = me.clone();
                async move { me.serve_stream(&mut r, &out).await }
            },
        )
        .await;
        Ok(())
    }

    async fn serve_stream<R: tokio::io::AsyncRead + Unpin>(
        self: &Arc<Self>,
        r: &mut FrameReader<R>,
        out: &Outbox,
    ) -> Result<(), StreamError> {
        let mut volume: Option<Arc<ReplicaVolume>> = None;
        // Tasks that live as long as this stream (aborted on every way out).
        struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                for h in &self.0 {
                    h.abort();
                }
            }
        }
        let mut tasks = AbortOnDrop(Vec::new());
        while let Some(frame) = r.next().await? {
            match frame {
                Frame::StatusRequest => {
                    let _ = out.send(Frame::StatusReply { json: self.status_json().to_string().into_bytes() });
                }
                Frame::SnapshotRequest { volume_id, op, arg, name } => {
                    let _ = out.send(self.snapshot(volume_id, op, arg, name).await);
                }
                Frame::MediaRequest { volume_id, op, arg } => {
                    let _ = out.send(self.media(volume_id, op, arg).await);
                }
                Frame::RelayOpen { volume_id } => {
                    let Some(v) = self.volume(volume_id) else {
                        let _ = out.send(self.unknown(volume_id));
                        continue;
                    };
                    tasks.0.push(relay_open(&v, out).await?);
                    volume = Some(v);
                }
                Frame::Records { volume_id, count, bytes } => {
                    let Some(v) = volume.as_ref().filter(|v| v.id == volume_id) else {
                        return Err(StreamError::NoRelayOpen(volume_id));
                    };
                    if v.is_retired() {
                        // Removed from this replica's configuration while its relay was open.
                        let _ = out.send(self.unknown(volume_id));
                        return Ok(());
                    }
                    self.wait_for_room(v, bytes.len() as u64).await?;
                    self.log_records(v, count, &bytes, out)?;
                }
                other => return Err(StreamError::Unexpected(other.ftype())),
            }
        }
        Ok(())
    }

    fn unknown(&self, volume_id: u64) -> Frame {
        Frame::Error {
            code: code::UNKNOWN_VOLUME,
            message: format!("volume {volume_id} is not configured on replica {}", self.name),
        }
    }

    /// A snapshot request: the reply.
    async fn snapshot(self: &Arc<Self>, volume_id: u64, op: u8, arg: u64, name: String) -> Frame {
        use drv_format::frame::snapshot_op;
        use snapshot::SnapshotError as E;
        let Some(v) = self.volume(volume_id) else { return self.unknown(volume_id) };
        let snaps = self.snapshots.clone();
        fn json<T: serde::Serialize>(x: &T) -> Vec<u8> {
            serde_json::to_vec(x).expect("serializable")
        }
        if let Some(reply) = self.serving(&v, &snaps, op, arg, &name).await {
            return reply;
        }
        let (me, rt) = (self.clone(), tokio::runtime::Handle::current());
        let r = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, E> {
            Ok(match op {
                snapshot_op::CHECK => json(&me.checks.run(&snaps, &v, &name, false, rt).map_err(E::Refused)?),
                snapshot_op::FAILOVER | snapshot_op::FAILOVER_AT_SEQ | snapshot_op::FAILOVER_AT_TIME => {
                    let at = match op {
                        snapshot_op::FAILOVER_AT_SEQ => Some(At::Seq(arg)),
                        snapshot_op::FAILOVER_AT_TIME => Some(At::Time(arg)),
                        _ => None,
                    };
                    json(&me.failovers.start(&snaps, &v, at, name == "test", rt).map_err(E::Refused)?)
                }
                snapshot_op::FAILOVER_STATUS => json(&me.failovers.status(&v)),
                snapshot_op::FAILOVER_END => json(&me.failovers.end(&snaps, &v, arg & 1 != 0).map_err(E::Refused)?),
                snapshot_op::CREATE => json(&snaps.create(&v, &name, None)?),
                snapshot_op::CREATE_AT_SEQ => json(&snaps.create(&v, &name, Some(At::Seq(arg)))?),
                snapshot_op::CREATE_AT_TIME => json(&snaps.create(&v, &name, Some(At::Time(arg)))?),
                snapshot_op::DELETE => {
                    let d = snaps.delete(&v, &name)?;
                    me.checks.forget(&v, &name);
                    json(&d)
                }
                snapshot_op::DIGEST => json(&snaps.digest(&v, &name)?),
                snapshot_op::POINTS => json(&snaps.points(&v, arg.min(10_000) as usize)?),
                _ => json(&me.with_checks(&v, snaps.list(&v, true)?)),
            })
        })
        .await;
        match r {
            Ok(Ok(json)) => Frame::SnapshotReply { json },
            Ok(Err(e @ E::Refused(_))) => Frame::Error { code: code::BUSY, message: e.to_string() },
            Ok(Err(e @ (E::BadName(_) | E::Exists(..) | E::NotFound { .. } | E::Store(CowError::NoPoint(_))))) => {
                Frame::Error { code: code::INVALID, message: e.to_string() }
            }
            Ok(Err(e)) => Frame::Error { code: code::SERVER, message: e.to_string() },
            Err(e) => Frame::Error { code: code::SERVER, message: format!("snapshot task: {e}") },
        }
    }

    /// The snapshot operations that start or stop serving an image (export, mount), and a delete
    /// refused while one is served: the reply; `None` for the others.
    async fn serving(
        self: &Arc<Self>,
        v: &Arc<ReplicaVolume>,
        snaps: &Arc<Snapshots>,
        op: u8,
        arg: u64,
        name: &str,
    ) -> Option<Frame> {
        use drv_format::frame::snapshot_op;
        fn reply<T: serde::Serialize>(r: Result<T, String>) -> Frame {
            match r {
                Ok(x) => Frame::SnapshotReply { json: serde_json::to_vec(&x).expect("serializable") },
                Err(message) => Frame::Error { code: code::BUSY, message },
            }
        }
        let writable = arg & snapshot_op::WRITABLE != 0;
        Some(match op {
            snapshot_op::EXPORT => {
                let Some((snap, listen)) = name.split_once(' ') else {
                    return Some(Frame::Error { code: code::INVALID, message: "export: NAME ADDRESS expected".into() });
                };
                let overlays = writable.then(|| self.dir.join("overlays"));
                let reuse = arg & snapshot_op::REUSE != 0;
                reply(self.exports.start(snaps.clone(), v.clone(), snap, listen, overlays.as_deref(), reuse).await)
            }
            snapshot_op::UNEXPORT => reply(self.exports.stop(v, name)),
            snapshot_op::MOUNT | snapshot_op::UNMOUNT => {
                let (me, snaps, v, name) = (self.clone(), snaps.clone(), v.clone(), name.to_owned());
                let rt = tokio::runtime::Handle::current();
                let r = tokio::task::spawn_blocking(move || {
                    if op == snapshot_op::MOUNT {
                        me.mounts.start(snaps, v, &name, writable, rt)
                    } else {
                        me.mounts.stop(&v, &name)
                    }
                })
                .await
                .unwrap_or_else(|e| Err(format!("mount task: {e}")));
                reply(r)
            }
            snapshot_op::DELETE => {
                let served = self
                    .exports
                    .exported(v, name)
                    .map(|at| format!("exported over NBD on {at}: `drv snapshot unexport` it first"))
                    .or_else(|| {
                        self.mounts.mounted(v, name).map(|d| format!("mounted as {d}: `drv snapshot unmount` it first"))
                    })
                    .or_else(|| {
                        self.failovers
                            .uses(v, name)
                            .then(|| format!("the point of {}'s failover: `drv failover end` ends it", v.name))
                    })?;
                Frame::Error { code: code::BUSY, message: format!("snapshot {name} of {} is {served}", v.name) }
            }
            _ => return None,
        })
    }

    /// A media-resync request: the reply.
    async fn media(&self, volume_id: u64, op: u8, arg: u64) -> Frame {
        let Some(v) = self.volume(volume_id) else { return self.unknown(volume_id) };
        let v = v.clone();
        // A backup copied onto the target passes by the apply step, and so by the snapshot store:
        // the snapshots would read the backup's blocks as theirs.
        let snapshots = self.snapshots.list(&v, false).map(|l| l.len()).unwrap_or(0);
        if op == drv_format::frame::media_op::BEGIN && snapshots > 0 {
            return Frame::Error {
                code: code::BUSY,
                message: format!(
                    "volume {} has {snapshots} snapshot(s): a media resync writes the target outside the replica, under them; delete them first (`drv snapshot list`)",
                    v.name
                ),
            };
        }
        let snaps = self.snapshots.clone();
        let step = move || {
            let r = media_step(&v, op, arg);
            if op == drv_format::frame::media_op::BEGIN && r.is_ok() {
                // The backup is copied onto the target outside the apply step: the window's
                // points would read its blocks as theirs. Closed now (the media phase keeps it
                // closed) and opened again once the volume is consistent.
                snaps.close_window(&v);
            }
            r
        };
        match tokio::task::spawn_blocking(step).await {
            Ok(Ok(r)) => Frame::MediaReply { json: serde_json::to_vec(&r).expect("serializable") },
            Ok(Err(e @ MediaError::Phase { .. })) => Frame::Error { code: code::BUSY, message: e.to_string() },
            Ok(Err(e)) => Frame::Error { code: code::SERVER, message: e.to_string() },
            Err(e) => Frame::Error { code: code::SERVER, message: format!("media task: {e}") },
        }
    }

    /// Waits until the DR log has room for `bytes` more (plus a segment of slack for batch
    /// overhead): the DR log frees space only as the apply step confirms what it applied. While
    /// this stream waits it reads nothing more, so QUIC flow control and staging's in-flight limit
    /// hold the relay back: a full DR log is backpressure, never a refused record.
    async fn wait_for_room(&self, v: &ReplicaVolume, bytes: u64) -> Result<(), StreamError> {
        let need = bytes + self.drlog.status().segment_bytes;
        if need > self.drlog.capacity_bytes() / 2 {
            return Err(StreamError::DrLogTooSmall { bytes, capacity: self.drlog.capacity_bytes() });
        }
        let mut applied = v.applied_tx.subscribe();
        let mut waited = false;
        while self.drlog.room_bytes() < need {
            if !waited {
                tracing::debug!(volume = v.id, room = self.drlog.room_bytes(), need, "DR log full: waiting for apply");
                waited = true;
            }
            // Apply progress frees space; the timeout covers the trim that follows it.
            let _ = tokio::time::timeout(std::time::Duration::from_millis(10), applied.changed()).await;
        }
        Ok(())
    }

    /// Logs a Records frame in the DR log (sequence checked), and reports the position once the
    /// frame's last record is durable.
    fn log_records(
        &self,
        v: &Arc<ReplicaVolume>,
        count: u32,
        bytes: &bytes::Bytes,
        out: &Outbox,
    ) -> Result<(), StreamError> {
        // The frame decoder already checked every record (header and payload checksums, volume);
        // here the header is decoded again only to find the boundaries.
        let mut at = 0usize;
        let mut batch = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let h = RecordHeader::decode(&bytes[at..]).map_err(StreamError::BadRecord)?;
            // A view into the frame body: the payload is copied once, into the DR log's batch.
            let payload = bytes.slice(at + RECORD_HEADER_LEN..at + h.record_len());
            debug_assert!(h.check_payload(&payload).is_ok(), "frame decoder checked the payload");
            at += h.record_len();
            batch.push((h, payload));
        }
        let mut st = v.state.lock().expect("apply state");
        let mut last = None;
        let mut to_log = Vec::new();
        for (h, payload) in batch {
            let seq = h.desc.volume_seq;
            if h.desc.flags.contains(Flags::FULL) && seq > st.seq.submitted() + 1 {
                // Relayed only to a replica that reported holding nothing of the volume.
                v.rebase(&mut st, &self.drlog, seq, h.desc.epoch).map_err(|why| StreamError::Rebase {
                    volume: v.id,
                    seq,
                    why,
                })?;
            }
            match st.seq.admit(seq, h.desc.epoch) {
                Ok(Admit::Append) => {}
                Ok(Admit::Duplicate) => continue, // already logged (a resend after reconnect)
                Err(refusal) => return Err(StreamError::Refused { volume: v.id, refusal }),
            }
            last = Some(seq);
            to_log.push((h, payload));
        }
        let Some(last) = last else {
            let _ = out.send(Frame::ReplicaPosition {
                volume_id: v.id,
                durable_seq: st.seq.durable(),
                applied_seq: st.applied.seq,
            });
            return Ok(());
        };
        // Submitted under the volume's lock: the DR log holds the volume in sequence order.
        for (h, payload) in to_log {
            let seq = h.desc.volume_seq;
            let (v2, out2) = (v.clone(), out.clone());
            self.drlog
                .submit_sealed(
                    h.desc,
                    payload,
                    h.payload_crc,
                    Box::new(move |r| match r {
                        Ok(_) => {
                            v2.logged(seq);
                            if seq == last {
                                let applied = v2.state.lock().expect("apply state").applied.seq;
                                let _ = out2.send(Frame::ReplicaPosition {
                                    volume_id: v2.id,
                                    durable_seq: seq,
                                    applied_seq: applied,
                                });
                            }
                        }
                        Err(e) => {
                            tracing::error!(volume = v2.id, seq, "DR log append failed: {e}");
                            v2.state.lock().expect("apply state").seq.failed(seq);
                            let _ = out2.send(Frame::Error { code: code::SERVER, message: format!("DR log: {e}") });
                        }
                    }),
                )
                .hand_off();
        }
        drop(st);
        Ok(())
    }

    pub fn status_json(&self) -> serde_json::Value {
        serde_json::to_value(self.status()).expect("status serializes")
    }

    pub fn status(&self) -> ReplicaStatus {
        let vs = self.volume_list();
        let d = self.drlog.status();
        ReplicaStatus {
            role: "replica".into(),
            name: self.name.clone(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            peers: self.peers.list(),
            volumes: vs.iter().map(|v| self.volume_status(v)).collect(),
            drlog: DrLogSummary {
                first_lsn: d.first_lsn,
                durable_lsn: d.durable_lsn,
                used_segments: d.used_segments,
                total_segments: d.total_segments,
                cache_bytes: d.cache_bytes,
                failed: d.failed,
            },
        }
    }

    fn volume_status(&self, v: &ReplicaVolume) -> status::ReplicaVolume {
        let media = v.media.lock().expect("media").phase;
        let s = v.state.lock().expect("apply state").clone();
        let state = if s.error.is_some() {
            VolumeState::Error
        } else if v.held.load(std::sync::atomic::Ordering::Relaxed) {
            VolumeState::FailedOver
        } else if media.is_some() {
            VolumeState::MediaResync
        } else if s.resyncing {
            VolumeState::Resyncing
        } else {
            VolumeState::Replicating
        };
        status::ReplicaVolume {
            volume_id: v.id,
            name: v.name.clone(),
            target: v.target_path.display().to_string(),
            state,
            media,
            received_seq: s.seq.submitted(),
            durable_seq: s.seq.durable(),
            applied_seq: s.applied.seq,
            applied_epoch: s.applied.epoch,
            apply_lag_records: s.seq.durable().saturating_sub(s.applied.seq),
            pending_records: s.pending_records,
            applied_units: s.applied_units,
            error: s.error,
            snapshots: self.with_checks(v, self.snapshots.list(v, false).unwrap_or_default()),
            snapshot_store_bytes: self.snapshots.store_bytes(v),
            window: self.snapshots.window_summary(v),
            check_interval_secs: v.limits().check_interval_secs,
            last_check: self.checks.last(v),
            failover: self.failovers.status(v),
        }
    }

    /// Snapshots with their newest recovery check.
    fn with_checks(&self, v: &ReplicaVolume, mut l: Vec<status::SnapshotInfo>) -> Vec<status::SnapshotInfo> {
        for s in &mut l {
            s.check = self.checks.of_snapshot(v, &s.name);
        }
        l
    }

    /// Scheduled recovery checks (`check_interval`): a thread that looks every few seconds for a
    /// volume whose check is due, and runs it (one at a time).
    fn spawn_check_schedule(self: &Arc<Self>) -> Result<(), ReplicaError> {
        // Always: a volume's check_interval may be set while the server runs.
        let (me, rt) = (self.clone(), tokio::runtime::Handle::current());
        std::thread::Builder::new()
            .name("checks".into())
            .spawn(move || {
                while !me.stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    for v in me.volume_list().iter().filter(|v| me.checks.due(v, now)) {
                        if let Some(Err(e)) = me.checks.scheduled(&me.snapshots, v, rt.clone()) {
                            tracing::error!(volume = %v.name, "scheduled recovery check: {e}");
                        }
                    }
                    std::thread::sleep(std::time::Duration::from_secs(5));
                }
            })
            .map(drop)
            .map_err(|e| ReplicaError::Volume { name: "checks".into(), reason: e.to_string() })
    }
}

/// A relay stream opens volume `v`: reports its durable position once what was submitted is
/// durable, then the applied position as it moves (staging's status shows it), from a task that
/// lives as long as the stream.
async fn relay_open(v: &Arc<ReplicaVolume>, out: &Outbox) -> Result<tokio::task::JoinHandle<()>, StreamError> {
    let v2 = v.clone();
    let (durable, applied) = tokio::task::spawn_blocking(move || {
        let mut s = v2.state.lock().expect("apply state");
        while s.seq.durable() < s.seq.submitted() {
            s = v2.changed.wait_timeout(s, std::time::Duration::from_millis(50)).expect("state").0;
        }
        (s.seq.durable(), s.applied.seq)
    })
    .await
    .map_err(|err| StreamError::Task { what: "relay open", err })?;
    let _ = out.send(Frame::ReplicaPosition { volume_id: v.id, durable_seq: durable, applied_seq: applied });
    let (v2, out2) = (v.clone(), out.clone());
    Ok(tokio::spawn(async move {
        let mut rx = v2.applied_tx.subscribe();
        while rx.changed().await.is_ok() {
            let applied = *rx.borrow_and_update();
            let durable = v2.state.lock().expect("apply state").seq.durable();
            let p = Frame::ReplicaPosition { volume_id: v2.id, durable_seq: durable, applied_seq: applied };
            if out2.send(p).is_err() {
                return;
            }
        }
    }))
}

/// One media-resync step on volume `v`, at a unit boundary (the apply gate is held).
fn media_step(v: &ReplicaVolume, op: u8, arg: u64) -> Result<MediaReport, MediaError> {
    let _gate = v.apply_gate.lock().expect("apply gate");
    let mut m = v.media.lock().expect("media");
    let applied = v.state.lock().expect("apply state").applied.seq;
    match op {
        media_op::BEGIN => m.begin(applied),
        media_op::COMPLETE => m.complete(applied, arg),
        media_op::RELEASE => {
            let r = m.release(arg)?;
            // Already applied that far: finished at once.
            m.applied(applied)?;
            Ok(MediaReport { phase: m.phase, ..r })
        }
        _ => Ok(m.report(Vec::new(), None)),
    }
}

impl Drop for ReplicaServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
