//! The single-threaded core of a WRL: create, recover, append one batch, read, trim.
//!
//! The core does all of its I/O through [`Storage`], so the same code runs on files, block devices
//! and the simulated storage of the crash-state tests. It is owned by one thread (the committer of
//! `group.rs`); readers share only the segment table behind an `RwLock`.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use drv_format::crypto::nonce_parts;
use drv_format::layout::{
    BATCH_HEADER_LEN, BLOCK_BYTES, BatchHeader, DATA_START, DeviceHeader, META_OFFSETS, MetaBlock,
    SEGMENT_HEADER_BYTES, SMALL_HEADER_LEN, SegmentHeader, validate_geometry,
};
use drv_format::record::{
    MAX_WRITE_BYTES, RECORD_HEADER_LEN, RecordHeader, TAG_LEN, WriteDesc, chain_hash, chain_seed,
};
use drv_format::{align_up, crc32c};

use crate::error::{Result, WrlError};
use crate::scan::{BatchView, SegmentCursor, SegmentLoc, parse_batch};
use crate::storage::{AlignedBuf, Storage};

/// How far ahead of need the durable nonce high-water mark is moved (one meta write per 2^20 records).
pub const NONCE_RESERVE: u64 = 1 << 20;
/// A sparse index entry is added to a segment every this many bytes.
const INDEX_EVERY_BYTES: u64 = 1 << 20;

/// Options of `drv wrl create`.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub uuid: [u8; 16],
    /// Nonce domain, unique in the installation.
    pub wrl_id: u32,
    pub segment_bytes: u64,
    pub io_align: u32,
    /// Limit on the bytes of all segments together (the rest of the devices stays unused).
    pub capacity_bytes: Option<u64>,
}

/// A record handed to the core: descriptor (with key and nonce set) and stored payload.
pub struct PendingRecord {
    pub desc: WriteDesc,
    /// Ciphertext and tag, `desc.length + 16` bytes.
    pub payload: Bytes,
    /// CRC-32C of `payload`, computed by whoever produced it (the appender's thread, or the sender
    /// of a relayed record whose frame was checked), so the committer does not pass over the bytes
    /// again.
    pub payload_crc: u32,
}

impl PendingRecord {
    pub fn new(desc: WriteDesc, payload: Bytes) -> Self {
        let payload_crc = crc32c(&payload);
        PendingRecord { desc, payload, payload_crc }
    }

    pub fn log_bytes(&self) -> u64 {
        (RECORD_HEADER_LEN + self.payload.len()) as u64
    }
}

/// One live segment, as the table shows it to readers.
#[derive(Clone, Debug)]
pub struct SegmentInfo {
    pub loc: SegmentLoc,
    pub first_lsn: u64,
    pub prev_hash: u64,
    /// One past the last durable record.
    pub next_lsn: u64,
    /// Segment offset where the next batch goes.
    pub end: u64,
    /// Sparse index: (first lsn of a batch, its segment offset), ascending.
    pub index: Vec<(u64, u64)>,
}

impl SegmentInfo {
    fn note_batch(&mut self, first_lsn: u64, offset: u64, next_lsn: u64, end: u64) {
        let last = self.index.last().map(|e| e.1);
        if last.is_none_or(|o| offset >= o + INDEX_EVERY_BYTES) {
            self.index.push((first_lsn, offset));
        }
        self.next_lsn = next_lsn;
        self.end = end;
    }

    /// The offset of the indexed batch at or before `lsn`, and that batch's first lsn.
    pub fn seek(&self, lsn: u64) -> (u64, u64) {
        match self.index.partition_point(|e| e.0 <= lsn) {
            0 => (self.first_lsn, SEGMENT_HEADER_BYTES),
            i => self.index[i - 1],
        }
    }
}

/// What readers may see: live segments and positions.
#[derive(Clone, Debug, Default)]
pub struct Table {
    pub segments: Vec<SegmentInfo>,
    /// Every record up to here is durable.
    pub durable_lsn: u64,
    /// Records up to here are confirmed downstream (trimmed logically).
    pub trim_lsn: u64,
}

impl Table {
    pub fn find(&self, lsn: u64) -> Option<&SegmentInfo> {
        let i = self.segments.partition_point(|s| s.first_lsn <= lsn);
        self.segments[..i].last().filter(|s| lsn < s.next_lsn)
    }
}

/// Per-volume facts rebuilt by recovery and kept up to date by appends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VolumeLog {
    pub records: u64,
    pub payload_bytes: u64,
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub last_seq: u64,
    pub last_epoch: u64,
}

impl VolumeLog {
    pub(crate) fn note(&mut self, h: &RecordHeader) {
        if self.records == 0 {
            self.first_lsn = h.lsn;
        }
        self.records += 1;
        self.payload_bytes += h.desc.length as u64;
        self.last_lsn = h.lsn;
        self.last_seq = h.desc.volume_seq;
        self.last_epoch = h.desc.epoch;
    }
}

