//! A snapshot's body: everything the configuration store holds (`drv_config::Tables`), framed so
//! that a damaged or foreign body is refused before anything is replaced.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "DRVCSNAP"
//!      8     4  format = 1 (u32 LE)
//!     12     8  json_len (u64 LE): the bytes of JSON that follow
//!     20     n  JSON of drv_config::Tables
//!   20+n     8  xxh3-64 of the JSON (u64 LE)
//! ```
//!
//! [`decode`] checks the magic, the format, the length (the body is exactly 28 + n bytes) and the
//! checksum, then decodes the JSON whole; only then does the state machine touch a table.

use drv_config::Tables;

const MAGIC: &[u8; 8] = b"DRVCSNAP";
const FORMAT: u32 = 1;
const HEAD: usize = 20;
const TAIL: usize = 8;

/// Why a snapshot body was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("not a configuration snapshot (no DRVCSNAP magic)")]
    Magic,
    #[error("configuration snapshot format {0}, this server reads format {FORMAT}")]
    Format(u32),
    #[error("configuration snapshot of {actual} bytes, its header says {declared} bytes of JSON")]
    Length { declared: u64, actual: usize },
    #[error("configuration snapshot damaged: checksum {actual:016x}, expected {expected:016x}")]
    Checksum { expected: u64, actual: u64 },
    #[error("configuration snapshot: {0}")]
    Json(String),
}

/// The body of a snapshot of `t`.
pub fn encode(t: &Tables) -> Vec<u8> {
    let json = serde_json::to_vec(t).expect("JSON of the tables");
    let mut out = Vec::with_capacity(HEAD + json.len() + TAIL);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&json).to_le_bytes());
    out
}

/// The tables of a snapshot body, checked whole.
pub fn decode(b: &[u8]) -> Result<Tables, SnapshotError> {
    if b.len() < HEAD + TAIL || &b[..8] != MAGIC {
        return Err(SnapshotError::Magic);
    }
    let format = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
    if format != FORMAT {
        return Err(SnapshotError::Format(format));
    }
    let declared = u64::from_le_bytes(b[12..20].try_into().expect("8 bytes"));
    if declared.checked_add((HEAD + TAIL) as u64) != Some(b.len() as u64) {
        return Err(SnapshotError::Length { declared, actual: b.len() });
    }
    let json = &b[HEAD..b.len() - TAIL];
    let expected = u64::from_le_bytes(b[b.len() - TAIL..].try_into().expect("8 bytes"));
    let actual = xxhash_rust::xxh3::xxh3_64(json);
    if actual != expected {
        return Err(SnapshotError::Checksum { expected, actual });
    }
    serde_json::from_slice(json).map_err(|e| SnapshotError::Json(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> Tables {
        let mut t = Tables::default();
        t.counters.insert("config_version".into(), 7);
        t.entry_versions.insert("key/k1".into(), 7);
        t.entries.entry("key".into()).or_default().insert("k1".into(), serde_json::json!({"path": "/k"}));
        t
    }

    #[test]
    fn a_body_round_trips_and_every_damage_is_named() {
        let t = tables();
        let b = encode(&t);
        assert_eq!(decode(&b).unwrap(), t);
        let mut x = b.clone();
        x[0] ^= 1;
        assert_eq!(decode(&x), Err(SnapshotError::Magic));
        assert_eq!(decode(&b[..10]), Err(SnapshotError::Magic));
        let mut x = b.clone();
        x[8] = 2;
        assert_eq!(decode(&x), Err(SnapshotError::Format(2)));
        assert!(matches!(decode(&b[..b.len() - 1]), Err(SnapshotError::Length { .. })));
        let mut x = b.clone();
        x[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode(&x), Err(SnapshotError::Length { declared: u64::MAX, .. })));
        let mut x = b.clone();
        x[HEAD + 3] ^= 0x20;
        assert!(matches!(decode(&x), Err(SnapshotError::Checksum { .. })));
        // A checksum that matches JSON that is not the tables.
        let json = b"{\"entries\": 5}";
        let mut x = MAGIC.to_vec();
        x.extend_from_slice(&FORMAT.to_le_bytes());
        x.extend_from_slice(&(json.len() as u64).to_le_bytes());
        x.extend_from_slice(json);
        x.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(json).to_le_bytes());
        assert!(matches!(decode(&x), Err(SnapshotError::Json(_))), "{:?}", decode(&x));
    }
}
