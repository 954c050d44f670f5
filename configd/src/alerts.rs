//! Alerts: every config server checks the alert rules of the configuration against each new
//! overview ([`crate::monitor`]) and keeps what fired, when it resolved and who acknowledged it
//! (`DATA/alerts.redb`, this server's own):
//!
//! | table    | key            | value                  |
//! |----------|----------------|------------------------|
//! | `alerts` | id (u64)       | JSON [`AlertRecord`]    |
//!
//! An alert is one firing of one rule for one volume: open while the condition holds, then
//! resolved. Each firing and resolution goes to the activity log; the leader alone mails it (so
//! a group of servers sends one mail), and for one rule and volume at most one firing mail per
//! the rule's `mail_every` (a resolution is mailed only if its firing was), so a flapping link
//! sends a few mails, not one per flap; each mail server has an hourly budget besides
//! (`mail.rs`). An acknowledgement is given on one server and passed on to the others.
//!
//! Bounds: [`ALERTS_LIMIT`] records (the oldest resolved ones go first); the mail queue holds
//! [`MAIL_QUEUE`] mails (more are dropped, and said so).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use drv_config::{AlertCondition, AlertRule, MailServer};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::mail::Mail;
use crate::monitor::{Overview, VolumeRow};

const ALERTS: TableDefinition<u64, &[u8]> = TableDefinition::new("alerts");

/// Alert records kept.
pub const ALERTS_LIMIT: u64 = 10_000;
/// Mails waiting to be sent at most.
pub const MAIL_QUEUE: usize = 64;

/// One firing of one rule for one volume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    pub id: u64,
    pub rule: String,
    pub volume: String,
    pub when: AlertCondition,
    /// What it saw when it fired, in words.
    pub message: String,
    pub fired_unix_ms: u64,
    #[serde(default)]
    pub resolved_unix_ms: Option<u64>,
    #[serde(default)]
    pub acked_by: Option<String>,
    #[serde(default)]
    pub acked_unix_ms: Option<u64>,
    /// Whether its firing was mailed.
    #[serde(default)]
    pub mailed: bool,
}

impl AlertRecord {
    pub fn state(&self) -> &'static str {
        match (self.resolved_unix_ms, &self.acked_by) {
            (Some(_), _) => "resolved",
            (None, Some(_)) => "acknowledged",
            (None, None) => "open",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("alerts store {path}: {err}")]
pub struct AlertsError {
    path: String,
    err: Box<redb::Error>,
}

/// A change of an alert, for the activity log and the mail.
#[derive(Clone, Debug)]
pub struct Transition {
    pub record: AlertRecord,
    pub fired: bool,
    /// Mail it to these, through this server (the leader decides; see [`Alerts::evaluate`]).
    pub mail: Option<(String, MailServer, Vec<String>)>,
}

/// This server's alerts.
pub struct Alerts {
    db: Database,
    path: String,
    /// Open alerts: (rule, volume) -> id.
    open: Mutex<HashMap<(String, String), u64>>,
    /// When (rule, volume) was last mailed a firing (ms).
    mailed: Mutex<HashMap<(String, String), u64>>,
}

/// What a rule says of a volume now.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// It holds: what it saw, in words.
    Holds(String),
    Clear,
    /// Its figures are not known now (their component is silent): an open alert stays open.
    Unknown,
}

/// Whether `rule` holds for volume row `v`.
pub fn holds(rule: &AlertRule, v: &VolumeRow) -> Verdict {
    use AlertCondition::*;
    use Verdict::*;
    let over = rule.over;
    let f = |x: f64| format!("{x:.1}");
    let judge = |x: Option<f64>, say: &dyn Fn(f64) -> String| match x {
        None => Unknown,
        Some(x) if x > over => Holds(say(x)),
        Some(_) => Clear,
    };
    match rule.when {
        LagSeconds => judge(v.lag_seconds, &|l| format!("replica lag {} s, over {} s", f(l), f(over))),
        RpoSeconds => judge(v.rpo_seconds, &|r| format!("RPO {} s, over {} s", f(r), f(over))),
        ChangeMapMinutes if v.mode == "unknown" => Unknown,
        ChangeMapMinutes => {
            judge(Some(if v.mode == "change-map" { v.out_of_sync_seconds.unwrap_or(0.0) / 60.0 } else { 0.0 }), &|m| {
                format!("in change-map mode for {} min, over {} min", f(m), f(over))
            })
        }
        WrlFillPercent => {
            judge(v.wrl_fill.map(|x| x * 100.0), &|p| format!("WRL {} {}% full, over {}%", v.wrl, f(p), f(over)))
        }
        SilentSeconds => judge(Some(v.unheard_seconds), &|s| {
            format!("a component not heard from for {} s, over {} s: {}", f(s), f(over), v.problems.join("; "))
        }),
        CheckFailed => {
            let failed: Vec<&str> =
                v.replicas.iter().filter(|r| r.check_ok == Some(false)).map(|r| r.name.as_str()).collect();
            if failed.is_empty() {
                Clear
            } else {
                Holds(format!("the last recovery check failed on {}", failed.join(", ")))
            }
        }
        SnapshotStorePercent => {
            let Some(limit) = v.snapshot_bytes_limit else { return Clear };
            let used = v.replicas.iter().filter_map(|r| r.snapshot_store_bytes).reduce(f64::max);
            judge(used.map(|u| u / (limit as f64).max(1.0) * 100.0), &|p| {
                format!("snapshot store {}% of its limit, over {}%", f(p), f(over))
            })
        }
    }
}

