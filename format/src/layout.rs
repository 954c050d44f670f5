//! WRL on-disk layout: device header, meta blocks, segment headers and batch headers
//! (`docs/formats.md`, "WRL: device layout").

use crate::FormatError;
use crate::codec::{Dec, Enc, check, seal};

/// Size of the blocks holding the device header, the meta blocks and the segment header.
pub const BLOCK_BYTES: u64 = 4096;
/// Offset of the meta blocks A and B on device 0.
pub const META_OFFSETS: [u64; 2] = [4096, 8192];
/// Where segment slot 0 starts on every device.
pub const DATA_START: u64 = 64 * 1024;
/// The segment header occupies the first block of a slot; batches start after it.
pub const SEGMENT_HEADER_BYTES: u64 = BLOCK_BYTES;
pub const MIN_SEGMENT_BYTES: u64 = 1 << 20;
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;
/// Bytes used inside the 4 KiB blocks of the device header, meta and segment header.
pub const SMALL_HEADER_LEN: usize = 128;
pub const BATCH_HEADER_LEN: usize = 64;

const VERSION: u16 = 1;
pub const DEVICE_MAGIC: u32 = u32::from_le_bytes(*b"DRVD");
pub const META_MAGIC: u32 = u32::from_le_bytes(*b"DRVM");
pub const SEGMENT_MAGIC: u32 = u32::from_le_bytes(*b"DRVS");
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"DRVB");

/// Block 0 of every WRL device; written once at create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceHeader {
    pub wrl_uuid: [u8; 16],
    /// The WRL's nonce domain, unique in the installation.
    pub wrl_id: u32,
    pub device_index: u32,
    pub device_count: u32,
    pub segment_bytes: u64,
    pub slot_count: u64,
    pub io_align: u32,
}

impl DeviceHeader {
    pub fn encode(&self) -> [u8; SMALL_HEADER_LEN] {
        let mut buf = [0u8; SMALL_HEADER_LEN];
        Enc::new(&mut buf)
            .u32(DEVICE_MAGIC)
            .u16(VERSION)
            .u16(SMALL_HEADER_LEN as u16)
            .bytes(&self.wrl_uuid)
            .u32(self.wrl_id)
            .u32(self.device_index)
            .u32(self.device_count)
            .u64(self.segment_bytes)
            .u64(self.slot_count)
            .u32(self.io_align)
            .zero_to(124);
        seal(&mut buf, SMALL_HEADER_LEN);
        buf
    }

    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "WRL device header";
        check(WHAT, buf, DEVICE_MAGIC, VERSION, SMALL_HEADER_LEN, (56, 124))?;
        let mut d = Dec::at(buf, 8);
        let h = DeviceHeader {
            wrl_uuid: d.array(),
            wrl_id: d.u32(),
            device_index: d.u32(),
            device_count: d.u32(),
            segment_bytes: d.u64(),
            slot_count: d.u64(),
            io_align: d.u32(),
        };
        validate_geometry(WHAT, h.segment_bytes, h.io_align)?;
        if h.device_count == 0 || h.device_index >= h.device_count {
            return Err(FormatError::Invalid { what: WHAT, field: "device_index", value: h.device_index as u64 });
        }
        Ok(h)
    }
}

/// Checks segment size and write alignment against the format's limits.
pub fn validate_geometry(what: &'static str, segment_bytes: u64, io_align: u32) -> Result<(), FormatError> {
    if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&segment_bytes)
        || !segment_bytes.is_multiple_of(MIN_SEGMENT_BYTES)
    {
        return Err(FormatError::Invalid { what, field: "segment_bytes", value: segment_bytes });
    }
    if !(io_align == 512 || io_align == 4096) {
        return Err(FormatError::Invalid { what, field: "io_align", value: io_align as u64 });
    }
    Ok(())
}

/// The mutable metadata of a WRL (two alternating copies on device 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaBlock {
    pub wrl_uuid: [u8; 16],
    pub generation: u64,
    /// No record uses a nonce counter at or above this value.
    pub nonce_hwm: u64,
    /// Records with `lsn <= trim_lsn` are confirmed downstream.
    pub trim_lsn: u64,
    /// Segments with smaller ids are free.
    pub oldest_segment_id: u64,
}

impl MetaBlock {
    pub fn encode(&self) -> [u8; SMALL_HEADER_LEN] {
        let mut buf = [0u8; SMALL_HEADER_LEN];
        Enc::new(&mut buf)
            .u32(META_MAGIC)
            .u16(VERSION)
            .u16(SMALL_HEADER_LEN as u16)
            .bytes(&self.wrl_uuid)
            .u64(self.generation)
            .u64(self.nonce_hwm)
            .u64(self.trim_lsn)
            .u64(self.oldest_segment_id)
            .zero_to(124);
        seal(&mut buf, SMALL_HEADER_LEN);
        buf
    }

    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        check("WRL meta block", buf, META_MAGIC, VERSION, SMALL_HEADER_LEN, (56, 124))?;
        let mut d = Dec::at(buf, 8);
        Ok(MetaBlock {
            wrl_uuid: d.array(),
            generation: d.u64(),
            nonce_hwm: d.u64(),
            trim_lsn: d.u64(),
            oldest_segment_id: d.u64(),
        })
    }

    /// Offset of the copy that holds this generation.
    pub fn offset(&self) -> u64 {
        META_OFFSETS[(self.generation % 2) as usize]
    }
}

