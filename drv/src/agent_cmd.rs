//! `drv agent run|status`, `drv sync start`, `drv media-resync begin|complete|status`.
//!
//! `drv agent run` is the agent process of one volume: it holds the volume's change map and
//! activity log and serves a control socket (`RUN_DIR/VOLUME.sock`, see `drv_agent::control`) that
//! the other commands here use. Capture paths (the kernel module, the userspace device) hand the
//! writes of the volume to this agent.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use drv_agent::control::{self, Client, Request};
use drv_agent::detach::{Orphan, detach_orphan};
use drv_agent::{Agent, AgentOptions, AgentStatus, FileDisk, Mode, kmod, user};
use drv_blocktrace::crosscheck::OrderCheck;
use drv_config::{ConfigStore, VolumeView};
use drv_configd::api::Slice;

use crate::follow::Follower;
use drv_format::frame::{Frame, media_op};
use drv_replica::media::{MediaReport, phase_name};
use drv_transport::{Identity, Role, quic};

use crate::servers::{ServerConn, addr, fetch_status, runtime};

/// Where the control socket of a volume's agent is.
#[derive(Args, Clone)]
pub struct ControlArgs {
    /// Directory of the agents' control sockets (`VOLUME.sock`).
    #[arg(long, env = "DRV_RUN_DIR", default_value = "/run/drv")]
    pub run_dir: PathBuf,
}

impl ControlArgs {
    pub(crate) fn socket_of(&self, volume: &str) -> PathBuf {
        self.socket(volume)
    }

    pub(crate) async fn connect_to(&self, volume: &str) -> Result<Client> {
        self.connect(volume).await
    }

    fn socket(&self, volume: &str) -> PathBuf {
        self.run_dir.join(format!("{volume}.sock"))
    }

    async fn connect(&self, volume: &str) -> Result<Client> {
        let p = self.socket(volume);
        Client::connect(&p).await.with_context(|| {
            format!("reach the agent of volume {volume} (is `drv agent run --volume {volume}` running?)")
        })
    }
}

#[derive(Subcommand)]
pub enum AgentCommand {
    /// Run the agent of one volume until stopped (SIGINT/SIGTERM).
    Run(AgentRunArgs),
    /// Show the agent's mode (sync, change-map, resyncing), dirty bytes and counters.
    Status {
        volume: String,
        #[command(flatten)]
        control: ControlArgs,
        #[arg(long)]
        json: bool,
    },
    /// The xxh3-128 digest of the protected volume's local disk with every write up to a
    /// sequence number and none after (the application's writes wait while it is read): compare
    /// it with `drv snapshot digest` of a replica snapshot at that sequence number.
    Digest {
        volume: String,
        #[command(flatten)]
        control: ControlArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct AgentRunArgs {
    /// The volume this agent protects.
    #[arg(long)]
    volume: String,
    #[command(flatten)]
    agent: AgentArgs,
}

/// `drv attach VOLUME --mode kmod|user --device /dev/sdX|IMAGE`.
#[derive(Args)]
pub struct AttachArgs {
    /// The volume to protect.
    volume: String,
    /// How writes are captured. kmod: the drv_capture kernel module puts /dev/drvN over the
    /// device and holds every write to it until staging has it. user: no module; the agent serves
    /// the device (or image file) through FUSE and binds a loop device to it: use that
    /// /dev/loopN (printed, and in STATE/device).
    #[arg(long, value_enum)]
    mode: CaptureMode,
    /// user mode: do not cross-check the agent's epochs against the kernel's order of the loop
    /// device with eBPF (it runs when this host can load the programs).
    #[arg(long)]
    no_order_check: bool,
    #[command(flatten)]
    agent: AgentArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureMode {
    Kmod,
    User,
}

/// `drv detach VOLUME`.
#[derive(Args)]
pub struct DetachArgs {
    volume: String,
    #[command(flatten)]
    control: ControlArgs,
    /// The agent's state directory (default: /var/lib/drv/agent/VOLUME): where a user-mode
    /// device left by a crashed agent is recorded.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct AgentArgs {
    /// The local configuration store (when no config server is given).
    #[arg(long, env = "DRV_CONFIG", default_value = "/var/lib/drv/config.redb")]
    pub(crate) config: PathBuf,
    /// The config servers (HOST:PORT,...): the agent fetches its volume's configuration there,
    /// caches it (in the state directory) and follows its changes.
    #[arg(long = "config-server", env = "DRV_CONFIG_SERVER")]
    pub(crate) servers: Option<String>,
    /// The local disk of the volume (a block device or an image file).
    #[arg(long)]
    pub(crate) device: PathBuf,
    /// Directory with ca.pem, NAME.pem and NAME.key.
    #[arg(long, env = "DRV_CERTS")]
    pub(crate) certs: PathBuf,
    /// This host's certificate name (an agent certificate).
    #[arg(long)]
    pub(crate) name: String,
    /// Change map and activity log (default: /var/lib/drv/agent/VOLUME).
    #[arg(long)]
    pub(crate) state_dir: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) control: ControlArgs,
    /// How long a write may wait for staging before the agent switches to its change map (ms).
    #[arg(long, default_value_t = 5000)]
    pub(crate) ack_timeout_ms: u64,
    /// Serve Prometheus metrics on http://HOST:PORT/metrics (plain HTTP: loopback or a
    /// management network).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) metrics: Option<String>,
}

impl AgentArgs {
    /// The agent's state directory of `volume`.
    pub(crate) fn state_dir(&self, volume: &str) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| PathBuf::from("/var/lib/drv/agent").join(volume))
    }

