//! `drv ca`, `drv staging run`, `drv replica run`, `drv status`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use drv_config::ConfigStore;
use drv_format::frame::Frame;
use drv_proto::status::{ReplicaStatus, StagingStatus};
use drv_transport::{Identity, Role, ca, quic};

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create the installation CA (ca.pem, ca.key) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a node certificate (NAME.pem, NAME.key) signed by the CA in DIR.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// agent, staging, replica, config or admin.
        #[arg(long)]
        role: String,
        #[arg(long)]
        name: String,
    },
}

#[derive(Args)]
pub struct NodeArgs {
    /// The local configuration store (when no config server is given).
    #[arg(long, env = "DRV_CONFIG", default_value = "/var/lib/drv/config.redb")]
    config: PathBuf,
    /// The config servers (HOST:PORT,...): the node fetches its configuration there, caches it
    /// and follows its changes.
    #[arg(long = "config-server", env = "DRV_CONFIG_SERVER")]
    servers: Option<String>,
    /// With --config-server: the local copy of this node's configuration, used while no config
    /// server answers (default: /var/lib/drv/NAME.config-cache.redb).
    #[arg(long)]
    config_cache: Option<PathBuf>,
    /// This node's name (its endpoint entry and certificate).
    #[arg(long)]
    name: String,
    /// Directory with ca.pem, NAME.pem and NAME.key.
    #[arg(long, env = "DRV_CERTS")]
    certs: PathBuf,
    /// Serve Prometheus metrics on http://HOST:PORT/metrics (plain HTTP: loopback or a
    /// management network).
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
}

#[derive(Args)]
pub struct StatusArgs {
    /// The role the server must have: staging or replica.
    #[arg(long, default_value = "staging")]
    role: String,
    #[command(flatten)]
    conn: ServerConn,
}

/// How an admin command reaches a server.
#[derive(clap::Args)]
pub struct ServerConn {
    /// host:port of the server.
    #[arg(long)]
    pub server: String,
    /// Directory with ca.pem and the certificate to present.
    #[arg(long, env = "DRV_CERTS")]
    pub certs: PathBuf,
    /// Name of the certificate to present (an admin certificate).
    #[arg(long, default_value = "admin")]
    pub name: String,
    #[arg(long)]
    pub json: bool,
}

impl ServerConn {
    /// The admin identity and the server's address.
    pub fn open(&self) -> Result<(Identity, SocketAddr)> {
        let id = Identity::load(&self.certs, &self.name).with_context(|| format!("load certificate {}", self.name))?;
        Ok((id, addr(&self.server)?))
    }
}

pub fn ca(c: CaCommand) -> Result<()> {
    match c {
        CaCommand::Init { dir } => {
            let p = ca::init(&dir).context("create installation CA")?;
            println!("created CA {}", p.display());
        }
        CaCommand::Issue { dir, role, name } => {
            let role: Role = role.parse()?;
            let p = ca::issue(&dir, role, &name).with_context(|| format!("issue certificate for {name}"))?;
            println!("issued {} ({role} {name})", p.display());
        }
    }
    Ok(())
}

/// The socket address of `HOST:PORT` (resolved); the error names the text given.
pub fn addr(a: &str) -> Result<SocketAddr> {
    drv_config::check_address(a)
        .map_err(|why| anyhow::anyhow!("address {a:?} {why} (give HOST:PORT, e.g. 10.0.0.5:7001)"))?;
    let mut found = a.to_socket_addrs().with_context(|| format!("resolve address {a:?}"))?;
    found.next().with_context(|| format!("address {a:?} resolves to nothing"))
}

/// A node's configuration, where it listens, and (with config servers) its follower and the
/// version it was read at.
struct Loaded {
    node: drv_config::NodeConfig,
    id: Identity,
    addr: SocketAddr,
    follow: Option<(crate::follow::Follower, u64)>,
}

/// Loads node `n.name`'s configuration (which must have `role`), its certificate and its
/// address: from the config servers (or their cached copy), or from the local store.
async fn load(n: &NodeArgs, role: drv_config::Role) -> Result<Loaded> {
    let identity = || Identity::load(&n.certs, &n.name).with_context(|| format!("load the certificate of {}", n.name));
    let (node, id, follow) = match &n.servers {
        Some(servers) => {
            let id = identity()?;
            let client = drv_configd::client::ApiClient::new(servers, &id)?;
            let cache = n
                .config_cache
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("/var/lib/drv/{}.config-cache.redb", n.name)));
            let f = crate::follow::Follower::node(client, &n.name, cache);
            let s = f.start().await.with_context(|| format!("load the configuration of node {}", n.name))?;
            (s.value, id, Some((f, s.version)))
        }
        None => {
            // The configuration first: a node that is not configured is said so, whatever its
            // certificate.
            let store = ConfigStore::open_read_only(&n.config)?;
            let node = store.node(&n.name).with_context(|| format!("load the configuration of node {}", n.name))?;
            (node, identity()?, None)
        }
    };
    if node.endpoint.role != role {
        bail!("node {} has role {}, not {role}", n.name, node.endpoint.role);
    }
    let addr = addr(&node.endpoint.address).with_context(|| format!("endpoint {}", n.name))?;
    Ok(Loaded { node, id, addr, follow })
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start async runtime")
}

