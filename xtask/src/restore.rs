//! `cargo xtask bench restore`: getting data back, against peers on the same image and in the
//! same run (alternating rounds, medians). The replica's target holds a 1 GiB image (256 MiB with
//! `--quick`) of random bytes; snapshot `s1` of it is exported over NBD by the replica, and nbdkit's
//! `file` plugin serves the same image file beside it.
//!
//! - sequential read: `nbdcopy URI null:` of the drv export, against reading the image file in
//!   4 MiB reads and against the same nbdcopy of nbdkit, each from a cold page cache (the image's
//!   pages dropped with `posix_fadvise(DONTNEED)` first: a restore reads a replica disk, not
//!   memory); the same from a warm cache is printed beside them. Warm, the three copies of NBD on
//!   loopback (page cache -> server buffer -> socket -> client) against the one of a local read
//!   bound the ratio near 0.5 even for a minimal C server with a client that does nothing, and
//!   nbdcopy itself uses more CPU than either server, so that figure compares clients, not
//!   servers;
//! - 4 KiB random reads: fio's nbd engine (libnbd), queue depth 16, drv against nbdkit;
//! - restore: `drv restore --no-device` into a file (the copy's own rate, from its last JSON
//!   line), against `cp --reflink=never` of the image followed by `sync` of the copy, in turn
//!   first in alternate rounds after one unmeasured copy, each after a `sync` and a pause (this
//!   VM's disk runs a copy at a quarter of its rate while the last one's writeback and discards
//!   go on);
//! - time to first usable read: from starting `drv restore` (with its block device) to a 4 KiB
//!   O_DIRECT read of the device done, for the 1 GiB volume and a 64 GiB one.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use drv_config::{ConfigStore, Kind};

