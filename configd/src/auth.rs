//! Who asks the API, and what they may see.
//!
//! On the mutual-TLS listener everyone presents a certificate of the installation CA, whose
//! role says what they may do. On the web listener (no client certificates: browsers and
//! scripts) a user logs in (`POST /v1/login`) and sends the session cookie with each request,
//! and with every request that changes something the session's CSRF token in the
//! `X-CSRF-Token` header. A user's rights come from the replicated store as it is at the
//! request ([`drv_config::users`]): an admin may do everything; an operator or viewer sees the
//! volumes of the replication sets granted to them. A change a user asks for is checked again
//! as it applies (`Command::user`), so the roles it is judged by are the committed ones.
//!
//! | method | path            | who        | what                                                |
//! |--------|-----------------|------------|-----------------------------------------------------|
//! | POST   | `/v1/login`     | anyone     | `{user, password}` -> [`LoginReply`] + cookie        |
//! | POST   | `/v1/logout`    | a user     | ends the session                                    |
//! | GET    | `/v1/whoami`    | a user     | [`LoginReply`] (the CSRF token again)               |
//! | GET    | `/v1/activity`  | users, admins | `?newest=N`: this server's activity log (a user who is not an admin: their own) |

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use drv_config::users::{self, Action};
use drv_config::{EntryRow, Kind, LogRecord, Op, ReplicationSet, User};
use drv_transport::Role;
use serde::{Deserialize, Serialize};

use crate::api::{Api, Failure, Peer, internal};
use crate::sessions::{self, ActivityRecord, Event, SessionRow};

/// Who asks.
#[derive(Clone, Debug)]
pub enum Who {
    /// A certificate of the installation CA (mutual-TLS listener).
    Cert(Peer),
    /// A logged-in user (web listener).
    User(SessionUser),
}

/// A logged-in user, as the store has them now.
#[derive(Clone, Debug)]
pub struct SessionUser {
    pub name: String,
    pub user: User,
    pub session: SessionRow,
    pub addr: SocketAddr,
}

fn unauthenticated(m: &str) -> Failure {
    Failure::new(StatusCode::UNAUTHORIZED, "unauthenticated", m)
}

