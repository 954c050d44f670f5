//! Users' sessions and the activity log of one config server (`DATA/web.redb`, this server's
//! own: nothing in it is replicated), and the login rate limit (in memory).
//!
//! | table      | key                           | value                                   |
//! |------------|-------------------------------|-----------------------------------------|
//! | `sessions` | hex SHA-256 of the token      | JSON [`SessionRow`]                     |
//! | `activity` | sequence number (u64)         | JSON [`ActivityRecord`]                 |
//!
//! A session is a random 256-bit token in a cookie (`drv_session`: `Secure`, `HttpOnly`,
//! `SameSite=Strict`); the server keeps only its hash, so a copy of this file opens no session.
//! Each request finds the row, and checks it against the user's entry in the replicated store
//! as it is then: a user deleted or disabled, or whose password changed (the row keeps a
//! fingerprint of the hash it logged in with), has no session any more, on every server. A
//! session ends at logout or [`SESSION_TTL`] after login. Every request that changes something
//! carries the session's CSRF token (a header for the JSON API, a form field for pages), which a
//! page of another site cannot read.
//!
//! A browser keeps a cookie per host: a session is valid on the server that made it (each
//! server's sessions are its own); a change made through a follower is forwarded to the leader.
//!
//! Bounds: [`SESSIONS_LIMIT`] sessions (expired ones are dropped at each login),
//! [`SESSIONS_PER_USER`] per user (the oldest goes), [`ACTIVITY_LIMIT`] activity records (the
//! oldest go), [`ATTEMPTS_LIMIT`] names and addresses in the rate limit's memory.
//!
//! Crash analysis: a login's row is committed (synced) before its cookie is sent; a crash
//! before leaves no session, after leaves one the browser may or may not have. Activity is
//! written in batches by one task; records queued and not yet committed are lost in a crash
//! (at most [`ACTIVITY_QUEUE`]), and a full queue drops records and says how many.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SecureRandom;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const ACTIVITY: TableDefinition<u64, &[u8]> = TableDefinition::new("activity");

/// The cookie that holds a session's token.
pub const COOKIE: &str = "drv_session";
/// The header that carries the CSRF token on JSON requests.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts after login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions one server keeps at most.
pub const SESSIONS_LIMIT: usize = 10_000;
/// Sessions one user has at most (a new login ends the oldest).
pub const SESSIONS_PER_USER: usize = 16;
/// Activity records kept (the oldest go first).
pub const ACTIVITY_LIMIT: u64 = 100_000;
/// Activity records waiting for their commit at most.
pub const ACTIVITY_QUEUE: usize = 1024;
/// Failed logins per user name within [`LOGIN_WINDOW`] before further tries are refused until
/// the window ends.
pub const FAILURES_PER_USER: u32 = 5;
/// The same, per client address (several users may share one).
pub const FAILURES_PER_ADDRESS: u32 = 20;
pub const LOGIN_WINDOW: Duration = Duration::from_secs(300);
/// Names and addresses the rate limit remembers at most.
pub const ATTEMPTS_LIMIT: usize = 10_000;
/// Password checks (argon2: about 19 MiB and tens of milliseconds each) running at once.
pub const CHECKS_AT_ONCE: usize = 4;
/// Logins waiting for a check at most (more are answered 503 at once).
pub const LOGINS_WAITING: usize = 32;

/// What can go wrong with this server's sessions and activity.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("sessions store {path}: {err}")]
    Store { path: String, err: Box<redb::Error> },
    #[error("sessions store {path}: a record does not decode: {err}")]
    Decode { path: String, err: serde_json::Error },
    #[error("this server holds {SESSIONS_LIMIT} sessions already; try again when some have ended")]
    Full,
}

/// One session as the server keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRow {
    pub user: String,
    pub created_unix_ms: u64,
    pub expires_unix_ms: u64,
    /// Sent back on every change (hex, 256 bits).
    pub csrf: String,
    /// Of the password hash it logged in with: a new password ends the session.
    pub password: String,
    /// The client that logged in.
    pub addr: String,
}

