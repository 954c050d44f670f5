//! A client of the config servers' JSON API ([`crate::api`]): it presents its certificate (an
//! admin's for the command line), goes to the leader when a follower redirects it (at most
//! [`MAX_HOPS`] times per attempt), tries the next server when one does not answer, and while no
//! majority answers (503) tries again for its patience, with the same body, so a change is sent
//! with one request id however often it is retried and applies at most once.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use drv_config::{Kind, Op, Written};
use drv_transport::{Identity, Role};
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use serde::de::DeserializeOwned;

pub use hyper::Method;

use crate::api::{
    ApiError, CommandRequest, ComponentState, EntriesReply, LogReply, MemberRequest, Report, ServerStatus, Slice,
    WatchReply,
};
use crate::network::Sender;

/// Redirects followed per attempt.
pub const MAX_HOPS: usize = 3;
/// How long one request may take to be answered at all.
const REQUEST_DEADLINE: Duration = Duration::from_secs(90);
/// How long a client keeps trying while servers are away or without a majority, by default.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No config server could be reached for the whole patience.
    #[error("no config server answered within {patience:?} (tried {tried}); the last error: {last}")]
    Unreachable { tried: String, patience: Duration, last: String },
    /// A server answered with an error: what it said.
    #[error("config server {server}: {message} ({code}, HTTP {status})")]
    Refused { server: String, status: u16, code: String, message: String },
    /// A server's answer made no sense.
    #[error("config server {server}: {message}")]
    Protocol { server: String, message: String },
    /// The TLS handshake failed: a certificate was refused, by either side.
    #[error("config server {server}: {message}")]
    Handshake { server: String, message: String },
    #[error("the client's certificate: {0}")]
    Certificate(#[from] drv_transport::TransportError),
}

impl ClientError {
    /// The API's error code, if a server refused.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Why one exchange failed: worth another try, or not.
enum Failed {
    Retry(String),
    Final(String),
}

/// A client of a group of config servers.
#[derive(Clone)]
pub struct ApiClient {
    servers: Vec<String>,
    tls: Arc<rustls::ClientConfig>,
    patience: Duration,
    /// Idle connections by server, kept for the next request (at most [`IDLE_PER_SERVER`]).
    idle: Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<Sender>>>>,
}

/// Idle connections kept per server.
const IDLE_PER_SERVER: usize = 16;

/// `https://HOST:PORT[/...]` or `HOST:PORT` to `HOST:PORT`.
fn host_port(s: &str) -> &str {
    let s = s.trim().strip_prefix("https://").unwrap_or(s.trim());
    s.split('/').next().unwrap_or(s)
}

impl ApiClient {
    /// A client of `servers` (comma-separated `https://HOST:PORT` or `HOST:PORT`) presenting
    /// `identity`.
    pub fn new(servers: &str, identity: &Identity) -> Result<ApiClient, ClientError> {
        let servers: Vec<String> =
            servers.split(',').map(host_port).filter(|s| !s.is_empty()).map(str::to_owned).collect();
        if servers.is_empty() {
            let message = "no config server address given (--config-server HOST:PORT,...)".to_owned();
            return Err(ClientError::Protocol { server: "-".into(), message });
        }
        let tls = drv_transport::tls::https_client_config(identity, Role::Config)?;
        Ok(ApiClient { servers, tls, patience: PATIENCE, idle: Default::default() })
    }

    /// Keep trying this long while servers are away or have no majority.
    pub fn with_patience(mut self, patience: Duration) -> ApiClient {
        self.patience = patience;
        self
    }

    /// An idle connection to `addr`, or a new one (`true`: reused, it may have been closed by
    /// the server meanwhile).
    async fn connection(&self, addr: &str) -> Result<(Sender, bool), Failed> {
        let kept = self.idle.lock().expect("idle connections").get_mut(addr).and_then(Vec::pop);
        if let Some(mut s) = kept.filter(|s| !s.is_closed()) {
            // Ready once the connection finished the previous exchange (an HTTP/1 sender used
            // before that fails at once, and a new connection would cost a TLS handshake).
            if s.ready().await.is_ok() {
                return Ok((s, true));
            }
        }
        let s = crate::network::https_open(addr, "config.drv", self.tls.clone()).await.map_err(|e| {
            // The server's certificate does not verify, or the handshake failed: retrying
            // will not change that.
            if e.starts_with("TLS") { Failed::Final(e) } else { Failed::Retry(e) }
        })?;
        Ok((s, false))
    }

