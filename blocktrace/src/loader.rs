//! Loading the eBPF programs, feeding them the watched devices and reading their events.
//!
//! The consumer is not woken per event (`BPF_RB_NO_WAKEUP`): the caller polls [`Tracer::drain`]
//! every few milliseconds and takes everything queued at once, which costs far less than a wakeup
//! per write. The ring buffer holds [`drv_ebpf_common::RING_BYTES`]; a consumer that falls that
//! far behind loses events, and every loss is counted ([`Tracer::losses`]).

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::TracePoint;
use drv_ebpf_common::{Event, Layout, Loss, MAX_WATCHED, Watch};

/// The eBPF object built by `build.rs` (empty when built without the eBPF toolchain).
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/drv-capture-ebpf"));

/// The classic programs: (name in the object, tracepoint).
const CLASSIC: [(&str, &str); 2] = [("drv_rq_issue", "block_rq_issue"), ("drv_rq_complete", "block_rq_complete")];
/// The tp_btf programs: (name in the object, tracepoint).
const BTF: [(&str, &str); 2] = [("drv_btf_rq_issue", "block_rq_issue"), ("drv_btf_rq_complete", "block_rq_complete")];

/// Which programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// `tp_btf` programs reading `struct request` at offsets from the kernel's BTF.
    TpBtf,
    /// Classic tracepoint programs reading the tracepoints' records at offsets from tracefs.
    Tracepoint,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::TpBtf => "tp_btf (offsets from the kernel's BTF)",
            Mode::Tracepoint => "classic tracepoints (offsets from tracefs)",
        })
    }
}

/// The classic tracepoints' layouts from tracefs.
fn classic_layouts() -> Result<(Layout, Layout), TracerError> {
    let tracefs = tracefs()?;
    let layout = |tp: &str, with_error: bool| -> Result<Layout, TracerError> {
        let path = tracefs.join("events/block").join(tp).join("format");
        let text = std::fs::read_to_string(&path)
            .map_err(|err| TracerError::Format { path: path.display().to_string(), err })?;
        crate::layout::parse(tp, &text, with_error).map_err(|e| TracerError::Layout(e.to_string()))
    };
    Ok((layout("block_rq_issue", false)?, layout("block_rq_complete", true)?))
}

