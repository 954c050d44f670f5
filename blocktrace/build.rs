//! Builds the eBPF programs of `capture-ebpf/` (nightly + rust-src + bpf-linker, through
//! aya-build) and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//!
//! Without that toolchain the build still succeeds (the README's demo must work on a fresh
//! machine): the object is empty and `DRV_EBPF_MISSING` says why, so the binary can say that
//! eBPF support was not built in. `DRV_REQUIRE_EBPF=1` (CI) turns a missing toolchain into a
//! build error.

use std::path::PathBuf;
use std::process::Command;

const OBJECT: &str = "drv-capture-ebpf";

fn main() {
    println!("cargo:rerun-if-env-changed=DRV_REQUIRE_EBPF");
    println!("cargo:rerun-if-env-changed=PATH");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let object = out.join(OBJECT);
    // An empty object first: aya-build overwrites it, and a failed or skipped build leaves it.
    std::fs::write(&object, b"").expect("write the placeholder object");
    let required = std::env::var("DRV_REQUIRE_EBPF").is_ok_and(|v| v == "1");
    let missing = match toolchain_missing() {
        Some(why) => Some(why),
        None => {
            let ebpf = aya_build::Package { name: OBJECT, root_dir: "../capture-ebpf", ..Default::default() };
            aya_build::build_ebpf([ebpf], aya_build::Toolchain::Nightly).err().map(|e| format!("{e:#}"))
        }
    };
    if std::fs::metadata(&object).map(|m| m.len()).unwrap_or(0) == 0 && missing.is_none() {
        // AYA_BUILD_SKIP=1, or the build produced nothing.
        println!("cargo:rustc-env=DRV_EBPF_MISSING=the eBPF build was skipped (AYA_BUILD_SKIP)");
        return;
    }
    if let Some(why) = missing {
        let why = why.replace('\n', " ");
        if required {
            panic!("DRV_REQUIRE_EBPF=1 but the eBPF programs cannot be built: {why} (run `cargo xtask setup`)");
        }
        println!("cargo:warning=building drv without eBPF support: {why}");
        println!("cargo:rustc-env=DRV_EBPF_MISSING={why}");
    } else {
        println!("cargo:rustc-env=DRV_EBPF_MISSING=");
    }
}

/// Why the eBPF toolchain is not usable, if it is not.
fn toolchain_missing() -> Option<String> {
    let ok = |cmd: &mut Command| cmd.output().ok().filter(|o| o.status.success());
    let Some(sysroot) = ok(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"])) else {
        return Some("no nightly Rust toolchain (rustup toolchain install nightly)".into());
    };
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    if !PathBuf::from(&sysroot).join("lib/rustlib/src/rust/library/core").exists() {
        return Some(
            "the nightly toolchain has no rust-src (rustup component add rust-src --toolchain nightly)".into(),
        );
    }
    if ok(Command::new("bpf-linker").arg("--version")).is_none() {
        return Some("bpf-linker is not installed (cargo xtask setup)".into());
    }
    None
}