/// Follows the node's configuration: `apply` applies what it can live and returns what waits
/// for a restart (reported as such, with the node's `figures`).
fn follow<F, R>(l: &mut Loaded, ready: R, figures: crate::follow::FiguresFn, mut apply: F)
where
    F: FnMut(&drv_config::NodeConfig, &drv_config::NodeConfig) -> Vec<String> + Send + 'static,
    R: std::future::Future<Output = ()> + Send + 'static,
{
    let Some((f, version)) = l.follow.take() else { return };
    let f = f.with_figures(figures);
    let current = drv_configd::api::Slice { version, value: l.node.clone() };
    let name = l.node.name.clone();
    tokio::spawn(async move {
        // Changes only once the node runs (its start-up reads the volumes it was given).
        ready.await;
        f.follow(current, move |old: &drv_config::NodeConfig, new: &drv_config::NodeConfig| {
            let changes = apply(old, new);
            for c in &changes {
                tracing::warn!("{name}: configuration changed: {c}");
            }
            changes
        })
        .await
    });
}

/// The `--metrics` listener, bound before the node starts its work.
async fn bind_metrics(n: &NodeArgs) -> Result<Option<tokio::net::TcpListener>> {
    match &n.metrics {
        Some(m) => Ok(Some(crate::metrics::bind(m).await?)),
        None => Ok(None),
    }
}

pub fn staging_run(n: NodeArgs) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async {
        let mut l = load(&n, drv_config::Role::Staging).await?;
        let metrics = bind_metrics(&n).await?;
        let st = drv_staging::server::Staging::new(&l.node, l.id.clone()).context("start staging server")?;
        eprintln!("staging {} serving {} volume(s) on {}", n.name, st.volume_list().len(), l.addr);
        if let Some(m) = metrics {
            let s = st.clone();
            let at = crate::metrics::serve(m, Arc::new(move || Ok(crate::metrics::staging(&s.status()))))?;
            eprintln!("staging {}: metrics on http://{at}/metrics", n.name);
        }
        let (live, fig) = (st.clone(), st.clone());
        let figures = Arc::new(move || (crate::metrics::figures::staging(&fig.status()), Default::default()));
        follow(&mut l, std::future::ready(()), figures, move |old, new| live.apply_config(old, new));
        st.run(l.addr).await.context("staging server")
    })
}

pub fn replica_run(n: NodeArgs) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async {
        let mut l = load(&n, drv_config::Role::Replica).await?;
        let metrics = bind_metrics(&n).await?;
        let r = drv_replica::ReplicaServer::new(&l.node, l.id.clone()).context("start replica server")?;
        eprintln!("replica {} serving {} volume(s) on {}", n.name, r.volume_list().len(), l.addr);
        if let Some(m) = metrics {
            let s = r.clone();
            let at = crate::metrics::serve(m, Arc::new(move || Ok(crate::metrics::replica(&s.status()))))?;
            eprintln!("replica {}: metrics on http://{at}/metrics", n.name);
        }
        let (live, up, fig) = (r.clone(), r.clone(), r.clone());
        let figures = Arc::new(move || {
            let s = fig.status();
            (crate::metrics::figures::replica(&s), crate::metrics::figures::replica_details(&s))
        });
        follow(&mut l, async move { up.running().await }, figures, move |old, new| live.apply_config(old, new));
        r.run(l.addr).await.context("replica server")
    })
}

pub fn replica_recover(n: NodeArgs) -> Result<()> {
    let l = runtime()?.block_on(load(&n, drv_config::Role::Replica))?;
    let r = drv_replica::ReplicaServer::new(&l.node, l.id).context("open replica")?;
    r.catch_up().context("apply complete epochs")?;
    println!("{}", r.status_json());
    Ok(())
}

/// Fetches the status reply of a server, as sent.
pub async fn fetch_status_json(id: &Identity, server: SocketAddr, role: Role) -> Result<Vec<u8>> {
    match quic::request(id, server, role, &Frame::StatusRequest, 16 << 20).await? {
        Some(Frame::StatusReply { json }) => Ok(json),
        other => Err(unexpected(server, other)),
    }
}