    fn keep(&self, addr: &str, s: Sender) {
        let mut idle = self.idle.lock().expect("idle connections");
        let v = idle.entry(addr.to_owned()).or_default();
        if v.len() < IDLE_PER_SERVER {
            v.push(s);
        }
    }

    /// One exchange with `addr` (on a kept connection if there is one): `Err` if it could not be
    /// had at all.
    async fn once(
        &self,
        addr: &str,
        method: &hyper::Method,
        path: &str,
        body: &Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), Failed> {
        let exchange = async {
            loop {
                let (mut sender, reused) = self.connection(addr).await?;
                let req = hyper::Request::builder()
                    .method(method)
                    .uri(path)
                    .header(hyper::header::HOST, addr)
                    .header(hyper::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(body.clone().unwrap_or_default()))
                    .map_err(|e| Failed::Final(e.to_string()))?;
                let resp = match sender.send_request(req).await {
                    Ok(r) => r,
                    // A kept connection the server closed meanwhile: a new one, for a request that
                    // may be sent twice (a read, or a change: its request id makes it apply once).
                    Err(_) if reused && (*method == hyper::Method::GET || path == "/v1/commands") => continue,
                    Err(e) => {
                        let why = chain(&e);
                        // TLS 1.3: a refused client certificate shows only when the first answer is read.
                        return Err(if why.contains("received fatal alert") {
                            Failed::Final(format!(
                                "it refused this certificate ({why}): config servers take the certificates of \
                                 their installation CA"
                            ))
                        } else {
                            Failed::Retry(format!("no answer: {why}"))
                        });
                    }
                };
                let status = resp.status();
                let bytes = resp.into_body().collect().await.map_err(|e| Failed::Retry(e.to_string()))?.to_bytes();
                self.keep(addr, sender);
                return Ok((status, bytes));
            }
        };
        tokio::time::timeout(REQUEST_DEADLINE, exchange)
            .await
            .unwrap_or_else(|_| Err(Failed::Retry(format!("no answer within {REQUEST_DEADLINE:?}"))))
    }

