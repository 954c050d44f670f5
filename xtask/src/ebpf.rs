//! The eBPF toolchain (`cargo xtask setup`) and the eBPF benchmark (`cargo xtask bench ebpf`).
//!
//! drv-blocktrace's build.rs compiles `capture-ebpf/` with aya-build, which needs the nightly
//! toolchain with `rust-src` and `bpf-linker` built against the LLVM of that nightly (22 here:
//! Debian's `llvm-22-dev`). Setup installs what is missing and fails loudly when it cannot:
//! CI must never build a drv without eBPF.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::run;

const BPF_LINKER: &str = "0.13.0";
const LLVM: &str = "22";

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Option<String> {
    let o = cmd.stderr(Stdio::null()).output().ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Installs the eBPF toolchain pieces that are missing (idempotent) and mounts tracefs.
pub fn setup() -> Result<()> {
    let nightly = output(Command::new("rustup").args(["run", "nightly", "rustc", "--version", "--verbose"])).context(
        "no nightly Rust toolchain: the eBPF programs need one whose LLVM major is 22 (this machine kind has it preinstalled; `rustup toolchain install nightly-2026-05-20` otherwise)",
    )?;
    let llvm = nightly.lines().find_map(|l| l.strip_prefix("LLVM version: ")).unwrap_or("?").trim().to_string();
    if !llvm.starts_with(&format!("{LLVM}.")) {
        bail!(
            "the nightly toolchain has LLVM {llvm}; bpf-linker here is built against LLVM {LLVM}: install a nightly with LLVM {LLVM}"
        );
    }
    let sysroot = output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
        .context("nightly sysroot")?;
    if !Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core").exists() {
        eprintln!("setup: adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    let has_linker = output(Command::new("bpf-linker").arg("--version")).is_some_and(|v| v.contains(BPF_LINKER));
    if !has_linker {
        let pkg = format!("llvm-{LLVM}-dev");
        if !quiet_ok(Command::new("dpkg").args(["-s", &pkg])) {
            eprintln!("setup: installing {pkg}");
            run(Command::new("apt-get").args(["update", "-qq"]))?;
            run(Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends", &pkg])
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
        }
        eprintln!("setup: building bpf-linker {BPF_LINKER} against LLVM {LLVM} (about a minute)");
        run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["install", "bpf-linker", "--version", BPF_LINKER, "--no-default-features", "--features"])
            .arg(format!("llvm-{LLVM}"))
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM}")))
        .context("install bpf-linker")?;
        if output(Command::new("bpf-linker").arg("--version")).is_none() {
            bail!("bpf-linker was installed but is not on PATH (add ~/.cargo/bin to PATH)");
        }
    }
    if !Path::new("/sys/kernel/tracing/events/block").exists()
        && !Path::new("/sys/kernel/debug/tracing/events/block").exists()
    {
        eprintln!("setup: mounting tracefs");
        run(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))?;
    }
    eprintln!("setup: eBPF toolchain ready (nightly with LLVM {llvm}, rust-src, bpf-linker {BPF_LINKER})");
    Ok(())
}

/// A loop device with direct I/O over `image`; detached on drop (only this one).
pub struct Loop(pub String);

