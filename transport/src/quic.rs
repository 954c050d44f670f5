//! QUIC endpoints (s2n-quic, s2n-tls) with mutual TLS against the installation CA, and role checks
//! on both sides: a server names the roles it accepts, a client names the role it expects the
//! server to have. A server logs each peer it refuses, with the reason (wrong role in the
//! certificate's name, or a handshake that failed, e.g. a certificate from another CA). A client
//! does not log: the reason goes into the error its caller gets from [`connect_within`], which
//! reports it once.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use s2n_quic::provider::event::{ConnectionInfo, ConnectionMeta, Subscriber, events};
use s2n_quic::provider::tls::default::callbacks::VerifyHostNameCallback;
use s2n_quic::provider::tls::default::{Client as TlsClient, Server as TlsServer};
use s2n_quic::{Client, Server, client::Connect};

use crate::ca::parse_san;
use crate::{Identity, Role, TransportError};

const ALPN: &str = "drv/1";

/// Why an endpoint last refused a peer's certificate: a client's caller reports it in its error
/// ([`connect_within`]), a server logs it with the closed connection ([`RefusalLog`]).
type LastRefusal = Arc<Mutex<Option<String>>>;

/// Accepts a peer certificate only if its `NAME.ROLE.drv` name carries an allowed role.
struct RoleCheck {
    allowed: Vec<Role>,
    refusal: LastRefusal,
}

impl RoleCheck {
    fn refuse(&self, why: String) -> bool {
        *self.refusal.lock().expect("refusal") = Some(why);
        false
    }
}

impl VerifyHostNameCallback for RoleCheck {
    fn verify_host_name(&self, host_name: &str) -> bool {
        let allowed: Vec<&str> = self.allowed.iter().map(|r| r.as_str()).collect();
        match parse_san(host_name) {
            Some((_, role)) if self.allowed.contains(&role) => true,
            Some((name, role)) => {
                self.refuse(format!("{name}'s certificate has role {role}, expected {}", allowed.join(" or ")))
            }
            None => self.refuse(format!("its certificate name {host_name:?} is not a drv node name (NAME.ROLE.drv)")),
        }
    }
}

/// Logs connections to a server that closed before their handshake completed (refused peers),
/// once each, with the reason: the role check's, else the handshake's error.
struct RefusalLog {
    refusal: LastRefusal,
}

pub struct ConnState {
    handshake_done: bool,
    peer: String,
}

impl Subscriber for RefusalLog {
    type ConnectionContext = ConnState;

    fn create_connection_context(&mut self, _meta: &ConnectionMeta, _info: &ConnectionInfo) -> ConnState {
        ConnState { handshake_done: false, peer: "a peer".into() }
    }

    fn on_connection_started(
        &mut self,
        context: &mut ConnState,
        _meta: &ConnectionMeta,
        event: &events::ConnectionStarted,
    ) {
        context.peer = event.path.remote_addr.to_string();
    }

    fn on_handshake_status_updated(
        &mut self,
        context: &mut ConnState,
        _meta: &ConnectionMeta,
        event: &events::HandshakeStatusUpdated,
    ) {
        if matches!(event.status, events::HandshakeStatus::Complete { .. }) {
            context.handshake_done = true;
        }
    }

    fn on_connection_closed(
        &mut self,
        context: &mut ConnState,
        _meta: &ConnectionMeta,
        event: &events::ConnectionClosed,
    ) {
        if !context.handshake_done {
            match self.refusal.lock().expect("refusal").take() {
                Some(why) => tracing::warn!("refused {}: {why}", context.peer),
                None => tracing::warn!("TLS handshake with {} failed: {}", context.peer, event.error),
            }
        }
    }
}

fn ep(e: impl std::fmt::Display) -> TransportError {
    TransportError::Endpoint(e.to_string())
}

