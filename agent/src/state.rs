//! The agent's state directory: its lock (one agent per directory: two would each clear the
//! other's marks), the change map and the activity log, and the crash-recovery rule: extents the
//! activity log holds marked are "in doubt" (staging may hold writes of them that the local disk
//! lacks) and are marked in the change map, to be resynced from the local disk before anything
//! else.

use std::path::Path;
use std::sync::Arc;

use drv_changemap::ChangeMap;

use crate::activity::ActivityLog;
use crate::agent::{AgentError, AgentOptions};

/// A state directory, open and locked.
pub(crate) struct StateDir {
    pub map: Arc<ChangeMap>,
    pub activity: Arc<ActivityLog>,
    pub lock: drv_files::DirLock,
}

/// Opens (creating it if needed) the state directory `dir` of `volume_id`.
pub(crate) fn open(dir: &Path, volume_id: u64, volume_bytes: u64, opts: &AgentOptions) -> Result<StateDir, AgentError> {
    std::fs::create_dir_all(dir).map_err(|err| AgentError::Local { offset: 0, err })?;
    let lock = drv_files::lock_dir(dir, "agent state directory")?;
    let map = ChangeMap::open(&dir.join("changemap"), volume_id, volume_bytes, opts.change_block_bytes)?;
    let al = ChangeMap::open(&dir.join("activity"), volume_id, volume_bytes, opts.activity_extent_bytes)?;
    let doubt = al.dirty_blocks();
    if !doubt.is_empty() {
        tracing::warn!(
            volume_id,
            extents = doubt.len(),
            "writes in doubt from an earlier run: resyncing their extents"
        );
        for (offset, len) in drv_changemap::extents(doubt, al.block_bytes, volume_bytes) {
            map.mark(offset, len)?;
        }
        al.clear_all()?;
    }
    Ok(StateDir { map: Arc::new(map), activity: Arc::new(ActivityLog::new(al)), lock })
}
