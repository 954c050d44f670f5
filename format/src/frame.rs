//! Wire frames between drv nodes (`docs/formats.md`, "Wire frames"). Pure encode/decode: the header
//! is checked (magic, version, type, length limit) before anything is allocated for the body, and
//! the body is checked against the CRC and its type's layout.

use bytes::Bytes;

use crate::FormatError;
use crate::codec::{Dec, Enc};
use crate::record::{MAX_WRITE_BYTES, decode_record};

pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"DRVF");
pub const FRAME_VERSION: u8 = 1;
pub const FRAME_HEADER_LEN: usize = 16;
/// No frame body is ever larger than this, whatever a node's configured limit says.
pub const MAX_FRAME_BODY: u32 = 16 << 20;

/// Frame types. The numbers are part of the wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    OpenVolume = 1,
    VolumeState = 2,
    Write = 3,
    Ack = 4,
    Error = 5,
    RelayOpen = 6,
    ReplicaPosition = 7,
    Records = 8,
    StatusRequest = 9,
    StatusReply = 10,
    SnapshotRequest = 11,
    SnapshotReply = 12,
    MediaRequest = 13,
    MediaReply = 14,
}

impl FrameType {
    fn from_u8(v: u8) -> Option<FrameType> {
        use FrameType::*;
        Some(match v {
            1 => OpenVolume,
            2 => VolumeState,
            3 => Write,
            4 => Ack,
            5 => Error,
            6 => RelayOpen,
            7 => ReplicaPosition,
            8 => Records,
            9 => StatusRequest,
            10 => StatusReply,
            11 => SnapshotRequest,
            12 => SnapshotReply,
            13 => MediaRequest,
            14 => MediaReply,
            _ => return None,
        })
    }
}

/// Error codes carried by [`Frame::Error`].
pub mod code {
    /// The frame could not be decoded.
    pub const MALFORMED: u16 = 1;
    /// The volume is not configured on this node (or not for this peer).
    pub const UNKNOWN_VOLUME: u16 = 2;
    /// A write skipped sequence numbers.
    pub const SEQUENCE_GAP: u16 = 3;
    /// The write log is full: the agent should switch to its change map.
    pub const LOG_FULL: u16 = 4;
    /// Any other failure on the server side (I/O, failed log).
    pub const SERVER: u16 = 5;
    /// The write is not acceptable (too large, bad flags, epoch going backwards).
    pub const INVALID: u16 = 6;
    /// The request cannot be served in the current state (e.g. a snapshot while resyncing).
    pub const BUSY: u16 = 7;
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Agent -> staging: start sending writes of a volume.
    OpenVolume {
        volume_id: u64,
    },
    /// Staging -> agent: the volume's durable position, and how much its WRL can take now
    /// (free segments; an agent about to resync ships no more than that before it asks again).
    VolumeState {
        volume_id: u64,
        last_seq: u64,
        last_epoch: u64,
        room_bytes: u64,
        capacity_bytes: u64,
    },
    /// Agent -> staging: one write.
    Write {
        volume_id: u64,
        seq: u64,
        epoch: u64,
        offset: u64,
        flags: u32,
        /// The agent's clock at capture, seconds since the UNIX epoch (0: unknown).
        capture_unix: u32,
        data: Bytes,
    },
    /// Staging -> agent: the write with `seq` (and every earlier one) is durable in the log.
    Ack {
        volume_id: u64,
        seq: u64,
        lsn: u64,
    },
    /// Either way: a refusal, with a code from [`code`] and a message naming what was wrong.
    Error {
        code: u16,
        message: String,
    },
    /// Staging -> replica: start relaying a volume.
    RelayOpen {
        volume_id: u64,
    },
    /// Replica -> staging: what it holds durably (DR log) and what it has applied.
    ReplicaPosition {
        volume_id: u64,
        durable_seq: u64,
        applied_seq: u64,
    },
    /// Staging -> replica: WRL records, unchanged (header + encrypted payload each).
    Records {
        volume_id: u64,
        count: u32,
        /// The records, a view into the received frame body (no copy).
        bytes: Bytes,
    },
    StatusRequest,
    StatusReply {
        json: Vec<u8>,
    },
    /// Admin -> replica: a snapshot operation ([`snapshot_op`]) on snapshot `name` of a volume.
    SnapshotRequest {
        volume_id: u64,
        op: u8,
        /// The operation's number (see [`snapshot_op`]; 0 where it takes none).
        arg: u64,
        name: String,
    },
    /// Replica -> admin: what the operation did (JSON, one type per operation).
    SnapshotReply {
        json: Vec<u8>,
    },
    /// Admin -> replica: a media-resync step ([`media_op`]) with its argument (`complete`: the
    /// byte offset its page of ranges starts at; `release`: the sequence the agent's resync ended
    /// below).
    MediaRequest {
        volume_id: u64,
        op: u8,
        arg: u64,
    },
    /// Replica -> admin: the media-resync state and, for `complete`, ranges to ship (JSON).
    MediaReply {
        json: Vec<u8>,
    },
}