/// How long a silent peer is given before its connection is closed (the default is 30 s, which
/// would leave a relay waiting that long on a replica that was restarted).
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(6);
/// Bound of one connection attempt (the handshake takes a few round trips; a peer that is down
/// never answers).
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Flow-control windows sized for bulk relay: the defaults (a few hundred KiB per stream) cap a
/// stream at window / round trip, which on a busy two-core host is far below the link.
fn limits() -> Result<s2n_quic::provider::limits::Limits, TransportError> {
    s2n_quic::provider::limits::Limits::new()
        .with_data_window(64 << 20)
        .map_err(ep)?
        .with_bidirectional_local_data_window(32 << 20)
        .map_err(ep)?
        .with_bidirectional_remote_data_window(32 << 20)
        .map_err(ep)?
        .with_max_send_buffer_size(16 << 20)
        .map_err(ep)?
        // A peer that died without closing (SIGKILL, host loss) is noticed within the idle
        // timeout; live connections ping well inside it (keep-alive is on for every connection).
        .with_max_idle_timeout(IDLE_TIMEOUT)
        .map_err(ep)?
        .with_max_keep_alive_period(IDLE_TIMEOUT / 3)
        .map_err(ep)
}

/// Endpoint options.
#[derive(Clone, Copy, Debug)]
pub struct QuicOptions {
    /// Largest IP packet the endpoint may probe for (path MTU discovery starts at 1228 bytes and
    /// only keeps a size the path confirmed). Jumbo-frame networks and loopback allow far more than
    /// 1500, and packet count is what QUIC's cost scales with.
    pub max_mtu: u16,
    /// UDP socket buffer size asked of the kernel (it caps the request at `net.core.rmem_max` /
    /// `wmem_max`). The Linux default (208 KiB) overflows under a bulk relay: every dropped
    /// datagram costs a retransmission and a congestion-window cut.
    pub socket_buffer_bytes: usize,
}

impl Default for QuicOptions {
    fn default() -> Self {
        QuicOptions { max_mtu: 9000, socket_buffer_bytes: 16 << 20 }
    }
}

fn io(addr: SocketAddr, o: &QuicOptions) -> Result<s2n_quic::provider::io::tokio::Provider, TransportError> {
    s2n_quic::provider::io::tokio::Builder::default()
        .with_receive_address(addr)
        .map_err(ep)?
        .with_max_mtu(o.max_mtu)
        .map_err(ep)?
        .with_recv_buffer_size(o.socket_buffer_bytes)
        .map_err(ep)?
        .with_send_buffer_size(o.socket_buffer_bytes)
        .map_err(ep)?
        .build()
        .map_err(ep)
}

/// A server endpoint on `addr` accepting peers whose certificates carry one of `allowed`.
pub fn server(addr: SocketAddr, id: &Identity, allowed: &[Role]) -> Result<Server, TransportError> {
    server_with(addr, id, allowed, &QuicOptions::default())
}

/// [`server`] with explicit options.
pub fn server_with(
    addr: SocketAddr,
    id: &Identity,
    allowed: &[Role],
    o: &QuicOptions,
) -> Result<Server, TransportError> {
    let refusal = LastRefusal::default();
    let tls = TlsServer::builder()
        .with_empty_trust_store()
        .map_err(ep)?
        .with_trusted_certificate(id.ca_pem.as_str())
        .map_err(ep)?
        .with_certificate(id.cert_pem.as_str(), id.key_pem.as_str())
        .map_err(ep)?
        .with_client_authentication()
        .map_err(ep)?
        .with_verify_host_name_callback(RoleCheck { allowed: allowed.to_vec(), refusal: refusal.clone() })
        .map_err(ep)?
        .with_application_protocols([ALPN])
        .map_err(ep)?
        .build()
        .map_err(ep)?;
    Server::builder()
        .with_tls(tls)
        .map_err(ep)?
        .with_io(io(addr, o)?)
        .map_err(ep)?
        .with_limits(limits()?)
        .map_err(ep)?
        .with_congestion_controller(s2n_quic::provider::congestion_controller::Bbr::default())
        .map_err(ep)?
        .with_event(RefusalLog { refusal })
        .map_err(ep)?
        .start()
        .map_err(ep)
}

/// A client endpoint: presents an identity and accepts only servers whose certificates carry the
/// expected role. Why it refused a server goes into the error of [`connect_within`].
pub struct QuicClient {
    inner: Client,
    refusal: LastRefusal,
}

impl QuicClient {
    /// Waits (at most `within`) until the endpoint's connections are closed, so that the peer
    /// hears of the close before this process exits.
    pub async fn close(self, within: std::time::Duration) {
        let mut c = self.inner;
        let _ = tokio::time::timeout(within, c.wait_idle()).await;
    }
}

