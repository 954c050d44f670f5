//! `drv snapshot create|list|delete|digest`: copy-on-write snapshots of a replica volume, asked of
//! a running replica server.

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use drv_format::frame::{Frame, snapshot_op};
use drv_transport::{Role, quic};
use serde::de::DeserializeOwned;

use drv_proto::status::{self, ReplicaStatus, SnapshotDeleted, SnapshotDigest, SnapshotInfo};

use crate::agent_cmd::human;
use crate::servers::{ServerConn, fetch_status, runtime, unexpected};

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of VOLUME (name or id) at its applied epoch: it costs no time or space
    /// until the replica overwrites blocks (copy-on-write). Refused while the volume is resyncing.
    Create {
        volume: String,
        snapshot: String,
        #[command(flatten)]
        t: ServerConn,
    },
    /// List the snapshots of every volume (or of VOLUME), with the store space each holds alone.
    List {
        volume: Option<String>,
        #[command(flatten)]
        t: ServerConn,
    },
    /// Delete a snapshot of VOLUME, freeing what no other snapshot needs.
    Delete {
        volume: String,
        snapshot: String,
        #[command(flatten)]
        t: ServerConn,
    },
    /// The xxh3-128 digest of a snapshot's image (compare it with `drv demo`'s digest of a source
    /// image at the same sequence number).
    Digest {
        volume: String,
        snapshot: String,
        #[command(flatten)]
        t: ServerConn,
    },
}

/// Whether `vol` is the volume named (or numbered) `want`.
pub fn matches(vol: &status::ReplicaVolume, want: &str) -> bool {
    vol.name == want || vol.volume_id.to_string() == want
}

pub fn run(c: SnapshotCommand) -> Result<()> {
    match c {
        SnapshotCommand::Create { volume, snapshot, t } => {
            let s: SnapshotInfo = request(&volume, snapshot_op::CREATE, &snapshot, &t)?;
            print(&t, &s, || {
                format!("snapshot {} of {} at seq {} (epoch {}), store {}", s.name, s.volume, s.seq, s.epoch, s.path)
            })
        }
        SnapshotCommand::Delete { volume, snapshot, t } => {
            let d: SnapshotDeleted = request(&volume, snapshot_op::DELETE, &snapshot, &t)?;
            print(&t, &d, || format!("snapshot {} of {} deleted: {} freed", d.name, d.volume, human(d.freed_bytes)))
        }
        SnapshotCommand::Digest { volume, snapshot, t } => {
            let d: SnapshotDigest = request(&volume, snapshot_op::DIGEST, &snapshot, &t)?;
            print(&t, &d, || {
                format!(
                    "{}  {}/{} at seq {} (epoch {}, {})",
                    d.xxh3_128,
                    d.volume,
                    d.name,
                    d.seq,
                    d.epoch,
                    human(d.bytes)
                )
            })
        }
        SnapshotCommand::List { volume, t } => list(volume.as_deref(), &t),
    }
}

fn print<T: serde::Serialize>(t: &ServerConn, v: &T, text: impl FnOnce() -> String) -> Result<()> {
    if t.json {
        println!("{}", serde_json::to_string(v)?);
    } else {
        println!("{}", text());
    }
    Ok(())
}

/// Sends snapshot operation `op` on `snapshot` of `volume`; the reply's document.
fn request<T: DeserializeOwned>(volume: &str, op: u8, snapshot: &str, t: &ServerConn) -> Result<T> {
    let (id, server) = t.open()?;
    runtime()?.block_on(async {
        let st: ReplicaStatus = fetch_status(&id, server, Role::Replica).await?;
        let Some(vol) = st.volumes.iter().find(|v| matches(v, volume)) else {
            bail!("volume {volume} is not on replica {}", st.name);
        };
        let req = Frame::SnapshotRequest { volume_id: vol.volume_id, op, name: snapshot.to_owned() };
        match quic::request(&id, server, Role::Replica, &req, 1 << 20).await? {
            Some(Frame::SnapshotReply { json }) => {
                Ok(serde_json::from_slice(&json).context("parse the replica's reply")?)
            }
            other => Err(unexpected(server, other).context(format!("snapshot {snapshot} of {volume}"))),
        }
    })
}

fn list(volume: Option<&str>, t: &ServerConn) -> Result<()> {
    let (id, server) = t.open()?;
    let st: ReplicaStatus = runtime()?.block_on(fetch_status(&id, server, Role::Replica))?;
    let mut snaps: Vec<SnapshotInfo> = Vec::new();
    let mut totals = Vec::new();
    for v in st.volumes.iter().filter(|v| volume.is_none_or(|want| matches(v, want))) {
        let mut s: Vec<SnapshotInfo> = request(&v.volume_id.to_string(), snapshot_op::LIST, "", t)?;
        snaps.append(&mut s);
        totals.push((v.name.clone(), v.snapshot_store_bytes));
    }
    if let Some(want) = volume
        && totals.is_empty()
    {
        bail!("volume {want} is not on replica {}", st.name);
    }
    if t.json {
        println!("{}", serde_json::to_string(&snaps)?);
        return Ok(());
    }
    for s in &snaps {
        println!(
            "{:<12} {:<24} seq {:>8} epoch {:>8}  {:>10} alone",
            s.volume,
            s.name,
            s.seq,
            s.epoch,
            human(s.own_bytes.unwrap_or(0))
        );
    }
    for (v, bytes) in totals {
        println!("{v}: the snapshot store holds {}", human(bytes));
    }
    Ok(())
}
