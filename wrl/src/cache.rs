//! The bounded in-memory cache of durable records not yet confirmed downstream, so the relay rarely
//! reads the log back. It holds a contiguous lsn range; when over its byte limit it forgets the
//! oldest records (the relay then reads those from the devices).

use std::collections::VecDeque;

use crate::core::LogRecord;

pub(crate) struct Cache {
    records: VecDeque<LogRecord>,
    bytes: u64,
    limit: u64,
}

impl Cache {
    pub(crate) fn new(limit: u64) -> Self {
        Cache { records: VecDeque::new(), bytes: 0, limit }
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Adds the next durable record (lsns arrive in order, without gaps).
    pub(crate) fn push(&mut self, r: LogRecord) {
        if let Some(last) = self.records.back() {
            assert_eq!(r.header.lsn, last.header.lsn + 1, "cache holds a contiguous lsn range");
        }
        self.bytes += r.payload.len() as u64;
        self.records.push_back(r);
        while self.bytes > self.limit {
            let old = self.records.pop_front().expect("non-empty while over limit");
            self.bytes -= old.payload.len() as u64;
        }
        debug_assert!(self.bytes <= self.limit);
    }

    /// Forgets every record up to `lsn` (confirmed downstream).
    pub(crate) fn drop_through(&mut self, lsn: u64) {
        while self.records.front().is_some_and(|r| r.header.lsn <= lsn) {
            let old = self.records.pop_front().expect("front exists");
            self.bytes -= old.payload.len() as u64;
        }
    }

    /// Records from `from_lsn` on (about `max_bytes`), if the cache holds `from_lsn`.
    pub(crate) fn read(&self, from_lsn: u64, max_bytes: u64) -> Option<Vec<LogRecord>> {
        let first = self.records.front()?.header.lsn;
        let last = self.records.back()?.header.lsn;
        if from_lsn < first || from_lsn > last {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for r in self.records.range((from_lsn - first) as usize..) {
            if !out.is_empty() && bytes >= max_bytes {
                break;
            }
            bytes += r.header.desc.length as u64;
            out.push(r.clone());
        }
        Some(out)
    }
}
