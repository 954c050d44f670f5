//! `drv restore VOLUME SNAPSHOT --to PATH|DEVICE`: copies a replica snapshot onto a local disk in
//! the background while the disk is already usable, as a block device on this host (FUSE +
//! loop) and, with `--listen`, over NBD. The engine is `drv_restore`'s; this is the command:
//! the replica's export of the snapshot, the state directory, the device, progress and signals.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use drv_format::frame::snapshot_op;
use drv_proto::status::ReplicaStatus;
use drv_restore::Restore;
use drv_restore::client::Source;
use drv_restore::state::{CHUNK_BYTES, Header, StateFile};
use drv_transport::{Identity, Role};
use tokio::signal::unix::{SignalKind, signal};

use crate::agent_cmd::{human, parse_rate};
use crate::servers::{ServerConn, fetch_status, runtime};
use crate::snapshot_cmd::{matches, request_to};

#[derive(clap::Args)]
pub struct RestoreArgs {
    volume: String,
    snapshot: String,
    /// The target: a file (created at the image's size if missing) or a block device; its
    /// content is replaced by the snapshot's.
    #[arg(long)]
    to: PathBuf,
    /// Also serve the target over NBD on this address while the copy runs (no TLS: a trusted
    /// network only).
    #[arg(long)]
    listen: Option<String>,
    /// No local block device: only copy (and serve over NBD with --listen).
    #[arg(long)]
    no_device: bool,
    /// Bytes per second for the background copy, e.g. 50M (default: unlimited).
    #[arg(long, value_parser = parse_rate)]
    bwlimit: Option<u64>,
    /// Where the restore keeps its state (default: TARGET.drv-restore for a file,
    /// /var/lib/drv/restore/NAME for a device). The same command again resumes from it.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Where the replica serves the snapshot to this restore (default: the replica's address,
    /// any port).
    #[arg(long)]
    export_listen: Option<String>,
    #[command(flatten)]
    t: ServerConn,
}

/// How long reads of the snapshot wait for the replica (a restart) before they fail.
const SOURCE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

pub fn run(a: RestoreArgs) -> Result<()> {
    let (id, server) = a.t.open()?;
    runtime()?.block_on(restore(&a, &id, server))
}

fn default_state_dir(target: &Path) -> PathBuf {
    let is_dev =
        std::fs::metadata(target).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()));
    if is_dev {
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Path::new("/var/lib/drv/restore").join(name)
    } else {
        let mut p = target.as_os_str().to_owned();
        p.push(".drv-restore");
        PathBuf::from(p)
    }
}

/// The target, open and locked for this restore: a file is created or grown to `bytes`.
fn open_target(path: &Path, bytes: u64) -> Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("open the restore target {}", path.display()))?;
    drv_files::lock_exclusive(&f, "restore target", path)?;
    let have = crate::agent_cmd::device_bytes(&f).with_context(|| format!("size of {}", path.display()))?;
    if drv_files::is_block_device(&f) {
        if have < bytes {
            bail!("{} has {have} bytes, less than the snapshot's {bytes}", path.display());
        }
    } else if have < bytes {
        f.set_len(bytes).with_context(|| format!("size {} to {bytes} bytes", path.display()))?;
    }
    Ok(f)
}

/// The state of this restore: resumed (when it is of the same snapshot, to the same target) or new.
fn open_state(dir: &Path, want: Header) -> Result<(StateFile, bool)> {
    let path = dir.join("state");
    if !path.exists() {
        return Ok((StateFile::create(&path, want).map_err(anyhow::Error::msg)?, false));
    }
    let s = StateFile::open(&path).map_err(anyhow::Error::msg)?;
    let h = &s.header;
    if (h.volume_id, &h.snapshot, h.seq, h.size) != (want.volume_id, &want.snapshot, want.seq, want.size) {
        bail!(
            "{} is the state of a restore of {}@{} (seq {}, {} bytes), not of {}@{} (seq {}, {} bytes): give another --state-dir, or remove it to start over",
            dir.display(),
            h.volume,
            h.snapshot,
            h.seq,
            h.size,
            want.volume,
            want.snapshot,
            want.seq,
            want.size
        );
    }
    if h.target != want.target {
        bail!("{} is the state of a restore to {}, not to {}", dir.display(), h.target, want.target);
    }
    Ok((s, true))
}

