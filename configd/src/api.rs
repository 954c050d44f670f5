//! The config servers' JSON API, served on the same HTTPS listener as the raft RPCs (mutual TLS
//! with the installation CA; who asks is the name and role of their certificate), and on the
//! web listener for users (`drv config-server run --web`).
//!
//! | method | path                 | who                | what                                      |
//! |--------|----------------------|--------------------|-------------------------------------------|
//! | POST   | `/v1/commands`       | admin, users       | one change ([`CommandRequest`]) -> `Written` |
//! | GET    | `/v1/entries`        | admin, users       | `?kind=K&name=N&local=1` -> [`EntriesReply`] |
//! | GET    | `/v1/log`            | admin, users       | `?after=V&limit=N` or `?newest=N` (`&local=1`) |
//! | GET    | `/v1/watch`          | all, users         | `?after=V&wait_ms=T`: waits for a newer version |
//! | GET    | `/v1/status`         | admin, users       | this server's view of the group           |
//! | POST   | `/v1/members`        | admin, admin users | adds a config server ([`MemberRequest`])  |
//! | DELETE | `/v1/members/NAME`   | admin, admin users | removes one                               |
//! | GET    | `/v1/node/NAME`      | that node          | a staging or replica server's [`Slice`]   |
//! | GET    | `/v1/volume/NAME`    | agents             | a volume's [`Slice`] (what its agent needs) |
//! | POST   | `/v1/applied`        | components         | what a component runs, its figures ([`Report`]) |
//! | GET    | `/v1/components`     | admin, users       | every component's last [`ComponentState`] |
//! | POST   | `/v1/forward`        | config servers     | a user's change a follower took ([`Command`]) |
//!
//! (`admin` routes also take config servers' certificates, except changes.) **Users** (the web
//! listener, `auth.rs`; its routes `/v1/login`, `/v1/logout`, `/v1/whoami`, `/v1/activity`)
//! see only what their roles show: entries, history records and components' figures are
//! filtered, password hashes hidden; their changes are checked here and again as they apply.
//! A user reads this server's state (`local`), and a change a follower takes from a user goes
//! on to the leader from the follower (the browser's session is the follower's). Every change
//! and every refusal of a user goes to the server's activity log (`sessions.rs`).
//!
//! Components read their slice from whichever server they reach (its own state, so they keep
//! working while no majority is up) and report back to it; each server keeps the reports it
//! received in memory, at most [`COMPONENTS_LIMIT`], and `drv config status` merges every
//! server's.
//!
//! Writes go to the leader: a follower answers `307` with the leader's address in `Location`
//! and in the body (`ApiError::leader`). Reads are linearizable by default (the leader confirms
//! it still leads, then reads; a follower redirects); `local=1` reads this server's state as it
//! is, and every read says the version it shows. Errors are JSON [`ApiError`]s: a `code` a
//! script can test and a `message` that names what was wrong. A change that is not committed
//! within [`QUORUM_WAIT`] is answered `503 no_quorum`; it may still commit later, and a retry
//! with the same request id is applied at most once (the store remembers request ids).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use drv_config::{Command, EntryRow, Kind, LogRecord, Op};
use drv_transport::Role;
use openraft::error::{ClientWriteError, ForwardToLeader, RaftError};
use openraft::{ChangeMembers, Raft};
use serde::{Deserialize, Serialize};

use crate::auth::Who;
use crate::sessions::{Event, Sessions};
use crate::state::StateMachine;
use crate::{NodeId, PeerNode, TypeConfig};

/// How long a change or a linearizable read waits for a majority before it is answered 503.
pub const QUORUM_WAIT: Duration = Duration::from_secs(5);
/// The largest API request body.
pub const API_BODY_LIMIT: usize = 1 << 20;
/// The longest a watch waits.
pub const WATCH_MAX: Duration = Duration::from_secs(60);
/// History records one log request returns at most.
pub const LOG_LIMIT: usize = 10_000;
/// Components whose reports one server keeps (the oldest report goes first).
pub const COMPONENTS_LIMIT: usize = 10_000;
/// Pending changes one report may list, and the longest text in it (the memory of the reports is
/// bounded: `COMPONENTS_LIMIT` x this).
pub const REPORT_PENDING_LIMIT: usize = 64;
pub const REPORT_TEXT_LIMIT: usize = 512;