/// Snapshot operations ([`Frame::SnapshotRequest`]).
pub mod snapshot_op {
    /// Take snapshot `name` at the applied position.
    pub const CREATE: u8 = 1;
    /// Delete it, freeing what no other snapshot needs.
    pub const DELETE: u8 = 2;
    /// The digest of its image.
    pub const DIGEST: u8 = 3;
    /// Every snapshot of the volume with the space each holds alone (`name` empty).
    pub const LIST: u8 = 4;
    /// Take snapshot `name` at the retention window's last point at or before sequence `arg`.
    pub const CREATE_AT_SEQ: u8 = 5;
    /// Take snapshot `name` at the window's newest point captured at or before time `arg`
    /// (seconds since the UNIX epoch, the agent's clock).
    pub const CREATE_AT_TIME: u8 = 6;
    /// The retention window: oldest and newest point, and the newest `arg` flush points.
    pub const POINTS: u8 = 7;
    /// Serve snapshot NAME over NBD: `name` is `NAME ADDRESS` (the address to listen on, after
    /// one space); `arg` is [`WRITABLE`] for a private overlay clients may write, else 0.
    pub const EXPORT: u8 = 8;
    /// Stop serving snapshot `name` over NBD.
    pub const UNEXPORT: u8 = 9;
    /// Serve snapshot `name` as a loop device on the replica host; `arg` as for [`EXPORT`].
    pub const MOUNT: u8 = 10;
    /// Detach the loop device of snapshot `name`.
    pub const UNMOUNT: u8 = 11;
    /// A recovery check of snapshot `name`: each filesystem on it checked by its own checker.
    pub const CHECK: u8 = 12;
    /// Begin a failover of the volume at its image now; `name` is `test` for a failover test
    /// (replication goes on), empty for a failover (apply holds).
    pub const FAILOVER: u8 = 13;
    /// The same at the retention window's last point at or before sequence `arg`.
    pub const FAILOVER_AT_SEQ: u8 = 14;
    /// The same at the window's newest point captured at or before time `arg`.
    pub const FAILOVER_AT_TIME: u8 = 15;
    /// The volume's failover, if one lasts.
    pub const FAILOVER_STATUS: u8 = 16;
    /// End the volume's failover; `arg` bit 0: discard what was written on its device.
    pub const FAILOVER_END: u8 = 17;
    /// `arg` of [`EXPORT`] and [`MOUNT`]: writes go to a private overlay.
    pub const WRITABLE: u64 = 1;
    /// `arg` of [`EXPORT`]: a read-only export of the snapshot that runs already is the answer
    /// (`drv restore` resuming), not a refusal.
    pub const REUSE: u64 = 2;
}

/// Steps of a media resync ([`Frame::MediaRequest`]).
pub mod media_op {
    pub const BEGIN: u8 = 1;
    pub const COMPLETE: u8 = 2;
    pub const RELEASE: u8 = 3;
    pub const STATUS: u8 = 4;
}

/// A frame header, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub ftype: FrameType,
    pub body_len: u32,
    pub crc: u32,
}

const WHAT: &str = "frame";

