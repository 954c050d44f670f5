//! The synchronous path: each write goes to staging; the local write is performed only after the
//! staging acknowledgement; the write completes after both. In-flight writes are bounded.
//!
//! One QUIC stream per volume carries `Write` frames in sequence order (they are queued under the
//! same lock that assigns sequence and epoch); a reader task resolves waiters from the cumulative
//! `Ack` frames. An idle task ends the current epoch with an `EPOCH_END` record once nothing has
//! been in flight for `epoch_close_idle`, so the replica applies the last writes of a burst
//! without waiting for the next one.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use drv_format::frame::{Frame, code};
use drv_format::record::{Flags, MAX_WRITE_BYTES};
use drv_transport::{FrameReader, FrameWriter, Identity, Role, TransportError, quic};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};

use crate::epoch::EpochClock;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("staging: {0}")]
    Transport(#[from] TransportError),
    #[error("staging refused volume {volume}: {message}")]
    Refused { volume: u64, message: String },
    /// Staging reported its write log full (the agent's cue for its change map).
    #[error("staging write log full: {0}")]
    LogFull(String),
    #[error("staging did not acknowledge seq {seq} within {timeout:?}")]
    AckTimeout { seq: u64, timeout: Duration },
    #[error("the connection to staging is gone")]
    Disconnected,
    #[error("write of {0} bytes is over the {MAX_WRITE_BYTES}-byte limit of one record")]
    TooLarge(usize),
    #[error("local write at offset {offset}: {source}")]
    Local { offset: u64, source: std::io::Error },
}

/// The local disk of a protected volume: where a write goes once staging has it.
pub trait LocalDisk: Send + Sync + 'static {
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    /// Makes every completed write stable (FLUSH; and after a FUA write).
    fn flush(&self) -> std::io::Result<()>;
}

/// A file or block device opened for the local writes.
pub struct FileDisk(pub std::fs::File);

impl LocalDisk for FileDisk {
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, data, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
}

#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Bytes of writes between issue and completion; writers wait beyond it.
    pub inflight_bytes_limit: u64,
    /// How long a write may wait for the staging acknowledgement.
    pub ack_timeout: Duration,
    /// Nothing in flight for this long ends the current epoch (an `EPOCH_END` record).
    pub epoch_close_idle: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            inflight_bytes_limit: 32 << 20,
            ack_timeout: Duration::from_secs(5),
            epoch_close_idle: Duration::from_millis(20),
        }
    }
}

/// Counters for status and the demo.
#[derive(Debug, Default)]
pub struct AgentStats {
    pub writes: AtomicU64,
    pub bytes: AtomicU64,
    pub epochs_closed: AtomicU64,
}

struct Order {
    next_seq: u64,
    clock: EpochClock,
    /// Byte ranges of writes in flight, `start -> end`; they never overlap (see `write_with`).
    ranges: BTreeMap<u64, u64>,
}

impl Order {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        if start == end {
            return false;
        }
        // The range starting at or before `start`, and any starting inside [start, end).
        self.ranges.range(..=start).next_back().is_some_and(|(_, e)| *e > start)
            || self.ranges.range(start..end).next().is_some()
    }
}

type Waiters = BTreeMap<u64, oneshot::Sender<Result<(), AgentError>>>;
/// Resolves when staging acknowledged the write (or the stream failed).
type AckWait = oneshot::Receiver<Result<(), AgentError>>;

struct Inner {
    volume_id: u64,
    disk: Arc<dyn LocalDisk>,
    order: Mutex<Order>,
    out: mpsc::UnboundedSender<Frame>,
    waiters: Mutex<Waiters>,
    /// Why the stream ended, once it has.
    broken: Mutex<Option<String>>,
    inflight: Semaphore,
    /// A range left `Order::ranges`.
    range_freed: Notify,
    idle: Notify,
    opts: AgentOptions,
    stats: AgentStats,
}

/// The agent of one protected volume.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

/// 4 KiB units of the in-flight limit.
fn units(bytes: usize) -> u32 {
    (bytes.div_ceil(4096).max(1)).min(u32::MAX as usize) as u32
}

