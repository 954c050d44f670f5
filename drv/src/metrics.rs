//! `/metrics` for Prometheus: every daemon (`drv staging run`, `drv replica run`, `drv agent run`,
//! `drv config-server run`) given `--metrics HOST:PORT` serves its figures there in Prometheus's
//! text format (version 0.0.4), rendered from the same status a `drv status` reads, at the
//! moment of the scrape (nothing is kept between scrapes).
//!
//! The listener is plain HTTP, as Prometheus scrapes by default: bind it to loopback or to a
//! management network. It answers `GET /metrics` (404 for any other path), one request per
//! connection, at most [`CONNECTIONS_LIMIT`] connections at once (more are closed at once), each
//! done within [`CONNECTION_DEADLINE`] (a slow or idle client is cut off), and at most
//! [`RENDER_LIMIT`] renderings at once (a rendering that outlives its connection still holds its
//! place, so a stuck status cannot pile up threads). A rendering that fails answers 500, so
//! Prometheus marks the target down.
//!
//! Names follow Prometheus's conventions: a `drv_` prefix, the role, base units in the name
//! (`_bytes`, `_seconds`), `_total` for counters; sequence numbers and positions are gauges.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use drv_proto::status::{ReplicaStatus, StagingStatus, VolumeState};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connections served at once.
pub const CONNECTIONS_LIMIT: usize = 16;
/// Renderings at once.
pub const RENDER_LIMIT: usize = 4;
/// The longest one connection may last, request and answer.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

/// The content type of the text format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What renders the figures at a scrape (an error: why they cannot be had now).
pub type Render = Arc<dyn Fn() -> std::result::Result<String, String> + Send + Sync>;

/// Binds `addr` (`HOST:PORT`; a host name is resolved): done before a daemon starts its work, so
/// a port in use stops it at once.
pub async fn bind(addr: &str) -> Result<TcpListener> {
    let at = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("--metrics {addr}: not a HOST:PORT address"))?
        .next()
        .with_context(|| format!("--metrics {addr}: the name resolves to no address"))?;
    TcpListener::bind(at).await.with_context(|| format!("--metrics {addr}: listen on {at}"))
}

/// Serves `render` on `GET /metrics` on `listener`, until the process ends. Returns where.
pub fn serve(listener: TcpListener, render: Render) -> Result<SocketAddr> {
    let bound = listener.local_addr()?;
    let (connections, renders) = (Arc::new(Semaphore::new(CONNECTIONS_LIMIT)), Arc::new(Semaphore::new(RENDER_LIMIT)));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            // Over the limit: closed at once, nothing read.
            let Ok(permit) = connections.clone().try_acquire_owned() else { continue };
            let (render, renders) = (render.clone(), renders.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| answer(req, render.clone(), renders.clone()));
                let conn = hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
                let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
                drop(permit);
            });
        }
    });
    Ok(bound)
}

async fn answer<B>(
    req: Request<B>,
    render: Render,
    renders: Arc<Semaphore>,
) -> std::result::Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |code: StatusCode, text: String| {
        let mut r = Response::new(Full::new(Bytes::from(text)));
        *r.status_mut() = code;
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(CONTENT_TYPE));
        Ok(r)
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "only /metrics is served here\n".into());
    }
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n".into());
    }
    let Ok(permit) = renders.try_acquire_owned() else {
        return reply(StatusCode::SERVICE_UNAVAILABLE, "too many scrapes at once\n".into());
    };
    // Rendering takes locks the daemon's own paths take too: off the runtime's threads, holding
    // its place until it is done even if the connection is gone.
    let done = tokio::task::spawn_blocking(move || {
        let r = render();
        drop(permit);
        r
    });
    match done.await {
        Ok(Ok(text)) => reply(StatusCode::OK, text),
        Ok(Err(why)) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{why}\n")),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("rendering failed: {e}\n")),
    }
}

/// A page of the text format, one metric family after another.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

