//! Little-endian field encoding shared by every fixed-size structure, and the common
//! "magic, version, length ... crc32c" frame check.

use crate::FormatError;

pub(crate) struct Enc<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Enc<'a> {
    pub(crate) fn new(buf: &'a mut [u8]) -> Self {
        Enc { buf, pos: 0 }
    }
    pub(crate) fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf[self.pos..self.pos + v.len()].copy_from_slice(v);
        self.pos += v.len();
        self
    }
    /// Zero-fills up to `offset` (reserved bytes).
    pub(crate) fn zero_to(&mut self, offset: usize) -> &mut Self {
        assert!(offset >= self.pos, "encoder moved backwards");
        self.buf[self.pos..offset].fill(0);
        self.pos = offset;
        self
    }
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }
}

pub(crate) struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Dec { buf, pos: 0 }
    }
    pub(crate) fn at(buf: &'a [u8], pos: usize) -> Self {
        Dec { buf, pos }
    }
    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    pub(crate) fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
    pub(crate) fn array<const N: usize>(&mut self) -> [u8; N] {
        let out: [u8; N] = self.buf[self.pos..self.pos + N].try_into().expect("length checked by caller");
        self.pos += N;
        out
    }
}

/// Writes the CRC-32C of `buf[..len-4]` into the last four bytes of `buf[..len]`.
pub(crate) fn seal(buf: &mut [u8], len: usize) {
    let crc = crate::crc32c(&buf[..len - 4]);
    buf[len - 4..len].copy_from_slice(&crc.to_le_bytes());
}

/// Checks the common frame of a fixed-size structure of `len` bytes: enough bytes, magic,
/// version, length field, crc32c and that `buf[reserved.0..reserved.1]` is zero.
pub(crate) fn check(
    what: &'static str,
    buf: &[u8],
    magic: u32,
    version: u16,
    len: usize,
    reserved: (usize, usize),
) -> Result<(), FormatError> {
    if buf.len() < len {
        return Err(FormatError::Truncated { what, need: len, have: buf.len() });
    }
    let mut d = Dec::new(buf);
    let found = d.u32();
    if found != magic {
        return Err(FormatError::BadMagic { what, found });
    }
    let ver = d.u16();
    let l = d.u16();
    // Checksum before the version and length: a torn or random block should read as a
    // checksum failure, not as "unsupported version".
    let stored = u32::from_le_bytes(buf[len - 4..len].try_into().expect("4 bytes"));
    let computed = crate::crc32c(&buf[..len - 4]);
    if stored != computed {
        return Err(FormatError::Checksum { what, stored, computed });
    }
    if ver != version {
        return Err(FormatError::BadVersion { what, found: ver, supported: version });
    }
    if l as usize != len {
        return Err(FormatError::BadLength { what, found: l as u64, expected: len as u64 });
    }
    if buf[reserved.0..reserved.1].iter().any(|b| *b != 0) {
        return Err(FormatError::ReservedNotZero { what });
    }
    Ok(())
}
