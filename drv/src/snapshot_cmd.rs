//! `drv snapshot create|list|delete|digest|points|export|unexport|mount|unmount|check`: copy-on-write snapshots of a
//! replica volume, asked of a running replica server.

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use drv_format::frame::{Frame, snapshot_op};
use drv_transport::{Role, quic};
use serde::de::DeserializeOwned;

use drv_proto::status::{
    self, CheckResult, RecoveryPoint, RecoveryPoints, RecoveryWindow, ReplicaStatus, SnapshotDeleted, SnapshotDigest,
    SnapshotInfo,
};

use crate::agent_cmd::human;
use crate::servers::{ServerConn, fetch_status, runtime, unexpected};

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of VOLUME (name or id) at its applied epoch, or with --at at a point of
    /// its retention window: it costs no time or space until the replica overwrites blocks
    /// (copy-on-write). Refused while the volume is resyncing (unless --at).
    Create {
        volume: String,
        snapshot: String,
        /// A point of the retention window: the last epoch boundary at or before a sequence
        /// number (`12345`), a time (`2026-12-07T09:41:00Z`, the agent's clock), or a time this
        /// long ago (`-15m`, `-2h`, `-1d`).
        #[arg(long, allow_hyphen_values = true)]
        at: Option<String>,
        #[command(flatten)]
        t: ServerConn,
    },
    /// What VOLUME can bring back: its image now, its retention window's oldest and newest
    /// point and the newest points that end with a cache flush (where a file system or database
    /// on the volume had just made its data durable), with their capture times, and its
    /// snapshots.
    Points {
        volume: String,
        /// How many flush points to list, newest last.
        #[arg(long, default_value_t = 20)]
        flush: u64,
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
    /// Serve a snapshot's image over NBD from the replica (`nbd://ADDR/SNAPSHOT`, for qemu-img,
    /// nbdinfo, nbdcopy, nbd-client), read-only unless --writable. No TLS: listen on a trusted
    /// network only.
    Export {
        volume: String,
        snapshot: String,
        /// Address the replica listens on for NBD clients (port 0: any free one; the reply says
        /// which).
        #[arg(long)]
        listen: String,
        /// Clients may write: to a private overlay, discarded at unexport, never to the snapshot.
        #[arg(long)]
        writable: bool,
        #[command(flatten)]
        t: ServerConn,
    },
    /// Serve a snapshot as a block device on the replica host (prints `DEVICE /dev/loopN`),
    /// read-only unless --writable, while replication goes on.
    Mount {
        volume: String,
        snapshot: String,
        /// Writes go to a private overlay, discarded at unmount: mount it, write, even `fsck -y`,
        /// without changing the snapshot or the replica.
        #[arg(long)]
        writable: bool,
        #[command(flatten)]
        t: ServerConn,
    },
    /// Prove a snapshot would mount: the replica serves it through a private overlay, finds each
    /// filesystem (blkid; every partition of a partitioned image) and runs its own checker
    /// (e2fsck -fn after replaying the journal, xfs_repair -n after replaying the log). The result
    /// is kept with the snapshot (`list` shows it); the exit status is 1 when it is not clean.
    Check {
        volume: String,
        snapshot: String,
        #[command(flatten)]
        t: ServerConn,
    },
    /// Detach a snapshot's block device (refused while a filesystem on it is mounted).
    Unmount {
        volume: String,
        snapshot: String,
        #[command(flatten)]
        t: ServerConn,
    },
    /// Stop serving a snapshot over NBD (its clients are disconnected).
    Unexport {
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
        SnapshotCommand::Create { volume, snapshot, at, t } => {
            let (op, arg) = match at.as_deref() {
                None => (snapshot_op::CREATE, 0),
                Some(at) => parse_at(at)?,
            };
            let s: SnapshotInfo = request(&volume, op, arg, &snapshot, &t)?;
            print(&t, &s, || {
                let when = if s.capture_unix == 0 {
                    String::new()
                } else {
                    format!(", captured {}", time_text(s.capture_unix))
                };
                format!(
                    "snapshot {} of {} at seq {} (epoch {}{when}), store {}",
                    s.name, s.volume, s.seq, s.epoch, s.path
                )
            })
        }
        SnapshotCommand::Points { volume, flush, t } => {
            let p: RecoveryPoints = request(&volume, snapshot_op::POINTS, flush, "", &t)?;
            print(&t, &p, || points_text(&p))
        }
        SnapshotCommand::Delete { volume, snapshot, t } => {
            let d: SnapshotDeleted = request(&volume, snapshot_op::DELETE, 0, &snapshot, &t)?;
            print(&t, &d, || format!("snapshot {} of {} deleted: {} freed", d.name, d.volume, human(d.freed_bytes)))
        }
        SnapshotCommand::Digest { volume, snapshot, t } => {
            let d: SnapshotDigest = request(&volume, snapshot_op::DIGEST, 0, &snapshot, &t)?;
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
        SnapshotCommand::Export { volume, snapshot, listen, writable, t } => {
            if listen.contains(' ') {
                bail!("--listen {listen:?}: an address has no spaces");
            }
            let arg = format!("{snapshot} {listen}");
            let e: serde_json::Value = request(&volume, snapshot_op::EXPORT, flags(writable), &arg, &t)?;
            print(&t, &e, || {
                format!(
                    "nbd://{}/{} ({}, seq {})",
                    e["listen"].as_str().unwrap_or("?"),
                    snapshot,
                    mode(writable),
                    e["seq"]
                )
            })
        }
        SnapshotCommand::Mount { volume, snapshot, writable, t } => {
            let m: serde_json::Value = request(&volume, snapshot_op::MOUNT, flags(writable), &snapshot, &t)?;
            print(&t, &m, || {
                format!(
                    "DEVICE {}\nsnapshot {snapshot} of {volume} at seq {} ({}), on the replica host",
                    m["device"].as_str().unwrap_or("?"),
                    m["seq"],
                    mode(writable)
                )
            })
        }
        SnapshotCommand::Check { volume, snapshot, t } => {
            let c: CheckResult = request(&volume, snapshot_op::CHECK, 0, &snapshot, &t)?;
            print(&t, &c, || check_text(&c))?;
            if !c.ok {
                std::process::exit(1);
            }
            Ok(())
        }
        SnapshotCommand::Unmount { volume, snapshot, t } => {
            let m: serde_json::Value = request(&volume, snapshot_op::UNMOUNT, 0, &snapshot, &t)?;
            print(&t, &m, || {
                format!("snapshot {snapshot} of {volume}: {} detached", m["device"].as_str().unwrap_or("?"))
            })
        }
        SnapshotCommand::Unexport { volume, snapshot, t } => {
            let e: serde_json::Value = request(&volume, snapshot_op::UNEXPORT, 0, &snapshot, &t)?;
            print(&t, &e, || {
                format!("snapshot {snapshot} of {volume} no longer exported on {}", e["listen"].as_str().unwrap_or("?"))
            })
        }
    }
}

fn flags(writable: bool) -> u64 {
    if writable { snapshot_op::WRITABLE } else { 0 }
}

fn mode(writable: bool) -> &'static str {
    if writable { "writable: a private overlay, the snapshot never changes" } else { "read-only" }
}

