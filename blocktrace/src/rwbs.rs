//! Decoding the block layer's operation string (`rwbs`, from `blk_fill_rwbs`): an optional `F`
//! (PREFLUSH), the operation (`W` write, `R` read, `D` discard, `DE` secure erase, `F` flush,
//! `N` anything else: write-zeroes among them), then flags (`F` FUA, `A` readahead, `S` sync,
//! `M` metadata).

use drv_ebpf_common::{Event, KIND_COMPLETE, KIND_ISSUE};

/// What a request does to the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    Read,
    Write,
    /// A flush with no data.
    Flush,
    Discard,
    SecureErase,
    /// Another operation (`N`): write-zeroes, zone operations, driver-private ones.
    Other,
}

impl Op {
    /// Whether the operation may change the device's contents. `Other` may (write-zeroes shows
    /// as `N`): a change tracker must count it as a change, never as harmless.
    pub fn changes_data(self) -> bool {
        !matches!(self, Op::Read | Op::Flush)
    }
}

/// A decoded event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub complete: bool,
    pub dev: u32,
    pub ts_ns: u64,
    pub cpu: u32,
    /// Byte offset and length on the device.
    pub offset: u64,
    pub len: u64,
    pub op: Op,
    pub preflush: bool,
    pub fua: bool,
    pub sync: bool,
    pub error: i32,
}

/// Decodes an operation string: (op, preflush, fua, sync).
pub fn decode(rwbs: &[u8]) -> (Op, bool, bool, bool) {
    let s = &rwbs[..rwbs.iter().position(|&b| b == 0).unwrap_or(rwbs.len())];
    let mut i = 0;
    let mut preflush = false;
    // `F` first is PREFLUSH unless it is the whole operation (a pure flush: "F" or "FS"...).
    if s.first() == Some(&b'F') && s.get(1).is_some_and(|c| matches!(c, b'W' | b'R' | b'D' | b'N' | b'F')) {
        preflush = true;
        i = 1;
    }
    let op = match (s.get(i), s.get(i + 1)) {
        (Some(b'W'), _) => Op::Write,
        (Some(b'R'), _) => Op::Read,
        (Some(b'D'), Some(b'E')) => {
            i += 1;
            Op::SecureErase
        }
        (Some(b'D'), _) => Op::Discard,
        (Some(b'F'), _) => Op::Flush,
        _ => Op::Other,
    };
    let flags = s.get(i + 1..).unwrap_or(&[]);
    let fua = flags.contains(&b'F');
    let sync = flags.contains(&b'S');
    (op, preflush, fua, sync)
}

impl Request {
    pub fn from_event(e: &Event) -> Request {
        let (op, preflush, fua, sync) = decode(&e.rwbs);
        debug_assert!(e.kind == KIND_ISSUE || e.kind == KIND_COMPLETE);
        Request {
            complete: e.kind == KIND_COMPLETE,
            dev: e.dev,
            ts_ns: e.ts_ns,
            cpu: e.cpu,
            offset: e.sector.saturating_mul(512),
            len: u64::from(e.nr_sector) * 512,
            op,
            preflush,
            fua,
            sync,
            error: e.error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> (Op, bool, bool, bool) {
        let mut b = [0u8; 8];
        b[..s.len()].copy_from_slice(s.as_bytes());
        decode(&b)
    }

    #[test]
    fn operation_strings_decode() {
        assert_eq!(d("W"), (Op::Write, false, false, false));
        assert_eq!(d("WS"), (Op::Write, false, false, true));
        assert_eq!(d("FWFS"), (Op::Write, true, true, true));
        assert_eq!(d("WFS"), (Op::Write, false, true, true));
        assert_eq!(d("FF"), (Op::Flush, true, false, false));
        assert_eq!(d("F"), (Op::Flush, false, false, false));
        assert_eq!(d("FS"), (Op::Flush, false, false, true));
        assert_eq!(d("RA"), (Op::Read, false, false, false));
        assert_eq!(d("DE"), (Op::SecureErase, false, false, false));
        assert_eq!(d("D"), (Op::Discard, false, false, false));
        assert_eq!(d("N"), (Op::Other, false, false, false));
        assert_eq!(d(""), (Op::Other, false, false, false));
    }

    #[test]
    fn only_reads_and_flushes_leave_data_alone() {
        assert!(!Op::Read.changes_data() && !Op::Flush.changes_data());
        for op in [Op::Write, Op::Discard, Op::SecureErase, Op::Other] {
            assert!(op.changes_data(), "{op:?}");
        }
    }
}
