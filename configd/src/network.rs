//! The raft RPCs between config servers: HTTPS (HTTP/1.1 over TLS 1.3 with the installation CA,
//! both sides presenting a certificate of role `config`), one persistent connection per peer,
//! opened at the first RPC and dropped on any error or timeout (openraft backs off and calls
//! again). Append and vote are JSON; a snapshot goes whole in one request (`/raft/snapshot`:
//! `[u32 LE header length][JSON header: vote, metadata][body]`), not as openraft's chunks, whose
//! bytes JSON would carry as arrays of numbers.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, SnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::Snapshot;
use openraft::{OptionalSend, SnapshotMeta, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{NodeId, PeerNode, TypeConfig};

/// Makes the connections to peers.
#[derive(Clone)]
pub struct Network {
    pub tls: Arc<rustls::ClientConfig>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &PeerNode) -> Peer {
        // No connection yet: the first RPC opens it.
        Peer { target, node: node.clone(), tls: self.tls.clone(), sender: None }
    }
}

/// The connection to one peer.
pub struct Peer {
    target: NodeId,
    node: PeerNode,
    tls: Arc<rustls::ClientConfig>,
    sender: Option<Sender>,
}

/// An error said in words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Said(String);

/// The header of a whole-snapshot request.
#[derive(Serialize, Deserialize)]
pub(crate) struct SnapshotHeader {
    pub vote: Vote<NodeId>,
    pub meta: SnapshotMeta<NodeId, PeerNode>,
}

/// A sender of HTTP/1.1 requests on one connection.
pub type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Opens an HTTPS connection to `address` (`HOST:PORT`), the server presenting a certificate
/// of the role `tls` expects; `server_name` goes in the handshake. Says what failed.
pub async fn https_open(address: &str, server_name: &str, tls: Arc<rustls::ClientConfig>) -> Result<Sender, String> {
    let tcp = tokio::net::TcpStream::connect(address).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

impl Peer {
    async fn connect(&mut self) -> Result<(), Unreachable> {
        let name = format!("{}.config.drv", self.node.name);
        let sender = https_open(&self.node.address, &name, self.tls.clone())
            .await
            .map_err(|e| Unreachable::new(&Said(format!("config server {}: {e}", self.node))))?;
        self.sender = Some(sender);
        Ok(())
    }

    /// POSTs `body` to `path` and gives the reply's body (a connection error drops the connection).
    async fn post(
        &mut self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Bytes, RPCError<NodeId, PeerNode, RaftError<NodeId>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.sender = None;
            self.connect().await?;
        }
        let net = |e: String| RPCError::Network(NetworkError::new(&Said(e)));
        let sender = self.sender.as_mut().expect("connected above");
        // Ready once the connection finished the previous RPC (sent before that, a request
        // fails at once and the connection would be dropped and opened again).
        if let Err(e) = sender.ready().await {
            self.sender = None;
            return Err(net(format!("{path} to {}: {e}", self.node)));
        }
        let sender = self.sender.as_mut().expect("connected above");
        let req = hyper::Request::post(path)
            .header(hyper::header::HOST, "config.drv")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| net(e.to_string()))?;
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                self.sender = None;
                return Err(net(format!("{path} to {}: {e}", self.node)));
            }
        };
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| net(e.to_string()))?.to_bytes();
        if !status.is_success() {
            return Err(net(format!("{path} to {}: HTTP {status}: {}", self.node, String::from_utf8_lossy(&bytes))));
        }
        Ok(bytes)
    }

    /// [`post`](Self::post) within `ttl`: a late answer drops the connection (`Err(Err(_))`).
    async fn timed_post(
        &mut self,
        path: &str,
        body: Vec<u8>,
        ttl: std::time::Duration,
    ) -> Result<Bytes, Result<RPCError<NodeId, PeerNode, RaftError<NodeId>>, Said>> {
        match tokio::time::timeout(ttl, self.post(path, body)).await {
            Ok(r) => r.map_err(Ok),
            Err(_) => {
                self.sender = None;
                Err(Err(Said(format!("{path} to {}: no answer within {ttl:?}", self.node))))
            }
        }
    }

    async fn rpc<Req: Serialize, Resp: DeserializeOwned, E: std::error::Error + DeserializeOwned>(
        &mut self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, PeerNode, E>> {
        let body = serde_json::to_vec(req).map_err(|e| NetworkError::new(&e))?;
        let bytes = match self.timed_post(path, body, option.hard_ttl()).await {
            Ok(b) => b,
            Err(Ok(e)) => return Err(narrow(e)),
            Err(Err(late)) => return Err(NetworkError::new(&late).into()),
        };
        let res: Result<Resp, E> = serde_json::from_slice(&bytes).map_err(|e| NetworkError::new(&e))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// A connection error of `post` as the error type of another RPC.
fn narrow<E: std::error::Error>(e: RPCError<NodeId, PeerNode, RaftError<NodeId>>) -> RPCError<NodeId, PeerNode, E> {
    match e {
        RPCError::Unreachable(u) => RPCError::Unreachable(u),
        other => RPCError::Network(NetworkError::new(&Said(other.to_string()))),
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, PeerNode, RaftError<NodeId>>> {
        self.rpc("/raft/append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, PeerNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        // Not called: `full_snapshot` below sends a snapshot whole.
        Err(NetworkError::new(&Said("chunked snapshots are not used between config servers".into())).into())
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, PeerNode, RaftError<NodeId>>> {
        self.rpc("/raft/vote", &rpc, &option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let header = serde_json::to_vec(&SnapshotHeader { vote, meta: snapshot.meta.clone() })
            .map_err(|e| NetworkError::new(&e))?;
        let data = snapshot.snapshot.into_inner();
        let mut body = Vec::with_capacity(4 + header.len() + data.len());
        body.extend_from_slice(&(header.len() as u32).to_le_bytes());
        body.extend_from_slice(&header);
        body.extend_from_slice(&data);
        let bytes = tokio::select! {
            closed = cancel => return Err(closed.into()),
            r = self.timed_post("/raft/snapshot", body, option.hard_ttl()) => match r {
                Ok(b) => b,
                Err(Ok(e)) => return Err(NetworkError::new(&Said(e.to_string())).into()),
                Err(Err(late)) => return Err(NetworkError::new(&late).into()),
            },
        };
        let res: Result<SnapshotResponse<NodeId>, Fatal<NodeId>> =
            serde_json::from_slice(&bytes).map_err(|e| NetworkError::new(&e))?;
        res.map_err(|e| StreamingError::RemoteError(RemoteError::new(self.target, e)))
    }
}