impl<S: Send + Sync> FromRequestParts<S> for Who
where
    Api: axum::extract::FromRef<S>,
{
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Who, Failure> {
        let api = <Api as axum::extract::FromRef<S>>::from_ref(state);
        let ConnectInfo(peer) = parts
            .extensions
            .get::<ConnectInfo<Peer>>()
            .cloned()
            .ok_or_else(|| internal("a request without its peer"))?;
        if peer.role.is_some() {
            return Ok(Who::Cert(peer));
        }
        let token = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(sessions::token_of)
            .ok_or_else(|| unauthenticated("no session: log in first (POST /v1/login)"))?;
        let user = session_user(&api, token, peer.addr).await?;
        let safe = matches!(parts.method, Method::GET | Method::HEAD);
        if !safe {
            let sent = parts.headers.get(sessions::CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
            if !sessions::same_secret(sent, &user.session.csrf) {
                let m = format!(
                    "a change needs the session's CSRF token in the {} header (GET /v1/whoami gives it)",
                    sessions::CSRF_HEADER
                );
                api.sessions.record(Event {
                    who: format!("user:{}", user.name),
                    addr: peer.addr.to_string(),
                    what: "refused",
                    detail: format!("{} {}: no valid CSRF token", parts.method, parts.uri.path()),
                });
                return Err(Failure::new(StatusCode::FORBIDDEN, "csrf", m));
            }
        }
        Ok(Who::User(user))
    }
}

/// The user of session `token`, if it is alive and the user still may log in with the password
/// it was made with.
pub async fn session_user(api: &Api, token: &str, addr: SocketAddr) -> Result<SessionUser, Failure> {
    let ended = "the session has ended (logged out, expired, or never was): log in again";
    let session = api.sessions.find(token).map_err(internal)?.ok_or_else(|| unauthenticated(ended))?;
    let user = match api.state.store().get_typed::<User>(Kind::User, &session.user) {
        Ok(u) => u,
        Err(drv_config::ConfigError::NotFound { .. }) => return Err(unauthenticated(ended)),
        Err(e) => return Err(internal(e)),
    };
    if user.disabled || !sessions::same_secret(&sessions::sha256_hex(user.password_hash.as_bytes()), &session.password)
    {
        api.sessions.end(token).map_err(internal)?;
        return Err(unauthenticated("the session has ended: the user was disabled or their password changed"));
    }
    Ok(SessionUser { name: session.user.clone(), user, session, addr })
}

impl Who {
    /// How the activity log and the history name them.
    pub fn label(&self) -> String {
        match self {
            Who::Cert(p) => format!("{}:{}", p.role.map_or("?", Role::as_str), p.name),
            Who::User(u) => format!("user:{}", u.name),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        match self {
            Who::Cert(p) => p.addr,
            Who::User(u) => u.addr,
        }
    }

    /// A certificate of one of `roles`; users are refused (and the refusal logged).
    pub fn cert(&self, api: &Api, roles: &[Role]) -> Result<&Peer, Failure> {
        match self {
            Who::Cert(p) if p.role.is_some_and(|r| roles.contains(&r)) => Ok(p),
            Who::Cert(p) => {
                let role = p.role.map_or("(no role)", Role::as_str);
                let m = format!("{role} {} may not do this (allowed: {roles:?})", p.name);
                Err(Failure::new(StatusCode::FORBIDDEN, "forbidden", m))
            }
            Who::User(_) => Err(self.forbid(api, "this is for the installation's components, not for users")),
        }
    }

    /// An admin: a certificate of one of `roles`, or an admin user.
    pub fn admin(&self, api: &Api, roles: &[Role]) -> Result<(), Failure> {
        match self {
            Who::Cert(_) => self.cert(api, roles).map(|_| ()),
            Who::User(u) if users::may(&u.user, &BTreeMap::new(), Action::Administer, None) => Ok(()),
            Who::User(_) => Err(self.forbid(api, "only an admin may do this")),
        }
    }

    /// A 403 for this user, said in the activity log too.
    pub fn forbid(&self, api: &Api, why: &str) -> Failure {
        api.sessions.record(Event {
            who: self.label(),
            addr: self.addr().to_string(),
            what: "refused",
            detail: why.to_owned(),
        });
        Failure::new(StatusCode::FORBIDDEN, "forbidden", format!("{}: {why}", self.label()))
    }

    /// What this user may see, as the store is now (`None`: everything, as an admin does).
    pub fn sight(&self, api: &Api) -> Result<Option<Sight>, Failure> {
        let Who::User(u) = self else { return Ok(None) };
        let store = api.state.store();
        let sets: BTreeMap<String, ReplicationSet> = store
            .list(&[Kind::Set])
            .map_err(internal)?
            .into_iter()
            .filter_map(|(_, n, v)| serde_json::from_value(v).ok().map(|s| (n, s)))
            .collect();
        Ok(Some(Sight { name: u.name.clone(), user: u.user.clone(), sets }))
    }
}

/// What a user may see: their own entry, the sets granted to them and their volumes (an admin
/// user sees everything but password hashes).
pub struct Sight {
    pub name: String,
    pub user: User,
    pub sets: BTreeMap<String, ReplicationSet>,
}

impl Sight {
    pub fn is_admin(&self) -> bool {
        self.user.admin && !self.user.disabled
    }

    pub fn volume(&self, v: &str) -> bool {
        users::may(&self.user, &self.sets, Action::View, Some(v))
    }

    pub fn may_operate(&self, v: &str) -> bool {
        users::may(&self.user, &self.sets, Action::Operate, Some(v))
    }

    /// Whether the user may see entry `kind name`.
    pub fn entry(&self, kind: Kind, name: &str) -> bool {
        if self.user.admin && !self.user.disabled {
            return true;
        }
        match kind {
            Kind::Volume => self.volume(name),
            Kind::Set => self.user.grants.contains_key(name),
            Kind::User => name == self.name,
            Kind::Endpoint | Kind::Key | Kind::Wrl | Kind::Alert | Kind::Mail => false,
        }
    }

    /// The entries the user may see, without password hashes.
    pub fn entries(&self, rows: Vec<EntryRow>) -> Vec<EntryRow> {
        rows.into_iter()
            .filter(|r| self.entry(r.kind, &r.name))
            .map(|mut r| {
                if r.kind == Kind::User {
                    hide_hash(&mut r.value);
                }
                r
            })
            .collect()
    }

    /// The history records all of whose entries the user may see, without password hashes.
    pub fn records(&self, records: Vec<LogRecord>) -> Vec<LogRecord> {
        let sees = |op: &Op| match op {
            Op::Set { kind, name, .. } | Op::Delete { kind, name, .. } => self.entry(*kind, name),
        };
        records
            .into_iter()
            .filter(|r| r.ops.iter().all(sees))
            .map(|mut r| {
                r.values.iter_mut().for_each(hide_hash);
                for op in &mut r.ops {
                    if let Op::Set { assignments, .. } = op {
                        for a in assignments.iter_mut().filter(|a| a.trim_start().starts_with("password_hash")) {
                            *a = "password_hash=(hidden)".into();
                        }
                    }
                }
                r
            })
            .collect()
    }
}

/// A user entry's value without its password hash (`password_hash` becomes `(hidden)`).
pub fn hide_hash(v: &mut serde_json::Value) {
    if let Some(h) = v.get_mut("password_hash") {
        *h = serde_json::Value::String("(hidden)".into());
    }
}

/// A login.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub user: String,
    pub password: String,
}

/// A session as its user is told: who, what they may do, and the CSRF token changes carry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoginReply {
    pub user: String,
    pub admin: bool,
    pub grants: BTreeMap<String, drv_config::SetRole>,
    pub csrf: String,
    pub expires_unix_ms: u64,
}

