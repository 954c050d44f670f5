//! The records the eBPF programs of `capture-ebpf` share with their userspace loader
//! (`drv-blocktrace`). `no_std`, `#[repr(C)]`, explicit padding: both sides see the same bytes.
//!
//! # The event record (ring buffer `EVENTS`, 48 bytes, native endian)
//!
//! ```text
//!  0        8        16       20       24       28  29    32       36               44    48
//!  +--------+--------+--------+--------+--------+---+-----+--------+----------------+-----+
//!  | ts_ns  | sector |nr_sect |  dev   |  cpu   |knd| pad | error  |   rwbs[8]      | pad |
//!  +--------+--------+--------+--------+--------+---+-----+--------+----------------+-----+
//! ```
//! - `ts_ns`: `bpf_ktime_get_ns` (CLOCK_MONOTONIC) at the tracepoint.
//! - `sector`, `nr_sector`: the request's first 512-byte sector and length in sectors.
//! - `dev`: the kernel's device number (`major << 20 | minor`, as in the tracepoint).
//! - `kind`: [`KIND_ISSUE`] or [`KIND_COMPLETE`].
//! - `error`: the completion's status (0 on success; 0 for issue events).
//! - `rwbs`: the tracepoint's operation string (`W`, `FWS`, `R`, `D`, `N`, ...), NUL padded;
//!   decoded by the loader (`F` before the op: PREFLUSH, `F` after it: FUA, `S`: SYNC).
//!
//! The order of records in the ring buffer is the order in which the programs reserved them: a
//! total order across CPUs that needs no clock.

#![no_std]

/// A request was handed to the driver (`block:block_rq_issue`).
pub const KIND_ISSUE: u8 = 0;
/// A request completed (`block:block_rq_complete`).
pub const KIND_COMPLETE: u8 = 1;

/// Bytes of the operation string copied from the tracepoint.
pub const RWBS_BYTES: usize = 8;

/// Bytes of the ring buffer (a power of two, a multiple of the page size): 16 MiB holds ~340k
/// events, over 3 s of a fast NVMe device between two 10 ms polls.
pub const RING_BYTES: u32 = 16 << 20;

/// Most watched devices of one loader.
pub const MAX_WATCHED: usize = 8;

/// The watched devices (kernel device numbers), set at load time; `count` 0: every device.
/// It lives in the programs' read-only data (a one-entry array map the verifier knows is
/// constant): a tracer's devices are fixed when it starts, and comparing with up to
/// [`MAX_WATCHED`] constants costs less per event than a hash-map lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Watch {
    pub count: u32,
    pub devs: [u32; MAX_WATCHED],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub ts_ns: u64,
    pub sector: u64,
    pub nr_sector: u32,
    pub dev: u32,
    pub cpu: u32,
    pub kind: u8,
    pub _pad0: [u8; 3],
    pub error: i32,
    pub rwbs: [u8; RWBS_BYTES],
    pub _pad1: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<Event>() == 48);

/// Where a tracepoint's fields are in its raw record, read at load time from the tracepoint's
/// `format` file in tracefs (they moved between kernels: 6.1 has no `ioprio` before `rwbs`).
/// `error` is `u32::MAX` for tracepoints without one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    pub dev: u32,
    pub sector: u32,
    pub nr_sector: u32,
    pub rwbs: u32,
    pub error: u32,
}

/// Where the `tp_btf` programs find things in the kernel's structures, resolved from the
/// kernel's BTF at load time (`request.q->disk->{major,first_minor}`, `request.__sector`,
/// `request.__data_len`, `request.cmd_flags` and the bit numbers of its FUA, PREFLUSH and SYNC
/// flags). The programs build the same [`Event`] as the classic ones, `rwbs` included.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BtfLayout {
    pub rq_q: u32,
    pub rq_sector: u32,
    pub rq_data_len: u32,
    pub rq_cmd_flags: u32,
    pub q_disk: u32,
    pub disk_major: u32,
    pub disk_first_minor: u32,
    pub fua_bit: u32,
    pub preflush_bit: u32,
    pub sync_bit: u32,
}

/// What the programs could not deliver, per CPU (the loader sums the CPUs). Nothing here is ever
/// reset: the loader compares with what it saw last.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loss {
    /// Events of watched devices dropped because the ring buffer was full.
    pub reserve_failed: u64,
    /// The lowest first sector and highest end sector (exclusive) of the dropped events that
    /// carry data (`hi_sector` 0: none yet), per the
    /// device in `dev`; `dev` is the device of the first dropped event, `mixed` is 1 once a drop
    /// of another device happened (the loader then treats every watched device as unknown).
    pub lo_sector: u64,
    pub hi_sector: u64,
    pub dev: u32,
    pub mixed: u32,
}

const _: () = assert!(core::mem::size_of::<Loss>() == 32);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `repr(C)` integers and byte arrays with explicit padding: every bit pattern is
    // a valid value.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Layout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Loss {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BtfLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Watch {}
}
