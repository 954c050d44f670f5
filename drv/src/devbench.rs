//! `drv bench-device PATH`: O_DIRECT writes to a block device (or file) from N threads for a
//! while, and the rate they reached. How `cargo xtask bench kmod` compares `/dev/drvN` with its
//! backing device inside the VM, and a quick check of what a protected device costs.
//!
//! It overwrites the device's first `--span` bytes with pseudo-random data.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Args)]
pub struct BenchDeviceArgs {
    /// The device (or file) to write: its data is overwritten.
    path: PathBuf,
    /// seq (sequential) or rand (random offsets).
    #[arg(long, default_value = "rand")]
    pattern: String,
    /// Bytes per write (a multiple of 4096), e.g. 4K or 1M.
    #[arg(long, default_value = "4K", value_parser = drv_config::size_bytes)]
    bs: u64,
    /// Writers (queue depth: each has one write in flight).
    #[arg(long, default_value_t = 1)]
    qd: usize,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Bytes of the device written (default: all of it).
    #[arg(long, value_parser = drv_config::size_bytes)]
    span: Option<u64>,
    #[arg(long)]
    json: bool,
    /// Write through an agent of this volume started in this process (staging from the
    /// configuration, `PATH` its local disk, no change map) instead of to `PATH` directly: the
    /// agent's path without a capture device, for comparison.
    #[arg(long)]
    via_agent: Option<String>,
    /// The configuration store (with --via-agent).
    #[arg(long, env = "DRV_CONFIG", default_value = "/var/lib/drv/config.redb")]
    config: PathBuf,
    /// Directory with ca.pem and the agent certificate (with --via-agent).
    #[arg(long, env = "DRV_CERTS", default_value = "/etc/drv/certs")]
    certs: PathBuf,
    /// The agent certificate's name (with --via-agent).
    #[arg(long, default_value = "host1")]
    name: String,
}

/// `--via-agent`: `qd` tasks writing through an in-process agent for `seconds`.
fn via_agent(a: &BenchDeviceArgs, volume: &str, slots: u64) -> Result<(u64, f64)> {
    use bytes::Bytes;
    use drv_agent::{Agent, AgentOptions, FileDisk};
    let store = drv_config::ConfigStore::open_read_only(&a.config)
        .with_context(|| format!("open configuration {}", a.config.display()))?;
    let view = store.volume(volume).with_context(|| format!("load volume {volume}"))?;
    let id =
        drv_transport::Identity::load(&a.certs, &a.name).with_context(|| format!("load certificate {}", a.name))?;
    let staging = crate::servers::addr(&view.staging.1.address)?;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&a.path)?;
    let rt = crate::servers::runtime()?;
    rt.block_on(async {
        let disk = std::sync::Arc::new(FileDisk(f));
        let agent =
            Agent::start(&id, staging, view.volume.id, view.volume.size_bytes, disk, None, AgentOptions::default())
                .await
                .with_context(|| format!("start an agent of volume {volume}"))?;
        let slots = slots.min(view.volume.size_bytes / a.bs).max(1);
        // Timed from here: the agent's start (connecting to staging) is not a write.
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs_f64(a.seconds);
        let mut tasks = Vec::new();
        for t in 0..a.qd as u64 {
            let (agent, bs, seq) = (agent.clone(), a.bs, a.pattern == "seq");
            let qd = a.qd as u64;
            tasks.push(tokio::spawn(async move {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                let data = Bytes::from(vec![t as u8 ^ 0x5a; bs as usize]);
                let mut n = 0u64;
                while Instant::now() < end {
                    let slot = if seq {
                        (n * qd + t) % slots
                    } else {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x % slots
                    };
                    agent.write(slot * bs, data.clone(), drv_format::record::Flags::default()).await?;
                    n += 1;
                }
                Ok::<u64, drv_agent::AgentError>(n)
            }));
        }
        let mut writes = 0;
        for t in tasks {
            writes += t.await??;
        }
        Ok((writes, t0.elapsed().as_secs_f64()))
    })
}

pub fn run(a: BenchDeviceArgs) -> Result<()> {
    if a.bs == 0 || !a.bs.is_multiple_of(4096) || a.bs > 64 << 20 {
        bail!("--bs {} must be a multiple of 4096 up to 64 MiB", a.bs);
    }
    if !matches!(a.pattern.as_str(), "seq" | "rand") {
        bail!("--pattern {:?}: seq or rand", a.pattern);
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(if a.via_agent.is_some() { 0 } else { libc::O_DIRECT })
        .open(&a.path)
        .with_context(|| format!("open {} with O_DIRECT", a.path.display()))?;
    let size = {
        use std::io::Seek;
        let mut r = &f;
        r.seek(std::io::SeekFrom::End(0))?
    };
    let span = a.span.unwrap_or(size).min(size);
    let slots = span / a.bs;
    if slots == 0 {
        bail!("{} has {size} bytes, less than one write of {}", a.path.display(), a.bs);
    }
    let t0 = Instant::now();
    if let Some(volume) = &a.via_agent {
        let (writes, secs) = via_agent(&a, volume, slots)?;
        return report(&a, writes, secs);
    }
    let end = Instant::now() + Duration::from_secs_f64(a.seconds);
    let counts: Vec<u64> = std::thread::scope(|s| -> Result<Vec<u64>> {
        let mut hs = Vec::new();
        for t in 0..a.qd as u64 {
            let (f, a) = (&f, &a);
            hs.push(s.spawn(move || -> std::io::Result<u64> {
                let mut buf = drv_files::aligned::AlignedBuf::zeroed(a.bs as usize);
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                for chunk in buf.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
                }
                let mut n = 0u64;
                let mut r = Ok(());
                while Instant::now() < end {
                    let slot = if a.pattern == "seq" {
                        (n * a.qd as u64 + t) % slots
                    } else {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x % slots
                    };
                    buf[..8].copy_from_slice(&x.to_le_bytes());
                    if let Err(e) = f.write_all_at(&buf, slot * a.bs) {
                        r = Err(e);
                        break;
                    }
                    n += 1;
                }
                r.map(|()| n)
            }));
        }
        hs.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("writer panicked"))?.context("write")).collect()
    })?;
    report(&a, counts.iter().sum(), t0.elapsed().as_secs_f64())
}

fn report(a: &BenchDeviceArgs, writes: u64, secs: f64) -> Result<()> {
    let iops = writes as f64 / secs;
    let mbps = iops * a.bs as f64 / 1e6;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"path": a.path, "pattern": a.pattern, "bs": a.bs, "qd": a.qd, "seconds": secs, "writes": writes, "iops": iops, "mb_per_s": mbps})
        );
    } else {
        println!(
            "{}: {} {} B writes, QD{}: {writes} in {secs:.1} s = {iops:.0} IOPS, {mbps:.1} MB/s",
            a.path.display(),
            a.pattern,
            a.bs,
            a.qd
        );
    }
    Ok(())
}