/// The first block of a segment slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub wrl_uuid: [u8; 16],
    pub wrl_id: u32,
    pub device_index: u32,
    pub segment_id: u64,
    pub first_lsn: u64,
    /// Chain value of the record before `first_lsn`.
    pub prev_hash: u64,
    pub slot: u64,
    pub segment_bytes: u64,
    pub io_align: u32,
    pub created_unix_ns: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SMALL_HEADER_LEN] {
        let mut buf = [0u8; SMALL_HEADER_LEN];
        Enc::new(&mut buf)
            .u32(SEGMENT_MAGIC)
            .u16(VERSION)
            .u16(SMALL_HEADER_LEN as u16)
            .bytes(&self.wrl_uuid)
            .u32(self.wrl_id)
            .u32(self.device_index)
            .u64(self.segment_id)
            .u64(self.first_lsn)
            .u64(self.prev_hash)
            .u64(self.slot)
            .u64(self.segment_bytes)
            .u32(self.io_align)
            .u32(0)
            .u64(self.created_unix_ns)
            .zero_to(124);
        seal(&mut buf, SMALL_HEADER_LEN);
        buf
    }

    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "WRL segment header";
        check(WHAT, buf, SEGMENT_MAGIC, VERSION, SMALL_HEADER_LEN, (88, 124))?;
        let mut d = Dec::at(buf, 8);
        let h = SegmentHeader {
            wrl_uuid: d.array(),
            wrl_id: d.u32(),
            device_index: d.u32(),
            segment_id: d.u64(),
            first_lsn: d.u64(),
            prev_hash: d.u64(),
            slot: d.u64(),
            segment_bytes: d.u64(),
            io_align: d.u32(),
            created_unix_ns: {
                let _reserved = d.u32();
                d.u64()
            },
        };
        if buf[76..80].iter().any(|b| *b != 0) {
            return Err(FormatError::ReservedNotZero { what: WHAT });
        }
        validate_geometry(WHAT, h.segment_bytes, h.io_align)?;
        if h.first_lsn == 0 {
            return Err(FormatError::Invalid { what: WHAT, field: "first_lsn", value: 0 });
        }
        Ok(h)
    }
}

/// The header of one group-commit write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub segment_id: u64,
    pub first_lsn: u64,
    pub record_count: u32,
    /// Header plus records, without the padding.
    pub batch_bytes: u32,
}

impl BatchHeader {
    pub fn encode(&self) -> [u8; BATCH_HEADER_LEN] {
        let mut buf = [0u8; BATCH_HEADER_LEN];
        Enc::new(&mut buf)
            .u32(BATCH_MAGIC)
            .u16(VERSION)
            .u16(BATCH_HEADER_LEN as u16)
            .u64(self.segment_id)
            .u64(self.first_lsn)
            .u32(self.record_count)
            .u32(self.batch_bytes)
            .zero_to(60);
        seal(&mut buf, BATCH_HEADER_LEN);
        buf
    }

    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "WRL batch header";
        check(WHAT, buf, BATCH_MAGIC, VERSION, BATCH_HEADER_LEN, (32, 60))?;
        let mut d = Dec::at(buf, 8);
        let h = BatchHeader { segment_id: d.u64(), first_lsn: d.u64(), record_count: d.u32(), batch_bytes: d.u32() };
        if h.record_count == 0 || h.first_lsn == 0 || (h.batch_bytes as usize) < BATCH_HEADER_LEN {
            return Err(FormatError::Invalid { what: WHAT, field: "record_count", value: h.record_count as u64 });
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn segment_header_round_trip_and_corruption(uuid in any::<[u8;16]>(), id in any::<u64>(), lsn in 1u64.., slot in any::<u64>(), pos in 0usize..SMALL_HEADER_LEN, xor in 1u8..) {
            let h = SegmentHeader { wrl_uuid: uuid, wrl_id: 7, device_index: 1, segment_id: id, first_lsn: lsn, prev_hash: 99, slot, segment_bytes: 64 << 20, io_align: 4096, created_unix_ns: 5 };
            let mut buf = h.encode();
            prop_assert_eq!(SegmentHeader::decode(&buf).unwrap(), h);
            buf[pos] ^= xor;
            prop_assert!(SegmentHeader::decode(&buf).is_err());
        }

        #[test]
        fn batch_header_round_trip_and_corruption(id in any::<u64>(), lsn in 1u64.., n in 1u32.., bytes in 64u32.., pos in 0usize..BATCH_HEADER_LEN, xor in 1u8..) {
            let h = BatchHeader { segment_id: id, first_lsn: lsn, record_count: n, batch_bytes: bytes };
            let mut buf = h.encode();
            prop_assert_eq!(BatchHeader::decode(&buf).unwrap(), h);
            buf[pos] ^= xor;
            prop_assert!(BatchHeader::decode(&buf).is_err());
        }

        #[test]
        fn meta_and_device_round_trip(uuid in any::<[u8;16]>(), g in any::<u64>(), hwm in any::<u64>(), pos in 0usize..SMALL_HEADER_LEN, xor in 1u8..) {
            let m = MetaBlock { wrl_uuid: uuid, generation: g, nonce_hwm: hwm, trim_lsn: 3, oldest_segment_id: 4 };
            let mut buf = m.encode();
            prop_assert_eq!(MetaBlock::decode(&buf).unwrap(), m);
            buf[pos] ^= xor;
            prop_assert!(MetaBlock::decode(&buf).is_err());
            let d = DeviceHeader { wrl_uuid: uuid, wrl_id: 1, device_index: 0, device_count: 2, segment_bytes: 1 << 20, slot_count: 9, io_align: 512 };
            let mut buf = d.encode();
            prop_assert_eq!(DeviceHeader::decode(&buf).unwrap(), d);
            buf[pos] ^= xor;
            prop_assert!(DeviceHeader::decode(&buf).is_err());
        }
    }
}
