//! `drv bench-config` (run by `cargo xtask bench config`): the config servers measured against a
//! local configuration store on the same disk, in one process on loopback.
//!
//! - commit latency: one change (`set volume vN retention=...`) through the API of a group of
//!   three servers, against one commit of the same change to a local store (the same tables, the
//!   same size), in alternating rounds; p50 and p99 of each and their ratios;
//! - throughput: changes per second from 16 clients at once;
//! - propagation: 10 components (replica nodes, each following its slice as `drv replica run
//!   --config-server` does, cache and all) and 100 volumes; for each change, the time from the
//!   API's answer to the last component's report of the new version (as the server received it).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use drv_config::{ConfigStore, Kind, Op};
use drv_configd::PeerNode;
use drv_configd::client::ApiClient;
use drv_configd::server::{ConfigNode, Tuning, node_id};
use drv_transport::{Identity, Role, ca};

#[derive(Args)]
pub struct ConfigBenchArgs {
    /// A short run of the same shape.
    #[arg(long)]
    quick: bool,
    /// Where the servers' and the local store's files go (default: a new directory in /var/tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
}

const VOLUMES: usize = 100;
const COMPONENTS: usize = 10;
const CLIENTS: usize = 16;

fn set(kind: Kind, name: &str, a: &[String]) -> Op {
    Op::Set { kind, name: name.into(), assignments: a.to_vec(), if_version: None }
}

/// The installation the changes are made to: endpoints, a key, a WRL and 100 volumes.
fn population(dir: &Path) -> Vec<Op> {
    let mut ops = vec![
        set(Kind::Endpoint, "stg1", &["role=staging".into(), "address=127.0.0.1:7001".into()]),
        set(Kind::Key, "k1", &[format!("path={}", dir.join("k1.key").display())]),
        set(Kind::Wrl, "w0", &["staging=stg1".into(), "devices=[\"/dev/null\"]".into()]),
    ];
    for i in 0..COMPONENTS {
        ops.push(set(
            Kind::Endpoint,
            &format!("r{i}"),
            &["role=replica".into(), format!("address=127.0.0.1:{}", 7100 + i), "data_dir=/srv/drv".into()],
        ));
    }
    for i in 0..VOLUMES {
        let a =
            ["size_bytes=1G".into(), "wrl=w0".into(), format!("replicas=[\"r{}\"]", i % COMPONENTS), "key=k1".into()];
        ops.push(set(Kind::Volume, &format!("v{i}"), &a));
    }
    ops
}