impl Alerts {
    pub fn open(path: &Path) -> Result<Arc<Alerts>, AlertsError> {
        let p = path.display().to_string();
        let err = |e: redb::Error| AlertsError { path: p.clone(), err: Box::new(e) };
        let db = Database::create(path).map_err(|e| err(e.into()))?;
        let tx = db.begin_write().map_err(|e| err(e.into()))?;
        tx.open_table(ALERTS).map_err(|e| err(e.into()))?;
        tx.commit().map_err(|e| err(e.into()))?;
        let a = Alerts { db, path: p, open: Default::default(), mailed: Default::default() };
        let open: HashMap<(String, String), u64> = a
            .list(|r| r.resolved_unix_ms.is_none(), usize::MAX)?
            .into_iter()
            .map(|r| ((r.rule, r.volume), r.id))
            .collect();
        *a.open.lock().expect("alerts") = open;
        Ok(Arc::new(a))
    }

    fn err(&self, e: impl Into<redb::Error>) -> AlertsError {
        AlertsError { path: self.path.clone(), err: Box::new(e.into()) }
    }

    /// The newest `n` records `keep` keeps, newest first.
    pub fn list(&self, keep: impl Fn(&AlertRecord) -> bool, n: usize) -> Result<Vec<AlertRecord>, AlertsError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(ALERTS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for kv in t.iter().map_err(|e| self.err(e))?.rev() {
            let (_, v) = kv.map_err(|e| self.err(e))?;
            let Ok(r) = serde_json::from_slice::<AlertRecord>(v.value()) else { continue };
            if keep(&r) {
                out.push(r);
                if out.len() >= n {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Checks `rules` against overview `o` at `now_ms`: the alerts that fired and resolved. With
    /// `leader`, the transitions due a mail say through which server and to whom.
    pub fn evaluate(
        &self,
        rules: &BTreeMap<String, AlertRule>,
        mail: &BTreeMap<String, MailServer>,
        o: &Overview,
        leader: bool,
        now_ms: u64,
    ) -> Result<Vec<Transition>, AlertsError> {
        let mut firing: BTreeMap<(String, String), (&AlertRule, String)> = BTreeMap::new();
        let mut unknown: std::collections::BTreeSet<(String, String)> = Default::default();
        for (name, rule) in rules.iter().filter(|(_, r)| !r.disabled) {
            for v in o.volumes.iter().filter(|v| rule.volumes.is_empty() || rule.volumes.contains(&v.name)) {
                match holds(rule, v) {
                    Verdict::Holds(m) => {
                        firing.insert((name.clone(), v.name.clone()), (rule, m));
                    }
                    Verdict::Unknown => {
                        unknown.insert((name.clone(), v.name.clone()));
                    }
                    Verdict::Clear => {}
                }
            }
        }
        let server_of = |rule: &AlertRule| -> Option<(String, MailServer)> {
            let name =
                rule.mail.clone().or_else(|| (mail.len() == 1).then(|| mail.keys().next().cloned()).flatten())?;
            mail.get(&name).map(|m| (name, m.clone()))
        };
        let mut out = Vec::new();
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = tx.open_table(ALERTS).map_err(|e| self.err(e))?;
            let mut open = self.open.lock().expect("alerts");
            let mut mailed = self.mailed.lock().expect("alerts");
            // Resolved: open, and known to hold no more (or its rule or volume is gone).
            let done: Vec<((String, String), u64)> = open
                .iter()
                .filter(|(k, _)| !firing.contains_key(*k) && !unknown.contains(*k))
                .map(|(k, id)| (k.clone(), *id))
                .collect();
            for (key, id) in done {
                open.remove(&key);
                let Some(v) = t.get(id).map_err(|e| self.err(e))?.map(|v| v.value().to_vec()) else { continue };
                let Ok(mut r) = serde_json::from_slice::<AlertRecord>(&v) else { continue };
                r.resolved_unix_ms = Some(now_ms);
                t.insert(id, serde_json::to_vec(&r).expect("a record serializes").as_slice())
                    .map_err(|e| self.err(e))?;
                let rule = rules.get(&key.0);
                let mail = match (leader && r.mailed, rule) {
                    (true, Some(rule)) if !rule.email.is_empty() => {
                        server_of(rule).map(|(n, m)| (n, m, rule.email.clone()))
                    }
                    _ => None,
                };
                out.push(Transition { record: r, fired: false, mail });
            }
            // Fired: firing, and not open.
            let mut next = t.last().map_err(|e| self.err(e))?.map_or(0, |(k, _)| k.value());
            for (key, (rule, message)) in &firing {
                if let Some(&id) = open.get(key) {
                    // Still firing: its mail, if it had none yet and one is due now (a firing
                    // within `mail_every` of the last, or one a former leader kept).
                    let due = mailed.get(key).is_none_or(|t| now_ms.saturating_sub(*t) >= rule.mail_every * 1000);
                    if !(leader && due && !rule.email.is_empty()) {
                        continue;
                    }
                    let Some(v) = t.get(id).map_err(|e| self.err(e))?.map(|v| v.value().to_vec()) else { continue };
                    let Ok(mut r) = serde_json::from_slice::<AlertRecord>(&v) else { continue };
                    let Some((n, m)) = server_of(rule).filter(|_| !r.mailed) else { continue };
                    r.mailed = true;
                    mailed.insert(key.clone(), now_ms);
                    t.insert(id, serde_json::to_vec(&r).expect("a record serializes").as_slice())
                        .map_err(|e| self.err(e))?;
                    out.push(Transition { record: r, fired: true, mail: Some((n, m, rule.email.clone())) });
                    continue;
                }
                next += 1;
                let due = mailed.get(key).is_none_or(|t| now_ms.saturating_sub(*t) >= rule.mail_every * 1000);
                let mail = (leader && due && !rule.email.is_empty())
                    .then(|| server_of(rule).map(|(n, m)| (n, m, rule.email.clone())))
                    .flatten();
                if mail.is_some() {
                    mailed.insert(key.clone(), now_ms);
                }
                let r = AlertRecord {
                    id: next,
                    rule: key.0.clone(),
                    volume: key.1.clone(),
                    when: rule.when,
                    message: message.clone(),
                    fired_unix_ms: now_ms,
                    resolved_unix_ms: None,
                    acked_by: None,
                    acked_unix_ms: None,
                    mailed: mail.is_some(),
                };
                t.insert(next, serde_json::to_vec(&r).expect("a record serializes").as_slice())
                    .map_err(|e| self.err(e))?;
                open.insert(key.clone(), next);
                out.push(Transition { record: r, fired: true, mail });
            }
            mailed.retain(|_, t| now_ms.saturating_sub(*t) < 7 * 86_400_000);
            self.trim(&mut t, &open)?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// Drops the oldest resolved records beyond [`ALERTS_LIMIT`].
    fn trim(&self, t: &mut redb::Table<u64, &[u8]>, open: &HashMap<(String, String), u64>) -> Result<(), AlertsError> {
        let len = t.len().map_err(|e| self.err(e))?;
        if len <= ALERTS_LIMIT {
            return Ok(());
        }
        let keep: std::collections::HashSet<u64> = open.values().copied().collect();
        let over = (len - ALERTS_LIMIT) as usize;
        // The oldest resolved ones (open ones stay, however many there are).
        let mut gone = Vec::with_capacity(over);
        for kv in t.iter().map_err(|e| self.err(e))? {
            let id = kv.map_err(|e| self.err(e))?.0.value();
            if !keep.contains(&id) {
                gone.push(id);
                if gone.len() >= over {
                    break;
                }
            }
        }
        for id in gone {
            t.remove(id).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Acknowledges alert `id` (open, not yet acknowledged) as `by`.
    pub fn ack(&self, id: u64, by: &str) -> Result<Option<AlertRecord>, AlertsError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let r = {
            let mut t = tx.open_table(ALERTS).map_err(|e| self.err(e))?;
            let Some(v) = t.get(id).map_err(|e| self.err(e))?.map(|v| v.value().to_vec()) else { return Ok(None) };
            let Ok(mut r) = serde_json::from_slice::<AlertRecord>(&v) else { return Ok(None) };
            if r.resolved_unix_ms.is_some() || r.acked_by.is_some() {
                return Ok(Some(r));
            }
            r.acked_by = Some(by.to_owned());
            r.acked_unix_ms = Some(drv_config::now_unix_ms());
            t.insert(id, serde_json::to_vec(&r).expect("a record serializes").as_slice()).map_err(|e| self.err(e))?;
            r
        };
        tx.commit().map_err(|e| self.err(e))?;
        Ok(Some(r))
    }

    /// The open alert of `rule` on `volume`, if any.
    pub fn open_of(&self, rule: &str, volume: &str) -> Option<u64> {
        self.open.lock().expect("alerts").get(&(rule.to_owned(), volume.to_owned())).copied()
    }
}

/// Says `transitions` in the activity log, and queues their mails.
pub fn tell(api: &crate::api::Api, transitions: Vec<Transition>) {
    for t in transitions {
        let r = &t.record;
        let what = if t.fired { "alert_fired" } else { "alert_resolved" };
        let detail = format!("volume {}: {} (alert {})", r.volume, r.message, r.id);
        api.sessions.record(crate::sessions::Event { who: format!("rule:{}", r.rule), addr: "-".into(), what, detail });
        if let Some((name, server, to)) = &t.mail {
            let m = mail_of(&t, &api.name, to.clone());
            if api.mails.try_send((name.clone(), server.clone(), m)).is_err() {
                api.sessions.record(crate::sessions::Event {
                    who: format!("rule:{}", r.rule),
                    addr: "-".into(),
                    what: "mail_dropped",
                    detail: format!("the mail of alert {} was dropped: {MAIL_QUEUE} mails wait already", r.id),
                });
            }
        }
    }
}

/// A queued mail: the mail server's name, its entry, the mail.
pub type Queued = (String, MailServer, Mail);

/// Sends the queued mails one at a time, each said in the activity log.
pub fn spawn_mailer(
    sessions: Arc<crate::sessions::Sessions>,
    budget: Arc<crate::mail::Budget>,
    mut rx: tokio::sync::mpsc::Receiver<Queued>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some((name, server, m)) = rx.recv().await {
            let (what, detail) = match crate::mail::send(&server, &name, &budget, &m).await {
                Ok(()) => ("mail_sent", format!("{:?} to {}", m.subject, m.to.join(", "))),
                Err(e) => ("mail_failed", format!("{:?} to {}: {e}", m.subject, m.to.join(", "))),
            };
            sessions.record(crate::sessions::Event { who: format!("mail:{name}"), addr: "-".into(), what, detail });
        }
    })
}

/// What the mail of a transition says.
pub fn mail_of(t: &Transition, server: &str, to: Vec<String>) -> Mail {
    let r = &t.record;
    let state = if t.fired { "FIRING" } else { "RESOLVED" };
    let subject = format!("[drv] {state}: volume {} - {}", r.volume, r.rule);
    let text = format!(
        "{state}: alert rule {rule} on volume {vol}\n\n{msg}\n\nfired:    {fired}\n{resolved}seen by config server {server}\n",
        rule = r.rule,
        vol = r.volume,
        msg = r.message,
        fired = crate::web::utc(r.fired_unix_ms / 1000),
        resolved = r.resolved_unix_ms.map(|t| format!("resolved: {}\n", crate::web::utc(t / 1000))).unwrap_or_default(),
    );
    Mail { to, subject, text, html: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::Health;

    fn row(lag: f64) -> VolumeRow {
        VolumeRow {
            name: "db".into(),
            wrl: "w0".into(),
            staging: "stg1".into(),
            mode: "sync".into(),
            lag_seconds: Some(lag),
            lag_bytes: None,
            rpo_seconds: Some(lag),
            dirty_bytes: None,
            wrl_fill: Some(0.5),
            write_bps: None,
            relay_bps: None,
            snapshot_bytes_limit: None,
            out_of_sync_seconds: None,
            paused: false,
            unheard_seconds: 0.0,
            replicas: vec![],
            health: Health::Ok,
            problems: vec![],
        }
    }

    fn rule() -> AlertRule {
        serde_json::from_value(serde_json::json!({
            "when": "lag_seconds", "over": 60, "email": ["ops@example.com"], "mail_every": 3600
        }))
        .unwrap()
    }

    fn mail() -> BTreeMap<String, MailServer> {
        let m: MailServer = serde_json::from_value(serde_json::json!({
            "address": "127.0.0.1:25", "security": "none", "from": "drv@localhost"
        }))
        .unwrap();
        [("smtp".to_string(), m)].into()
    }

    /// A flapping volume: one firing mail per `mail_every`, its resolution mailed, the flaps in
    /// between in the log only; a follower mails nothing.
    #[test]
    fn flapping_sends_few_mails() {
        let d = tempfile::tempdir().unwrap();
        let a = Alerts::open(&d.path().join("alerts.redb")).unwrap();
        let rules: BTreeMap<String, AlertRule> = [("lag".to_string(), rule())].into();
        let o = |lag| Overview { time_unix_ms: 1, version: 1, volumes: vec![row(lag)], components: vec![] };
        let t0 = 1_800_000_000_000;
        let mut mails = 0;
        let mut transitions = 0;
        for i in 0..20u64 {
            let lag = if i % 2 == 0 { 90.0 } else { 1.0 };
            for t in a.evaluate(&rules, &mail(), &o(lag), true, t0 + i * 10_000).unwrap() {
                transitions += 1;
                mails += usize::from(t.mail.is_some());
            }
        }
        assert_eq!(transitions, 20, "each flap is an alert");
        assert_eq!(mails, 2, "one firing and its resolution mailed");
        let all = a.list(|_| true, 100).unwrap();
        assert_eq!(all.len(), 10);
        assert!(all.iter().all(|r| r.resolved_unix_ms.is_some()));
        assert!(all[0].message.contains("replica lag 90.0 s, over 60.0 s"), "{:?}", all[0]);
        // A figure that is not known (staging silent) leaves an open alert open.
        let blind = Overview { volumes: vec![VolumeRow { lag_seconds: None, ..row(0.0) }], ..o(0.0) };
        let t = a.evaluate(&rules, &mail(), &o(90.0), true, t0 + 300_000).unwrap();
        assert!(t[0].fired && t[0].mail.is_none(), "within mail_every of the last mail");
        assert!(a.evaluate(&rules, &mail(), &blind, true, t0 + 310_000).unwrap().is_empty(), "still open");
        // Still firing when mail_every has passed: its firing is mailed then.
        let late = a.evaluate(&rules, &mail(), &o(90.0), true, t0 + 3_600_000).unwrap();
        assert!(late.len() == 1 && late[0].fired && late[0].mail.is_some(), "{late:?}");
        assert!(a.evaluate(&rules, &mail(), &o(90.0), true, t0 + 3_610_000).unwrap().is_empty(), "once");
        let r = a.evaluate(&rules, &mail(), &o(1.0), true, t0 + 3_620_000).unwrap();
        assert!(!r[0].fired && r[0].mail.is_some(), "and its resolution");
        // Two hours later it may mail again; a follower never does.
        let later = t0 + 7_300_000;
        assert!(a.evaluate(&rules, &mail(), &o(90.0), true, later).unwrap()[0].mail.is_some());
        let id = a.open_of("lag", "db").unwrap();
        assert_eq!(a.ack(id, "user:ann").unwrap().unwrap().state(), "acknowledged");
        drop(a);
        let a = Alerts::open(&d.path().join("alerts.redb")).unwrap();
        assert_eq!(a.open_of("lag", "db"), Some(id), "open alerts are remembered");
        let t = a.evaluate(&rules, &mail(), &o(1.0), false, later + 10_000).unwrap();
        assert!(!t[0].fired && t[0].mail.is_none(), "a follower mails nothing");
    }
}

/// Acknowledges alert `id` for `who` (who must be allowed to operate its volume), here and on
/// the other config servers (their open alert of the same rule and volume).
pub async fn acknowledge(
    api: &crate::api::Api,
    who: &crate::auth::Who,
    id: u64,
) -> Result<AlertRecord, crate::api::Failure> {
    use crate::api::{Failure, internal};
    use axum::http::StatusCode;
    let not_found = || Failure::new(StatusCode::NOT_FOUND, "not_found", format!("no alert {id} on this server"));
    let found = api.alerts.list(|r| r.id == id, 1).map_err(internal)?.pop().ok_or_else(not_found)?;
    match who.sight(api)? {
        Some(s) if !s.volume(&found.volume) => return Err(not_found()),
        Some(s) if !s.may_operate(&found.volume) => {
            return Err(
                who.forbid(api, &format!("only an operator of volume {} may acknowledge its alerts", found.volume))
            );
        }
        Some(_) => {}
        None => {
            who.cert(api, &[drv_transport::Role::Admin])?;
        }
    }
    let by = who.label();
    let r = api.alerts.ack(id, &by).map_err(internal)?.ok_or_else(not_found)?;
    api.sessions.record(crate::sessions::Event {
        who: by.clone(),
        addr: who.addr().to_string(),
        what: "alert_acked",
        detail: format!("alert {id}: rule {} on volume {}", r.rule, r.volume),
    });
    let peers: Vec<crate::PeerNode> = {
        let m = api.raft.metrics().borrow().clone();
        m.membership_config.membership().nodes().map(|(_, n)| n.clone()).filter(|n| n.name != api.name).collect()
    };
    for n in peers {
        let (api, body) = (api.clone(), PeerAck { rule: r.rule.clone(), volume: r.volume.clone(), by: by.clone() });
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(std::time::Duration::from_secs(5), peer_ack(&api, &n, &body)).await {
                tracing::info!("alert acknowledgement to config server {n}: {e}");
            }
        });
    }
    Ok(r)
}

/// An acknowledgement passed on to another config server.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAck {
    pub rule: String,
    pub volume: String,
    pub by: String,
}

async fn peer_ack(api: &crate::api::Api, n: &crate::PeerNode, body: &PeerAck) -> Result<(), String> {
    use http_body_util::BodyExt;
    let name = format!("{}.config.drv", n.name);
    let mut sender = crate::network::https_open(&n.address, &name, api.forward_tls.clone()).await?;
    let req = hyper::Request::post("/v1/alerts/peer-ack")
        .header(hyper::header::HOST, "config.drv")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(serde_json::to_vec(body).map_err(|e| e.to_string())?)))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    if status.is_success() { Ok(()) } else { Err(format!("HTTP {status}")) }
}

