//! `drv config set|get|list|delete` on the local configuration store.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use drv_config::{ConfigStore, Kind};

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
    Delete { kind: Kind, name: String },
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
        ConfigCommand::Set { kind, name, fields, json } => {
            let v = store.set(kind, &name, &fields)?;
            if json {
                println!("{}", serde_json::json!({"kind": kind, "name": name, "value": v}));
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
        ConfigCommand::Delete { kind, name } => {
            store.delete(kind, &name)?;
            println!("deleted {kind} {name}");
        }
    }
    Ok(())
}
