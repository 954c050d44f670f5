//! Loading the eBPF programs, feeding them the watched devices and reading their events.
//!
//! The consumer is not woken per event (`BPF_RB_NO_WAKEUP`): the caller polls [`Tracer::drain`]
//! every few milliseconds and takes everything queued at once, which costs far less than a wakeup
//! per write. The ring buffer holds [`drv_ebpf_common::RING_BYTES`]; a consumer that falls that
//! far behind loses events, and every loss is counted ([`Tracer::losses`]).

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::TracePoint;
use drv_ebpf_common::{Event, Layout, Loss};

/// The eBPF object built by `build.rs` (empty when built without the eBPF toolchain).
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/drv-capture-ebpf"));

/// The two programs: (name in the object, tracepoint).
const PROGRAMS: [(&str, &str); 2] = [("drv_rq_issue", "block_rq_issue"), ("drv_rq_complete", "block_rq_complete")];

#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    #[error("{0}")]
    NotBuiltIn(String),
    #[error(
        "tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {0} (mount -t tracefs nodev /sys/kernel/tracing)"
    )]
    NoTracefs(std::io::Error),
    #[error("read {path}: {source} (does this kernel have the block tracepoints?)")]
    Format { path: String, source: std::io::Error },
    #[error(transparent)]
    Layout(#[from] crate::layout::LayoutError),
    #[error("load the eBPF programs: {0} (root or CAP_BPF+CAP_PERFMON needed; `drv doctor` says more)")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {program}: {source}")]
    Program { program: &'static str, source: aya::programs::ProgramError },
    #[error("eBPF map {map}: {message}")]
    Map { map: &'static str, message: String },
    #[error("watch {dev}: at most {max} devices")]
    TooManyDevices { dev: String, max: u32 },
}

/// Everything the programs and the kernel report as not delivered, since the programs loaded.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LossReport {
    /// Events of watched devices dropped because the ring buffer was full.
    pub reserve_failed: u64,
    /// The byte ranges of those events, per device: (device, first byte, end byte). A superset of
    /// what was dropped.
    pub lost_ranges: Vec<(u32, u64, u64)>,
    /// Drops of more than one device happened on one CPU: the ranges above cover only the first
    /// device, every watched device must be treated as unknown.
    pub mixed_devices: bool,
    /// Program runs the kernel skipped (its per-CPU recursion guard: another eBPF program was
    /// running on that CPU). Their requests are unknown: neither device nor range.
    pub recursion_misses: u64,
}

impl LossReport {
    /// Events whose content is unknown (dropped or never produced).
    pub fn total(&self) -> u64 {
        self.reserve_failed + self.recursion_misses
    }
}

/// The loaded and attached programs.
pub struct Tracer {
    ebpf: aya::Ebpf,
    events: RingBuf<MapData>,
    watch: HashMap<MapData, u32, u32>,
    loss: PerCpuArray<MapData, Loss>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Tracer {
    /// Loads the programs and attaches them to the block tracepoints. With `watch_all`, every
    /// block device is traced; otherwise only those given to [`Tracer::watch`].
    pub fn start(watch_all: bool) -> Result<Tracer, TracerError> {
        crate::ebpf_built_in().map_err(TracerError::NotBuiltIn)?;
        let tracefs = tracefs()?;
        let layout = |tp: &str, with_error: bool| -> Result<Layout, TracerError> {
            let path = tracefs.join("events/block").join(tp).join("format");
            let text = std::fs::read_to_string(&path)
                .map_err(|source| TracerError::Format { path: path.display().to_string(), source })?;
            let mut l = crate::layout::parse(tp, &text, with_error)?;
            l.watch_all = u32::from(watch_all);
            Ok(l)
        };
        let (issue, complete) = (layout("block_rq_issue", false)?, layout("block_rq_complete", true)?);
        raise_memlock();
        let mut ebpf = aya::EbpfLoader::new()
            .override_global("ISSUE_LAYOUT", &issue, true)
            .override_global("COMPLETE_LAYOUT", &complete, true)
            .load(OBJECT)
            .map_err(TracerError::Load)?;
        // The programs' own diagnostics (a full ring buffer) go to the log. A logger that cannot
        // start is not a reason to trace nothing.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!("eBPF program log unavailable: {e}");
                None
            }
        };
        for (name, tp) in PROGRAMS {
            let program: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or(TracerError::Program { program: name, source: aya::programs::ProgramError::NotLoaded })?
                .try_into()
                .map_err(|source| TracerError::Program { program: name, source })?;
            program.load().map_err(|source| TracerError::Program { program: name, source })?;
            program.attach("block", tp).map_err(|source| TracerError::Program { program: name, source })?;
        }
        let map_err =
            |map: &'static str| move |e: aya::maps::MapError| TracerError::Map { map, message: e.to_string() };
        let take = |ebpf: &mut aya::Ebpf, map: &'static str| {
            ebpf.take_map(map).ok_or(TracerError::Map { map, message: "not in the object".into() })
        };
        let events = RingBuf::try_from(take(&mut ebpf, "EVENTS")?).map_err(map_err("EVENTS"))?;
        let watch = HashMap::try_from(take(&mut ebpf, "WATCH")?).map_err(map_err("WATCH"))?;
        let loss = PerCpuArray::try_from(take(&mut ebpf, "LOSS")?).map_err(map_err("LOSS"))?;
        Ok(Tracer { ebpf, events, watch, loss, logger })
    }

    /// Traces device `dev` (a kernel device number, see [`crate::block_dev_of`]) from now on.
    pub fn watch(&mut self, dev: u32) -> Result<(), TracerError> {
        self.watch.insert(dev, 1, 0).map_err(|e| match e {
            aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG) => {
                TracerError::TooManyDevices { dev: crate::dev_name(dev), max: drv_ebpf_common::MAX_WATCHED }
            }
            e => TracerError::Map { map: "WATCH", message: e.to_string() },
        })
    }

    /// Stops tracing `dev`.
    pub fn unwatch(&mut self, dev: u32) -> Result<(), TracerError> {
        match self.watch.remove(&dev) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(TracerError::Map { map: "WATCH", message: e.to_string() }),
        }
    }

    /// Hands every queued event to `f`, in ring-buffer order, and returns how many there were.
    /// Also forwards the programs' log messages.
    pub fn drain(&mut self, mut f: impl FnMut(&Event)) -> usize {
        let mut n = 0;
        while let Some(item) = self.events.next() {
            let bytes: &[u8] = &item;
            assert_eq!(bytes.len(), std::mem::size_of::<Event>(), "event record size");
            // SAFETY: the record is an `Event` written by the program (same `repr(C)` type); the
            // ring buffer aligns records to 8 bytes, and read_unaligned needs no alignment anyway.
            let e: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            f(&e);
            n += 1;
        }
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
        n
    }

    /// What was lost since the programs loaded.
    pub fn losses(&self) -> Result<LossReport, TracerError> {
        let per_cpu = self.loss.get(&0, 0).map_err(|e| TracerError::Map { map: "LOSS", message: e.to_string() })?;
        let mut r = LossReport::default();
        let mut ranges: std::collections::BTreeMap<u32, (u64, u64)> = Default::default();
        for l in per_cpu.iter() {
            r.reserve_failed += l.reserve_failed;
            r.mixed_devices |= l.mixed != 0;
            if l.hi_sector == 0 {
                continue; // no dropped event carried data
            }
            let e = ranges.entry(l.dev).or_insert((u64::MAX, 0));
            e.0 = e.0.min(l.lo_sector.saturating_mul(512));
            e.1 = e.1.max(l.hi_sector.saturating_mul(512));
        }
        r.lost_ranges = ranges.into_iter().map(|(d, (lo, hi))| (d, lo, hi)).collect();
        for (name, _) in PROGRAMS {
            r.recursion_misses += self.recursion_misses(name);
        }
        Ok(r)
    }

    /// The kernel's count of skipped runs of program `name` (`recursion_misses` in the fdinfo of
    /// its file descriptor; kernel 5.12 and later, 0 before).
    fn recursion_misses(&self, name: &str) -> u64 {
        let Some(fd) = self.ebpf.program(name).and_then(|p| p.fd().ok()) else { return 0 };
        let raw = fd.as_fd().as_raw_fd();
        let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}")).unwrap_or_default();
        text.lines().find_map(|l| l.strip_prefix("recursion_misses:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    }
}

/// The tracefs mount point, mounting it if needed.
pub fn tracefs() -> Result<PathBuf, TracerError> {
    for p in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(p).join("events/block").exists() {
            return Ok(PathBuf::from(p));
        }
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: constant NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(c"nodev".as_ptr(), target.as_ptr(), c"tracefs".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(TracerError::NoTracefs(std::io::Error::last_os_error()));
    }
    Ok(PathBuf::from("/sys/kernel/tracing"))
}

/// Kernels before 5.11 charge eBPF maps to RLIMIT_MEMLOCK; later ones to the memory cgroup.
fn raise_memlock() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("setrlimit(RLIMIT_MEMLOCK): {}", std::io::Error::last_os_error());
    }
}
