//! `cargo xtask bench user`: the userspace capture path (`drv attach --mode user`: FUSE + a loop
//! device with direct I/O) against a plain loop device with direct I/O over the same image file,
//! without the agent.
//!
//! fio on the block devices: 4 KiB random writes at QD1 and QD32, and 1 MiB sequential writes at
//! QD4, in alternating rounds (plain, then protected) so a slow spell of the disk falls on both.
//! The protected device pays for what the plain one does not do: each write is durable in
//! staging's WRL (an `fdatasync` there, or a group of writes per `fdatasync`) before it reaches
//! the image. Staging's WRL is on the disk under test; the replica (the DR site) keeps its data in
//! RAM (`/dev/shm`), its CPU is still this host's.
//!
//! Without `--quick` it then runs the SIGKILL crash test with more crash points
//! (`DRV_CRASH_POINTS=60`).

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::ebpf::Loop;
use crate::relay::{Setup, setup_volume, start};

/// One fio run on `dev`: write IOPS and MB/s.
fn fio(dev: &str, secs: u64, rw: &str, bs: &str, qd: u32) -> Result<(f64, f64)> {
    let o = Command::new("fio")
        .args(["--name=user", "--direct=1", "--ioengine=libaio", "--time_based", "--randrepeat=0"])
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--filename={dev}"))
        .arg(format!("--iodepth={qd}"))
        .arg(format!("--runtime={secs}"))
        .arg("--output-format=json")
        .output()
        .context("run fio")?;
    if !o.status.success() {
        bail!("fio on {dev}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).context("parse fio's JSON")?;
    let w = &v["jobs"][0]["write"];
    Ok((w["iops"].as_f64().context("fio iops")?, w["bw_bytes"].as_f64().context("fio bw_bytes")? / 1e6))
}

/// `drv attach vol1 --mode user` on `image`: the process and its loop device.
fn attach(drv: &Path, s: &Setup, image: &Path, dir: &Path) -> Result<(Child, String)> {
    let mut child = Command::new(drv)
        .args(["attach", "vol1", "--mode", "user", "--name", "host1", "--no-order-check"])
        .arg("--device")
        .arg(image)
        .arg("--config")
        .arg(&s.config)
        .arg("--certs")
        .arg(&s.certs)
        .arg("--state-dir")
        .arg(dir.join("agent-state"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("agent.log"))?)
        .spawn()
        .context("start drv attach")?;
    let mut out = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line)? == 0 {
            bail!("drv attach ended: {}", std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default());
        }
        if let Some(dev) = line.trim().strip_prefix("DEVICE ") {
            let dev = dev.to_owned();
            std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
            return Ok((child, dev));
        }
    }
}

fn status(drv: &Path, dir: &Path) -> Option<serde_json::Value> {
    let o = Command::new(drv)
        .args(["agent", "status", "vol1", "--json", "--run-dir"])
        .arg(dir.join("run"))
        .output()
        .ok()?;
    serde_json::from_slice(&o.stdout).ok()
}

pub fn bench(drv: &Path, dir: &Path, quick: bool) -> Result<()> {
    crate::ebpf::ensure_fio()?;
    let volume: u64 = if quick { 256 << 20 } else { 1 << 30 };
    let (rounds, secs) = if quick { (2, 3) } else { (4, 6) };
    let replica_data = Path::new("/dev/shm").join(format!("drv-bench-user-{}", std::process::id()));
    std::fs::create_dir_all(&replica_data)?;
    let s = setup_volume(dir, &replica_data, 4 << 30, 256 << 20, volume)?;
    let mut staging = start(drv, &s, "staging", "stg1", &dir.join("stg1.log"))?;
    let mut replica = start(drv, &s, "replica", "rep1", &dir.join("rep1.log"))?;
    let image = dir.join("disk.img");
    // Written out in full, so neither side pays for allocating blocks.
    crate::run(
        Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "conv=fsync", "status=none"])
            .arg(format!("count={}", volume >> 20))
            .arg(format!("of={}", image.display())),
    )?;
    let result = (|| -> Result<()> {
        let plain = Loop::attach(&image)?;
        let (mut agent, dev) = attach(drv, &s, &image, dir)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while status(drv, dir).is_none_or(|st| st["mode"] != "sync") {
            if Instant::now() > deadline {
                bail!("the agent did not reach sync mode: {:?}", status(drv, dir));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        println!(
            "drv attach --mode user ({dev}: FUSE + loop, direct I/O) vs a plain loop device ({}, direct I/O) over the same {} MiB image;",
            plain.0,
            volume >> 20
        );
        println!("{rounds} alternating rounds of {secs} s; medians; ratio = protected / plain");
        for (what, rw, bs, qd) in [
            ("4 KiB random writes QD1", "randwrite", "4k", 1u32),
            ("4 KiB random writes QD32", "randwrite", "4k", 32),
            ("1 MiB sequential writes QD4", "write", "1M", 4),
        ] {
            let (mut base, mut prot) = (Vec::new(), Vec::new());
            fio(&dev, 1, rw, bs, qd)?; // warm-up
            for _ in 0..rounds {
                base.push(fio(&plain.0, secs, rw, bs, qd)?);
                prot.push(fio(&dev, secs, rw, bs, qd)?);
            }
            let med =
                |v: &[(f64, f64)], i: usize| crate::median(v.iter().map(|x| if i == 0 { x.0 } else { x.1 }).collect());
            let (bi, bm, pi, pm) = (med(&base, 0), med(&base, 1), med(&prot, 0), med(&prot, 1));
            println!(
                "  {what:<28} plain {bi:>9.0} IOPS {bm:>8.1} MB/s   protected {pi:>9.0} IOPS {pm:>8.1} MB/s   ratio {:.3}",
                pi / bi
            );
        }
        let st = status(drv, dir).context("agent status")?;
        println!("  agent after the runs: mode {}, {} writes", st["mode"], st["writes"]);
        drop(plain);
        let o = Command::new(drv).args(["detach", "vol1", "--run-dir"]).arg(dir.join("run")).output()?;
        if !o.status.success() {
            bail!("drv detach: {}", String::from_utf8_lossy(&o.stderr));
        }
        agent.wait()?;
        Ok(())
    })();
    let _ = staging.kill();
    let _ = replica.kill();
    let _ = staging.wait();
    let _ = replica.wait();
    let _ = std::fs::remove_dir_all(&replica_data);
    result?;
    if !quick {
        println!("SIGKILL crash test with 60 crash points:");
        crate::run(
            crate::cargo()
                .args(["test", "-p", "drv-tests", "--test", "it", "--", "--nocapture"])
                .arg("sigkill_of_the_whole_pipeline")
                .env("DRV_CRASH_POINTS", "60")
                .env("DRV_REQUIRE_ROOT_TESTS", "1"),
        )?;
    }
    Ok(())
}
