//! The staging server (`drv staging run`): accepts agents on the agent link (TLS over TCP, a thread
//! per connection, `drv_transport::link`), logs their writes in the volume's WRL and acknowledges
//! them after group commit; relays every volume to its replicas (`relay.rs`); answers status
//! requests (on mTLS QUIC, the admin role, and on the link). Agents' writes come only on the link:
//! one agent transport.
//!
//! On the link, a connection's thread takes every frame already received, submits the writes, and
//! then commits them itself if the WRL's committer is idle (`Submitted::commit_here`) and sends the
//! acknowledgements: at low load a write's path has no thread hand-off on this side at all.
//!
//! Per volume, writes are taken in sequence: a retried sequence number is acknowledged again (once it
//! is durable) without a second append; a gap is refused naming both positions; an epoch going
//! backwards is refused. Appends of one volume are submitted in order, under the volume's lock, so
//! the WRL holds them in sequence order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use drv_config::{NodeConfig, VolumeView};
use drv_format::crypto::VolumeKey;
use drv_format::frame::{Frame, code};
use drv_format::record::Flags;
use drv_proto::status::{ReplicaLink, StagingStatus, StagingVolume, WrlSummary};
use drv_proto::{Admit, Refusal, Sequencer};
use drv_transport::link::{Link, LinkReader};
use drv_transport::{FrameReader, Identity, Outbox, Role, quic, serve, tls};
use tokio::sync::watch;

use drv_wrl::storage::{FileStorage, Storage, create_files};
use drv_wrl::{self as wrl, AppendRequest, CreateOptions, Submitted, Wrl, WrlError, WrlOptions};

/// Where a link's answers go.
trait Reply {
    fn reply(&self, f: Frame);
}

impl Reply for Arc<Link> {
    fn reply(&self, f: Frame) {
        let _ = self.send(&f);
    }
}

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("WRL {name}: {err}")]
    Wrl { name: String, err: Box<WrlError> },
    #[error("volume {name}: {reason}")]
    Volume { name: String, reason: String },
    #[error(transparent)]
    Transport(#[from] drv_transport::TransportError),
    #[error("endpoint {endpoint}: address {address:?} does not resolve to a socket address (HOST:PORT)")]
    Address { endpoint: String, address: String },
}

/// One replica of a volume, as the relay sees it.
#[derive(Debug, Default)]
pub struct ReplicaProgress {
    pub connected: bool,
    /// Highest sequence sent to the replica.
    pub sent_seq: u64,
    /// Highest sequence durable in the replica's DR log.
    pub durable_seq: u64,
    pub applied_seq: u64,
    /// WRL lsn of `durable_seq` (what may be trimmed for this replica).
    pub durable_lsn: u64,
    pub reconnects: u64,
    /// It holds nothing and waits for a run that ships every block (`RelayWindow::seeking`).
    pub waiting_full_sync: bool,
}

/// Per-volume state on the staging server.
pub struct VolumeCtx {
    pub id: u64,
    pub name: String,
    pub wrl: Arc<Wrl>,
    pub wrl_name: String,
    pub key: VolumeKey,
    /// (name, address, the largest frame body it accepts): the relays it has.
    pub replicas: Mutex<Vec<(String, SocketAddr, u32)>>,
    /// Removed from the configuration: writes are refused (a link may still hold it).
    pub retired: std::sync::atomic::AtomicBool,
    /// The volume's sequence gate and positions (submitted in order, durable).
    pub seq: Mutex<Sequencer>,
    /// Durable sequence, for retried writes waiting on an in-flight original.
    pub durable_tx: watch::Sender<u64>,
    pub progress: Mutex<BTreeMap<String, ReplicaProgress>>,
    /// (seq, payload bytes, time acknowledged) of records not yet durable on every replica.
    pub unreplicated: Mutex<VecDeque<(u64, u64, Instant)>>,
    /// Payload bytes made durable in the WRL, and made durable on every replica, since start.
    pub written_bytes: std::sync::atomic::AtomicU64,
    pub replicated_bytes: std::sync::atomic::AtomicU64,
    /// Replication paused by the configuration: writes are logged, none relayed.
    pub paused: std::sync::atomic::AtomicBool,
}