    /// The agent's options for a volume of change blocks of `block_bytes`.
    pub(crate) fn options(&self, block_bytes: u64) -> AgentOptions {
        AgentOptions {
            ack_timeout: Duration::from_millis(self.ack_timeout_ms),
            change_block_bytes: block_bytes,
            ..AgentOptions::default()
        }
    }
}

#[derive(Subcommand)]
pub enum SyncCommand {
    /// Copy the whole volume to its replicas through staging, while the application keeps
    /// writing. Shows progress until the replica is consistent (or returns at once with
    /// --no-wait).
    Start {
        volume: String,
        /// Bytes per second, e.g. 50M (binary units; default: the volume's configured bwlimit, or the last one set; none: unlimited).
        #[arg(long, value_parser = parse_rate)]
        bwlimit: Option<u64>,
        /// Progress as JSON lines (the default when stdout is not a terminal).
        #[arg(long)]
        json: bool,
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
}

#[derive(Subcommand)]
pub enum MediaCommand {
    /// On the replica: from now on, leave the target alone and track which blocks change. Then
    /// take a backup of the source and copy it onto the replica's target by any means.
    Begin {
        volume: String,
        #[command(flatten)]
        t: ServerConn,
    },
    /// Once the copy is on the target: the agent ships only the blocks changed since `begin`;
    /// waits until the replica is consistent again.
    Complete {
        volume: String,
        #[command(flatten)]
        t: ServerConn,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// The media-resync phase of a volume on the replica.
    Status {
        volume: String,
        #[command(flatten)]
        t: ServerConn,
    },
}

/// `10M`, `10MiB/s`, `512K`, `1G` (binary units), or plain bytes per second.
pub(crate) fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("/s").trim_end_matches("ps");
    let t = t.strip_suffix('B').unwrap_or(t);
    drv_config::parse_size(t)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?} is not a rate such as 50M (bytes per second)"))
}

/// One request to the running agent of `volume`.
fn call(control: &ControlArgs, volume: &str, req: &Request) -> Result<control::Reply> {
    runtime()?.block_on(async { Ok(control.connect(volume).await?.call(req).await?) })
}

pub fn agent(c: AgentCommand) -> Result<()> {
    match c {
        AgentCommand::Run(a) => agent_run(a),
        AgentCommand::Digest { volume, control, json } => {
            let r = call(&control, &volume, &Request::Digest)?;
            let d = r.digest.context("the agent's reply has no digest")?;
            if json {
                println!("{}", serde_json::to_string(&d)?);
            } else {
                println!("{}  volume {volume} at seq {} ({})", d.xxh3_128, d.seq, human(d.bytes));
            }
            Ok(())
        }
        AgentCommand::Status { volume, control, json } => {
            let r = call(&control, &volume, &Request::Status)?;
            let st = r.status.context("the agent's reply has no status")?;
            if json {
                let mut v = serde_json::to_value(&st)?;
                if let Some(c) = r.capture {
                    v["capture"] = serde_json::to_value(c)?;
                }
                println!("{}", serde_json::to_string(&v)?);
            } else {
                print_status(&volume, &st);
                if let Some(c) = r.capture {
                    print_capture(&c);
                }
            }
            Ok(())
        }
    }
}

