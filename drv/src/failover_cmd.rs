//! `drv failover VOLUME [--at POINT] [--test]`, `drv failover status|end VOLUME`: a point of a
//! replica volume as a writable device on the replica host. With --test replication goes on (a
//! failover drill); without, the replica holds the volume's apply step until `end`. Writes go to a
//! persistent overlay whose change map (docs/formats.md, "Failover") records every block written.

use anyhow::Result;
use clap::{Args, Subcommand};
use drv_format::frame::snapshot_op;
use drv_proto::status::FailoverInfo;

use crate::agent_cmd::human;
use crate::servers::ServerConn;
use crate::snapshot_cmd::{parse_at, print, request, time_text};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct FailoverArgs {
    #[command(subcommand)]
    cmd: Option<FailoverCommand>,
    volume: Option<String>,
    /// The point: a sequence number, a time (RFC 3339, the agent's clock) or a time ago
    /// (`-15m`), resolved in the retention window (default: the replica's image now).
    #[arg(long, allow_hyphen_values = true)]
    at: Option<String>,
    /// A failover test: the device is writable, replication goes on, nothing is promoted.
    #[arg(long)]
    test: bool,
    // (An `Option` of a flattened struct inside another breaks clap's presence check.)
    #[command(flatten)]
    t: Option<ServerConn>,
}

#[derive(Subcommand)]
enum FailoverCommand {
    /// The volume's failover: its point, device and the bytes written there.
    Status {
        volume: String,
        #[command(flatten)]
        t: ServerConn,
    },
    /// End the failover: the device detached (refused while in use), the point and the overlay
    /// deleted, replication resumed.
    End {
        volume: String,
        /// Drop what was written on a failover's device (its only copy; failback comes later).
        #[arg(long)]
        discard_writes: bool,
        #[command(flatten)]
        t: ServerConn,
    },
}

fn text(f: &FailoverInfo) -> String {
    let what = if f.test { "failover test (replication goes on)" } else { "failover (apply holds)" };
    format!(
        "DEVICE {}\n{} of {} at seq {} (captured {}), since {}; {} written (change map {})",
        if f.device.is_empty() { "(not attached)" } else { &f.device },
        what,
        f.volume,
        f.seq,
        time_text(f.capture_unix),
        time_text(f.started_unix as u32),
        human(f.changed_bytes),
        f.change_map
    )
}

pub fn run(a: FailoverArgs) -> Result<()> {
    match (a.cmd, a.volume.zip(a.t)) {
        (Some(FailoverCommand::Status { volume, t }), _) => {
            let f: Option<FailoverInfo> = request(&volume, snapshot_op::FAILOVER_STATUS, 0, "", &t)?;
            print(&t, &f, || f.as_ref().map_or_else(|| format!("volume {volume} is not failed over"), text))
        }
        (Some(FailoverCommand::End { volume, discard_writes, t }), _) => {
            let f: FailoverInfo = request(&volume, snapshot_op::FAILOVER_END, u64::from(discard_writes), "", &t)?;
            print(&t, &f, || {
                format!("the failover of {volume} ended; {} written there discarded", human(f.changed_bytes))
            })
        }
        (None, Some((volume, t))) => {
            let (op, arg) = match a.at.as_deref() {
                None => (snapshot_op::FAILOVER, 0),
                Some(at) => match parse_at(at)? {
                    (snapshot_op::CREATE_AT_SEQ, seq) => (snapshot_op::FAILOVER_AT_SEQ, seq),
                    (_, time) => (snapshot_op::FAILOVER_AT_TIME, time),
                },
            };
            let f: FailoverInfo = request(&volume, op, arg, if a.test { "test" } else { "" }, &t)?;
            print(&t, &f, || text(&f))
        }
        (None, None) => anyhow::bail!("drv failover VOLUME [--at POINT] [--test], or drv failover status|end VOLUME"),
    }
}