/// Checks a frame header against the format and `limit` (the receiver's body limit), before the
/// body is read or allocated.
pub fn decode_header(buf: &[u8; FRAME_HEADER_LEN], limit: u32) -> Result<FrameHeader, FormatError> {
    let mut d = Dec::new(buf);
    let magic = d.u32();
    if magic != FRAME_MAGIC {
        return Err(FormatError::BadMagic { what: WHAT, found: magic });
    }
    let [version, t] = d.array::<2>();
    if version != FRAME_VERSION {
        return Err(FormatError::BadVersion { what: WHAT, found: version as u16, supported: FRAME_VERSION as u16 });
    }
    let ftype = FrameType::from_u8(t).ok_or(FormatError::Invalid { what: WHAT, field: "type", value: t as u64 })?;
    if d.u16() != 0 {
        return Err(FormatError::ReservedNotZero { what: WHAT });
    }
    let body_len = d.u32();
    let limit = limit.min(MAX_FRAME_BODY);
    if body_len > limit {
        return Err(FormatError::BadLength {
            what: "frame body (over the limit)",
            found: body_len as u64,
            expected: limit as u64,
        });
    }
    Ok(FrameHeader { ftype, body_len, crc: d.u32() })
}

fn frame_crc(header: &[u8], body: &[u8]) -> u32 {
    crc32c::crc32c_append(crate::crc32c(&header[..12]), body)
}

/// Decodes a body read after `h`, checking the CRC and the body layout of its type.
/// Bulk fields (`Write::data`, `Records::bytes`) are views into `body`, not copies.
pub fn decode_body(header_bytes: &[u8; FRAME_HEADER_LEN], h: &FrameHeader, body: Bytes) -> Result<Frame, FormatError> {
    assert_eq!(body.len(), h.body_len as usize, "caller reads exactly body_len bytes");
    let computed = frame_crc(header_bytes, &body);
    if computed != h.crc {
        return Err(FormatError::Checksum { what: WHAT, stored: h.crc, computed });
    }
    let need = |n: usize| -> Result<(), FormatError> {
        if body.len() < n {
            Err(FormatError::Truncated { what: "frame body", need: n, have: body.len() })
        } else {
            Ok(())
        }
    };
    let exact = |n: usize| -> Result<(), FormatError> {
        need(n)?;
        if body.len() != n {
            return Err(FormatError::BadLength { what: "frame body", found: body.len() as u64, expected: n as u64 });
        }
        Ok(())
    };
    let mut d = Dec::new(&body);
    Ok(match h.ftype {
        FrameType::OpenVolume => {
            exact(8)?;
            Frame::OpenVolume { volume_id: d.u64() }
        }
        FrameType::RelayOpen => {
            exact(8)?;
            Frame::RelayOpen { volume_id: d.u64() }
        }
        FrameType::VolumeState => {
            exact(40)?;
            Frame::VolumeState {
                volume_id: d.u64(),
                last_seq: d.u64(),
                last_epoch: d.u64(),
                room_bytes: d.u64(),
                capacity_bytes: d.u64(),
            }
        }
        FrameType::Ack => {
            exact(24)?;
            Frame::Ack { volume_id: d.u64(), seq: d.u64(), lsn: d.u64() }
        }
        FrameType::ReplicaPosition => {
            exact(24)?;
            Frame::ReplicaPosition { volume_id: d.u64(), durable_seq: d.u64(), applied_seq: d.u64() }
        }
        FrameType::Write => {
            need(48)?;
            let (volume_id, seq, epoch, offset, flags, len) = (d.u64(), d.u64(), d.u64(), d.u64(), d.u32(), d.u32());
            let (capture_unix, reserved) = (d.u32(), d.u32());
            if len > MAX_WRITE_BYTES {
                return Err(FormatError::Invalid { what: "write frame", field: "length", value: len as u64 });
            }
            if reserved != 0 {
                return Err(FormatError::Invalid { what: "write frame", field: "reserved", value: reserved as u64 });
            }
            exact(48 + len as usize)?;
            Frame::Write { volume_id, seq, epoch, offset, flags, capture_unix, data: body.slice(48..) }
        }
        FrameType::Error => {
            need(4)?;
            let (code, len) = (d.u16(), d.u16());
            exact(4 + len as usize)?;
            let message = std::str::from_utf8(&body[4..])
                .map_err(|_| FormatError::Invalid { what: "error frame", field: "message", value: 0 })?
                .to_owned();
            Frame::Error { code, message }
        }
        FrameType::Records => {
            need(16)?;
            let (volume_id, count) = (d.u64(), d.u32());
            return decode_records(volume_id, count, body);
        }
        FrameType::StatusRequest => {
            exact(0)?;
            Frame::StatusRequest
        }
        FrameType::StatusReply => Frame::StatusReply { json: body.to_vec() },
        FrameType::SnapshotRequest => {
            need(24)?;
            let volume_id = d.u64();
            let (op, reserved) = (body[8], body[9]);
            let len = u16::from_le_bytes([body[10], body[11]]);
            let (_, reserved2, arg) = (d.u32(), d.u32(), d.u64());
            if reserved != 0 || reserved2 != 0 {
                return Err(FormatError::ReservedNotZero { what: "snapshot request" });
            }
            if !(snapshot_op::CREATE..=snapshot_op::FAILOVER_END).contains(&op) {
                return Err(FormatError::Invalid { what: "snapshot request", field: "op", value: op as u64 });
            }
            exact(24 + len as usize)?;
            let name = std::str::from_utf8(&body[24..])
                .map_err(|_| FormatError::Invalid { what: "snapshot request", field: "name", value: 0 })?
                .to_owned();
            Frame::SnapshotRequest { volume_id, op, arg, name }
        }
        FrameType::SnapshotReply => Frame::SnapshotReply { json: body.to_vec() },
        FrameType::MediaRequest => {
            exact(24)?;
            let (volume_id, op) = (d.u64(), body[8]);
            if body[9..16].iter().any(|b| *b != 0) {
                return Err(FormatError::ReservedNotZero { what: "media request" });
            }
            if !(media_op::BEGIN..=media_op::STATUS).contains(&op) {
                return Err(FormatError::Invalid { what: "media request", field: "op", value: op as u64 });
            }
            let arg = u64::from_le_bytes(body[16..24].try_into().expect("8"));
            Frame::MediaRequest { volume_id, op, arg }
        }
        FrameType::MediaReply => Frame::MediaReply { json: body.to_vec() },
    })
}