impl Loop {
    pub fn attach(image: &Path) -> Result<Loop> {
        let o = Command::new("losetup").args(["--find", "--show", "--direct-io=on"]).arg(image).output()?;
        if !o.status.success() {
            bail!("losetup: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(Loop(String::from_utf8_lossy(&o.stdout).trim().to_string()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// One fio run of 4 KiB random writes on `dev`: (write IOPS, writes completed).
fn fio(dev: &str, seconds: u64, qd: u32) -> Result<(f64, u64)> {
    let o = Command::new("fio")
        .args(["--name=ebpf", "--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=libaio", "--time_based"])
        .arg(format!("--filename={dev}"))
        .arg(format!("--iodepth={qd}"))
        .arg(format!("--runtime={seconds}"))
        .args(["--randrepeat=0", "--output-format=json"])
        .output()
        .context("run fio")?;
    if !o.status.success() {
        bail!("fio: {}", String::from_utf8_lossy(&o.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).context("parse fio's JSON")?;
    let w = &v["jobs"][0]["write"];
    Ok((w["iops"].as_f64().context("fio write iops")?, w["total_ios"].as_u64().context("fio total_ios")?))
}

/// What one traced round saw: (events seen as completed writes, events lost).
struct Traced {
    writes: u64,
    lost: u64,
    mode: String,
}

/// Runs `f` with `drv trace DEV --json` attached and consuming; returns what it reported.
fn with_trace<T>(drv: &Path, dev: &str, mode: Option<&str>, f: impl FnOnce() -> Result<T>) -> Result<(T, Traced)> {
    use std::io::{BufRead, Read};
    let mut cmd = Command::new(drv);
    cmd.args(["trace", dev, "--json"]).stdout(Stdio::piped());
    if let Some(m) = mode {
        cmd.env("DRV_EBPF_MODE", m);
    }
    let mut child = cmd.spawn()?;
    let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    out.read_line(&mut line)?;
    if !line.contains("\"ready\":true") {
        let _ = child.kill();
        bail!("drv trace did not start: {line}");
    }
    let r = f();
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]))?;
    let mut rest = String::new();
    out.read_to_string(&mut rest)?;
    child.wait()?;
    let r = r?;
    let mut t =
        Traced { writes: 0, lost: 0, mode: serde_json::from_str::<serde_json::Value>(&line)?["mode"].to_string() };
    for l in rest.lines() {
        let v: serde_json::Value = serde_json::from_str(l).with_context(|| format!("drv trace printed {l}"))?;
        if let Some(w) = v.get("window") {
            t.writes += w["writes"].as_u64().unwrap_or(0);
        }
        if let Some(lost) = v.get("lost").filter(|l| l.is_object()) {
            t.lost = lost["reserve_failed"].as_u64().unwrap_or(0) + lost["recursion_misses"].as_u64().unwrap_or(0);
        }
    }
    Ok((r, t))
}

/// `cargo xtask bench ebpf`: fio 4 KiB random writes on a loop device (direct I/O) with the
/// programs attached and `drv trace` consuming, against the same without them, in alternating
/// rounds; and the events lost per million.
/// Installs fio if it is missing.
pub fn ensure_fio() -> Result<()> {
    if !quiet_ok(Command::new("fio").arg("--version")) {
        eprintln!("bench: installing fio");
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", "fio"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

pub fn bench(drv: &Path, dir: &Path, quick: bool) -> Result<()> {
    ensure_fio()?;
    let image = dir.join("disk.img");
    // Written out in full: random writes then overwrite allocated blocks (no extent conversion).
    run(Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=1024", "conv=fsync", "status=none"])
        .arg(format!("of={}", image.display())))?;
    let lo = Loop::attach(&image)?;
    let (rounds, secs) = if quick { (2, 3) } else { (4, 8) };
    for (qd, mode) in [(16u32, None), (1, None), (16, Some("tracepoint"))] {
        let (mut base, mut traced) = (Vec::new(), Vec::new());
        let (mut seen, mut lost, mut completed, mut used) = (0u64, 0u64, 0u64, String::new());
        fio(&lo.0, 1, qd)?; // warm-up
        for _ in 0..rounds {
            base.push(fio(&lo.0, secs, qd)?.0);
            let ((iops, ios), t) = with_trace(drv, &lo.0, mode, || fio(&lo.0, secs, qd))?;
            used = t.mode.clone();
            traced.push(iops);
            seen += t.writes;
            lost += t.lost;
            completed += ios;
        }
        let (b, t) = (crate::median(base.clone()), crate::median(traced.clone()));
        println!("fio 4 KiB random writes, QD{qd}, {rounds} alternating rounds of {secs} s on {} (direct I/O):", lo.0);
        println!("  without eBPF          {b:>10.0} IOPS   rounds {}", fmt(&base));
        println!("  drv trace consuming   {t:>10.0} IOPS   rounds {}   (programs: {used})", fmt(&traced));
        let per_million = if seen + lost > 0 { lost as f64 * 1e6 / (seen + lost) as f64 } else { 0.0 };
        println!(
            "  ratio {:.3} (goal >= 0.97); writes fio completed {completed}, seen by drv trace {seen}, events lost {lost} ({per_million:.1} per million; goal 0, every loss counted)",
            t / b
        );
        if seen + lost < completed {
            println!(
                "  writes fio completed with no completion event and no loss counted: {} ({:.1} per million; block_rq_complete did not fire for them, see ARCHITECTURE.md)",
                completed - seen - lost,
                (completed - seen - lost) as f64 * 1e6 / completed as f64
            );
        }
    }
    Ok(())
}

fn fmt(v: &[f64]) -> String {
    v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ")
}