/// Loads and attaches the tp_btf programs.
fn attach_btf(ebpf: &mut aya::Ebpf) -> Result<(), TracerError> {
    let btf = aya::Btf::from_sys_fs().map_err(|e| TracerError::Layout(format!("kernel BTF: {e}")))?;
    for (name, tp) in BTF {
        let program: &mut aya::programs::BtfTracePoint = ebpf
            .program_mut(name)
            .ok_or(TracerError::Program { program: name, err: aya::programs::ProgramError::NotLoaded })?
            .try_into()
            .map_err(|err| TracerError::Program { program: name, err })?;
        program.load(tp, &btf).map_err(|err| TracerError::Program { program: name, err })?;
        program.attach().map_err(|err| TracerError::Program { program: name, err })?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    #[error("{0}")]
    NotBuiltIn(String),
    #[error(
        "tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {0} (mount -t tracefs nodev /sys/kernel/tracing)"
    )]
    NoTracefs(std::io::Error),
    #[error("read {path}: {err} (does this kernel have the block tracepoints?)")]
    Format { path: String, err: std::io::Error },
    #[error("{0}")]
    Layout(String),
    #[error("load the eBPF programs: {0} (root or CAP_BPF+CAP_PERFMON needed; `drv doctor` says more)")]
    Load(aya::EbpfError),
    #[error("eBPF program {program}: {err}")]
    Program { program: &'static str, err: aya::programs::ProgramError },
    #[error("eBPF map {map}: {message}")]
    Map { map: &'static str, message: String },
    #[error("{count} devices to trace: at most {max} at once")]
    TooManyDevices { count: usize, max: usize },
    #[error("start a thread: {0}")]
    Thread(std::io::Error),
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
    /// Of those, runs of the issue program (the rest missed completions).
    pub issue_misses: u64,
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
    loss: PerCpuArray<MapData, Loss>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    mode: Mode,
}

impl Tracer {
    /// Loads the programs and attaches them to the block tracepoints, tracing the block devices
    /// `devices` (kernel device numbers, see [`crate::block_dev_of`]; at most
    /// [`drv_ebpf_common::MAX_WATCHED`]), or every block device if it is empty.
    pub fn start(devices: &[u32]) -> Result<Tracer, TracerError> {
        crate::ebpf_built_in()?;
        if devices.len() > MAX_WATCHED {
            return Err(TracerError::TooManyDevices { count: devices.len(), max: MAX_WATCHED });
        }
        let mut watch = Watch { count: devices.len() as u32, ..Watch::default() };
        watch.devs[..devices.len()].copy_from_slice(devices);
        // tp_btf where the kernel's BTF describes `struct request`: its recursion guard is per
        // program, so a completion interrupting an issue on one CPU still runs (the classic
        // programs share one guard per CPU and lose ~80 per million runs under load, counted).
        // Classic tracepoints otherwise, or with DRV_EBPF_MODE=tracepoint.
        let forced_classic = std::env::var("DRV_EBPF_MODE").is_ok_and(|m| m == "tracepoint");
        let btf_layout = if forced_classic {
            Err("DRV_EBPF_MODE=tracepoint".to_string())
        } else {
            std::fs::read("/sys/kernel/btf/vmlinux")
                .map_err(|e| format!("/sys/kernel/btf/vmlinux: {e}"))
                .and_then(|b| crate::btf::Btf::parse(&b).and_then(|b| b.layout()).map_err(|e| e.to_string()))
        };
        let classic = classic_layouts();
        if let (Err(b), Err(c)) = (&btf_layout, &classic) {
            tracing::warn!("no kernel BTF layout: {b}");
            return Err(TracerError::Layout(c.to_string()));
        }
        raise_memlock();
        let mut loader = aya::EbpfLoader::new();
        loader.override_global("WATCHED", &watch, true);
        if let Ok(l) = &btf_layout {
            loader.override_global("BTF_LAYOUT", l, true);
        }
        if let Ok((issue, complete)) = &classic {
            loader.override_global("ISSUE_LAYOUT", issue, true);
            loader.override_global("COMPLETE_LAYOUT", complete, true);
        }
        let mut ebpf = loader.load(OBJECT).map_err(TracerError::Load)?;
        // The programs' own diagnostics (a full ring buffer) go to the log. A logger that cannot
        // start is not a reason to trace nothing.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!("eBPF program log unavailable: {e}");
                None
            }
        };
        let mode = match &btf_layout {
            Ok(_) => match attach_btf(&mut ebpf) {
                Ok(()) => Mode::TpBtf,
                Err(e) if classic.is_ok() => {
                    tracing::warn!("tp_btf programs did not load ({e}); using the classic tracepoints");
                    Mode::Tracepoint
                }
                Err(e) => return Err(e),
            },
            Err(why) => {
                tracing::info!("classic tracepoints: {why}");
                Mode::Tracepoint
            }
        };
        if mode == Mode::Tracepoint {
            classic?;
            for (name, tp) in CLASSIC {
                let program: &mut TracePoint = ebpf
                    .program_mut(name)
                    .ok_or(TracerError::Program { program: name, err: aya::programs::ProgramError::NotLoaded })?
                    .try_into()
                    .map_err(|err| TracerError::Program { program: name, err })?;
                program.load().map_err(|err| TracerError::Program { program: name, err })?;
                program.attach("block", tp).map_err(|err| TracerError::Program { program: name, err })?;
            }
        }
        let map_err =
            |map: &'static str| move |e: aya::maps::MapError| TracerError::Map { map, message: e.to_string() };
        let take = |ebpf: &mut aya::Ebpf, map: &'static str| {
            ebpf.take_map(map).ok_or(TracerError::Map { map, message: "not in the object".into() })
        };
        let events = RingBuf::try_from(take(&mut ebpf, "EVENTS")?).map_err(map_err("EVENTS"))?;
        let loss = PerCpuArray::try_from(take(&mut ebpf, "LOSS")?).map_err(map_err("LOSS"))?;
        Ok(Tracer { ebpf, events, loss, logger, mode })
    }

    /// Which programs run.
    pub fn mode(&self) -> Mode {
        self.mode
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
        let programs = if self.mode == Mode::TpBtf { BTF } else { CLASSIC };
        r.issue_misses = self.recursion_misses(programs[0].0);
        r.recursion_misses = r.issue_misses + self.recursion_misses(programs[1].0);
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
