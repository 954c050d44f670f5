//! `cargo xtask bench agent`: the agent's synchronous path against floors measured in the same run.
//!
//! - QD1 4 KiB write latency through the agent (staging durable, then the local write) against the
//!   floor: a 4 KiB `O_DIRECT` write + `fdatasync` on the staging file system, plus a 4 KiB local
//!   write, plus a round trip of a 4 KiB frame on the agent link's transport (TLS over TCP) on
//!   loopback between two CPUs (the same round trip within one CPU is printed too).
//! - QD32 4 KiB IOPS through the agent against local-only writes of the same file: buffered (the
//!   page cache, no durability) and durable (`pwrite` + `fdatasync`, what an application that needs
//!   each write stable pays without drv).
//!
//! - Resync of 1% dirty blocks of a 4 GiB volume (1 GiB with `--quick`) after staging was away,
//!   against `rsync --inplace --no-whole-file` bringing a copy of the old image up to date: time
//!   and bytes sent.
//!
//! Floors and the agent are measured in four alternating rounds (the disk's `fdatasync` latency
//! drifts by 2x within minutes here); before each local round the replica gets a second to drain
//! and the agent's buffered local writes are flushed, so the baseline is not charged for them.
//!
//! Staging and replica run as separate processes (release build); the agent runs in this process
//! with its state directory (change map and activity log), warmed so the activity log holds the
//! extents written. The protected file and staging's WRL share the disk under test. The replica
//! stands for the DR site and keeps its DR log and target in RAM (`/dev/shm`): on this one-disk
//! VM its apply (a flood of random 4 KiB writes flushed every 50 ms) otherwise queues ahead of
//! staging's `fdatasync`s, which no deployment has (the replica is at another site). Its CPU is
//! still this host's, as are the relay's. Measured while choosing this (QD32, agent only):
//! replica on the same disk ~31k IOPS, in RAM ~36k, replica stopped ~53k.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use drv_agent::{Agent, AgentOptions, FileDisk, Mode};
use drv_format::record::Flags;
use drv_transport::{Identity, Role, ca};

use crate::relay::{setup_volume, start};

const REGION: u64 = 64 << 20;

fn pct(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

/// 4 KiB buffered pwrite latencies (us) to `path`.
fn local_write_latency(path: &Path, n: usize) -> Result<Vec<f64>> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let buf = vec![7u8; 4096];
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f.write_all_at(&buf, (i as u64 * 7919 % (REGION / 4096)) * 4096)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(lat)
}

/// Pins the calling thread to one CPU (best effort: a host with fewer CPUs leaves it alone).
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within it for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Round trips (us) of a 4 KiB `Write` frame and its `Ack` over the agent link (TLS over TCP, the
/// transport of the synchronous path): a blocking server thread answering at once, and the client
/// on a runtime worker, as the agent's writers are. Client and server are pinned to the CPUs
/// given: on two CPUs a round trip pays for waking the other one (about 40 us each way on this
/// VM), as one between two hosts does; on one CPU it does not. Unpinned, the scheduler picks
/// either, and the floor swung from 10 to 88 us between runs.
fn link_rtt(dir: &Path, n: usize, client_cpu: usize, server_cpu: usize) -> Result<Vec<f64>> {
    use drv_format::frame::Frame;
    use drv_transport::{link, tls};
    let certs = dir.join("rtt-certs");
    let _ = std::fs::remove_dir_all(&certs);
    ca::init(&certs)?;
    ca::issue(&certs, Role::Staging, "echo")?;
    ca::issue(&certs, Role::Agent, "ping")?;
    let (echo, ping) = (Identity::load(&certs, "echo")?, Identity::load(&certs, "ping")?);
    let server_cfg = tls::server_config(&echo, &[Role::Agent])?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        pin_to_cpu(server_cpu);
        let Ok((s, _)) = listener.accept() else { return };
        let Ok((l, mut r)) = link::accept(s, server_cfg, 1 << 20) else { return };
        while let Ok(Some(f)) = r.next_blocking() {
            if let Frame::Write { volume_id, seq, .. } = f
                && l.send(&Frame::Ack { volume_id, seq, lsn: seq }).is_err()
            {
                return;
            }
        }
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(move || pin_to_cpu(client_cpu))
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (l, mut r) = link::connect(addr, tls::client_config(&ping, Role::Staging)?, 1 << 20).await?;
        let data = Bytes::from(vec![9u8; 4096]);
        tokio::spawn(async move {
            let mut lat = Vec::with_capacity(n);
            for seq in 1..=n as u64 {
                let t = Instant::now();
                l.send(&Frame::Write {
                    volume_id: 1,
                    seq,
                    epoch: 1,
                    offset: 0,
                    flags: 0,
                    capture_unix: 0,
                    data: data.clone(),
                })?;
                match r.next().await? {
                    Some(Frame::Ack { .. }) => {}
                    other => anyhow::bail!("echo answered {other:?}"),
                }
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            l.shutdown();
            Ok(lat)
        })
        .await?
    })
}

