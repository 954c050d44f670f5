//! The accept loop both servers share: a bound on connections, a table of connected peers, and per
//! bidirectional stream a frame reader, a queue of outgoing frames drained by a writer task, and an
//! `Error` frame naming the problem when the handler gives up on the stream.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use drv_format::frame::{Frame, code};
use s2n_quic::stream::ReceiveStream;
use tokio::sync::mpsc;

use crate::{FrameReader, FrameWriter};

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

/// Outgoing frames of one stream.
pub type Outbox = mpsc::UnboundedSender<Frame>;

/// Most frames taken from the queue for one send.
const SEND_BATCH: usize = 256;

/// Sends queued frames on a stream until every sender is gone, then finishes the stream. Frames
/// queued together go out in one send, and a run of `Ack` frames of one volume becomes its last
/// one: an `Ack` is cumulative (that write and every earlier one is durable), so under group commit
/// one frame answers a whole batch of writes.
pub async fn write_frames<W: tokio::io::AsyncWrite + Unpin>(
    mut w: FrameWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Frame>,
) {
    let mut batch: Vec<Frame> = Vec::new();
    while rx.recv_many(&mut batch, SEND_BATCH).await > 0 {
        let mut out = Vec::new();
        let mut last_ack: Option<Frame> = None;
        for f in batch.drain(..) {
            match (&f, &last_ack) {
                (Frame::Ack { volume_id: v, seq, .. }, Some(Frame::Ack { volume_id: pv, seq: ps, .. })) if v == pv => {
                    // The highest one says everything (a retry's ack may come after later ones).
                    if seq > ps {
                        last_ack = Some(f);
                    }
                }
                (Frame::Ack { .. }, _) => {
                    if let Some(a) = last_ack.replace(f) {
                        out.extend_from_slice(&a.encode());
                    }
                }
                _ => {
                    if let Some(a) = last_ack.take() {
                        out.extend_from_slice(&a.encode());
                    }
                    out.extend_from_slice(&f.encode());
                }
            }
        }
        if let Some(a) = last_ack.take() {
            out.extend_from_slice(&a.encode());
        }
        if w.send_raw(&out).await.is_err() {
            return;
        }
    }
    let _ = w.finish().await;
}

/// Accepts connections until the server stops. Beyond `max_connections` a connection is closed at
/// once (and logged). `on_stream` serves one stream; an `Err` is logged and sent to the peer as an
/// `Error` frame (code MALFORMED) before the stream is closed.
pub async fn accept_loop<F, Fut>(
    mut server: s2n_quic::Server,
    max_connections: u32,
    frame_bytes_limit: u32,
    peers: Arc<Peers>,
    on_stream: F,
) where
    F: Fn(FrameReader<ReceiveStream>, Outbox) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
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
                    let (out_tx, out_rx) = mpsc::unbounded_channel::<Frame>();
                    let writer = tokio::spawn(write_frames(FrameWriter::new(tx), out_rx));
                    if let Err(e) = on_stream(FrameReader::new(rx, frame_bytes_limit), out_tx.clone()).await {
                        tracing::warn!(%peer, "stream from {peer} refused: {e}");
                        let _ = out_tx.send(Frame::Error { code: code::MALFORMED, message: e });
                    }
                    drop(out_tx);
                    let _ = writer.await;
                });
            }
            peers.table.lock().expect("peers").remove(&id);
            drop(permit);
        });
    }
}