/// Caps the lag bookkeeping (entries); beyond it the oldest entries are dropped and lag in
/// records/bytes is taken from the sequence numbers alone.
const UNREPLICATED_ENTRIES_LIMIT: usize = 1 << 20;

impl VolumeCtx {
    /// Records every replica holds durably now: confirm them to the WRL (which trims).
    pub fn confirm_replicated(&self) {
        let (min_seq, min_lsn) = {
            let p = self.progress.lock().expect("progress");
            let seq = p.values().map(|r| r.durable_seq).min().unwrap_or(0);
            let lsn = p.values().map(|r| r.durable_lsn).min().unwrap_or(0);
            (seq, lsn)
        };
        if min_lsn > 0 {
            self.wrl.confirm(self.id, min_lsn);
        }
        let mut u = self.unreplicated.lock().expect("unreplicated");
        let mut done = 0;
        while u.front().is_some_and(|e| e.0 <= min_seq) {
            done += u.pop_front().map_or(0, |e| e.1);
        }
        self.replicated_bytes.fetch_add(done, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Shared server state.
pub struct Staging {
    pub name: String,
    /// The volumes served now (the configuration adds and removes them while running).
    pub volumes: RwLock<HashMap<u64, Arc<VolumeCtx>>>,
    /// The relay task of each (volume, replica).
    relays: Mutex<HashMap<(u64, String), tokio::task::AbortHandle>>,
    pub wrls: BTreeMap<String, Arc<Wrl>>,
    /// Signalled after every durable append, so relays wake up.
    pub appended: Arc<tokio::sync::Notify>,
    pub identity: Identity,
    pub frame_bytes_limit: u32,
    pub inflight_bytes_limit: u64,
    pub max_connections: u32,
    pub quic: quic::QuicOptions,
    pub peers: Arc<serve::Peers>,
    started: Instant,
}

fn parse_addr(endpoint: &str, a: &str) -> Result<SocketAddr, ServerError> {
    use std::net::ToSocketAddrs;
    a.to_socket_addrs()
        .ok()
        .and_then(|mut i| i.next())
        .ok_or_else(|| ServerError::Address { endpoint: endpoint.to_owned(), address: a.to_owned() })
}

/// Opens (creating where configured) the WRLs of this node.
fn open_wrls(node: &NodeConfig) -> Result<BTreeMap<String, Arc<Wrl>>, ServerError> {
    let mut out = BTreeMap::new();
    for (name, def) in &node.wrls {
        let err = |err| ServerError::Wrl { name: name.clone(), err: Box::new(err) };
        let paths: Vec<&Path> = def.devices.iter().map(Path::new).collect();
        let missing: Vec<&Path> = paths.iter().copied().filter(|p| !p.exists()).collect();
        match def.device_bytes {
            Some(n) if missing.len() == paths.len() => create_wrl(def, &paths, n).map_err(err)?,
            _ if !missing.is_empty() && missing.len() < paths.len() => {
                return Err(err(WrlError::DeviceMismatch {
                    device: missing.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
                    reason: format!(
                        "does not exist while the WRL's other devices do: a WRL needs all of its devices{}",
                        if def.device_bytes.is_some() { " (they are created only when none exists)" } else { "" }
                    ),
                }));
            }
            _ => {}
        }
        let devs: Vec<Arc<dyn Storage>> = paths
            .iter()
            .map(|p| FileStorage::open(p).map(|s| Arc::new(s) as Arc<dyn Storage>).map_err(|e| err(e.into())))
            .collect::<Result<_, _>>()?;
        let opts = WrlOptions {
            queue_bytes_limit: def.queue_bytes_limit,
            batch_bytes_limit: def.batch_bytes_limit,
            cache_bytes_limit: def.cache_bytes_limit,
        };
        let (w, rec) = Wrl::open(devs, opts).map_err(err)?;
        if w.wrl_id() != def.id {
            return Err(err(WrlError::Geometry(format!(
                "the devices hold WRL id {} but the configuration says {}",
                w.wrl_id(),
                def.id
            ))));
        }
        tracing::info!(wrl = %name, first_lsn = rec.first_lsn, last_lsn = rec.last_lsn, tail = ?rec.tail, "WRL recovered");
        out.insert(name.clone(), Arc::new(w));
    }
    Ok(out)
}

/// Creates the device files of WRL `def` (`bytes` each) and formats them; nothing is left behind
/// when that fails (`storage::create_files`).
fn create_wrl(def: &drv_config::WrlDef, paths: &[&Path], bytes: u64) -> Result<(), WrlError> {
    for dir in paths.iter().filter_map(|p| p.parent()).filter(|d| !d.as_os_str().is_empty()) {
        // What earlier starts that died half-way left (their own process is gone).
        let _ = drv_files::sweep_temps(dir);
    }
    let mut uuid = [0u8; 16];
    uuid[..8].copy_from_slice(&(def.id as u64).to_le_bytes());
    uuid[8..].copy_from_slice(
        &(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64)
            .to_le_bytes(),
    );
    let opts = CreateOptions {
        uuid,
        wrl_id: def.id,
        segment_bytes: def.segment_bytes,
        io_align: 4096,
        capacity_bytes: def.capacity_bytes,
    };
    create_files(paths, bytes, |devs| wrl::create(devs, &opts))?;
    tracing::info!("created WRL {} on {:?}", def.id, def.devices);
    Ok(())
}

impl Staging {
    pub fn new(node: &NodeConfig, identity: Identity) -> Result<Arc<Staging>, ServerError> {
        let wrls = open_wrls(node)?;
        let mut volumes = HashMap::new();
        for v in &node.volumes {
            let ctx = volume_ctx(v, &wrls)?;
            volumes.insert(ctx.id, Arc::new(ctx));
        }
        Ok(Arc::new(Staging {
            name: node.name.clone(),
            volumes: RwLock::new(volumes),
            relays: Mutex::default(),
            wrls,
            appended: Arc::new(tokio::sync::Notify::new()),
            identity,
            frame_bytes_limit: node.endpoint.frame_bytes_limit.min(u32::MAX as u64) as u32,
            inflight_bytes_limit: node.endpoint.inflight_bytes_limit,
            max_connections: node.endpoint.max_connections,
            quic: quic::QuicOptions { max_mtu: node.endpoint.max_mtu, ..Default::default() },
            peers: Arc::default(),
            started: Instant::now(),
        }))
    }

    /// Serves agents and status requests on `addr` and relays every volume, until the task is dropped.
    pub async fn run(self: Arc<Self>, addr: SocketAddr) -> Result<(), ServerError> {
        // QUIC: status for administrators. Agents write on the link.
        let server = quic::server_with(addr, &self.identity, &[Role::Admin], &self.quic)?;
        // The agent link: TCP at the same port number.
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            drv_transport::TransportError::Endpoint(format!("agent link: cannot listen on TCP {addr}: {e}"))
        })?;
        let link_cfg = tls::server_config(&self.identity, &[Role::Agent, Role::Admin])?;
        tracing::info!(%addr, "staging server {} listening (the agent link on TCP, status on QUIC)", self.name);
        let (me, rt) = (self.clone(), tokio::runtime::Handle::current());
        tokio::spawn(serve::link_accept_loop(
            listener,
            link_cfg,
            self.max_connections,
            self.frame_bytes_limit,
            self.peers.clone(),
            move |mut r, link| me.serve_link(&mut r, &link, &rt),
        ));
        for v in self.volume_list() {
            for r in v.replicas.lock().expect("replicas").clone() {
                self.spawn_relay(&v, r);
            }
        }
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

    /// A QUIC stream: status requests only.
    async fn serve_stream<R: tokio::io::AsyncRead + Unpin>(
        self: &Arc<Self>,
        r: &mut FrameReader<R>,
        out: &Outbox,
    ) -> Result<(), drv_transport::TransportError> {
        while let Some(frame) = r.next().await? {
            let answer = match frame {
                Frame::StatusRequest => Frame::StatusReply { json: self.status_json().to_string().into_bytes() },
                other => Frame::Error {
                    code: code::MALFORMED,
                    message: format!(
                        "unexpected {:?} frame on QUIC: staging takes agents' writes on the agent link (TLS over TCP at the same port)",
                        other.ftype()
                    ),
                },
            };
            let _ = out.send(answer);
        }
        Ok(())
    }

    /// The volume a connection opens, once every append of it in flight is durable (so the
    /// position reported is); `None` (and an `Error` frame) for a volume not configured here.
    async fn open_volume(&self, volume_id: u64, out: &Arc<Link>) -> Option<Arc<VolumeCtx>> {
        let Some(v) = self.volume(volume_id) else {
            out.reply(Frame::Error {
                code: code::UNKNOWN_VOLUME,
                message: format!("volume {volume_id} is not configured on staging server {}", self.name),
            });
            return None;
        };
        // A failed log: records it reported failed may still be on its devices, so its position
        // is known again only once it recovered (a restart).
        if let Some(why) = v.wrl.status().failed {
            out.reply(Frame::Error {
                code: code::SERVER,
                message: format!(
                    "volume {volume_id}: WRL {} has failed ({why}); staging takes no writes until it is restarted",
                    v.wrl_name
                ),
            });
            return None;
        }
        // Once everything submitted is durable (or failed, which moves the position back).
        let (last_seq, last_epoch) = loop {
            let mut rx = v.durable_tx.subscribe();
            {
                let s = v.seq.lock().expect("seq");
                if s.durable() >= s.submitted() {
                    break (s.submitted(), s.last_epoch());
                }
            }
            let _ = tokio::time::timeout(std::time::Duration::from_millis(50), rx.changed()).await;
        };
        out.reply(Frame::VolumeState {
            volume_id,
            last_seq,
            last_epoch,
            room_bytes: v.wrl.room_bytes(),
            capacity_bytes: v.wrl.capacity_bytes(),
        });
        Some(v.clone())
    }

    /// Serves one agent link on this (dedicated) thread. Every frame already received is handled
    /// before the writes among them are committed, so they form one batch.
    fn serve_link(
        self: &Arc<Self>,
        r: &mut LinkReader,
        out: &Arc<Link>,
        rt: &tokio::runtime::Handle,
    ) -> Result<(), drv_transport::TransportError> {
        let mut volume: Option<Arc<VolumeCtx>> = None;
        // The last append submitted and not yet committed or handed to the committer.
        let mut pending: Option<Submitted> = None;
        loop {
            let frame = match r.buffered()? {
                Some(f) => f,
                None => {
                    // Writes that arrived while the earlier ones were decoded join the batch.
                    if pending.is_some() && r.receive_ready()? {
                        continue;
                    }
                    // Committed here when the committer is idle, however many writes came
                    // together. (Handing a burst to the committer so that this thread reads on
                    // meanwhile measured 10% fewer IOPS at QD32: one more wake-up per batch.)
                    if let Some(p) = pending.take() {
                        p.commit_here();
                    }
                    match r.next_blocking()? {
                        Some(f) => f,
                        None => return Ok(()),
                    }
                }
            };
            match frame {
                Frame::StatusRequest => {
                    out.reply(Frame::StatusReply { json: self.status_json().to_string().into_bytes() })
                }
                Frame::OpenVolume { volume_id } => {
                    if let Some(p) = pending.take() {
                        p.hand_off();
                    }
                    volume = rt.block_on(self.open_volume(volume_id, out));
                }
                Frame::Write { volume_id, seq, epoch, offset, flags, capture_unix, data } => {
                    let Some(v) = volume.as_ref().filter(|v| v.id == volume_id) else {
                        out.reply(Frame::Error {
                            code: code::UNKNOWN_VOLUME,
                            message: format!("write for volume {volume_id} before OpenVolume on this link"),
                        });
                        continue;
                    };
                    // The WRL's admission limit bounds what is queued: this thread waits there,
                    // and stops reading the link meanwhile.
                    let (volume_seq, flags) = (seq, Flags(flags));
                    let req = AppendRequest { volume_id, volume_seq, epoch, offset, flags, data: &data, capture_unix };
                    if let Some(s) = self.write(v, req, out, rt) {
                        match pending.take() {
                            Some(p) if p.same_log(&s) => p.covered_by(&s),
                            Some(p) => p.hand_off(),
                            None => {}
                        }
                        pending = Some(s);
                    }
                }
                other => out.reply(Frame::Error {
                    code: code::MALFORMED,
                    message: format!("unexpected {:?} frame from an agent", other.ftype()),
                }),
            }
        }
    }

    /// Checks and submits one write; the returned append still has to be committed (or handed to
    /// the committer).
    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        v: &Arc<VolumeCtx>,
        req: AppendRequest<'_>,
        out: &Arc<Link>,
        rt: &tokio::runtime::Handle,
    ) -> Option<Submitted> {
        let refuse = |code, message: String| {
            out.reply(Frame::Error { code, message });
            None
        };
        let AppendRequest { volume_seq: seq, epoch, flags, data, .. } = req;
        if v.retired.load(std::sync::atomic::Ordering::Acquire) {
            let m = format!("volume {} was removed from the configuration of staging server {}", v.name, self.name);
            return refuse(code::UNKNOWN_VOLUME, m);
        }
        if flags.0 & !Flags::AGENT.0 != 0 {
            return refuse(code::INVALID, format!("volume {} seq {seq}: flags {:#x} are not a write's", v.id, flags.0));
        }
        // Checked before the sequence moves: a write the WRL would refuse must not leave a gap.
        let limit = v.wrl.record_bytes_limit();
        if data.len() as u64 > limit {
            return refuse(
                code::INVALID,
                format!(
                    "volume {} seq {seq}: a write of {} bytes is over WRL {}'s record limit of {limit} bytes (its segment size)",
                    v.id,
                    data.len(),
                    v.wrl_name
                ),
            );
        }
        let mut st = v.seq.lock().expect("seq");
        match st.admit(seq, epoch) {
            Ok(Admit::Append) => {}
            Ok(Admit::Duplicate) => {
                // A retry: acknowledge again once the original is durable, without a second append.
                drop(st);
                let mut rx = v.durable_tx.subscribe();
                let out = out.clone();
                let vid = v.id;
                rt.spawn(async move {
                    if rx.wait_for(|d| *d >= seq).await.is_ok() {
                        out.reply(Frame::Ack { volume_id: vid, seq, lsn: 0 });
                    }
                });
                return None;
            }
            Err(r) => {
                drop(st);
                let c = if matches!(r, Refusal::Gap { .. }) { code::SEQUENCE_GAP } else { code::INVALID };
                return refuse(c, format!("volume {} write {r}", v.id));
            }
        }
        let out2 = out.clone();
        let ctx = v.clone();
        let appended = self.appended.clone();
        let len = data.len() as u64;
        // Submitted under the volume lock: the WRL takes this volume's writes in sequence order.
        let submitted = v.wrl.submit(
            &v.key,
            req,
            Box::new(move |r| {
                match r {
                    Ok(a) => {
                        ctx.written_bytes.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                        let mut u = ctx.unreplicated.lock().expect("unreplicated");
                        if u.len() < UNREPLICATED_ENTRIES_LIMIT {
                            u.push_back((seq, len, Instant::now()));
                        }
                        drop(u);
                        // The rest once per batch and volume, at its last record: positions
                        // only move up, and acknowledgements are cumulative (each covers every
                        // earlier write of the volume; a link serves one volume).
                        if a.last_of_volume {
                            ctx.seq.lock().expect("seq").durable_through(seq);
                            ctx.durable_tx.send_modify(|d| *d = (*d).max(seq));
                            out2.reply(Frame::Ack { volume_id: ctx.id, seq, lsn: a.header.lsn });
                            appended.notify_waiters();
                        }
                    }
                    Err(e) => {
                        // Not logged: later writes of this volume would leave a gap, so the
                        // position moves back and the agent must resend from here.
                        ctx.seq.lock().expect("seq").failed(seq);
                        let c = match e {
                            WrlError::LogFull { .. } => code::LOG_FULL,
                            WrlError::OutOfOrder { .. } => code::SEQUENCE_GAP,
                            _ => code::SERVER,
                        };
                        out2.reply(Frame::Error { code: c, message: format!("volume {} seq {seq}: {e}", ctx.id) });
                    }
                }
            }),
        );
        drop(st);
        Some(submitted)
    }

    /// Volume `id`, if it is served now.
    pub fn volume(&self, id: u64) -> Option<Arc<VolumeCtx>> {
        self.volumes.read().expect("volumes").get(&id).cloned()
    }

    /// The volumes served now, by id.
    pub fn volume_list(&self) -> Vec<Arc<VolumeCtx>> {
        let mut vs: Vec<_> = self.volumes.read().expect("volumes").values().cloned().collect();
        vs.sort_by_key(|v| v.id);
        vs
    }

    /// Starts the relay of `v` to a replica (none while the volume is paused).
    fn spawn_relay(self: &Arc<Self>, v: &Arc<VolumeCtx>, (replica, addr, limit): (String, SocketAddr, u32)) {
        if v.paused.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let task = tokio::spawn(crate::relay::run(self.clone(), v.clone(), replica.clone(), addr, limit));
        if let Some(old) = self.relays.lock().expect("relays").insert((v.id, replica), task.abort_handle()) {
            old.abort();
        }
    }

    fn stop_relay(&self, v: &VolumeCtx, replica: &str) {
        if let Some(t) = self.relays.lock().expect("relays").remove(&(v.id, replica.to_owned())) {
            t.abort();
        }
    }

    /// Applies a newer configuration of this node while it runs: volumes added and removed,
    /// replicas added to and removed from a volume, a replica's address or frame limit. Returns
    /// what waits for a restart, in words (the endpoint, WRLs, a volume's key, WRL or size).
    pub fn apply_config(self: &Arc<Self>, old: &NodeConfig, new: &NodeConfig) -> Vec<String> {
        use drv_config::diff::Change;
        let mut pending = Vec::new();
        for c in drv_config::diff::in_order(drv_config::diff::node_changes(old, new)) {
            let done = match &c {
                Change::VolumeAdded(name) => self.add_volume(new, name),
                Change::VolumeRemoved(name) => self.remove_volume(old, name),
                Change::VolumeChanged { name, fields } => self.change_volume(new, name, fields),
                _ => Err("at the next restart".to_owned()),
            };
            if let Err(why) = done {
                pending.push(format!("{c} ({why})"));
            }
        }
        pending
    }

    fn add_volume(self: &Arc<Self>, new: &NodeConfig, name: &str) -> Result<(), String> {
        let view = new.volumes.iter().find(|v| v.name == name).expect("an added volume is in the new configuration");
        let ctx = Arc::new(volume_ctx(view, &self.wrls).map_err(|e| format!("{e}; at the next restart"))?);
        self.volumes.write().expect("volumes").insert(ctx.id, ctx.clone());
        for r in ctx.replicas.lock().expect("replicas").clone() {
            self.spawn_relay(&ctx, r);
        }
        tracing::info!(volume = %name, id = ctx.id, "volume added to the running staging server");
        Ok(())
    }

    fn remove_volume(&self, old: &NodeConfig, name: &str) -> Result<(), String> {
        let id = old.volumes.iter().find(|v| v.name == name).map(|v| v.volume.id).expect("a removed volume was there");
        let v = {
            let mut vols = self.volumes.write().expect("volumes");
            // Only the volume of that name (a renamed one keeps its id and is served on).
            if vols.get(&id).is_none_or(|v| v.name != name) {
                return Ok(());
            }
            vols.remove(&id).expect("there")
        };
        v.retired.store(true, std::sync::atomic::Ordering::Release);
        for (r, ..) in v.replicas.lock().expect("replicas").drain(..) {
            self.stop_relay(&v, &r);
        }
        // Its records no longer hold the log back (nor do appends that were in flight).
        v.wrl.retire_volume(v.id);
        tracing::info!(volume = %name, id, "volume removed from the running staging server");
        Ok(())
    }

    fn change_volume(self: &Arc<Self>, new: &NodeConfig, name: &str, fields: &[String]) -> Result<(), String> {
        let restart: Vec<&str> = fields
            .iter()
            .map(String::as_str)
            .filter(|f| {
                ["size_bytes", "key", "wrl", "block_bytes", "id", "staging"].contains(f) || f.starts_with("wrl ")
            })
            .collect();
        if !restart.is_empty() {
            return Err(format!("{} at the next restart", restart.join(", ")));
        }
        let Some(n) = new.volumes.iter().find(|v| v.name == name) else { return Ok(()) };
        let Some(v) = self.volume(n.volume.id) else { return Err("not served here; at the next restart".into()) };
        let want = replica_targets(n).map_err(|e| e.to_string())?;
        let have = v.replicas.lock().expect("replicas").clone();
        for r in have.iter().filter(|r| !want.contains(r)) {
            self.stop_relay(&v, &r.0);
            if !want.iter().any(|w| w.0 == r.0) {
                v.progress.lock().expect("progress").remove(&r.0);
            }
        }
        for r in want.iter().filter(|r| !have.contains(r)) {
            v.progress.lock().expect("progress").entry(r.0.clone()).or_default();
            self.spawn_relay(&v, r.clone());
        }
        *v.replicas.lock().expect("replicas") = want.clone();
        if fields.iter().any(|f| f == "paused") {
            v.paused.store(n.volume.paused, std::sync::atomic::Ordering::Release);
            for r in &want {
                if n.volume.paused {
                    self.stop_relay(&v, &r.0);
                } else {
                    self.spawn_relay(&v, r.clone());
                }
            }
            tracing::info!(volume = %name, "replication {}", if n.volume.paused { "paused" } else { "resumed" });
        }
        v.confirm_replicated();
        Ok(())
    }

    /// The status document of `drv status`.
    pub fn status_json(&self) -> serde_json::Value {
        serde_json::to_value(self.status()).expect("status serializes")
    }

    pub fn status(&self) -> StagingStatus {
        let vs = self.volume_list();
        let wrls = self.wrls.iter().map(|(name, w)| wrl_summary(name, &w.status())).collect();
        StagingStatus {
            role: "staging".into(),
            name: self.name.clone(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            peers: self.peers.list(),
            volumes: vs.iter().map(|v| volume_status(v, Instant::now())).collect(),
            wrls,
        }
    }
}

/// One volume's line of the status.
fn volume_status(v: &VolumeCtx, now: Instant) -> StagingVolume {
    let s = v.seq.lock().expect("seq").clone();
    let p = v.progress.lock().expect("progress");
    let u = v.unreplicated.lock().expect("unreplicated");
    let min_durable = p.values().map(|r| r.durable_seq).min().unwrap_or(s.durable());
    let replicas = p
        .iter()
        .map(|(name, r)| ReplicaLink {
            replica: name.clone(),
            connected: r.connected,
            sent_seq: r.sent_seq,
            durable_seq: r.durable_seq,
            applied_seq: r.applied_seq,
            reconnects: r.reconnects,
            waiting_full_sync: r.waiting_full_sync,
        })
        .collect();
    StagingVolume {
        volume_id: v.id,
        name: v.name.clone(),
        wrl: v.wrl_name.clone(),
        received_seq: s.submitted(),
        durable_seq: s.durable(),
        last_epoch: s.last_epoch(),
        replicated_seq: min_durable,
        lag_records: s.durable().saturating_sub(min_durable),
        lag_bytes: u.iter().map(|e| e.1).sum(),
        lag_seconds: u.front().map(|e| now.duration_since(e.2).as_secs_f64()).unwrap_or(0.0),
        paused: v.paused.load(std::sync::atomic::Ordering::Relaxed),
        written_bytes: v.written_bytes.load(std::sync::atomic::Ordering::Relaxed),
        replicated_bytes: v.replicated_bytes.load(std::sync::atomic::Ordering::Relaxed),
        replicas,
    }
}

fn wrl_summary(name: &str, s: &wrl::WrlStatus) -> WrlSummary {
    WrlSummary {
        wrl: name.to_owned(),
        first_lsn: s.first_lsn,
        durable_lsn: s.durable_lsn,
        trim_lsn: s.trim_lsn,
        used_segments: s.used_segments,
        total_segments: s.total_segments,
        cache_bytes: s.cache_bytes,
        appends: s.appends,
        batches: s.batches,
        cache_reads: s.cache_reads,
        disk_reads: s.disk_reads,
        failed: s.failed.clone(),
    }
}

/// Where a volume's records are relayed: (replica, address, the largest frame body it takes).
fn replica_targets(v: &VolumeView) -> Result<Vec<(String, SocketAddr, u32)>, ServerError> {
    v.replicas
        .iter()
        .map(|(n, ep)| {
            let limit = ep.frame_bytes_limit.min(drv_format::frame::MAX_FRAME_BODY as u64) as u32;
            parse_addr(n, &ep.address).map(|a| (n.clone(), a, limit))
        })
        .collect()
}

fn volume_ctx(v: &VolumeView, wrls: &BTreeMap<String, Arc<Wrl>>) -> Result<VolumeCtx, ServerError> {
    let err = |reason: String| ServerError::Volume { name: v.name.clone(), reason };
    let wrl = wrls.get(&v.wrl_name).ok_or_else(|| err(format!("its WRL {} is not on this node", v.wrl_name)))?.clone();
    let key = VolumeKey::load(v.key.key_id, Path::new(&v.key.path)).map_err(|e| err(e.to_string()))?;
    let replicas = replica_targets(v)?;
    // The durable position comes from the log itself (recovered at open); a volume the log holds
    // nothing of starts at 0, and its first write must be seq 1.
    let log = wrl.volume(v.volume.id).map(|s| s.log).unwrap_or_default();
    wrl.resume_volume(v.volume.id, log.last_seq);
    let (durable_tx, _) = watch::channel(log.last_seq);
    Ok(VolumeCtx {
        id: v.volume.id,
        name: v.name.clone(),
        wrl,
        wrl_name: v.wrl_name.clone(),
        key,
        progress: Mutex::new(replicas.iter().map(|(n, ..)| (n.clone(), ReplicaProgress::default())).collect()),
        replicas: Mutex::new(replicas),
        retired: Default::default(),
        seq: Mutex::new(Sequencer::new(log.last_seq, log.last_epoch)),
        durable_tx,
        unreplicated: Mutex::new(VecDeque::new()),
        written_bytes: Default::default(),
        replicated_bytes: Default::default(),
        paused: std::sync::atomic::AtomicBool::new(v.volume.paused),
    })
}
