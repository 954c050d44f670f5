//! One session with staging: the agent link (TLS over TCP), the `OpenVolume` exchange, the reader
//! task that resolves waiters from staging's cumulative `Ack` frames, and the watchdog that fails
//! the session when the oldest write waits longer than the ack timeout. The waiters and the
//! timeout rule are `drv_proto::AckQueue`; this file is the tokio around it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drv_format::frame::{Frame, code};
use drv_proto::AckQueue;
use drv_transport::link::{self, Link};
use drv_transport::{Identity, Role, TransportError, tls};
use tokio::sync::oneshot;

use crate::agent::AgentError;

/// Resolves when staging acknowledged the record (or the session failed).
pub(crate) type AckWait = oneshot::Receiver<Result<(), AgentError>>;
type AckTx = oneshot::Sender<Result<(), AgentError>>;

/// The largest frame body accepted from staging (acknowledgements and errors are small).
const ACK_FRAME_BYTES_LIMIT: u32 = 1 << 20;

/// How long a connection attempt to staging may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One connection to staging.
pub(crate) struct Session {
    out: Arc<Link>,
    acks: Mutex<AckQueue<AckTx>>,
    broken: Mutex<Option<String>>,
    /// The origin of the times the ack queue is given.
    born: Instant,
    /// The agent's highest acknowledged sequence number (shared by its sessions).
    acked_through: Arc<AtomicU64>,
}

impl Drop for Session {
    /// Closes the link: the reader task sees the end, staging sees the agent go.
    fn drop(&mut self) {
        self.out.shutdown();
    }
}

impl Session {
    fn acked(&self, seq: u64) {
        self.acked_through.fetch_max(seq, Ordering::SeqCst);
        let done = self.acks.lock().expect("acks").acked(seq);
        for tx in done {
            let _ = tx.send(Ok(()));
        }
    }

    /// The stream is gone: every waiting write fails (the oldest with `first`).
    /// Not logged here: what the agent does about it (`switch_to_map`, a resync that stops) says
    /// it once, with this reason.
    pub(crate) fn fail(&self, why: String, first: AgentError) {
        let mut b = self.broken.lock().expect("broken");
        if b.is_none() {
            tracing::debug!("agent stream to staging ended: {why}");
            *b = Some(why);
        }
        drop(b);
        let waiters = self.acks.lock().expect("acks").take_all();
        let mut first = Some(first);
        for tx in waiters {
            let _ = tx.send(Err(first.take().unwrap_or(AgentError::Disconnected)));
        }
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.broken.lock().expect("broken").is_some()
    }

    /// Why the session broke, if it did.
    pub(crate) fn broken_reason(&self) -> Option<String> {
        self.broken.lock().expect("broken").clone()
    }

    /// Queues the frame of record `seq` after registering its waiter; `None` when the session is
    /// broken.
    pub(crate) fn send(&self, seq: u64, f: Frame) -> Option<AckWait> {
        let (tx, rx) = oneshot::channel();
        self.acks.lock().expect("acks").sent(seq, self.born.elapsed(), tx);
        if self.is_broken() {
            self.acks.lock().expect("acks").unsent(seq);
            return None;
        }
        if let Err(e) = self.out.send(&f) {
            // Never a later frame on this session: its sequence would have a gap.
            self.acks.lock().expect("acks").unsent(seq);
            self.fail(format!("send to staging: {e}"), AgentError::Disconnected);
            return None;
        }
        Some(rx)
    }

    /// The oldest record waiting longer than `timeout`.
    fn overdue(&self, timeout: Duration) -> Option<u64> {
        self.acks.lock().expect("acks").overdue(self.born.elapsed(), timeout)
    }
}

/// A session just opened, and what staging said of the volume.
pub(crate) struct Opened {
    pub session: Arc<Session>,
    pub last_seq: u64,
    pub last_epoch: u64,
    /// Free bytes of staging's log, and all of its bytes.
    pub room_bytes: u64,
    pub capacity_bytes: u64,
}

