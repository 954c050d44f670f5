//! The eBPF change tracker of `drv track VOLUME` and its cuts (`drv track sync VOLUME`).
//!
//! The tracker is an agent without a capture path: the eBPF programs see each write to the
//! device when it is issued (the rules are [`crate::track`]'s); a poller thread takes the events
//! into the marks every few milliseconds. A cut hands the marked extents to whatever ships them
//! ([`Ship`]: the agent, as a resync that reads them from the device and sends them through
//! staging) and waits until staging holds them all.
//!
//! A cut, in order: freeze the filesystem (optionally); take every event queued so far into the
//! marks (after a freeze returns, every write of the filesystem has completed, so the marks
//! describe the device as it is); take the marks; ship them; wait for staging; thaw. A change
//! made while the cut runs is marked again and goes with the next cut. Without the freeze the
//! blocks are read while the application keeps writing: complete, but not crash-consistent.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drv_files::freeze::{FreezeError, Frozen};
use drv_proto::status::CutReport;

use crate::crosscheck::monotonic_ns;
use crate::loader::{Tracer, TracerError};
use crate::track::{Cut, LossAction, Marked};

/// The programs and the marks of one tracked device.
pub struct Tracking {
    tracer: Tracer,
    marked: Marked,
}

impl Tracking {
    /// Starts the programs on device `dev` (from here on no write to it goes unseen), marking
    /// into blocks of `block_bytes` of a volume of `volume_bytes`.
    pub fn start(dev: u32, volume_bytes: u64, block_bytes: u64) -> Result<Tracking, TracerError> {
        let tracer = Tracer::start(&[dev])?;
        Ok(Tracking { tracer, marked: Marked::new(dev, volume_bytes, block_bytes) })
    }

    /// Takes every queued event and every loss report into the marks.
    pub fn pump(&mut self) -> Result<(), TracerError> {
        let Tracking { tracer, marked } = self;
        tracer.drain(|e| marked.on(&crate::Request::from_event(e)));
        let losses = self.tracer.losses()?;
        match self.marked.on_losses(&losses) {
            LossAction::None => {}
            LossAction::Ranges(r) => tracing::warn!("eBPF events lost: marking {} lost ranges as changed", r.len()),
            LossAction::All => {
                tracing::warn!("eBPF events lost without a known range: marking the whole volume as changed")
            }
        }
        Ok(())
    }
}

/// Pumps a [`Tracking`] every `every` on a thread of its own, until stopped.
pub struct Poller {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<(), TracerError>>,
}

impl Poller {
    pub fn start(t: Arc<Mutex<Tracking>>, every: Duration) -> std::io::Result<Poller> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new().name("drv-track-poll".into()).spawn(move || {
            while !s.load(Ordering::SeqCst) {
                t.lock().expect("tracking").pump()?;
                std::thread::sleep(every);
            }
            Ok(())
        })?;
        Ok(Poller { stop, thread })
    }

    /// Stops the thread; the error that stopped it earlier, if one did.
    pub fn stop(self) -> Result<(), TrackError> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().map_err(|_| TrackError::PollerPanicked)?.map_err(TrackError::Tracer)
    }
}

/// Where a cut's extents go.
pub trait Ship: Sync {
    /// Ships `extents` (`(offset, length)` in bytes), marked durably before this returns.
    fn ship(&self, extents: &[(u64, u64)]) -> impl std::future::Future<Output = Result<(), TrackError>> + Send;
    /// Whether everything shipped is held by staging within `timeout`.
    fn wait_synced(&self, timeout: Duration) -> impl std::future::Future<Output = bool> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error(transparent)]
    Tracer(#[from] TracerError),
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    #[error("hand the changes to the agent: {0}")]
    Ship(String),
    #[error("the polling thread panicked")]
    PollerPanicked,
}

/// One cut (see the module docs): the changes marked until now reach staging, with the
/// filesystem mounted at `freeze` frozen meanwhile if given, waiting at most `timeout`.
pub async fn cut(
    t: &Mutex<Tracking>,
    ship: &impl Ship,
    freeze: Option<&Path>,
    timeout: Duration,
) -> Result<CutReport, TrackError> {
    let t0 = Instant::now();
    let frozen = freeze.map(Frozen::freeze).transpose()?;
    let Cut { extents, rpo_before_ns, lost } = {
        let mut t = t.lock().expect("tracking");
        t.pump()?;
        t.marked.cut(monotonic_ns())
    };
    let bytes: u64 = extents.iter().map(|e| e.1).sum();
    let shipped = if extents.is_empty() { Ok(()) } else { ship.ship(&extents).await };
    let complete = shipped.is_ok() && ship.wait_synced(timeout).await;
    let frozen_s = frozen.as_ref().map(|f| f.since.elapsed().as_secs_f64());
    if let Some(f) = frozen {
        f.thaw()?;
    }
    shipped?;
    let pending_bytes = t.lock().expect("tracking").marked.pending_bytes();
    Ok(CutReport {
        extents: extents.len() as u64,
        bytes,
        took_s: t0.elapsed().as_secs_f64(),
        complete,
        frozen: freeze.is_some(),
        frozen_s,
        consistent: complete && freeze.is_some(),
        rpo_before_s: rpo_before_ns.map(|n| n as f64 / 1e9),
        pending_bytes,
        lost_events: lost,
    })
}