#[derive(Deserialize)]
struct AlertsQuery {
    /// `open` (open and acknowledged) or `all`.
    state: Option<String>,
    newest: Option<usize>,
}

async fn list(
    axum::extract::State(api): axum::extract::State<crate::api::Api>,
    who: crate::auth::Who,
    axum::extract::Query(q): axum::extract::Query<AlertsQuery>,
) -> Result<axum::Json<Vec<AlertRecord>>, crate::api::Failure> {
    let sight = who.sight(&api)?;
    if sight.is_none() {
        who.cert(&api, &[drv_transport::Role::Admin, drv_transport::Role::Config])?;
    }
    let open_only = q.state.as_deref() == Some("open");
    let n = q.newest.unwrap_or(1000).min(ALERTS_LIMIT as usize);
    let keep = |r: &AlertRecord| {
        (!open_only || r.resolved_unix_ms.is_none()) && sight.as_ref().is_none_or(|s| s.volume(&r.volume))
    };
    Ok(axum::Json(api.alerts.list(keep, n).map_err(crate::api::internal)?))
}

async fn ack(
    axum::extract::State(api): axum::extract::State<crate::api::Api>,
    who: crate::auth::Who,
    axum::extract::Path(id): axum::extract::Path<u64>,
) -> Result<axum::Json<AlertRecord>, crate::api::Failure> {
    acknowledge(&api, &who, id).await.map(axum::Json)
}

async fn peer_acked(
    axum::extract::State(api): axum::extract::State<crate::api::Api>,
    who: crate::auth::Who,
    b: Result<bytes::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::http::StatusCode, crate::api::Failure> {
    who.cert(&api, &[drv_transport::Role::Config])?;
    let p: PeerAck = crate::api::body(b)?;
    if let Some(id) = api.alerts.open_of(&p.rule, &p.volume) {
        api.alerts.ack(id, &p.by).map_err(crate::api::internal)?;
    }
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// The alert routes: `GET /v1/alerts?state=open|all&newest=N` (what the asker may see),
/// `POST /v1/alerts/ID/ack` (operators of its volume, admins), `POST /v1/alerts/peer-ack`
/// (config servers passing an acknowledgement on).
pub fn router() -> axum::Router<crate::api::Api> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/v1/alerts", get(list))
        .route("/v1/alerts/{id}/ack", post(ack))
        .route("/v1/alerts/peer-ack", post(peer_acked))
}