async fn restore(a: &RestoreArgs, id: &Identity, server: std::net::SocketAddr) -> Result<()> {
    let target = std::path::absolute(&a.to).with_context(|| format!("{}", a.to.display()))?;
    let state_dir = a.state_dir.clone().unwrap_or_else(|| default_state_dir(&target));
    std::fs::create_dir_all(&state_dir).with_context(|| format!("create {}", state_dir.display()))?;
    let _lock = drv_files::lock_dir(&state_dir, "restore state")?;
    if let Some(m) = drv_userdev::recover(&state_dir).context("clean up after the previous run")? {
        eprintln!(
            "the previous run's device {} is detached (its I/O failed since that run ended)",
            m.loop_dev.display()
        );
    }
    let st: ReplicaStatus = fetch_status(id, server, Role::Replica).await?;
    let vol = st
        .volumes
        .iter()
        .find(|v| matches(v, &a.volume))
        .with_context(|| format!("volume {} is not on replica {}", a.volume, st.name))?;
    let export_listen =
        a.export_listen.clone().unwrap_or_else(|| std::net::SocketAddr::new(server.ip(), 0).to_string());
    let arg = format!("{} {export_listen}", a.snapshot);
    let e: serde_json::Value = request_to(id, server, &a.volume, snapshot_op::EXPORT, snapshot_op::REUSE, &arg).await?;
    let (listen, seq, bytes) = (
        e["listen"].as_str().context("the export's address")?.to_owned(),
        e["seq"].as_u64().context("the snapshot's seq")?,
        e["bytes"].as_u64().context("the snapshot's size")?,
    );
    let header = Header {
        chunk_bytes: CHUNK_BYTES,
        size: bytes,
        volume_id: vol.volume_id,
        seq,
        snapshot: a.snapshot.clone(),
        volume: vol.name.clone(),
        target: target.display().to_string(),
    };
    let (state, resumed) = open_state(&state_dir, header)?;
    let file = open_target(&target, bytes)?;
    let (l, s) = (listen.clone(), a.snapshot.clone());
    let src = tokio::task::spawn_blocking(move || Source::open(&l, &s, 4)).await?.map_err(anyhow::Error::msg)?;
    // A replica restart ends its export: reads wait, the export is asked for again.
    let (rid, volume, rt) = (id.clone(), a.volume.clone(), tokio::runtime::Handle::current());
    let resolve: drv_restore::client::Resolve = Box::new(move || {
        let e: serde_json::Value = rt
            .block_on(request_to(&rid, server, &volume, snapshot_op::EXPORT, snapshot_op::REUSE, &arg))
            .map_err(|e| crate::report(e.as_ref()))?;
        e["listen"].as_str().map(str::to_owned).ok_or_else(|| "the replica's reply has no address".into())
    });
    let src = src.with_retries(resolve, SOURCE_PATIENCE);
    let r = Arc::new(Restore::new(src, file, state).map_err(anyhow::Error::msg)?);
    if resumed {
        eprintln!("resuming: {} of {} already in {}", human(r.present_bytes()), human(bytes), target.display());
    }
    let serving = Serving::start(a, &r, &state_dir).await?;
    let outcome = copy(a, &r, &target).await;
    if let Ok(true) = outcome {
        // The target no longer needs the replica: its export for this restore goes.
        let _ = request_to::<serde_json::Value>(id, server, &a.volume, snapshot_op::UNEXPORT, 0, &a.snapshot).await;
        if serving.any() {
            println!(
                "still serving {} until Ctrl-C (or use {} directly once this ends)",
                serving.what(),
                target.display()
            );
            wait_signal().await?;
        }
    }
    serving.stop()?;
    match outcome {
        Ok(true) => {
            std::fs::remove_dir_all(&state_dir).with_context(|| format!("remove {}", state_dir.display()))?;
            Ok(())
        }
        Ok(false) => bail!(
            "stopped with {} of {} in {}: run the same command to resume",
            human(r.present_bytes()),
            human(bytes),
            target.display()
        ),
        Err(e) => Err(e.context(format!(
            "the copy stopped with {} of {} in {} (kept; run the same command to resume)",
            human(r.present_bytes()),
            human(bytes),
            target.display()
        ))),
    }
}

async fn wait_signal() -> Result<()> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// The device and the NBD export of the target while the restore runs.
struct Serving {
    device: Option<drv_userdev::UserDevice>,
    nbd: Option<(String, tokio::task::JoinHandle<()>)>,
}

impl Serving {
    async fn start(a: &RestoreArgs, r: &Arc<Restore>, state_dir: &Path) -> Result<Serving> {
        let mut s = Serving { device: None, nbd: None };
        if let Some(l) = &a.listen {
            let listener = tokio::net::TcpListener::bind(l).await.with_context(|| format!("--listen {l}"))?;
            let bound = listener.local_addr()?.to_string();
            let export = drv_proto::nbd::Export {
                name: a.snapshot.clone(),
                size: r.size(),
                writable: true,
                description: format!("restore of {}@{}", a.volume, a.snapshot),
            };
            let task = tokio::spawn(drv_userdev::nbd::serve_listener(listener, export, r.clone()));
            println!("NBD nbd://{bound}/{}", a.snapshot);
            s.nbd = Some((bound, task));
        }
        if !a.no_device {
            let label = format!("restore:{}@{}", a.volume, a.snapshot);
            let backend = drv_userdev::ImageBackend { image: r.clone(), rt: tokio::runtime::Handle::current() };
            let (size, dir) = (r.size(), state_dir.to_path_buf());
            let d = tokio::task::spawn_blocking(move || {
                let attach = drv_userdev::Attach { label: &label, size, state: &dir, read_only: false };
                drv_userdev::UserDevice::attach(attach, backend)
            })
            .await?
            .context("serve the target as a block device (--no-device to only copy)")?;
            println!("DEVICE {}", d.loop_dev.display());
            s.device = Some(d);
        }
        Ok(s)
    }