/// The capture path's line of `drv agent status`.
fn print_capture(c: &control::CaptureReport) {
    let mut line = format!(
        "capture: {} mode, device {} (FUSE {}): {} writes, {} flushes, {} reads, {} failed",
        c.mode, c.device, c.fuse, c.writes, c.flushes, c.reads, c.failed
    );
    if let Some(o) = &c.order_check {
        line += &format!(
            "; order check: {} writes checked against the kernel's order, {} violations, {} unmatched, {} events lost",
            o.checked, o.violations, o.unmatched, o.lost
        );
    }
    println!("{line}");
}

fn print_status(volume: &str, s: &AgentStatus) {
    println!(
        "volume {volume} (id {}): {}, {} dirty, next seq {}, epoch {}; {} writes ({} to the change map), {} resynced",
        s.volume_id,
        s.mode,
        human(s.dirty_bytes),
        s.next_seq,
        s.epoch,
        s.writes,
        s.mapped_writes,
        human(s.resync_bytes)
    );
    if let Some(p) = &s.problem {
        println!("  PROBLEM: {p}");
    }
}

pub(crate) fn human(b: u64) -> String {
    indicatif::BinaryBytes(b).to_string()
}

fn agent_run(a: AgentRunArgs) -> Result<()> {
    run_agent(&a.volume, &a.agent, None, false)
}

pub fn attach(a: AttachArgs) -> Result<()> {
    run_agent(&a.volume, &a.agent, Some(a.mode), !a.no_order_check)
}

/// `drv detach VOLUME`: the running agent removes its capture device and exits; with no agent
/// running, the device is removed directly.
pub fn detach(a: DetachArgs) -> Result<()> {
    runtime()?.block_on(async {
        match a.control.connect(&a.volume).await {
            Ok(mut c) => {
                c.call(&Request::Detach).await?;
                println!("volume {}: detached; the agent stopped", a.volume);
                Ok(())
            }
            Err(e) => {
                // No agent: the device it left behind goes.
                let state = a.state_dir.clone().unwrap_or_else(|| PathBuf::from("/var/lib/drv/agent").join(&a.volume));
                let v = &a.volume;
                match detach_orphan(v, &state).with_context(|| crate::report(e.as_ref()))? {
                    Orphan::User { loop_dev } => println!(
                        "volume {v}: {} and the FUSE mount of the agent that died removed; writes in doubt are resynced by the next `drv attach`",
                        loop_dev.map_or("no loop device was bound; nothing detached".to_string(), |d| format!("{} detached", d.display()))
                    ),
                    Orphan::Kmod { path, dirty_blocks } => println!(
                        "volume {v}: {path} removed (no agent was running: {dirty_blocks} blocks were dirty and are not resynced)"
                    ),
                }
                Ok(())
            }
        }
    })
}

