//! `drv config set|get|list|delete|log` on the local configuration store.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use drv_config::{ConfigStore, Kind, Op};

#[derive(Args)]
pub struct ConfigArgs {
    /// The configuration store (redb file).
    #[arg(long, env = "DRV_CONFIG", default_value = "/var/lib/drv/config.redb")]
    store: PathBuf,
    #[command(subcommand)]
    cmd: ConfigCommand,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Create or update an entry: `drv config set volume db1 size_bytes=10G wrl=w0 replicas='["r1"]' key=k1`.
    Set {
        /// endpoint, key, wrl or volume.
        kind: Kind,
        name: String,
        /// FIELD=VALUE assignments (JSON values, or plain strings; sizes take K/M/G/T).
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

pub fn run(a: ConfigArgs) -> Result<()> {
    // Only `set` creates a store; reading or deleting from one that does not exist is an error.
    let store = match &a.cmd {
        ConfigCommand::Set { .. } => ConfigStore::open(&a.store)?,
        _ => ConfigStore::open_existing(&a.store)?,
    };
    match a.cmd {
        ConfigCommand::Set { kind, name, fields, if_version, json } => {
            let op = Op::Set { kind, name: name.clone(), assignments: fields, if_version };
            let mut w = store.commit(vec![op])?;
            let v = w.values.swap_remove(0);
            if json {
                println!("{}", serde_json::json!({"kind": kind, "name": name, "value": v, "version": w.version}));
            } else {
                show(kind, &name, &v);
            }
        }
        ConfigCommand::Get { kind, name, json } => {
            let v = store.get(kind, &name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                show(kind, &name, &v);
            }
        }
        ConfigCommand::List { kind, json } => {
            let kinds = kind.map(|k| vec![k]).unwrap_or(Kind::ALL.to_vec());
            let rows = store.list(&kinds)?;
            if json {
                let out: Vec<_> =
                    rows.iter().map(|(k, n, v)| serde_json::json!({"kind": k, "name": n, "value": v})).collect();
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                for (k, n, v) in &rows {
                    show(*k, n, v);
                }
            }
        }
        ConfigCommand::Delete { kind, name, if_version } => {
            let w = store.commit(vec![Op::Delete { kind, name: name.clone(), if_version }])?;
            println!("deleted {kind} {name} (version {})", w.version);
        }
        ConfigCommand::Log { after, limit, json } => {
            let mut rows = store.log(after, usize::MAX)?;
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
