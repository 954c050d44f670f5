//! Relay of one volume to one replica: asynchronous, in order, with bounded in-flight bytes,
//! reconnect with backoff, and resume from the replica's durable position. Records leave the WRL
//! unchanged (header + AES-GCM payload); staging never decrypts them.
//!
//! The WRL trims a volume's records only after every replica of it reported them durable
//! (`VolumeCtx::confirm_replicated`).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use drv_format::frame::{Frame, RecordsFrameBuilder};
use drv_format::record::RECORD_HEADER_LEN;
use drv_proto::relay::Record;
use drv_proto::{Offer, RelayRefusal, RelayWindow};
use drv_transport::{FrameReader, FrameWriter, Role, TransportError, quic};
use tokio::sync::mpsc;

use crate::server::{Staging, VolumeCtx};
use drv_wrl::{LogRecord, WrlError};

/// Largest Records frame body the relay builds.
const RECORDS_FRAME_BYTES: u64 = 4 << 20;

/// How long the relay waits, once caught up, for more records to gather after an append. Every
/// relayed batch costs the replica a DR-log `fdatasync`; fewer, larger batches leave the disk to
/// the synchronous path when both share one (2 ms measured 5-10% fewer QD32 IOPS through the
/// agent, and a worse QD1 p50, than 10 ms). It adds at most this much to the RPO at low load.
pub const RELAY_LINGER: Duration = Duration::from_millis(10);

