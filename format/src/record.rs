//! The WRL record: a 96-byte header (see `docs/formats.md`, "Record") followed by the encrypted
//! payload. The header is the unit of the hash chain; bytes 24..80 and 88..92 (the write
//! descriptor and its capture time) are the AEAD associated data.

use crate::FormatError;
use crate::codec::{Dec, Enc, check, seal};

pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"DRVR");
pub const RECORD_VERSION: u16 = 1;
pub const RECORD_HEADER_LEN: usize = 96;
/// Largest plaintext of one write record.
pub const MAX_WRITE_BYTES: u32 = 4 << 20;
/// Bytes of the AES-GCM tag appended to every payload.
pub const TAG_LEN: usize = 16;
/// Byte range of the write descriptor inside the header (the AEAD associated data).
pub const DESC_RANGE: std::ops::Range<usize> = 24..80;

/// Write flags carried by every record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(pub u32);

impl Flags {
    /// A cache flush: every earlier write of the volume is stable before it completes.
    pub const FLUSH: Flags = Flags(1);
    /// Force unit access: this write is stable when it completes.
    pub const FUA: Flags = Flags(2);
    /// An unordered resync write (change-map or initial sync), not part of the epoch order.
    pub const RESYNC: Flags = Flags(4);
    /// The last record of its epoch: the agent had no write in flight after it, so every write of
    /// the epoch is logged and the replica may apply the epoch without waiting for a later one.
    /// Sent as a zero-length write when the volume goes idle.
    pub const EPOCH_END: Flags = Flags(8);
    /// Written by the log itself, never by an agent: a volume's last sequence and epoch again
    /// (`volume_seq`, `epoch`; length 0, a payload of 16 zero bytes that is no tag), appended before
    /// the segment holding the volume's last record is freed, so that its position survives the
    /// trim. Never relayed, applied or decrypted.
    pub const CHECKPOINT: Flags = Flags(16);
    /// With `RESYNC`: the first record of a run that ships every block of the volume (an initial
    /// sync, begun after every block was marked). Every block has a record at this sequence or
    /// later in the run, so a replica that lacks the records before it (added after staging
    /// trimmed them) may start from here: once the run is applied it holds the whole volume.
    pub const FULL: Flags = Flags(32);
    /// The flags an agent may send.
    pub const AGENT: Flags = Flags(47);
    pub const ALL: Flags = Flags(63);

    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn is_valid(self) -> bool {
        self.0 & !Self::ALL.0 == 0
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

impl std::fmt::Display for Flags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names = Vec::new();
        for (flag, name) in [
            (Flags::FLUSH, "FLUSH"),
            (Flags::FUA, "FUA"),
            (Flags::RESYNC, "RESYNC"),
            (Flags::EPOCH_END, "EPOCH_END"),
            (Flags::CHECKPOINT, "CHECKPOINT"),
            (Flags::FULL, "FULL"),
        ] {
            if self.contains(flag) {
                names.push(name);
            }
        }
        if names.is_empty() { f.write_str("-") } else { f.write_str(&names.join("|")) }
    }
}

/// The wall clock now, as a record's capture time (whole seconds since the UNIX epoch; a clock
/// before 1970 reads as 0, unknown, and one past 2106 as the largest time).
pub fn capture_clock() -> u32 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// What the agent wrote, plus the encryption envelope's key and nonce: the part of a record that
/// travels end to end and is authenticated by AES-GCM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteDesc {
    pub volume_id: u64,
    pub volume_seq: u64,
    pub epoch: u64,
    /// Byte offset on the volume.
    pub offset: u64,
    /// Plaintext bytes.
    pub length: u32,
    pub flags: Flags,
    pub key_id: u32,
    pub nonce: [u8; 12],
    /// The agent's clock when it captured the write: whole seconds since the UNIX epoch (0:
    /// unknown, e.g. a record of the log itself). Header bytes 88..92.
    pub capture_unix: u32,
}

impl WriteDesc {
    /// The AEAD associated data: header bytes 24..80 then 88..92 (the capture time).
    pub fn aad(&self) -> [u8; 60] {
        let mut out = [0u8; 60];
        out[..56].copy_from_slice(&self.header_bytes());
        out[56..].copy_from_slice(&self.capture_unix.to_le_bytes());
        out
    }

    /// Header bytes 24..80.
    fn header_bytes(&self) -> [u8; 56] {
        let mut out = [0u8; 56];
        let mut e = Enc::new(&mut out);
        e.u64(self.volume_id)
            .u64(self.volume_seq)
            .u64(self.epoch)
            .u64(self.offset)
            .u32(self.length)
            .u32(self.flags.0)
            .u32(self.key_id)
            .bytes(&self.nonce);
        debug_assert_eq!(e.pos(), 56);
        out
    }
}

/// A decoded record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Log sequence number inside the WRL (1, 2, 3, ... no gaps).
    pub lsn: u64,
    /// `xxh3_64` of the previous record's header bytes (the hash chain).
    pub prev_hash: u64,
    pub desc: WriteDesc,
    /// Stored payload bytes: `desc.length + TAG_LEN`.
    pub stored_len: u32,
    /// CRC-32C of the stored payload (ciphertext and tag).
    pub payload_crc: u32,
}