fn reply_of(u: &User, s: &SessionRow) -> LoginReply {
    LoginReply {
        user: s.user.clone(),
        admin: u.admin,
        grants: u.grants.clone(),
        csrf: s.csrf.clone(),
        expires_unix_ms: s.expires_unix_ms,
    }
}

/// The longest user name a login may give.
const NAME_MAX: usize = 128;

/// Checks a login: the rate limit, then the password (argon2 on the blocking pool, at most
/// `CHECKS_AT_ONCE` at once; an unknown user costs the same as a wrong password).
pub async fn check_login(
    api: &Api,
    req: &LoginRequest,
    addr: SocketAddr,
) -> Result<(User, SessionRow, String), Failure> {
    let s = &api.sessions;
    let name: String = req.user.chars().take(NAME_MAX).collect();
    let log = |what: &'static str, detail: String| {
        s.record(Event { who: format!("login:{name}"), addr: addr.to_string(), what, detail })
    };
    if let Err(wait) = s.may_try(&name, addr.ip()) {
        let m = format!(
            "too many failed logins for {name:?} or from {}: try again in {} s",
            addr.ip(),
            wait.as_secs().max(1)
        );
        let mut f = Failure::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", m);
        f.retry_after = Some(wait.as_secs().max(1));
        return Err(f);
    }
    let user = match api.state.store().get_typed::<User>(Kind::User, &name) {
        Ok(u) => Some(u),
        Err(drv_config::ConfigError::NotFound { .. }) => None,
        Err(e) => return Err(internal(e)),
    };
    // Counted as failed before the check (parallel tries cannot slip past the limit), and
    // only so many wait for a check at once.
    let Some(_waiting) = s.waiting() else {
        let m =
            format!("{} logins wait for a check on this server already: try again shortly", sessions::LOGINS_WAITING);
        return Err(Failure::new(StatusCode::SERVICE_UNAVAILABLE, "busy", m));
    };
    let locked = s.failed(&name, addr.ip());
    let permit = s.checks.acquire().await.map_err(internal)?;
    let (password, u) = (req.password.clone(), user.clone());
    let ok = tokio::task::spawn_blocking(move || match &u {
        Some(u) => users::verify(u, &password),
        None => {
            // The same work for a name that does not exist.
            users::verify(dummy(), &password);
            false
        }
    })
    .await
    .map_err(internal)?;
    drop(permit);
    let Some(user) = user.filter(|_| ok) else {
        log(
            "login_failed",
            if locked {
                "wrong user or password; further tries refused for a while".into()
            } else {
                "wrong user or password".into()
            },
        );
        return Err(Failure::new(StatusCode::UNAUTHORIZED, "unauthenticated", "wrong user name or password"));
    };
    s.succeeded(&name, addr.ip());
    let (token, row) = s.create(&name, &user.password_hash, &addr.to_string()).map_err(|e| match e {
        sessions::SessionError::Full => Failure::new(StatusCode::SERVICE_UNAVAILABLE, "busy", e.to_string()),
        e => internal(e),
    })?;
    log("login", format!("session until {}", row.expires_unix_ms / 1000));
    Ok((user, row, token))
}