/// `drv devices`: the kernel module's capture devices.
pub fn devices(json: bool) -> Result<()> {
    let all = kmod::Control::open()?.list()?;
    if json {
        println!("{}", serde_json::to_string(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        println!("no drv devices");
    }
    for d in all {
        println!(
            "{} volume {} over {} ({}): {}, {} held writes ({}), {} dirty ({} blocks of {}), {} hold timeouts, {} flushes, {} FUA writes",
            d.path(),
            d.name,
            d.backing,
            human(d.size_bytes),
            if d.holding { "holding writes for the agent" } else { "pass-through (no agent), writes marked dirty" },
            d.held_writes,
            human(d.held_bytes),
            human(d.dirty_blocks * d.dirty_block_bytes as u64),
            d.dirty_blocks,
            human(d.dirty_block_bytes as u64),
            d.timeouts,
            d.flush_writes,
            d.fua_writes
        );
    }
    Ok(())
}

/// Cross-checks the agent's epochs against the kernel's order of `loop_dev` (eBPF), writing the
/// figures to `STATE/order-check.json` every second.
fn start_order_check(agent: &drv_agent::Agent, loop_dev: &Path, state: &Path) -> Result<OrderCheck> {
    drv_blocktrace::ebpf_built_in()?;
    let dev = drv_blocktrace::block_dev_of(loop_dev).with_context(|| format!("{}", loop_dev.display()))?;
    let out = state.join("order-check.json");
    let report = Box::new(move |s: &drv_blocktrace::crosscheck::Summary| {
        let text = serde_json::to_string(s).expect("summary serializes");
        if let Err(e) = drv_files::replace(&out, text.as_bytes()) {
            tracing::warn!("write {}: {e}", out.display());
        }
    });
    let (check, tap) =
        OrderCheck::start(dev, loop_dev.display().to_string(), report).context("start the eBPF programs")?;
    agent.set_issue_tap(tap);
    Ok(check)
}

/// What the control socket gets of the capture path, and what ends it.
struct Capture {
    /// What the agent protects, for the start message.
    on: String,
    detach: Option<control::DetachHook>,
    capture: Option<control::CaptureHook>,
    /// The userspace device (detached at shutdown if nothing uses it).
    user_dev: Option<Arc<Mutex<Option<user::UserDevice>>>>,
    /// Resolves when the capture ended (`drv detach`, or the kernel module's capture failed).
    ended: std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>,
}

/// Starts the capture of the kernel module's device, or hands the userspace device to the
/// control socket (with the order check's figures); neither: only the control socket.
fn capture(
    kdev: Option<(kmod::Control, kmod::DeviceInfo, kmod::Recovery, kmod::AttachState)>,
    udev: Option<user::UserDevice>,
    check: Option<OrderCheck>,
    agent: &Agent,
    state: &Path,
    device: &Path,
) -> Result<Capture> {
    let on = device.display().to_string();
    if let Some((ctl, d, _, _)) = kdev {
        let run = kmod::spawn_capture(ctl, d.index, agent.clone(), tokio::runtime::Handle::current())?;
        let ended = run.ended;
        return Ok(Capture {
            on: format!("{} over {on}", d.path()),
            detach: Some(run.detach),
            capture: None,
            user_dev: None,
            ended: Box::pin(async move {
                match ended.await {
                    Ok(r) => r.context("capture"),
                    Err(_) => std::future::pending().await,
                }
            }),
        });
    }
    let Some(d) = udev else {
        return Ok(Capture {
            on,
            detach: None,
            capture: None,
            user_dev: None,
            ended: Box::pin(std::future::pending()),
        });
    };
    let fuse = user::mount_point(state).join(user::FILE_NAME);
    let on = format!("{} (FUSE {} over {on})", d.loop_dev.display(), fuse.display());
    let check = Mutex::new(check);
    let figures = state.join("order-check.json");
    let served = user::serve(
        d,
        state,
        move || {
            if let Some(c) = check.lock().expect("check").take().and_then(|c| c.finish()) {
                eprintln!("order check: {}", serde_json::to_string(&c).unwrap_or_default());
            }
        },
        move || {
            std::fs::read_to_string(&figures).ok().and_then(|t| serde_json::from_str::<control::OrderFigures>(&t).ok())
        },
    );
    let ended = served.ended;
    Ok(Capture {
        on,
        detach: Some(served.detach),
        capture: Some(served.capture),
        user_dev: Some(served.device),
        ended: Box::pin(async move {
            match ended.await {
                Ok(()) => Ok(()),
                Err(_) => std::future::pending().await,
            }
        }),
    })
}

/// Serves the volume through FUSE and a loop device (`DEVICE /dev/loopN` on stdout once it is
/// there), with the eBPF cross-check of the agent's epochs started first when asked for.
async fn start_user(
    volume: &str,
    agent: &Agent,
    image: std::fs::File,
    size: u64,
    state: &Path,
    order_check: bool,
) -> Result<(user::UserDevice, Option<OrderCheck>)> {
    let (ag, st, h, vol) = (agent.clone(), state.to_path_buf(), tokio::runtime::Handle::current(), volume.to_owned());
    let d = tokio::task::spawn_blocking(move || user::attach(&vol, ag, image, size, &st, h))
        .await?
        .with_context(|| format!("serve volume {volume} through FUSE and a loop device"))?;
    crate::trace_cmd::record_device(state, &d.loop_dev)?;
    // The check first: it sees every write from the moment the device is announced.
    let mut check = None;
    if order_check {
        match start_order_check(agent, &d.loop_dev, state) {
            Ok(c) => check = Some(c),
            Err(e) => eprintln!(
                "volume {volume}: the agent's epochs are not cross-checked with eBPF: {} (`drv doctor` says why)",
                crate::report(e.as_ref())
            ),
        }
    }
    println!("DEVICE {}", d.loop_dev.display());
    Ok((d, check))
}

/// What the agent follows: the config servers' client and the version it started on, and the
/// volume as the last run knew it (from the cache, if there was one).
struct Following {
    follower: Follower,
    version: u64,
    before: Option<VolumeView>,
}

/// Volume `volume`'s configuration: from the config servers (or the copy cached in the state
/// directory while none answers), with the follower that keeps it current; or from the local store.
fn load_volume(volume: &str, a: &AgentArgs, id: &Identity) -> Result<(VolumeView, Option<Following>)> {
    let Some(servers) = &a.servers else {
        let store = ConfigStore::open_read_only(&a.config)
            .with_context(|| format!("open configuration {}", a.config.display()))?;
        return Ok((store.volume(volume).with_context(|| format!("load volume {volume}"))?, None));
    };
    let client = drv_configd::client::ApiClient::new(servers, id)?;
    let follower = Follower::volume(client, volume, a.state_dir(volume).join("config-cache.redb"));
    // Unreadable, it is only not compared: `start` says what is wrong with it if it needs it.
    let before = follower.cached::<VolumeView>().ok().flatten().map(|s| s.value);
    let s: Slice<VolumeView> =
        crate::configd_cmd::block_on(follower.start())?.with_context(|| format!("load volume {volume}"))?;
    Ok((s.value, Some(Following { follower, version: s.version, before })))
}

/// A replica in `new` and not in `old` holds nothing: the whole volume goes to it (as to every
/// replica: staging relays one log), and staging starts it at this run's first record.
fn sync_added_replicas(agent: &Agent, name: &str, old: &[String], new: &[String]) {
    let added: Vec<&String> = new.iter().filter(|r| !old.contains(r)).collect();
    if added.is_empty() {
        return;
    }
    tracing::warn!("volume {name}: replica {added:?} added: starting an initial sync");
    let (agent, name) = (agent.clone(), name.to_owned());
    tokio::spawn(async move {
        if let Err(e) = agent.start_initial_sync(None).await {
            tracing::error!(
                "volume {name}: the initial sync for a new replica did not start: {e} (drv sync start {name})"
            );
        }
    });
}

/// A full resync asked for by the configuration (`resync` raised): every block is marked and
/// sent again, as `drv sync start` does.
fn resync_all(agent: &Agent, name: &str, generation: u64) {
    let (agent, name) = (agent.clone(), name.to_owned());
    tokio::spawn(async move {
        tracing::info!("volume {name}: a full resync was asked for (resync={generation})");
        if let Err(e) = agent.start_initial_sync(None).await {
            tracing::error!("volume {name}: the resync asked for did not start: {e} (drv sync start {name})");
        }
    });
}

/// Follows the volume's configuration: the resync bandwidth limit changes live; a replica added
/// or `resync` raised (also while the agent was down: against the cached copy) starts an
/// initial sync; the volume's
/// id, size, change block size and staging server wait for a restart of the agent (reported as
/// such); the rest the agent does not use.
fn follow_volume(agent: &Agent, view: &VolumeView, follow: Option<Following>) {
    let Some(Following { follower, version, before }) = follow else { return };
    let (agent, name) = (agent.clone(), view.name.clone());
    let (fig, volume) = (agent.clone(), name.clone());
    let follower = follower.with_figures(std::sync::Arc::new(move || {
        (crate::metrics::figures::agent(&volume, &fig.status()), Default::default())
    }));
    if let Some(before) = before {
        sync_added_replicas(&agent, &name, &before.volume.replicas, &view.volume.replicas);
        if view.volume.resync > before.volume.resync {
            resync_all(&agent, &name, view.volume.resync);
        }
    }
    let current = Slice { version, value: view.clone() };
    tokio::spawn(follower.follow(current, move |old: &VolumeView, new: &VolumeView| {
        let mut pending = Vec::new();
        for field in drv_config::diff::volume_fields(old, new) {
            if field == "replicas" {
                sync_added_replicas(&agent, &name, &old.volume.replicas, &new.volume.replicas);
            } else if field == "resync" && new.volume.resync > old.volume.resync {
                resync_all(&agent, &name, new.volume.resync);
            } else if field == "bwlimit" {
                agent.set_bwlimit(new.volume.bwlimit);
                tracing::info!("volume {name}: resync bandwidth limit now {:?} bytes/s", new.volume.bwlimit);
            } else if ["id", "size_bytes", "block_bytes", "staging"].contains(&field.as_str()) {
                tracing::warn!("volume {name}: configuration changed: {field} (at the agent's next restart)");
                pending.push(format!("volume {name}: {field} (at the agent's next restart)"));
            }
        }
        pending
    }));
}

fn run_agent(volume: &str, a: &AgentArgs, mode: Option<CaptureMode>, order_check: bool) -> Result<()> {
    let id = Identity::load(&a.certs, &a.name).with_context(|| format!("load certificate {}", a.name))?;
    let (view, follow) = load_volume(volume, a, &id)?;
    let staging = addr(&view.staging.1.address)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&a.device)
        .with_context(|| format!("open device {}", a.device.display()))?;
    let size = device_bytes(&f).with_context(|| format!("size of {}", a.device.display()))?;
    if size < view.volume.size_bytes {
        bail!(
            "device {} has {size} bytes, less than volume {volume} ({} bytes)",
            a.device.display(),
            view.volume.size_bytes
        );
    }
    let state = a.state_dir(volume);
    let opts = a.options(view.volume.block_bytes);
    let socket = a.control.socket(volume);
    let rt = runtime()?;
    rt.block_on(async {
        // The socket first: a second agent for the volume stops here, before it touches anything.
        let listener = control::bind(&socket).context("control socket")?;
        let metrics = match &a.metrics {
            Some(m) => Some(crate::metrics::bind(m).await?),
            None => None,
        };
        let run = async {
            // The capture device first: from its creation on, no write to it goes unrecorded.
            let kdev = match mode {
                None | Some(CaptureMode::User) => None,
                Some(CaptureMode::Kmod) => {
                    let ctl = kmod::Control::open()?;
                    let (d, recovery, st) = kmod::attach_device(&ctl, volume, &a.device, view.volume.block_bytes as u32, &state)
                        .with_context(|| format!("the drv device of volume {volume}"))?;
                    Some((ctl, d, recovery, st))
                }
            };
            // A crashed agent's device first: its loop device and dead FUSE mount go away.
            if mode == Some(CaptureMode::User)
                && let Some(m) = user::recover(&state).context("clean up after the previous agent")?
            {
                if m.loop_dev.as_os_str().is_empty() {
                    eprintln!("volume {volume}: the previous agent stopped before it bound a loop device; its FUSE mount is removed");
                } else {
                    eprintln!(
                        "volume {volume}: the previous agent stopped without `drv detach`; its {} failed every I/O since and is now detached (unmount whatever was mounted from it); writes in doubt are resynced, and a new loop device follows",
                        m.loop_dev.display()
                    );
                }
            }
            let image = match mode {
                Some(CaptureMode::User) => Some(f.try_clone().context("open the image for reads")?),
                _ => None,
            };
            let disk: Arc<dyn drv_agent::LocalDisk> = match mode {
                None | Some(CaptureMode::User) => Arc::new(FileDisk(f)),
                Some(CaptureMode::Kmod) => Arc::new(
                    kmod::DirectDisk::open(&a.device).with_context(|| format!("open {} (O_DIRECT)", a.device.display()))?,
                ),
            };
            let agent = Agent::start(&id, staging, view.volume.id, view.volume.size_bytes, disk, Some(&state), opts)
                .await
                .with_context(|| format!("start the agent of volume {volume}"))?;
            agent.set_bwlimit(view.volume.bwlimit);
            if let Some(m) = metrics {
                let (s, v) = (agent.clone(), volume.to_owned());
                let at = crate::metrics::serve(m, Arc::new(move || Ok(crate::metrics::agent(&v, &s.status()))))?;
                eprintln!("agent of volume {volume}: metrics on http://{at}/metrics");
            }
            follow_volume(&agent, &view, follow);
            let (udev, check) = match image {
                Some(image) => {
                    let (d, c) = start_user(volume, &agent, image, view.volume.size_bytes, &state, order_check).await?;
                    (Some(d), c)
                }
                None => {
                    crate::trace_cmd::record_device(&state, &a.device)?;
                    (None, None)
                }
            };
            // A device that went away without `drv detach` (the host crashed or rebooted, the
            // module was reloaded) took its dirty bitmap with it: whatever passed through while
            // no agent held it is unknown, so everything is shipped again.
            if let Some((_, d, kmod::Recovery::FullResync, st)) = &kdev {
                eprintln!(
                    "volume {volume}: {} was not detached cleanly before it went away (host crash or reboot?): writes that passed through without an agent are unknown; resyncing the whole volume",
                    d.path()
                );
                agent.start_initial_sync(None).await.context("full resync")?;
                // Marked in the change map (durably): the decision is kept there now.
                st.full_resync_marked()?;
            }
            let Capture { on, detach: detach_hook, capture: capture_hook, user_dev, ended: capture_ended } =
                capture(kdev, udev, check, &agent, &state, &a.device)?;
            eprintln!(
                "agent {} protecting volume {volume} ({}) on {on}: {}, staging {} at {staging}; control {}",
                a.name,
                human(view.volume.size_bytes),
                agent.mode(),
                view.staging.0,
                socket.display()
            );
            tokio::select! {
                r = control::serve_with(agent.clone(), listener, socket.clone(), control::Hooks { detach: detach_hook, track_sync: None, capture: capture_hook }) => r.context("control socket"),
                r = capture_ended => {
                    r?;
                    kmod::attach::detached(&state)?;
                    // Detached: let the control reply of `drv detach` go out first.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    eprintln!("volume {volume}: detached");
                    Ok(())
                }
                _ = shutdown() => {
                    // Stopped without `drv detach`: detach if nothing uses the device; else the
                    // device fails its I/O from now on, until `drv attach` again.
                    if let Some(d) = user_dev.and_then(|d| d.lock().expect("device").take()) {
                        let mut d = d;
                        if let Err(e) = tokio::task::spawn_blocking(move || d.detach()).await? {
                            eprintln!("volume {volume}: stopping with the device attached ({e}); its I/O fails until `drv attach` runs again");
                        }
                    }
                    Ok(())
                }
            }
        };
        let r = run.await;
        let _ = std::fs::remove_file(&socket);
        r
    })
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Bytes of a file or block device.
pub(crate) fn device_bytes(f: &std::fs::File) -> std::io::Result<u64> {
    use std::io::Seek;
    let mut f = f;
    f.seek(std::io::SeekFrom::End(0))
}

pub fn sync(c: SyncCommand) -> Result<()> {
    let SyncCommand::Start { volume, bwlimit, json, no_wait, control } = c;
    let json = json || !std::io::stdout().is_terminal();
    runtime()?.block_on(async {
        let mut c = control.connect(&volume).await?;
        let before = c.status().await?;
        let r = c.call(&Request::SyncStart { bwlimit }).await?;
        let st = r.status.context("status in the reply")?;
        let total = st.volume_bytes;
        if !json {
            println!(
                "initial sync of volume {volume}: {} to ship{}",
                human(total),
                bwlimit.map(|b| format!(" at most {}/s", human(b))).unwrap_or_default()
            );
        }
        if no_wait {
            return Ok(());
        }
        follow(&mut c, &volume, before.resync_bytes, total, json, "syncing").await
    })
}

/// Shows the resync's progress until the agent is back in sync mode with nothing dirty: an
/// indicatif bar on a terminal, JSON lines otherwise.
async fn follow(c: &mut Client, volume: &str, base: u64, total: u64, json: bool, what: &str) -> Result<()> {
    let started = Instant::now();
    let bar = (!json).then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "  {what} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} eta {{eta}}  {{msg}}"
            ))
            .expect("template")
            .progress_chars("=> "),
        );
        b
    });
    let mut last_line: Option<Instant> = None;
    loop {
        let st = c.status().await?;
        let shipped = st.resync_bytes.saturating_sub(base);
        let done = st.mode == Mode::Sync && st.dirty_bytes == 0;
        let secs = started.elapsed().as_secs_f64();
        let rate = shipped as f64 / secs.max(1e-3);
        if let Some(b) = &bar {
            b.set_length(total.max(shipped));
            b.set_position(shipped);
            b.set_message(format!("{} ({} dirty)", st.mode, human(st.dirty_bytes)));
        } else if done || last_line.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_line = Some(Instant::now());
            let left = total.saturating_sub(shipped);
            println!(
                "{}",
                serde_json::json!({
                    "volume": volume, "done": done, "mode": st.mode, "shipped_bytes": shipped,
                    "total_bytes": total.max(shipped), "dirty_bytes": st.dirty_bytes,
                    "rate_bytes_per_sec": rate.round(), "elapsed_seconds": secs,
                    "eta_seconds": if done { 0.0 } else if rate > 0.0 { left as f64 / rate } else { -1.0 },
                })
            );
        }
        if done {
            if let Some(b) = bar {
                b.finish_and_clear();
                println!(
                    "{what} done: {} shipped in {secs:.1} s ({}/s); volume {volume} is back in sync mode",
                    human(shipped),
                    human(rate as u64)
                );
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One media-resync request to the replica.
async fn media_call(
    id: &Identity,
    server: std::net::SocketAddr,
    volume_id: u64,
    op: u8,
    arg: u64,
) -> Result<MediaReport> {
    match quic::request(id, server, Role::Replica, &Frame::MediaRequest { volume_id, op, arg }, 16 << 20).await? {
        Some(Frame::MediaReply { json }) => Ok(serde_json::from_slice(&json).context("parse media reply")?),
        other => Err(crate::servers::unexpected(server, other)),
    }
}

/// The volume's id on the replica, by name or id.
async fn replica_volume(id: &Identity, server: std::net::SocketAddr, volume: &str) -> Result<u64> {
    let st: drv_proto::status::ReplicaStatus = fetch_status(id, server, Role::Replica).await?;
    st.volumes
        .iter()
        .find(|v| crate::snapshot_cmd::matches(v, volume))
        .map(|v| v.volume_id)
        .with_context(|| format!("volume {volume} is not on replica {}", st.name))
}

/// `op` (without an argument) on `volume` of the replica `t` names.
async fn media_step(volume: &str, t: &ServerConn, op: u8) -> Result<MediaReport> {
    let (id, server) = t.open()?;
    let vid = replica_volume(&id, server, volume).await?;
    media_call(&id, server, vid, op, 0).await
}

pub fn media(c: MediaCommand) -> Result<()> {
    let rt = runtime()?;
    match c {
        MediaCommand::Begin { volume, t } => {
            let r = rt.block_on(media_step(&volume, &t, media_op::BEGIN))?;
            if t.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "media resync of {volume} begun on {}: the replica now leaves its target alone and tracks changed blocks.\n\
                     Now take a backup of the source, copy it onto the replica's target, then run `drv media-resync complete {volume}`.",
                    t.server
                );
            }
            Ok(())
        }
        MediaCommand::Status { volume, t } => {
            let r = rt.block_on(media_step(&volume, &t, media_op::STATUS))?;
            if t.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("volume {volume}: media resync {}, {} marked", phase_name(r.phase), human(r.marked_bytes));
            }
            Ok(())
        }
        MediaCommand::Complete { volume, t, control } => rt.block_on(complete(&volume, &t, &control)),
    }
}

