//! The upkeep of a volume's retention window (any point in time), run by its apply thread about
//! once a second: the window is opened when the volume's configuration asks for one and the
//! target is consistent, its start moves forward as points age out or the store outgrows its
//! byte limit, and it is closed when the configuration no longer asks for one.
//!
//! **Which clock.** A point's time is the agent's clock when it captured the unit's writes (the
//! records carry it); that is the time an administrator asks for (`--at 09:41`) and the one
//! `drv snapshot points` shows. Expiry asks both clocks: a point goes only when it is older than
//! `retention` by the agent's clock (measured from the newest point's capture time) *and* by the
//! replica's own (measured from when it was applied). An agent clock set forward a year (or back)
//! therefore never empties the window at once, and a replica clock jump alone does not either.
//! Times after the agent's clock was set back repeat: `--at TIME` takes the newest point at or
//! before TIME.
//!
//! **Bytes.** While the store holds more than `retention_bytes` (or 90% of
//! `snapshot_bytes_limit`, so that the window gives way before apply would wait for room), the
//! window gives back its oldest eighth of points per step. Snapshots are never given back.

use std::sync::RwLock;

use drv_proto::status::RecoveryPoint;

use crate::apply::ReplicaVolume;
use crate::cow::{CowError, CowStore, unix_now};

/// Expiry steps (each one commit of at most `EXPIRE_STEP` versions) per upkeep at most.
const STEPS_PER_TICK: usize = 16;

/// Opens, moves or closes `v`'s window as its configuration says.
pub fn upkeep(v: &ReplicaVolume, store: &RwLock<CowStore>) -> Result<(), CowError> {
    let wanted = v.limits().retention_secs.is_some() || v.limits().retention_bytes.is_some();
    let open = store.read().expect("store").window().is_some();
    match (wanted, open) {
        (false, false) => Ok(()),
        (false, true) => {
            let freed = store.write().expect("store").close_window()?;
            tracing::info!(volume = %v.name, freed, "no retention is configured: the retention window was closed");
            Ok(())
        }
        (true, false) => open_if_consistent(v, store),
        (true, true) => expire(v, store),
    }
}

/// Opens the window at the applied position, if the target shows a state the source had.
fn open_if_consistent(v: &ReplicaVolume, store: &RwLock<CowStore>) -> Result<(), CowError> {
    let _gate = v.apply_gate.lock().expect("apply gate");
    if v.media.lock().expect("media").phase.is_some() {
        return Ok(());
    }
    let applied = {
        let s = v.state.lock().expect("apply state");
        if s.applied.partial_resync || s.error.is_some() {
            return Ok(());
        }
        s.applied
    };
    let at = RecoveryPoint { seq: applied.seq, epoch: applied.epoch, applied_unix: unix_now(), ..Default::default() };
    store.write().expect("store").open_window(at)?;
    tracing::info!(volume = %v.name, seq = applied.seq, "retention window opened: every epoch applied from here on is a recovery point");
    Ok(())
}

/// Moves the window's start past the points that aged out or that the byte limit gives back.
fn expire(v: &ReplicaVolume, store: &RwLock<CowStore>) -> Result<(), CowError> {
    let (info, used) = {
        let s = store.read().expect("store");
        (s.window_bounds()?, s.usage()?.used_bytes)
    };
    let (Some(oldest), Some(newest)) = (info.oldest, info.newest) else { return Ok(()) };
    let now = unix_now();
    let gone = |p: &RecoveryPoint| match v.limits().retention_secs {
        Some(r) => {
            let by_agent = p.capture_unix == 0 || u64::from(p.capture_unix) + r <= u64::from(newest.capture_unix);
            by_agent && p.applied_unix + r <= now
        }
        None => false,
    };
    let byte_limit = match (v.limits().retention_bytes, v.limits().snapshot_bytes_limit.map(|l| l / 10 * 9)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let over = byte_limit.is_some_and(|l| used > l);
    let (kept, nth) = store.read().expect("store").first_kept(gone, if over { (info.points / 8).max(1) } else { 0 })?;
    let mut to = kept.map_or(newest.seq, |p| p.seq);
    if over {
        to = to.max(nth.map_or(newest.seq, |p| p.seq));
    }
    if to <= oldest.seq {
        return Ok(());
    }
    let mut freed = 0;
    for _ in 0..STEPS_PER_TICK {
        let (f, more) = store.write().expect("store").expire_to(to)?;
        freed += f;
        if !more {
            break;
        }
    }
    tracing::debug!(volume = %v.name, from = to, freed, over, "retention window moved");
    Ok(())
}