/// A client endpoint that presents `id` and accepts only servers whose certificates carry `expect`.
pub fn client(id: &Identity, expect: Role) -> Result<QuicClient, TransportError> {
    client_with(id, expect, &QuicOptions::default())
}

/// [`client`] with explicit options.
pub fn client_with(id: &Identity, expect: Role, o: &QuicOptions) -> Result<QuicClient, TransportError> {
    let refusal = LastRefusal::default();
    let tls = TlsClient::builder()
        .with_empty_trust_store()
        .map_err(ep)?
        .with_certificate(id.ca_pem.as_str())
        .map_err(ep)?
        .with_client_identity(id.cert_pem.as_str(), id.key_pem.as_str())
        .map_err(ep)?
        .with_verify_host_name_callback(RoleCheck { allowed: vec![expect], refusal: refusal.clone() })
        .map_err(ep)?
        .with_application_protocols([ALPN])
        .map_err(ep)?
        .build()
        .map_err(ep)?;
    let any: SocketAddr = "0.0.0.0:0".parse().expect("literal");
    let inner = Client::builder()
        .with_tls(tls)
        .map_err(ep)?
        .with_io(io(any, o)?)
        .map_err(ep)?
        .with_limits(limits()?)
        .map_err(ep)?
        .with_congestion_controller(s2n_quic::provider::congestion_controller::Bbr::default())
        .map_err(ep)?
        .start()
        .map_err(ep)?;
    Ok(QuicClient { inner, refusal })
}

/// Connects to `addr`, expecting the role the client was built for.
pub async fn connect(
    client: &QuicClient,
    addr: SocketAddr,
    role: Role,
) -> Result<s2n_quic::Connection, TransportError> {
    connect_within(client, addr, role, CONNECT_TIMEOUT).await
}

/// [`connect`] with its own bound on the attempt. A peer that is down does not answer UDP at all:
/// without a bound, one attempt would wait for the idle timeout, and a peer coming back meanwhile
/// (its first packets lost) would wait with it. Retry loops start short and grow the bound.
pub async fn connect_within(
    client: &QuicClient,
    addr: SocketAddr,
    role: Role,
    within: std::time::Duration,
) -> Result<s2n_quic::Connection, TransportError> {
    client.refusal.lock().expect("refusal").take();
    let attempt = client.inner.connect(Connect::new(addr).with_server_name(format!("{role}.drv")));
    let mut conn = tokio::time::timeout(within, attempt)
        .await
        .map_err(|_| TransportError::Connect {
            peer: addr.to_string(),
            reason: format!("no handshake within {within:?} (is it running?)"),
        })?
        .map_err(|e| {
            let reason = match client.refusal.lock().expect("refusal").take() {
                Some(why) => format!("refused the server: {why}"),
                None => e.to_string(),
            };
            TransportError::Connect { peer: addr.to_string(), reason }
        })?;
    conn.keep_alive(true).map_err(|e| TransportError::Connect { peer: addr.to_string(), reason: e.to_string() })?;
    Ok(conn)
}

/// One request and its answer, as an operator's tool asks a server: connects to `addr` (which
/// must have `role`), sends `request` on a new stream, reads one frame (at most `reply_bytes_limit`
/// bytes), then closes the connection and waits briefly until the server knows, so that a tool's
/// exit never looks to the server like a peer that vanished. `None`: the server closed the stream
/// without answering.
pub async fn request(
    id: &Identity,
    addr: SocketAddr,
    role: Role,
    request: &drv_format::frame::Frame,
    reply_bytes_limit: u32,
) -> Result<Option<drv_format::frame::Frame>, TransportError> {
    let client = client(id, role)?;
    let conn = connect(&client, addr, role).await?;
    let reply = async {
        let mut conn = conn;
        let s = conn.open_bidirectional_stream().await.map_err(|e| TransportError::Stream(e.to_string()))?;
        let (rx, tx) = s.split();
        let (mut r, mut w) = (crate::FrameReader::new(rx, reply_bytes_limit), crate::FrameWriter::new(tx));
        w.send(request).await?;
        let reply = r.next().await;
        conn.close(0u32.into());
        reply
    }
    .await;
    client.close(std::time::Duration::from_millis(500)).await;
    reply
}