/// Connects and opens the volume.
pub(crate) async fn open_session(
    id: &Identity,
    staging: SocketAddr,
    volume_id: u64,
    ack_timeout: Duration,
    acked_through: Arc<AtomicU64>,
) -> Result<Opened, AgentError> {
    let cfg = tls::client_config(id, Role::Staging)?;
    let timeout = |_| TransportError::Connect {
        peer: staging.to_string(),
        reason: format!("no answer within {CONNECT_TIMEOUT:?}"),
    };
    // A refused connection is retried within the timeout: staging may be starting (or restarting).
    let connect = async {
        loop {
            match link::connect(staging, cfg.clone(), ACK_FRAME_BYTES_LIMIT).await {
                Err(TransportError::NotListening { .. }) => tokio::time::sleep(Duration::from_millis(50)).await,
                r => return r,
            }
        }
    };
    let (out, mut r) = tokio::time::timeout(CONNECT_TIMEOUT, connect).await.map_err(timeout)??;
    out.send(&Frame::OpenVolume { volume_id })?;
    let answer = tokio::time::timeout(CONNECT_TIMEOUT, r.next()).await.map_err(timeout)?;
    let (last_seq, last_epoch, room_bytes, capacity_bytes) = match answer? {
        Some(Frame::VolumeState { last_seq, last_epoch, room_bytes, capacity_bytes, .. }) => {
            (last_seq, last_epoch, room_bytes, capacity_bytes)
        }
        // Staging cannot take writes now (its log failed or is full): an outage, not a refusal.
        Some(Frame::Error { code: c, message }) if c == code::SERVER || c == code::LOG_FULL => {
            return Err(AgentError::Unavailable(message));
        }
        Some(Frame::Error { message, .. }) => return Err(AgentError::Refused { volume: volume_id, message }),
        _ => return Err(AgentError::Disconnected),
    };
    let s = Arc::new(Session {
        out,
        acks: Mutex::default(),
        broken: Mutex::default(),
        born: Instant::now(),
        acked_through,
    });
    tokio::spawn(watchdog(Arc::downgrade(&s), ack_timeout));
    tokio::spawn(read_acks(Arc::downgrade(&s), r, volume_id));
    Ok(Opened { session: s, last_seq, last_epoch, room_bytes, capacity_bytes })
}

/// The ack timeout: one watchdog per session, not a timer per write. The oldest write in flight
/// waiting longer than `ack_timeout` fails the session (within a quarter more).
async fn watchdog(ws: std::sync::Weak<Session>, ack_timeout: Duration) {
    let tick = (ack_timeout / 4).max(Duration::from_millis(1));
    loop {
        tokio::time::sleep(tick).await;
        let Some(s) = ws.upgrade() else { return };
        if s.is_broken() {
            return;
        }
        if let Some(seq) = s.overdue(ack_timeout) {
            let e = AgentError::AckTimeout { seq, timeout: ack_timeout };
            return s.fail(e.to_string(), e);
        }
    }
}

/// Staging's answers: cumulative acks, or the error that ends the session.
async fn read_acks(rs: std::sync::Weak<Session>, mut r: link::LinkReader, volume_id: u64) {
    loop {
        let m = r.next().await;
        let Some(s) = rs.upgrade() else { return };
        match m {
            Ok(Some(Frame::Ack { seq, .. })) => s.acked(seq),
            Ok(Some(Frame::Error { code: c, message })) => {
                let e = if c == code::LOG_FULL {
                    AgentError::LogFull(message.clone())
                } else {
                    AgentError::Refused { volume: volume_id, message: message.clone() }
                };
                return s.fail(message, e);
            }
            Ok(Some(other)) => {
                return s.fail(format!("unexpected {:?} frame from staging", other.ftype()), AgentError::Disconnected);
            }
            Ok(None) => return s.fail("staging closed the stream".into(), AgentError::Disconnected),
            Err(e) => return s.fail(format!("receive from staging: {e}"), AgentError::Disconnected),
        }
    }
}

/// Waits for one record's acknowledgement, at most `timeout`.
pub(crate) async fn wait_ack((seq, rx): (u64, AckWait), timeout: Duration) -> Result<(), AgentError> {
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(AgentError::Disconnected),
        Err(_) => Err(AgentError::AckTimeout { seq, timeout }),
    }
}
