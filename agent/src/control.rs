//! The agent's control socket: how `drv sync start`, `drv agent status` and `drv media-resync
//! complete` reach a running agent.
//!
//! A Unix stream socket (mode 0600: only the agent's user, root in practice, may steer it). Each
//! request is one line of JSON and gets one line of JSON back:
//!
//! | request | reply |
//! |---|---|
//! | `{"op":"status"}` | `{"ok":true,"status":{...}}` (see [`AgentStatus`]) |
//! | `{"op":"sync-start","bwlimit":N}` | `{"ok":true,"status":{...}}` once every block is marked |
//! | `{"op":"set-bwlimit","bwlimit":N}` | `{"ok":true}` (`null`: unlimited) |
//! | `{"op":"resync","extents":[[offset,len],...]}` | `{"ok":true,...}` once the ranges are marked durably |
//! | `{"op":"detach"}` | `{"ok":true,...}` once the capture device is gone (the agent then stops) |
//! | `{"op":"track-sync","freeze":PATH,"timeout_ms":N}` | `{"ok":true,"track":{...}}` once a tracker's cut reached the replica |
//! | `{"op":"digest"}` | `{"ok":true,"digest":{"seq","bytes","xxh3_128"}}`: the local disk at one sequence number (writes wait meanwhile) |
//!
//! A failure is `{"ok":false,"error":"..."}` naming what was wrong. Lines are at most
//! [`MAX_LINE`] bytes (a client sends a long extent list in several requests).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::agent::{Agent, AgentStatus};

/// Longest request or reply line.
pub const MAX_LINE: usize = 4 << 20;
/// Most extents in one `resync` request.
pub const MAX_EXTENTS: usize = 65536;
/// Most control connections served at once.
const MAX_CLIENTS: usize = 16;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    SyncStart {
        bwlimit: Option<u64>,
    },
    SetBwlimit {
        bwlimit: Option<u64>,
    },
    Resync {
        extents: Vec<(u64, u64)>,
    },
    /// Remove the capture device (`drv detach`); the agent then stops.
    Detach,
    /// The digest of the local disk at one sequence number (writes wait meanwhile).
    Digest,
    /// Ship what an eBPF tracker recorded (`drv track sync`), optionally with the filesystem
    /// mounted at `freeze` frozen for a consistent point, waiting at most `timeout_ms` for it.
    TrackSync {
        #[serde(default)]
        freeze: Option<PathBuf>,
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
}

pub use drv_proto::status::CutReport;

/// Why a hook failed: said to the client as the reply's `error`.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// What `TrackSync` does, given by a tracker: its report, or why it failed.
pub type TrackSyncHook = std::sync::Arc<
    dyn Fn(Option<PathBuf>, Option<u64>) -> std::pin::Pin<Box<dyn Future<Output = Result<CutReport, HookError>> + Send>>
        + Send
        + Sync,
>;

/// What a capture path adds to the control socket.
#[derive(Clone, Default)]
pub struct Hooks {
    pub detach: Option<DetachHook>,
    pub track_sync: Option<TrackSyncHook>,
    /// The capture path's own figures, added to every status reply.
    pub capture: Option<CaptureHook>,
}

/// The capture path's figures for `status` (its device, counters).
pub type CaptureHook = std::sync::Arc<dyn Fn() -> CaptureReport + Send + Sync>;

/// What `Detach` does, given by a capture path that can be detached: an error says why not
/// (e.g. the device is mounted).
pub type DetachHook = std::sync::Arc<dyn Fn() -> Result<(), HookError> + Send + Sync>;

/// The userspace capture path's figures (`drv agent status`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CaptureReport {
    /// `user`.
    pub mode: String,
    /// The loop device, and the FUSE file behind it.
    pub device: String,
    pub fuse: String,
    pub writes: u64,
    pub flushes: u64,
    pub reads: u64,
    pub failed: u64,
    /// The eBPF cross-check of the agent's epochs, when it runs.
    #[serde(default)]
    pub order_check: Option<OrderFigures>,
}

/// The figures of the eBPF order cross-check (`drv_blocktrace::crosscheck::Summary`, of which
/// the rest is kept as it came).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OrderFigures {
    pub checked: u64,
    pub violations: u64,
    pub unmatched: u64,
    pub lost: u64,
    #[serde(flatten)]
    pub more: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AgentStatus>,
    /// A tracker's report of a `track-sync`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track: Option<CutReport>,
    /// The capture path's figures (see [`CaptureHook`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CaptureReport>,
    /// The local disk's digest (`digest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<crate::agent::AgentDigest>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("control socket {0}: another agent is serving it")]
    InUse(String),
    #[error("agent at {path}: {message}")]
    Agent { path: String, message: String },
    #[error("agent at {path}: malformed reply: {reason}")]
    Malformed { path: String, reason: String },
}

/// Binds the control socket at `path` (call it inside a tokio runtime). A stale socket file
/// (nothing listening) is replaced; a live one is an error (another agent serves the volume), and
/// is left alone.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let p = path.display().to_string();
    let io = |err| ControlError::Io { path: p.clone(), err };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(p));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves the control socket bound at `path` until the task is dropped.
pub async fn serve(agent: Agent, listener: UnixListener, path: PathBuf) -> Result<(), ControlError> {
    serve_with(agent, listener, path, Hooks::default()).await
}

