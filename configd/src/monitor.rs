//! What every config server sees of the installation, every [`TICK`]: the components' reports
//! (its own and its peers', merged: each component reports to one server), read against the
//! configuration into one row per volume and per component ([`Overview`]), kept as time series
//! ([`crate::series`]) and published to the web UI's pages and live updates (a watch channel).
//!
//! A volume's row says at a glance whether it is at risk and why ([`Health`], `problems`):
//! its agent's mode (sync, change map, resyncing), the replica lag and the RPO (the age of the
//! oldest write the replicas lack, or, out of sync mode, since when the volume left it), dirty
//! bytes, its WRL's fill, each replica's state and its last recovery check, and components not
//! heard from for [`SILENT_AFTER`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use drv_config::{Kind, Volume};
use serde::{Deserialize, Serialize};

use crate::api::{Api, ComponentState};
use crate::series::Agg;

/// How often the overview is made and the series sampled.
pub const TICK: Duration = Duration::from_secs(10);
/// A component not heard from for this long is called silent (it reports at least every 10 s).
pub const SILENT_AFTER: Duration = Duration::from_secs(30);
/// How long a peer may take to give its reports.
const PEER_WAIT: Duration = Duration::from_secs(3);

/// Green, amber or red.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Ok,
    Warn,
    Bad,
}

/// A replica of a volume as its server last said.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicaRow {
    pub name: String,
    /// replicating, resyncing, media-resync, error, failed-over, or unknown (no report).
    pub state: String,
    pub connected: Option<bool>,
    pub apply_lag_records: Option<f64>,
    pub snapshot_store_bytes: Option<f64>,
    pub check_ok: Option<bool>,
    pub check_unix: Option<u64>,
    /// What the replica said of the volume besides figures: its snapshots and retention window
    /// (`snapshots`, `window`), as it reported them.
    #[serde(default)]
    pub details: serde_json::Value,
}

/// One volume, as the overview shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeRow {
    pub name: String,
    pub wrl: String,
    pub staging: String,
    /// sync, change-map, resyncing, or unknown (its agent not heard from).
    pub mode: String,
    pub lag_seconds: Option<f64>,
    pub lag_bytes: Option<f64>,
    pub rpo_seconds: Option<f64>,
    pub dirty_bytes: Option<f64>,
    pub wrl_fill: Option<f64>,
    pub write_bps: Option<f64>,
    pub relay_bps: Option<f64>,
    pub snapshot_bytes_limit: Option<u64>,
    /// Seconds since the volume left sync mode (none: in sync mode, or its mode is unknown).
    pub out_of_sync_seconds: Option<f64>,
    /// Replication paused by an operator (the configuration's `paused`).
    pub paused: bool,
    /// The longest any of its components (staging, replicas, agent) has not been heard from;
    /// one that never reported counts from when this server started watching.
    pub unheard_seconds: f64,
    pub replicas: Vec<ReplicaRow>,
    pub health: Health,
    /// Why it is not green, in words.
    pub problems: Vec<String>,
}

/// One component, as the overview shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComponentRow {
    pub name: String,
    pub role: String,
    pub version: u64,
    pub pending: Vec<String>,
    pub last_heard_unix_ms: Option<u64>,
    pub silent: bool,
    pub server: String,
}

/// The installation at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Overview {
    pub time_unix_ms: u64,
    pub version: u64,
    pub volumes: Vec<VolumeRow>,
    pub components: Vec<ComponentRow>,
}

/// The configured volumes by name, each with its WRL's staging endpoint.
pub type Configured = BTreeMap<String, (Volume, String)>;

/// What the monitor remembers between ticks: counters' last values (for rates) and since when
/// each volume is out of sync mode.
#[derive(Default)]
pub struct Memory {
    counters: HashMap<(String, String), (f64, u64)>,
    out_of_sync: HashMap<String, u64>,
    /// When this server started watching (ms).
    started: Option<u64>,
}

/// The series of a volume: (name, how a coarser tier sums it up).
pub const VOLUME_SERIES: [(&str, Agg); 10] = [
    ("write_bps", Agg::Mean),
    ("relay_bps", Agg::Mean),
    ("lag_seconds", Agg::Max),
    ("lag_bytes", Agg::Max),
    ("rpo_seconds", Agg::Max),
    ("dirty_bytes", Agg::Max),
    ("wrl_fill", Agg::Max),
    ("mode", Agg::Max),
    ("apply_lag_records", Agg::Max),
    ("snapshot_store_bytes", Agg::Max),
];

