//! Block tracepoint programs (`capture-ebpf/`) from userspace: load and attach them
//! ([`Tracer`]), decode their events ([`Op`], [`Request`]), and turn the event stream into
//! telemetry ([`stats`]), tracked changes ([`track`], and the tracker with its cuts:
//! [`tracking`]) and the cross-check of a capture path's epochs against the kernel's order
//! ([`crosscheck`]).
//!
//! The kernel side is built into this crate by `build.rs` when the eBPF toolchain is present;
//! [`ebpf_built_in`] says whether it was and why not.
//!
//! Everything but [`loader`], [`tracking`] and the thread of [`crosscheck::OrderCheck`] is I/O-free and
//! unit-tested with synthetic event streams.

pub mod btf;
pub mod crosscheck;
pub mod layout;
pub mod loader;
pub mod order;
pub mod rwbs;
pub mod stats;
pub mod track;
pub mod tracking;

pub use drv_ebpf_common::{Event, KIND_COMPLETE, KIND_ISSUE};
pub use loader::{LossReport, Mode, Tracer, TracerError};
pub use rwbs::{Op, Request};

/// `Ok` if the eBPF programs are built into this binary, else why not.
pub fn ebpf_built_in() -> Result<(), TracerError> {
    let why = env!("DRV_EBPF_MISSING");
    if loader::OBJECT.is_empty() {
        Err(TracerError::NotBuiltIn(format!(
            "this drv was built without eBPF support: {}",
            if why.is_empty() { "the eBPF object is empty" } else { why }
        )))
    } else {
        Ok(())
    }
}

/// The kernel's encoding of a device number in the block tracepoints (`MKDEV`: major in the high
/// 12 bits, minor in the low 20), from userspace's `st_rdev`.
pub fn kernel_dev(rdev: u64) -> u32 {
    let major = libc::major(rdev as libc::dev_t);
    let minor = libc::minor(rdev as libc::dev_t);
    (major << 20) | (minor & 0xfffff)
}

/// `major:minor` of a kernel device number.
pub fn dev_name(dev: u32) -> String {
    format!("{}:{}", dev >> 20, dev & 0xfffff)
}

/// The kernel device number of block device `path`.
pub fn block_dev_of(path: &std::path::Path) -> std::io::Result<u32> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(path)?;
    if !m.file_type().is_block_device() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a block device", path.display()),
        ));
    }
    Ok(kernel_dev(m.rdev()))
}
