//! `drv track VOLUME` (eBPF change tracking without holding writes) and `drv track sync VOLUME`
//! (ship the changes recorded so far, optionally at a frozen, consistent point). The tracker and
//! its cuts are `drv_blocktrace::tracking`'s; this file starts them around an agent and prints.
//!
//! What it does not give (ARCHITECTURE.md, "eBPF change tracking"): writes are not held, so a
//! disaster loses everything written since the last completed cut; and a cut is crash-consistent
//! only with `--freeze`. Writes made while no tracker runs are invisible, so every start ships the
//! whole volume.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use drv_agent::control::{self, Request};
use drv_agent::{Agent, kmod};
use drv_blocktrace::tracking::{Poller, Ship, TrackError, Tracking, cut};
use drv_config::ConfigStore;
use drv_transport::Identity;

use crate::agent_cmd::{AgentArgs, ControlArgs, device_bytes, shutdown};
use crate::servers::{addr, runtime};
use crate::trace_cmd::{POLL, record_device};

/// `drv track VOLUME ...` or `drv track sync VOLUME`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct TrackArgs {
    #[command(subcommand)]
    cmd: Option<TrackCommand>,
    /// The volume whose device is tracked.
    #[arg(required = true)]
    volume: Option<String>,
    #[command(flatten)]
    agent: TrackerArgs,
    /// Also cut and ship every this many seconds (default: only on `drv track sync`).
    #[arg(long)]
    every: Option<f64>,
    /// With --every: freeze the filesystem mounted here for each cut.
    #[arg(long)]
    freeze: Option<PathBuf>,
}

/// [`AgentArgs`] with the required ones optional to clap, so `drv track sync VOLUME` parses
/// without them (`subcommand_negates_reqs` lifts the requirement, not the derive's need of a
/// value); `required` still holds for `drv track VOLUME`.
#[derive(Args)]
struct TrackerArgs {
    /// The configuration store.
    #[arg(long, env = "DRV_CONFIG", default_value = "/var/lib/drv/config.redb")]
    config: PathBuf,
    /// The block device of the volume.
    #[arg(long, required = true)]
    device: Option<PathBuf>,
    /// Directory with ca.pem, NAME.pem and NAME.key.
    #[arg(long, env = "DRV_CERTS", required = true)]
    certs: Option<PathBuf>,
    /// This host's certificate name (an agent certificate).
    #[arg(long, required = true)]
    name: Option<String>,
    /// The agent's change map and activity log (default: /var/lib/drv/agent/VOLUME).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    control: ControlArgs,
    /// How long a shipped change may wait for staging before the agent retries later (ms).
    #[arg(long, default_value_t = 5000)]
    ack_timeout_ms: u64,
}

impl TrackerArgs {
    fn agent(self) -> Result<AgentArgs> {
        Ok(AgentArgs {
            config: self.config,
            servers: None,
            device: self.device.context("--device is required")?,
            certs: self.certs.context("--certs is required")?,
            name: self.name.context("--name is required")?,
            state_dir: self.state_dir,
            control: self.control,
            ack_timeout_ms: self.ack_timeout_ms,
            metrics: None,
        })
    }
}

