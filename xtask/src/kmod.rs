//! Kernel pieces: `cargo xtask setup`, `cargo xtask kmod build`, `cargo xtask vm-test`.
//!
//! The host kernel cannot load modules, so `capture-kmod/` is built against Debian's headers
//! (`linux-headers-amd64`) and tested in a QEMU guest (TCG) booting Debian's own kernel image of
//! the same ABI, with an initramfs holding busybox, the module, the Debian modules the test needs
//! (brd, ext4 and their dependencies), mkfs.ext4 with its libraries, and a static `drv`. The
//! guest's `/init` is `capture-kmod/vm/init.sh`; it prints PASS/FAIL lines on the serial console
//! and `DRV-VM-TEST: DONE` at the end. The test fails unless DONE is seen and no FAIL is.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo, output, root, run};

/// Debian packages the kernel pieces need.
const PACKAGES: &[&str] = &[
    "linux-headers-amd64",
    "gcc",
    "make",
    "libc6-dev",
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "e2fsprogs",
    "kmod",
    "nbd-client",
];

/// Debian modules the guest loads (their dependencies are added), besides brd (loaded with
/// parameters by the guest itself).
const GUEST_MODULES: &[&str] = &["crc32c_generic", "ext4", "loop", "nbd"];

/// The newest Debian kernel whose headers are installed (`/lib/modules/KVER/build`).
pub fn kver() -> Result<String> {
    let mut v: Vec<String> = std::fs::read_dir("/lib/modules")
        .context("/lib/modules (run `cargo xtask setup`)")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("-amd64") && Path::new("/lib/modules").join(n).join("build/Makefile").exists())
        .collect();
    v.sort_by_key(|n| n.split(['.', '-']).map(|p| p.parse::<u64>().unwrap_or(0)).collect::<Vec<_>>());
    v.pop().context("no Debian kernel headers in /lib/modules/*-amd64/build: run `cargo xtask setup`")
}

fn kmod_dir() -> PathBuf {
    root().join("target/kmod")
}

/// Where the extracted kernel image package of `kver` lives.
fn kimg(kver: &str) -> PathBuf {
    kmod_dir().join(format!("kimg-{kver}"))
}