fn decode_records(volume_id: u64, count: u32, body: Bytes) -> Result<Frame, FormatError> {
    const WHAT: &str = "records frame";
    if body[12..16].iter().any(|b| *b != 0) {
        return Err(FormatError::ReservedNotZero { what: WHAT });
    }
    // Every record must decode and belong to the volume; the count must match.
    let mut at = 16;
    for _ in 0..count {
        let (rh, _) = decode_record(&body[at..])?;
        if rh.desc.volume_id != volume_id {
            return Err(FormatError::Invalid { what: WHAT, field: "volume_id", value: rh.desc.volume_id });
        }
        at += rh.record_len();
    }
    if at != body.len() {
        return Err(FormatError::BadLength { what: WHAT, found: body.len() as u64, expected: at as u64 });
    }
    Ok(Frame::Records { volume_id, count, bytes: body.slice(16..) })
}

impl Frame {
    pub fn ftype(&self) -> FrameType {
        match self {
            Frame::OpenVolume { .. } => FrameType::OpenVolume,
            Frame::VolumeState { .. } => FrameType::VolumeState,
            Frame::Write { .. } => FrameType::Write,
            Frame::Ack { .. } => FrameType::Ack,
            Frame::Error { .. } => FrameType::Error,
            Frame::RelayOpen { .. } => FrameType::RelayOpen,
            Frame::ReplicaPosition { .. } => FrameType::ReplicaPosition,
            Frame::Records { .. } => FrameType::Records,
            Frame::StatusRequest => FrameType::StatusRequest,
            Frame::StatusReply { .. } => FrameType::StatusReply,
            Frame::SnapshotRequest { .. } => FrameType::SnapshotRequest,
            Frame::SnapshotReply { .. } => FrameType::SnapshotReply,
            Frame::MediaRequest { .. } => FrameType::MediaRequest,
            Frame::MediaReply { .. } => FrameType::MediaReply,
        }
    }

