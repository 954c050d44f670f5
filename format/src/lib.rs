//! On-disk and wire formats of drv: WRL device/meta/segment/batch headers, log records and the
//! AES-256-GCM payload envelope.
//!
//! Everything here is pure: functions over byte slices, no I/O. The byte diagrams, versioning rules
//! and the crash analysis are in `docs/formats.md`; keep the two in step.

#![forbid(unsafe_code)]

mod codec;
pub mod crypto;
pub mod frame;
pub mod layout;
pub mod record;

pub use crypto::{KeyError, VolumeKey, nonce};
pub use layout::{BatchHeader, DeviceHeader, MetaBlock, SegmentHeader};
pub use record::{Flags, RecordHeader, WriteDesc};

/// A structure read from disk or the network that is not what it claims to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Fewer bytes than the structure needs.
    #[error("{what}: truncated: need {need} bytes, have {have}")]
    Truncated { what: &'static str, need: usize, have: usize },
    /// The magic number is not the structure's.
    #[error("{what}: bad magic {found:#010x}")]
    BadMagic { what: &'static str, found: u32 },
    /// A version this build does not understand.
    #[error("{what}: unsupported version {found} (this build reads version {supported})")]
    BadVersion { what: &'static str, found: u16, supported: u16 },
    /// The length field does not match the structure.
    #[error("{what}: bad length field {found} (expected {expected})")]
    BadLength { what: &'static str, found: u64, expected: u64 },
    /// The stored checksum does not match the bytes.
    #[error("{what}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { what: &'static str, stored: u32, computed: u32 },
    /// Bytes that must be zero are not.
    #[error("{what}: reserved bytes are not zero")]
    ReservedNotZero { what: &'static str },
    /// A field holds a value outside its allowed range.
    #[error("{what}: invalid {field}: {value}")]
    Invalid { what: &'static str, field: &'static str, value: u64 },
}

/// CRC-32C (Castagnoli), the checksum of every drv structure.
#[inline]
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Rounds `value` up to a multiple of `align` (a power of two).
#[inline]
pub fn align_up(value: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    (value + align - 1) & !(align - 1)
}

/// Deterministic pseudo-random bytes (xorshift) for demos, benchmarks and tests, so any reader can
/// check a payload from its seed alone.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
