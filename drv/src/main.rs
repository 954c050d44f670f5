//! `drv`: one command line for every role of the drv disaster-recovery replicator.
//!
//! Subcommands are thin: parse, call the library crates, print (human text, or `--json` for
//! scripts). Errors carry context in verb phrases and exit non-zero.

mod agent_cmd;
mod client_file;
mod config_cmd;
mod configbench;
mod configd_cmd;
mod demo;
mod devbench;
mod digest_cmd;
mod failover_cmd;
mod follow;
mod metrics;
mod restore_cmd;
mod servers;
mod snapshot_cmd;
mod trace_cmd;
mod track_cmd;
mod uibench;
mod wrl_cmd;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "drv", version, about = "Block-level disaster-recovery replicator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a local, self-contained demonstration on temporary files (no root needed).
    Demo(demo::DemoArgs),
    /// Operate on a staging write log (WRL) offline.
    #[command(subcommand)]
    Wrl(wrl_cmd::WrlCommand),
    /// Read and change the configuration: on the config servers (--config-server) or a local store.
    Config(config_cmd::ConfigArgs),
    /// The weekly (or daily) digest: bytes written and replicated, peak and p99 lag and RPO per
    /// volume, status, recovery checks, alerts and activity; printed, or mailed with --send (run
    /// it from cron or the systemd timer in dist/).
    Digest(digest_cmd::DigestArgs),
    /// The replicated configuration servers: run one, see the group, add or remove a server.
    #[command(subcommand, name = "config-server")]
    ConfigServer(configd_cmd::ConfigServerCommand),
    /// Manage data keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// The installation CA and node certificates.
    #[command(subcommand)]
    Ca(servers::CaCommand),
    /// Run the staging server.
    #[command(subcommand)]
    Staging(RunCommand),
    /// Run the replica server.
    #[command(subcommand)]
    Replica(RunCommand),
    /// Show a server's volumes, positions, lag and peers.
    Status(servers::StatusArgs),
    /// Snapshots of replica volumes.
    #[command(subcommand)]
    Snapshot(snapshot_cmd::SnapshotCommand),
    /// Restore a replica snapshot onto a local file or disk: usable at once (a block device on
    /// this host, and over NBD with --listen) while a background copy fills it; resumable.
    Restore(restore_cmd::RestoreArgs),
    /// Fail a volume over to a point of its replica (a writable device on the replica host;
    /// apply holds), or drill it with --test (replication goes on); `status`, `end`.
    Failover(failover_cmd::FailoverArgs),
    /// The host agent of a protected volume.
    #[command(subcommand)]
    Agent(agent_cmd::AgentCommand),
    /// Protect a volume through a capture device: `--mode kmod` puts /dev/drvN (kernel module
    /// drv_capture) over the device and runs the volume's agent until `drv detach`.
    Attach(agent_cmd::AttachArgs),
    /// The kernel module's capture devices: mode, held writes, dirty blocks.
    Devices {
        #[arg(long)]
        json: bool,
    },
    /// O_DIRECT writes to a device from N writers for a while, and the rate reached (overwrites
    /// its data).
    BenchDevice(devbench::BenchDeviceArgs),
    /// The config servers against a local store: commit latency, throughput, propagation (run
    /// by `cargo xtask bench config`).
    #[command(hide = true)]
    BenchConfig(configbench::ConfigBenchArgs),
    /// The web UI's costs for 1,000 volumes: the overview page, a live update, the time
    /// series' bytes (run by `cargo xtask bench ui`).
    #[command(hide = true)]
    BenchUi(uibench::UiBenchArgs),
    /// Remove a volume's capture device (refused while it is mounted or open) and stop its agent.
    Detach(agent_cmd::DetachArgs),
    /// Initial sync of a volume to its replicas.
    #[command(subcommand)]
    Sync(agent_cmd::SyncCommand),
    /// Initial copy from restored media: only the blocks changed since `begin` are shipped.
    #[command(subcommand, name = "media-resync")]
    MediaResync(agent_cmd::MediaCommand),
    /// Live block I/O telemetry from eBPF: IOPS, throughput, latency, queue depth, flushes.
    Trace(trace_cmd::TraceArgs),
    /// Which capture paths (eBPF, kernel module, FUSE/loop, ublk) this host supports, and why not.
    Doctor(trace_cmd::DoctorArgs),
    /// Track a volume's changes with eBPF, without holding writes (`drv track VOLUME ...`), and
    /// ship them (`drv track sync VOLUME`).
    Track(track_cmd::TrackArgs),
}