    /// Encodes header and body (the body is written in place after the header: bulk frames are
    /// copied once).
    pub fn encode(&self) -> Vec<u8> {
        let mut out: Vec<u8> = Vec::with_capacity(FRAME_HEADER_LEN + self.body_len_hint());
        out.resize(FRAME_HEADER_LEN, 0);
        let put = |out: &mut Vec<u8>, n: usize, f: &mut dyn FnMut(&mut Enc<'_>)| {
            let start = out.len();
            out.resize(start + n, 0);
            f(&mut Enc::new(&mut out[start..]));
        };
        match self {
            Frame::OpenVolume { volume_id } | Frame::RelayOpen { volume_id } => put(&mut out, 8, &mut |e| {
                e.u64(*volume_id);
            }),
            Frame::VolumeState { volume_id, last_seq, last_epoch, room_bytes, capacity_bytes } => {
                put(&mut out, 40, &mut |e| {
                    e.u64(*volume_id).u64(*last_seq).u64(*last_epoch).u64(*room_bytes).u64(*capacity_bytes);
                })
            }
            Frame::Ack { volume_id, seq, lsn } => put(&mut out, 24, &mut |e| {
                e.u64(*volume_id).u64(*seq).u64(*lsn);
            }),
            Frame::ReplicaPosition { volume_id, durable_seq, applied_seq } => put(&mut out, 24, &mut |e| {
                e.u64(*volume_id).u64(*durable_seq).u64(*applied_seq);
            }),
            Frame::Write { volume_id, seq, epoch, offset, flags, capture_unix, data } => {
                put(&mut out, 48, &mut |e| {
                    e.u64(*volume_id).u64(*seq).u64(*epoch).u64(*offset).u32(*flags).u32(data.len() as u32);
                    e.u32(*capture_unix).u32(0);
                });
                out.extend_from_slice(data);
            }
            Frame::Error { code, message } => {
                let m = &message.as_bytes()[..message.len().min(u16::MAX as usize)];
                put(&mut out, 4, &mut |e| {
                    e.u16(*code).u16(m.len() as u16);
                });
                out.extend_from_slice(m);
            }
            Frame::Records { volume_id, count, bytes } => {
                put(&mut out, 16, &mut |e| {
                    e.u64(*volume_id).u32(*count).u32(0);
                });
                out.extend_from_slice(bytes);
            }
            Frame::StatusRequest => {}
            Frame::StatusReply { json } | Frame::SnapshotReply { json } | Frame::MediaReply { json } => {
                out.extend_from_slice(json)
            }
            Frame::MediaRequest { volume_id, op, arg } => {
                put(&mut out, 24, &mut |e| {
                    e.u64(*volume_id).bytes(&[*op, 0, 0, 0, 0, 0, 0, 0]).u64(*arg);
                });
            }
            Frame::SnapshotRequest { volume_id, op, arg, name } => {
                let n = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
                put(&mut out, 24, &mut |e| {
                    e.u64(*volume_id).bytes(&[*op, 0]).u16(n.len() as u16).u32(0).u64(*arg);
                });
                out.extend_from_slice(n);
            }
        }
        let body_len = out.len() - FRAME_HEADER_LEN;
        assert!(body_len <= MAX_FRAME_BODY as usize, "frame body over the format's maximum");
        Enc::new(&mut out[..FRAME_HEADER_LEN])
            .u32(FRAME_MAGIC)
            .bytes(&[FRAME_VERSION, self.ftype() as u8])
            .u16(0)
            .u32(body_len as u32)
            .u32(0);
        let crc = frame_crc(&out[..FRAME_HEADER_LEN], &out[FRAME_HEADER_LEN..]);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
        out
    }

    fn body_len_hint(&self) -> usize {
        match self {
            Frame::Write { data, .. } => 48 + data.len(),
            Frame::Records { bytes, .. } => 16 + bytes.len(),
            Frame::StatusReply { json } | Frame::SnapshotReply { json } | Frame::MediaReply { json } => json.len(),
            Frame::SnapshotRequest { name, .. } => 24 + name.len(),
            Frame::Error { message, .. } => 4 + message.len(),
            _ => 24,
        }
    }
}