/// Who is asking: the peer's address and its certificate's name and role.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub name: String,
    /// `None` if the certificate names no role (the handshake refuses those; kept for safety).
    pub role: Option<Role>,
}

/// One change as a client sends it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    /// 32 hex digits chosen by the client, the same for every retry of this change; the server
    /// picks one if absent.
    #[serde(default)]
    pub request_id: Option<String>,
    pub ops: Vec<Op>,
}

/// An error as the API says it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: String,
    pub message: String,
    /// The leader's address, when this server is not the leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

/// Entries and the committed version they show.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EntriesReply {
    pub version: u64,
    /// The server that answered.
    pub server: String,
    pub entries: Vec<EntryRow>,
}

/// History records and the version they were read at.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogReply {
    pub version: u64,
    pub server: String,
    pub records: Vec<LogRecord>,
}

/// What a watch saw: the version this server has applied now (greater than `after` unless the
/// wait ran out).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WatchReply {
    pub version: u64,
}

/// A config server in the group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub address: String,
    /// A voter (counts toward the majority), or a learner still catching up.
    pub voter: bool,
}

/// One server's view of the group.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServerStatus {
    pub name: String,
    /// leader, follower, candidate or learner.
    pub state: String,
    pub leader: Option<String>,
    pub term: u64,
    /// The configuration version this server has applied.
    pub version: u64,
    pub last_log_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub members: Vec<Member>,
}

/// A server to add to the group.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberRequest {
    pub name: String,
    pub address: String,
}

/// What a component needs, and the configuration version it was read at.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Slice<T> {
    pub version: u64,
    pub value: T,
}

/// A component's figures when it reported: by volume (`""` for the component itself), named
/// values (`lag_seconds`, `dirty_bytes`, ...; see `drv/src/metrics.rs`).
pub type Figures = std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>;

/// What a component says of each volume besides figures (`""`: of itself), as JSON: a
/// replica's snapshots and retention window. Shown on the volume's page.
pub type Details = std::collections::BTreeMap<String, serde_json::Value>;

/// The bytes of details one report may carry, and one server keeps for all components together
/// (beyond either, a report is kept without its details).
pub const REPORT_DETAILS_LIMIT: usize = 256 << 10;
pub const DETAILS_TOTAL_LIMIT: usize = 32 << 20;

/// Figures one report may carry, and figures one server keeps for all components together (the
/// memory of the reports is bounded: a report past it is kept without its figures).
pub const REPORT_FIGURES_LIMIT: usize = 1 << 16;
pub const FIGURES_TOTAL_LIMIT: usize = 1 << 20;

/// What a component reports: the version it runs, the changes up to it that wait for its
/// restart (each said in words), if any, and its figures now.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub version: u64,
    /// An agent's volume (an agent host runs one agent per volume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(default)]
    pub pending: Vec<String>,
    #[serde(default, skip_serializing_if = "Figures::is_empty")]
    pub figures: Figures,
    #[serde(default, skip_serializing_if = "Details::is_empty")]
    pub details: Details,
}

/// A component as a config server last heard from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComponentState {
    /// Its certificate's name (`NAME/VOLUME` for an agent).
    pub component: String,
    pub role: String,
    pub version: u64,
    pub pending: Vec<String>,
    pub reported_unix_ms: u64,
    /// The config server it reported to.
    pub server: String,
    #[serde(default, skip_serializing_if = "Figures::is_empty")]
    pub figures: Figures,
    #[serde(default, skip_serializing_if = "Details::is_empty")]
    pub details: Details,
    /// The bytes of `details` as JSON (what counts toward [`DETAILS_TOTAL_LIMIT`]).
    #[serde(skip)]
    pub details_bytes: usize,
}

type Reports = std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, ComponentState>>>;

