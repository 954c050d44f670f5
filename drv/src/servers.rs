//! `drv ca`, `drv staging run`, `drv replica run`, `drv status`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

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
    /// The configuration store.
    #[arg(long, env = "DRV_CONFIG", default_value = "/var/lib/drv/config.redb")]
    config: PathBuf,
    /// This node's name (its endpoint entry and certificate).
    #[arg(long)]
    name: String,
    /// Directory with ca.pem, NAME.pem and NAME.key.
    #[arg(long, env = "DRV_CERTS")]
    certs: PathBuf,
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

/// Loads node `n.name`'s configuration (which must have `role`), its certificate and its address.
fn load(n: &NodeArgs, role: drv_config::Role) -> Result<(drv_config::NodeConfig, Identity, SocketAddr)> {
    let store = ConfigStore::open_read_only(&n.config)?;
    let node = store.node(&n.name).with_context(|| format!("load the configuration of node {}", n.name))?;
    if node.endpoint.role != role {
        bail!("node {} has role {}, not {role}", n.name, node.endpoint.role);
    }
    let id = Identity::load(&n.certs, &n.name).with_context(|| format!("load the certificate of {}", n.name))?;
    let a = addr(&node.endpoint.address).with_context(|| format!("endpoint {}", n.name))?;
    Ok((node, id, a))
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start async runtime")
}

pub fn staging_run(n: NodeArgs) -> Result<()> {
    let (node, id, a) = load(&n, drv_config::Role::Staging)?;
    let rt = runtime()?;
    rt.block_on(async {
        let st = drv_staging::server::Staging::new(&node, id).context("start staging server")?;
        eprintln!("staging {} serving {} volume(s) on {a}", n.name, st.volumes.len());
        st.run(a).await.context("staging server")
    })
}

pub fn replica_run(n: NodeArgs) -> Result<()> {
    let (node, id, a) = load(&n, drv_config::Role::Replica)?;
    let rt = runtime()?;
    rt.block_on(async {
        let r = drv_replica::ReplicaServer::new(&node, id).context("start replica server")?;
        eprintln!("replica {} serving {} volume(s) on {a}", n.name, r.volumes.len());
        r.run(a).await.context("replica server")
    })
}

pub fn replica_recover(n: NodeArgs) -> Result<()> {
    let (node, id, _) = load(&n, drv_config::Role::Replica)?;
    let r = drv_replica::ReplicaServer::new(&node, id).context("open replica")?;
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
