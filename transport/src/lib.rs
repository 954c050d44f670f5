//! Node-to-node transport of drv: the installation CA (`ca.rs`), QUIC endpoints with mutual TLS and
//! role checks (`quic.rs`), reading/writing checked frames on streams (`framed.rs`), the shared
//! sending half of a stream (`outbox.rs`), the accept loop of both servers (`serve.rs`), and the
//! agent link: frames over TLS over TCP (`link.rs`, `tls.rs`).

pub mod ca;
pub mod framed;
pub mod link;
pub mod outbox;
pub mod quic;
pub mod serve;
pub mod tls;

pub use ca::Identity;
pub use framed::{FrameReader, FrameWriter};
pub use outbox::Outbox;

/// A port on `ip` that is free for UDP and TCP both (a staging server's QUIC endpoint and its agent
/// link share the port number), for test and demo installations.
pub fn free_port(ip: std::net::IpAddr) -> std::io::Result<u16> {
    for _ in 0..64 {
        let tcp = std::net::TcpListener::bind((ip, 0))?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, format!("no port free for both UDP and TCP on {ip}")))
}

/// Roles a node certificate can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    Staging,
    Replica,
    Config,
    /// An operator's tool (`drv status`).
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Staging => "staging",
            Role::Replica => "replica",
            Role::Config => "config",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = TransportError;
    fn from_str(s: &str) -> Result<Role, TransportError> {
        Ok(match s {
            "agent" => Role::Agent,
            "staging" => Role::Staging,
            "replica" => Role::Replica,
            "config" => Role::Config,
            "admin" => Role::Admin,
            other => return Err(TransportError::Certificate(format!("unknown role {other:?}"))),
        })
    }
}

/// Transport failures.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A certificate or key file could not be read or written.
    #[error("{path}: {err}")]
    File { path: String, err: std::io::Error },
    /// Generating, parsing or using a certificate failed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// Setting up the QUIC endpoint failed.
    #[error("QUIC endpoint: {0}")]
    Endpoint(String),
    /// Connecting to a peer failed (refused, wrong CA, wrong role, unreachable).
    #[error("connect to {peer}: {reason}")]
    Connect { peer: String, reason: String },
    /// Nothing listens at the peer's address (TCP connection refused).
    #[error("connect to {peer}: connection refused (nothing listens there)")]
    NotListening { peer: String },
    /// The stream failed or the peer closed it.
    #[error("stream: {0}")]
    Stream(String),
    /// The peer sent a frame that does not decode; names what was wrong.
    #[error("bad frame from peer: {0}")]
    BadFrame(drv_format::FormatError),
}

// Not `#[from]`: that would also make the frame error the `source()`, and a report that prints
// the chain would say it twice (the message above already includes it).
impl From<drv_format::FormatError> for TransportError {
    fn from(e: drv_format::FormatError) -> Self {
        TransportError::BadFrame(e)
    }
}

impl TransportError {
    pub(crate) fn file(path: &std::path::Path, err: std::io::Error) -> Self {
        TransportError::File { path: path.display().to_string(), err }
    }
}
