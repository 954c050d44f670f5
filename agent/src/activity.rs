//! The activity log on disk: the extents that may hold writes staging has and the local disk lacks
//! (the rules are `drv_proto::Activity`; the marks are a `ChangeMap` with one bit per extent,
//! marked durably before a write goes to staging and cleared lazily after a FLUSH makes the
//! extent stable).

use std::sync::Mutex;

use drv_changemap::{ChangeMap, ChangeMapError};
use drv_proto::Activity;

pub(crate) struct ActivityLog {
    pub map: ChangeMap,
    rules: Mutex<Activity>,
}

impl ActivityLog {
    pub fn new(map: ChangeMap) -> ActivityLog {
        let rules = Mutex::new(Activity::new(map.block_bytes));
        ActivityLog { map, rules }
    }

    /// A write begins: its extents are marked durably before it goes to staging.
    pub fn enter(&self, offset: u64, len: u64) -> Result<(), ChangeMapError> {
        self.rules.lock().expect("activity").enter(offset, len);
        self.map.mark(offset, len)
    }

    pub fn leave(&self, offset: u64, len: u64) {
        self.rules.lock().expect("activity").leave(offset, len);
    }

    pub fn flush_begin(&self) -> u64 {
        self.rules.lock().expect("activity").flush_begin()
    }

    /// The flush of generation `g` completed: clears the extents it made stable.
    pub fn flush_done(&self, g: u64) -> Result<(), ChangeMapError> {
        let done = self.rules.lock().expect("activity").flush_done(g);
        self.map.clear_lazily(&done)
    }
}