/// The `n`th change of a run: a volume's retention.
fn change(n: usize) -> Op {
    set(Kind::Volume, &format!("v{}", n % VOLUMES), &[format!("retention={}", 3600 + n)])
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn start_group(dir: &Path, certs: &Path) -> Result<Vec<ConfigNode>> {
    let mut nodes = Vec::new();
    for name in ["c1", "c2", "c3"] {
        ca::issue(certs, Role::Config, name)?;
        let id = Identity::load(certs, name)?;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        nodes.push(ConfigNode::start(&id, &dir.join(name), l, Tuning::default()).await?);
    }
    let members = ["c1", "c2", "c3"]
        .iter()
        .zip(&nodes)
        .map(|(n, c)| (node_id(n), PeerNode { name: n.to_string(), address: c.addr().to_string() }))
        .collect::<std::collections::BTreeMap<_, _>>();
    nodes[0].raft.initialize(members).await.map_err(|e| anyhow::anyhow!("form the group: {e}"))?;
    Ok(nodes)
}

/// Commit latencies (ms) of `n` changes, one at a time, from change number `from`.
async fn api_round(client: &ApiClient, from: usize, n: usize) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for i in from..from + n {
        let t = Instant::now();
        client.commit(vec![change(i)]).await?;
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

fn local_round(store: &ConfigStore, from: usize, n: usize) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for i in from..from + n {
        let t = Instant::now();
        store.commit(vec![change(i)])?;
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

async fn throughput(client: &ApiClient, per_client: usize) -> Result<f64> {
    let t = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_client {
                client.commit(vec![change(100_000 + c * per_client + i)]).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((CLIENTS * per_client) as f64 / t.elapsed().as_secs_f64())
}

/// Starts the components and waits until each reported `version` or later.
async fn components(
    certs: &Path,
    dir: &Path,
    servers: &str,
    admin: &ApiClient,
    version: u64,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for i in 0..COMPONENTS {
        let name = format!("r{i}");
        ca::issue(certs, Role::Replica, &name)?;
        let client = ApiClient::new(servers, &Identity::load(certs, &name)?)?;
        let f = crate::follow::Follower::node(client, &name, dir.join(format!("{name}.cache.redb")));
        let s = f.start::<drv_config::NodeConfig>().await?;
        tasks.push(tokio::spawn(f.follow(s, |_: &drv_config::NodeConfig, _: &drv_config::NodeConfig| Vec::new())));
    }
    wait_reported(admin, version, Duration::from_secs(30)).await?;
    Ok(tasks)
}

/// Waits until every component reported `version` or later; the newest report's time (ms).
async fn wait_reported(admin: &ApiClient, version: u64, limit: Duration) -> Result<u64> {
    let end = Instant::now() + limit;
    loop {
        let c = admin.components_everywhere().await;
        if c.len() == COMPONENTS && c.iter().all(|c| c.version >= version) {
            return Ok(c.iter().map(|c| c.reported_unix_ms).max().unwrap_or(0));
        }
        anyhow::ensure!(Instant::now() < end, "components did not report version {version} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub fn run(a: ConfigBenchArgs) -> Result<()> {
    let base = a.dir.unwrap_or_else(|| PathBuf::from("/var/tmp"));
    std::fs::create_dir_all(&base)?;
    let dir = tempfile_in(&base)?;
    let r = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench(&dir, a.quick));
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn tempfile_in(base: &Path) -> Result<PathBuf> {
    let d = base.join(format!("drv-bench-config-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
    Ok(d)
}

async fn bench(dir: &Path, quick: bool) -> Result<()> {
    // Many short alternating rounds: a slow stretch of the host falls on both sides.
    let (rounds, per_round, per_client, propagations) = if quick { (4, 10, 5, 10) } else { (20, 30, 25, 50) };
    let certs = dir.join("certs");
    ca::init(&certs)?;
    ca::issue(&certs, Role::Admin, "admin")?;
    let nodes = start_group(dir, &certs).await?;
    let servers: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
    let servers = servers.join(",");
    let admin = ApiClient::new(&servers, &Identity::load(&certs, "admin")?)?;
    let local = ConfigStore::open(&dir.join("local.redb"))?;
    let pop = population(dir);
    let w = admin.commit(pop.clone()).await?;
    local.commit(pop)?;
    println!("config servers: 3 in one process on loopback, data in {}; {VOLUMES} volumes", dir.display());
    let (mut api, mut loc) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let from = r * per_round;
        if r % 2 == 0 {
            api.extend(api_round(&admin, from, per_round).await?);
            loc.extend(local_round(&local, from, per_round)?);
        } else {
            loc.extend(local_round(&local, from, per_round)?);
            api.extend(api_round(&admin, from, per_round).await?);
        }
    }
    let (a50, a99) = (percentile(&mut api, 0.5), percentile(&mut api, 0.99));
    let (l50, l99) = (percentile(&mut loc, 0.5), percentile(&mut loc, 0.99));
    println!("  commit latency, 3 servers through the API: p50 {a50:.2} ms, p99 {a99:.2} ms");
    println!("  commit latency, local redb store: p50 {l50:.2} ms, p99 {l99:.2} ms");
    println!("  commit p50 3 servers / local {:.2} (goal <= 3)", a50 / l50);
    println!("  commit p99 3 servers / local {:.2} (goal <= 3)", a99 / l99);
    let tput = throughput(&admin, per_client).await?;
    println!("  changes per second with {CLIENTS} concurrent clients: {tput:.0}");

    let version = admin.status().await?.version.max(w.version);
    let followers = components(&certs, dir, &servers, &admin, version).await?;
    let mut lat = Vec::new();
    for i in 0..propagations {
        let w = admin.commit(vec![change(200_000 + i)]).await?;
        let acked = drv_config::now_unix_ms();
        let last = wait_reported(&admin, w.version, Duration::from_secs(30)).await?;
        lat.push(last.saturating_sub(acked) as f64 / 1e3);
    }
    let (p50, p99) = (percentile(&mut lat, 0.5), percentile(&mut lat, 0.99));
    println!("  propagation to {COMPONENTS} components, commit to the last report: p50 {p50:.3} s");
    println!("  propagation p99 {p99:.3} s (goal <= 1)");
    for f in followers {
        f.abort();
    }
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}