/// `threads` threads doing 4 KiB writes (with `fdatasync` after each when `sync`) for `secs`:
/// (writes, seconds).
fn local_iops(path: &Path, threads: usize, sync: bool, secs: f64) -> Result<(u64, f64)> {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let mut hs = Vec::new();
    for t in 0..threads {
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        hs.push(std::thread::spawn(move || -> std::io::Result<u64> {
            let buf = vec![t as u8; 4096];
            let mut n = 0u64;
            while Instant::now() < end {
                f.write_all_at(&buf, ((n * 32 + t as u64) * 7919 % (REGION / 4096)) * 4096)?;
                if sync {
                    f.sync_data()?;
                }
                n += 1;
            }
            Ok(n)
        }));
    }
    let mut total = 0;
    for h in hs {
        total += h.join().map_err(|_| anyhow::anyhow!("writer thread"))??;
    }
    Ok((total, t0.elapsed().as_secs_f64()))
}

/// A directory on `/dev/shm` (tmpfs), removed when dropped.
struct RamDir(std::path::PathBuf);

impl RamDir {
    fn new(name: &str) -> Result<RamDir> {
        let p = Path::new("/dev/shm").join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
        Ok(RamDir(p))
    }
}

impl Drop for RamDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Time and bytes of the agent's resync of 1% dirty blocks, and of rsync doing the same job.
struct ResyncFigures {
    volume: u64,
    dirty: u64,
    resync_secs: f64,
    resync_bytes: u64,
    rsync_secs: f64,
    rsync_sent: u64,
}

fn ensure_rsync() -> Result<()> {
    let have =
        std::process::Command::new("rsync").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if !have {
        crate::run(std::process::Command::new("apt-get").args(["install", "-y", "-q", "rsync"]))
            .context("install rsync (the baseline of the resync benchmark)")?;
    }
    Ok(())
}

