//! `drv trace` (live block telemetry from the eBPF programs) and `drv doctor` (which capture
//! paths this host can run, and why not).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use drv_blocktrace::{Request, Tracer, stats::Stats};

/// Set by SIGINT/SIGTERM: the loops finish their last window and exit.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set [`STOP`] (a clean end: last window, losses, exit 0).
pub fn stop_on_signals() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

pub fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// How often the ring buffer is drained (the programs never wake the consumer).
pub const POLL: Duration = Duration::from_millis(10);

/// `drv trace [DEVICE|VOLUME]...`
#[derive(Args)]
pub struct TraceArgs {
    /// Block devices (paths) or volumes (their agent's device, from the state directory); none:
    /// every block device.
    targets: Vec<String>,
    /// One JSON object per device and second (and per event with --events) instead of the table.
    #[arg(long)]
    json: bool,
    /// Print every request as it is issued and completed, each write issue with the epoch the
    /// kernel's order gives it (partial write order: writes in flight together share one).
    #[arg(long)]
    events: bool,
    /// Print the latency histogram (log2 microseconds) after each second's line.
    #[arg(long)]
    histogram: bool,
    /// Stop after this many seconds (default: until interrupted).
    #[arg(long)]
    seconds: Option<f64>,
    /// Seconds per line.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Also write the figures in Prometheus text format to this file every interval (for
    /// node_exporter's textfile collector); replaced atomically.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Where agents keep their state (a volume's device is in VOLUME/device there).
    #[arg(long, default_value = "/var/lib/drv/agent")]
    state_root: PathBuf,
}

/// The block device of a `drv trace` target: a path, or a volume whose agent recorded its device.
fn resolve(target: &str, state_root: &Path) -> Result<PathBuf> {
    let p = Path::new(target);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    let rec = state_root.join(target).join("device");
    match std::fs::read_to_string(&rec) {
        Ok(s) => Ok(PathBuf::from(s.trim())),
        Err(_) => {
            bail!("{target:?} is neither a block device nor a volume with an attached agent (no {})", rec.display())
        }
    }
}

/// Records which device an agent or tracker serves for `drv trace VOLUME`.
pub fn record_device(state: &Path, device: &Path) -> Result<()> {
    std::fs::create_dir_all(state).with_context(|| format!("create {}", state.display()))?;
    let dev = std::fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf());
    std::fs::write(state.join("device"), format!("{}\n", dev.display()))
        .with_context(|| format!("write {}", state.join("device").display()))
}

use drv_blocktrace::crosscheck::monotonic_ns;