/// A figure of `volume` from the freshest report of `component` that has it.
fn figure(c: &ComponentState, volume: &str, name: &str) -> Option<f64> {
    c.figures.get(volume).and_then(|m| m.get(name)).copied()
}

impl Memory {
    /// The rate of counter `name` of `key` since the last tick (none at the first, or after a
    /// restart of its component, whose counter went back).
    fn rate(&mut self, key: &str, name: &str, value: Option<f64>, now_ms: u64) -> Option<f64> {
        let value = value?;
        let k = (key.to_owned(), name.to_owned());
        let before = self.counters.insert(k, (value, now_ms));
        let (v0, t0) = before?;
        let dt = now_ms.saturating_sub(t0) as f64 / 1000.0;
        (value >= v0 && dt > 0.0).then(|| (value - v0) / dt)
    }
}

/// The overview of `components` against the configuration `volumes` (by name, with the WRL's
/// staging endpoint), at `now_ms`.
pub fn overview(
    version: u64,
    volumes: &Configured,
    components: &[ComponentState],
    memory: &mut Memory,
    now_ms: u64,
) -> Overview {
    memory.started.get_or_insert(now_ms);
    let silent = |c: &ComponentState| now_ms.saturating_sub(c.reported_unix_ms) > SILENT_AFTER.as_millis() as u64;
    let by_name: HashMap<&str, &ComponentState> = components.iter().map(|c| (c.component.as_str(), c)).collect();
    let mut rows = Vec::with_capacity(volumes.len());
    for (name, (v, staging)) in volumes {
        rows.push(volume_row(name, v, staging, &by_name, components, memory, now_ms, &silent));
    }
    memory.counters.retain(|(k, _), _| volumes.contains_key(k));
    memory.out_of_sync.retain(|k, _| volumes.contains_key(k));
    let comps = components
        .iter()
        .map(|c| ComponentRow {
            name: c.component.clone(),
            role: c.role.clone(),
            version: c.version,
            pending: c.pending.clone(),
            last_heard_unix_ms: Some(c.reported_unix_ms),
            silent: silent(c),
            server: c.server.clone(),
        })
        .collect();
    Overview { time_unix_ms: now_ms, version, volumes: rows, components: comps }
}