fn resync_vs_rsync(drv: &Path, dir: &Path, quick: bool) -> Result<ResyncFigures> {
    ensure_rsync()?;
    let volume: u64 = if quick { 1 << 30 } else { 4 << 30 };
    let block: u64 = 64 << 10;
    let s = setup_volume(dir, &dir.join("rep1"), volume + (1 << 30), 256 << 20, volume)?;
    let mut staging = start(drv, &s, "staging", "stg1", &dir.join("stg1.log"))?;
    let mut replica = start(drv, &s, "replica", "rep1", &dir.join("rep1.log"))?;
    let source = dir.join("source.img");
    {
        let f = std::fs::File::create(&source)?;
        for i in 0..volume / (64 << 20) {
            f.write_all_at(&drv_format::pattern(i, 64 << 20), i * (64 << 20))?;
        }
        f.sync_all()?;
    }
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&source)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let id = Identity::load(&s.certs, "host1")?;
    let staging_pid = staging.id() as i32;
    let result = rt.block_on(async {
        let opts = AgentOptions {
            ack_timeout: Duration::from_millis(500),
            reconnect_interval: Duration::from_millis(100),
            ..AgentOptions::default()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let agent = loop {
            let disk = Arc::new(FileDisk(f.try_clone()?));
            match Agent::start(&id, s.staging, s.volume_id, volume, disk, Some(&dir.join("agent-state")), opts.clone())
                .await
            {
                Ok(a) if a.mode() == Mode::Sync => break a,
                _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
                Ok(a) => anyhow::bail!("agent not in sync mode: {:?}", a.status()),
                Err(e) => return Err(e).context("start agent"),
            }
        };
        // The replica starts equal to the source: an initial sync of the whole volume.
        let t = Instant::now();
        agent.start_initial_sync(None).await?;
        while agent.mode() != Mode::Sync || agent.dirty_bytes() > 0 {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(900),
                "initial sync did not finish: {:?}",
                agent.status()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("initial sync of {} MiB: {:.1} s", volume >> 20, t.elapsed().as_secs_f64());
        // rsync's starting point: a copy of the image as the replica has it now.
        std::fs::copy(&source, dir.join("rsync-dst.img"))?;
        // Staging goes away (stopped): writes to 1% of the blocks land in the change map.
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(staging_pid, libc::SIGSTOP) };
        let blocks = volume / block;
        let mut rng = 0x1234_5678u64;
        let mut chosen = std::collections::BTreeSet::new();
        while (chosen.len() as u64) < blocks / 100 {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            chosen.insert((rng >> 17) % blocks);
        }
        for b in &chosen {
            let data = Bytes::from(drv_format::pattern(b ^ 0xdead, block as usize));
            agent.write(b * block, data, Flags::default()).await?;
        }
        let dirty = agent.dirty_bytes();
        anyhow::ensure!(agent.mode() == Mode::ChangeMap, "agent did not switch to its change map");
        let stat = |a: &Agent| {
            let st = a.stats();
            let o = std::sync::atomic::Ordering::Relaxed;
            (st.resync_bytes.load(o), st.resync_blocks.load(o))
        };
        let before = stat(&agent);
        // SAFETY: as above.
        unsafe { libc::kill(staging_pid, libc::SIGCONT) };
        let t = Instant::now();
        while agent.mode() != Mode::Sync || agent.dirty_bytes() > 0 {
            anyhow::ensure!(t.elapsed() < Duration::from_secs(300), "resync did not finish: {:?}", agent.status());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let resync_secs = t.elapsed().as_secs_f64();
        let after = stat(&agent);
        // On the wire to staging: each block is a Write frame (16-byte frame header, 40-byte write
        // header, the data).
        let resync_bytes = (after.0 - before.0) + (after.1 - before.1) * 56;
        Ok::<_, anyhow::Error>((dirty, resync_secs, resync_bytes))
    });
    let _ = staging.kill();
    let _ = replica.kill();
    let _ = staging.wait();
    let _ = replica.wait();
    let (dirty, resync_secs, resync_bytes) = result?;
    // The same job by rsync: bring the old copy up to date, in place, with its delta algorithm.
    // `--ignore-times`: the copy and the writes may fall in the same second, and rsync's quick
    // check (same size and mtime) would then skip the file and send nothing (seen with --quick).
    let t = Instant::now();
    let out = std::process::Command::new("rsync")
        .args(["--inplace", "--no-whole-file", "--ignore-times", "--stats"])
        .arg(&source)
        .arg(dir.join("rsync-dst.img"))
        .output()
        .context("run rsync")?;
    let rsync_secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(out.status.success(), "rsync failed: {}", String::from_utf8_lossy(&out.stderr));
    let stats = String::from_utf8_lossy(&out.stdout);
    let rsync_sent = stats
        .lines()
        .find(|l| l.starts_with("Total bytes sent:"))
        .and_then(|l| l.split(':').nth(1))
        .map(|v| v.trim().replace(',', ""))
        .and_then(|v| v.parse::<u64>().ok())
        .context("rsync --stats: no 'Total bytes sent'")?;
    Ok(ResyncFigures { volume, dirty, resync_secs, resync_bytes, rsync_secs, rsync_sent })
}

/// QD1: `n` sequential 4 KiB writes through the agent, from a task on the runtime's workers (as a
/// capture path's writers are, not the `block_on` thread, which every completion would have to
/// wake from a worker). Latencies in us.
async fn agent_qd1(agent: &Agent, n: usize, first: u64) -> Result<Vec<f64>> {
    let (a, d) = (agent.clone(), Bytes::from(vec![0x5au8; 4096]));
    Ok(tokio::spawn(async move {
        let mut lat = Vec::with_capacity(n);
        for i in first..first + n as u64 {
            let t = Instant::now();
            a.write((i * 7919 % (REGION / 4096)) * 4096, d.clone(), Flags::default()).await?;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok::<_, drv_agent::AgentError>(lat)
    })
    .await??)
}

/// QD32: 32 writer tasks doing 4 KiB writes through the agent for `secs`: (writes, seconds).
async fn agent_qd32(agent: &Agent, secs: f64, round: u64) -> Result<(u64, f64)> {
    let data = Bytes::from(vec![0x5au8; 4096]);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let (agent, data) = (agent.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = 0u64;
            while Instant::now() < end {
                let block = ((round << 40) + k * 32 + t) * 7919 % (REGION / 4096);
                agent.write(block * 4096, data.clone(), Flags::default()).await?;
                k += 1;
            }
            Ok::<u64, drv_agent::AgentError>(k)
        }));
    }
    let mut writes = 0;
    for t in tasks {
        writes += t.await??;
    }
    Ok((writes, t0.elapsed().as_secs_f64()))
}

