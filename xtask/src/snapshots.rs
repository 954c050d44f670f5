//! `cargo xtask bench snapshots`: what copy-on-write snapshots cost on a real replica.
//!
//! - Create: request to reply of `snapshot create` on an open QUIC connection (an upper bound of
//!   the server's work) on a sparse 1 GiB and a 16 GiB volume: it must not grow with the size.
//! - Apply: a backlog of 64 KiB writes cycling over a 64 MiB working set (each block overwritten
//!   twice per round) is loaded into staging while the replica is down; then the replica starts
//!   and the time until it applied everything is measured, with no snapshot, with one, and with
//!   eight taken at different moments (between loads of the working set), in alternating rounds.
//!   With snapshots the first overwrite of each block preserves it (read, write, sync, commit).
//! - Any point in time: `window.rs`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use drv_format::frame::{Frame, snapshot_op};
use drv_transport::{Identity, Role, quic};

use crate::relay::{Setup, StatusConn, agent_load, disconnected, setup_volume, start, status_conn};

pub(crate) const WRITE: usize = 64 << 10;

async fn snapshot(admin: &Identity, s: &Setup, addr: std::net::SocketAddr, op: u8, name: &str) -> Result<()> {
    let req = Frame::SnapshotRequest { volume_id: s.volume_id, op, arg: 0, name: name.to_owned() };
    match quic::request(admin, addr, Role::Replica, &req, 1 << 20).await? {
        Some(Frame::SnapshotReply { .. }) => Ok(()),
        other => bail!("snapshot {name}: {other:?}"),
    }
}

/// The replica's address in a setup (its endpoint in the configuration).
pub(crate) fn replica_addr(s: &Setup) -> Result<std::net::SocketAddr> {
    let st = drv_config::ConfigStore::open_read_only(&s.config)?;
    Ok(st.volume("vol1")?.replicas[0].1.address.parse()?)
}

