//! One config server: openraft over the redb stores, its peers' RPCs served over HTTPS with
//! mutual TLS (a peer must present a `config` certificate of the installation CA, checked in the
//! handshake). Handshakes run in tasks of their own, at most [`HANDSHAKES_LIMIT`] at once with a
//! deadline, so a peer that stalls its handshake holds nobody else up.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::serve::IncomingStream;
use bytes::Bytes;
use drv_transport::tls::{https_client_config, https_server_config};
use drv_transport::{Identity, Role};
use openraft::error::{Fatal, RaftError};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::storage::Snapshot;
use openraft::{Raft, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

use crate::api::Peer;
use crate::log_store::LogStore;
use crate::network::{Network, SnapshotHeader};
use crate::state::StateMachine;
use crate::{NodeId, StorageError, TypeConfig};

/// TLS handshakes in flight at most on one listener.
pub const HANDSHAKES_LIMIT: usize = 64;
/// A handshake that takes longer is dropped.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// The largest raft request body (a whole snapshot included).
pub const RAFT_BODY_LIMIT: usize = 64 << 20;

/// What can stop a config server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("config server storage: {0}")]
    Storage(#[from] StorageError),
    #[error("config server certificates: {0}")]
    Transport(#[from] drv_transport::TransportError),
    #[error("config server raft: {0}")]
    Raft(String),
    #[error("config server listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("config server: {0}")]
    Sessions(#[from] crate::sessions::SessionError),
    #[error("config server: {0}")]
    Series(#[from] crate::series::SeriesError),
    #[error("config server: {0}")]
    Alerts(#[from] crate::alerts::AlertsError),
}

/// A server's id in the raft group: a hash of its name (its certificate's).
pub fn node_id(name: &str) -> NodeId {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes())
}

/// How often a snapshot is taken (in log entries since the last), and how many entries it
/// keeps behind: the raft log's length is bounded by about twice this plus the lag.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    pub snapshot_every: u64,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning { snapshot_every: 1000 }
    }
}

/// A running config server.
pub struct ConfigNode {
    pub id: NodeId,
    pub raft: Raft<TypeConfig>,
    /// Its state machine, for reads.
    pub state: StateMachine,
    /// What its API handlers share (its status, the components' reports).
    pub api: crate::api::Api,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
    /// Its tasks besides the listener: the monitor, the web listeners.
    web: Vec<tokio::task::JoinHandle<()>>,
}

impl ConfigNode {
    /// Starts the server of `identity` on `data` (its two redb files), serving its peers on
    /// `listener`.
    pub async fn start(
        identity: &Identity,
        data: &Path,
        listener: TcpListener,
        tuning: Tuning,
    ) -> Result<ConfigNode, ServerError> {
        let id = node_id(&identity.name);
        let config = openraft::Config {
            cluster_name: "drv-config".into(),
            heartbeat_interval: 100,
            election_timeout_min: 400,
            election_timeout_max: 800,
            // A whole snapshot goes in one request within this (ms).
            install_snapshot_timeout: 10_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(tuning.snapshot_every),
            max_in_snapshot_log_to_keep: tuning.snapshot_every,
            replication_lag_threshold: tuning.snapshot_every * 5,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ServerError::Raft(e.to_string()))?;
        std::fs::create_dir_all(data)?;
        let log = LogStore::open(&data.join("raft-log.redb"))?;
        let state = StateMachine::open(&data.join("state.redb"))?;
        let network = Network { tls: https_client_config(identity, Role::Config)? };
        let raft = Raft::new(id, Arc::new(config), network, log, state.clone())
            .await
            .map_err(|e| ServerError::Raft(e.to_string()))?;
        let addr = listener.local_addr()?;
        // Every role of the installation: each route checks the one it needs (raft: config
        // servers; changes: admins; slices and reports: the components).
        let roles = [Role::Config, Role::Admin, Role::Staging, Role::Replica, Role::Agent];
        let tls = TlsListener::spawn(listener, https_server_config(identity, &roles)?);
        let (overview_tx, overview_rx) = tokio::sync::watch::channel(Default::default());
        let (mails_tx, mails_rx) = tokio::sync::mpsc::channel(crate::alerts::MAIL_QUEUE);
        let api = crate::api::Api {
            raft: raft.clone(),
            state: state.clone(),
            name: identity.name.clone(),
            reports: Default::default(),
            sessions: crate::sessions::Sessions::open(&data.join("web.redb"), &identity.name)?,
            forward_tls: https_client_config(identity, Role::Config)?,
            series: crate::series::Series::open(&data.join("series.redb"))?,
            overview: overview_rx,
            alerts: crate::alerts::Alerts::open(&data.join("alerts.redb"))?,
            mails: mails_tx,
            mail_budget: Default::default(),
        };
        let monitor = crate::monitor::spawn(api.clone(), overview_tx);
        let mailer = crate::alerts::spawn_mailer(api.sessions.clone(), api.mail_budget.clone(), mails_rx);
        let app = router(raft.clone()).merge(crate::api::router(api.clone()));
        let server = tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<Peer>();
            if let Err(e) = axum::serve(tls, app).await {
                tracing::error!("config server listener: {e}");
            }
        });
        Ok(ConfigNode { id, raft, state, api, addr, server, web: vec![monitor, mailer] })
    }

    /// Where it serves its peers.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves users on `listener` too: HTTPS with this server's certificate, no client
    /// certificates (users log in; `auth.rs`). Stops with the server.
    pub fn serve_web(&mut self, identity: &Identity, listener: TcpListener) -> Result<SocketAddr, ServerError> {
        let addr = listener.local_addr()?;
        let tls = TlsListener::spawn(listener, drv_transport::tls::https_public_server_config(identity)?);
        let app = crate::api::router(self.api.clone()).merge(crate::web::router(self.api.clone()));
        let web = tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<Peer>();
            if let Err(e) = axum::serve(tls, app).await {
                tracing::error!("config server web listener: {e}");
            }
        });
        self.web.push(web);
        Ok(addr)
    }

    /// Stops serving and stops raft.
    pub async fn shutdown(self) {
        self.server.abort();
        self.web.iter().for_each(|w| w.abort());
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("config server {}: raft did not stop cleanly: {e}", self.id);
        }
    }
}