    fn any(&self) -> bool {
        self.device.is_some() || self.nbd.is_some()
    }

    fn what(&self) -> String {
        let mut w = Vec::new();
        if let Some(d) = &self.device {
            w.push(d.loop_dev.display().to_string());
        }
        if let Some((l, _)) = &self.nbd {
            w.push(format!("nbd://{l}"));
        }
        w.join(" and ")
    }

    fn stop(mut self) -> Result<()> {
        if let Some((_, t)) = self.nbd.take() {
            t.abort();
        }
        if let Some(mut d) = self.device.take() {
            d.detach().context("detach the restore's device (unmount it first; the next run detaches it)")?;
        }
        Ok(())
    }
}

/// Runs the background copy with progress (a bar on a terminal, JSON lines with --json or
/// otherwise) until it completes, fails, or a signal stops it: whether the target is complete.
async fn copy(a: &RestoreArgs, r: &Arc<Restore>, target: &Path) -> Result<bool> {
    let json = a.t.json || !std::io::stdout().is_terminal();
    let (tx, mut done) = tokio::sync::oneshot::channel();
    let (rc, bwlimit) = (r.clone(), a.bwlimit);
    std::thread::Builder::new().name("restore-copy".into()).spawn(move || {
        let _ = tx.send(rc.copy(bwlimit, |_| ()));
    })?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut shown = Progress::new(json, r.size(), a, target);
    let result = loop {
        tokio::select! {
            res = &mut done => break res.context("the copy thread")?.map_err(anyhow::Error::msg),
            _ = int.recv() => r.stop(),
            _ = term.recv() => r.stop(),
            _ = tokio::time::sleep(Duration::from_millis(250)) => shown.show(r, false),
        }
    };
    shown.show(r, result.as_ref().is_ok_and(|c| *c));
    shown.finish(r, &result);
    result
}

/// Progress: an indicatif bar, or a JSON line a second.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    last_line: Option<Instant>,
    head: serde_json::Value,
}

impl Progress {
    fn new(json: bool, size: u64, a: &RestoreArgs, target: &Path) -> Progress {
        let bar = (!json).then(|| {
            let b = indicatif::ProgressBar::new(size);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "  restoring [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}  {msg}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            b
        });
        let head =
            serde_json::json!({"volume": a.volume, "snapshot": a.snapshot, "target": target.display().to_string()});
        Progress { bar, started: Instant::now(), last_line: None, head }
    }

    fn show(&mut self, r: &Restore, complete: bool) {
        let present = r.present_bytes();
        let copied = r.copied.load(std::sync::atomic::Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64();
        let rate = copied as f64 / secs.max(1e-3);
        if let Some(b) = &self.bar {
            b.set_position(present);
            b.set_message(format!("{} written by users", human(r.written.load(std::sync::atomic::Ordering::Relaxed))));
            return;
        }
        if !complete && self.last_line.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        self.last_line = Some(Instant::now());
        let left = r.size().saturating_sub(present);
        let mut line = self.head.clone();
        let fields = serde_json::json!({
            "complete": complete, "present_bytes": present, "total_bytes": r.size(), "copied_bytes": copied,
            "written_bytes": r.written.load(std::sync::atomic::Ordering::Relaxed),
            "rate_bytes_per_sec": rate.round(), "elapsed_seconds": secs,
            "eta_seconds": if complete { 0.0 } else if rate > 0.0 { left as f64 / rate } else { -1.0 },
        });
        for (k, v) in fields.as_object().expect("object") {
            line[k] = v.clone();
        }
        println!("{line}");
    }

    fn finish(self, r: &Restore, result: &Result<bool>) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
        if let Ok(true) = result {
            let secs = self.started.elapsed().as_secs_f64();
            let copied = r.copied.load(std::sync::atomic::Ordering::Relaxed);
            println!(
                "restore complete: {} holds the whole image of {}@{} (seq {}); {} copied in {secs:.1} s ({}/s); the snapshot is no longer needed",
                r.header().target,
                r.header().volume,
                r.header().snapshot,
                r.header().seq,
                human(copied),
                human((copied as f64 / secs.max(1e-3)) as u64)
            );
        }
    }
}