impl RecordHeader {
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        assert_eq!(self.stored_len as usize, self.desc.length as usize + TAG_LEN, "stored_len invariant");
        let mut buf = [0u8; RECORD_HEADER_LEN];
        let mut e = Enc::new(&mut buf);
        e.u32(RECORD_MAGIC)
            .u16(RECORD_VERSION)
            .u16(RECORD_HEADER_LEN as u16)
            .u64(self.lsn)
            .u64(self.prev_hash)
            .bytes(&self.desc.header_bytes())
            .u32(self.stored_len)
            .u32(self.payload_crc)
            .u32(self.desc.capture_unix);
        seal(&mut buf, RECORD_HEADER_LEN);
        buf
    }

    /// Decodes and checks a header: frame, checksum, flags and lengths. The payload is checked
    /// separately ([`RecordHeader::check_payload`]) because it may not have been read yet.
    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "record header";
        check(WHAT, buf, RECORD_MAGIC, RECORD_VERSION, RECORD_HEADER_LEN, (92, 92))?;
        let mut d = Dec::at(buf, 8);
        let lsn = d.u64();
        let prev_hash = d.u64();
        let desc = WriteDesc {
            volume_id: d.u64(),
            volume_seq: d.u64(),
            epoch: d.u64(),
            offset: d.u64(),
            length: d.u32(),
            flags: Flags(d.u32()),
            key_id: d.u32(),
            nonce: d.array(),
            capture_unix: 0,
        };
        let stored_len = d.u32();
        let payload_crc = d.u32();
        let desc = WriteDesc { capture_unix: d.u32(), ..desc };
        if !desc.flags.is_valid() {
            return Err(FormatError::Invalid { what: WHAT, field: "flags", value: desc.flags.0 as u64 });
        }
        if desc.length > MAX_WRITE_BYTES {
            return Err(FormatError::Invalid { what: WHAT, field: "length", value: desc.length as u64 });
        }
        if stored_len as usize != desc.length as usize + TAG_LEN {
            return Err(FormatError::Invalid { what: WHAT, field: "stored_len", value: stored_len as u64 });
        }
        if lsn == 0 {
            return Err(FormatError::Invalid { what: WHAT, field: "lsn", value: 0 });
        }
        desc.offset.checked_add(desc.length as u64).ok_or(FormatError::Invalid {
            what: WHAT,
            field: "offset",
            value: desc.offset,
        })?;
        Ok(RecordHeader { lsn, prev_hash, desc, stored_len, payload_crc })
    }

    /// Checks a stored payload against the header's length and checksum.
    pub fn check_payload(&self, payload: &[u8]) -> Result<(), FormatError> {
        if payload.len() != self.stored_len as usize {
            return Err(FormatError::Truncated {
                what: "record payload",
                need: self.stored_len as usize,
                have: payload.len(),
            });
        }
        let computed = crate::crc32c(payload);
        if computed != self.payload_crc {
            return Err(FormatError::Checksum { what: "record payload", stored: self.payload_crc, computed });
        }
        Ok(())
    }

    /// Total bytes of header and payload.
    pub fn record_len(&self) -> usize {
        RECORD_HEADER_LEN + self.stored_len as usize
    }
}

/// The chain value of a record: `xxh3_64` over its encoded header.
pub fn chain_hash(header: &[u8; RECORD_HEADER_LEN]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(header)
}

/// The chain value that precedes LSN 1 of a WRL.
pub fn chain_seed(wrl_uuid: &[u8; 16]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(wrl_uuid)
}

/// Decodes one whole record (header and payload) from the front of `buf`, checking both
/// checksums. Returns the header and the stored payload. This is the decoder the fuzz target drives.
pub fn decode_record(buf: &[u8]) -> Result<(RecordHeader, &[u8]), FormatError> {
    let header = RecordHeader::decode(buf)?;
    let end = header.record_len();
    if buf.len() < end {
        return Err(FormatError::Truncated { what: "record payload", need: end, have: buf.len() });
    }
    let payload = &buf[RECORD_HEADER_LEN..end];
    header.check_payload(payload)?;
    Ok((header, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_header() -> impl Strategy<Value = (RecordHeader, Vec<u8>)> {
        (
            1u64..u64::MAX,
            any::<u64>(),
            any::<(u64, u64, u64)>(),
            0u64..(u64::MAX / 2),
            0usize..300,
            0u32..8,
            any::<u32>(),
            any::<[u8; 12]>(),
        )
            .prop_map(|(lsn, prev_hash, (volume_id, volume_seq, epoch), offset, len, flags, key_id, nonce)| {
                let payload: Vec<u8> = (0..len + TAG_LEN).map(|i| (i as u8).wrapping_mul(31) ^ lsn as u8).collect();
                let header = RecordHeader {
                    lsn,
                    prev_hash,
                    desc: WriteDesc {
                        volume_id,
                        volume_seq,
                        epoch,
                        offset,
                        length: len as u32,
                        flags: Flags(flags),
                        key_id,
                        nonce,
                        capture_unix: (lsn as u32).rotate_left(7),
                    },
                    stored_len: (len + TAG_LEN) as u32,
                    payload_crc: crate::crc32c(&payload),
                };
                (header, payload)
            })
    }

    proptest! {
        #[test]
        fn round_trip((header, payload) in arb_header()) {
            let mut buf = header.encode().to_vec();
            buf.extend_from_slice(&payload);
            let (decoded, p) = decode_record(&buf).unwrap();
            prop_assert_eq!(decoded, header);
            prop_assert_eq!(p, &payload[..]);
        }

        #[test]
        fn any_single_byte_change_is_detected((header, payload) in arb_header(), pos in any::<prop::sample::Index>(), xor in 1u8..=255) {
            let mut buf = header.encode().to_vec();
            buf.extend_from_slice(&payload);
            let i = pos.index(buf.len());
            buf[i] ^= xor;
            prop_assert!(decode_record(&buf).is_err(), "corruption at byte {} not detected", i);
        }

        #[test]
        fn decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_record(&bytes);
        }
    }

    #[test]
    fn flags_display() {
        assert_eq!((Flags::FLUSH | Flags::FUA).to_string(), "FLUSH|FUA");
        assert_eq!(Flags::default().to_string(), "-");
    }
}