/// What the handlers share.
#[derive(Clone)]
pub struct Api {
    pub raft: Raft<TypeConfig>,
    pub state: StateMachine,
    pub name: String,
    pub reports: Reports,
    /// This server's users' sessions and activity log.
    pub sessions: Arc<Sessions>,
    /// How this server reaches the leader to forward a user's change (its config certificate).
    pub forward_tls: Arc<rustls::ClientConfig>,
    /// The volumes' figures over time.
    pub series: crate::series::Series,
    /// The newest overview of the installation (`monitor.rs`).
    pub overview: tokio::sync::watch::Receiver<Arc<crate::monitor::Overview>>,
    /// This server's alerts, and the queue of mails to send.
    pub alerts: Arc<crate::alerts::Alerts>,
    pub mails: tokio::sync::mpsc::Sender<crate::alerts::Queued>,
    pub mail_budget: Arc<crate::mail::Budget>,
}

/// An error answer.
pub struct Failure {
    pub status: StatusCode,
    pub error: ApiError,
    /// Seconds, for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl Failure {
    pub(crate) fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Failure {
        let error = ApiError { code: code.into(), message: message.into(), leader: None };
        Failure { status, error, retry_after: None }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let Failure { status, error: e, retry_after } = self;
        let mut headers = HeaderMap::new();
        if let Some(l) = &e.leader
            && let Ok(v) = l.parse()
        {
            headers.insert(header::LOCATION, v);
        }
        if let Some(s) = retry_after {
            headers.insert(header::RETRY_AFTER, s.into());
        }
        (status, headers, axum::Json(e)).into_response()
    }
}

type Answer<T> = Result<axum::Json<T>, Failure>;

/// The HTTP status of a refusal code (`drv_config::ConfigError::code`).
pub fn status_of(code: &str) -> StatusCode {
    match code {
        "not_found" => StatusCode::NOT_FOUND,
        "reference" => StatusCode::CONFLICT,
        "stale" => StatusCode::PRECONDITION_FAILED,
        "forbidden" => StatusCode::FORBIDDEN,
        "invalid" | "bad_assignment" | "unknown_kind" => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A follower's answer: go to the leader, at the same path.
fn redirect(f: &ForwardToLeader<NodeId, PeerNode>, uri: &Uri) -> Failure {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    match &f.leader_node {
        Some(n) => Failure {
            status: StatusCode::TEMPORARY_REDIRECT,
            error: ApiError {
                code: "not_leader".into(),
                message: format!("this server does not lead; the leader is {n}"),
                leader: Some(format!("https://{}{path}", n.address)),
            },
            retry_after: None,
        },
        None => Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_leader",
            "no config server leads now (an election is under way, or fewer than a majority are up)",
        ),
    }
}

fn no_quorum(what: &str) -> Failure {
    Failure::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_quorum",
        format!(
            "{what} not confirmed by a majority of the config servers within {QUORUM_WAIT:?}: fewer than a \
             majority answer (see `drv config-server status`); a change may still commit, and a retry with \
             the same request id applies it at most once"
        ),
    )
}

pub(crate) fn internal(e: impl std::fmt::Display) -> Failure {
    Failure::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, PeerNode>>, uri: &Uri) -> Failure {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => redirect(&f, uri),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(m)) => {
            Failure::new(StatusCode::CONFLICT, "membership", m.to_string())
        }
        RaftError::Fatal(f) => internal(format!("raft stopped: {f}")),
    }
}