pub fn bench(drv: &Path, dir: &Path, quick: bool) -> Result<()> {
    let n = if quick { 1000 } else { 4000 };
    let secs = if quick { 3.0 } else { 8.0 };
    // Baselines and the agent are measured in alternating rounds, so that a slow spell of the
    // disk (this host's fdatasync latency drifts by 2x within minutes) falls on both alike.
    let rounds = 4usize;
    let volume = 1u64 << 30;
    // The replica stands for the DR site: its storage is not the disk under test (see the module
    // documentation), so it lives in RAM. Its CPU is still this host's.
    let replica_data = RamDir::new("drv-bench-agent-replica")?;
    let s = setup_volume(dir, &replica_data.0, 2 << 30, 256 << 20, volume)?;
    let mut staging = start(drv, &s, "staging", "stg1", &dir.join("stg1.log"))?;
    let mut replica = start(drv, &s, "replica", "rep1", &dir.join("rep1.log"))?;
    let source = dir.join("source.img");
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&source)?;
    f.set_len(volume)?;
    let floor_file = dir.join("floor.bin");
    std::fs::write(&floor_file, vec![0u8; 16 << 20])?;
    let buffered = local_iops(&source, 32, false, secs / 2.0)?;
    let buffered = buffered.0 as f64 / buffered.1;

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let id = Identity::load(&s.certs, "host1")?;
    let result = (|| -> Result<_> {
        let agent = rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(30);
            let agent = loop {
                let disk = Arc::new(FileDisk(f.try_clone()?));
                let state = dir.join("agent-state");
                match Agent::start(&id, s.staging, s.volume_id, volume, disk, Some(&state), AgentOptions::default())
                    .await
                {
                    Ok(a) if a.mode() == Mode::Sync => break a,
                    _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
                    Ok(a) => anyhow::bail!("agent not in sync mode: {:?}", a.status()),
                    Err(e) => return Err(e).context("start agent"),
                }
            };
            // Warm-up: the activity log holds the region's extents, as it does for a busy volume.
            let data = Bytes::from(vec![0x5au8; 4096]);
            for x in 0..REGION / (4 << 20) {
                agent.write(x * (4 << 20), data.clone(), Flags::default()).await?;
            }
            Ok::<_, anyhow::Error>(agent)
        })?;
        // Development shortcut: DRV_BENCH_QD32_ONLY=SECS runs only the agent's QD32 load, for a
        // profiler to watch (`perf record -a`), and then stops.
        if let Some(s) = std::env::var_os("DRV_BENCH_QD32_ONLY") {
            let s: f64 = s.to_string_lossy().parse().context("DRV_BENCH_QD32_ONLY: seconds")?;
            eprintln!("QD32 through the agent for {s} s, pid {}", std::process::id());
            let a = rt.block_on(agent_qd32(&agent, s, 0))?;
            eprintln!("QD32 through the agent: {:.0} IOPS", a.0 as f64 / a.1);
            anyhow::bail!("DRV_BENCH_QD32_ONLY: done");
        }
        let (mut sync, mut local, mut rtt, mut rtt_one, mut through) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (mut durable, mut agent_io) = ((0u64, 0f64), (0u64, 0f64));
        let per = n / rounds;
        for round in 0..rounds {
            eprintln!("round {}/{rounds}: floors, QD1, QD32 ({:.1} s each side)", round + 1, secs / rounds as f64);
            sync.extend(crate::fdatasync_samples(&floor_file, per)?);
            local.extend(local_write_latency(&source, per)?);
            rtt.extend(link_rtt(dir, per, 0, 1.min(cpus - 1))?);
            rtt_one.extend(link_rtt(dir, per, 0, 0)?);
            through.extend(rt.block_on(agent_qd1(&agent, per, (round * per) as u64))?);
            // The relay and the replica's apply drain the previous agent round's backlog first,
            // and the agent's buffered local writes are flushed, so the local baseline runs on a
            // quiet host and its `fdatasync`s do not write back the agent's pages.
            std::thread::sleep(Duration::from_secs(1));
            f.sync_all()?;
            let d = local_iops(&source, 32, true, secs / rounds as f64)?;
            let a = rt.block_on(agent_qd32(&agent, secs / rounds as f64, round as u64))?;
            (durable.0, durable.1) = (durable.0 + d.0, durable.1 + d.1);
            (agent_io.0, agent_io.1) = (agent_io.0 + a.0, agent_io.1 + a.1);
        }
        Ok((
            pct(sync),
            pct(local),
            pct(rtt),
            pct(rtt_one),
            pct(through),
            durable.0 as f64 / durable.1,
            agent_io.0 as f64 / agent_io.1,
        ))
    })();
    drop(rt);
    let _ = staging.kill();
    let _ = replica.kill();
    let _ = staging.wait();
    let _ = replica.wait();
    let (
        (sync_p50, sync_p99),
        (local_p50, local_p99),
        (rtt_p50, rtt_p99),
        (rtt1_p50, rtt1_p99),
        (p50, p99),
        durable,
        iops,
    ) = result?;
    let (floor_p50, floor_p99) = (sync_p50 + local_p50 + rtt_p50, sync_p99 + local_p99 + rtt_p99);
    // Development shortcut: DRV_BENCH_SKIP_RESYNC=1 measures the synchronous path only.
    let skip_resync = std::env::var_os("DRV_BENCH_SKIP_RESYNC").is_some();
    let rdir = dir.join("resync");
    std::fs::create_dir_all(&rdir)?;
    let r = if skip_resync { None } else { Some(resync_vs_rsync(drv, &rdir, quick)?) };
    let _ = std::fs::remove_file(rdir.join("rsync-dst.img"));
    println!();
    println!("== cargo xtask bench agent ({}) ==", if quick { "quick" } else { "full" });
    println!("QD1 4 KiB writes, {n} each, in {rounds} alternating rounds (us):");
    println!(
        "  staging fdatasync floor     p50 {sync_p50:>8.1}  p99 {sync_p99:>8.1}   (4 KiB O_DIRECT write + fdatasync)"
    );
    println!("  local write                 p50 {local_p50:>8.1}  p99 {local_p99:>8.1}");
    println!(
        "  link round trip (4 KiB)     p50 {rtt_p50:>8.1}  p99 {rtt_p99:>8.1}   (TLS over TCP, loopback, ends on two CPUs)"
    );
    println!(
        "  (same, both ends on one CPU p50 {rtt1_p50:>8.1}  p99 {rtt1_p99:>8.1}   not in the floor: two hosts never share one)"
    );
    println!("  floor (sum)                 p50 {floor_p50:>8.1}  p99 {floor_p99:>8.1}");
    println!(
        "  through the agent           p50 {p50:>8.1}  p99 {p99:>8.1}   ratio p50 {:.2} (goal <= 1.10), p99 {:.2}",
        p50 / floor_p50,
        p99 / floor_p99
    );
    println!("QD32 4 KiB writes ({secs:.0} s each, durable and agent in {rounds} alternating rounds; IOPS):");
    println!("  local only, buffered        {buffered:>9.0}   (page cache, nothing durable)");
    println!("  local only, durable         {durable:>9.0}   (pwrite + fdatasync per write)");
    println!(
        "  through the agent           {iops:>9.0}   ratio vs durable {:.2} (goal >= 0.50), vs buffered {:.3}",
        iops / durable,
        iops / buffered
    );
    if let Some(r) = r {
        println!(
            "resync of 1% dirty blocks of a {} GiB volume ({} MiB dirty, 64 KiB blocks):",
            r.volume >> 30,
            r.dirty >> 20
        );
        println!("  rsync --inplace --no-whole-file  {:>7.2} s   {:>12} bytes sent", r.rsync_secs, r.rsync_sent);
        println!(
            "  drv resync                        {:>7.2} s   {:>12} bytes sent   time ratio {:.3} (goal <= 0.10), bytes {:.2}x dirty (goal <= 1.10)",
            r.resync_secs,
            r.resync_bytes,
            r.resync_secs / r.rsync_secs,
            r.resync_bytes as f64 / r.dirty as f64
        );
    }
    Ok(())
}