#[allow(clippy::too_many_arguments)]
fn volume_row(
    name: &str,
    v: &Volume,
    staging: &str,
    by_name: &HashMap<&str, &ComponentState>,
    components: &[ComponentState],
    memory: &mut Memory,
    now_ms: u64,
    silent: &dyn Fn(&ComponentState) -> bool,
) -> VolumeRow {
    let mut problems = Vec::new();
    let mut health = Health::Ok;
    let mut flag = |h: Health, p: String| {
        health = health.max(h);
        problems.push(p);
    };
    if v.paused {
        flag(Health::Warn, "replication paused by an operator (writes are logged at staging, not relayed)".into());
    }
    let heard = |c: &ComponentState| {
        let s = now_ms.saturating_sub(c.reported_unix_ms) / 1000;
        format!("not heard from for {s} s")
    };
    // Staging: lag, counters, WRL fill.
    let stg = by_name.get(staging).copied();
    let stg_live = stg.filter(|c| !silent(c));
    match stg {
        None => flag(Health::Bad, format!("staging {staging} has not reported")),
        Some(c) if silent(c) => flag(Health::Bad, format!("staging {staging} {}", heard(c))),
        Some(c) if !c.figures.contains_key(name) => {
            flag(Health::Bad, format!("staging {staging} does not serve the volume"))
        }
        Some(_) => {}
    }
    let lag_seconds = stg_live.and_then(|c| figure(c, name, "lag_seconds"));
    let lag_bytes = stg_live.and_then(|c| figure(c, name, "lag_bytes"));
    let write_bps = memory.rate(name, "written", stg_live.and_then(|c| figure(c, name, "written_bytes")), now_ms);
    let relay_bps = memory.rate(name, "replicated", stg_live.and_then(|c| figure(c, name, "replicated_bytes")), now_ms);
    let wrl_fill = stg_live.and_then(|c| figure(c, "", &format!("wrl_used_ratio:{}", v.wrl)));
    if stg_live.and_then(|c| figure(c, "", &format!("wrl_failed:{}", v.wrl))).is_some_and(|f| f > 0.0) {
        flag(Health::Bad, format!("WRL {} failed at staging {staging}", v.wrl));
    }
    if stg_live.and_then(|c| figure(c, name, "replicas_disconnected")).is_some_and(|n| n > 0.0) {
        flag(Health::Warn, "a replica is not connected to staging".into());
    }
    // The agent: `HOST/VOLUME`, the freshest if several.
    let agent = components
        .iter()
        .filter(|c| c.role == "agent" && c.component.rsplit_once('/').is_some_and(|(_, vol)| vol == name))
        .max_by_key(|c| c.reported_unix_ms);
    let mode_figure = agent.filter(|c| !silent(c)).and_then(|c| figure(c, name, "mode"));
    let mode = match mode_figure.map(|m| m as i64) {
        Some(0) => "sync",
        Some(1) => "change-map",
        Some(_) => "resyncing",
        None => "unknown",
    };
    match (agent, mode) {
        (None, _) => flag(Health::Warn, "no agent has reported".into()),
        (Some(c), _) if silent(c) => flag(Health::Bad, format!("agent {} {}", c.component, heard(c))),
        (_, "change-map") => flag(Health::Bad, "the agent is in change-map mode: writes are not replicated".into()),
        (_, "resyncing") => flag(Health::Warn, "resyncing".into()),
        _ => {}
    }
    if agent.filter(|c| !silent(c)).and_then(|c| figure(c, name, "problem")).is_some_and(|p| p > 0.0) {
        flag(Health::Bad, "the agent reports a problem".into());
    }
    let dirty_bytes = agent.filter(|c| !silent(c)).and_then(|c| figure(c, name, "dirty_bytes"));
    let now_s = now_ms / 1000;
    // Out of sync mode since when: forgotten only in sync mode (an agent not heard from keeps
    // the time it left sync mode, if it had).
    let since = match mode {
        "sync" => {
            memory.out_of_sync.remove(name);
            None
        }
        "unknown" => memory.out_of_sync.get(name).copied(),
        _ => Some(*memory.out_of_sync.entry(name.to_owned()).or_insert(now_s)),
    };
    let rpo_seconds = match (since, lag_seconds) {
        (Some(s), lag) => Some((now_s.saturating_sub(s) as f64).max(lag.unwrap_or(0.0))),
        (None, lag) => lag,
    };
    let replicas: Vec<ReplicaRow> =
        v.replicas.iter().map(|r| replica_row(r, name, by_name.get(r.as_str()).copied(), silent)).collect();
    let watched = memory.started.unwrap_or(now_ms);
    let heard_at = |c: Option<&ComponentState>| c.map_or(watched, |c| c.reported_unix_ms);
    let mut oldest = heard_at(stg).min(heard_at(agent));
    for r in &v.replicas {
        oldest = oldest.min(heard_at(by_name.get(r.as_str()).copied()));
    }
    let unheard_seconds = now_ms.saturating_sub(oldest) as f64 / 1000.0;
    for r in &replicas {
        match r.state.as_str() {
            "replicating" => {}
            "unknown" => flag(Health::Bad, format!("replica {} has not reported (or is silent)", r.name)),
            "error" => flag(Health::Bad, format!("replica {} is in error", r.name)),
            s => flag(Health::Warn, format!("replica {} is {s}", r.name)),
        }
        if r.check_ok == Some(false) {
            flag(Health::Bad, format!("the last recovery check on replica {} failed", r.name));
        }
    }
    VolumeRow {
        name: name.to_owned(),
        wrl: v.wrl.clone(),
        staging: staging.to_owned(),
        mode: mode.to_owned(),
        lag_seconds,
        lag_bytes,
        rpo_seconds,
        dirty_bytes,
        wrl_fill,
        write_bps,
        relay_bps,
        snapshot_bytes_limit: v.snapshot_bytes_limit,
        out_of_sync_seconds: since.map(|s| now_s.saturating_sub(s) as f64),
        paused: v.paused,
        unheard_seconds,
        replicas,
        health,
        problems,
    }
}

fn replica_row(
    name: &str,
    volume: &str,
    c: Option<&ComponentState>,
    silent: &dyn Fn(&ComponentState) -> bool,
) -> ReplicaRow {
    let live = c.filter(|c| !silent(c));
    let state = match live.and_then(|c| figure(c, volume, "state")).map(|s| s as i64) {
        Some(0) => "replicating",
        Some(1) => "resyncing",
        Some(2) => "media-resync",
        Some(3) => "error",
        Some(4) => "failed-over",
        _ => "unknown",
    };
    ReplicaRow {
        name: name.to_owned(),
        state: state.to_owned(),
        connected: None,
        apply_lag_records: live.and_then(|c| figure(c, volume, "apply_lag_records")),
        snapshot_store_bytes: live.and_then(|c| figure(c, volume, "snapshot_store_bytes")),
        check_ok: live.and_then(|c| figure(c, volume, "check_ok")).map(|x| x > 0.0),
        check_unix: live.and_then(|c| figure(c, volume, "check_unix")).map(|x| x as u64),
        details: c.and_then(|c| c.details.get(volume)).cloned().unwrap_or_default(),
    }
}