/// Installs what the kernel pieces need, idempotently: Debian packages, and the kernel image of
/// the headers' ABI extracted under target/kmod (not installed: this host boots its own kernel).
pub fn setup() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg")
                .args(["-s", p])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if !missing.is_empty() {
        eprintln!("setup: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let kver = kver()?;
    let img = kimg(&kver);
    if !img.join(format!("boot/vmlinuz-{kver}")).exists() {
        let dl = kmod_dir().join("deb");
        let _ = std::fs::remove_dir_all(&dl);
        std::fs::create_dir_all(&dl)?;
        eprintln!("setup: fetching linux-image-{kver} (extracted, not installed)");
        run(Command::new("apt-get").args(["download", &format!("linux-image-{kver}")]).current_dir(&dl))?;
        let deb = std::fs::read_dir(&dl)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download left no .deb")?;
        let tmp = kmod_dir().join(format!("kimg-{kver}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
        std::fs::rename(&tmp, &img)?;
        let _ = std::fs::remove_dir_all(&dl);
    }
    eprintln!("setup: kernel {kver} headers and image ready");
    Ok(())
}

/// Builds capture-kmod/drv_capture.ko against `kver`'s headers (warnings are errors).
pub fn build(kver: &str) -> Result<PathBuf> {
    let dir = root().join("capture-kmod");
    run(Command::new("make").arg("-s").arg(format!("KDIR=/lib/modules/{kver}/build")).current_dir(&dir))?;
    Ok(dir.join("drv_capture.ko"))
}

/// A static `drv` (release) for the guest, which has no libc of its own.
fn static_drv() -> Result<PathBuf> {
    let target = "x86_64-unknown-linux-gnu";
    run(cargo()
        .args(["build", "--release", "-p", "drv", "--target", target])
        .env("RUSTFLAGS", "-C target-feature=+crt-static"))?;
    let p = root().join(format!("target/{target}/release/drv"));
    let ldd = Command::new("ldd").arg(&p).output()?;
    let text = String::from_utf8_lossy(&ldd.stdout).to_string() + &String::from_utf8_lossy(&ldd.stderr);
    if !text.contains("not a dynamic executable") && !text.contains("statically linked") {
        bail!("{} is not static: {text}", p.display());
    }
    Ok(p)
}

/// Copies `bin` into `root` at the same path, with the shared libraries `ldd` names.
fn copy_with_libs(bin: &Path, root_dir: &Path) -> Result<()> {
    let mut files = vec![bin.to_owned()];
    let ldd = output(Command::new("ldd").arg(bin))?;
    for line in ldd.lines() {
        // "libx.so.1 => /lib/x86_64-linux-gnu/libx.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line.split("=>").nth(1).unwrap_or(line).trim().split(' ').next().unwrap_or("");
        if path.starts_with('/') {
            files.push(PathBuf::from(path));
        }
    }
    for f in files {
        let dst = root_dir.join(f.strip_prefix("/").expect("absolute"));
        std::fs::create_dir_all(dst.parent().expect("parent"))?;
        std::fs::copy(&f, &dst).with_context(|| format!("copy {}", f.display()))?;
    }
    Ok(())
}

/// The Debian modules `names` need, in load order (dependencies first), as file paths.
fn module_closure(kver: &str, names: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let base = kimg(kver).join(format!("lib/modules/{kver}/kernel"));
    let mut all = BTreeMap::new();
    let mut stack = vec![base.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "ko") {
                let n = p.file_stem().expect("stem").to_string_lossy().replace('-', "_");
                all.insert(n, p);
            }
        }
    }
    let mut order: Vec<(String, PathBuf)> = Vec::new();
    fn visit(n: &str, all: &BTreeMap<String, PathBuf>, order: &mut Vec<(String, PathBuf)>) -> Result<()> {
        let n = n.replace('-', "_");
        if order.iter().any(|(x, _)| *x == n) {
            return Ok(());
        }
        let Some(p) = all.get(&n) else {
            // Built into this kernel.
            return Ok(());
        };
        let deps = output(Command::new("modinfo").args(["-F", "depends"]).arg(p))?;
        for d in deps.trim().split(',').filter(|d| !d.is_empty()) {
            visit(d, all, order)?;
        }
        order.push((n, p.clone()));
        Ok(())
    }
    for n in names {
        visit(n, &all, &mut order)?;
    }
    Ok(order)
}

/// Packs the guest's initramfs: busybox, /init, modules, mkfs.ext4, e2fsck, nbd-client, drv.
fn initramfs(kver: &str, ko: &Path, drv: &Path, init: &Path) -> Result<PathBuf> {
    let dir = kmod_dir().join("initramfs");
    let _ = std::fs::remove_dir_all(&dir);
    for d in ["bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "mnt", "lib/modules"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).context("busybox (busybox-static)")?;
    std::fs::copy(init, dir.join("init"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("init"), std::fs::Permissions::from_mode(0o755))?;
    // Without its debug information: a smaller initramfs boots faster.
    run(Command::new("strip").arg("-o").arg(dir.join("bin/drv")).arg(drv))?;
    std::fs::copy(ko, dir.join("lib/modules/drv_capture.ko"))?;
    let mods = module_closure(kver, GUEST_MODULES)?;
    let brd = module_closure(kver, &["brd"])?;
    let mut list = String::new();
    for (n, p) in &mods {
        std::fs::copy(p, dir.join(format!("lib/modules/{n}.ko")))?;
        list.push_str(n);
        list.push('\n');
    }
    for (n, p) in &brd {
        std::fs::copy(p, dir.join(format!("lib/modules/{n}.ko")))?;
    }
    std::fs::write(dir.join("modules.list"), list)?;
    copy_with_libs(Path::new("/sbin/mke2fs"), &dir)?;
    // The kernel's NBD client attaches the replica's export of a snapshot; e2fsck checks it.
    copy_with_libs(Path::new("/sbin/e2fsck"), &dir)?;
    copy_with_libs(Path::new("/usr/sbin/nbd-client"), &dir)?;
    std::os::unix::fs::symlink("mke2fs", dir.join("sbin/mkfs.ext4"))?;
    if Path::new("/etc/mke2fs.conf").exists() {
        std::fs::copy("/etc/mke2fs.conf", dir.join("etc/mke2fs.conf"))?;
    }
    let out = kmod_dir().join("initrd.gz");
    run(Command::new("sh").arg("-c").arg(format!(
        "cd {} && find . | cpio -o -H newc --quiet | gzip -1 > {}",
        dir.display(),
        out.display()
    )))?;
    Ok(out)
}

/// Boots the guest and follows its serial console: Ok when it printed `DRV-VM-TEST: DONE` and no
/// `FAIL:` line. The console goes to stdout and to target/kmod/console.log.
fn boot(kver: &str, initrd: &Path, timeout: Duration, append: &str) -> Result<Console> {
    let kernel = kimg(kver).join(format!("boot/vmlinuz-{kver}"));
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2", "-nographic", "-no-reboot", "-nodefaults"])
        .args(["-serial", "stdio", "-kernel"])
        .arg(&kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 quiet loglevel=4 panic=-1 oops=panic {append}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("start qemu-system-x86_64 (cargo xtask setup installs it)")?;
    let out = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let log_path = kmod_dir().join("console.log");
    let mut log = std::fs::File::create(&log_path)?;
    let deadline = Instant::now() + timeout;
    let (mut passed, mut failed, mut done, mut bench) = (0, Vec::new(), false, Vec::new());
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_owned();
                println!("vm| {line}");
                use std::io::Write;
                writeln!(log, "{line}")?;
                if line.starts_with("PASS:") {
                    passed += 1;
                } else if line.starts_with("FAIL:") {
                    failed.push(line.clone());
                } else if let Some(b) = line.strip_prefix("BENCH ") {
                    bench.push(b.to_owned());
                } else if line.starts_with("DRV-VM-TEST: DONE") {
                    done = true;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the VM test took over {timeout:?}; console in {}", log_path.display());
            }
        }
    }
    let st = child.wait()?;
    if !done {
        bail!("the guest stopped ({st}) before the end of its test; console in {}", log_path.display());
    }
    Ok(Console { passed, failed, bench })
}

/// What the guest's console said.
struct Console {
    passed: usize,
    failed: Vec<String>,
    /// `BENCH ` lines, without the prefix.
    bench: Vec<String>,
}

/// The guest's initramfs, built fresh.
fn prepare() -> Result<(String, PathBuf)> {
    let kver = kver()?;
    if !kimg(&kver).join(format!("boot/vmlinuz-{kver}")).exists() {
        bail!("no kernel image for {kver} under {}: run `cargo xtask setup`", kmod_dir().display());
    }
    let ko = build(&kver)?;
    let drv = static_drv()?;
    let initrd = initramfs(&kver, &ko, &drv, &root().join("capture-kmod/vm/init.sh"))?;
    Ok((kver, initrd))
}

/// `cargo xtask vm-test`.
pub fn vm_test() -> Result<()> {
    let (kver, initrd) = prepare()?;
    let t = Instant::now();
    let Console { passed, failed, .. } = boot(&kver, &initrd, Duration::from_secs(1500), "")?;
    println!(
        "vm-test on {kver}: {passed} passed, {} failed ({:.0} s in the guest)",
        failed.len(),
        t.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        bail!("vm-test failed:\n{}", failed.join("\n"));
    }
    if passed == 0 {
        bail!("vm-test: no check passed");
    }
    Ok(())
}

/// `cargo xtask bench kmod`: inside the guest, O_DIRECT writes (`drv bench-device`) on `/dev/drv0`
/// (held until the agent, staging on the guest's loopback, releases each) against the same on its
/// backing RAM disk, in alternating rounds. TCG makes absolute figures meaningless: ratios only.
pub fn bench(quick: bool) -> Result<()> {
    let (kver, initrd) = prepare()?;
    let secs = if quick { 2 } else { 5 };
    let rounds = if quick { 1 } else { 3 };
    let c = boot(&kver, &initrd, Duration::from_secs(3000), &format!("drv.bench={secs},{rounds}"))?;
    if !c.failed.is_empty() {
        bail!("bench setup failed in the guest:\n{}", c.failed.join("\n"));
    }
    // "seq 1M QD1 round 1: BACKING DRV0 AGENT" (IOPS)
    let mut sums: Vec<(String, f64, f64, f64)> = Vec::new();
    for l in &c.bench {
        let (name, rest) = l.split_once(" round ").context("BENCH line")?;
        let values = rest.split_once(':').map_or("", |r| r.1);
        let nums: Vec<f64> = values.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        let [base, drv, agent] = nums[..] else { bail!("BENCH line {l:?}") };
        match sums.iter_mut().find(|s| s.0 == name) {
            Some(s) => (s.1, s.2, s.3) = (s.1 + base, s.2 + drv, s.3 + agent),
            None => sums.push((name.to_owned(), base, drv, agent)),
        }
    }
    if sums.is_empty() {
        bail!("the guest printed no BENCH line; console in {}", kmod_dir().join("console.log").display());
    }
    println!();
    println!("== cargo xtask bench kmod ({kver}, QEMU TCG, {rounds} round(s) of {secs} s each side) ==");
    println!("O_DIRECT writes on /dev/drv0 (each held until staging has it) against its backing RAM disk, and");
    println!("against the same writes through an agent without the module (in-process, to a file):");
    for (name, base, drv, agent) in sums {
        println!(
            "  {name:<14} drv0/backing {:.4}   drv0/agent-only {:.2}   (agent-only/backing {:.4})",
            drv / base,
            drv / agent,
            agent / base
        );
    }
    Ok(())
}