use crate::relay::{Setup, free_port, setup_volume, start};
use crate::snapshots::replica_addr;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `drv ARGS --server REPLICA --certs CERTS` and returns its stdout.
fn drv_admin(drv: &Path, s: &Setup, args: &[&str]) -> Result<String> {
    let out = Command::new(drv)
        .args(args)
        .arg("--server")
        .arg(replica_addr(s)?.to_string())
        .arg("--certs")
        .arg(&s.certs)
        .output()?;
    ensure!(out.status.success(), "drv {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn timed(c: &mut Command) -> Result<f64> {
    let t = Instant::now();
    let out = c.output().with_context(|| format!("{c:?}"))?;
    ensure!(out.status.success(), "{c:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(t.elapsed().as_secs_f64())
}

/// An image of `bytes` pseudo-random bytes (xorshift: not compressible, cheap to make).
fn write_image(path: &Path, bytes: u64) -> Result<()> {
    let f = std::fs::File::create(path)?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..bytes >> 20 {
        for w in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&buf, i << 20)?;
    }
    Ok(())
}

/// Drops the page cache of the file at `path` (it is clean: nothing writes the image here), so
/// the next read comes from the disk.
fn drop_cached(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    f.sync_all()?;
    // SAFETY: posix_fadvise on an open descriptor; it only advises the page cache.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    ensure!(rc == 0, "posix_fadvise(DONTNEED) of {}: {}", path.display(), std::io::Error::from_raw_os_error(rc));
    Ok(())
}

/// Sequential-read seconds of the raw image, our export and nbdkit's, in that order; each from a
/// cold cache when `cold`.
fn sequential(img: &Path, uri: &str, kit: &str, cold: bool, round: usize) -> Result<[f64; 3]> {
    let run = |which: usize| -> Result<f64> {
        if cold {
            drop_cached(img)?;
        }
        match which {
            0 => read_file_secs(img),
            1 => timed(Command::new("nbdcopy").args([uri, "null:"])),
            _ => timed(Command::new("nbdcopy").args([kit, "null:"])),
        }
    };
    let mut t = [0.0; 3];
    // The three in turn first, round by round.
    for k in 0..3 {
        let which = (round + k) % 3;
        t[which] = run(which)?;
    }
    Ok(t)
}

fn read_file_secs(path: &Path) -> Result<f64> {
    let t = Instant::now();
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 4 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(t.elapsed().as_secs_f64())
}

/// fio's 4 KiB random-read IOPS over NBD at `uri`.
fn fio_iops(uri: &str, bytes: u64, secs: u64) -> Result<f64> {
    let out = Command::new("fio")
        .args(["--name=r", "--ioengine=nbd", &format!("--uri={uri}"), "--rw=randread", "--bs=4k"])
        .args(["--iodepth=16", &format!("--size={bytes}"), &format!("--runtime={secs}"), "--time_based"])
        .args(["--output-format=json"])
        .output()?;
    ensure!(out.status.success(), "fio on {uri}: {}", String::from_utf8_lossy(&out.stderr));
    // fio says "fio: connected to NBD server" on stdout before its JSON.
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text.find('{').map_or("", |i| &text[i..]);
    let v: serde_json::Value = serde_json::from_str(json).with_context(|| format!("fio's output: {text}"))?;
    v["jobs"][0]["read"]["iops"].as_f64().context("fio's read iops")
}

/// Lets the disk settle: every dirty page written back, then a moment (writeback and the
/// discards of a removed copy would otherwise land on whichever copy runs next).
fn settle() -> Result<()> {
    timed(&mut Command::new("sync"))?;
    std::thread::sleep(Duration::from_secs(2));
    Ok(())
}

/// Seconds of `cp --reflink=never IMG COPY` and `sync COPY`; the copy is removed.
fn cp_secs(img: &Path, copy: &Path) -> Result<f64> {
    settle()?;
    let t = Instant::now();
    timed(Command::new("cp").arg("--reflink=never").arg(img).arg(copy))?;
    timed(Command::new("sync").arg(copy))?;
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(copy)?;
    Ok(secs)
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `drv restore --no-device` into `to`: the copy's MB/s as its last JSON line gives it.
fn restore_copy(drv: &Path, s: &Setup, to: &Path) -> Result<f64> {
    settle()?;
    let to_s = to.display().to_string();
    let out = drv_admin(drv, s, &["restore", "vol1", "s1", "--to", &to_s, "--no-device", "--json"])?;
    let last: serde_json::Value =
        serde_json::from_str(out.lines().rfind(|l| l.starts_with('{')).context("no JSON line")?)?;
    ensure!(last["complete"] == true, "the restore did not complete: {last}");
    let (bytes, secs) = (last["copied_bytes"].as_f64().unwrap_or(0.0), last["elapsed_seconds"].as_f64().unwrap_or(1.0));
    Ok(bytes / secs / 1e6)
}

/// Seconds from starting `drv restore` of `volume`'s snapshot `s1` to a 4 KiB read of its device.
fn first_read(drv: &Path, s: &Setup, volume: &str, to: &Path, bytes: u64) -> Result<f64> {
    let t = Instant::now();
    let mut child = Command::new(drv)
        .args(["restore", volume, "s1", "--to"])
        .arg(to)
        .args(["--json", "--bwlimit", "1M", "--server", &replica_addr(s)?.to_string(), "--certs"])
        .arg(&s.certs)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let child = Kill(child);
    let mut line = String::new();
    let dev = loop {
        line.clear();
        ensure!(out.read_line(&mut line)? > 0, "drv restore ended before its DEVICE line");
        if let Some(d) = line.trim().strip_prefix("DEVICE ") {
            break d.to_owned();
        }
    };
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&dev)?;
    let mut buf = AlignedPage([0u8; 4096]);
    f.read_exact_at(&mut buf.0, (bytes / 2) & !4095)?;
    let secs = t.elapsed().as_secs_f64();
    drop(f);
    // SAFETY: kill(2) of the child: it detaches its device and keeps its state for a resume.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let mut child = child;
    let _ = child.0.wait();
    Ok(secs)
}

#[repr(align(4096))]
struct AlignedPage([u8; 4096]);

pub fn bench(drv: &Path, dir: &Path, quick: bool) -> Result<()> {
    let bytes: u64 = if quick { 256 << 20 } else { 1 << 30 };
    let rounds = if quick { 1 } else { 3 };
    let s = setup_volume(dir, &dir.join("rep1"), 256 << 20, 64 << 20, bytes)?;
    let st = ConfigStore::open(&s.config)?;
    st.set(
        Kind::Volume,
        "big",
        &["size_bytes=64G".into(), "wrl=w0".into(), "replicas=[\"rep1\"]".into(), "key=k1".into()],
    )?;
    drop(st);
    std::fs::create_dir_all(dir.join("rep1"))?;
    let img = dir.join("rep1/vol1.img");
    write_image(&img, bytes)?;
    let _replica = Kill(start(drv, &s, "replica", "rep1", &dir.join("rep1.log"))?);
    let t = Instant::now();
    while drv_admin(drv, &s, &["status", "--role", "replica"]).is_err() {
        ensure!(t.elapsed() < Duration::from_secs(30), "the replica did not answer");
        std::thread::sleep(Duration::from_millis(100));
    }
    drv_admin(drv, &s, &["snapshot", "create", "vol1", "s1"])?;
    drv_admin(drv, &s, &["snapshot", "create", "big", "s1"])?;
    let port = free_port();
    let _nbdkit = Kill(
        Command::new("nbdkit")
            .args(["-f", "-i", "127.0.0.1", "-p", &port.to_string(), "file"])
            .arg(format!("file={}", img.display()))
            .stderr(Stdio::null())
            .spawn()
            .context("nbdkit (Debian: nbdkit)")?,
    );
    let kit = format!("nbd://127.0.0.1:{port}/");
    std::thread::sleep(Duration::from_millis(300));
    let mb = bytes as f64 / 1e6;
    let (mut cold, mut warm, mut file) = ([vec![], vec![], vec![]], [vec![], vec![], vec![]], vec![]);
    let (mut iops_ours, mut iops_theirs, mut rest, mut cp) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let e = drv_admin(drv, &s, &["snapshot", "export", "vol1", "s1", "--listen", "127.0.0.1:0", "--json"])?;
        let e: serde_json::Value = serde_json::from_str(e.trim())?;
        let uri = format!("nbd://{}/s1", e["listen"].as_str().context("listen")?);
        // Twice each per round: the disk and the loopback copies are the noisiest figures here.
        for turn in [2 * round, 2 * round + 1] {
            for (k, secs) in sequential(&img, &uri, &kit, true, turn)?.into_iter().enumerate() {
                cold[k].push(mb / secs);
            }
            read_file_secs(&img)?;
            for (k, secs) in sequential(&img, &uri, &kit, false, turn)?.into_iter().enumerate() {
                warm[k].push(mb / secs);
            }
        }
        file.push(mb / timed(Command::new("nbdcopy").arg(&img).arg("null:"))?);
        let secs = if quick { 2 } else { 5 };
        iops_ours.push(fio_iops(&uri, bytes, secs)?);
        iops_theirs.push(fio_iops(&kit, bytes, secs)?);
        if round == 0 {
            cp_secs(&img, &dir.join("cp.img"))?;
        }
        let to = dir.join("restored.img");
        if round % 2 == 1 {
            cp.push(mb / cp_secs(&img, &dir.join("cp.img"))?);
        }
        // It reuses the export above, and ends it when complete.
        rest.push(restore_copy(drv, &s, &to)?);
        std::fs::remove_file(&to)?;
        if round % 2 == 0 {
            cp.push(mb / cp_secs(&img, &dir.join("cp.img"))?);
        }
    }
    let first_small = first_read(drv, &s, "vol1", &dir.join("first.img"), bytes)?;
    let first_big = first_read(drv, &s, "big", &dir.join("first-big.img"), 64 << 30)?;
    let [raw, ours, theirs] = cold.clone().map(median);
    let [wraw, wours, wtheirs] = warm.map(median);
    let file = median(file);
    println!("  restore copy by round {rest:.0?} MB/s, cp + sync {cp:.0?} MB/s");
    println!(
        "  sequential reads from a cold cache, MB/s: raw {:.0?}, drv {:.0?}, nbdkit {:.0?}",
        cold[0], cold[1], cold[2]
    );
    let (io, it, rest, cp) = (median(iops_ours), median(iops_theirs), median(rest), median(cp));
    println!("getting data back, a {} MiB image, {rounds} round(s), medians:", bytes >> 20);
    println!(
        "  sequential read from a cold cache (nbdcopy to null:): drv {ours:.0} MB/s, nbdkit file {theirs:.0} MB/s, the raw file in 4 MiB reads {raw:.0} MB/s"
    );
    println!("  NBD read / raw file {:.2} (goal >= 0.5)", ours / raw);
    println!("  NBD read / nbdkit {:.2} (goal >= 1.0)", ours / theirs);
    println!(
        "  from a warm cache: drv {wours:.0} MB/s, nbdkit {wtheirs:.0} MB/s, the raw file {wraw:.0} MB/s (nbdcopy of it {file:.0} MB/s); drv / raw {:.2}, nbdkit / raw {:.2}, drv / nbdkit {:.2}",
        wours / wraw,
        wtheirs / wraw,
        wours / wtheirs
    );
    println!("  4 KiB random reads, QD16 (fio nbd): drv {io:.0} IOPS, nbdkit {it:.0} IOPS");
    println!("  random reads drv / nbdkit {:.2} (goal >= 1.0)", io / it);
    println!("  restore copy {rest:.0} MB/s, cp --reflink=never + sync {cp:.0} MB/s");
    println!("  restore copy / cp {:.2} (goal >= 0.8)", rest / cp);
    println!("  first usable read after drv restore starts: {first_small:.3} s (goal <= 1)");
    println!("  first usable read, 64 GiB volume: {first_big:.3} s (goal <= 1)");
    if !Path::new("/dev/fuse").exists() {
        bail!("no /dev/fuse: the first-read figures need the restore's block device");
    }
    Ok(())
}