/// A user whose password nobody knows (its hash is of random bytes).
fn dummy() -> &'static User {
    static D: std::sync::OnceLock<User> = std::sync::OnceLock::new();
    D.get_or_init(|| User {
        password_hash: users::hash(&sessions::random_token()).expect("a random password hashes"),
        admin: false,
        grants: BTreeMap::new(),
        disabled: false,
    })
}

async fn login(
    State(api): State<Api>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    b: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, Failure> {
    let req: LoginRequest = crate::api::body(b)?;
    let (user, row, token) = check_login(&api, &req, peer.addr).await?;
    let mut h = HeaderMap::new();
    h.insert(header::SET_COOKIE, sessions::set_cookie(Some(&token)).parse().expect("a cookie is a header value"));
    Ok((h, axum::Json(reply_of(&user, &row))).into_response())
}

async fn logout(State(api): State<Api>, who: Who, headers: HeaderMap) -> Result<Response, Failure> {
    let Who::User(u) = &who else {
        return Err(Failure::new(StatusCode::BAD_REQUEST, "bad_request", "certificates have no session to end"));
    };
    let token = headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(sessions::token_of);
    if let Some(t) = token {
        api.sessions.end(t).map_err(internal)?;
    }
    api.sessions.record(Event { who: who.label(), addr: u.addr.to_string(), what: "logout", detail: String::new() });
    let mut h = HeaderMap::new();
    h.insert(header::SET_COOKIE, sessions::set_cookie(None).parse().expect("a cookie is a header value"));
    Ok((h, StatusCode::NO_CONTENT).into_response())
}

async fn whoami(who: Who) -> Result<axum::Json<LoginReply>, Failure> {
    match who {
        Who::User(u) => Ok(axum::Json(reply_of(&u.user, &u.session))),
        Who::Cert(p) => Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{} is a certificate, not a user", p.name),
        )),
    }
}

#[derive(Deserialize)]
struct ActivityQuery {
    newest: Option<usize>,
}

/// Activity records one request returns at most.
pub const ACTIVITY_PAGE: usize = 10_000;

async fn activity(
    State(api): State<Api>,
    who: Who,
    Query(q): Query<ActivityQuery>,
) -> Result<axum::Json<Vec<ActivityRecord>>, Failure> {
    let n = q.newest.unwrap_or(100).min(ACTIVITY_PAGE);
    let all = match &who {
        Who::Cert(_) => who.cert(&api, &[Role::Admin, Role::Config]).map(|_| true)?,
        Who::User(u) => u.user.admin,
    };
    let me = who.label();
    let login = match &who {
        Who::User(u) => format!("login:{}", u.name),
        Who::Cert(_) => String::new(),
    };
    let rows = api.sessions.activity(n, |r| all || r.who == me || r.who == login).map_err(internal)?;
    Ok(axum::Json(rows))
}

/// The routes of users' sessions.
pub fn router() -> axum::Router<Api> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/v1/login", post(login))
        .route("/v1/logout", post(logout))
        .route("/v1/whoami", get(whoami))
        .route("/v1/activity", get(activity))
}