type Shared = Raft<TypeConfig>;
type Refused = (StatusCode, String);

/// Raft RPCs come from config servers only (admins may use the API, not these).
fn from_config_server(peer: &Peer) -> Result<(), Refused> {
    match peer.role {
        Some(Role::Config) => Ok(()),
        _ => Err((StatusCode::FORBIDDEN, format!("{} may not send raft messages: only config servers do", peer.name))),
    }
}

/// A raft request's JSON body, read only once the peer is known to be a config server.
fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Refused> {
    serde_json::from_slice(body).map_err(|e| (StatusCode::BAD_REQUEST, format!("a raft request: {e}")))
}

async fn append(
    State(raft): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: Bytes,
) -> Result<Json<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>>, Refused> {
    from_config_server(&peer)?;
    let req: AppendEntriesRequest<TypeConfig> = decode(&body)?;
    Ok(Json(raft.append_entries(req).await))
}

async fn vote(
    State(raft): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: Bytes,
) -> Result<Json<Result<VoteResponse<NodeId>, RaftError<NodeId>>>, Refused> {
    from_config_server(&peer)?;
    let req: VoteRequest<NodeId> = decode(&body)?;
    Ok(Json(raft.vote(req).await))
}

async fn snapshot(
    State(raft): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: Bytes,
) -> Result<Json<Result<SnapshotResponse<NodeId>, Fatal<NodeId>>>, Refused> {
    from_config_server(&peer)?;
    let bad = |m: &str| (StatusCode::BAD_REQUEST, format!("a snapshot request: {m}"));
    let n = body.get(..4).ok_or_else(|| bad("shorter than its header length"))?;
    let n = u32::from_le_bytes(n.try_into().expect("4 bytes")) as usize;
    let header = body.get(4..4 + n).ok_or_else(|| bad("its header runs past the body"))?;
    let h: SnapshotHeader = serde_json::from_slice(header).map_err(|e| bad(&e.to_string()))?;
    let data = body[4 + n..].to_vec();
    let snap = Snapshot { meta: h.meta, snapshot: Box::new(std::io::Cursor::new(data)) };
    Ok(Json(raft.install_full_snapshot(h.vote, snap).await))
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(s: IncomingStream<'_, TlsListener>) -> Peer {
        let cert = s.io().get_ref().1.peer_certificates().and_then(|c| c.first());
        let who = cert.and_then(|c| drv_transport::tls::peer_identity(c).ok());
        let (name, role) = match who {
            Some((n, r)) => (n, Some(r)),
            None => ("(unnamed peer)".to_owned(), None),
        };
        Peer { addr: *s.remote_addr(), name, role }
    }
}

fn router(raft: Shared) -> axum::Router {
    use axum::routing::post;
    axum::Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .layer(axum::extract::DefaultBodyLimit::max(RAFT_BODY_LIMIT))
        .with_state(raft)
}

/// Accepted TLS streams for axum: each handshake in a task of its own.
struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<tokio::net::TcpStream>, SocketAddr)>,
}

impl TlsListener {
    fn spawn(tcp: TcpListener, cfg: Arc<rustls::ServerConfig>) -> TlsListener {
        let local = tcp.local_addr().expect("a bound listener has an address");
        let (tx, ready) = mpsc::channel(HANDSHAKES_LIMIT);
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let permits = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_LIMIT));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let (sock, addr) = match tcp.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("config server: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let shook = tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(sock)).await;
                    drop(permit);
                    match shook {
                        Ok(Ok(tls)) => drop(tx.send((tls, addr)).await),
                        Ok(Err(e)) => tracing::info!(%addr, "config server: TLS handshake refused: {e}"),
                        Err(_) => {
                            tracing::info!(%addr, "config server: TLS handshake not done in {HANDSHAKE_DEADLINE:?}")
                        }
                    }
                });
            }
        });
        TlsListener { local, ready }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(x) => x,
            // The accepting task ended (the runtime stops): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