/// `complete` on the replica (page by page) -> the ranges to the agent -> wait for the agent's
/// resync -> `release` on the replica with the sequence the resync ended below. Every step may be
/// repeated after a failure: the replica keeps the ranges until `release`.
async fn complete(volume: &str, t: &ServerConn, control: &ControlArgs) -> Result<()> {
    let json = t.json || !std::io::stdout().is_terminal();
    let (id, server) = t.open()?;
    let vid = replica_volume(&id, server, volume).await?;
    let mut c = control.connect(volume).await?;
    let before = c.status().await?;
    if before.volume_id != vid {
        bail!(
            "the agent at {} serves volume id {}, the replica's {volume} is id {vid}",
            control.socket(volume).display(),
            before.volume_id
        );
    }
    let mut from = 0u64;
    let (mut ranges, mut bytes) = (0usize, 0u64);
    let marked = loop {
        let r = media_call(&id, server, vid, media_op::COMPLETE, from).await?;
        let extents = r.extents;
        for chunk in extents.chunks(control::MAX_EXTENTS) {
            c.call(&Request::Resync { extents: chunk.to_vec() }).await?;
        }
        ranges += extents.len();
        bytes += extents.iter().map(|(_, l)| l).sum::<u64>();
        match r.next {
            Some(n) => from = n,
            None => break r.marked_bytes,
        }
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"volume": volume, "changed_ranges": ranges, "changed_bytes": bytes, "marked_bytes": marked})
        );
    } else {
        println!("{volume}: {} in {ranges} range(s) changed since begin; the agent ships them now", human(bytes));
    }
    follow(&mut c, volume, before.resync_bytes, bytes, json, "shipping").await?;
    // Every range was shipped in records below the agent's next sequence number.
    let st = c.status().await?;
    let through_seq = st.next_seq.saturating_sub(1);
    let r = media_call(&id, server, vid, media_op::RELEASE, through_seq).await?;
    // An agent restarted meanwhile counts from zero again.
    let shipped = st.resync_bytes.saturating_sub(before.resync_bytes);
    if json {
        println!(
            "{}",
            serde_json::json!({"volume": volume, "done": true, "shipped_bytes": shipped, "changed_bytes": bytes, "through_seq": through_seq, "phase": r.phase})
        );
    } else {
        println!(
            "media resync of {volume} done: {} shipped for {} changed; the replica is consistent once it applies seq {}",
            human(shipped),
            human(bytes),
            through_seq
        );
    }
    Ok(())
}
