//! The accept loop both servers share: a bound on connections, a table of connected peers, and per
//! bidirectional stream a frame reader, an [`Outbox`] for the frames going back, and an `Error`
//! frame naming the problem when the handler gives up on the stream. [`link_accept_loop`] does the
//! same for the agent link (TLS over TCP), with a thread per connection.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use drv_format::frame::{Frame, code};
use s2n_quic::stream::ReceiveStream;

use crate::FrameReader;

/// The peers connected to a server (remote addresses), for status.
#[derive(Default)]
pub struct Peers {
    table: Mutex<BTreeMap<u64, String>>,
    next: AtomicU64,
}

impl Peers {
    pub fn list(&self) -> Vec<String> {
        self.table.lock().expect("peers").values().cloned().collect()
    }
}

pub use crate::outbox::Outbox;

/// Accepts connections until the server stops. Beyond `max_connections` a connection is closed at
/// once (and logged). `on_stream` serves one stream; an `Err` is logged and sent to the peer as an
/// `Error` frame (code MALFORMED) before the stream is closed.
pub async fn accept_loop<F, Fut, E>(
    mut server: s2n_quic::Server,
    max_connections: u32,
    frame_bytes_limit: u32,
    peers: Arc<Peers>,
    on_stream: F,
) where
    F: Fn(FrameReader<ReceiveStream>, Outbox) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    let conns = Arc::new(tokio::sync::Semaphore::new(max_connections as usize));
    while let Some(mut conn) = server.accept().await {
        let peer = conn.remote_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = max_connections, "refusing connection: max_connections reached");
            conn.close(1u32.into());
            continue;
        };
        let (peers, on_stream) = (peers.clone(), on_stream.clone());
        tokio::spawn(async move {
            let id = peers.next.fetch_add(1, Ordering::Relaxed);
            peers.table.lock().expect("peers").insert(id, peer.clone());
            while let Ok(Some(stream)) = conn.accept_bidirectional_stream().await {
                let (on_stream, peer) = (on_stream.clone(), peer.clone());
                tokio::spawn(async move {
                    let (rx, tx) = stream.split();
                    let (out, flusher) = Outbox::new(tx);
                    let writer = tokio::spawn(flusher);
                    if let Err(e) = on_stream(FrameReader::new(rx, frame_bytes_limit), out.clone()).await {
                        tracing::warn!(%peer, "stream from {peer} refused: {e}");
                        let _ = out.send(Frame::Error { code: code::MALFORMED, message: e.to_string() });
                    }
                    drop(out);
                    let _ = writer.await;
                });
            }
            peers.table.lock().expect("peers").remove(&id);
            drop(permit);
        });
    }
}

/// Accepts agent-link connections (TLS over TCP, [`crate::link`]) until the task is dropped; each
/// is served on a thread of its own (`on_link`, blocking), after its handshake there. Beyond
/// `max_connections` a connection is closed at once (and logged). An `Err` from `on_link` is logged
/// and sent to the peer as an `Error` frame (code MALFORMED) before the link is closed.
pub async fn link_accept_loop<F, E>(
    listener: tokio::net::TcpListener,
    cfg: Arc<rustls::ServerConfig>,
    max_connections: u32,
    frame_bytes_limit: u32,
    peers: Arc<Peers>,
    on_link: F,
) where
    F: Fn(crate::link::LinkReader, Arc<crate::link::Link>) -> Result<(), E> + Clone + Send + 'static,
    E: std::fmt::Display,
{
    let conns = Arc::new(tokio::sync::Semaphore::new(max_connections as usize));
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!("accepting an agent link failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = max_connections, "refusing link: max_connections reached");
            continue;
        };
        let sock = match sock.into_std().and_then(|s| s.set_nonblocking(false).map(|()| s)) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, "agent link: {e}");
                continue;
            }
        };
        let (peers, on_link, cfg) = (peers.clone(), on_link.clone(), cfg.clone());
        let spawned = std::thread::Builder::new().name(format!("link-{peer}")).spawn(move || {
            let (link, reader) = match crate::link::accept(sock, cfg, frame_bytes_limit) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(%peer, "agent link from {peer} refused: {e}");
                    return;
                }
            };
            let id = peers.next.fetch_add(1, Ordering::Relaxed);
            peers.table.lock().expect("peers").insert(id, format!("{peer} (link)"));
            if let Err(e) = on_link(reader, link.clone()) {
                tracing::warn!(%peer, "link from {peer} refused: {e}");
                let _ = link.send(&Frame::Error { code: code::MALFORMED, message: e.to_string() });
            }
            link.shutdown();
            peers.table.lock().expect("peers").remove(&id);
            drop(permit);
        });
        if let Err(e) = spawned {
            tracing::warn!(%peer, "cannot start a thread for the link from {peer}: {e}");
        }
    }
}