impl Agent {
    /// Connects to staging and opens `volume_id`; later writes continue after staging's durable
    /// position for the volume.
    pub async fn connect(
        id: &Identity,
        staging: SocketAddr,
        volume_id: u64,
        disk: Arc<dyn LocalDisk>,
        opts: AgentOptions,
    ) -> Result<Agent, AgentError> {
        let client = quic::client(id, Role::Staging)?;
        let mut conn = quic::connect(&client, staging, Role::Staging).await?;
        let stream = conn.open_bidirectional_stream().await.map_err(|e| TransportError::Stream(e.to_string()))?;
        let (rx, tx) = stream.split();
        let mut r = FrameReader::new(rx, 1 << 20);
        let mut w = FrameWriter::new(tx);
        w.send_frame(&Frame::OpenVolume { volume_id }).await?;
        let (last_seq, last_epoch) = match r.next().await? {
            Some(Frame::VolumeState { last_seq, last_epoch, .. }) => (last_seq, last_epoch),
            Some(Frame::Error { message, .. }) => return Err(AgentError::Refused { volume: volume_id, message }),
            _ => return Err(AgentError::Disconnected),
        };
        tracing::info!(volume_id, last_seq, last_epoch, "agent connected to staging {staging}");
        let (out, mut out_rx) = mpsc::unbounded_channel::<Frame>();
        let permits = (opts.inflight_bytes_limit / 4096).clamp(1, Semaphore::MAX_PERMITS as u64) as usize;
        let inner = Arc::new(Inner {
            volume_id,
            disk,
            order: Mutex::new(Order {
                next_seq: last_seq + 1,
                clock: EpochClock::new(last_epoch),
                ranges: BTreeMap::new(),
            }),
            range_freed: Notify::new(),
            out,
            waiters: Mutex::new(BTreeMap::new()),
            broken: Mutex::new(None),
            inflight: Semaphore::new(permits),
            idle: Notify::new(),
            opts,
            stats: AgentStats::default(),
        });
        // Writer: frames leave in the order they were queued (sequence order). The connection
        // handle lives here, as long as the stream.
        let wi = inner.clone();
        tokio::spawn(async move {
            let _conn = conn;
            let _client = client;
            while let Some(f) = out_rx.recv().await {
                if let Err(e) = w.send_frame(&f).await {
                    wi.fail_all(format!("send to staging: {e}"));
                    return;
                }
            }
        });
        // Reader: cumulative acknowledgements.
        let ri = inner.clone();
        tokio::spawn(async move {
            loop {
                match r.next().await {
                    Ok(Some(Frame::Ack { seq, .. })) => ri.acked(seq),
                    Ok(Some(Frame::Error { code: c, message })) => {
                        let e = if c == code::LOG_FULL {
                            AgentError::LogFull(message.clone())
                        } else {
                            AgentError::Refused { volume: ri.volume_id, message: message.clone() }
                        };
                        ri.fail_all_with(message, e);
                        return;
                    }
                    Ok(Some(other)) => {
                        ri.fail_all(format!("unexpected {:?} frame from staging", other.ftype()));
                        return;
                    }
                    Ok(None) => {
                        ri.fail_all("staging closed the stream".into());
                        return;
                    }
                    Err(e) => {
                        ri.fail_all(format!("receive from staging: {e}"));
                        return;
                    }
                }
            }
        });
        // Idle epoch closer.
        let ci = inner.clone();
        tokio::spawn(async move {
            while ci.broken.lock().expect("broken").is_none() {
                ci.idle.notified().await;
                tokio::time::sleep(ci.opts.epoch_close_idle).await;
                ci.close_idle_epoch();
            }
        });
        Ok(Agent { inner })
    }

    /// The write of `data` at `offset`: to staging, then (after its acknowledgement) to the local
    /// disk; returns when both are done.
    pub async fn write(&self, offset: u64, data: Bytes, flags: Flags) -> Result<(), AgentError> {
        let disk = self.inner.disk.clone();
        let d = data.clone();
        self.write_with(offset, data, flags, move || {
            if !d.is_empty() {
                disk.write_at(offset, &d)?;
            }
            if flags.contains(Flags::FLUSH) || flags.contains(Flags::FUA) {
                disk.flush()?;
            }
            Ok(())
        })
        .await
    }