/// The samples a tick records: each volume's [`VOLUME_SERIES`] (a figure not known now is a
/// step without a sample).
pub fn samples(o: &Overview) -> Vec<(String, Agg, f64)> {
    let mut out = Vec::with_capacity(o.volumes.len() * VOLUME_SERIES.len());
    for v in &o.volumes {
        let max_of = |f: &dyn Fn(&ReplicaRow) -> Option<f64>| v.replicas.iter().filter_map(f).reduce(f64::max);
        let mode = match v.mode.as_str() {
            "sync" => Some(0.0),
            "change-map" => Some(1.0),
            "resyncing" => Some(2.0),
            _ => None,
        };
        let values = [
            v.write_bps,
            v.relay_bps,
            v.lag_seconds,
            v.lag_bytes,
            v.rpo_seconds,
            v.dirty_bytes,
            v.wrl_fill,
            mode,
            max_of(&|r| r.apply_lag_records),
            max_of(&|r| r.snapshot_store_bytes),
        ];
        for ((name, agg), value) in VOLUME_SERIES.iter().zip(values) {
            out.push((format!("{}/{name}", v.name), *agg, value.unwrap_or(f64::NAN)));
        }
    }
    out
}

/// What the monitor reads of the configuration.
pub struct Watched {
    pub version: u64,
    pub volumes: Configured,
    pub alerts: BTreeMap<String, drv_config::AlertRule>,
    pub mail: BTreeMap<String, drv_config::MailServer>,
}

fn typed<T: serde::de::DeserializeOwned>(
    store: &drv_config::ConfigStore,
    kind: Kind,
) -> Result<BTreeMap<String, T>, drv_config::ConfigError> {
    Ok(store
        .list(&[kind])?
        .into_iter()
        .filter_map(|(_, n, v)| serde_json::from_value(v).ok().map(|x| (n, x)))
        .collect())
}

/// The volumes of the configuration as the overview needs them, the alert rules and the mail
/// servers.
pub fn configured(api: &Api) -> Result<Watched, drv_config::ConfigError> {
    let store = api.state.store();
    let version = store.version()?;
    let wrls: BTreeMap<String, drv_config::WrlDef> = typed(&store, Kind::Wrl)?;
    let volumes = typed::<Volume>(&store, Kind::Volume)?
        .into_iter()
        .map(|(n, v)| {
            let staging = wrls.get(&v.wrl).map(|w| w.staging.clone()).unwrap_or_default();
            (n, (v, staging))
        })
        .collect();
    Ok(Watched { version, volumes, alerts: typed(&store, Kind::Alert)?, mail: typed(&store, Kind::Mail)? })
}

/// Every component's newest report, from this server and its peers (asked at once).
pub async fn all_components(api: &Api) -> Vec<ComponentState> {
    let mut newest: BTreeMap<String, ComponentState> =
        api.components().into_iter().map(|c| (c.component.clone(), c)).collect();
    let members: Vec<crate::PeerNode> = {
        let m = api.raft.metrics().borrow().clone();
        m.membership_config.membership().nodes().map(|(_, n)| n.clone()).filter(|n| n.name != api.name).collect()
    };
    let mut asks = tokio::task::JoinSet::new();
    for n in members {
        let api = api.clone();
        asks.spawn(async move {
            match tokio::time::timeout(PEER_WAIT, peer_components(&api, &n)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::debug!("components of config server {n}: {e}");
                    Vec::new()
                }
                Err(_) => Vec::new(),
            }
        });
    }
    while let Some(theirs) = asks.join_next().await {
        for c in theirs.unwrap_or_default() {
            match newest.get(&c.component) {
                Some(mine) if mine.reported_unix_ms >= c.reported_unix_ms => {}
                _ => {
                    newest.insert(c.component.clone(), c);
                }
            }
        }
    }
    newest.into_values().collect()
}