pub(crate) fn body<T: for<'de> Deserialize<'de>>(
    b: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<T, Failure> {
    let b = b.map_err(|e| {
        let m = format!("the request body: {e} (at most {API_BODY_LIMIT} bytes)");
        Failure::new(e.status(), "bad_request", m)
    })?;
    serde_json::from_slice(&b)
        .map_err(|e| Failure::new(StatusCode::BAD_REQUEST, "bad_request", format!("the request body: {e}")))
}

async fn commands(
    State(api): State<Api>,
    who: Who,
    uri: Uri,
    b: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Answer<drv_config::Written> {
    if let Who::Cert(_) = &who {
        who.cert(&api, &[Role::Admin])?;
    }
    let req: CommandRequest = body(b)?;
    let request_id = match &req.request_id {
        Some(h) => u128::from_str_radix(h, 16)
            .map_err(|e| Failure::new(StatusCode::BAD_REQUEST, "bad_request", format!("request_id {h:?}: {e}")))?,
        None => drv_config::random_id(),
    };
    if req.ops.is_empty() {
        return Err(Failure::new(StatusCode::BAD_REQUEST, "bad_request", "a command needs at least one op"));
    }
    change(&api, &who, request_id, req.ops, &uri).await.map(axum::Json)
}

/// Makes the change `ops` for `who` (checked first for a user, and again as it applies),
/// passwords hashed, and says it in the activity log.
pub(crate) async fn change(
    api: &Api,
    who: &Who,
    request_id: u128,
    ops: Vec<Op>,
    uri: &Uri,
) -> Result<drv_config::Written, Failure> {
    let user = match who {
        Who::User(u) => {
            precheck(api, who, u, &ops)?;
            Some(u.name.clone())
        }
        Who::Cert(_) => None,
    };
    // Users' passwords become hashes here: the log and the history never hold them (argon2 on
    // the blocking pool, only for a command that has one).
    let mut ops = ops;
    if drv_config::users::has_password(&ops) {
        ops = tokio::task::spawn_blocking(move || drv_config::users::hash_passwords(&mut ops).map(|()| ops))
            .await
            .map_err(internal)?
            .map_err(refused)?;
    }
    let what = ops.iter().map(|o| o.to_string()).collect::<Vec<_>>().join("; ");
    let kinds: Vec<Kind> = ops
        .iter()
        .map(|op| match op {
            Op::Set { kind, .. } | Op::Delete { kind, .. } => *kind,
        })
        .collect();
    let cmd = Command { request_id, author: who.label(), time_unix_ms: drv_config::now_unix_ms(), ops, user };
    let mut outcome = propose(api, cmd, uri, matches!(who, Who::User(_))).await;
    // A user is never shown a password hash, not even the one they just set.
    if let (Who::User(_), Ok(w)) = (who, &mut outcome) {
        for (v, k) in w.values.iter_mut().zip(&kinds) {
            if *k == Kind::User {
                crate::auth::hide_hash(v);
            }
        }
    }
    let (kind, detail) = match &outcome {
        Ok(w) => ("change", format!("version {}: {what}", w.version)),
        Err(f) => ("refused", format!("{what}: {} ({})", f.error.message, f.error.code)),
    };
    api.sessions.record(Event { who: who.label(), addr: who.addr().to_string(), what: kind, detail });
    outcome
}

/// A quick refusal of a user's change their roles cannot allow, read from this server's state
/// (the check that counts is made again as the command applies: `Command::user`).
fn precheck(api: &Api, who: &Who, u: &crate::auth::SessionUser, ops: &[Op]) -> Result<(), Failure> {
    let sight = who.sight(api)?.expect("a user has a sight");
    let volumes = api.state.store().list(&[Kind::Volume]).map_err(internal)?.into_iter().map(|(_, n, _)| n).collect();
    drv_config::users::may_change(&u.user, &sight.sets, &volumes, ops).map_err(|why| who.forbid(api, &why))
}

/// Proposes `cmd` and waits for its outcome. A user's change that reaches a follower goes on to
/// the leader from here (`forward`: a browser's session is this server's only); a certificate
/// holder is redirected.
async fn propose(api: &Api, cmd: Command, uri: &Uri, forward: bool) -> Result<drv_config::Written, Failure> {
    let write = tokio::time::timeout(QUORUM_WAIT, api.raft.client_write(cmd.clone()));
    let r = match write.await.map_err(|_| no_quorum("the change was"))? {
        Ok(r) => r,
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) if forward && f.leader_node.is_some() => {
            let leader = f.leader_node.expect("checked");
            return forward_to(api, &leader, &cmd).await;
        }
        Err(e) => return Err(write_error(e, uri)),
    };
    match r.data.outcome {
        Some(Ok(w)) => Ok(w),
        Some(Err(refusal)) => Err(Failure::new(status_of(&refusal.code), &refusal.code, refusal.message)),
        None => Err(internal("a command applied as a raft entry without an outcome")),
    }
}

/// Sends `cmd` to the leader's `/v1/forward` (this server's config certificate) and gives its
/// outcome as the leader said it.
async fn forward_to(api: &Api, leader: &PeerNode, cmd: &Command) -> Result<drv_config::Written, Failure> {
    use http_body_util::BodyExt;
    let unreachable = |e: String| {
        let m = format!("the change could not be forwarded to the leader {leader}: {e}; try again");
        Failure::new(StatusCode::SERVICE_UNAVAILABLE, "no_leader", m)
    };
    let name = format!("{}.config.drv", leader.name);
    let exchange = async {
        let mut sender = crate::network::https_open(&leader.address, &name, api.forward_tls.clone()).await?;
        let body = serde_json::to_vec(cmd).map_err(|e| e.to_string())?;
        let req = hyper::Request::post("/v1/forward")
            .header(header::HOST, "config.drv")
            .header(header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>((status, bytes))
    };
    let (status, bytes) = tokio::time::timeout(QUORUM_WAIT, exchange)
        .await
        .map_err(|_| unreachable("no answer in time".into()))?
        .map_err(unreachable)?;
    if status == StatusCode::TEMPORARY_REDIRECT {
        return Err(unreachable(format!("{} no longer leads", leader.name)));
    }
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| internal(format!("the leader's answer: {e}")));
    }
    let error: ApiError =
        serde_json::from_slice(&bytes).map_err(|e| internal(format!("the leader's answer (HTTP {status}): {e}")))?;
    Err(Failure { status, error, retry_after: None })
}

