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
