//! `drv track VOLUME` (eBPF change tracking without holding writes) and `drv track sync VOLUME`
//! (ship the changes recorded so far, optionally at a frozen, consistent point).
//!
//! The tracker is an agent without a capture path: the eBPF programs see each write to the
//! device when it is issued (see `drv_blocktrace::track` for the rules); a cut hands the marked
//! extents to the agent as a resync, which reads them from the device (O_DIRECT) and ships them
//! through staging like any resync. The replica applies a resync only when it is complete, so it
//! moves from one cut to the next as a whole.
//!
//! What it does not give (ARCHITECTURE.md, "eBPF change tracking"): writes are not held, so a
//! disaster loses everything written since the last completed cut; and a cut is crash-consistent
//! only with `--freeze` (without it the blocks are read while the application keeps writing).
//! Writes made while no tracker runs are invisible, so every start ships the whole volume.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use drv_agent::control::{self, CutReport, Request};
use drv_agent::{Agent, kmod};
use drv_blocktrace::track::{Cut, LossAction, Marked};
use drv_blocktrace::{Request as IoRequest, Tracer};
use drv_config::ConfigStore;
use drv_files::freeze::Frozen;
use drv_transport::Identity;

use crate::agent_cmd::{AgentArgs, ControlArgs, device_bytes, shutdown};
use crate::servers::{addr, runtime};
use crate::trace_cmd::{POLL, monotonic_ns, record_device};

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
            device: self.device.context("--device is required")?,
            certs: self.certs.context("--certs is required")?,
            name: self.name.context("--name is required")?,
            state_dir: self.state_dir,
            control: self.control,
            ack_timeout_ms: self.ack_timeout_ms,
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

/// The tracker's state, shared by the polling thread and the cuts.
struct State {
    tracer: Tracer,
    marked: Marked,
}

impl State {
    /// Takes every queued event and every loss report into the marks.
    fn pump(&mut self) -> Result<()> {
        let State { tracer, marked } = self;
        tracer.drain(|e| marked.on(&IoRequest::from_event(e)));
        let losses = self.tracer.losses().context("read the eBPF loss counters")?;
        match self.marked.on_losses(&losses) {
            LossAction::None => {}
            LossAction::Ranges(r) => tracing::warn!("eBPF events lost: marking {} lost ranges as changed", r.len()),
            LossAction::All => {
                tracing::warn!("eBPF events lost without a known range: marking the whole volume as changed")
            }
        }
        Ok(())
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
    let tracer = Tracer::start(&[dev]).context("start the eBPF programs")?;
    let state = Arc::new(Mutex::new(State {
        tracer,
        marked: Marked::new(dev, view.volume.size_bytes, view.volume.block_bytes),
    }));
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
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let poller = {
                let (state, stop) = (state.clone(), stop.clone());
                std::thread::Builder::new().name("drv-track-poll".into()).spawn(move || -> Result<()> {
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        state.lock().expect("track state").pump()?;
                        std::thread::sleep(POLL);
                    }
                    Ok(())
                })?
            };
            let cuts = Arc::new(tokio::sync::Mutex::new(()));
            let hook: control::TrackSyncHook = {
                let (state, agent, cuts) = (state.clone(), agent.clone(), cuts.clone());
                Arc::new(move |freeze, timeout_ms| {
                    let (state, agent, cuts) = (state.clone(), agent.clone(), cuts.clone());
                    Box::pin(async move {
                        let _one = cuts.lock().await;
                        let timeout = Duration::from_millis(timeout_ms.unwrap_or(60_000));
                        cut(&state, &agent, freeze.as_deref(), timeout).await.map_err(|e| crate::report(e.as_ref()).into())
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
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            poller.join().map_err(|_| anyhow::anyhow!("the polling thread panicked"))??;
            r
        };
        let r = run.await;
        let _ = std::fs::remove_file(&socket);
        r
    })
}

/// One cut: freeze (optionally), take the marks, ship them, wait for staging, thaw.
async fn cut(state: &Arc<Mutex<State>>, agent: &Agent, freeze: Option<&Path>, timeout: Duration) -> Result<CutReport> {
    let t0 = Instant::now();
    let frozen = match freeze {
        Some(m) => Some(Frozen::freeze(m)?),
        None => None,
    };
    // After a freeze returns, every write of the filesystem has completed: the events up to
    // now describe the device as it is.
    let Cut { extents, rpo_before_ns, lost } = {
        let st = state.clone();
        tokio::task::spawn_blocking(move || -> Result<_> {
            let mut s = st.lock().expect("track state");
            s.pump()?;
            Ok(s.marked.cut(monotonic_ns()))
        })
        .await??
    };
    let bytes: u64 = extents.iter().map(|e| e.1).sum();
    if !extents.is_empty() {
        agent.resync_ranges(&extents).await.context("hand the changes to the agent")?;
    }
    let complete = agent.wait_synced(timeout).await;
    let frozen_s = frozen.as_ref().map(|f| f.since.elapsed().as_secs_f64());
    if let Some(f) = frozen {
        f.thaw()?;
    }
    let pending = state.lock().expect("track state").marked.pending_bytes();
    Ok(CutReport {
        extents: extents.len() as u64,
        bytes,
        took_s: t0.elapsed().as_secs_f64(),
        complete,
        frozen: freeze.is_some(),
        frozen_s,
        consistent: complete && freeze.is_some(),
        rpo_before_s: rpo_before_ns.map(|n| n as f64 / 1e9),
        pending_bytes: pending,
        lost_events: lost,
    })
}