async fn peer_components(api: &Api, n: &crate::PeerNode) -> Result<Vec<ComponentState>, String> {
    use http_body_util::BodyExt;
    let name = format!("{}.config.drv", n.name);
    let mut sender = crate::network::https_open(&n.address, &name, api.forward_tls.clone()).await?;
    let req = hyper::Request::get("/v1/components")
        .header(hyper::header::HOST, "config.drv")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

/// Starts the monitor of one server: makes the overview every [`TICK`], records its series
/// and publishes it on `tx`.
pub fn spawn(api: Api, tx: tokio::sync::watch::Sender<Arc<Overview>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut memory = Memory::default();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let components = all_components(&api).await;
            let w = match configured(&api) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("monitor: the configuration: {e}");
                    continue;
                }
            };
            let now = drv_config::now_unix_ms();
            let o = Arc::new(overview(w.version, &w.volumes, &components, &mut memory, now));
            let (series, alerts, s, o2) = (api.series.clone(), api.alerts.clone(), samples(&o), o.clone());
            let leader = api.raft.metrics().borrow().current_leader == Some(crate::server::node_id(&api.name));
            let done = tokio::task::spawn_blocking(move || {
                let recorded = series.record(now / 1000, &s).map_err(|e| e.to_string());
                let t = alerts.evaluate(&w.alerts, &w.mail, &o2, leader, now).map_err(|e| e.to_string());
                (recorded, t)
            })
            .await;
            match done {
                Ok((recorded, transitions)) => {
                    if let Err(e) = recorded {
                        tracing::warn!("monitor: {e}");
                    }
                    match transitions {
                        Ok(t) => crate::alerts::tell(&api, t),
                        Err(e) => tracing::warn!("monitor: {e}"),
                    }
                }
                Err(e) => tracing::warn!("monitor: {e}"),
            }
            tx.send_replace(o);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comp(name: &str, role: &str, at: u64, figures: &[(&str, &str, f64)]) -> ComponentState {
        let mut f = crate::api::Figures::new();
        for (v, n, x) in figures {
            f.entry(v.to_string()).or_default().insert(n.to_string(), *x);
        }
        ComponentState {
            component: name.into(),
            role: role.into(),
            version: 1,
            pending: vec![],
            reported_unix_ms: at,
            server: "c1".into(),
            figures: f,
            details: Default::default(),
            details_bytes: 0,
        }
    }

    fn volumes() -> Configured {
        let v: Volume = serde_json::from_value(serde_json::json!({
            "size_bytes": 1 << 30, "wrl": "w0", "replicas": ["rep1"], "key": "k1"
        }))
        .unwrap();
        [("db".to_string(), (v, "stg1".to_string()))].into()
    }

    /// Every cause of red or amber is named, RPO grows out of sync mode, and rates come from
    /// counters.
    #[test]
    fn a_volume_at_risk_says_why() {
        let t = 1_800_000_000_000;
        let stg = |at, written: f64| {
            comp(
                "stg1",
                "staging",
                at,
                &[("db", "lag_seconds", 2.0), ("db", "written_bytes", written), ("", "wrl_used_ratio:w0", 0.25)],
            )
        };
        let rep = comp("rep1", "replica", t, &[("db", "state", 0.0), ("db", "check_ok", 1.0)]);
        let agent = |at, mode| comp("host1/db", "agent", at, &[("db", "mode", mode), ("db", "dirty_bytes", 0.0)]);
        let mut m = Memory::default();
        let o = overview(7, &volumes(), &[stg(t, 1000.0), rep.clone(), agent(t, 0.0)], &mut m, t);
        let v = &o.volumes[0];
        assert_eq!((v.health, v.mode.as_str(), v.rpo_seconds, v.wrl_fill), (Health::Ok, "sync", Some(2.0), Some(0.25)));
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        // 10 s later: 10,000 bytes more, the agent in change-map mode.
        let t2 = t + 10_000;
        let o = overview(7, &volumes(), &[stg(t2, 11_000.0), rep.clone(), agent(t2, 1.0)], &mut m, t2);
        let v = &o.volumes[0];
        assert_eq!(v.write_bps, Some(1000.0));
        assert_eq!(v.health, Health::Bad);
        assert!(v.problems.iter().any(|p| p.contains("change-map")), "{:?}", v.problems);
        let t3 = t2 + 60_000;
        let o = overview(7, &volumes(), &[stg(t3, 11_000.0), agent(t3, 1.0)], &mut m, t3);
        let v = &o.volumes[0];
        assert_eq!(v.rpo_seconds, Some(60.0), "out of sync for a minute");
        assert!(v.problems.iter().any(|p| p.contains("replica rep1 has not reported")), "{:?}", v.problems);
        // Staging silent: named, with how long.
        let t4 = t3 + 45_000;
        let o = overview(7, &volumes(), &[stg(t3, 11_000.0), agent(t4, 0.0), rep], &mut m, t4);
        let v = &o.volumes[0];
        assert!(v.problems.iter().any(|p| p == "staging stg1 not heard from for 45 s"), "{:?}", v.problems);
        assert_eq!(v.lag_seconds, None);
        assert_eq!(samples(&o).len(), VOLUME_SERIES.len());
    }
}
