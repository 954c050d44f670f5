//! `drv config-server run|status|add|remove`: the replicated configuration servers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use drv_configd::PeerNode;
use drv_configd::client::ApiClient;
use drv_configd::server::{ConfigNode, Tuning, node_id};
use drv_transport::{Identity, Role};

#[derive(Subcommand)]
pub enum ConfigServerCommand {
    /// Run one config server until stopped. The first start of a group: every server with the
    /// same `--peers`; a server added later: `--join`, then `drv config-server add`.
    Run(RunArgs),
    /// Each config server's view of the group: its state, the leader, term, applied version,
    /// members.
    Status {
        #[command(flatten)]
        remote: Remote,
        #[arg(long)]
        json: bool,
    },
    /// Add a config server (running with `--join`) to the group: it catches up, then votes.
    Add {
        name: String,
        /// Where it listens (HOST:PORT).
        address: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove a config server from the group.
    Remove {
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Args)]
pub struct RunArgs {
    /// This server's name (its `config` certificate's).
    #[arg(long)]
    name: String,
    /// Directory with ca.pem, NAME.pem and NAME.key.
    #[arg(long, env = "DRV_CERTS")]
    certs: PathBuf,
    /// Its own state: the raft log and the configuration (two redb files).
    #[arg(long, default_value = "/var/lib/drv/config-server")]
    data: PathBuf,
    /// Where it serves its peers and the API (HOST:PORT).
    #[arg(long)]
    listen: String,
    /// The group's first members, itself included: NAME=HOST:PORT,... (used once, when the
    /// group is formed; without it and without --join, a group of this server alone).
    #[arg(long, conflicts_with = "join")]
    peers: Option<String>,
    /// Start empty and wait to be added to a running group (`drv config-server add`). Also
    /// what a server whose data was lost must do: it must never form a group of its own again.
    #[arg(long)]
    join: bool,
    /// Take a snapshot (and compact the raft log) every this many changes.
    #[arg(long, default_value_t = 1000)]
    snapshot_every: u64,
    /// Serve Prometheus metrics on http://HOST:PORT/metrics (plain HTTP: loopback or a
    /// management network).
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
    /// Serve users on https://HOST:PORT: the JSON API with logins and sessions (no client
    /// certificates; users are `drv config set user NAME password=- ...`).
    #[arg(long, value_name = "HOST:PORT")]
    web: Option<String>,
    /// The web listener's certificate chain (PEM) for browsers, e.g. one for the host's DNS name
    /// from the site's CA (default: the server's own, of the installation CA).
    #[arg(long, value_name = "PEM", requires_all = ["web", "web_key"])]
    web_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["web", "web_cert"])]
    web_key: Option<PathBuf>,
}

/// How a command line reaches the config servers (flags, environment, then the client file
/// /etc/drv/drv.toml).
#[derive(Args, Clone)]
pub struct Remote {
    /// The config servers: HOST:PORT,... (any of them; writes find the leader).
    #[arg(long = "config-server", env = "DRV_CONFIG_SERVER")]
    pub servers: Option<String>,
    /// Directory with ca.pem and the certificate to present.
    #[arg(long, env = "DRV_CERTS")]
    pub certs: Option<PathBuf>,
    /// The certificate to present (an admin certificate; default admin).
    #[arg(long, env = "DRV_CERT_NAME")]
    pub cert_name: Option<String>,
}

impl Remote {
    pub fn client(&self) -> Result<ApiClient> {
        let file = crate::client_file::load()?;
        let Some(servers) = self.servers.as_ref().or(file.config_server.as_ref()) else {
            bail!(
                "no config server given: --config-server HOST:PORT,... (or DRV_CONFIG_SERVER, or config_server in /etc/drv/drv.toml)"
            )
        };
        let Some(certs) = self.certs.as_ref().or(file.certs.as_ref()) else {
            bail!("no certificate directory given: --certs DIR (or DRV_CERTS, or certs in /etc/drv/drv.toml)")
        };
        let name = self.cert_name.as_deref().or(file.cert_name.as_deref()).unwrap_or("admin");
        client(servers, certs, name)
    }
}

/// A client of `servers` presenting certificate `name` from `certs`.
pub fn client(servers: &str, certs: &Path, name: &str) -> Result<ApiClient> {
    let id = Identity::load(certs, name).with_context(|| format!("load certificate {name}"))?;
    Ok(ApiClient::new(servers, &id)?)
}

/// A runtime for one command's requests.
pub fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("start a runtime")?;
    Ok(rt.block_on(f))
}

pub fn run(c: ConfigServerCommand) -> Result<()> {
    match c {
        ConfigServerCommand::Run(a) => serve(a),
        ConfigServerCommand::Status { remote, json } => status(&remote, json),
        ConfigServerCommand::Add { name, address, remote } => {
            crate::servers::addr(&address)?;
            let s = block_on(remote.client()?.add_member(&name, &address))??;
            println!("added config server {name} at {address}; members: {}", members(&s));
            Ok(())
        }
        ConfigServerCommand::Remove { name, remote } => {
            let s = block_on(remote.client()?.remove_member(&name))??;
            println!("removed config server {name}; members: {}", members(&s));
            Ok(())
        }
    }
}

fn members(s: &drv_configd::api::ServerStatus) -> String {
    let m: Vec<String> =
        s.members.iter().map(|m| format!("{}{}", m.name, if m.voter { "" } else { " (learner)" })).collect();
    m.join(", ")
}