/// A change a follower forwards for one of its users (authorised as it applies).
async fn forwarded(
    State(api): State<Api>,
    who: Who,
    uri: Uri,
    b: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Answer<drv_config::Written> {
    who.cert(&api, &[Role::Config])?;
    let cmd: Command = body(b)?;
    propose(&api, cmd, &uri, false).await.map(axum::Json)
}

/// Waits until this server may answer a read: it leads and has applied all it committed, or the
/// client asked for its local state.
async fn readable(api: &Api, local: bool, uri: &Uri) -> Result<(), Failure> {
    if local {
        return Ok(());
    }
    let r =
        tokio::time::timeout(QUORUM_WAIT, api.raft.ensure_linearizable()).await.map_err(|_| no_quorum("a read was"))?;
    match r {
        Ok(_) => Ok(()),
        Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => Err(redirect(&f, uri)),
        Err(RaftError::APIError(openraft::error::CheckIsLeaderError::QuorumNotEnough(_))) => {
            Err(no_quorum("a read was"))
        }
        Err(RaftError::Fatal(f)) => Err(internal(format!("raft stopped: {f}"))),
    }
}

#[derive(Deserialize)]
struct EntriesQuery {
    kind: Option<String>,
    name: Option<String>,
    #[serde(default)]
    local: u8,
}

async fn entries(State(api): State<Api>, who: Who, uri: Uri, Query(q): Query<EntriesQuery>) -> Answer<EntriesReply> {
    if let Who::Cert(_) = &who {
        who.cert(&api, &[Role::Admin, Role::Config])?;
    }
    let kinds = match &q.kind {
        Some(k) => vec![
            k.parse::<Kind>()
                .map_err(|e| Failure::new(StatusCode::UNPROCESSABLE_ENTITY, "unknown_kind", e.to_string()))?,
        ],
        None => Kind::ALL.to_vec(),
    };
    // A user's session is this server's only: a user reads this server's state.
    readable(&api, q.local != 0 || matches!(who, Who::User(_)), &uri).await?;
    let (version, mut entries) = api.state.store().entries(&kinds, q.name.as_deref()).map_err(internal)?;
    if let Some(sight) = who.sight(&api)? {
        entries = sight.entries(entries);
    }
    if let (Some(n), true) = (&q.name, entries.is_empty()) {
        let kind = q.kind.as_deref().unwrap_or("entry");
        return Err(Failure::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {kind} named {n:?} (at version {version})"),
        ));
    }
    Ok(axum::Json(EntriesReply { version, server: api.name.clone(), entries }))
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
    /// Instead of `after`: the newest this many records (at most `LOG_LIMIT`).
    newest: Option<usize>,
    #[serde(default)]
    local: u8,
}

