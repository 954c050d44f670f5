//! `cargo xtask bench snapshots`, any point in time: a volume keeping a 24 h retention window takes
//! a backlog whose capture times span the last two hours (64 KiB writes cycling over a 64 MiB
//! working set, each write its own epoch: every overwrite is preserved for the window), applied
//! with the replica catching up; then the point one hour back is materialized: `snapshot create
//! --at` that time, and a digest of its whole image (time, and the bytes the replica read).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use drv_format::frame::{Frame, snapshot_op};
use drv_proto::status::{ReplicaStatus, SnapshotInfo};
use drv_transport::{Identity, Role, quic};

use crate::relay::{Setup, agent_load_at, disconnected, setup_volume, start, status_conn};
use crate::snapshots::{WRITE, replica_addr, wait_applied};

/// Capture times of the backlog span this long, ending now.
const SPAN_SECS: u32 = 7200;

async fn request(admin: &Identity, s: &Setup, op: u8, arg: u64, name: &str) -> Result<Vec<u8>> {
    let addr = replica_addr(s)?;
    let req = Frame::SnapshotRequest { volume_id: s.volume_id, op, arg, name: name.to_owned() };
    match quic::request(admin, addr, Role::Replica, &req, 1 << 20).await? {
        Some(Frame::SnapshotReply { json }) => Ok(json),
        other => bail!("snapshot request {op} {name}: {other:?}"),
    }
}

async fn window_open(admin: &Identity, s: &Setup) -> Result<()> {
    let addr = replica_addr(s)?;
    let t = Instant::now();
    loop {
        if let Ok(Some(Frame::StatusReply { json })) =
            quic::request(admin, addr, Role::Replica, &Frame::StatusRequest, 1 << 20).await
            && serde_json::from_slice::<ReplicaStatus>(&json).is_ok_and(|st| st.volumes[0].window.is_some())
        {
            return Ok(());
        }
        ensure!(t.elapsed() < Duration::from_secs(30), "the retention window did not open");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bytes process `pid` has read through read calls (`rchar` of /proc/PID/io).
fn read_bytes(pid: u32) -> Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    let line = io.lines().find_map(|l| l.strip_prefix("rchar: ")).ok_or_else(|| anyhow::anyhow!("no rchar"))?;
    Ok(line.trim().parse()?)
}

/// What one run measured.
struct Figures {
    apply_mbs: f64,
    seq: u64,
    create_ms: f64,
    digest_s: f64,
    read: u64,
}

pub fn bench(drv: &Path, dir: &Path, quick: bool, none_mbs: f64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let bytes: u64 = if quick { 128 << 20 } else { 512 << 20 };
    let s = setup_volume(dir, &dir.join("rep1"), 2 << 30, 256 << 20, 1 << 30)?;
    let set = Command::new(drv)
        .args(["config", "--store"])
        .arg(&s.config)
        .args(["set", "volume", "vol1", "retention=24h"])
        .output()?;
    ensure!(set.status.success(), "config set: {}", String::from_utf8_lossy(&set.stderr));
    let mut staging = start(drv, &s, "staging", "stg1", &dir.join("stg1.log"))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let r = rt.block_on(run(drv, dir, &s, bytes));
    let _ = staging.kill();
    let _ = staging.wait();
    let f = r?;
    println!(
        "any point in time: a {} MiB backlog captured over {} h (64 KiB writes over a 64 MiB working set, every write its own epoch), 24 h window:",
        bytes >> 20,
        SPAN_SECS / 3600
    );
    println!("  replica apply    {:.1} MB/s   {:.2} of apply with no snapshot", f.apply_mbs, f.apply_mbs / none_mbs);
    println!(
        "  materializing the point 1 hour back (seq {}): snapshot --at in {:.1} ms; its whole 1 GiB image read (digest) in {:.2} s, {} MiB read by the replica",
        f.seq,
        f.create_ms,
        f.digest_s,
        f.read >> 20
    );
    Ok(())
}

async fn run(drv: &Path, dir: &Path, s: &Setup, bytes: u64) -> Result<Figures> {
    let agent = Identity::load(&s.certs, "host1")?;
    let admin = Identity::load(&s.certs, "admin")?;
    let mut sc = status_conn(&admin, s.staging, dir).await?;
    // Up once: the window opens where the replica stands.
    let mut replica = start(drv, s, "replica", "rep1", &dir.join("rep1.log"))?;
    window_open(&admin, s).await?;
    let _ = replica.kill();
    let _ = replica.wait();
    disconnected(&mut sc).await?;
    let end = drv_format::record::capture_clock();
    let n = bytes / WRITE as u64;
    let clock = move |i: u64| end - SPAN_SECS + (i * u64::from(SPAN_SECS) / n) as u32;
    let last = agent_load_at(&agent, s.staging, s.volume_id, bytes, WRITE, None, 1, &clock).await?;
    let mut replica = start(drv, s, "replica", "rep1", &dir.join("rep1.log"))?;
    let t0 = Instant::now();
    while !sc.get().await.is_ok_and(|st| st.volumes[0].replicas[0].connected) {
        ensure!(t0.elapsed() < Duration::from_secs(60), "the relay did not connect");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    wait_applied(&mut sc, last - 1).await?;
    let apply_mbs = bytes as f64 / t.elapsed().as_secs_f64() / 1e6;
    let t = Instant::now();
    let at = u64::from(end - 3600);
    let snap: SnapshotInfo =
        serde_json::from_slice(&request(&admin, s, snapshot_op::CREATE_AT_TIME, at, "hour-back").await?)?;
    let create_ms = t.elapsed().as_secs_f64() * 1e3;
    let before = read_bytes(replica.id())?;
    let t = Instant::now();
    request(&admin, s, snapshot_op::DIGEST, 0, "hour-back").await?;
    let digest_s = t.elapsed().as_secs_f64();
    let read = read_bytes(replica.id())? - before;
    let _ = replica.kill();
    let _ = replica.wait();
    Ok(Figures { apply_mbs, seq: snap.seq, create_ms, digest_s, read })
}