fn status(remote: &Remote, json: bool) -> Result<()> {
    let each = block_on(remote.client()?.status_each())?;
    if json {
        let v: Vec<_> = each
            .iter()
            .map(|(a, r)| match r {
                Ok(s) => serde_json::json!({"address": a, "status": s}),
                Err(e) => serde_json::json!({"address": a, "error": e.to_string()}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{:<22} {:<10} {:<10} {:>6} {:>8}  members", "server", "name", "state", "term", "version");
    for (a, r) in &each {
        match r {
            Ok(s) => println!(
                "{a:<22} {:<10} {:<10} {:>6} {:>8}  {} (leader: {})",
                s.name,
                s.state,
                s.term,
                s.version,
                members(s),
                s.leader.as_deref().unwrap_or("none")
            ),
            Err(e) => println!("{a:<22} {:<10} {e}", "-"),
        }
    }
    Ok(())
}

/// `NAME=HOST:PORT,...`
fn parse_peers(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((n, a)) = p.split_once('=') else { bail!("--peers: {p:?} is not NAME=HOST:PORT") };
        crate::servers::addr(a).with_context(|| format!("--peers: {n}"))?;
        if out.insert(n.to_owned(), a.to_owned()).is_some() {
            bail!("--peers names {n} twice");
        }
    }
    Ok(out)
}

/// Holds `DATA/lock` while the server runs: a second server on the same data is refused.
fn lock(data: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let p = data.join("lock");
    let f = std::fs::File::create(&p).with_context(|| format!("create {}", p.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("another config server is running on {} (its lock is held)", data.display());
    }
    Ok(f)
}

fn serve(a: RunArgs) -> Result<()> {
    let id = Identity::load(&a.certs, &a.name).with_context(|| format!("load the certificate of {}", a.name))?;
    let role = id.role()?;
    if role != Role::Config {
        bail!(
            "certificate {} has role {role}: a config server needs a config certificate (drv ca issue --role config --name {})",
            a.name,
            a.name
        );
    }
    let listen = crate::servers::addr(&a.listen)?;
    let mut first: BTreeMap<String, String> = match &a.peers {
        Some(p) => parse_peers(p)?,
        None => BTreeMap::new(),
    };
    if a.peers.is_some() && !first.contains_key(&a.name) {
        bail!("--peers must name this server ({}) too", a.name);
    }
    first.entry(a.name.clone()).or_insert_with(|| a.listen.clone());
    std::fs::create_dir_all(&a.data).with_context(|| format!("create {}", a.data.display()))?;
    let _lock = lock(&a.data)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let tcp = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listen on {listen}"))?;
        let metrics = match &a.metrics {
            Some(m) => Some(crate::metrics::bind(m).await?),
            None => None,
        };
        let web = match &a.web {
            Some(w) => {
                let at = crate::servers::addr(w)?;
                Some(tokio::net::TcpListener::bind(at).await.with_context(|| format!("--web: listen on {at}"))?)
            }
            None => None,
        };
        let tuning = Tuning { snapshot_every: a.snapshot_every.max(1) };
        let mut node = ConfigNode::start(&id, &a.data, tcp, tuning).await?;
        if let Some(w) = web {
            let web_id = match (&a.web_cert, &a.web_key) {
                (Some(c), Some(k)) => Identity {
                    name: a.name.clone(),
                    ca_pem: String::new(),
                    cert_pem: std::fs::read_to_string(c).with_context(|| format!("--web-cert {}", c.display()))?,
                    key_pem: std::fs::read_to_string(k).with_context(|| format!("--web-key {}", k.display()))?,
                },
                _ => id.clone(),
            };
            let at = node.serve_web(&web_id, w)?;
            eprintln!("config server {}: users on https://{at}/", a.name);
        }
        if let Some(m) = metrics {
            let api = node.api.clone();
            let render = move || match api.server_status() {
                Ok(s) => Ok(crate::metrics::config(&s, &api.components())),
                Err(e) => Err(format!("the configuration store: {e}")),
            };
            let at = crate::metrics::serve(m, std::sync::Arc::new(render))?;
            eprintln!("config server {}: metrics on http://{at}/metrics", a.name);
        }
        let formed = node.raft.is_initialized().await.map_err(|e| anyhow::anyhow!("raft: {e}"))?;
        let founder = first.keys().next() == Some(&a.name);
        if !formed && !a.join && founder {
            let members: BTreeMap<_, _> = first
                .iter()
                .map(|(n, addr)| (node_id(n), PeerNode { name: n.clone(), address: addr.clone() }))
                .collect();
            node.raft.initialize(members).await.map_err(|e| anyhow::anyhow!("form the group: {e}"))?;
        }
        let how = match (formed, a.join, founder) {
            (true, ..) => "rejoining its group".to_owned(),
            (false, true, _) => format!("waiting to be added (drv config-server add {} {})", a.name, a.listen),
            (false, false, true) => {
                format!("formed the group of {}", first.keys().cloned().collect::<Vec<_>>().join(", "))
            }
            (false, false, false) => format!("waiting for {} to form the group", first.keys().next().expect("named")),
        };
        eprintln!("config server {} on {}: {how}", a.name, node.addr());
        crate::agent_cmd::shutdown().await;
        tokio::time::timeout(Duration::from_secs(5), node.shutdown()).await.ok();
        Ok(())
    })
}
