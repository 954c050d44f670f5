//! The restore's persistent state: which chunks of the target already hold their final data.
//!
//! ```text
//! STATE_DIR/state
//!   0     "DRVRSTOR"                      magic
//!   8     version u32 = 1
//!   12    chunk_bytes u32                  65536
//!   16    size u64                         the image's bytes
//!   24    volume_id u64
//!   32    seq u64                          the snapshot's position (its identity with its name)
//!   40    snapshot_len u16 | volume_len u16 | target_len u16 | reserved u16 = 0
//!   48    snapshot | volume | target       UTF-8, at most 64 + 256 + 3700 bytes
//!   4092  crc32c u32                       of bytes 0..4092
//!   4096  bitmap                           bit c (byte c/8, bit c%8) = chunk c is in the target;
//!                                          padded with zeros to a multiple of 4096
//! ```
//! All integers little-endian.
//!
//! **Writes and crash analysis.** The file is created whole under a temporary name and renamed
//! (`drv_files::replace`): a crash leaves it absent or complete. The header never changes after.
//! A bit goes from 0 to 1 only, and only after the target's chunk is durable: the restore takes a
//! copy of the bits in memory, `fdatasync`s the target, then writes the copy's bitmap and
//! `fdatasync`s this file (`Restore::persist`). So after any crash, a set bit means the target
//! holds that chunk's final data (copied from the snapshot, or written by the user and flushed).
//! A clear bit means the chunk is copied again from the snapshot on resume: it may hold copied
//! data (the same bytes again) or a user's write that was never flushed (a block device may lose
//! an unflushed write; a FLUSH persists the bits first). A torn write of the bitmap leaves each
//! sector old or new (sector writes are atomic, as every file system assumes): bits only ever go
//! 0 to 1, so any mix is a subset of the true set, and safe. The header's CRC catches a file
//! that is not this (a wrong `--state-dir`): the restore refuses it, naming what differs.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const MAGIC: &[u8; 8] = b"DRVRSTOR";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: u64 = 4096;
/// The unit of the copy and of the bitmap.
pub const CHUNK_BYTES: u32 = 64 << 10;

/// What a restore is of, and where to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub chunk_bytes: u32,
    pub size: u64,
    pub volume_id: u64,
    pub seq: u64,
    pub snapshot: String,
    pub volume: String,
    pub target: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("{0}")]
    Invalid(String),
}

impl Header {
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_bytes))
    }

    /// Bytes of the bitmap, padded.
    pub fn bitmap_bytes(&self) -> u64 {
        self.chunks().div_ceil(8).div_ceil(4096) * 4096
    }

    pub fn encode(&self) -> Result<[u8; HEADER_BYTES as usize], StateError> {
        let (s, v, t) = (self.snapshot.as_bytes(), self.volume.as_bytes(), self.target.as_bytes());
        if s.len() > 64 || v.len() > 256 || t.len() > 3700 {
            return Err(StateError::Invalid(format!("a name too long for the restore state: {}", self.target)));
        }
        let mut b = [0u8; HEADER_BYTES as usize];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.chunk_bytes.to_le_bytes());
        b[16..24].copy_from_slice(&self.size.to_le_bytes());
        b[24..32].copy_from_slice(&self.volume_id.to_le_bytes());
        b[32..40].copy_from_slice(&self.seq.to_le_bytes());
        b[40..42].copy_from_slice(&(s.len() as u16).to_le_bytes());
        b[42..44].copy_from_slice(&(v.len() as u16).to_le_bytes());
        b[44..46].copy_from_slice(&(t.len() as u16).to_le_bytes());
        let mut at = 48;
        for x in [s, v, t] {
            b[at..at + x.len()].copy_from_slice(x);
            at += x.len();
        }
        let crc = crc32c::crc32c(&b[..4092]);
        b[4092..].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    pub fn decode(b: &[u8]) -> Result<Header, StateError> {
        let bad = |m: &str| Err(StateError::Invalid(m.to_owned()));
        if b.len() < HEADER_BYTES as usize || &b[..8] != MAGIC {
            return bad("not a drv restore state (no DRVRSTOR header)");
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8"));
        let u16_at = |i: usize| usize::from(u16::from_le_bytes(b[i..i + 2].try_into().expect("2")));
        if u32_at(4092) != crc32c::crc32c(&b[..4092]) {
            return bad("the restore state's header fails its checksum");
        }
        if u32_at(8) != VERSION {
            return Err(StateError::Invalid(format!("restore state version {} (this drv reads {VERSION})", u32_at(8))));
        }
        let (sl, vl, tl) = (u16_at(40), u16_at(42), u16_at(44));
        if 48 + sl + vl + tl > 4092 || u32_at(12) == 0 {
            return bad("the restore state's header is malformed");
        }
        let text = |from: usize, len: usize| {
            String::from_utf8(b[from..from + len].to_vec())
                .map_err(|_| StateError::Invalid("a name in the restore state is not UTF-8".into()))
        };
        Ok(Header {
            chunk_bytes: u32_at(12),
            size: u64_at(16),
            volume_id: u64_at(24),
            seq: u64_at(32),
            snapshot: text(48, sl)?,
            volume: text(48 + sl, vl)?,
            target: text(48 + sl + vl, tl)?,
        })
    }
}

