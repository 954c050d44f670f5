//! `drv snapshot create|list`: snapshots of a replica volume, asked of a running replica server.

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use drv_format::frame::Frame;
use drv_transport::{Role, quic};

use drv_proto::status::{self, ReplicaStatus, SnapshotInfo};

use crate::servers::{ServerConn, fetch_status, runtime, unexpected};

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of VOLUME (name or id) at its applied epoch. Refused while the volume is
    /// resyncing.
    Create {
        volume: String,
        snapshot: String,
        #[command(flatten)]
        t: ServerConn,
    },
    /// List the snapshots of every volume (or of VOLUME).
    List {
        volume: Option<String>,
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
        SnapshotCommand::Create { volume, snapshot, t } => create(&volume, &snapshot, &t),
        SnapshotCommand::List { volume, t } => list(volume.as_deref(), &t),
    }
}

fn create(volume: &str, snapshot: &str, t: &ServerConn) -> Result<()> {
    let (id, server) = t.open()?;
    let rt = runtime()?;
    let info = rt.block_on(async {
        let st: ReplicaStatus = fetch_status(&id, server, Role::Replica).await?;
        let Some(vol) = st.volumes.iter().find(|v| matches(v, volume)) else {
            bail!("volume {volume} is not on replica {}", st.name);
        };
        let volume_id = vol.volume_id;
        let req = Frame::SnapshotRequest { volume_id, name: snapshot.to_owned() };
        match quic::request(&id, server, Role::Replica, &req, 1 << 20).await? {
            Some(Frame::SnapshotReply { json }) => {
                Ok(serde_json::from_slice::<SnapshotInfo>(&json).context("parse the snapshot reply")?)
            }
            other => Err(unexpected(server, other).context(format!("snapshot {snapshot} of {volume}"))),
        }
    })?;
    if t.json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        println!("snapshot {} of {} at seq {} (epoch {}): {}", info.name, info.volume, info.seq, info.epoch, info.path);
    }
    Ok(())
}

fn list(volume: Option<&str>, t: &ServerConn) -> Result<()> {
    let (id, server) = t.open()?;
    let st: ReplicaStatus = runtime()?.block_on(fetch_status(&id, server, Role::Replica))?;
    let snaps: Vec<&SnapshotInfo> =
        st.volumes.iter().filter(|v| volume.is_none_or(|want| matches(v, want))).flat_map(|v| &v.snapshots).collect();
    if t.json {
        println!("{}", serde_json::to_string(&snaps)?);
        return Ok(());
    }
    for s in snaps {
        println!("{:<12} {:<24} seq {:>8} epoch {:>8}  {}", s.volume, s.name, s.seq, s.epoch, s.path);
    }
    Ok(())
}