/// How the log ended when it was opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Tail {
    /// The next batch position held no batch of this log.
    #[default]
    Clean,
    /// A batch was started but not completed (never acknowledged); it is discarded.
    Torn { segment_id: u64, offset: u64, reason: String },
}

/// What recovery found.
#[derive(Clone, Debug)]
pub struct Recovery {
    pub uuid: [u8; 16],
    pub wrl_id: u32,
    pub device_count: usize,
    pub segment_bytes: u64,
    pub io_align: u32,
    pub slots_per_device: Vec<u64>,
    pub meta: MetaBlock,
    pub segments: Vec<SegmentInfo>,
    /// Lowest lsn still served (`trim_lsn + 1`, or the oldest segment's first lsn).
    pub first_lsn: u64,
    /// Last durable lsn (0 for an empty log).
    pub last_lsn: u64,
    pub last_hash: u64,
    pub records: u64,
    pub tail: Tail,
    pub volumes: BTreeMap<u64, VolumeLog>,
}

pub struct LogCore {
    devices: Vec<Arc<dyn Storage>>,
    uuid: [u8; 16],
    wrl_id: u32,
    segment_bytes: u64,
    io_align: u32,
    slots_per_device: Vec<u64>,
    meta: MetaBlock,
    table: Arc<RwLock<Table>>,
    used_slots: HashSet<(usize, u64)>,
    next_lsn: u64,
    last_hash: u64,
    buf: AlignedBuf,
    /// The lowest lsn a reader still needs; new segments avoid its device (head-seek argument).
    reader_hint_lsn: u64,
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> WrlError {
    move |e| WrlError::io(what, e)
}

fn read_block(dev: &dyn Storage, offset: u64) -> Result<Vec<u8>> {
    let mut b = vec![0u8; BLOCK_BYTES as usize];
    dev.read_at(offset, &mut b).map_err(io_err(format!("read {} at offset {offset}", dev.name())))?;
    Ok(b)
}

fn write_block(dev: &dyn Storage, offset: u64, bytes: &[u8; SMALL_HEADER_LEN]) -> Result<()> {
    let mut b = AlignedBuf::with_capacity(BLOCK_BYTES as usize);
    b.extend_from_slice(bytes);
    b.resize(BLOCK_BYTES as usize);
    dev.write_at(offset, &b).map_err(io_err(format!("write {} at offset {offset}", dev.name())))
}

fn sync(dev: &dyn Storage) -> Result<()> {
    dev.sync().map_err(io_err(format!("fdatasync {}", dev.name())))
}

fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Slots per device for the given sizes and capacity limit.
fn plan_slots(lens: &[u64], segment_bytes: u64, capacity: Option<u64>) -> Vec<u64> {
    let mut avail: Vec<u64> = lens.iter().map(|l| l.saturating_sub(DATA_START) / segment_bytes).collect();
    if let Some(cap) = capacity {
        let mut left = cap / segment_bytes;
        let mut planned = vec![0u64; avail.len()];
        // Spread the capacity over the devices so each one can take appends or reads.
        while left > 0 && avail.iter().any(|a| *a > 0) {
            for (d, a) in avail.iter_mut().enumerate() {
                if left > 0 && *a > 0 {
                    *a -= 1;
                    planned[d] += 1;
                    left -= 1;
                }
            }
        }
        avail = planned;
    }
    avail
}

/// Writes a new, empty WRL over `devices` (device headers, meta, segment 1).
pub fn create(devices: &[Arc<dyn Storage>], opts: &CreateOptions) -> Result<()> {
    validate_geometry("create", opts.segment_bytes, opts.io_align).map_err(|e| WrlError::Geometry(e.to_string()))?;
    if devices.is_empty() {
        return Err(WrlError::Geometry("a WRL needs at least one device".into()));
    }
    let lens: Vec<u64> = devices.iter().map(|d| d.len()).collect();
    let slots = plan_slots(&lens, opts.segment_bytes, opts.capacity_bytes);
    let total: u64 = slots.iter().sum();
    if total < 2 {
        return Err(WrlError::Geometry(format!(
            "{} segment slots of {} bytes fit (devices of {:?} bytes, capacity {:?}); a WRL needs at least 2",
            total, opts.segment_bytes, lens, opts.capacity_bytes
        )));
    }
    if slots[0] == 0 {
        return Err(WrlError::Geometry("device 0 must hold at least one segment".into()));
    }
    for (i, dev) in devices.iter().enumerate() {
        let h = DeviceHeader {
            wrl_uuid: opts.uuid,
            wrl_id: opts.wrl_id,
            device_index: i as u32,
            device_count: devices.len() as u32,
            segment_bytes: opts.segment_bytes,
            slot_count: slots[i],
            io_align: opts.io_align,
        };
        write_block(dev.as_ref(), 0, &h.encode())?;
    }
    let meta = MetaBlock { wrl_uuid: opts.uuid, generation: 1, nonce_hwm: 0, trim_lsn: 0, oldest_segment_id: 1 };
    // Clear the other copy so a meta block of an earlier WRL on this device can never be chosen.
    write_block(devices[0].as_ref(), META_OFFSETS[0], &[0u8; SMALL_HEADER_LEN])?;
    write_block(devices[0].as_ref(), meta.offset(), &meta.encode())?;
    let seg = SegmentHeader {
        wrl_uuid: opts.uuid,
        wrl_id: opts.wrl_id,
        device_index: 0,
        segment_id: 1,
        first_lsn: 1,
        prev_hash: chain_seed(&opts.uuid),
        slot: 0,
        segment_bytes: opts.segment_bytes,
        io_align: opts.io_align,
        created_unix_ns: now_ns(),
    };
    write_block(devices[0].as_ref(), DATA_START, &seg.encode())?;
    // A stale batch header right after the new segment header could only belong to another
    // segment id, but zero the first batch block anyway to keep `inspect` output clean.
    let mut z = AlignedBuf::with_capacity(opts.io_align as usize);
    z.resize(opts.io_align as usize);
    devices[0]
        .write_at(DATA_START + SEGMENT_HEADER_BYTES, &z)
        .map_err(io_err(format!("write {}", devices[0].name())))?;
    for dev in devices {
        sync(dev.as_ref())?;
    }
    Ok(())
}

/// Reads and checks the device headers; returns device 0's header and the slots per device.
fn read_devices(devices: &[Arc<dyn Storage>]) -> Result<(DeviceHeader, Vec<u64>)> {
    let mut first: Option<DeviceHeader> = None;
    let mut slots = Vec::new();
    for (i, dev) in devices.iter().enumerate() {
        let block = read_block(dev.as_ref(), 0)?;
        let h = DeviceHeader::decode(&block).map_err(|reason| WrlError::NotAWrl { device: dev.name(), reason })?;
        let mismatch = |reason: String| WrlError::DeviceMismatch { device: dev.name(), reason };
        if h.device_index as usize != i {
            return Err(mismatch(format!("is device {} of its WRL but was given as device {i}", h.device_index)));
        }
        if h.device_count as usize != devices.len() {
            return Err(mismatch(format!(
                "belongs to a WRL of {} devices but {} were given",
                h.device_count,
                devices.len()
            )));
        }
        if let Some(f) = &first {
            if f.wrl_uuid != h.wrl_uuid || f.wrl_id != h.wrl_id {
                return Err(mismatch("belongs to another WRL than device 0".into()));
            }
            if f.segment_bytes != h.segment_bytes || f.io_align != h.io_align {
                return Err(mismatch("has another segment size or alignment than device 0".into()));
            }
        } else {
            first = Some(h);
        }
        if DATA_START + h.slot_count * h.segment_bytes > dev.len() {
            return Err(mismatch(format!(
                "is {} bytes, smaller than its {} segment slots of {} bytes",
                dev.len(),
                h.slot_count,
                h.segment_bytes
            )));
        }
        slots.push(h.slot_count);
    }
    Ok((first.expect("at least one device"), slots))
}

fn read_meta(dev: &dyn Storage, uuid: &[u8; 16]) -> Result<MetaBlock> {
    let decode = |off| -> Result<std::result::Result<MetaBlock, drv_format::FormatError>> {
        Ok(MetaBlock::decode(&read_block(dev, off)?))
    };
    let (a, b) = (decode(META_OFFSETS[0])?, decode(META_OFFSETS[1])?);
    let pick = match (a, b) {
        (Ok(a), Ok(b)) => {
            if a.generation > b.generation {
                a
            } else {
                b
            }
        }
        (Ok(a), Err(_)) => a,
        (Err(_), Ok(b)) => b,
        (Err(a), Err(b)) => return Err(WrlError::NoMeta { device: dev.name(), a, b }),
    };
    if &pick.wrl_uuid != uuid {
        return Err(WrlError::DeviceMismatch { device: dev.name(), reason: "meta block of another WRL".into() });
    }
    Ok(pick)
}

/// The live segments: valid headers of this WRL, not older than the trim point, with
/// consecutive ids from `meta.oldest_segment_id` (a gap or a duplicate is corruption).
fn live_segments(
    devices: &[Arc<dyn Storage>],
    dev0: &DeviceHeader,
    meta: &MetaBlock,
    slots: &[u64],
) -> Result<BTreeMap<u64, (SegmentLoc, SegmentHeader)>> {
    let mut found: BTreeMap<u64, (SegmentLoc, SegmentHeader)> = BTreeMap::new();
    for (d, dev) in devices.iter().enumerate() {
        for slot in 0..slots[d] {
            let loc = SegmentLoc { id: 0, device: d, slot, segment_bytes: dev0.segment_bytes, io_align: dev0.io_align };
            let Ok(h) = SegmentHeader::decode(&read_block(dev.as_ref(), loc.base())?) else { continue };
            if h.wrl_uuid != dev0.wrl_uuid || h.segment_id < meta.oldest_segment_id {
                continue;
            }
            let bad_header = |reason: String| WrlError::Corrupt {
                segment_id: h.segment_id,
                device: dev.name(),
                slot,
                offset: 0,
                expected_lsn: h.first_lsn,
                reason,
            };
            if h.slot != slot || h.device_index as usize != d {
                return Err(bad_header(format!("segment header names device {} slot {}", h.device_index, h.slot)));
            }
            if let Some((other, _)) = found.get(&h.segment_id) {
                return Err(bad_header(format!(
                    "segment id also found on device {} slot {}",
                    other.device, other.slot
                )));
            }
            found.insert(h.segment_id, (SegmentLoc { id: h.segment_id, ..loc }, h));
        }
    }
    let missing = |segment_id: u64, expected_lsn: u64, reason: String| WrlError::Corrupt {
        segment_id,
        device: devices[0].name(),
        slot: 0,
        offset: 0,
        expected_lsn,
        reason,
    };
    for (expected_id, id) in (meta.oldest_segment_id..).zip(found.keys()) {
        if *id != expected_id {
            return Err(missing(expected_id, 0, format!("segment {expected_id} is missing (next found: {id})")));
        }
    }
    if found.is_empty() {
        return Err(missing(meta.oldest_segment_id, meta.trim_lsn + 1, "no live segment found".into()));
    }
    Ok(found)
}

/// Refuses a log whose next segment (`next_id`, expected to start at `next_lsn`) lost its header
/// while its records are there: a free slot whose first batch belongs to it. The header is
/// durable before any batch is written to its slot, so only damage (a misdirected or lost write
/// of the disk) leaves such a slot; without this check the scan would end before it and drop
/// records that were acknowledged. A stale batch of a freed slot has an older segment id.
fn orphan_head(
    devices: &[Arc<dyn Storage>],
    dev0: &DeviceHeader,
    slots: &[u64],
    found: &BTreeMap<u64, (SegmentLoc, SegmentHeader)>,
    next_id: u64,
    next_lsn: u64,
) -> Result<()> {
    let used: std::collections::BTreeSet<(usize, u64)> = found.values().map(|(l, _)| (l.device, l.slot)).collect();
    for (d, dev) in devices.iter().enumerate() {
        for slot in (0..slots[d]).filter(|s| !used.contains(&(d, *s))) {
            let loc =
                SegmentLoc { id: next_id, device: d, slot, segment_bytes: dev0.segment_bytes, io_align: dev0.io_align };
            let Ok(b) = BatchHeader::decode(&read_block(dev.as_ref(), loc.base() + SEGMENT_HEADER_BYTES)?) else {
                continue;
            };
            if b.segment_id == next_id && b.first_lsn == next_lsn {
                return Err(WrlError::Corrupt {
                    segment_id: next_id,
                    device: dev.name(),
                    slot,
                    offset: 0,
                    expected_lsn: next_lsn,
                    reason: format!(
                        "the segment's header is damaged or missing, but the slot holds its first batch (lsn {next_lsn} on): the records from there on would be lost"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The state of a scan across segments: the chain so far and what it found.
#[derive(Default)]
struct Scan {
    expected_lsn: u64,
    prev_hash: u64,
    records: u64,
    volumes: BTreeMap<u64, VolumeLog>,
    tail: Tail,
}

/// Where a segment's scan stopped: the batch that failed (or the position where none starts),
/// where in it, why, and whether its batch header was valid.
struct BatchStop {
    offset: u64,
    at: u64,
    reason: String,
    header_valid: bool,
}

impl Scan {
    /// Checks a batch's records against scratch copies of the chain state first, so that a batch
    /// that fails halfway is not counted and leaves the state at its start.
    fn take_batch(
        &mut self,
        batch: &BatchView<'_>,
        each: &mut dyn FnMut(&RecordHeader, &[u8]),
    ) -> std::result::Result<(), (u64, String)> {
        let (mut l, mut p) = (self.expected_lsn, self.prev_hash);
        let mut seen: Vec<RecordHeader> = Vec::new();
        parse_batch(batch, &mut l, &mut p, &mut |rh, _| seen.push(*rh))?;
        let mut at = 0usize;
        for rh in &seen {
            let payload = &batch.records[at + RECORD_HEADER_LEN..at + rh.record_len()];
            at += rh.record_len();
            self.volumes.entry(rh.desc.volume_id).or_default().note(rh);
            each(rh, payload);
        }
        self.records += seen.len() as u64;
        (self.expected_lsn, self.prev_hash) = (l, p);
        Ok(())
    }

    /// Scans segment `loc` batch by batch until a batch fails (or none starts).
    fn batches(
        &mut self,
        cur: &mut SegmentCursor,
        info: &mut SegmentInfo,
        each: &mut dyn FnMut(&RecordHeader, &[u8]),
    ) -> Result<BatchStop> {
        loop {
            let batch_lsn = self.expected_lsn;
            let batch = match cur.next_batch(batch_lsn)? {
                Ok(b) => b,
                Err(stop) => {
                    let (offset, at) = (stop.offset, stop.offset);
                    return Ok(BatchStop { offset, at, reason: stop.reason, header_valid: stop.header_valid });
                }
            };
            let offset = batch.offset;
            if let Err((at, reason)) = self.take_batch(&batch, each) {
                return Ok(BatchStop { offset, at, reason, header_valid: true });
            }
            info.note_batch(batch_lsn, offset, self.expected_lsn, cur.pos);
        }
    }

    /// Scans one live segment (`next_first_lsn`: the first lsn of the segment after it, if it is
    /// not the head).
    fn segment(
        &mut self,
        devices: &[Arc<dyn Storage>],
        loc: &SegmentLoc,
        h: &SegmentHeader,
        next_first_lsn: Option<u64>,
        each: &mut dyn FnMut(&RecordHeader, &[u8]),
    ) -> Result<SegmentInfo> {
        let corrupt = |offset: u64, expected_lsn: u64, reason: String| WrlError::Corrupt {
            segment_id: loc.id,
            device: devices[loc.device].name(),
            slot: loc.slot,
            offset,
            expected_lsn,
            reason,
        };
        if h.first_lsn != self.expected_lsn || h.prev_hash != self.prev_hash {
            let reason = format!("segment header starts at lsn {} / does not continue the chain", h.first_lsn);
            return Err(corrupt(0, self.expected_lsn, reason));
        }
        let mut info = SegmentInfo {
            loc: loc.clone(),
            first_lsn: h.first_lsn,
            prev_hash: h.prev_hash,
            next_lsn: h.first_lsn,
            end: SEGMENT_HEADER_BYTES,
            index: Vec::new(),
        };
        let mut cur = SegmentCursor::new(devices[loc.device].clone(), loc.clone(), SEGMENT_HEADER_BYTES);
        let BatchStop { offset, at, reason, header_valid } = self.batches(&mut cur, &mut info, each)?;
        // Either the normal end of the log, a torn tail, or corruption.
        if let Some(next) = next_first_lsn {
            // A non-head segment ends exactly where the next segment's first lsn says (the next
            // header's chain hash is checked against this point too). What follows in it is no
            // part of the log: nothing, or a batch torn by a crash (or whose sync failed) when this
            // was the head, and written again in the next segment after recovery.
            if next == self.expected_lsn {
                return Ok(info);
            }
            return Err(corrupt(at, self.expected_lsn, reason));
        }
        if let Some((later, lsn)) = cur.find_later_batch(offset, self.expected_lsn)? {
            let reason = format!("{reason}; a valid batch (lsn {lsn}) follows at offset {later}");
            return Err(corrupt(at, self.expected_lsn, reason));
        }
        if header_valid {
            self.tail = Tail::Torn { segment_id: loc.id, offset, reason };
        }
        Ok(info)
    }
}

/// Scans the whole log: the recovery of `open` and the check of `drv wrl verify`. Never writes.
/// `each` sees every good record with its payload, in lsn order.
pub fn recover(devices: &[Arc<dyn Storage>], each: &mut dyn FnMut(&RecordHeader, &[u8])) -> Result<Recovery> {
    let (dev0, slots) = read_devices(devices)?;
    let meta = read_meta(devices[0].as_ref(), &dev0.wrl_uuid)?;
    let found = live_segments(devices, &dev0, &meta, &slots)?;
    let (_, first) = found.values().next().expect("non-empty");
    let mut scan = Scan { expected_lsn: first.first_lsn, prev_hash: first.prev_hash, ..Scan::default() };
    let mut segments = Vec::new();
    for (id, (loc, h)) in &found {
        let next_first_lsn = found.get(&(id + 1)).map(|(_, n)| n.first_lsn);
        segments.push(scan.segment(devices, loc, h, next_first_lsn, each)?);
    }
    let (last_id, _) = found.iter().next_back().expect("non-empty");
    orphan_head(devices, &dev0, &slots, &found, last_id + 1, scan.expected_lsn)?;
    let first_lsn = (meta.trim_lsn + 1).max(segments[0].first_lsn);
    Ok(Recovery {
        uuid: dev0.wrl_uuid,
        wrl_id: dev0.wrl_id,
        device_count: devices.len(),
        segment_bytes: dev0.segment_bytes,
        io_align: dev0.io_align,
        slots_per_device: slots,
        meta,
        segments,
        first_lsn,
        last_lsn: scan.expected_lsn - 1,
        last_hash: scan.prev_hash,
        records: scan.records,
        tail: scan.tail,
        volumes: scan.volumes,
    })
}

impl LogCore {
    /// Opens a WRL, running recovery. A torn tail is dropped; corruption is an error.
    pub fn open(devices: Vec<Arc<dyn Storage>>) -> Result<(LogCore, Recovery)> {
        let rec = recover(&devices, &mut |_, _| {})?;
        let slots = rec.slots_per_device.clone();
        let used_slots = rec.segments.iter().map(|s| (s.loc.device, s.loc.slot)).collect();
        let table = Table { segments: rec.segments.clone(), durable_lsn: rec.last_lsn, trim_lsn: rec.meta.trim_lsn };
        let core = LogCore {
            devices,
            uuid: rec.uuid,
            wrl_id: rec.wrl_id,
            segment_bytes: rec.segment_bytes,
            io_align: rec.io_align,
            slots_per_device: slots,
            meta: rec.meta,
            table: Arc::new(RwLock::new(table)),
            used_slots,
            next_lsn: rec.last_lsn + 1,
            last_hash: rec.last_hash,
            buf: AlignedBuf::with_capacity(1 << 20),
            reader_hint_lsn: rec.meta.trim_lsn + 1,
        };
        Ok((core, rec))
    }

    pub fn table(&self) -> Arc<RwLock<Table>> {
        self.table.clone()
    }
    pub fn devices(&self) -> &[Arc<dyn Storage>] {
        &self.devices
    }
    pub fn wrl_id(&self) -> u32 {
        self.wrl_id
    }
    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }
    pub fn nonce_hwm(&self) -> u64 {
        self.meta.nonce_hwm
    }
    pub fn last_lsn(&self) -> u64 {
        self.next_lsn - 1
    }
    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }
    pub fn total_slots(&self) -> u64 {
        self.slots_per_device.iter().sum()
    }
    pub fn used_segments(&self) -> u64 {
        self.used_slots.len() as u64
    }

    /// Bytes available to batches in one segment.
    fn usable(&self) -> u64 {
        self.segment_bytes - SEGMENT_HEADER_BYTES
    }

    /// The largest plaintext one record of this WRL may hold: a batch of one record must fit a segment.
    pub fn record_bytes_limit(&self) -> u64 {
        let room = self.usable() - BATCH_HEADER_LEN as u64 - RECORD_HEADER_LEN as u64 - TAG_LEN as u64;
        room.min(MAX_WRITE_BYTES as u64)
    }

    /// Bytes a batch of records with `record_bytes` (headers + payloads) takes on disk.
    pub fn batch_disk_bytes(&self, record_bytes: u64) -> u64 {
        align_up(BATCH_HEADER_LEN as u64 + record_bytes, self.io_align as u64)
    }

    /// Whether a batch of `disk_bytes` can be written now (head segment, or a free slot).
    pub fn can_fit(&self, disk_bytes: u64) -> bool {
        let head_end = self.table.read().expect("table lock").segments.last().map(|s| s.end).unwrap_or(u64::MAX);
        head_end + disk_bytes <= self.segment_bytes
            || (disk_bytes <= self.usable() && (self.used_slots.len() as u64) < self.total_slots())
    }

    pub fn log_full(&self) -> WrlError {
        WrlError::LogFull {
            used_segments: self.used_slots.len() as u64,
            total_segments: self.total_slots(),
            capacity_bytes: self.total_slots() * self.segment_bytes,
        }
    }

    pub fn set_reader_hint(&mut self, lsn: u64) {
        self.reader_hint_lsn = lsn;
    }

    fn write_meta(&mut self, next: MetaBlock) -> Result<()> {
        assert_eq!(next.generation, self.meta.generation + 1, "meta generations are consecutive");
        assert!(next.nonce_hwm >= self.meta.nonce_hwm, "nonce high-water mark never moves back");
        assert!(next.trim_lsn >= self.meta.trim_lsn, "trim point never moves back");
        write_block(self.devices[0].as_ref(), next.offset(), &next.encode())?;
        sync(self.devices[0].as_ref())?;
        self.meta = next;
        Ok(())
    }

    /// Makes sure no counter up to `max_counter` is written before the high-water mark covers it.
    fn reserve_nonces(&mut self, max_counter: u64) -> Result<()> {
        if max_counter >= self.meta.nonce_hwm {
            let next = MetaBlock {
                generation: self.meta.generation + 1,
                nonce_hwm: max_counter + 1 + NONCE_RESERVE,
                ..self.meta
            };
            self.write_meta(next)?;
        }
        Ok(())
    }

    /// Opens a new head segment in a free slot, avoiding the device the relay reads from.
    fn open_segment(&mut self) -> Result<()> {
        let (avoid, next_id) = {
            let t = self.table.read().expect("table lock");
            let avoid = t.find(self.reader_hint_lsn).map(|s| s.loc.device);
            (avoid, t.segments.last().map(|s| s.loc.id + 1).expect("a head segment always exists"))
        };
        let free = |d: usize| (0..self.slots_per_device[d]).find(|s| !self.used_slots.contains(&(d, *s)));
        let n = self.devices.len();
        let pick = (0..n)
            .filter(|d| n == 1 || Some(*d) != avoid)
            .chain(0..n)
            .find_map(|d| free(d).map(|s| (d, s)))
            .ok_or_else(|| self.log_full())?;
        let (device, slot) = pick;
        let loc = SegmentLoc { id: next_id, device, slot, segment_bytes: self.segment_bytes, io_align: self.io_align };
        let h = SegmentHeader {
            wrl_uuid: self.uuid,
            wrl_id: self.wrl_id,
            device_index: device as u32,
            segment_id: next_id,
            first_lsn: self.next_lsn,
            prev_hash: self.last_hash,
            slot,
            segment_bytes: self.segment_bytes,
            io_align: self.io_align,
            created_unix_ns: now_ns(),
        };
        let dev = self.devices[device].clone();
        write_block(dev.as_ref(), loc.base(), &h.encode())?;
        sync(dev.as_ref())?;
        self.used_slots.insert((device, slot));
        let info = SegmentInfo {
            loc,
            first_lsn: self.next_lsn,
            prev_hash: self.last_hash,
            next_lsn: self.next_lsn,
            end: SEGMENT_HEADER_BYTES,
            index: Vec::new(),
        };
        self.table.write().expect("table lock").segments.push(info);
        Ok(())
    }

    /// Writes `records` as one batch (one write, one fdatasync) and returns their headers once
    /// they are durable. The caller checked `can_fit`; `LogFull` is returned if nothing fits.
    pub fn append_batch(&mut self, records: &[PendingRecord]) -> Result<Vec<RecordHeader>> {
        assert!(!records.is_empty(), "empty batch");
        let record_bytes: u64 = records.iter().map(|r| r.log_bytes()).sum();
        let disk_bytes = self.batch_disk_bytes(record_bytes);
        assert!(disk_bytes <= self.usable(), "batch of {disk_bytes} bytes exceeds a segment");
        let mut max_counter = None;
        for r in records {
            let (domain, counter) = nonce_parts(&r.desc.nonce);
            assert_eq!(r.payload.len(), r.desc.length as usize + TAG_LEN, "stored payload length");
            // Records sealed elsewhere (a replica's DR log holds staging's records) carry their
            // own nonce domain; only this WRL's own counters are covered by its high-water mark.
            if domain == self.wrl_id {
                max_counter = max_counter.max(Some(counter));
            }
        }
        if let Some(c) = max_counter {
            self.reserve_nonces(c)?;
        }
        let head_end = self.table.read().expect("table lock").segments.last().expect("head").end;
        if head_end + disk_bytes > self.segment_bytes {
            self.open_segment()?;
        }
        let (loc, offset) = {
            let t = self.table.read().expect("table lock");
            let head = t.segments.last().expect("head");
            (head.loc.clone(), head.end)
        };

        let first_lsn = self.next_lsn;
        let batch_bytes = BATCH_HEADER_LEN as u64 + record_bytes;
        self.buf.clear();
        self.buf.reserve(disk_bytes as usize);
        let bh = BatchHeader {
            segment_id: loc.id,
            first_lsn,
            record_count: records.len() as u32,
            batch_bytes: batch_bytes as u32,
        };
        self.buf.extend_from_slice(&bh.encode());
        let mut headers = Vec::with_capacity(records.len());
        let mut lsn = first_lsn;
        let mut hash = self.last_hash;
        for r in records {
            debug_assert_eq!(r.payload_crc, crc32c(&r.payload), "payload checksum given with the record");
            let h = RecordHeader {
                lsn,
                prev_hash: hash,
                desc: r.desc,
                stored_len: r.payload.len() as u32,
                payload_crc: r.payload_crc,
            };
            let enc = h.encode();
            // Pair the encoder with the decoder before anything reaches the disk.
            assert_eq!(RecordHeader::decode(&enc).as_ref(), Ok(&h), "record header does not round-trip");
            hash = chain_hash(&enc);
            self.buf.extend_from_slice(&enc);
            self.buf.extend_from_slice(&r.payload);
            headers.push(h);
            lsn += 1;
        }
        self.buf.resize(disk_bytes as usize);
        let dev = self.devices[loc.device].clone();
        dev.write_at(loc.base() + offset, &self.buf).map_err(io_err(format!(
            "write batch (lsn {first_lsn}..{}) to segment {} on {} at offset {offset}",
            lsn - 1,
            loc.id,
            dev.name()
        )))?;
        sync(dev.as_ref())?;

        self.next_lsn = lsn;
        self.last_hash = hash;
        let mut t = self.table.write().expect("table lock");
        t.segments.last_mut().expect("head").note_batch(first_lsn, offset, lsn, offset + disk_bytes);
        t.durable_lsn = lsn - 1;
        Ok(headers)
    }

    /// Drops every record up to `upto_lsn` (all confirmed downstream): persists the trim point and
    /// frees the slots of whole segments below it. Never frees the head segment.
    pub fn trim(&mut self, upto_lsn: u64) -> Result<()> {
        let upto = upto_lsn.min(self.last_lsn());
        if upto <= self.meta.trim_lsn {
            return Ok(());
        }
        let (oldest_id, freed) = {
            let t = self.table.read().expect("table lock");
            let keep_from = kept_from(&t, upto);
            let freed: Vec<(usize, u64)> = t.segments[..keep_from].iter().map(|s| (s.loc.device, s.loc.slot)).collect();
            (t.segments[keep_from].loc.id, freed)
        };
        let next = MetaBlock {
            generation: self.meta.generation + 1,
            trim_lsn: upto,
            oldest_segment_id: oldest_id,
            ..self.meta
        };
        self.write_meta(next)?;
        // Only now, with the new meta durable, may the freed slots be overwritten.
        for f in &freed {
            self.used_slots.remove(f);
        }
        let mut t = self.table.write().expect("table lock");
        t.segments.retain(|s| s.loc.id >= oldest_id);
        t.trim_lsn = upto;
        self.reader_hint_lsn = self.reader_hint_lsn.max(upto + 1);
        Ok(())
    }
}

/// The index of the oldest segment a trim up to `upto` keeps: the first with a record after it
/// (the head segment is always kept).
fn kept_from(t: &Table, upto: u64) -> usize {
    t.segments.iter().position(|s| s.next_lsn > upto + 1).unwrap_or(t.segments.len() - 1)
}

impl LogCore {
    /// The first lsn a trim up to `upto_lsn` keeps (the first record of the oldest segment it
    /// keeps): records before it are gone once [`LogCore::trim`] returns.
    pub fn trim_keeps_from(&self, upto_lsn: u64) -> u64 {
        let upto = upto_lsn.min(self.last_lsn());
        if upto <= self.meta.trim_lsn {
            return 0;
        }
        let t = self.table.read().expect("table lock");
        t.segments[kept_from(&t, upto)].first_lsn
    }
}

/// A record read back from the log.
#[derive(Clone, Debug)]
pub struct LogRecord {
    pub header: RecordHeader,
    /// Ciphertext and tag.
    pub payload: Bytes,
}

/// Reads durable records from `from_lsn` on and never past `until_lsn`: whole batches, until at
/// least `max_bytes` of payload were read (a batch is never cut: the next read would have to read
/// and check it again). Every record is checked again as it is read.
pub fn read_from_disk(
    devices: &[Arc<dyn Storage>],
    table: &RwLock<Table>,
    from_lsn: u64,
    until_lsn: u64,
    max_bytes: u64,
) -> Result<Vec<LogRecord>> {
    let mut out: Vec<LogRecord> = Vec::new();
    let mut lsn = from_lsn;
    let mut bytes = 0u64;
    while lsn <= until_lsn && (out.is_empty() || bytes < max_bytes) {
        let seg = {
            let t = table.read().expect("table lock");
            if lsn <= t.trim_lsn || t.segments.first().is_none_or(|s| lsn < s.first_lsn) {
                let first_available = (t.trim_lsn + 1).max(t.segments.first().map(|s| s.first_lsn).unwrap_or(1));
                return Err(WrlError::Trimmed { lsn, first_available });
            }
            match t.find(lsn) {
                Some(s) => s.clone(),
                None => break,
            }
        };
        let (mut expected, pos) = seg.seek(lsn);
        let mut cur = SegmentCursor::new(devices[seg.loc.device].clone(), seg.loc.clone(), pos);
        // Chain links are checked between the records read here; the first link is taken on trust
        // from the record itself (it was checked at recovery or when written).
        let mut hash: Option<u64> = None;
        while lsn < seg.next_lsn && lsn <= until_lsn && (out.is_empty() || bytes < max_bytes) {
            let batch = match cur.next_batch(expected)? {
                Ok(b) => b,
                Err(stop) => {
                    return Err(WrlError::Corrupt {
                        segment_id: seg.loc.id,
                        device: devices[seg.loc.device].name(),
                        slot: seg.loc.slot,
                        offset: stop.offset,
                        expected_lsn: expected,
                        reason: format!("on read-back: {}", stop.reason),
                    });
                }
            };
            let mut prev = hash.unwrap_or_else(|| {
                drv_format::RecordHeader::decode(batch.records).map(|h| h.prev_hash).unwrap_or_default()
            });
            let mut got: Vec<LogRecord> = Vec::new();
            let offset = batch.offset;
            // One copy of the batch out of the reused window; records are views into it.
            let all = Bytes::copy_from_slice(batch.records);
            let base = batch.records.as_ptr() as usize;
            parse_batch(&batch, &mut expected, &mut prev, &mut |h, p| {
                let at = p.as_ptr() as usize - base;
                got.push(LogRecord { header: *h, payload: all.slice(at..at + p.len()) })
            })
            .map_err(|(at, reason)| WrlError::Corrupt {
                segment_id: seg.loc.id,
                device: devices[seg.loc.device].name(),
                slot: seg.loc.slot,
                offset: at.max(offset),
                expected_lsn: expected,
                reason: format!("on read-back: {reason}"),
            })?;
            hash = Some(prev);
            for r in got {
                if r.header.lsn < lsn || r.header.lsn > until_lsn {
                    continue;
                }
                bytes += r.header.desc.length as u64;
                lsn = r.header.lsn + 1;
                out.push(r);
            }
        }
    }
    Ok(out)
}