pub(crate) fn print<T: serde::Serialize>(t: &ServerConn, v: &T, text: impl FnOnce() -> String) -> Result<()> {
    if t.json {
        println!("{}", serde_json::to_string(v)?);
    } else {
        println!("{}", text());
    }
    Ok(())
}

/// Sends snapshot operation `op` on `snapshot` of `volume`; the reply's document.
pub(crate) fn request<T: DeserializeOwned>(
    volume: &str,
    op: u8,
    arg: u64,
    snapshot: &str,
    t: &ServerConn,
) -> Result<T> {
    let (id, server) = t.open()?;
    runtime()?.block_on(request_to(&id, server, volume, op, arg, snapshot))
}

/// [`request`] inside a runtime, with the identity and address opened.
pub(crate) async fn request_to<T: DeserializeOwned>(
    id: &drv_transport::Identity,
    server: std::net::SocketAddr,
    volume: &str,
    op: u8,
    arg: u64,
    snapshot: &str,
) -> Result<T> {
    let st: ReplicaStatus = fetch_status(id, server, Role::Replica).await?;
    let Some(vol) = st.volumes.iter().find(|v| matches(v, volume)) else {
        bail!("volume {volume} is not on replica {}", st.name);
    };
    let req = Frame::SnapshotRequest { volume_id: vol.volume_id, op, arg, name: snapshot.to_owned() };
    match quic::request(id, server, Role::Replica, &req, 1 << 20).await? {
        Some(Frame::SnapshotReply { json }) => Ok(serde_json::from_slice(&json).context("parse the replica's reply")?),
        other => Err(unexpected(server, other).context(format!("snapshot {snapshot} of {volume}"))),
    }
}

