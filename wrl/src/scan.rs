//! Reading a segment back batch by batch, checking every header, checksum, LSN and chain link.
//! Used by recovery (`Wrl::open`), by `drv wrl verify`, and by relay reads that miss the cache.

use std::sync::Arc;

use drv_format::align_up;
use drv_format::layout::{BATCH_HEADER_LEN, BatchHeader, DATA_START, SEGMENT_HEADER_BYTES};
use drv_format::record::{RECORD_HEADER_LEN, RecordHeader, chain_hash};

use crate::error::{Result, WrlError};
use crate::storage::{AlignedBuf, Storage};

/// Bytes read from a device per window refill.
const WINDOW_BYTES: usize = 4 << 20;

/// Where a segment lives.
#[derive(Clone, Debug)]
pub struct SegmentLoc {
    pub id: u64,
    pub device: usize,
    pub slot: u64,
    pub segment_bytes: u64,
    pub io_align: u32,
}

impl SegmentLoc {
    pub fn base(&self) -> u64 {
        DATA_START + self.slot * self.segment_bytes
    }
}

/// One decoded batch: its segment offset, header and the byte range of records in the window.
pub struct BatchView<'a> {
    pub offset: u64,
    pub header: BatchHeader,
    /// Record bytes (after the batch header, up to `batch_bytes`).
    pub records: &'a [u8],
}

/// Why reading stopped at `offset`.
#[derive(Debug)]
pub struct Stop {
    pub offset: u64,
    pub reason: String,
    /// The batch header at `offset` was valid (so the batch itself is damaged), as opposed to no
    /// batch starting there at all.
    pub header_valid: bool,
}

/// Reads a segment forwards from an offset.
pub struct SegmentCursor {
    dev: Arc<dyn Storage>,
    pub loc: SegmentLoc,
    pub pos: u64,
    window: AlignedBuf,
    win_start: u64,
}

thread_local! {
    /// One window buffer per thread, reused across cursors: a fresh 4 MiB buffer per read-back
    /// costs a zero fill and page faults.
    static SPARE_WINDOW: std::cell::RefCell<Option<AlignedBuf>> = const { std::cell::RefCell::new(None) };
}

impl Drop for SegmentCursor {
    fn drop(&mut self) {
        let w = std::mem::replace(&mut self.window, AlignedBuf::with_capacity(0));
        SPARE_WINDOW.with(|s| {
            let mut s = s.borrow_mut();
            if s.as_ref().is_none_or(|old| old.capacity() < w.capacity()) {
                *s = Some(w);
            }
        });
    }
}

impl SegmentCursor {
    pub fn new(dev: Arc<dyn Storage>, loc: SegmentLoc, pos: u64) -> Self {
        debug_assert!(pos >= SEGMENT_HEADER_BYTES);
        let window =
            SPARE_WINDOW.with(|s| s.borrow_mut().take()).unwrap_or_else(|| AlignedBuf::with_capacity(WINDOW_BYTES));
        // `win_start` past the segment end: nothing in the (reused) window is valid yet.
        SegmentCursor { dev, win_start: u64::MAX / 2, loc, pos, window }
    }

    /// Makes `[pos, pos+len)` (segment offsets) available in the window. Returns false past the end.
    fn ensure(&mut self, pos: u64, len: usize) -> Result<bool> {
        if pos + len as u64 > self.loc.segment_bytes {
            return Ok(false);
        }
        let have = pos >= self.win_start && pos + len as u64 <= self.win_start + self.window.len() as u64;
        if !have {
            // Whole aligned blocks from an aligned offset, so the device can read them with O_DIRECT
            // (no page-cache copy); batches start aligned, segments end aligned.
            let align = self.loc.io_align as u64;
            let start = pos - pos % align;
            let want = (pos - start + len as u64).max(WINDOW_BYTES as u64).next_multiple_of(align);
            let n = want.min(self.loc.segment_bytes - start) as usize;
            let pos = start;
            self.window.clear();
            self.window.resize(n);
            self.dev.read_at(self.loc.base() + pos, &mut self.window).map_err(|e| {
                WrlError::io(format!("read segment {} on {} at offset {pos}", self.loc.id, self.dev.name()), e)
            })?;
            self.win_start = pos;
        }
        Ok(true)
    }