/// One line of the activity log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityRecord {
    pub seq: u64,
    pub time_unix_ms: u64,
    /// The server that saw it.
    pub server: String,
    /// `user:NAME`, `admin:CERT`, or the name a failed login gave.
    pub who: String,
    pub addr: String,
    /// `login`, `logout`, `change`, `refused`, ...
    pub what: String,
    pub detail: String,
}

/// What goes into the activity log (the sequence, time and server are added).
#[derive(Clone, Debug)]
pub struct Event {
    pub who: String,
    pub addr: String,
    pub what: &'static str,
    pub detail: String,
}

/// This server's sessions, activity log and login rate limit.
pub struct Sessions {
    db: Arc<Database>,
    path: String,
    server: String,
    activity: tokio::sync::mpsc::Sender<Event>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
    attempts: Mutex<Attempts>,
    /// Password checks at once.
    pub checks: tokio::sync::Semaphore,
    /// Logins waiting for a check (or in one).
    waiting: Arc<tokio::sync::Semaphore>,
}

/// Hex of SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// 256 random bits, in hex.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    aws_lc_rs::rand::SystemRandom::new().fill(&mut b).expect("the system's random source works");
    hex(&b)
}

/// Whether two secrets are equal, in time that does not depend on where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).is_ok()
}