async fn log(State(api): State<Api>, who: Who, uri: Uri, Query(q): Query<LogQuery>) -> Answer<LogReply> {
    if let Who::Cert(_) = &who {
        who.cert(&api, &[Role::Admin, Role::Config])?;
    }
    readable(&api, q.local != 0 || matches!(who, Who::User(_)), &uri).await?;
    let store = api.state.store();
    let records = match q.newest {
        Some(n) => store.newest(n.min(LOG_LIMIT)),
        None => store.log(q.after, q.limit.unwrap_or(LOG_LIMIT).min(LOG_LIMIT)),
    };
    let mut records = records.map_err(internal)?;
    if let Some(sight) = who.sight(&api)? {
        records = sight.records(records);
    }
    let version = store.version().map_err(internal)?;
    Ok(axum::Json(LogReply { version, server: api.name.clone(), records }))
}

#[derive(Deserialize)]
struct WatchQuery {
    #[serde(default)]
    after: u64,
    wait_ms: Option<u64>,
}

/// Answers when this server has applied a version after `after`, or when the wait runs out.
async fn watch(State(api): State<Api>, who: Who, Query(q): Query<WatchQuery>) -> Answer<WatchReply> {
    if let Who::Cert(_) = &who {
        who.cert(&api, &[Role::Admin, Role::Config, Role::Staging, Role::Replica, Role::Agent])?;
    }
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(30_000)).min(WATCH_MAX);
    let mut applied = api.raft.metrics();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let version = api.state.store().version().map_err(internal)?;
        if version > q.after {
            return Ok(axum::Json(WatchReply { version }));
        }
        match tokio::time::timeout_at(deadline, applied.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) => return Err(internal("raft stopped")),
            Err(_) => return Ok(axum::Json(WatchReply { version })),
        }
    }
}

async fn status(State(api): State<Api>, who: Who) -> Answer<ServerStatus> {
    if let Who::Cert(_) = &who {
        who.cert(&api, &[Role::Admin, Role::Config])?;
    }
    Ok(axum::Json(api.server_status().map_err(internal)?))
}

impl Api {
    /// This server's view of the group.
    pub fn server_status(&self) -> Result<ServerStatus, drv_config::ConfigError> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| Member { name: n.name.clone(), address: n.address.clone(), voter: voters.contains(id) })
            .collect();
        let leader = m.current_leader.and_then(|l| membership.get_node(&l)).map(|n| n.name.clone());
        let state = if voters.contains(&m.id) { format!("{:?}", m.state).to_lowercase() } else { "learner".into() };
        Ok(ServerStatus {
            name: self.name.clone(),
            state,
            leader,
            term: m.current_term,
            version: self.state.store().version()?,
            last_log_index: m.last_log_index,
            snapshot_index: m.snapshot.map(|s| s.index),
            members,
        })
    }

    /// The components that reported to this server, as they last did.
    pub fn components(&self) -> Vec<ComponentState> {
        self.reports.lock().expect("reports").values().cloned().collect()
    }
}

/// Adds a config server: first as a learner that catches up (from a snapshot if the log was
/// compacted), then as a voter.
async fn add_member(
    State(api): State<Api>,
    who: Who,
    uri: Uri,
    b: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Answer<ServerStatus> {
    who.admin(&api, &[Role::Admin])?;
    let req: MemberRequest = body(b)?;
    // The leader answers: a follower's view of the membership may lag the leader's by up to about 250 ms.
    readable(&api, false, &uri).await?;
    if req.address.parse::<SocketAddr>().is_err() && !req.address.contains(':') {
        let m = format!("address {:?} is not HOST:PORT", req.address);
        return Err(Failure::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m));
    }
    let id = crate::server::node_id(&req.name);
    let node = PeerNode { name: req.name.clone(), address: req.address.clone() };
    let learn = tokio::time::timeout(Duration::from_secs(60), api.raft.add_learner(id, node, true));
    learn.await.map_err(|_| no_quorum("the new server's catch-up was"))?.map_err(|e| write_error(e, &uri))?;
    let change = api.raft.change_membership(ChangeMembers::AddVoterIds([id].into()), false);
    tokio::time::timeout(QUORUM_WAIT, change)
        .await
        .map_err(|_| no_quorum("the membership change was"))?
        .map_err(|e| write_error(e, &uri))?;
    status(State(api), who).await
}