    fn slice(&self, pos: u64, len: usize) -> &[u8] {
        let s = (pos - self.win_start) as usize;
        &self.window[s..s + len]
    }

    /// Reads the batch at the cursor and moves past it. `Ok(Err(stop))` when no valid batch of
    /// this segment with `first_lsn == expected_lsn` starts there.
    pub fn next_batch(&mut self, expected_lsn: u64) -> Result<std::result::Result<BatchView<'_>, Stop>> {
        let pos = self.pos;
        let stop = |reason: String, header_valid| Ok(Err(Stop { offset: pos, reason, header_valid }));
        if !self.ensure(pos, BATCH_HEADER_LEN)? {
            return stop("end of segment".into(), false);
        }
        let header = match BatchHeader::decode(self.slice(pos, BATCH_HEADER_LEN)) {
            Ok(h) => h,
            Err(e) => return stop(e.to_string(), false),
        };
        if header.segment_id != self.loc.id {
            return stop(format!("batch belongs to segment {}, not {}", header.segment_id, self.loc.id), false);
        }
        if header.first_lsn != expected_lsn {
            return stop(format!("batch starts at lsn {}, expected {expected_lsn}", header.first_lsn), false);
        }
        let len = header.batch_bytes as usize;
        if !self.ensure(pos, len)? {
            return stop(format!("batch of {len} bytes runs past the end of the segment"), true);
        }
        self.pos = align_up(pos + len as u64, self.loc.io_align as u64);
        let s = (pos - self.win_start) as usize;
        Ok(Ok(BatchView { offset: pos, header, records: &self.window[s + BATCH_HEADER_LEN..s + len] }))
    }

    /// Looks for any valid batch of this segment with `first_lsn >= min_lsn` at an aligned offset
    /// after `after`: evidence that damage at `after` is not a torn tail.
    pub fn find_later_batch(&mut self, after: u64, min_lsn: u64) -> Result<Option<(u64, u64)>> {
        let align = self.loc.io_align as u64;
        let mut pos = after + align;
        while self.ensure(pos, BATCH_HEADER_LEN)? {
            if let Ok(h) = BatchHeader::decode(self.slice(pos, BATCH_HEADER_LEN))
                && h.segment_id == self.loc.id
                && h.first_lsn >= min_lsn
            {
                return Ok(Some((pos, h.first_lsn)));
            }
            pos += align;
        }
        Ok(None)
    }
}

/// Parses the records of one batch, checking each header, payload checksum, LSN and chain link
/// against `expected_lsn` and `prev_hash` (both advanced as records pass). Calls `each` with every
/// good record and its offset inside the batch's record bytes.
pub fn parse_batch(
    batch: &BatchView<'_>,
    expected_lsn: &mut u64,
    prev_hash: &mut u64,
    each: &mut dyn FnMut(&RecordHeader, &[u8]),
) -> std::result::Result<(), (u64, String)> {
    let bytes = batch.records;
    let mut at = 0usize;
    let record_offset = |at: usize| batch.offset + BATCH_HEADER_LEN as u64 + at as u64;
    for _ in 0..batch.header.record_count {
        let fail = |at: usize, why: String| Err((record_offset(at), why));
        let header = match RecordHeader::decode(&bytes[at.min(bytes.len())..]) {
            Ok(h) => h,
            Err(e) => return fail(at, e.to_string()),
        };
        if header.lsn != *expected_lsn {
            return fail(at, format!("record has lsn {}, expected {}", header.lsn, *expected_lsn));
        }
        if header.prev_hash != *prev_hash {
            return fail(at, format!("hash chain broken at lsn {}", header.lsn));
        }
        let end = at + header.record_len();
        if end > bytes.len() {
            return fail(at, format!("record of {} bytes runs past its batch", header.record_len()));
        }
        let payload = &bytes[at + RECORD_HEADER_LEN..end];
        if let Err(e) = header.check_payload(payload) {
            return fail(at, format!("lsn {}: {e}", header.lsn));
        }
        let hb: &[u8; RECORD_HEADER_LEN] = bytes[at..at + RECORD_HEADER_LEN].try_into().expect("96");
        *prev_hash = chain_hash(hb);
        *expected_lsn += 1;
        each(&header, payload);
        at = end;
    }
    if at != bytes.len() {
        return Err((record_offset(at), format!("batch has {} bytes after its last record", bytes.len() - at)));
    }
    Ok(())
}