/// A session token from a `Cookie` header's value, if it holds one of the right shape.
pub fn token_of(cookie_header: &str) -> Option<&str> {
    cookie_header
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `Set-Cookie` value of a new session (or, with `None`, of one that ended).
pub fn set_cookie(token: Option<&str>) -> String {
    match token {
        Some(t) => {
            format!("{COOKIE}={t}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}", SESSION_TTL.as_secs())
        }
        None => format!("{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0"),
    }
}

impl Sessions {
    /// Opens (or creates) `path`, and starts the task that writes the activity log.
    pub fn open(path: &Path, server: &str) -> Result<Arc<Sessions>, SessionError> {
        let p = path.display().to_string();
        let store = |e: redb::Error| SessionError::Store { path: p.clone(), err: Box::new(e) };
        let db = Database::create(path).map_err(|e| store(e.into()))?;
        let tx = db.begin_write().map_err(|e| store(e.into()))?;
        tx.open_table(SESSIONS).map_err(|e| store(e.into()))?;
        tx.open_table(ACTIVITY).map_err(|e| store(e.into()))?;
        tx.commit().map_err(|e| store(e.into()))?;
        let (tx, rx) = tokio::sync::mpsc::channel(ACTIVITY_QUEUE);
        let s = Arc::new(Sessions {
            db: Arc::new(db),
            path: p,
            server: server.to_owned(),
            activity: tx,
            dropped: Default::default(),
            attempts: Mutex::new(Attempts::default()),
            checks: tokio::sync::Semaphore::new(CHECKS_AT_ONCE),
            waiting: Arc::new(tokio::sync::Semaphore::new(LOGINS_WAITING)),
        });
        let writer = Writer { db: s.db.clone(), path: s.path.clone(), server: s.server.clone() };
        tokio::spawn(writer.run(rx, s.dropped.clone()));
        Ok(s)
    }

    fn err(&self) -> impl Fn(redb::Error) -> SessionError + '_ {
        move |e| SessionError::Store { path: self.path.clone(), err: Box::new(e) }
    }

    fn decode<T: for<'de> Deserialize<'de>>(&self, b: &[u8]) -> Result<T, SessionError> {
        serde_json::from_slice(b).map_err(|err| SessionError::Decode { path: self.path.clone(), err })
    }

    /// Makes a session for `user` (logged in with the password hash `password_hash`, from
    /// `addr`): its token for the cookie, and its row. Drops expired sessions and the user's
    /// oldest beyond [`SESSIONS_PER_USER`]; refuses when [`SESSIONS_LIMIT`] are alive.
    pub fn create(&self, user: &str, password_hash: &str, addr: &str) -> Result<(String, SessionRow), SessionError> {
        let e = self.err();
        let now = drv_config::now_unix_ms();
        let token = random_token();
        let row = SessionRow {
            user: user.to_owned(),
            created_unix_ms: now,
            expires_unix_ms: now + SESSION_TTL.as_millis() as u64,
            csrf: random_token(),
            password: sha256_hex(password_hash.as_bytes()),
            addr: addr.to_owned(),
        };
        let tx = self.db.begin_write().map_err(|x| e(x.into()))?;
        {
            let mut t = tx.open_table(SESSIONS).map_err(|x| e(x.into()))?;
            let mut mine: Vec<(u64, String)> = Vec::new();
            let mut expired: Vec<String> = Vec::new();
            for kv in t.iter().map_err(|x| e(x.into()))? {
                let (k, v) = kv.map_err(|x| e(x.into()))?;
                let r: SessionRow = self.decode(v.value())?;
                if r.expires_unix_ms <= now {
                    expired.push(k.value().to_owned());
                } else if r.user == user {
                    mine.push((r.created_unix_ms, k.value().to_owned()));
                }
            }
            mine.sort();
            let over = (mine.len() + 1).saturating_sub(SESSIONS_PER_USER);
            for k in expired.iter().chain(mine.iter().take(over).map(|(_, k)| k)) {
                t.remove(k.as_str()).map_err(|x| e(x.into()))?;
            }
            if t.len().map_err(|x| e(x.into()))? as usize >= SESSIONS_LIMIT {
                return Err(SessionError::Full);
            }
            let b = serde_json::to_vec(&row).expect("a session row serializes");
            t.insert(sha256_hex(token.as_bytes()).as_str(), b.as_slice()).map_err(|x| e(x.into()))?;
        }
        tx.commit().map_err(|x| e(x.into()))?;
        Ok((token, row))
    }

    /// The live session of `token`, if there is one.
    pub fn find(&self, token: &str) -> Result<Option<SessionRow>, SessionError> {
        let e = self.err();
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let t = tx.open_table(SESSIONS).map_err(|x| e(x.into()))?;
        let Some(v) = t.get(sha256_hex(token.as_bytes()).as_str()).map_err(|x| e(x.into()))? else {
            return Ok(None);
        };
        let row: SessionRow = self.decode(v.value())?;
        Ok((row.expires_unix_ms > drv_config::now_unix_ms()).then_some(row))
    }

    /// Ends the session of `token` (nothing if there is none).
    pub fn end(&self, token: &str) -> Result<(), SessionError> {
        let e = self.err();
        let tx = self.db.begin_write().map_err(|x| e(x.into()))?;
        tx.open_table(SESSIONS)
            .map_err(|x| e(x.into()))?
            .remove(sha256_hex(token.as_bytes()).as_str())
            .map_err(|x| e(x.into()))?;
        tx.commit().map_err(|x| e(x.into()))
    }

    /// Queues `event` for the activity log (a full queue drops it and counts it).
    pub fn record(&self, event: Event) {
        tracing::info!(who = %event.who, addr = %event.addr, "activity: {} {}", event.what, event.detail);
        if self.activity.try_send(event).is_err() {
            self.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The newest `n` activity records that `keep` keeps, newest last.
    pub fn activity(
        &self,
        n: usize,
        keep: impl Fn(&ActivityRecord) -> bool,
    ) -> Result<Vec<ActivityRecord>, SessionError> {
        let e = self.err();
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let t = tx.open_table(ACTIVITY).map_err(|x| e(x.into()))?;
        let mut out = Vec::new();
        for kv in t.iter().map_err(|x| e(x.into()))?.rev() {
            if out.len() >= n {
                break;
            }
            let r: ActivityRecord = self.decode(kv.map_err(|x| e(x.into()))?.1.value())?;
            if keep(&r) {
                out.push(r);
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Whether a login as `user` from `ip` may be tried now; if not, for how long it may not.
    pub fn may_try(&self, user: &str, ip: IpAddr) -> Result<(), Duration> {
        let mut a = self.attempts.lock().expect("attempts");
        let now = Instant::now();
        let by_user = a.locked(&format!("user:{user}"), FAILURES_PER_USER, now);
        let by_addr = a.locked(&format!("addr:{ip}"), FAILURES_PER_ADDRESS, now);
        match by_user.max(by_addr) {
            Some(d) => Err(d),
            None => Ok(()),
        }
    }

    /// Counts a failed login; whether it locked the name or the address just now.
    pub fn failed(&self, user: &str, ip: IpAddr) -> bool {
        let mut a = self.attempts.lock().expect("attempts");
        let now = Instant::now();
        let u = a.fail(format!("user:{user}"), FAILURES_PER_USER, now);
        let i = a.fail(format!("addr:{ip}"), FAILURES_PER_ADDRESS, now);
        u || i
    }

    /// A place among the logins waiting for a check, if there is one.
    pub fn waiting(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.waiting.clone().try_acquire_owned().ok()
    }

    /// A successful login forgets the name's failures, and takes back the one counted for the
    /// address before the check.
    pub fn succeeded(&self, user: &str, ip: IpAddr) {
        let mut a = self.attempts.lock().expect("attempts");
        a.map.remove(&format!("user:{user}"));
        if let Some(e) = a.map.get_mut(&format!("addr:{ip}")) {
            e.0 = e.0.saturating_sub(1);
        }
    }
}

/// Failed logins by `user:NAME` and `addr:IP`: how many, since when.
#[derive(Default)]
struct Attempts {
    map: HashMap<String, (u32, Instant)>,
}

impl Attempts {
    /// How long `key` stays locked, if it has `limit` failures in its window.
    fn locked(&mut self, key: &str, limit: u32, now: Instant) -> Option<Duration> {
        let &(n, since) = self.map.get(key)?;
        let ends = since + LOGIN_WINDOW;
        if ends <= now {
            self.map.remove(key);
            return None;
        }
        (n >= limit).then(|| ends - now)
    }

    fn fail(&mut self, key: String, limit: u32, now: Instant) -> bool {
        if !self.map.contains_key(&key) && self.map.len() >= ATTEMPTS_LIMIT {
            self.map.retain(|_, (_, since)| *since + LOGIN_WINDOW > now);
            if self.map.len() >= ATTEMPTS_LIMIT {
                let oldest = self.map.iter().min_by_key(|(_, (_, s))| *s).map(|(k, _)| k.clone());
                oldest.map(|k| self.map.remove(&k));
            }
        }
        let e = self.map.entry(key).or_insert((0, now));
        if e.1 + LOGIN_WINDOW <= now {
            *e = (0, now);
        }
        e.0 += 1;
        e.0 == limit
    }
}

/// The task that commits activity records in batches.
struct Writer {
    db: Arc<Database>,
    path: String,
    server: String,
}

impl Writer {
    async fn run(self, mut rx: tokio::sync::mpsc::Receiver<Event>, dropped: Arc<std::sync::atomic::AtomicU64>) {
        let me = Arc::new(self);
        let mut batch = Vec::new();
        while rx.recv_many(&mut batch, ACTIVITY_QUEUE).await > 0 {
            let lost = dropped.swap(0, std::sync::atomic::Ordering::Relaxed);
            if lost > 0 {
                tracing::warn!("activity log: {lost} records dropped (more than {ACTIVITY_QUEUE} waited for a commit)");
            }
            let events = std::mem::take(&mut batch);
            let w = me.clone();
            let done = tokio::task::spawn_blocking(move || w.commit(events, lost)).await;
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("activity log {}: {e}", me.path),
                Err(e) => tracing::error!("activity log {}: {e}", me.path),
            }
        }
    }

    fn commit(&self, events: Vec<Event>, lost: u64) -> Result<(), redb::Error> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(ACTIVITY)?;
            let mut seq = t.last()?.map_or(0, |(k, _)| k.value());
            let now = drv_config::now_unix_ms();
            let lost = (lost > 0).then(|| Event {
                who: "-".into(),
                addr: "-".into(),
                what: "dropped",
                detail: format!("{lost} activity records were dropped: the log's queue was full"),
            });
            for ev in lost.into_iter().chain(events) {
                seq += 1;
                let r = ActivityRecord {
                    seq,
                    time_unix_ms: now,
                    server: self.server.clone(),
                    who: ev.who,
                    addr: ev.addr,
                    what: ev.what.to_owned(),
                    detail: ev.detail,
                };
                t.insert(seq, serde_json::to_vec(&r).expect("a record serializes").as_slice())?;
            }
            let first = t.first()?.map_or(0, |(k, _)| k.value());
            if seq.saturating_sub(first) >= ACTIVITY_LIMIT {
                let keep_from = seq + 1 - ACTIVITY_LIMIT;
                t.retain_in(..keep_from, |_, _| false)?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_read_strictly() {
        let t = "ab".repeat(32);
        assert_eq!(token_of(&format!("x=1; {COOKIE}={t}; y=2")), Some(t.as_str()));
        assert_eq!(token_of(&format!("{COOKIE}={t}x")), None, "too long");
        assert_eq!(token_of(&format!("{COOKIE}={}", "zz".repeat(32))), None, "not hex");
        assert_eq!(token_of("other=1"), None);
        assert!(set_cookie(Some(&t)).contains("Secure; HttpOnly; SameSite=Strict"));
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("abc", "ab"));
        assert_ne!(random_token(), random_token());
    }

    #[test]
    fn failures_lock_a_name_for_the_window() {
        let mut a = Attempts::default();
        let now = Instant::now();
        for i in 1..FAILURES_PER_USER {
            assert!(!a.fail("user:ann".into(), FAILURES_PER_USER, now), "{i}");
            assert_eq!(a.locked("user:ann", FAILURES_PER_USER, now), None);
        }
        assert!(a.fail("user:ann".into(), FAILURES_PER_USER, now), "the fifth locks");
        assert_eq!(a.locked("user:ann", FAILURES_PER_USER, now), Some(LOGIN_WINDOW));
        assert_eq!(a.locked("user:ann", FAILURES_PER_USER, now + LOGIN_WINDOW), None, "the window ended");
        for i in 0..ATTEMPTS_LIMIT + 10 {
            a.fail(format!("addr:{i}"), FAILURES_PER_ADDRESS, now);
        }
        assert!(a.map.len() <= ATTEMPTS_LIMIT, "bounded: {}", a.map.len());
    }

    #[tokio::test]
    async fn sessions_are_bounded_per_user_and_end() {
        let d = tempfile::tempdir().unwrap();
        let s = Sessions::open(&d.path().join("web.redb"), "c1").unwrap();
        let mut tokens = Vec::new();
        for _ in 0..SESSIONS_PER_USER + 2 {
            let (t, row) = s.create("ann", "$argon2id$h", "127.0.0.1").unwrap();
            assert_eq!(s.find(&t).unwrap(), Some(row));
            tokens.push(t);
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(s.find(&tokens[0]).unwrap(), None, "the oldest went");
        assert_eq!(s.find(&tokens[1]).unwrap(), None);
        assert!(s.find(&tokens[2]).unwrap().is_some());
        s.end(&tokens[2]).unwrap();
        assert_eq!(s.find(&tokens[2]).unwrap(), None, "logged out");
        let raw = std::fs::read(d.path().join("web.redb")).unwrap();
        let needle = tokens[3].as_bytes();
        assert!(!raw.windows(needle.len()).any(|w| w == needle), "the file holds no token");
        for i in 0..3 {
            s.record(Event { who: "user:ann".into(), addr: "127.0.0.1".into(), what: "login", detail: i.to_string() });
        }
        for _ in 0..100 {
            if s.activity(10, |_| true).unwrap().len() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let a = s.activity(10, |_| true).unwrap();
        assert_eq!(a.iter().map(|r| r.detail.as_str()).collect::<Vec<_>>(), ["0", "1", "2"]);
        assert_eq!(a[2].seq, 3);
        assert_eq!(s.activity(2, |r| r.detail != "2").unwrap().len(), 2);
    }
}