/// Fetches the status reply of a server (`StagingStatus` or `ReplicaStatus`).
pub async fn fetch_status<T: serde::de::DeserializeOwned>(id: &Identity, server: SocketAddr, role: Role) -> Result<T> {
    let json = fetch_status_json(id, server, role).await?;
    serde_json::from_slice(&json).with_context(|| format!("parse the status reply of {server}"))
}

/// The error for an answer that is not the one asked for: the server's refusal, or a frame of
/// another type, or none.
pub fn unexpected(server: SocketAddr, answer: Option<Frame>) -> anyhow::Error {
    match answer {
        Some(Frame::Error { message, .. }) => anyhow::anyhow!("{server} refused: {message}"),
        Some(other) => anyhow::anyhow!("{server} answered with an unexpected {:?} frame", other.ftype()),
        None => anyhow::anyhow!("{server} closed the stream without answering"),
    }
}

pub fn status(a: StatusArgs) -> Result<()> {
    let (id, server) = a.conn.open()?;
    let role: Role = a.role.parse()?;
    let rt = runtime()?;
    let json = rt
        .block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), fetch_status_json(&id, server, role)).await
        })
        .with_context(|| format!("no answer from {server} within 10 s"))??;
    if a.conn.json {
        println!("{}", String::from_utf8_lossy(&json));
        return Ok(());
    }
    let parse = || format!("parse the status reply of {server}");
    match role {
        Role::Staging => print_staging(&serde_json::from_slice(&json).with_context(parse)?),
        _ => print_replica(&serde_json::from_slice(&json).with_context(parse)?),
    }
    Ok(())
}

fn print_staging(v: &StagingStatus) {
    println!("{} {} (up {:.0}s), peers: {:?}", v.role, v.name, v.uptime_seconds, v.peers);
    for vol in &v.volumes {
        println!(
            "  volume {:<12} received {:>8} durable {:>8} replicated {:>8}  lag {} records, {} bytes, {:.1}s",
            vol.name,
            vol.received_seq,
            vol.durable_seq,
            vol.replicated_seq,
            vol.lag_records,
            vol.lag_bytes,
            vol.lag_seconds
        );
        for r in &vol.replicas {
            println!(
                "    -> {:<10} {} sent {} durable {} applied {}",
                r.replica,
                if r.connected { "connected   " } else { "disconnected" },
                r.sent_seq,
                r.durable_seq,
                r.applied_seq
            );
        }
    }
}

fn print_replica(v: &ReplicaStatus) {
    println!("{} {} (up {:.0}s), peers: {:?}", v.role, v.name, v.uptime_seconds, v.peers);
    for vol in &v.volumes {
        println!(
            "  volume {:<12} {:<11} received {:>8} durable {:>8} applied {:>8} (epoch {}), {} snapshot(s)",
            vol.name,
            vol.state.to_string(),
            vol.received_seq,
            vol.durable_seq,
            vol.applied_seq,
            vol.applied_epoch,
            vol.snapshots.len()
        );
        if let Some(w) = &vol.window
            && let (Some(old), Some(new)) = (&w.oldest, &w.newest)
        {
            let t = crate::snapshot_cmd::time_text;
            println!(
                "    any point in time: seq {} ({}) to seq {} ({}), {} points, {} end with a flush",
                old.seq,
                t(old.capture_unix),
                new.seq,
                t(new.capture_unix),
                w.points,
                w.flush_count
            );
        }
        if let Some(f) = &vol.failover {
            let what = if f.test { "failover test" } else { "FAILED OVER (apply holds)" };
            println!(
                "    {what} at seq {} since {}: device {}, {} written there",
                f.seq,
                crate::snapshot_cmd::time_text(f.started_unix as u32),
                if f.device.is_empty() { "not attached" } else { &f.device },
                crate::agent_cmd::human(f.changed_bytes)
            );
        }
        if let Some(c) = &vol.last_check {
            let every = vol.check_interval_secs.map(|s| format!(", every {s} s")).unwrap_or_default();
            println!(
                "    recovery check of {} (seq {}) at {}: {}{every}",
                c.snapshot,
                c.seq,
                crate::snapshot_cmd::time_text(c.started_unix as u32),
                c.summary
            );
        } else if let Some(s) = vol.check_interval_secs {
            println!("    recovery checks every {s} s: none yet");
        }
        for s in vol.snapshots.iter().filter(|s| s.name.starts_with("auto-resync-")) {
            println!(
                "    a resync run is applied in part: the last consistent image (seq {}) is kept as snapshot {}",
                s.seq, s.name
            );
        }
    }
}