/// `frame_limit`: the largest frame body the replica accepts (its configured `frame_bytes_limit`).
pub async fn run(st: Arc<Staging>, v: Arc<VolumeCtx>, replica: String, addr: SocketAddr, frame_limit: u32) {
    let client = match quic::client_with(&st.identity, Role::Replica, &st.quic) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(volume = v.id, %replica, "relay cannot start: {e}");
            return;
        }
    };
    let mut backoff = Duration::from_millis(50);
    // The bound of one connection attempt: short first (a replica restarting at the same moment
    // lost the first handshake packets), longer after each failure (a slow or lossy path).
    let mut within = Duration::from_millis(500);
    // Failures since the relay was last connected: the first is logged as a warning, the rest of
    // the streak (a replica that stays away) only at debug level, so the log says it once.
    let mut streak = 0u64;
    loop {
        let r = session(&st, &v, &replica, &client, addr, frame_limit, &mut within).await;
        let was_connected = v.progress.lock().expect("progress").get_mut(&replica).is_some_and(|p| {
            p.reconnects += 1;
            std::mem::replace(&mut p.connected, false)
        });
        if was_connected {
            streak = 0;
        }
        match r {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(e) if streak == 0 => {
                tracing::warn!(volume = v.id, %replica, %addr, "relay interrupted: {e}; retrying every {:?} at most", Duration::from_secs(2));
            }
            Err(e) => tracing::debug!(volume = v.id, %replica, %addr, "relay still interrupted: {e}"),
        }
        streak += 1;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
        within = (within * 2).min(Duration::from_secs(8));
    }
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Wrl(#[from] WrlError),
    #[error("replica refused: {0}")]
    Refused(String),
    #[error("WRL read-back task: {0}")]
    Task(String),
    #[error("replica closed the stream")]
    Closed,
    /// What the relay window refuses (behind, missing records, acknowledged too much).
    #[error(transparent)]
    Window(#[from] RelayRefusal),
}

async fn session(
    st: &Arc<Staging>,
    v: &Arc<VolumeCtx>,
    replica: &str,
    client: &quic::QuicClient,
    addr: SocketAddr,
    frame_limit: u32,
    within: &mut Duration,
) -> Result<(), RelayError> {
    let mut conn = quic::connect_within(client, addr, Role::Replica, *within).await?;
    *within = Duration::from_millis(500);
    let stream = conn.open_bidirectional_stream().await.map_err(|e| TransportError::Stream(e.to_string()))?;
    let (rx, tx) = stream.split();
    let mut r = FrameReader::new(rx, st.frame_bytes_limit);
    let mut w = FrameWriter::new(tx);
    w.send(&Frame::RelayOpen { volume_id: v.id }).await?;
    let (durable_seq, applied) = match r.next().await? {
        Some(Frame::ReplicaPosition { durable_seq, applied_seq, .. }) => (durable_seq, applied_seq),
        Some(Frame::Error { message, .. }) => return Err(RelayError::Refused(message)),
        _ => return Err(RelayError::Closed),
    };
    let ours = v.seq.lock().expect("seq").submitted();
    let limit = st.inflight_bytes_limit.max(RECORDS_FRAME_BYTES);
    let window = RelayWindow::resume(v.id, durable_seq, ours, limit)?;
    tracing::info!(volume = v.id, %replica, durable_seq, applied, "relay connected; resuming after seq {durable_seq}");
    {
        let mut p = v.progress.lock().expect("progress");
        let e = p.entry(replica.to_owned()).or_default();
        e.connected = true;
        e.durable_seq = e.durable_seq.max(durable_seq);
        e.applied_seq = applied;
        e.sent_seq = durable_seq;
    }
    // Positions come back on their own task; the sender waits on them for in-flight room.
    let (pos_tx, mut pos_rx) = mpsc::unbounded_channel::<Result<(u64, u64), RelayError>>();
    let reader = tokio::spawn(async move {
        loop {
            let m = match r.next().await {
                Ok(Some(Frame::ReplicaPosition { durable_seq, applied_seq, .. })) => Ok((durable_seq, applied_seq)),
                Ok(Some(Frame::Error { message, .. })) => Err(RelayError::Refused(message)),
                Ok(Some(_)) | Ok(None) => Err(RelayError::Closed),
                Err(e) => Err(e.into()),
            };
            let stop = m.is_err();
            if pos_tx.send(m).is_err() || stop {
                return;
            }
        }
    });
    let result = pump(st, v, replica, &mut w, &mut pos_rx, window, frame_limit).await;
    reader.abort();
    result
}

/// A WRL read running on the blocking pool.
type ReadAhead = tokio::task::JoinHandle<Result<Vec<LogRecord>, WrlError>>;

/// Sends records after the replica's durable position, keeping at most the in-flight limit of
/// unacknowledged bytes (the window decides what goes: `drv_proto::RelayWindow`), and applies
/// position reports as they arrive.
async fn pump(
    st: &Arc<Staging>,
    v: &Arc<VolumeCtx>,
    replica: &str,
    w: &mut FrameWriter<s2n_quic::stream::SendStream>,
    pos_rx: &mut mpsc::UnboundedReceiver<Result<(u64, u64), RelayError>>,
    mut window: RelayWindow,
    frame_limit: u32,
) -> Result<(), RelayError> {
    let mut cursor = v.wrl.status().first_lsn;
    // Read back but not yet sent (a read returns whole batches, a frame takes about 4 MiB).
    let mut pending: VecDeque<LogRecord> = VecDeque::new();
    // The next read, started early: (from lsn, task).
    let mut ahead: Option<(u64, ReadAhead)> = None;
    loop {
        // Apply every position report that is waiting.
        while let Ok(m) = pos_rx.try_recv() {
            let (d, a) = m?;
            ack(v, replica, &mut window, d, a)?;
        }
        let notified = st.appended.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if window.is_full() {
            let t = std::time::Instant::now();
            let (d, a) = pos_rx.recv().await.ok_or(RelayError::Closed)??;
            tracing::debug!(
                waited_us = t.elapsed().as_micros() as u64,
                inflight = window.inflight_bytes(),
                "relay window full"
            );
            ack(v, replica, &mut window, d, a)?;
            continue;
        }
        // Records read but not sent yet carry over; otherwise take the read that was started
        // while the previous frames were being sent (disk read-back overlaps the network), or
        // read now.
        let mut read_us = 0;
        let mut read_any = false;
        if pending.is_empty() {
            let t = std::time::Instant::now();
            let recs = match ahead.take() {
                Some((from, h)) if from == cursor => h.await.map_err(|e| RelayError::Task(e.to_string()))??,
                _ => v.wrl.read(cursor, RECORDS_FRAME_BYTES)?,
            };
            read_us = t.elapsed().as_micros() as u64;
            if let Some(last) = recs.last() {
                cursor = last.header.lsn + 1;
                let (next, wrl) = (cursor, v.wrl.clone());
                ahead = Some((next, tokio::task::spawn_blocking(move || wrl.read(next, RECORDS_FRAME_BYTES))));
            }
            read_any = !recs.is_empty();
            pending.extend(recs);
        }
        let (confirmed, seeking) = (window.confirmed_lsn(), window.seeking());
        let frame = fill_frame(v.id, &mut window, &mut pending, frame_limit)?;
        if window.confirmed_lsn() > confirmed || window.seeking() != seeking {
            // Records the replica held already (at resume) count as confirmed: an idle volume
            // never holds the log's trimming back.
            progress(v, replica, &window, None);
        }
        let count = frame.count();
        if count > 0 {
            let t = std::time::Instant::now();
            w.send_chunks(&mut frame.finish()).await?;
            tracing::debug!(
                read_us,
                send_us = t.elapsed().as_micros() as u64,
                count,
                inflight = window.inflight_bytes(),
                "relay frame"
            );
            if let Some(p) = v.progress.lock().expect("progress").get_mut(replica) {
                p.sent_seq = window.sent_seq();
            }
            continue;
        }
        if read_any || !pending.is_empty() {
            continue; // other volumes' records only: read on
        }
        // Nothing new: wait for an append or a position report.
        tokio::select! {
            _ = &mut notified => {
                // Caught up and woken by an append: let a few more gather, so that at a low write
                // rate the replica logs (and fsyncs) several records per frame rather than one.
                // Adds at most RELAY_LINGER to the replica's lag.
                tokio::time::sleep(RELAY_LINGER).await;
            }
            m = pos_rx.recv() => {
                let (d, a) = m.ok_or(RelayError::Closed)??;
                ack(v, replica, &mut window, d, a)?;
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Takes records from `pending` into one Records frame, as the window decides, up to about
/// `RECORDS_FRAME_BYTES` of data and never over the replica's `frame_limit` (a record that does
/// not fit waits for the next frame; a frame always takes its first record, and one record always
/// fits a valid limit).
fn fill_frame(
    volume_id: u64,
    window: &mut RelayWindow,
    pending: &mut VecDeque<LogRecord>,
    frame_limit: u32,
) -> Result<RecordsFrameBuilder, RelayError> {
    let mut frame = RecordsFrameBuilder::new(volume_id);
    let mut frame_payload = 0u64;
    while frame_payload < RECORDS_FRAME_BYTES
        && let Some(rec) = pending.pop_front()
    {
        let rec_len = RECORD_HEADER_LEN + rec.payload.len();
        if frame.count() > 0 && frame.body_len() + rec_len > frame_limit as usize {
            pending.push_front(rec);
            break;
        }
        let r = Record::of(&rec.header.desc, rec.header.lsn);
        let was_seeking = window.seeking();
        let offer = window.offer(&r)?;
        if window.seeking() && !was_seeking {
            tracing::warn!(
                volume = volume_id,
                "a replica holds nothing of this volume and the log no longer holds its first records (seq {} is the oldest): it waits for an initial sync from the agent (started when the replica is added to the volume's configuration; else `drv sync start`)",
                r.seq
            );
        }
        if offer == Offer::Send {
            frame.push(&rec.header.encode(), &rec.payload);
            frame_payload += r.length;
        }
    }
    Ok(frame)
}

/// A position report of the replica: the window takes it, and staging's view of the replica and
/// the WRL's confirmations follow.
fn ack(
    v: &Arc<VolumeCtx>,
    replica: &str,
    window: &mut RelayWindow,
    durable: u64,
    applied: u64,
) -> Result<(), RelayError> {
    window.acknowledged(durable)?;
    progress(v, replica, window, Some(applied));
    Ok(())
}

/// Publishes the window's positions (and `applied`, when reported) and confirms to the WRL what
/// every replica holds.
fn progress(v: &Arc<VolumeCtx>, replica: &str, window: &RelayWindow, applied: Option<u64>) {
    {
        let mut p = v.progress.lock().expect("progress");
        let e = p.entry(replica.to_owned()).or_default();
        e.durable_seq = e.durable_seq.max(window.durable_seq());
        if let Some(a) = applied {
            e.applied_seq = e.applied_seq.max(a);
        }
        e.durable_lsn = e.durable_lsn.max(window.confirmed_lsn());
        e.waiting_full_sync = window.seeking();
    }
    v.confirm_replicated();
}
