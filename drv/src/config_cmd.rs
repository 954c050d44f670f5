//! `drv config set|get|list|delete|log`: on the config servers (`--config-server`), or on a
//! local configuration store (the demo's and a single host's).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use drv_config::{ConfigError, ConfigStore, EntryRow, Kind, LogRecord, Op, Written};
use drv_configd::api::ComponentState;
use drv_configd::client::ApiClient;

#[derive(Args)]
pub struct ConfigArgs {
    /// The local configuration store (redb file), when no config server is given.
    #[arg(long, env = "DRV_CONFIG", default_value = "/var/lib/drv/config.redb")]
    store: PathBuf,
    /// The config servers (HOST:PORT,...): read and change the replicated configuration (also
    /// `config_server` in /etc/drv/drv.toml).
    #[arg(long = "config-server", env = "DRV_CONFIG_SERVER", global = true)]
    servers: Option<String>,
    /// With --config-server: directory with ca.pem and the certificate to present.
    #[arg(long, env = "DRV_CERTS", global = true)]
    certs: Option<PathBuf>,
    /// With --config-server: the certificate to present (an admin certificate; default admin).
    #[arg(long, env = "DRV_CERT_NAME")]
    cert_name: Option<String>,
    /// With --config-server: read the answering server's state as it is, without asking the
    /// leader (works while no majority is up; may be behind).
    #[arg(long, global = true)]
    local_read: bool,
    #[command(subcommand)]
    cmd: ConfigCommand,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Create or update an entry: `drv config set volume db1 size_bytes=10G wrl=w0 replicas='["r1"]' key=k1`.
    Set {
        /// endpoint, key, wrl, volume, set (a replication set) or user.
        kind: Kind,
        name: String,
        /// FIELD=VALUE assignments (JSON values, or plain strings; sizes take K/M/G/T). A
        /// user's `password=-` reads the password from the terminal (without echo) or stdin;
        /// only its argon2id hash is stored.
        #[arg(required = true)]
        fields: Vec<String>,
        /// Only if the entry is still at this version (0: only if it does not exist yet), as
        /// `set --json` or `log` showed it.
        #[arg(long)]
        if_version: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Show one entry.
    Get {
        kind: Kind,
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// List entries (all kinds, or one).
    List {
        kind: Option<Kind>,
        #[arg(long)]
        json: bool,
    },
    /// Delete an entry nothing refers to.
    Delete {
        kind: Kind,
        name: String,
        /// Only if the entry is still at this version.
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Config servers only: which components (staging, replica, agents) run which version, and
    /// for each recent change, where it is in force and where it waits.
    Status {
        /// The newest this many changes.
        #[arg(long, default_value_t = 10)]
        changes: usize,
        #[arg(long)]
        json: bool,
    },
    /// The history of changes: version, time, author and what changed (the newest 10,000).
    Log {
        /// Only the changes after this version.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many (the newest of them).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

fn show(kind: Kind, name: &str, v: &serde_json::Value) {
    let fields: Vec<String> = v
        .as_object()
        .map(|o| {
            o.iter().map(|(k, v)| format!("{k}={}", v.as_str().map(str::to_owned).unwrap_or(v.to_string()))).collect()
        })
        .unwrap_or_default();
    println!("{kind:<8} {name:<16} {}", fields.join(" "));
}

/// Where the configuration is.
enum Source {
    Local(ConfigStore),
    Remote { client: ApiClient, local_read: bool },
}

impl Source {
    fn open(a: &ConfigArgs) -> Result<Source> {
        // Flags and environment first, then the client file.
        let file = if a.servers.is_some() { Default::default() } else { crate::client_file::load()? };
        if let Some(servers) = a.servers.as_ref().or(file.config_server.as_ref()) {
            let Some(certs) = a.certs.as_ref().or(file.certs.as_ref()) else {
                bail!("--config-server needs --certs DIR (or DRV_CERTS, or certs in the client file)")
            };
            let name = a.cert_name.as_deref().or(file.cert_name.as_deref()).unwrap_or("admin");
            let client = crate::configd_cmd::client(servers, certs, name)?;
            return Ok(Source::Remote { client, local_read: a.local_read });
        }
        // Only `set` creates a store; reading or deleting from one that does not exist is an error.
        Ok(Source::Local(match &a.cmd {
            ConfigCommand::Set { .. } => ConfigStore::open(&a.store)?,
            _ => ConfigStore::open_existing(&a.store)?,
        }))
    }

    fn commit(&self, ops: Vec<Op>) -> Result<Written> {
        match self {
            Source::Local(s) => Ok(s.commit(ops)?),
            Source::Remote { client, .. } => Ok(crate::configd_cmd::block_on(client.commit(ops))??),
        }
    }

    /// Entries, the version they show, and (remote) the server that answered.
    fn entries(&self, kinds: &[Kind], name: Option<&str>) -> Result<(u64, Vec<EntryRow>, Option<String>)> {
        match self {
            Source::Local(s) => {
                let (v, rows) = s.entries(kinds, name)?;
                Ok((v, rows, None))
            }
            Source::Remote { client, local_read } => {
                let kind = if kinds.len() == 1 { Some(kinds[0]) } else { None };
                let r = crate::configd_cmd::block_on(client.entries(kind, name, *local_read))??;
                Ok((r.version, r.entries, Some(r.server)))
            }
        }
    }

    fn log(&self, after: u64) -> Result<Vec<LogRecord>> {
        match self {
            Source::Local(s) => Ok(s.log(after, usize::MAX)?),
            Source::Remote { client, local_read } => {
                let limit = drv_configd::api::LOG_LIMIT;
                Ok(crate::configd_cmd::block_on(client.log(after, limit, *local_read))??.records)
            }
        }
    }
}

fn header(version: u64, server: &Option<String>) {
    if let Some(s) = server {
        println!("# configuration version {version} (config server {s})");
    }
}

pub fn run(a: ConfigArgs) -> Result<()> {
    let src = Source::open(&a)?;
    match a.cmd {
        ConfigCommand::Set { kind, name, mut fields, if_version, json } => {
            if kind == Kind::User
                && let Some(f) = fields.iter_mut().find(|f| f.as_str() == "password=-")
            {
                *f = format!("password={}", read_password(&name)?);
            }
            let op = Op::Set { kind, name: name.clone(), assignments: fields, if_version };
            let mut w = src.commit(vec![op])?;
            let v = w.values.swap_remove(0);
            if json {
                println!("{}", serde_json::json!({"kind": kind, "name": name, "value": v, "version": w.version}));
            } else {
                show(kind, &name, &v);
            }
        }
        ConfigCommand::Get { kind, name, json } => {
            let (version, rows, server) = src.entries(&[kind], Some(&name))?;
            let row = rows.into_iter().next().ok_or(ConfigError::NotFound { kind, name: name.clone() })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&row.value)?);
            } else {
                header(version, &server);
                show(kind, &name, &row.value);
            }
        }
        ConfigCommand::List { kind, json } => {
            let kinds = kind.map(|k| vec![k]).unwrap_or(Kind::ALL.to_vec());
            let (version, rows, server) = src.entries(&kinds, None)?;
            if json {
                let out: Vec<_> = rows
                    .iter()
                    .map(
                        |r| serde_json::json!({"kind": r.kind, "name": r.name, "value": r.value, "version": r.version}),
                    )
                    .collect();
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                header(version, &server);
                for r in &rows {
                    show(r.kind, &r.name, &r.value);
                }
            }
        }
        ConfigCommand::Delete { kind, name, if_version } => {
            let w = src.commit(vec![Op::Delete { kind, name: name.clone(), if_version }])?;
            println!("deleted {kind} {name} (version {})", w.version);
        }
        ConfigCommand::Status { changes, json } => {
            let Source::Remote { client, .. } = &src else {
                bail!(
                    "drv config status needs --config-server: components report to the config servers, not to a local store"
                )
            };
            status(client, changes, json)?;
        }
        ConfigCommand::Log { after, limit, json } => {
            let mut rows = src.log(after).context("read the history of changes")?;
            rows.drain(..rows.len().saturating_sub(limit));
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            }
            for r in rows.iter().filter(|_| !json) {
                let ops: Vec<String> = r.ops.iter().map(ToString::to_string).collect();
                println!(
                    "{:>6}  {}  {:<16} {}",
                    r.version,
                    crate::snapshot_cmd::time_text((r.time_unix_ms / 1000) as u32),
                    r.author,
                    ops.join("; ")
                );
            }
        }
    }
    Ok(())
}

/// Where a change is in force: the components that run its version or a newer one with
/// nothing waiting for a restart, and the others.
fn in_force(version: u64, comps: &[ComponentState]) -> (Vec<String>, Vec<String>) {
    let (mut yes, mut no) = (Vec::new(), Vec::new());
    for c in comps {
        if c.version >= version && c.pending.is_empty() {
            yes.push(c.component.clone());
        } else {
            no.push(c.component.clone());
        }
    }
    (yes, no)
}

fn status(client: &ApiClient, changes: usize, json: bool) -> Result<()> {
    let (comps, log) = crate::configd_cmd::block_on(async {
        let comps = client.components_everywhere().await;
        let log = client.log_newest(changes).await;
        (comps, log)
    })?;
    let log = log?.records;
    let now = drv_config::now_unix_ms();
    if json {
        let changes: Vec<_> = log
            .iter()
            .map(|r| {
                let (yes, no) = in_force(r.version, &comps);
                serde_json::json!({"version": r.version, "time_unix_ms": r.time_unix_ms, "author": r.author,
                    "ops": r.ops, "in_force": yes, "waiting": no})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"components": comps, "changes": changes}))?);
        return Ok(());
    }
    println!("components (as the config servers last heard from them):");
    if comps.is_empty() {
        println!("  none has reported yet");
    }
    for c in &comps {
        let ago = now.saturating_sub(c.reported_unix_ms) / 1000;
        let pending = if c.pending.is_empty() { "-".to_owned() } else { c.pending.join("; ") };
        println!("  {:<20} {:<8} version {:>6}  {:>5} s ago  pending: {pending}", c.component, c.role, c.version, ago);
    }
    println!("changes (newest {}):", log.len());
    for r in log.iter().rev() {
        let (yes, no) = in_force(r.version, &comps);
        let ops: Vec<String> = r.ops.iter().map(ToString::to_string).collect();
        let where_ = if no.is_empty() {
            format!("in force on all {}", yes.len())
        } else {
            format!("in force on {} of {} (waiting: {})", yes.len(), comps.len(), no.join(", "))
        };
        println!("  {:>6}  {:<14} {}  [{where_}]", r.version, r.author, ops.join("; "));
    }
    Ok(())
}

