//! `drv demo`: the README's first command. Staging, replica and agent run in this one process on
//! temporary files, over loopback QUIC with mutual TLS exactly as separate hosts would: an
//! installation CA and certificates, a configuration store, a staging server with a two-device WRL,
//! a replica server with its DR log, and an agent protecting a source image. Concurrent writers
//! write through the agent (each write durable at staging before it reaches the source image);
//! at the end the replica image must equal the source image (digests), and the run prints writes,
//! epochs, lag and throughput.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use clap::Args;
use drv_agent::{Agent, AgentOptions, FileDisk};
use drv_config::{ConfigStore, Kind};
use drv_format::record::Flags;
use drv_transport::{Identity, Role, ca};

#[derive(Args)]
pub struct DemoArgs {
    /// Concurrent writers.
    #[arg(long, default_value_t = 8)]
    writers: u64,
    /// Bytes written in all (e.g. 256M).
    #[arg(long, default_value = "256M", value_parser = drv_config::size_bytes)]
    bytes: u64,
    /// Size of the protected volume.
    #[arg(long, default_value = "128M", value_parser = drv_config::size_bytes)]
    volume: u64,
    /// Keep the temporary directory (its path is printed).
    #[arg(long)]
    keep: bool,
}

pub fn run(a: DemoArgs) -> Result<()> {
    ensure!(a.writers > 0 && a.volume >= 1 << 20, "need at least one writer and a volume of 1 MiB or more");
    let dir = std::env::temp_dir().join(format!("drv-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let rt = crate::servers::runtime()?;
    let result = rt.block_on(demo(&a, &dir));
    rt.shutdown_timeout(Duration::from_secs(2));
    if a.keep {
        println!("kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn free_port() -> Result<u16> {
    // Free for TCP too: the staging server's agent link listens at the same port number.
    Ok(drv_transport::free_port([127, 0, 0, 1].into())?)
}

/// CA, certificates, key and configuration of a one-staging, one-replica installation.
fn install(dir: &Path, volume_bytes: u64) -> Result<(SocketAddr, SocketAddr, u64)> {
    let certs = dir.join("certs");
    ca::init(&certs)?;
    for (role, name) in [(Role::Staging, "stg1"), (Role::Replica, "rep1"), (Role::Agent, "host1")] {
        ca::issue(&certs, role, name)?;
    }
    crate::generate_key(&dir.join("vol1.key"), false)?;
    let staging: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let replica: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let st = ConfigStore::open(&dir.join("config.redb"))?;
    let set = |k: Kind, n: &str, v: Vec<String>| st.set(k, n, &v).with_context(|| format!("configure {n}"));
    set(Kind::Endpoint, "stg1", vec!["role=staging".into(), format!("address={staging}")])?;
    set(
        Kind::Endpoint,
        "rep1",
        vec![
            "role=replica".into(),
            format!("address={replica}"),
            format!("data_dir={}", dir.join("replica").display()),
            "drlog_bytes=512M".into(),
        ],
    )?;
    set(Kind::Key, "k1", vec![format!("path={}", dir.join("vol1.key").display())])?;
    set(
        Kind::Wrl,
        "w0",
        vec![
            "staging=stg1".into(),
            format!("devices=[\"{}\",\"{}\"]", dir.join("wrl-a").display(), dir.join("wrl-b").display()),
            "segment_bytes=16M".into(),
            "device_bytes=256M".into(),
        ],
    )?;
    let v = set(
        Kind::Volume,
        "vol1",
        vec![format!("size_bytes={volume_bytes}"), "wrl=w0".into(), "replicas=[\"rep1\"]".into(), "key=k1".into()],
    )?;
    Ok((staging, replica, v["id"].as_u64().context("volume id")?))
}

/// A write of the workload: offset and length (4 KiB aligned, 4 to 64 KiB) from a seeded generator.
fn next_write(state: &mut u64, volume: u64) -> (u64, usize) {
    *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let r = *state >> 11;
    let len = 4096 * (1 + (r % 16) as usize);
    let blocks = (volume - len as u64) / 4096;
    ((r >> 8) % (blocks + 1) * 4096, len)
}

fn digest(path: &Path) -> Result<u128> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    Ok(xxhash_rust::xxh3::xxh3_128(&bytes))
}

async fn demo(a: &DemoArgs, dir: &Path) -> Result<()> {
    let (staging_addr, replica_addr, volume_id) = install(dir, a.volume)?;
    let certs = dir.join("certs");
    let store = ConfigStore::open_read_only(&dir.join("config.redb"))?;
    println!("drv demo in {}", dir.display());
    println!("  staging  stg1 on {staging_addr} (WRL on two devices), replica rep1 on {replica_addr}");

    let replica = drv_replica::ReplicaServer::new(&store.node("rep1")?, Identity::load(&certs, "rep1")?)
        .context("start replica")?;
    let staging = drv_staging::server::Staging::new(&store.node("stg1")?, Identity::load(&certs, "stg1")?)
        .context("start staging")?;
    drop(store);
    let target = replica.volume_list().into_iter().next().context("replica volume")?.target_path.clone();
    {
        let r = replica.clone();
        tokio::spawn(async move { r.run(replica_addr).await });
        let s = staging.clone();
        tokio::spawn(async move { s.run(staging_addr).await });
    }

    // The protected volume: a source image the agent writes after staging has each write.
    let source = dir.join("source.img");
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&source)?;
    f.set_len(a.volume)?;
    let agent_id = Identity::load(&certs, "host1")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let agent = loop {
        let disk = Arc::new(FileDisk(f.try_clone()?));
        let state = dir.join("agent-state");
        match Agent::start(&agent_id, staging_addr, volume_id, a.volume, disk, Some(&state), AgentOptions::default())
            .await
        {
            Ok(a) => break a,
            Err(e) if Instant::now() < deadline => tracing::debug!("agent not connected yet: {e}"),
            Err(e) => return Err(e).context("agent connect to staging"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("  agent    host1 protecting {} ({} MiB)", source.display(), a.volume >> 20);

    let bar = indicatif::ProgressBar::new(a.bytes);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "  writing  [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}  {msg}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    let started = Instant::now();
    let per_writer = a.bytes / a.writers;
    let mut tasks = Vec::new();
    for w in 0..a.writers {
        let (agent, bar, volume) = (agent.clone(), bar.clone(), a.volume);
        tasks.push(tokio::spawn(async move {
            let mut state = 0x9e37_79b9_7f4a_7c15 ^ (w + 1);
            let mut done = 0u64;
            let mut n = 0u64;
            while done < per_writer {
                let (offset, len) = next_write(&mut state, volume);
                let data = Bytes::from(drv_format::pattern(state, len));
                // Every 64th write of a writer is followed by a cache flush, as file systems do.
                let flags = if n % 64 == 63 { Flags::FLUSH } else { Flags::default() };
                agent.write(offset, data, flags).await?;
                done += len as u64;
                n += 1;
                bar.inc(len as u64);
            }
            Ok::<u64, drv_agent::AgentError>(n)
        }));
    }
    let mut writes = 0;
    for t in tasks {
        writes += t.await.context("writer task")??;
    }
    agent.write(0, Bytes::new(), Flags::FLUSH).await?;
    let elapsed = started.elapsed();
    bar.finish_with_message("done");
    let bytes = agent.stats().bytes.load(std::sync::atomic::Ordering::Relaxed);

    // The last epoch ends once the agent is idle; then the replica applies it.
    let (next_seq, epoch) = agent.position();
    let t0 = Instant::now();
    let last_seq = loop {
        let st = replica.status();
        let applied = st.volumes[0].applied_seq;
        // The idle EPOCH_END record takes the sequence after the last write.
        if applied + 1 >= next_seq && agent.position().0 > next_seq {
            break applied;
        }
        if let Some(e) = &st.volumes[0].error {
            bail!("replica apply stopped: {e}");
        }
        ensure!(t0.elapsed() < Duration::from_secs(60), "the replica did not catch up: {st:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let lag = t0.elapsed();
    let st = staging.status();
    let (src, rep) = (digest(&source)?, digest(&target)?);
    println!(
        "  wrote    {writes} writes, {:.1} MiB in {:.2} s: {:.0} writes/s, {:.1} MB/s, each durable at staging before the local write",
        bytes as f64 / (1 << 20) as f64,
        elapsed.as_secs_f64(),
        writes as f64 / elapsed.as_secs_f64(),
        bytes as f64 / elapsed.as_secs_f64() / 1e6
    );
    println!(
        "  epochs   {epoch} (writes in flight together share one); replica applied through seq {last_seq} {:.0} ms after the last write",
        lag.as_secs_f64() * 1e3
    );
    println!(
        "  staging  {} group commits for {} records; relayed to rep1 with AES-256-GCM payloads",
        st.wrls[0].batches, st.wrls[0].appends
    );
    println!("  digests  source {src:032x}\n           replica {rep:032x}");
    ensure!(src == rep, "the replica image differs from the source image");
    println!("demo OK: the replica equals the source");
    Ok(())
}