#[derive(Subcommand)]
pub enum TrackCommand {
    /// Ship the changes recorded so far and report the resulting RPO.
    Sync {
        volume: String,
        /// Freeze the filesystem mounted here (fsfreeze) from the cut until the changes are
        /// shipped: the replica then holds a crash-consistent point of it.
        #[arg(long)]
        freeze: Option<PathBuf>,
        /// Give up waiting for staging after this many seconds (the filesystem is thawed then;
        /// the changes stay marked for the next cut).
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
}

pub fn run(a: TrackArgs) -> Result<()> {
    match (a.cmd, a.volume, a.agent) {
        (Some(TrackCommand::Sync { volume, freeze, timeout, json, control }), _, _) => {
            sync(&volume, freeze, timeout, json, &control)
        }
        (None, Some(volume), agent) => run_tracker(&volume, &agent.agent()?, a.every, a.freeze),
        _ => bail!("usage: drv track VOLUME --device DEV --certs DIR --name NAME, or drv track sync VOLUME"),
    }
}

fn sync(volume: &str, freeze: Option<PathBuf>, timeout: f64, json: bool, control: &ControlArgs) -> Result<()> {
    let rt = runtime()?;
    let reply = rt.block_on(async {
        let mut c = control.connect_to(volume).await?;
        let req = Request::TrackSync { freeze, timeout_ms: Some((timeout * 1000.0) as u64) };
        c.call(&req).await.with_context(|| format!("track sync of volume {volume}"))
    })?;
    let r = reply.track.context("the agent sent no tracking report")?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let frozen = r.frozen_s.filter(|_| r.frozen).map(|s| format!(", filesystem frozen {s:.2} s")).unwrap_or_default();
    println!(
        "volume {volume}: shipped {} in {} extents in {:.2} s{frozen}",
        crate::agent_cmd::human(r.bytes),
        r.extents,
        r.took_s
    );
    if r.complete {
        println!(
            "  staging holds the volume as of the cut{}; the oldest change it covered was {:.2} s old (the RPO just before this sync)",
            if r.consistent { " (crash-consistent: frozen)" } else { " (not frozen: not crash-consistent)" },
            r.rpo_before_s.unwrap_or(0.0)
        );
    } else {
        println!(
            "  NOT complete: staging did not take everything within the timeout; the changes stay marked for the next sync"
        );
    }
    if r.lost_events > 0 {
        println!("  eBPF events lost since start: {} (their ranges were shipped as unknown)", r.lost_events);
    }
    Ok(())
}

/// The agent ships a cut's extents (a resync of them) and says when staging holds them.
struct AgentShip(Agent);

impl Ship for AgentShip {
    async fn ship(&self, extents: &[(u64, u64)]) -> Result<(), TrackError> {
        self.0.resync_ranges(extents).await.map_err(|e| TrackError::Ship(e.to_string()))
    }
    async fn wait_synced(&self, timeout: Duration) -> bool {
        self.0.wait_synced(timeout).await
    }
}

fn run_tracker(volume: &str, a: &AgentArgs, every: Option<f64>, freeze: Option<PathBuf>) -> Result<()> {
    let store =
        ConfigStore::open_read_only(&a.config).with_context(|| format!("open configuration {}", a.config.display()))?;
    let view = store.volume(volume).with_context(|| format!("load volume {volume}"))?;
    let id = Identity::load(&a.certs, &a.name).with_context(|| format!("load certificate {}", a.name))?;
    let staging = addr(&view.staging.1.address)?;
    let dev = drv_blocktrace::block_dev_of(&a.device)
        .with_context(|| format!("eBPF tracking needs a block device; {} is not one", a.device.display()))?;
    let f = std::fs::File::open(&a.device).with_context(|| format!("open device {}", a.device.display()))?;
    let size = device_bytes(&f).with_context(|| format!("size of {}", a.device.display()))?;
    if size < view.volume.size_bytes {
        bail!(
            "device {} has {size} bytes, less than volume {volume} ({} bytes)",
            a.device.display(),
            view.volume.size_bytes
        );
    }
    drop(f);
    let state_dir = a.state_dir(volume);
    record_device(&state_dir, &a.device)?;
    // The programs first: from here on no write to the device goes unseen.
    let tracking =
        Tracking::start(dev, view.volume.size_bytes, view.volume.block_bytes).context("start the eBPF programs")?;
    let state = Arc::new(Mutex::new(tracking));
    let opts = a.options(view.volume.block_bytes);
    let socket = a.control.socket_of(volume);
    let rt = runtime()?;
    rt.block_on(async {
        let listener = control::bind(&socket).context("control socket")?;
        let run = async {
            let disk = Arc::new(
                kmod::DirectDisk::open(&a.device).with_context(|| format!("open {} (O_DIRECT)", a.device.display()))?,
            );
            let agent = Agent::start(&id, staging, view.volume.id, view.volume.size_bytes, disk, Some(&state_dir), opts)
                .await
                .with_context(|| format!("start the agent of volume {volume}"))?;
            // Nothing before this start was seen: copy everything once (the application keeps
            // writing; what it writes from now on is tracked and shipped at the next cut).
            agent.start_initial_sync(None).await.context("start the initial copy")?;
            let poller = Poller::start(state.clone(), POLL)?;
            let cuts = Arc::new(tokio::sync::Mutex::new(()));
            let hook: control::TrackSyncHook = {
                let (state, ship, cuts) = (state.clone(), Arc::new(AgentShip(agent.clone())), cuts.clone());
                Arc::new(move |freeze, timeout_ms| {
                    let (state, ship, cuts) = (state.clone(), ship.clone(), cuts.clone());
                    Box::pin(async move {
                        let _one = cuts.lock().await;
                        let timeout = Duration::from_millis(timeout_ms.unwrap_or(60_000));
                        Ok(cut(&state, ship.as_ref(), freeze.as_deref(), timeout).await?)
                    })
                })
            };
            eprintln!(
                "tracking volume {volume} ({}) on {} ({}) with eBPF: writes are not held (see `drv track sync`); staging {} at {staging}; control {}",
                crate::agent_cmd::human(view.volume.size_bytes),
                a.device.display(),
                drv_blocktrace::dev_name(dev),
                view.staging.0,
                socket.display()
            );
            let periodic = {
                let (hook, freeze) = (hook.clone(), freeze.clone());
                async move {
                    let Some(secs) = every else { return std::future::pending::<()>().await };
                    let mut tick = tokio::time::interval(Duration::from_secs_f64(secs.max(1.0)));
                    tick.tick().await;
                    loop {
                        tick.tick().await;
                        match hook(freeze.clone(), None).await {
                            Ok(r) => tracing::info!("track cut: {}", serde_json::to_string(&r).unwrap_or_default()),
                            Err(e) => tracing::warn!("track cut failed: {e}"),
                        }
                    }
                }
            };
            let hooks = control::Hooks { detach: None, track_sync: Some(hook), capture: None };
            let r = tokio::select! {
                r = control::serve_with(agent.clone(), listener, socket.clone(), hooks) => r.context("control socket"),
                _ = periodic => Ok(()),
                _ = shutdown() => Ok(()),
            };
            poller.stop()?;
            r
        };
        let r = run.await;
        let _ = std::fs::remove_file(&socket);
        r
    })
}