/// Median time of `n` snapshot creations on a replica of a `volume_bytes` volume and of status
/// requests between them, in ms, on one connection (a stream per request).
fn create_ms(drv: &Path, dir: &Path, volume_bytes: u64, n: usize) -> Result<(f64, f64)> {
    std::fs::create_dir_all(dir)?;
    let s = setup_volume(dir, &dir.join("rep1"), 256 << 20, 64 << 20, volume_bytes)?;
    let mut replica = start(drv, &s, "replica", "rep1", &dir.join("rep1.log"))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let admin = Identity::load(&s.certs, "admin")?;
    let addr = replica_addr(&s)?;
    let r = rt.block_on(async {
        let t = Instant::now();
        let mut c = loop {
            if let Ok(mut c) = StatusConn::open_to(&admin, addr, Role::Replica).await
                && c.request(&Frame::StatusRequest).await.is_ok()
            {
                break c;
            }
            anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "the replica did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (mut ms, mut base) = (Vec::new(), Vec::new());
        for i in 0..n {
            let t = Instant::now();
            c.request(&Frame::StatusRequest).await?;
            base.push(t.elapsed().as_secs_f64() * 1e3);
            let req = Frame::SnapshotRequest {
                volume_id: s.volume_id,
                op: snapshot_op::CREATE,
                arg: 0,
                name: format!("s{i}"),
            };
            let t = Instant::now();
            match c.request(&req).await? {
                Some(Frame::SnapshotReply { .. }) => {}
                other => bail!("snapshot create: {other:?}"),
            }
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok((crate::median(ms), crate::median(base)))
    });
    let _ = replica.kill();
    let _ = replica.wait();
    r
}

pub fn bench(drv: &Path, dir: &Path, quick: bool) -> Result<()> {
    let n = if quick { 10 } else { 40 };
    let (small, base_s) = create_ms(drv, &dir.join("create-1g"), 1 << 30, n)?;
    let (large, base_l) = create_ms(drv, &dir.join("create-16g"), 16 << 30, n)?;
    println!("snapshot create, request to reply on an open connection (median of {n}):");
    println!("  1 GiB volume   {small:.2} ms (goal <= 10)   a status request: {base_s:.2} ms");
    println!("  16 GiB volume  {large:.2} ms (goal <= 10)   a status request: {base_l:.2} ms");
    println!("  ratio 16 GiB / 1 GiB {:.2} (goal <= 2)", large / small);
    let none = apply(drv, &dir.join("apply"), quick)?;
    crate::window::bench(drv, &dir.join("window"), quick, none)
}

/// Loads `bytes` into staging with the replica down, then times the replica's catch-up until it
/// applied everything; returns MB/s.
#[allow(clippy::too_many_arguments)]
async fn round(
    drv: &Path,
    dir: &Path,
    s: &Setup,
    agent: &Identity,
    admin: &Identity,
    snapshots: usize,
    bytes: u64,
    last: &mut u64,
) -> Result<f64> {
    let addr = replica_addr(s)?;
    let mut sc = status_conn(admin, s.staging, dir).await?;
    // Snapshots at different moments: a pass over the working set between two of them.
    let mut replica = start(drv, s, "replica", "rep1", &dir.join("rep1.log"))?;
    for i in 0..snapshots {
        *last = agent_load(agent, s.staging, s.volume_id, 64 << 20, WRITE, None, *last + 1).await?;
        wait_applied(&mut sc, *last - 1).await?;
        snapshot(admin, s, addr, snapshot_op::CREATE, &format!("r{last}-{i}")).await?;
    }
    let _ = replica.kill();
    let _ = replica.wait();
    disconnected(&mut sc).await?;
    *last = agent_load(agent, s.staging, s.volume_id, bytes, WRITE, None, *last + 1).await?;
    let mut replica = start(drv, s, "replica", "rep1", &dir.join("rep1.log"))?;
    // Timed from the relay's connection (its reconnect back-off is not the replica's cost).
    let t0 = Instant::now();
    while !sc.get().await.is_ok_and(|st| st.volumes[0].replicas[0].connected) {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(60), "the relay did not connect");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    wait_applied(&mut sc, *last - 1).await?;
    let mbs = bytes as f64 / t.elapsed().as_secs_f64() / 1e6;
    // The snapshots go, freeing the store for the next round.
    let list = Frame::SnapshotRequest { volume_id: s.volume_id, op: snapshot_op::LIST, arg: 0, name: String::new() };
    if let Some(Frame::SnapshotReply { json }) = quic::request(admin, addr, Role::Replica, &list, 1 << 20).await? {
        let list: Vec<drv_proto::status::SnapshotInfo> = serde_json::from_slice(&json)?;
        for snap in list {
            snapshot(admin, s, addr, snapshot_op::DELETE, &snap.name).await?;
        }
    }
    let _ = replica.kill();
    let _ = replica.wait();
    Ok(mbs)
}

pub(crate) async fn wait_applied(sc: &mut crate::relay::StatusConn, seq: u64) -> Result<()> {
    let t = Instant::now();
    loop {
        if let Ok(st) = sc.get().await
            && st.volumes[0].replicas[0].applied_seq >= seq
        {
            return Ok(());
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(600), "the replica did not apply up to seq {seq}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Returns the throughput with no snapshot (MB/s), the baseline of the window's figure.
fn apply(drv: &Path, dir: &Path, quick: bool) -> Result<f64> {
    std::fs::create_dir_all(dir)?;
    let bytes: u64 = if quick { 128 << 20 } else { 512 << 20 };
    let rounds = if quick { 1 } else { 3 };
    let s = setup_volume(dir, &dir.join("rep1"), 2 << 30, 256 << 20, 1 << 30)?;
    let mut staging = start(drv, &s, "staging", "stg1", &dir.join("stg1.log"))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let agent = Identity::load(&s.certs, "host1")?;
    let admin = Identity::load(&s.certs, "admin")?;
    let r = rt.block_on(async {
        let mut last = 0;
        let (mut none, mut one, mut eight) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            none.push(round(drv, dir, &s, &agent, &admin, 0, bytes, &mut last).await.context("no snapshot")?);
            one.push(round(drv, dir, &s, &agent, &admin, 1, bytes, &mut last).await.context("one snapshot")?);
            eight.push(round(drv, dir, &s, &agent, &admin, 8, bytes, &mut last).await.context("eight snapshots")?);
        }
        Ok::<_, anyhow::Error>((crate::median(none), crate::median(one), crate::median(eight)))
    });
    let _ = staging.kill();
    let _ = staging.wait();
    let (none, one, eight) = r?;
    println!(
        "replica apply of a {} MiB backlog (64 KiB writes over a 64 MiB working set), median of {rounds}:",
        bytes >> 20
    );
    println!("  no snapshot      {none:.1} MB/s");
    println!("  1 snapshot       {one:.1} MB/s   ratio {:.2} (goal >= 0.70)", one / none);
    println!("  8 snapshots      {eight:.1} MB/s   ratio {:.2} (goal >= 0.60)", eight / none);
    Ok(none)
}