    /// Sends a request to the group and gives the body of its success.
    pub async fn request(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let body = body.map(Bytes::from);
        let deadline = tokio::time::Instant::now() + self.patience;
        let (mut next, mut hops) = (0usize, 0usize);
        let mut redirected: Option<String> = None;
        let mut last = String::new();
        // The last "no majority / no leader" answer: what to say if patience runs out.
        let mut unavailable: Option<ClientError> = None;
        loop {
            let addr = redirected.take().unwrap_or_else(|| self.servers[next % self.servers.len()].clone());
            match self.once(&addr, &method, path, &body).await {
                Ok((s, b)) if s.is_success() => return Ok(b),
                Ok((s, b)) if s == StatusCode::TEMPORARY_REDIRECT => {
                    let e = api_error(&b);
                    last = format!("{addr}: {}", e.message);
                    redirected = e.leader.as_deref().filter(|_| hops < MAX_HOPS).map(|l| host_port(l).to_owned());
                    if redirected.is_some() {
                        hops += 1;
                        continue;
                    }
                }
                Ok((s, b)) if s == StatusCode::SERVICE_UNAVAILABLE => {
                    unavailable = Some(refused(&addr, s, api_error(&b)))
                }
                Ok((s, b)) => return Err(refused(&addr, s, api_error(&b))),
                Err(Failed::Final(message)) => return Err(ClientError::Handshake { server: addr, message }),
                Err(Failed::Retry(e)) => last = format!("{addr}: {e}"),
            }
            // Not answered: the next server, a pause after each round.
            hops = 0;
            next += 1;
            if tokio::time::Instant::now() >= deadline {
                if let Some(e) = unavailable {
                    return Err(e);
                }
                let tried = self.servers.join(", ");
                return Err(ClientError::Unreachable { tried, patience: self.patience, last });
            }
            if next % self.servers.len() == 0 {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let b = self.request(hyper::Method::GET, path, None).await?;
        decode(&b)
    }

    /// Applies `ops` as one change; the same request id for every retry.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<Written, ClientError> {
        let req = CommandRequest { request_id: Some(format!("{:032x}", drv_config::random_id())), ops };
        let body = serde_json::to_vec(&req).expect("JSON of a command");
        let b = self.request(hyper::Method::POST, "/v1/commands", Some(body)).await?;
        decode(&b)
    }

    /// Entries of `kind` (all kinds if `None`), only `name` if given; `local`: this server's
    /// state without asking the leader.
    pub async fn entries(
        &self,
        kind: Option<Kind>,
        name: Option<&str>,
        local: bool,
    ) -> Result<EntriesReply, ClientError> {
        let mut q = vec![];
        if let Some(k) = kind {
            q.push(format!("kind={k}"));
        }
        if let Some(n) = name {
            q.push(format!("name={}", encode(n)));
        }
        if local {
            q.push("local=1".into());
        }
        self.get(&format!("/v1/entries?{}", q.join("&"))).await
    }

    /// History after version `after`, at most `limit` records.
    pub async fn log(&self, after: u64, limit: usize, local: bool) -> Result<LogReply, ClientError> {
        self.get(&format!("/v1/log?after={after}&limit={limit}&local={}", u8::from(local))).await
    }

    /// The newest `n` changes (at most [`crate::api::LOG_LIMIT`]), oldest first.
    pub async fn log_newest(&self, n: usize) -> Result<LogReply, ClientError> {
        self.get(&format!("/v1/log?newest={n}")).await
    }

    /// Waits (at most `wait`) for a version after `after` on the server asked.
    pub async fn watch(&self, after: u64, wait: Duration) -> Result<WatchReply, ClientError> {
        self.get(&format!("/v1/watch?after={after}&wait_ms={}", wait.as_millis())).await
    }

    /// The first server's view of the group.
    pub async fn status(&self) -> Result<ServerStatus, ClientError> {
        self.get("/v1/status").await
    }

    /// This client asking server `s` alone, once (its connections shared).
    fn only(&self, s: &str) -> ApiClient {
        ApiClient { servers: vec![s.to_owned()], patience: Duration::ZERO, ..self.clone() }
    }

    /// Each server's own view, in the order given (an error for one that does not answer).
    pub async fn status_each(&self) -> Vec<(String, Result<ServerStatus, ClientError>)> {
        let mut out = Vec::new();
        for s in &self.servers {
            out.push((s.clone(), self.only(s).status().await));
        }
        out
    }

    /// Staging or replica server `name`'s configuration, from the first server that answers.
    pub async fn node(&self, name: &str) -> Result<Slice<drv_config::NodeConfig>, ClientError> {
        self.get(&format!("/v1/node/{}", encode(name))).await
    }

    /// Volume `name` with everything its agent needs.
    pub async fn volume(&self, name: &str) -> Result<Slice<drv_config::VolumeView>, ClientError> {
        self.get(&format!("/v1/volume/{}", encode(name))).await
    }

    /// Tells the config server the version this component runs.
    pub async fn report(&self, r: &Report) -> Result<(), ClientError> {
        let body = serde_json::to_vec(r).expect("JSON of a report");
        self.request(hyper::Method::POST, "/v1/applied", Some(body)).await.map(drop)
    }

    /// Every component one server heard from.
    pub async fn components(&self) -> Result<Vec<ComponentState>, ClientError> {
        self.get("/v1/components").await
    }

    /// Every component every server heard from: the newest report of each.
    pub async fn components_everywhere(&self) -> Vec<ComponentState> {
        let mut all: std::collections::BTreeMap<String, ComponentState> = Default::default();
        for s in &self.servers {
            for c in self.only(s).components().await.unwrap_or_default() {
                if all.get(&c.component).is_none_or(|o| o.reported_unix_ms < c.reported_unix_ms) {
                    all.insert(c.component.clone(), c);
                }
            }
        }
        all.into_values().collect()
    }

    /// Adds a config server to the group (it must be running with `--join`).
    pub async fn add_member(&self, name: &str, address: &str) -> Result<ServerStatus, ClientError> {
        let body = serde_json::to_vec(&MemberRequest { name: name.into(), address: address.into() }).expect("JSON");
        decode(&self.request(hyper::Method::POST, "/v1/members", Some(body)).await?)
    }

    /// Removes a config server from the group.
    pub async fn remove_member(&self, name: &str) -> Result<ServerStatus, ClientError> {
        decode(&self.request(hyper::Method::DELETE, &format!("/v1/members/{}", encode(name)), None).await?)
    }
}

/// Percent-encodes what is not safe in a query value or path segment.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An error and its causes (hyper's own text says little: "connection error").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(&format!(": {c}"));
        cause = c.source();
    }
    out
}

fn api_error(b: &[u8]) -> ApiError {
    serde_json::from_slice(b).unwrap_or_else(|_| ApiError {
        code: "http".into(),
        message: String::from_utf8_lossy(b).trim().to_owned(),
        leader: None,
    })
}

fn refused(server: &str, status: StatusCode, e: ApiError) -> ClientError {
    ClientError::Refused { server: server.into(), status: status.as_u16(), code: e.code, message: e.message }
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(b).map_err(|e| ClientError::Protocol {
        server: "-".into(),
        message: format!("an answer that does not decode: {e}"),
    })
}