/// [`serve`], with what the capture path's requests (`Detach`, `TrackSync`) do.
pub async fn serve_with(agent: Agent, listener: UnixListener, path: PathBuf, hooks: Hooks) -> Result<(), ControlError> {
    let p = path.display().to_string();
    let io = |err| ControlError::Io { path: p.clone(), err };
    let clients = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let (stream, _) = listener.accept().await.map_err(io)?;
        let Ok(permit) = clients.clone().try_acquire_owned() else {
            tracing::warn!("control socket {p}: over {MAX_CLIENTS} clients, refusing one");
            continue;
        };
        let (agent, hooks) = (agent.clone(), hooks.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_client(&agent, stream, hooks).await {
                tracing::debug!("control client: {e}");
            }
        });
    }
}

async fn serve_client(agent: &Agent, stream: UnixStream, hooks: Hooks) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut r).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line).await?;
        if n == 0 {
            return Ok(());
        }
        let reply = if line.len() > MAX_LINE {
            failed(format!("request over {MAX_LINE} bytes"))
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => handle(agent, req, &hooks).await,
                Err(e) => failed(format!("malformed request: {e}")),
            }
        };
        let too_long = line.len() > MAX_LINE;
        let mut out = serde_json::to_vec(&reply).expect("serializable");
        out.push(b'\n');
        w.write_all(&out).await?;
        if too_long {
            return Ok(()); // the rest of that line is unread: close
        }
    }
}

fn failed(error: String) -> Reply {
    Reply { ok: false, error: Some(error), status: None, track: None, capture: None, digest: None }
}

async fn handle(agent: &Agent, req: Request, hooks: &Hooks) -> Reply {
    let r = match req {
        Request::TrackSync { freeze, timeout_ms } => {
            let Some(hook) = hooks.track_sync.clone() else {
                return failed("this agent is not an eBPF tracker (`drv track VOLUME` runs one)".into());
            };
            return match hook(freeze, timeout_ms).await {
                Ok(report) => Reply {
                    ok: true,
                    error: None,
                    status: Some(agent.status()),
                    track: Some(report),
                    capture: None,
                    digest: None,
                },
                Err(e) => failed(e.to_string()),
            };
        }
        Request::Detach => {
            let Some(hook) = hooks.detach.clone() else {
                return failed("this agent has no capture device to detach (stop it with SIGTERM)".into());
            };
            return match tokio::task::spawn_blocking(move || hook()).await {
                Ok(Ok(())) => Reply {
                    ok: true,
                    error: None,
                    status: Some(agent.status()),
                    track: None,
                    capture: None,
                    digest: None,
                },
                Ok(Err(e)) => failed(e.to_string()),
                Err(e) => failed(format!("detach: {e}")),
            };
        }
        Request::Digest => {
            return match agent.digest().await {
                Ok(d) => Reply {
                    ok: true,
                    error: None,
                    status: Some(agent.status()),
                    track: None,
                    capture: None,
                    digest: Some(d),
                },
                Err(e) => failed(e.to_string()),
            };
        }
        Request::Status => Ok(()),
        Request::SyncStart { bwlimit } => agent.start_initial_sync(bwlimit).await,
        Request::SetBwlimit { bwlimit } => {
            agent.set_bwlimit(bwlimit);
            Ok(())
        }
        Request::Resync { extents } if extents.len() > MAX_EXTENTS => {
            return failed(format!("{} extents in one request, at most {MAX_EXTENTS}", extents.len()));
        }
        Request::Resync { extents } => agent.resync_ranges(&extents).await,
    };
    match r {
        Ok(()) => Reply {
            ok: true,
            error: None,
            status: Some(agent.status()),
            track: None,
            capture: hooks.capture.as_ref().map(|c| c()),
            digest: None,
        },
        Err(e) => failed(e.to_string()),
    }
}

/// A client of an agent's control socket.
pub struct Client {
    path: String,
    r: BufReader<tokio::net::unix::OwnedReadHalf>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ControlError> {
        let p = path.display().to_string();
        let s = UnixStream::connect(path).await.map_err(|err| ControlError::Io { path: p.clone(), err })?;
        let (r, w) = s.into_split();
        Ok(Client { path: p, r: BufReader::new(r), w })
    }

    /// Sends one request; an error reply becomes [`ControlError::Agent`].
    pub async fn call(&mut self, req: &Request) -> Result<Reply, ControlError> {
        let io = |err| ControlError::Io { path: self.path.clone(), err };
        let mut line = serde_json::to_vec(req).expect("serializable");
        line.push(b'\n');
        self.w.write_all(&line).await.map_err(io)?;
        let mut buf = Vec::new();
        let n = (&mut self.r).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf).await.map_err(io)?;
        if n == 0 {
            return Err(ControlError::Malformed {
                path: self.path.clone(),
                reason: "the agent closed the socket".into(),
            });
        }
        let reply: Reply = serde_json::from_slice(&buf)
            .map_err(|e| ControlError::Malformed { path: self.path.clone(), reason: e.to_string() })?;
        if !reply.ok {
            return Err(ControlError::Agent {
                path: self.path.clone(),
                message: reply.error.unwrap_or_else(|| "failed without a reason".into()),
            });
        }
        Ok(reply)
    }

    pub async fn status(&mut self) -> Result<AgentStatus, ControlError> {
        let r = self.call(&Request::Status).await?;
        r.status.ok_or_else(|| ControlError::Malformed { path: self.path.clone(), reason: "no status".into() })
    }
}