async fn remove_member(State(api): State<Api>, who: Who, uri: Uri, Path(name): Path<String>) -> Answer<ServerStatus> {
    who.admin(&api, &[Role::Admin])?;
    readable(&api, false, &uri).await?;
    let id = crate::server::node_id(&name);
    let known = api.raft.metrics().borrow().membership_config.membership().get_node(&id).is_some();
    if !known {
        return Err(Failure::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no config server named {name:?} in the group"),
        ));
    }
    let voters = api.raft.metrics().borrow().membership_config.membership().voter_ids().count();
    if voters <= 1 {
        let m = format!("{name} is the last config server: the group cannot go on without one");
        return Err(Failure::new(StatusCode::CONFLICT, "membership", m));
    }
    let voter = api.raft.metrics().borrow().membership_config.membership().voter_ids().any(|v| v == id);
    // A voter stops voting and (retain = false) leaves; a learner just leaves.
    let how = if voter { ChangeMembers::RemoveVoters([id].into()) } else { ChangeMembers::RemoveNodes([id].into()) };
    let change = api.raft.change_membership(how, false);
    tokio::time::timeout(QUORUM_WAIT, change)
        .await
        .map_err(|_| no_quorum("the membership change was"))?
        .map_err(|e| write_error(e, &uri))?;
    status(State(api), who).await
}

fn refused(e: drv_config::ConfigError) -> Failure {
    let code = e.code();
    Failure::new(status_of(code), code, e.to_string())
}

/// Reads `read` and the version it shows, again if a change was applied meanwhile.
fn at_one_version<T>(
    api: &Api,
    read: impl Fn(&drv_config::ConfigStore) -> drv_config::Result<T>,
) -> Result<Slice<T>, Failure> {
    let store = api.state.store();
    for _ in 0..16 {
        let before = store.version().map_err(internal)?;
        let value = read(&store).map_err(refused)?;
        if store.version().map_err(internal)? == before {
            return Ok(Slice { version: before, value });
        }
    }
    Err(Failure::new(StatusCode::SERVICE_UNAVAILABLE, "busy", "the configuration changed during 16 reads in a row"))
}

/// A staging or replica server's slice (only its own), from this server's state.
async fn node_slice(
    State(api): State<Api>,
    who: Who,
    Path(name): Path<String>,
) -> Answer<Slice<drv_config::NodeConfig>> {
    let peer = who.cert(&api, &[Role::Admin, Role::Config, Role::Staging, Role::Replica])?;
    if matches!(peer.role, Some(Role::Staging | Role::Replica)) && peer.name != name {
        let m = format!("{} may read its own configuration only, not {name}'s", peer.name);
        return Err(Failure::new(StatusCode::FORBIDDEN, "forbidden", m));
    }
    Ok(axum::Json(at_one_version(&api, |s| s.node(&name))?))
}

/// A volume's slice, what its agent needs (key locations, never keys).
async fn volume_slice(
    State(api): State<Api>,
    who: Who,
    Path(name): Path<String>,
) -> Answer<Slice<drv_config::VolumeView>> {
    who.cert(&api, &[Role::Admin, Role::Config, Role::Agent])?;
    Ok(axum::Json(at_one_version(&api, |s| s.volume(&name))?))
}

fn figure_count(f: &Figures) -> usize {
    f.values().map(|m| m.len()).sum()
}