    /// For capture paths that perform the local write themselves (a kernel module releasing the
    /// held bio, a userspace device writing its image): `local` runs once staging has the write,
    /// and the write is complete when this returns.
    pub async fn write_with<F>(&self, offset: u64, data: Bytes, flags: Flags, local: F) -> Result<(), AgentError>
    where
        F: FnOnce() -> std::io::Result<()> + Send + 'static,
    {
        let i = &self.inner;
        if data.len() > MAX_WRITE_BYTES as usize {
            return Err(AgentError::TooLarge(data.len()));
        }
        let n = units(data.len());
        let permit = i.inflight.acquire_many(n).await.map_err(|_| AgentError::Disconnected)?;
        let len = data.len() as u64;
        let end = offset + len;
        // Overlapping writes in flight together would reach staging in one order and the local
        // disk in possibly another, and source and replica would differ. So a write waits until
        // no write in flight overlaps it (it then lands in a later epoch, as it must).
        let mut data = Some(data);
        let (seq, rx) = loop {
            let freed = i.range_freed.notified();
            match i.try_issue(offset, flags, &mut data)? {
                Some(issued) => break issued,
                None => freed.await,
            }
        };
        let acked = match tokio::time::timeout(i.opts.ack_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(AgentError::Disconnected),
            Err(_) => Err(AgentError::AckTimeout { seq, timeout: i.opts.ack_timeout }),
        };
        let result = match acked {
            Ok(()) => match tokio::task::spawn_blocking(local).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(source)) => Err(AgentError::Local { offset, source }),
                Err(e) => Err(AgentError::Local { offset, source: std::io::Error::other(e.to_string()) }),
            },
            Err(e) => Err(e),
        };
        {
            let mut o = i.order.lock().expect("order");
            o.clock.complete();
            if end > offset {
                o.ranges.remove(&offset);
            }
            if o.clock.inflight() == 0 {
                i.idle.notify_one();
            }
        }
        i.range_freed.notify_waiters();
        drop(permit);
        if result.is_ok() {
            i.stats.writes.fetch_add(1, Ordering::Relaxed);
            i.stats.bytes.fetch_add(len, Ordering::Relaxed);
        }
        result
    }

    /// Ends the current epoch now if nothing is in flight (the idle task does this on its own).
    pub fn close_epoch(&self) {
        self.inner.close_idle_epoch();
    }

    /// The next sequence number and the current epoch.
    pub fn position(&self) -> (u64, u64) {
        let o = self.inner.order.lock().expect("order");
        (o.next_seq, o.clock.current())
    }

    pub fn stats(&self) -> &AgentStats {
        &self.inner.stats
    }
}

impl Inner {
    /// Issues the write (sequence, epoch, frame queued, range registered), or `None` while a
    /// write in flight overlaps it.
    fn try_issue(
        &self,
        offset: u64,
        flags: Flags,
        data: &mut Option<Bytes>,
    ) -> Result<Option<(u64, AckWait)>, AgentError> {
        let len = data.as_ref().map(|d| d.len() as u64).unwrap_or(0);
        let end = offset + len;
        let mut o = self.order.lock().expect("order");
        if o.overlaps(offset, end) {
            return Ok(None);
        }
        if let Some(why) = self.broken.lock().expect("broken").clone() {
            tracing::debug!("write refused: {why}");
            return Err(AgentError::Disconnected);
        }
        let seq = o.next_seq;
        o.next_seq += 1;
        let epoch = o.clock.issue();
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().expect("waiters").insert(seq, tx);
        let data = data.take().expect("issued once");
        let f = Frame::Write { volume_id: self.volume_id, seq, epoch, offset, flags: flags.0, data };
        if self.out.send(f).is_err() {
            self.waiters.lock().expect("waiters").remove(&seq);
            o.clock.complete();
            return Err(AgentError::Disconnected);
        }
        if end > offset {
            o.ranges.insert(offset, end);
        }
        Ok(Some((seq, rx)))
    }

    fn acked(&self, seq: u64) {
        let mut w = self.waiters.lock().expect("waiters");
        let rest = w.split_off(&(seq + 1));
        let done = std::mem::replace(&mut *w, rest);
        drop(w);
        for (_, tx) in done {
            let _ = tx.send(Ok(()));
        }
    }

    fn fail_all(&self, why: String) {
        self.fail_all_with(why.clone(), AgentError::Disconnected);
    }

    /// The stream is gone: every waiting write fails (with `first` for the oldest), later writes too.
    fn fail_all_with(&self, why: String, first: AgentError) {
        tracing::warn!(volume = self.volume_id, "agent stream to staging ended: {why}");
        *self.broken.lock().expect("broken") = Some(why);
        self.idle.notify_one();
        let waiters = std::mem::take(&mut *self.waiters.lock().expect("waiters"));
        let mut first = Some(first);
        for (_, tx) in waiters {
            let _ = tx.send(Err(first.take().unwrap_or(AgentError::Disconnected)));
        }
        self.inflight.close();
    }

    fn close_idle_epoch(&self) {
        let mut o = self.order.lock().expect("order");
        if self.broken.lock().expect("broken").is_some() {
            return;
        }
        let Some(epoch) = o.clock.close_idle() else { return };
        let seq = o.next_seq;
        o.next_seq += 1;
        let f = Frame::Write {
            volume_id: self.volume_id,
            seq,
            epoch,
            offset: 0,
            flags: Flags::EPOCH_END.0,
            data: Bytes::new(),
        };
        if self.out.send(f).is_ok() {
            self.stats.epochs_closed.fetch_add(1, Ordering::Relaxed);
        }
    }
}