/// The state file, open.
pub struct StateFile {
    file: File,
    pub header: Header,
}

impl StateFile {
    /// Creates the state of a new restore (whole, or not at all).
    pub fn create(path: &Path, header: Header) -> Result<StateFile, String> {
        let mut bytes = header.encode().map_err(|e| e.to_string())?.to_vec();
        bytes.resize((HEADER_BYTES + header.bitmap_bytes()) as usize, 0);
        drv_files::replace(path, &bytes).map_err(|e| format!("create {}: {e}", path.display()))?;
        StateFile::open(path)
    }

    /// Opens an existing state: its header and bitmap.
    pub fn open(path: &Path) -> Result<StateFile, String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        let mut head = vec![0u8; HEADER_BYTES as usize];
        file.read_exact_at(&mut head, 0).map_err(|e| format!("{}: {e}", path.display()))?;
        let header = Header::decode(&head).map_err(|e| format!("{}: {e}", path.display()))?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        if len < HEADER_BYTES + header.bitmap_bytes() {
            return Err(format!("{}: the restore state is cut short ({len} bytes)", path.display()));
        }
        Ok(StateFile { file, header })
    }

    /// The bitmap, as words (bit c of word c/64).
    pub fn read_bits(&self) -> Result<Vec<u64>, String> {
        let mut b = vec![0u8; self.header.bitmap_bytes() as usize];
        self.file.read_exact_at(&mut b, HEADER_BYTES).map_err(|e| format!("read the restore bitmap: {e}"))?;
        let mut words: Vec<u64> = b.chunks(8).map(|c| u64::from_le_bytes(c.try_into().expect("8"))).collect();
        // Bits past the last chunk mean nothing.
        words.truncate(self.header.chunks().div_ceil(64) as usize);
        if let Some(last) = words.last_mut()
            && !self.header.chunks().is_multiple_of(64)
        {
            *last &= (1u64 << (self.header.chunks() % 64)) - 1;
        }
        Ok(words)
    }

    /// Writes `words` as the bitmap and makes it durable.
    pub fn write_bits(&self, words: &[u64]) -> Result<(), String> {
        let mut b: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        b.resize(self.header.bitmap_bytes() as usize, 0);
        self.file.write_all_at(&b, HEADER_BYTES).map_err(|e| format!("write the restore bitmap: {e}"))?;
        self.file.sync_data().map_err(|e| format!("sync the restore bitmap: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            chunk_bytes: CHUNK_BYTES,
            size: (5 << 20) + 4096,
            volume_id: 3,
            seq: 1234,
            snapshot: "before-upgrade".into(),
            volume: "db1".into(),
            target: "/dev/sdb".into(),
        }
    }

    #[test]
    fn header_round_trips_and_any_flipped_byte_is_refused() {
        let h = header();
        let b = h.encode().unwrap();
        assert_eq!(Header::decode(&b).unwrap(), h);
        for i in [0, 9, 20, 33, 50, 4000, 4093] {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(Header::decode(&c).is_err(), "byte {i}");
        }
    }

    #[test]
    fn bits_persist_and_the_padding_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        let s = StateFile::create(&p, header()).unwrap();
        assert_eq!(s.header.chunks(), 81);
        assert_eq!(s.read_bits().unwrap(), vec![0, 0]);
        s.write_bits(&[u64::MAX, 0b1011]).unwrap();
        let s = StateFile::open(&p).unwrap();
        assert_eq!(s.read_bits().unwrap(), vec![u64::MAX, 0b1011]);
        s.write_bits(&[u64::MAX, u64::MAX]).unwrap();
        assert_eq!(s.read_bits().unwrap(), vec![u64::MAX, (1 << 17) - 1]);
        std::fs::write(&p, b"junk").unwrap();
        assert!(StateFile::open(&p).is_err());
    }
}