pub fn trace(a: TraceArgs) -> Result<()> {
    let mut devices = Vec::new();
    for t in &a.targets {
        let path = resolve(t, &a.state_root)?;
        let dev = drv_blocktrace::block_dev_of(&path).with_context(|| format!("trace {}", path.display()))?;
        devices.push((path, dev));
    }
    let devs: Vec<u32> = devices.iter().map(|d| d.1).collect();
    let mut tracer = Tracer::start(&devs).context("start the eBPF programs")?;
    stop_on_signals();
    let names: Vec<String> =
        devices.iter().map(|(p, d)| format!("{} ({})", p.display(), drv_blocktrace::dev_name(*d))).collect();
    let out = std::io::stdout();
    let mut out = out.lock();
    if a.json {
        writeln!(out, "{}", serde_json::json!({"ready": true, "devices": names, "mode": tracer.mode()}))?;
    } else {
        let what = if names.is_empty() { "every block device".to_string() } else { names.join(", ") };
        writeln!(out, "tracing {what} with {}; Ctrl-C stops", tracer.mode())?;
        writeln!(
            out,
            "{:>8} {:>8} {:>9} {:>9} {:>8} {:>8} {:>7} {:>6} {:>6} {:>9} {:>9} {:>9} {:>6}",
            "device",
            "r/s",
            "w/s",
            "rMB/s",
            "wMB/s",
            "flush/s",
            "fua/s",
            "qd",
            "qdmax",
            "p50 us",
            "p99 us",
            "max us",
            "lost"
        )?;
    }
    out.flush()?;
    let mut stats = Stats::new();
    let start = Instant::now();
    let interval = Duration::from_secs_f64(a.interval.max(0.01));
    let mut next = start + interval;
    let mut last_lost = 0;
    let mut epochs = std::collections::BTreeMap::new();
    loop {
        let done = stopped() || a.seconds.is_some_and(|s| start.elapsed().as_secs_f64() >= s);
        let mut event_lines = Vec::new();
        tracer.drain(|e| {
            let r = Request::from_event(e);
            stats.on(&r);
            if a.events {
                // The partial-write-order epoch the kernel's order gives each write.
                let epoch =
                    epochs.entry(r.dev).or_insert_with(|| drv_blocktrace::order::Assigner::new(r.dev, 0)).on(&r);
                event_lines.push(event_line(&r, epoch.map(|o| o.epoch), a.json));
            }
        });
        for l in event_lines {
            writeln!(out, "{l}")?;
        }
        if done || Instant::now() >= next {
            next += interval;
            let lost = tracer.losses().context("read the eBPF loss counters")?;
            let new_lost = lost.total() - last_lost;
            last_lost = lost.total();
            for w in stats.take_window(monotonic_ns()) {
                if a.json {
                    let mut v = serde_json::to_value(&w)?;
                    v["lost"] = new_lost.into();
                    writeln!(out, "{}", serde_json::json!({ "window": v }))?;
                } else {
                    let s = w.seconds.max(1e-9);
                    writeln!(
                        out,
                        "{:>8} {:>8.0} {:>9.0} {:>9.2} {:>8.2} {:>8.0} {:>7.0} {:>6.1} {:>6} {:>9.0} {:>9.0} {:>9.0} {:>6}",
                        w.dev,
                        w.reads as f64 / s,
                        w.writes as f64 / s,
                        w.read_bytes as f64 / s / 1e6,
                        w.write_bytes as f64 / s / 1e6,
                        w.flushes as f64 / s,
                        w.fua_writes as f64 / s,
                        w.queue_depth_mean,
                        w.queue_depth_max,
                        w.latency_p50_us,
                        w.latency_p99_us,
                        w.latency_max_us,
                        new_lost
                    )?;
                    if a.histogram {
                        write_histogram(&mut out, &w.histogram)?;
                    }
                }
            }
            if let Some(m) = &a.metrics {
                write_metrics(m, &drv_blocktrace::stats::prometheus(&stats.totals(), &lost))?;
            }
            out.flush()?;
            if done {
                let line = serde_json::json!({ "lost": lost });
                if a.json {
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(
                        out,
                        "events lost: {} (ring buffer full: {}, program runs skipped by the kernel: {})",
                        lost.total(),
                        lost.reserve_failed,
                        lost.recursion_misses
                    )?;
                }
                return Ok(());
            }
        }
        std::thread::sleep(POLL);
    }
}

fn event_line(r: &Request, epoch: Option<u64>, json: bool) -> String {
    let kind = if r.complete { "complete" } else { "issue" };
    if json {
        let mut v = serde_json::json!({
            "event": kind, "dev": drv_blocktrace::dev_name(r.dev), "ts_ns": r.ts_ns, "cpu": r.cpu,
            "offset": r.offset, "len": r.len, "op": r.op, "preflush": r.preflush, "fua": r.fua,
            "sync": r.sync, "error": r.error,
        });
        if let Some(e) = epoch {
            v["epoch"] = e.into();
        }
        v.to_string()
    } else {
        let flags: String = [(r.preflush, "preflush "), (r.fua, "fua "), (r.sync, "sync ")]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, s)| *s)
            .collect();
        format!(
            "{:>8} {kind:<8} {:?} offset {} len {} {}cpu {}{}{}",
            drv_blocktrace::dev_name(r.dev),
            r.op,
            r.offset,
            r.len,
            flags,
            r.cpu,
            epoch.map(|e| format!(" epoch {e}")).unwrap_or_default(),
            if r.error != 0 { format!(" error {}", r.error) } else { String::new() }
        )
    }
}

