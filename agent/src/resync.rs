//! The reconnect task and the resync: while the agent is in change-map mode it reconnects, asks
//! staging for room, and ships the marked blocks as `RESYNC` records read from the local disk, in
//! passes (writes keep going to the change map meanwhile and are shipped by the next pass). The
//! last pass holds new writes back, ships what is left, clears the map and returns to sync mode;
//! an `EPOCH_END` record then ends the resync run so the replica applies it at once. The rules
//! (budget, last pass, pace, the mode machine) are `drv_proto::agent`'s.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use drv_changemap::ChangeMap;
use drv_format::frame::Frame;
use drv_format::record::Flags;
use drv_proto::Mode;
use drv_proto::agent::{last_pass, pace, resync_budget, staging_holds};

use crate::agent::{AgentError, FullMark, Inner, blocking, epoch_end, units};
use crate::session::{AckWait, Opened, open_session, wait_ack};

/// How one attempt of the reconnect task ended.
enum Attempt {
    Unreachable,
    /// Staging's log has no room for the resync yet.
    NoRoom,
    /// The resync used the room it was given: ask for more at once.
    Again,
    /// The resync completed, or failed (and goes on at the next attempt).
    Resynced,
}

/// What the reconnect task said already (each said once until it changes).
#[derive(Default)]
struct Said {
    /// Staging's log has no room for the resync.
    room: bool,
    /// Staging holds less than it acknowledged.
    lost: bool,
}

/// Acknowledgements a pass waits for at most at once (the oldest is acknowledged first anyway).
const SHIP_WAITS_LIMIT: usize = 256;
/// Acknowledged blocks cleared in the map together.
const CLEAR_BATCH_BLOCKS: usize = 64;