async fn applied(
    State(api): State<Api>,
    who: Who,
    b: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<StatusCode, Failure> {
    let peer = who.cert(&api, &[Role::Staging, Role::Replica, Role::Agent])?;
    let r: Report = body(b)?;
    let long = r.pending.len() > REPORT_PENDING_LIMIT
        || r.pending.iter().any(|p| p.len() > REPORT_TEXT_LIMIT)
        || r.volume.as_ref().is_some_and(|v| v.len() > REPORT_TEXT_LIMIT);
    if long {
        let m =
            format!("a report holds at most {REPORT_PENDING_LIMIT} pending changes of {REPORT_TEXT_LIMIT} bytes each");
        return Err(Failure::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m));
    }
    let count = figure_count(&r.figures);
    let names_long = r.figures.iter().any(|(v, m)| v.len() > REPORT_TEXT_LIMIT || m.keys().any(|k| k.len() > 64));
    if count > REPORT_FIGURES_LIMIT || names_long {
        let m = format!(
            "a report holds at most {REPORT_FIGURES_LIMIT} figures, named in at most 64 bytes, by volume names of at most {REPORT_TEXT_LIMIT} bytes (this one: {count})"
        );
        return Err(Failure::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m));
    }
    let role = peer.role.map_or("?", Role::as_str).to_owned();
    let component = match &r.volume {
        Some(v) => format!("{}/{v}", peer.name),
        None => peer.name.clone(),
    };
    let mut details_bytes = serde_json::to_vec(&r.details).map_or(usize::MAX, |b| b.len());
    let mut details = r.details;
    if details_bytes > REPORT_DETAILS_LIMIT {
        tracing::warn!("{component}: its details ({details_bytes} bytes) are not kept: at most {REPORT_DETAILS_LIMIT}");
        (details, details_bytes) = (Details::new(), 0);
    }
    let state = ComponentState {
        component: component.clone(),
        role,
        version: r.version,
        pending: r.pending,
        reported_unix_ms: drv_config::now_unix_ms(),
        server: api.name.clone(),
        figures: r.figures,
        details,
        details_bytes,
    };
    let mut reports = api.reports.lock().expect("reports lock");
    if !reports.contains_key(&component) && reports.len() >= COMPONENTS_LIMIT {
        let oldest = reports.values().min_by_key(|c| c.reported_unix_ms).map(|c| c.component.clone());
        oldest.and_then(|o| reports.remove(&o));
    }
    let mut state = state;
    let others: usize = reports.iter().filter(|(k, _)| **k != component).map(|(_, c)| figure_count(&c.figures)).sum();
    if others + count > FIGURES_TOTAL_LIMIT {
        tracing::warn!(
            "{component}: its figures are not kept: this server keeps {FIGURES_TOTAL_LIMIT} for all components"
        );
        state.figures.clear();
    }
    let others: usize = reports.iter().filter(|(k, _)| **k != component).map(|(_, c)| c.details_bytes).sum();
    if others + state.details_bytes > DETAILS_TOTAL_LIMIT {
        tracing::warn!("{component}: its details are not kept: this server keeps {DETAILS_TOTAL_LIMIT} bytes of them");
        (state.details, state.details_bytes) = (Details::new(), 0);
    }
    reports.insert(component, state);
    Ok(StatusCode::NO_CONTENT)
}

async fn components(State(api): State<Api>, who: Who) -> Answer<Vec<ComponentState>> {
    let Some(sight) = who.sight(&api)? else {
        who.cert(&api, &[Role::Admin, Role::Config])?;
        return Ok(axum::Json(api.components()));
    };
    // A user sees the components that carry a volume of theirs, with those volumes' figures.
    let mut mine = Vec::new();
    for mut c in api.components() {
        let agent_of = c.component.split_once('/').map(|(_, v)| v.to_owned());
        let had = !c.figures.is_empty();
        c.figures.retain(|v, _| sight.volume(v));
        if agent_of.as_deref().is_some_and(|v| sight.volume(v)) || (had && !c.figures.is_empty()) || sight.user.admin {
            mine.push(c);
        }
    }
    Ok(axum::Json(mine))
}

/// The API's routes.
pub fn router(api: Api) -> axum::Router {
    use axum::routing::{delete, get, post};
    axum::Router::new()
        .route("/v1/commands", post(commands))
        .route("/v1/entries", get(entries))
        .route("/v1/log", get(log))
        .route("/v1/watch", get(watch))
        .route("/v1/status", get(status))
        .route("/v1/members", post(add_member))
        .route("/v1/members/{name}", delete(remove_member))
        .route("/v1/node/{name}", get(node_slice))
        .route("/v1/volume/{name}", get(volume_slice))
        .route("/v1/applied", post(applied))
        .route("/v1/components", get(components))
        .route("/v1/forward", post(forwarded))
        .merge(crate::auth::router())
        .merge(crate::alerts::router())
        .merge(crate::digest::router())
        .layer(axum::extract::DefaultBodyLimit::max(API_BODY_LIMIT))
        .with_state(api)
}