/// A password from the terminal (asked on stderr, not echoed; Ctrl-C there cancels) or from
/// stdin's first line. Taken exactly as typed (no JSON reading, unlike other values).
fn read_password(user: &str) -> Result<String> {
    use std::io::BufRead;
    /// Puts the terminal back however the read ends.
    struct Restore(libc::termios);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: fd 0 and the termios tcgetattr filled.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
            eprintln!();
        }
    }
    // SAFETY: termios is plain data; all zeroes is a valid value.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd 0 and a termios this function owns.
    let tty = unsafe { libc::isatty(0) == 1 && libc::tcgetattr(0, &mut saved) == 0 };
    let restore = if tty {
        eprint!("password for user {user}: ");
        let mut t = saved;
        // No echo; no signals either (Ctrl-C must not leave the terminal without echo).
        t.c_lflag &= !(libc::ECHO | libc::ISIG);
        // SAFETY: fd 0 and a termios this function owns.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) } != 0 {
            anyhow::bail!("cannot turn the terminal's echo off: give the password on stdin instead");
        }
        Some(Restore(saved))
    } else {
        None
    };
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    drop(restore);
    read.context("read the password")?;
    anyhow::ensure!(!(tty && line.contains('\x03')), "cancelled");
    let p = line.trim_end_matches(['\n', '\r']).to_owned();
    anyhow::ensure!(!p.is_empty(), "no password given (password=- reads it from the terminal or stdin)");
    Ok(p)
}