#[derive(Subcommand)]
enum RunCommand {
    /// Run this node until stopped.
    Run(servers::NodeArgs),
    /// Replica only, offline: apply every complete epoch in the DR log and exit, leaving each
    /// target at its last complete epoch (what `run` also does first).
    Recover(servers::NodeArgs),
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Write a new random 32-byte AES-256 key file (mode 0600).
    Generate {
        path: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
}

/// Writes a new random key file readable only by its owner.
pub fn generate_key(path: &std::path::Path, force: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; drv_format::crypto::KEY_BYTES];
    getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("get random bytes: {e}"))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(0o600);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).with_context(|| format!("create key file {}", path.display()))?;
    f.write_all(&key).and_then(|_| f.sync_all()).with_context(|| format!("write key file {}", path.display()))?;
    Ok(())
}

/// Frames and WRL batches are multi-MiB buffers allocated and freed at a high rate. Above glibc's
/// (adaptive) mmap threshold each one is a fresh mapping whose every page faults on first touch;
/// keep them on the heap and keep freed heap memory, so buffers are reused warm.
fn tune_allocator() {
    // SAFETY: mallopt only adjusts allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn main() {
    tune_allocator();
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("DRV_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into a log file or a pipe.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Wrl(c) => wrl_cmd::run(c),
        Command::Config(c) => config_cmd::run(c),
        Command::Digest(a) => digest_cmd::run(a),
        Command::ConfigServer(c) => configd_cmd::run(c),
        Command::Ca(c) => servers::ca(c),
        Command::Staging(RunCommand::Run(n)) => servers::staging_run(n),
        Command::Staging(RunCommand::Recover(_)) => Err(anyhow::anyhow!("recover is a replica command")),
        Command::Replica(RunCommand::Run(n)) => servers::replica_run(n),
        Command::Replica(RunCommand::Recover(n)) => servers::replica_recover(n),
        Command::Status(a) => servers::status(a),
        Command::Snapshot(c) => snapshot_cmd::run(c),
        Command::Restore(a) => restore_cmd::run(a),
        Command::Failover(a) => failover_cmd::run(a),
        Command::Agent(c) => agent_cmd::agent(c),
        Command::Sync(c) => agent_cmd::sync(c),
        Command::Attach(a) => agent_cmd::attach(a),
        Command::Detach(a) => agent_cmd::detach(a),
        Command::Devices { json } => agent_cmd::devices(json),
        Command::BenchDevice(a) => devbench::run(a),
        Command::BenchConfig(a) => configbench::run(a),
        Command::BenchUi(a) => uibench::run(a),
        Command::MediaResync(c) => agent_cmd::media(c),
        Command::Trace(a) => trace_cmd::trace(a),
        Command::Doctor(a) => trace_cmd::doctor(a),
        Command::Track(a) => track_cmd::run(a),
        Command::Key(KeyCommand::Generate { path, force }) => {
            generate_key(&path, force).map(|_| println!("wrote key {}", path.display()))
        }
    };
    if let Err(e) = r {
        eprintln!("drv: error: {}", report(e.as_ref()));
        std::process::exit(1);
    }
}

/// The error and its causes, each said once: `what failed: why: why that`. A cause whose text is
/// already in the report is left out: some libraries' errors include their cause in their own
/// message and also return it as their source, which `{:#}` would print twice.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    for cause in std::iter::successors(Some(e), |e| e.source()) {
        let s = cause.to_string();
        if s.is_empty() || out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}