/// Builds a Records frame as a list of chunks for a vectored send: large payloads are sent from
/// their own buffers (no copy); record headers and small payloads are gathered into shared
/// chunks. The frame header goes first and is filled in by [`RecordsFrameBuilder::finish`].
pub struct RecordsFrameBuilder {
    /// Records header (volume id, count, reserved).
    volume_id: u64,
    chunks: Vec<Bytes>,
    /// Small bytes not yet cut into a chunk.
    small: Vec<u8>,
    count: u32,
    body_len: usize,
}

/// Payloads at least this large travel as their own chunk.
const OWN_CHUNK_BYTES: usize = 16 << 10;

impl RecordsFrameBuilder {
    pub fn new(volume_id: u64) -> Self {
        RecordsFrameBuilder { volume_id, chunks: Vec::new(), small: Vec::new(), count: 0, body_len: 16 }
    }

    pub fn push(&mut self, header: &[u8; crate::record::RECORD_HEADER_LEN], payload: &Bytes) {
        self.small.extend_from_slice(header);
        if payload.len() >= OWN_CHUNK_BYTES {
            self.chunks.push(Bytes::from(std::mem::take(&mut self.small)));
            self.chunks.push(payload.clone());
        } else {
            self.small.extend_from_slice(payload);
        }
        self.count += 1;
        self.body_len += header.len() + payload.len();
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// Body bytes so far.
    pub fn body_len(&self) -> usize {
        self.body_len
    }

    /// The frame as chunks, in order: frame header + records header, then the records.
    pub fn finish(mut self) -> Vec<Bytes> {
        assert!(self.body_len <= MAX_FRAME_BODY as usize, "frame body over the format's maximum");
        if !self.small.is_empty() {
            self.chunks.push(Bytes::from(std::mem::take(&mut self.small)));
        }
        let mut head = [0u8; FRAME_HEADER_LEN + 16];
        Enc::new(&mut head[FRAME_HEADER_LEN..]).u64(self.volume_id).u32(self.count).u32(0);
        Enc::new(&mut head[..FRAME_HEADER_LEN])
            .u32(FRAME_MAGIC)
            .bytes(&[FRAME_VERSION, FrameType::Records as u8])
            .u16(0)
            .u32(self.body_len as u32)
            .u32(0);
        let mut crc = frame_crc(&head[..FRAME_HEADER_LEN], &head[FRAME_HEADER_LEN..]);
        for c in &self.chunks {
            crc = crc32c::crc32c_append(crc, c);
        }
        head[12..16].copy_from_slice(&crc.to_le_bytes());
        let mut out = Vec::with_capacity(self.chunks.len() + 1);
        out.push(Bytes::copy_from_slice(&head));
        out.append(&mut self.chunks);
        debug_assert_eq!(out.iter().map(|c| c.len()).sum::<usize>(), FRAME_HEADER_LEN + self.body_len);
        out
    }
}

/// Decodes one whole frame from a buffer (header, body); for tests and the fuzz target.
pub fn decode_frame(buf: &[u8], limit: u32) -> Result<(Frame, usize), FormatError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Err(FormatError::Truncated { what: WHAT, need: FRAME_HEADER_LEN, have: buf.len() });
    }
    let hb: &[u8; FRAME_HEADER_LEN] = buf[..FRAME_HEADER_LEN].try_into().expect("16");
    let h = decode_header(hb, limit)?;
    let end = FRAME_HEADER_LEN + h.body_len as usize;
    if buf.len() < end {
        return Err(FormatError::Truncated {
            what: "frame body",
            need: h.body_len as usize,
            have: buf.len() - FRAME_HEADER_LEN,
        });
    }
    Ok((decode_body(hb, &h, Bytes::copy_from_slice(&buf[FRAME_HEADER_LEN..end]))?, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::OpenVolume { volume_id: 3 },
            Frame::VolumeState {
                volume_id: 3,
                last_seq: 10,
                last_epoch: 4,
                room_bytes: 1 << 30,
                capacity_bytes: 2 << 30,
            },
            Frame::Write {
                volume_id: 3,
                seq: 11,
                epoch: 5,
                offset: 4096,
                flags: 2,
                capture_unix: 1_800_000_000,
                data: vec![9; 100].into(),
            },
            Frame::Ack { volume_id: 3, seq: 11, lsn: 77 },
            Frame::Error { code: code::SEQUENCE_GAP, message: "gap".into() },
            Frame::RelayOpen { volume_id: 3 },
            Frame::ReplicaPosition { volume_id: 3, durable_seq: 9, applied_seq: 8 },
            Frame::Records { volume_id: 3, count: 0, bytes: Bytes::new() },
            Frame::StatusRequest,
            Frame::StatusReply { json: b"{}".to_vec() },
            Frame::SnapshotRequest { volume_id: 3, op: snapshot_op::CREATE, arg: 0, name: "before-upgrade".into() },
            Frame::SnapshotRequest {
                volume_id: 3,
                op: snapshot_op::CREATE_AT_TIME,
                arg: 1_800_000_000,
                name: "before-ransomware".into(),
            },
            Frame::SnapshotReply { json: b"{}".to_vec() },
            Frame::MediaRequest { volume_id: 3, op: media_op::COMPLETE, arg: 1 << 40 },
            Frame::MediaReply { json: b"{}".to_vec() },
        ]
    }

    #[test]
    fn round_trip_every_type() {
        for f in samples() {
            let b = f.encode();
            assert_eq!(decode_frame(&b, MAX_FRAME_BODY).unwrap(), (f, b.len()));
        }
    }

    #[test]
    fn records_builder_matches_encode() {
        use crate::record::{Flags, RecordHeader, WriteDesc};
        // Small payloads share chunks with the headers, large ones travel as their own chunk.
        for sizes in [&[40usize][..], &[40, 20 << 10, 56, 16 << 10, 16], &[64 << 10]] {
            let mut b = RecordsFrameBuilder::new(5);
            let mut bytes = Vec::new();
            for (i, &n) in sizes.iter().enumerate() {
                let payload = vec![i as u8 + 3; n];
                let h = RecordHeader {
                    lsn: 9 + i as u64,
                    prev_hash: 1,
                    desc: WriteDesc {
                        volume_id: 5,
                        volume_seq: 2 + i as u64,
                        epoch: 1,
                        offset: 0,
                        length: n as u32 - 16,
                        flags: Flags::default(),
                        key_id: 1,
                        nonce: [0; 12],
                        capture_unix: 0,
                    },
                    stored_len: n as u32,
                    payload_crc: crate::crc32c(&payload),
                };
                b.push(&h.encode(), &Bytes::from(payload.clone()));
                bytes.extend_from_slice(&h.encode());
                bytes.extend_from_slice(&payload);
            }
            let built: Vec<u8> = b.finish().concat();
            let count = sizes.len() as u32;
            assert_eq!(built, Frame::Records { volume_id: 5, count, bytes: bytes.into() }.encode());
            assert!(decode_frame(&built, MAX_FRAME_BODY).is_ok());
        }
    }

    #[test]
    fn oversized_is_refused_from_the_header() {
        let b = Frame::Write {
            volume_id: 1,
            seq: 1,
            epoch: 1,
            offset: 0,
            flags: 0,
            capture_unix: 0,
            data: vec![0; 5000].into(),
        }
        .encode();
        let e = decode_frame(&b, 4096).unwrap_err();
        assert!(e.to_string().contains("over the limit"), "{e}");
    }

    proptest! {
        #[test]
        fn any_single_byte_change_is_detected(i in any::<prop::sample::Index>(), which in 0usize..12, xor in 1u8..) {
            let mut b = samples()[which].encode();
            let at = i.index(b.len());
            b[at] ^= xor;
            prop_assert!(decode_frame(&b, MAX_FRAME_BODY).is_err());
        }

        #[test]
        fn truncation_is_detected(which in 0usize..12, cut in 1usize..40) {
            let b = samples()[which].encode();
            let n = b.len().saturating_sub(cut);
            prop_assert!(decode_frame(&b[..n], MAX_FRAME_BODY).is_err());
        }
    }
}