impl Inner {
    /// Reconnects and resyncs whenever the agent is in change-map mode, until the agent is gone.
    /// While staging's log has no room for the resync it waits, longer each time (up to four
    /// reconnect intervals), and says so once.
    pub(crate) async fn reconnect_task(weak: std::sync::Weak<Inner>) {
        let Some(degraded_n) = weak.upgrade().map(|i| i.degraded.clone()) else { return };
        let mut said = Said::default();
        let mut delay = Duration::ZERO;
        loop {
            let degraded = degraded_n.notified();
            let Some(i) = weak.upgrade() else { return };
            let interval = i.opts.reconnect_interval;
            let mode = {
                let mut o = i.order.lock().expect("order");
                // A link that broke while idle (staging gone between writes): leave sync mode
                // now, so status says so and the reconnect starts, not at the next write.
                let broken = o.session.as_ref().and_then(|s| s.broken_reason());
                if let (Mode::Sync, Some(why), true) = (o.core.mode(), broken, i.map.is_some()) {
                    i.switch_to_map(&mut o, &why);
                }
                o.core.mode()
            };
            if mode == Mode::ChangeMap && i.map.is_some() {
                delay = match i.try_resync(&mut said).await {
                    Attempt::Again => Duration::ZERO,
                    Attempt::NoRoom => (delay * 2).clamp(interval, interval * 4),
                    Attempt::Unreachable | Attempt::Resynced => interval,
                };
                drop(i);
                tokio::time::sleep(delay).await;
            } else {
                drop(i);
                tokio::select! {
                    _ = degraded => {}
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        }
    }

    /// One attempt of the reconnect task: a session, and a resync if staging's log has room and
    /// holds everything it acknowledged.
    async fn try_resync(self: &Arc<Self>, said: &mut Said) -> Attempt {
        let o = match open_session(&self.id, self.staging, self.volume_id, self.opts.ack_timeout, self.acked.clone())
            .await
        {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!("staging still unreachable: {e}");
                return Attempt::Unreachable;
            }
        };
        if let Err(e) = staging_holds(o.last_seq, self.acked.load(Ordering::SeqCst)) {
            if !std::mem::replace(&mut said.lost, true) {
                tracing::error!(volume = self.volume_id, "{e}");
                *self.problem.lock().expect("problem") = Some(e.to_string());
            }
            o.session.fail(e.to_string(), AgentError::Disconnected);
            return Attempt::Unreachable;
        }
        if std::mem::take(&mut said.lost) {
            *self.problem.lock().expect("problem") = None;
        }
        let dirty = self.map.as_ref().map(|m| m.dirty_bytes()).unwrap_or(0);
        let Some(budget) = resync_budget(o.room_bytes, o.capacity_bytes, dirty) else {
            if !std::mem::replace(&mut said.room, true) {
                tracing::info!(
                    volume = self.volume_id,
                    room_bytes = o.room_bytes,
                    capacity_bytes = o.capacity_bytes,
                    dirty_bytes = dirty,
                    "staging's write log has no room for the resync: waiting until relaying frees some"
                );
            }
            return Attempt::NoRoom;
        };
        said.room = false;
        let shipped = self.stats.resync_bytes.load(Ordering::Relaxed);
        match self.resync(o, budget).await {
            // Room for not even one block: wait like for a full log (never a busy loop).
            Err(AgentError::RoomUsed) if self.stats.resync_bytes.load(Ordering::Relaxed) == shipped => Attempt::NoRoom,
            Err(AgentError::RoomUsed) => Attempt::Again,
            _ => Attempt::Resynced,
        }
    }

    /// Ships every marked block over the session `o`, at most `budget` bytes of them, then
    /// returns to sync mode. When it stops before that (the link failed, or the budget is used up)
    /// the agent stays in change-map mode and the reconnect task goes on where it stopped: blocks
    /// shipped and acknowledged are cleared in the map as the acknowledgements come.
    async fn resync(self: &Arc<Self>, o: Opened, mut budget: u64) -> Result<(), AgentError> {
        let map = self.map.clone().expect("resync needs a change map");
        let s = o.session.clone();
        {
            let mut ord = self.order.lock().expect("order");
            // One resync at a time: the session it runs on owns the sequence numbers.
            assert!(
                ord.session.as_ref().is_none_or(|x| x.is_broken()),
                "a resync started while another session is live"
            );
            if let Err(e) = ord.core.resync_begin(o.last_seq, o.last_epoch, self.acked.load(Ordering::SeqCst)) {
                s.fail(e.to_string(), AgentError::Disconnected);
                return Err(e.into());
            }
            ord.session = Some(o.session);
        }
        tracing::info!(volume = self.volume_id, dirty_bytes = map.dirty_bytes(), budget, "resync started");
        let r = self.resync_passes(&map, &mut budget).await;
        match &r {
            Ok(()) => tracing::info!(volume = self.volume_id, "resync complete: back in sync mode"),
            Err(e) => {
                if matches!(e, AgentError::RoomUsed) {
                    tracing::debug!(volume = self.volume_id, "resync paused: {e}");
                } else {
                    // Why the session ended (staging's refusal, a timeout) says more than what the
                    // resync saw of it.
                    let why = s.broken_reason().unwrap_or_else(|| e.to_string());
                    tracing::warn!(volume = self.volume_id, "resync interrupted: {why}");
                }
                let mut ord = self.order.lock().expect("order");
                ord.core.resync_stopped();
                ord.session = None;
                s.fail(format!("resync paused: {e}"), AgentError::Disconnected);
                map.reset_todo();
            }
        }
        r
    }

    /// Runs on the session installed by `resync`.
    async fn resync_passes(self: &Arc<Self>, map: &Arc<ChangeMap>, budget: &mut u64) -> Result<(), AgentError> {
        let mut pass = 0u64;
        loop {
            pass += 1;
            let last = last_pass(pass, map.todo_len(), self.opts.final_pass_blocks);
            let _exclusive = if last { Some(self.gate.write().await) } else { None };
            let blocks = map.take_todo();
            self.ship(map, &blocks, !last, budget).await?;
            if last {
                // Everything marked was shipped and is durable at staging; no write is running,
                // and none starts before the mode is sync again (the gate is still held).
                map.clear_all()?;
                let mut o = self.order.lock().expect("order");
                let end = o.core.resync_end();
                self.stats.mode_switches.fetch_add(1, Ordering::Relaxed);
                let _ = o.send(end, epoch_end(self.volume_id));
                return Ok(());
            }
        }
    }

    /// Sends `blocks` as RESYNC records read from the local disk (at most `budget` bytes, which
    /// it counts down), waits for every ack, and clears each block in the map once staging has it.
    async fn ship(
        self: &Arc<Self>,
        map: &Arc<ChangeMap>,
        blocks: &[u64],
        limited: bool,
        budget: &mut u64,
    ) -> Result<(), AgentError> {
        let bs = map.block_bytes;
        let mut waits = std::collections::VecDeque::new();
        let mut acked = Vec::new();
        let started = std::time::Instant::now();
        let mut sent = 0u64;
        let mut result = Ok(());
        for &b in blocks {
            let offset = b * bs;
            let len = bs.min(self.volume_bytes - offset) as usize;
            if (len as u64) > *budget {
                result = Err(AgentError::RoomUsed);
                break;
            }
            *budget -= len as u64;
            let limit = if limited { self.bwlimit.load(Ordering::Relaxed) } else { 0 };
            if let Some(wait) = pace(sent, limit, started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            match self.send_block(offset, len).await {
                Ok(w) => waits.push_back((b, w)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            sent += len as u64;
            if waits.len() >= SHIP_WAITS_LIMIT {
                let (b, (w, _permit)) = waits.pop_front().expect("not empty");
                if let Err(e) = self.acked(w).await {
                    result = Err(e);
                    waits.clear();
                    break;
                }
                acked.push(b);
                if acked.len() >= CLEAR_BATCH_BLOCKS {
                    map.clear_shipped(&std::mem::take(&mut acked))?;
                }
            }
        }
        for (b, (w, _permit)) in waits {
            if let Err(e) = self.acked(w).await {
                result = result.and(Err(e));
                break;
            }
            acked.push(b);
        }
        // What staging acknowledged is durable there, even when the pass stops here: an
        // interrupted resync goes on from the rest.
        map.clear_shipped(&acked)?;
        if result.is_err() {
            // A FULL record staging did not acknowledge: the next record carries the mark.
            let mut f = self.full.lock().expect("full mark");
            if matches!(*f, FullMark::InFlight(_)) {
                *f = FullMark::Pending;
            }
        }
        result
    }

    /// Waits for staging's acknowledgement of a RESYNC record; the FULL mark it carried (or an
    /// earlier record carried: acknowledgements are cumulative) is done with.
    async fn acked(&self, w: (u64, AckWait)) -> Result<(), AgentError> {
        let seq = w.0;
        wait_ack(w, self.opts.ack_timeout).await?;
        let done = {
            let mut f = self.full.lock().expect("full mark");
            let done = matches!(*f, FullMark::InFlight(s) if s <= seq);
            if done {
                *f = FullMark::None;
            }
            done
        };
        if let (true, Some(p)) = (done, self.full_marker.clone()) {
            // Left behind, it costs the next start a whole initial sync again, nothing more.
            let path = p.clone();
            let gone = match tokio::task::spawn_blocking(move || drv_files::remove_durably(&p)).await {
                Ok(r) => r.err().map(|e| e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(e) = gone {
                tracing::warn!("{}: {e} (the next start of the agent syncs the whole volume again)", path.display());
            }
        }
        Ok(())
    }

    /// Reads one block from the local disk and queues it as a RESYNC record.
    async fn send_block(
        self: &Arc<Self>,
        offset: u64,
        len: usize,
    ) -> Result<((u64, AckWait), tokio::sync::SemaphorePermit<'_>), AgentError> {
        let permit = self.inflight.acquire_many(units(len)).await.map_err(|_| AgentError::Disconnected)?;
        let disk = self.disk.clone();
        let data = blocking(offset, move || {
            let mut buf = vec![0u8; len];
            disk.read_at(offset, &mut buf).map(|_| buf).map_err(|err| AgentError::Local { offset, err })
        })
        .await?;
        let rx = {
            let mut o = self.order.lock().expect("order");
            let stamp = o.core.resync_record();
            let flags = {
                let mut f = self.full.lock().expect("full mark");
                if *f == FullMark::Pending {
                    *f = FullMark::InFlight(stamp.seq);
                    Flags::RESYNC | Flags::FULL
                } else {
                    Flags::RESYNC
                }
            };
            let (volume_id, data) = (self.volume_id, Bytes::from(data));
            let frame = |s: drv_proto::Stamp| Frame::Write {
                volume_id,
                seq: s.seq,
                epoch: s.epoch,
                offset,
                flags: flags.0,
                capture_unix: drv_format::record::capture_clock(),
                data,
            };
            o.send(stamp, frame).ok_or(AgentError::Disconnected)?
        };
        self.stats.resync_blocks.fetch_add(1, Ordering::Relaxed);
        self.stats.resync_bytes.fetch_add(len as u64, Ordering::Relaxed);
        Ok((rx, permit))
    }
}