fn list(volume: Option<&str>, t: &ServerConn) -> Result<()> {
    let (id, server) = t.open()?;
    let st: ReplicaStatus = runtime()?.block_on(fetch_status(&id, server, Role::Replica))?;
    let mut snaps: Vec<SnapshotInfo> = Vec::new();
    let mut totals = Vec::new();
    for v in st.volumes.iter().filter(|v| volume.is_none_or(|want| matches(v, want))) {
        let mut s: Vec<SnapshotInfo> = request(&v.volume_id.to_string(), snapshot_op::LIST, 0, "", t)?;
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
        let check = s.check.as_ref().map(|c| format!("  checked {}: {}", time_text(c.started_unix as u32), c.summary));
        println!(
            "{:<12} {:<24} seq {:>8} epoch {:>8}  {:>10} alone{}",
            s.volume,
            s.name,
            s.seq,
            s.epoch,
            human(s.own_bytes.unwrap_or(0)),
            check.unwrap_or_default()
        );
    }
    for (v, bytes) in totals {
        println!("{v}: the snapshot store holds {}", human(bytes));
    }
    Ok(())
}

/// `--at`: a sequence number, an RFC 3339 time, or `-DURATION` (that long before now, by this
/// host's clock): the request's operation and argument.
pub(crate) fn parse_at(at: &str) -> Result<(u8, u64)> {
    if !at.is_empty() && at.bytes().all(|b| b.is_ascii_digit()) {
        return Ok((snapshot_op::CREATE_AT_SEQ, at.parse().context("--at: sequence number")?));
    }
    if let Some(ago) = at.strip_prefix('-') {
        let secs = drv_config::parse_duration(ago).map_err(|e| anyhow::anyhow!("--at {at}: {e}"))?;
        let now = drv_format::record::capture_clock() as u64;
        return Ok((snapshot_op::CREATE_AT_TIME, now.saturating_sub(secs)));
    }
    let t = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).map_err(|e| {
        anyhow::anyhow!(
            "--at {at:?}: not a sequence number, an RFC 3339 time (2026-12-07T09:41:00Z) or a time ago (-15m): {e}"
        )
    })?;
    match u64::try_from(t.unix_timestamp()) {
        Ok(secs) => Ok((snapshot_op::CREATE_AT_TIME, secs)),
        Err(_) => bail!("--at {at}: before 1970"),
    }
}

/// A recovery check for humans: the verdict, then each filesystem with the end of its checker's
/// output when it is not clean.
pub(crate) fn check_text(c: &CheckResult) -> String {
    let mut out = format!(
        "{}@{} (seq {}, captured {}): {} in {:.1} s",
        c.volume,
        c.snapshot,
        c.seq,
        time_text(c.capture_unix),
        c.summary,
        c.millis as f64 / 1000.0
    );
    for f in &c.filesystems {
        out += &format!("\n  {} {}: {}", f.part, f.filesystem, if f.checker.is_empty() { "-" } else { &f.checker });
        if !f.clean {
            for l in f.output.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev() {
                out += &format!("\n    {l}");
            }
        }
    }
    out
}

/// A capture time as RFC 3339 (UTC), or `unknown`.
pub(crate) fn time_text(unix: u32) -> String {
    if unix == 0 {
        return "unknown".into();
    }
    time::OffsetDateTime::from_unix_timestamp(i64::from(unix))
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

fn point_text(p: &RecoveryPoint) -> String {
    format!("seq {:>10}  epoch {:>10}  captured {}", p.seq, p.epoch, time_text(p.capture_unix))
}

fn points_text(p: &RecoveryPoints) -> String {
    let mut out = format!("{}: what can be recovered\n", p.volume);
    match &p.current {
        Some(c) => out += &format!("  now     {}\n", point_text(c)),
        None => {
            out += "  now     no consistent image (a resync run is applied in part, a media resync runs, or apply stopped)\n"
        }
    }
    match &p.window {
        Some(w) => out += &window_text(w),
        None => {
            out += "  no retention window (set `retention` or `retention_bytes` for the volume): only the snapshots\n"
        }
    }
    for s in &p.snapshots {
        let what = if s.name.starts_with("auto-resync-") {
            " (the last consistent image, kept while a resync run is applied in part)"
        } else {
            ""
        };
        let c = RecoveryPoint { seq: s.seq, epoch: s.epoch, capture_unix: s.capture_unix, ..Default::default() };
        out += &format!("  snapshot {}: {}{what}\n", s.name, point_text(&c));
    }
    out.trim_end().to_owned()
}

fn window_text(w: &RecoveryWindow) -> String {
    let mut out = format!("  {} points in the retention window\n", w.points);
    if let Some(p) = &w.oldest {
        out += &format!("  oldest  {}\n", point_text(p));
    }
    if let Some(p) = &w.newest {
        out += &format!("  newest  {}\n", point_text(p));
    }
    out += &format!("  {} points end with a flush", w.flush_count);
    if !w.flush_points.is_empty() {
        out += &format!(" (the newest {}):", w.flush_points.len());
        for p in &w.flush_points {
            out += &format!("\n  flush   {}", point_text(p));
        }
    }
    out + "\n"
}