fn write_histogram(out: &mut impl Write, hist: &[(u64, u64)]) -> std::io::Result<()> {
    let max = hist.iter().map(|(_, c)| *c).max().unwrap_or(0).max(1);
    for &(lo, c) in hist {
        let hi = if lo == 0 { 1 } else { lo * 2 - 1 };
        let bar = "*".repeat(((c * 40).div_ceil(max)) as usize);
        writeln!(out, "{:>10} -> {:<10} : {:<9} |{:<40}|", lo, hi, c, bar)?;
    }
    Ok(())
}

fn write_metrics(path: &Path, text: &str) -> Result<()> {
    let tmp = drv_files::temp_path(path);
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replace {}", path.display()))
}

/// `drv doctor`
#[derive(Args)]
pub struct DoctorArgs {
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Check {
    what: &'static str,
    ok: bool,
    detail: String,
}

pub fn doctor(a: DoctorArgs) -> Result<()> {
    let mut checks = Vec::new();
    fn check(checks: &mut Vec<Check>, what: &'static str, r: Result<String, String>) {
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        checks.push(Check { what, ok, detail });
    }
    macro_rules! check {
        ($what:expr, $r:expr $(,)?) => {
            check(&mut checks, $what, $r)
        };
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let version: Vec<u32> = release.split(['.', '-']).take(2).filter_map(|p| p.parse().ok()).collect();
    check!(
        "kernel",
        if version.as_slice() >= [5, 8].as_slice() {
            Ok(format!("{release} (the eBPF ring buffer needs 5.8 or later)"))
        } else {
            Err(format!("{release}: the eBPF ring buffer needs 5.8 or later"))
        },
    );
    check!(
        "ebpf built in",
        drv_blocktrace::ebpf_built_in()
            .map(|_| "the eBPF programs are in this binary".into())
            .map_err(|e| e.to_string())
    );
    // SAFETY: no arguments.
    let root = unsafe { libc::geteuid() } == 0;
    check!(
        "privileges",
        if root {
            Ok("root".into())
        } else {
            let caps = effective_caps();
            let has = |bit: u32| caps & (1 << bit) != 0;
            if (has(39) && has(38)) || has(21) {
                Ok(format!("CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN): effective set {caps:#x}"))
            } else {
                Err(format!("not root and no CAP_BPF+CAP_PERFMON (effective set {caps:#x}): run as root or grant them"))
            }
        },
    );
    check!(
        "kernel BTF",
        match std::fs::read("/sys/kernel/btf/vmlinux") {
            Ok(b) => match drv_blocktrace::btf::Btf::parse(&b).and_then(|b| b.layout()) {
                Ok(l) => Ok(format!(
                    "/sys/kernel/btf/vmlinux describes struct request (sector at {}, flags at {}): the tp_btf programs are used (DRV_EBPF_MODE=tracepoint: the classic ones)",
                    l.rq_sector, l.rq_cmd_flags
                )),
                Err(e) => Ok(format!("{e}: the classic tracepoints are used instead")),
            },
            Err(e) => Ok(format!("/sys/kernel/btf/vmlinux: {e}: the classic tracepoints are used instead")),
        },
    );
    let tracefs = drv_blocktrace::loader::tracefs().map_err(|e| e.to_string());
    check!(
        "block tracepoints",
        tracefs.clone().and_then(|t| {
            let mut found = Vec::new();
            for (tp, err) in [("block_rq_issue", false), ("block_rq_complete", true)] {
                let path = t.join("events/block").join(tp).join("format");
                let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let l = drv_blocktrace::layout::parse(tp, &text, err).map_err(|e| e.to_string())?;
                found.push(format!("{tp} (rwbs at {})", l.rwbs));
            }
            Ok(format!("{} in {}", found.join(", "), t.display()))
        }),
    );
    check!(
        "ebpf programs load",
        Tracer::start(&[])
            .map(|t| format!("{} loaded and attached to block_rq_issue and block_rq_complete, then detached", t.mode()))
            .map_err(|e| crate::report(&e)),
    );
    check!(
        "kernel module capture",
        if Path::new("/dev/drv-ctl").exists() {
            Ok("drv_capture is loaded (/dev/drv-ctl)".into())
        } else if !Path::new("/proc/modules").exists() {
            Err("this kernel cannot load modules (no /proc/modules: built without CONFIG_MODULES)".into())
        } else {
            Err("drv_capture is not loaded (build it with `cargo xtask kmod build`, then insmod drv_capture.ko)".into())
        },
    );
    check!(
        "fuse",
        if Path::new("/dev/fuse").exists() {
            Ok("/dev/fuse".into())
        } else {
            Err("no /dev/fuse (modprobe fuse)".into())
        },
    );
    check!(
        "loop devices",
        if Path::new("/dev/loop-control").exists() {
            Ok("/dev/loop-control".into())
        } else {
            Err("no /dev/loop-control (modprobe loop)".into())
        },
    );
    check!(
        "ublk",
        if Path::new("/dev/ublk-control").exists() {
            Ok("/dev/ublk-control (drv serves userspace devices through FUSE + loop; ublk is not used yet)".into())
        } else {
            Err("no /dev/ublk-control (this kernel has no ublk, or modprobe ublk_drv); not needed: FUSE + loop serve the user mode".into())
        },
    );
    // The capture paths, from the checks above.
    let ok = |what: &str| checks.iter().any(|c| c.what == what && c.ok);
    let ebpf = checks.iter().filter(|c| c.what.starts_with("ebpf") || c.what == "block tracepoints").all(|c| c.ok);
    let losetup = std::process::Command::new("losetup").arg("--version").output().is_ok_and(|o| o.status.success());
    let paths = [
        (
            "capture: kmod",
            if ok("kernel module capture") {
                Ok("drv attach --mode kmod: writes held in the kernel until staging has them".to_string())
            } else {
                Err("drv attach --mode kmod: the module is not loaded (see above)".to_string())
            },
        ),
        (
            "capture: user",
            if ok("fuse") && ok("loop devices") && root && losetup {
                Ok(format!(
                    "drv attach --mode user: FUSE + loop, writes held in the agent until staging has them{}",
                    if ebpf { "; epochs cross-checked with eBPF" } else { "" }
                ))
            } else {
                Err(format!(
                    "drv attach --mode user needs /dev/fuse, /dev/loop-control, losetup and root (mount, LOOP_CONFIGURE): {}",
                    [
                        (!ok("fuse")).then_some("no FUSE"),
                        (!ok("loop devices")).then_some("no loop devices"),
                        (!losetup).then_some("no losetup (util-linux)"),
                        (!root).then_some("not root"),
                    ]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(", ")
                ))
            },
        ),
        (
            "capture: ebpf track",
            if ebpf {
                Ok("drv track: changed blocks tracked without holding writes (RPO from the last cut)".to_string())
            } else {
                Err("drv track needs the eBPF programs (see above)".to_string())
            },
        ),
    ];
    for (what, r) in paths {
        check!(what, r);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            println!("{:<3} {:<22} {}", if c.ok { "ok" } else { "NO" }, c.what, c.detail);
        }
        let ebpf = checks.iter().filter(|c| c.what.starts_with("ebpf") || c.what == "block tracepoints").all(|c| c.ok);
        println!(
            "\neBPF tracing (drv trace, drv track): {}",
            if ebpf { "available" } else { "NOT available on this host (see the NO lines above)" }
        );
    }
    Ok(())
}

/// The effective capability set of this process, from /proc/self/status.
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}