/// A metric's type.
#[derive(Clone, Copy)]
pub enum Type {
    Gauge,
    Counter,
}

/// One sample: its labels and value.
pub type Sample = (Vec<(&'static str, String)>, f64);

/// A family of per-volume samples: name, help, type and how to read the value.
type PerVolume<V> = (&'static str, &'static str, Type, fn(&V) -> f64);

impl Exposition {
    /// A family of samples (written only if it has any).
    pub fn family(&mut self, name: &str, t: Type, help: &str, samples: impl IntoIterator<Item = Sample>) -> &mut Self {
        let mut samples = samples.into_iter().peekable();
        if samples.peek().is_none() {
            return self;
        }
        let t = match t {
            Type::Gauge => "gauge",
            Type::Counter => "counter",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {t}");
        for (labels, value) in samples {
            self.out.push_str(name);
            if !labels.is_empty() {
                self.out.push('{');
                for (i, (k, v)) in labels.iter().enumerate() {
                    let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                    let _ = write!(self.out, "{}{k}=\"{v}\"", if i > 0 { "," } else { "" });
                }
                self.out.push('}');
            }
            let _ = writeln!(self.out, " {}", number(value));
        }
        self
    }

    /// A family of one sample without labels.
    pub fn one(&mut self, name: &str, t: Type, help: &str, value: f64) -> &mut Self {
        self.family(name, t, help, [(Vec::new(), value)])
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{v}")
    }
}

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

use Type::{Counter, Gauge};

/// A staging server's figures.
pub fn staging(s: &StagingStatus) -> String {
    let mut e = Exposition::default();
    e.one("drv_staging_uptime_seconds", Gauge, "Seconds since the staging server started.", s.uptime_seconds);
    e.one("drv_staging_peers", Gauge, "Peers connected now (replicas' relays, agents).", s.peers.len() as f64);
    let vol = |v: &drv_proto::status::StagingVolume| vec![("volume", v.name.clone())];
    let per_volume: [PerVolume<drv_proto::status::StagingVolume>; 8] = [
        ("drv_staging_received_seq", "The last write of the volume taken.", Gauge, |v| v.received_seq as f64),
        ("drv_staging_durable_seq", "The last write durable in the WRL (acknowledged to the agent).", Gauge, |v| {
            v.durable_seq as f64
        }),
        ("drv_staging_replicated_seq", "The last write every replica holds durably.", Gauge, |v| {
            v.replicated_seq as f64
        }),
        ("drv_staging_lag_records", "Writes not yet at every replica.", Gauge, |v| v.lag_records as f64),
        ("drv_staging_lag_bytes", "Bytes not yet at every replica.", Gauge, |v| v.lag_bytes as f64),
        ("drv_staging_lag_seconds", "Age of the oldest write not yet at every replica.", Gauge, |v| v.lag_seconds),
        ("drv_staging_written_bytes_total", "Payload bytes made durable in the WRL since start.", Counter, |v| {
            v.written_bytes as f64
        }),
        (
            "drv_staging_replicated_bytes_total",
            "Payload bytes made durable on every replica since start.",
            Counter,
            |v| v.replicated_bytes as f64,
        ),
    ];
    for (name, help, kind, f) in per_volume {
        e.family(name, kind, help, s.volumes.iter().map(|v| (vol(v), f(v))));
    }
    let links = || s.volumes.iter().flat_map(|v| v.replicas.iter().map(move |r| (v, r)));
    let link = |v: &drv_proto::status::StagingVolume, r: &drv_proto::status::ReplicaLink| {
        vec![("volume", v.name.clone()), ("replica", r.replica.clone())]
    };
    e.family(
        "drv_staging_relay_connected",
        Gauge,
        "1 while the relay of the volume to the replica is connected.",
        links().map(|(v, r)| (link(v, r), flag(r.connected))),
    );
    e.family(
        "drv_staging_relay_sent_seq",
        Gauge,
        "The last write sent to the replica.",
        links().map(|(v, r)| (link(v, r), r.sent_seq as f64)),
    );
    e.family(
        "drv_staging_relay_durable_seq",
        Gauge,
        "The last write the replica holds durably.",
        links().map(|(v, r)| (link(v, r), r.durable_seq as f64)),
    );
    e.family(
        "drv_staging_relay_applied_seq",
        Gauge,
        "The last write the replica applied to its image.",
        links().map(|(v, r)| (link(v, r), r.applied_seq as f64)),
    );
    e.family(
        "drv_staging_relay_reconnects_total",
        Counter,
        "Times the relay to the replica reconnected.",
        links().map(|(v, r)| (link(v, r), r.reconnects as f64)),
    );
    e.family(
        "drv_staging_relay_waiting_full_sync",
        Gauge,
        "1 while the replica holds nothing and waits for an initial sync from the agent.",
        links().map(|(v, r)| (link(v, r), flag(r.waiting_full_sync))),
    );
    wrls(&mut e, s);
    e.finish()
}

fn wrls(e: &mut Exposition, s: &StagingStatus) {
    let w = |x: &drv_proto::status::WrlSummary| vec![("wrl", x.wrl.clone())];
    let seg = |x: &drv_proto::status::WrlSummary| x.used_segments as f64;
    e.family(
        "drv_wrl_used_segments",
        Gauge,
        "Segments of the WRL holding records.",
        s.wrls.iter().map(|x| (w(x), seg(x))),
    );
    e.family(
        "drv_wrl_segments",
        Gauge,
        "Segments of the WRL in all.",
        s.wrls.iter().map(|x| (w(x), x.total_segments as f64)),
    );
    e.family(
        "drv_wrl_used_ratio",
        Gauge,
        "Fill of the WRL (used segments / segments).",
        s.wrls.iter().map(|x| (w(x), seg(x) / (x.total_segments.max(1) as f64))),
    );
    e.family(
        "drv_wrl_cache_bytes",
        Gauge,
        "Bytes of records the WRL keeps in memory for the relay.",
        s.wrls.iter().map(|x| (w(x), x.cache_bytes as f64)),
    );
    e.family(
        "drv_wrl_appends_total",
        Counter,
        "Records appended to the WRL.",
        s.wrls.iter().map(|x| (w(x), x.appends as f64)),
    );
    e.family(
        "drv_wrl_batches_total",
        Counter,
        "Batches written to the WRL (one durable write each).",
        s.wrls.iter().map(|x| (w(x), x.batches as f64)),
    );
    e.family(
        "drv_wrl_reads_total",
        Counter,
        "Records the relay read back, from memory or from the disk.",
        s.wrls.iter().flat_map(|x| {
            let at = |from: &str| vec![("wrl", x.wrl.clone()), ("from", from.to_owned())];
            [(at("cache"), x.cache_reads as f64), (at("disk"), x.disk_reads as f64)]
        }),
    );
    e.family(
        "drv_wrl_failed",
        Gauge,
        "1 if the WRL stopped taking writes (see drv status).",
        s.wrls.iter().map(|x| (w(x), flag(x.failed.is_some()))),
    );
}

const STATES: [VolumeState; 5] = [
    VolumeState::Replicating,
    VolumeState::Resyncing,
    VolumeState::MediaResync,
    VolumeState::Error,
    VolumeState::FailedOver,
];

/// A replica server's figures.
pub fn replica(s: &ReplicaStatus) -> String {
    type V = drv_proto::status::ReplicaVolume;
    let mut e = Exposition::default();
    e.one("drv_replica_uptime_seconds", Gauge, "Seconds since the replica server started.", s.uptime_seconds);
    e.one("drv_replica_peers", Gauge, "Staging servers connected now.", s.peers.len() as f64);
    let vol = |v: &V| vec![("volume", v.name.clone())];
    e.family(
        "drv_replica_volume_state",
        Gauge,
        "1 for the state the volume is in (replicating, resyncing, media-resync, error, failed-over).",
        s.volumes.iter().flat_map(|v| {
            STATES
                .iter()
                .map(move |st| (vec![("volume", v.name.clone()), ("state", st.to_string())], flag(v.state == *st)))
        }),
    );
    let per_volume: [PerVolume<V>; 9] = [
        ("drv_replica_received_seq", "The last write of the volume received.", Gauge, |v| v.received_seq as f64),
        ("drv_replica_durable_seq", "The last write durable in the DR log.", Gauge, |v| v.durable_seq as f64),
        ("drv_replica_applied_seq", "The last write applied to the image.", Gauge, |v| v.applied_seq as f64),
        ("drv_replica_applied_epoch", "The last epoch applied whole.", Gauge, |v| v.applied_epoch as f64),
        ("drv_replica_apply_lag_records", "Writes logged and not yet applied.", Gauge, |v| v.apply_lag_records as f64),
        ("drv_replica_pending_records", "Writes waiting for their epoch to complete.", Gauge, |v| {
            v.pending_records as f64
        }),
        ("drv_replica_applied_units_total", "Epochs applied.", Counter, |v| v.applied_units as f64),
        ("drv_replica_snapshots", "Snapshots of the volume.", Gauge, |v| v.snapshots.len() as f64),
        ("drv_replica_snapshot_store_bytes", "Bytes the snapshot store holds.", Gauge, |v| {
            v.snapshot_store_bytes as f64
        }),
    ];
    for (name, help, t, f) in per_volume {
        e.family(name, t, help, s.volumes.iter().map(|v| (vol(v), f(v))));
    }
    e.family(
        "drv_replica_recovery_check_ok",
        Gauge,
        "1 if the newest recovery check of the volume found every filesystem clean.",
        s.volumes.iter().filter_map(|v| v.last_check.as_ref().map(|c| (vol(v), flag(c.ok)))),
    );
    e.family(
        "drv_replica_recovery_check_timestamp_seconds",
        Gauge,
        "When the newest recovery check of the volume started (Unix time).",
        s.volumes.iter().filter_map(|v| v.last_check.as_ref().map(|c| (vol(v), c.started_unix as f64))),
    );
    e.finish()
}

/// An agent's figures (one agent per volume).
pub fn agent(volume: &str, s: &drv_agent::AgentStatus) -> String {
    let mut e = Exposition::default();
    let l = || vec![("volume", volume.to_owned())];
    use drv_proto::agent::Mode;
    e.family(
        "drv_agent_mode",
        Gauge,
        "1 for the mode the agent is in (sync, change-map, resyncing).",
        [Mode::Sync, Mode::ChangeMap, Mode::Resyncing]
            .map(|m| (vec![("volume", volume.to_owned()), ("mode", m.to_string())], flag(s.mode == m))),
    );
    let per_volume: [PerVolume<drv_agent::AgentStatus>; 8] = [
        ("drv_agent_problem", "1 while something needs the operator (see drv agent status).", Gauge, |s| {
            flag(s.problem.is_some())
        }),
        ("drv_agent_volume_bytes", "Size of the volume.", Gauge, |s| s.volume_bytes as f64),
        ("drv_agent_next_seq", "The sequence number the next write gets.", Gauge, |s| s.next_seq as f64),
        ("drv_agent_epoch", "The current epoch.", Gauge, |s| s.epoch as f64),
        ("drv_agent_dirty_bytes", "Bytes marked in the change map (to resync).", Gauge, |s| s.dirty_bytes as f64),
        ("drv_agent_writes_total", "Writes sent to staging.", Counter, |s| s.writes as f64),
        ("drv_agent_mapped_writes_total", "Writes only marked in the change map.", Counter, |s| s.mapped_writes as f64),
        ("drv_agent_resync_bytes_total", "Bytes sent by resyncs.", Counter, |s| s.resync_bytes as f64),
    ];
    for (name, help, t, f) in per_volume {
        e.family(name, t, help, [(l(), f(s))]);
    }
    e.finish()
}

/// A config server's figures: its view of the group and the components that reported to it.
pub fn config(s: &drv_configd::api::ServerStatus, components: &[drv_configd::api::ComponentState]) -> String {
    let mut e = Exposition::default();
    e.one("drv_config_version", Gauge, "The configuration version this server has applied.", s.version as f64);
    e.one("drv_config_term", Gauge, "The raft term.", s.term as f64);
    e.one("drv_config_leader", Gauge, "1 while this server is the leader.", flag(s.state == "leader"));
    e.one("drv_config_has_leader", Gauge, "1 while this server knows a leader.", flag(s.leader.is_some()));
    e.one("drv_config_last_log_index", Gauge, "The last raft log index.", s.last_log_index.unwrap_or(0) as f64);
    e.one(
        "drv_config_snapshot_index",
        Gauge,
        "The last log index in a snapshot.",
        s.snapshot_index.unwrap_or(0) as f64,
    );
    e.family(
        "drv_config_members",
        Gauge,
        "Servers of the group, voters and learners.",
        [true, false].map(|v| {
            (
                vec![("kind", if v { "voter" } else { "learner" }.to_owned())],
                s.members.iter().filter(|m| m.voter == v).count() as f64,
            )
        }),
    );
    let c = |x: &drv_configd::api::ComponentState| vec![("component", x.component.clone()), ("role", x.role.clone())];
    e.family(
        "drv_config_component_version",
        Gauge,
        "The configuration version a component reported it runs.",
        components.iter().map(|x| (c(x), x.version as f64)),
    );
    e.family(
        "drv_config_component_pending_changes",
        Gauge,
        "Changes a component reported waiting for its restart.",
        components.iter().map(|x| (c(x), x.pending.len() as f64)),
    );
    e.family(
        "drv_config_component_report_timestamp_seconds",
        Gauge,
        "When the component last reported to this server (Unix time).",
        components.iter().map(|x| (c(x), x.reported_unix_ms as f64 / 1e3)),
    );
    e.finish()
}

/// What a component reports of itself to the config servers (`follow.rs`): the figures the
/// web UI's overview, graphs and alerts read, by volume (`""`: the component itself).
pub mod figures {
    use drv_configd::api::Figures;
    use drv_proto::status::{ReplicaStatus, StagingStatus, VolumeState};

    fn put(f: &mut Figures, volume: &str, name: &str, v: f64) {
        f.entry(volume.to_owned()).or_default().insert(name.to_owned(), v);
    }

    pub fn staging(s: &StagingStatus) -> Figures {
        let mut f = Figures::new();
        for v in &s.volumes {
            put(&mut f, &v.name, "received_seq", v.received_seq as f64);
            put(&mut f, &v.name, "durable_seq", v.durable_seq as f64);
            put(&mut f, &v.name, "replicated_seq", v.replicated_seq as f64);
            put(&mut f, &v.name, "lag_records", v.lag_records as f64);
            put(&mut f, &v.name, "lag_bytes", v.lag_bytes as f64);
            put(&mut f, &v.name, "lag_seconds", v.lag_seconds);
            put(&mut f, &v.name, "written_bytes", v.written_bytes as f64);
            put(&mut f, &v.name, "paused", if v.paused { 1.0 } else { 0.0 });
            put(&mut f, &v.name, "replicated_bytes", v.replicated_bytes as f64);
            let down = v.replicas.iter().filter(|r| !r.connected).count();
            put(&mut f, &v.name, "replicas_disconnected", down as f64);
        }
        for w in &s.wrls {
            put(
                &mut f,
                "",
                &format!("wrl_used_ratio:{}", w.wrl),
                w.used_segments as f64 / w.total_segments.max(1) as f64,
            );
            put(&mut f, "", &format!("wrl_failed:{}", w.wrl), if w.failed.is_some() { 1.0 } else { 0.0 });
        }
        f
    }

    pub fn replica(s: &ReplicaStatus) -> Figures {
        let mut f = Figures::new();
        for v in &s.volumes {
            let state = match v.state {
                VolumeState::Replicating => 0.0,
                VolumeState::Resyncing => 1.0,
                VolumeState::MediaResync => 2.0,
                VolumeState::Error => 3.0,
                VolumeState::FailedOver => 4.0,
            };
            put(&mut f, &v.name, "state", state);
            put(&mut f, &v.name, "applied_seq", v.applied_seq as f64);
            put(&mut f, &v.name, "apply_lag_records", v.apply_lag_records as f64);
            put(&mut f, &v.name, "snapshot_store_bytes", v.snapshot_store_bytes as f64);
            if let Some(c) = &v.last_check {
                put(&mut f, &v.name, "check_ok", if c.ok { 1.0 } else { 0.0 });
                put(&mut f, &v.name, "check_unix", c.started_unix as f64);
            }
        }
        f
    }

    /// A replica's snapshots and retention window by volume (the newest 100 snapshots; the
    /// window without its list of flush points), for the volume pages.
    pub fn replica_details(s: &ReplicaStatus) -> drv_configd::api::Details {
        s.volumes
            .iter()
            .map(|v| {
                let snaps: Vec<serde_json::Value> = v
                    .snapshots
                    .iter()
                    .rev()
                    .take(100)
                    .map(|x| {
                        serde_json::json!({
                            "name": x.name, "seq": x.seq, "created_unix": x.created_unix,
                            "capture_unix": x.capture_unix,
                            "check_ok": x.check.as_ref().map(|c| c.ok),
                            "check_unix": x.check.as_ref().map(|c| c.started_unix),
                        })
                    })
                    .collect();
                let window = v.window.as_ref().map(|w| {
                    serde_json::json!({
                        "oldest": w.oldest, "newest": w.newest, "points": w.points, "flush_points": w.flush_count,
                    })
                });
                (v.name.clone(), serde_json::json!({ "snapshots": snaps, "window": window }))
            })
            .collect()
    }

    pub fn agent(volume: &str, s: &drv_agent::AgentStatus) -> Figures {
        use drv_proto::agent::Mode;
        let mut f = Figures::new();
        let mode = match s.mode {
            Mode::Sync => 0.0,
            Mode::ChangeMap => 1.0,
            Mode::Resyncing => 2.0,
        };
        put(&mut f, volume, "mode", mode);
        put(&mut f, volume, "problem", if s.problem.is_some() { 1.0 } else { 0.0 });
        put(&mut f, volume, "next_seq", s.next_seq as f64);
        put(&mut f, volume, "dirty_bytes", s.dirty_bytes as f64);
        put(&mut f, volume, "writes", s.writes as f64);
        put(&mut f, volume, "resync_bytes", s.resync_bytes as f64);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Labels are escaped, families without samples are left out, numbers are written as
    /// Prometheus reads them.
    #[test]
    fn the_text_format() {
        let mut e = Exposition::default();
        e.family("a_total", Counter, "A\\b\nc.", [(vec![("v", "x\"y\\z\nw".to_owned())], 3.0)]);
        e.family("empty", Gauge, "never", std::iter::empty());
        e.one("b", Gauge, "B.", 0.25);
        e.one("c", Gauge, "C.", f64::INFINITY);
        assert_eq!(
            e.finish(),
            "# HELP a_total A\\\\b\\nc.\n# TYPE a_total counter\na_total{v=\"x\\\"y\\\\z\\nw\"} 3\n\
             # HELP b B.\n# TYPE b gauge\nb 0.25\n# HELP c C.\n# TYPE c gauge\nc +Inf\n"
        );
    }
}
