//! The pages of the web UI (see `mod.rs` for the list).

use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use drv_config::{Kind, Op, Volume};
use maud::{Markup, html};
use serde::Deserialize;

use super::html::{self, bytes, secs, utc};
use super::{EVENT_STREAMS, EventResult, PageUser, error_page};
use crate::api::Api;
use crate::auth::{Sight, Who};
use crate::monitor::{ComponentRow, Overview, VolumeRow};
use crate::series::TIERS;

/// The volumes `sight` may see, at risk first.
fn visible<'a>(o: &'a Overview, sight: &Sight) -> Vec<&'a VolumeRow> {
    let mut rows: Vec<&VolumeRow> = o.volumes.iter().filter(|v| sight.volume(&v.name)).collect();
    rows.sort_by(|a, b| b.health.cmp(&a.health).then_with(|| a.name.cmp(&b.name)));
    rows
}

/// The components `sight` may see: all for an admin, else those that serve a visible volume
/// (without their changes waiting for a restart, which may name other volumes).
fn visible_components(o: &Overview, sight: &Sight, rows: &[&VolumeRow]) -> Vec<ComponentRow> {
    o.components
        .iter()
        .filter(|c| {
            sight.is_admin()
                || rows.iter().any(|v| {
                    v.staging == c.name
                        || v.replicas.iter().any(|r| r.name == c.name)
                        || c.name.rsplit_once('/').is_some_and(|(_, vol)| vol == v.name)
                })
        })
        .map(|c| ComponentRow { pending: if sight.is_admin() { c.pending.clone() } else { Vec::new() }, ..c.clone() })
        .collect()
}

/// The overview's counts: open alerts, volumes at risk, with warnings, fine.
/// The open alerts (not acknowledged) of the volumes `sight` may see.
fn open_alerts(api: &Api, sight: &Sight) -> usize {
    api.alerts
        .list(|r| r.resolved_unix_ms.is_none() && r.acked_by.is_none() && sight.volume(&r.volume), 10_000)
        .map_or(0, |a| a.len())
}

fn summary(open_alerts: usize, rows: &[&VolumeRow]) -> Markup {
    use crate::monitor::Health;
    let count = |h| rows.iter().filter(|v| v.health == h).count();
    html! {
        div { a href="/alerts" { strong { (open_alerts) } " open alerts" } }
        div { strong { (count(Health::Bad)) } " at risk" }
        div { strong { (count(Health::Warn)) } " warnings" }
        div { strong { (count(Health::Ok)) } " ok" }
    }
}

pub async fn overview(State(api): State<Api>, page: PageUser) -> Markup {
    let o = api.overview.borrow().clone();
    overview_page(&o, &page.sight, open_alerts(&api, &page.sight), &page.viewer())
}

/// The overview page of `o` as `sight` sees it (the handler's, and the benchmark's).
pub fn overview_page(o: &Overview, sight: &Sight, open_alerts: usize, viewer: &html::Viewer) -> Markup {
    let rows = visible(o, sight);
    let comps = visible_components(o, sight, &rows);
    let body = html! {
        div data-events="/events?page=overview" {
            h1 { "Overview" }
            div.summary #summary { (summary(open_alerts, &rows)) }
            p.live #live {
                @if o.time_unix_ms == 0 { "the first overview comes within 10 s" }
                @else { "as of " (utc(o.time_unix_ms / 1000)) " (configuration version " (o.version) ")" }
            }
            h2 { "Volumes" }
            table { thead { (html::volume_head()) } tbody #volumes { (html::volume_rows(&rows)) } }
            h2 { "Components" }
            table {
                thead { tr { th { "Component" } th { "Role" } th { "Last heard" } th { "Config version" } th { "Waiting for a restart" } th { "Reports to" } } }
                tbody #components { (html::component_rows(&comps, o.time_unix_ms)) }
            }
        }
    };
    html::layout("Overview", Some(viewer), body)
}

/// A graph range: its name, its length in seconds and the tier it reads.
fn range_of(r: Option<&str>) -> (&'static str, u64, usize) {
    match r {
        Some("day") => ("day", 86_400, 0),
        Some("week") => ("week", 7 * 86_400, 1),
        _ => ("hour", 3600, 0),
    }
}

/// At most this many points per line: a finer series is thinned to the largest of each bucket.
const POINTS: usize = 720;

fn thin(p: Vec<(u64, f64)>) -> Vec<(u64, f64)> {
    if p.len() <= POINTS {
        return p;
    }
    let per = p.len().div_ceil(POINTS);
    p.chunks(per).map(|c| (c[0].0, c.iter().map(|x| x.1).fold(f64::MIN, f64::max))).collect()
}

fn charts(api: &Api, volume: &str, range: Option<&str>, now: u64) -> Markup {
    let (name, len, tier) = range_of(range);
    let from = now.saturating_sub(len);
    let read = |s: &str| thin(api.series.read(&format!("{volume}/{s}"), tier, from, now).unwrap_or_default());
    let rate = |v: f64| format!("{}/s", bytes(v));
    html! {
        p {
            "Range: "
            @for r in ["hour", "day", "week"] {
                @if r == name { strong { (r) } } @else { a href={"?range=" (r)} { (r) } }
                " "
            }
            span.muted { "(" (TIERS[tier].step) " s steps)" }
        }
        div.charts {
            (html::chart("Write and relay rate", &[("written", read("write_bps")), ("relayed", read("relay_bps"))], from, now, rate))
            (html::chart("Replica lag and RPO", &[("lag", read("lag_seconds")), ("RPO", read("rpo_seconds"))], from, now, secs))
            (html::chart("Dirty bytes (change map)", &[("dirty", read("dirty_bytes"))], from, now, bytes))
            (html::chart("Bytes not yet at every replica", &[("lag", read("lag_bytes"))], from, now, bytes))
        }
    }
}

fn status_table(v: &VolumeRow) -> Markup {
    html! {
        table {
            thead { (html::volume_head()) }
            tbody { (html::volume_rows(&[v])) }
        }
        p.muted {
            "Write rate " (v.write_bps.map_or("-".into(), |b| format!("{}/s", bytes(b))))
            ", relay rate " (v.relay_bps.map_or("-".into(), |b| format!("{}/s", bytes(b))))
            ", bytes not yet at every replica " (v.lag_bytes.map_or("-".into(), bytes))
            ", WRL " (v.wrl) " at staging " (v.staging) "."
        }
    }
}

#[derive(Deserialize)]
pub struct VolumeQuery {
    range: Option<String>,
}

/// The settings of a volume on its page's form (an operator may change them; `paused` and
/// `resync` are the operations' buttons).
const SETTINGS: [&str; 5] = ["bwlimit", "retention", "retention_bytes", "check_interval", "snapshot_bytes_limit"];

/// The fields of a volume an operator may change, as the form shows them.
fn setting(v: &Volume, field: &str) -> String {
    let size = |b: Option<u64>| b.map(|b| b.to_string()).unwrap_or_default();
    let dur = |d: Option<u64>| d.map(|d| format!("{d}s")).unwrap_or_default();
    match field {
        "bwlimit" => size(v.bwlimit),
        "retention" => dur(v.retention),
        "retention_bytes" => size(v.retention_bytes),
        "check_interval" => dur(v.check_interval),
        "snapshot_bytes_limit" => size(v.snapshot_bytes_limit),
        _ => String::new(),
    }
}

pub async fn volume(
    State(api): State<Api>,
    page: PageUser,
    Path(name): Path<String>,
    Query(q): Query<VolumeQuery>,
) -> Response {
    // A volume the user may not see does not exist for them.
    let v: Volume = match api.state.store().get_typed(Kind::Volume, &name) {
        Ok(v) if page.sight.volume(&name) => v,
        _ => return error_page(StatusCode::NOT_FOUND, Some(&page), &format!("no volume named {name:?}")),
    };
    let version = api
        .state
        .store()
        .entries(&[Kind::Volume], Some(&name))
        .ok()
        .and_then(|(_, rows)| rows.first().map(|r| r.version))
        .unwrap_or(0);
    let o = api.overview.borrow().clone();
    let row = o.volumes.iter().find(|r| r.name == name).cloned();
    let now = drv_config::now_unix_ms() / 1000;
    let history: Vec<drv_config::LogRecord> = api
        .state
        .store()
        .newest(2000)
        .map(|r| page.sight.records(r))
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.ops.iter().any(|op| matches!(op, Op::Set { kind: Kind::Volume, name: n, .. } | Op::Delete { kind: Kind::Volume, name: n, .. } if *n == name)))
        .rev()
        .take(50)
        .collect();
    let events = format!("/events?page=volume&volume={name}&range={}", range_of(q.range.as_deref()).0);
    let replica = v.replicas.first().cloned().unwrap_or_default();
    let body = html! {
        div data-events=(events) {
            h1 { "Volume " (name) }
            div.live #live { "as of " (utc(o.time_unix_ms / 1000)) }
            div #status {
                @if let Some(r) = &row { (status_table(r)) } @else { p { "Not in the overview yet (it comes within 10 s)." } }
            }
            h2 { "Graphs" }
            div #charts { (charts(&api, &name, q.range.as_deref(), now)) }
        }
        h2 { "Snapshots and points in time" }
        @if let Some(r) = &row { (recovery(r)) }
        p { "Run these on the replica host (" (v.replicas.join(", ")) "):" }
        pre {
            "drv snapshot points " (name) "                       # what can be brought back\n"
            "drv snapshot create " (name) " SNAP [--at -15m]      # copy-on-write, costs nothing until overwritten\n"
            "drv snapshot check " (name) " SNAP                   # prove it mounts (fsck on a private overlay)\n"
            "drv snapshot mount " (name) " SNAP [--writable]      # a block device on the replica host\n"
            "drv snapshot export " (name) " SNAP --listen 127.0.0.1:10809   # nbd://HOST:10809/SNAP\n"
            "drv restore " (name) " SNAP --to /dev/sdX            # onto a local disk, usable at once\n"
            "drv failover " (name) " --test                       # a drill: a writable copy, replication goes on"
        }
        p.muted { "Replica " (replica) " keeps the snapshots; " code { "drv snapshot list " (name) } " lists them." }
        h2 { "Operations" }
        @if page.sight.may_operate(&name) {
            p {
                (op_form(&page, &name, version, if v.paused { "paused=false" } else { "paused=true" },
                    if v.paused { "Resume replication" } else { "Pause replication" }))
                " "
                (op_form(&page, &name, version, &format!("resync={}", v.resync + 1), "Resync the whole volume"))
            }
            p.muted { "Pause: staging keeps logging writes but relays none until resumed. Resync: the agent sends every block again." }
        } @else {
            p.muted { @if v.paused { "Replication is paused. " } "You may view this volume; an operator of one of its sets may pause, resume or resync it." }
        }
        h2 { "Settings" }
        @if page.sight.may_operate(&name) {
            form method="post" action="/ui/set" {
                input type="hidden" name="csrf" value=(page.user.session.csrf);
                input type="hidden" name="kind" value="volume";
                input type="hidden" name="name" value=(name);
                input type="hidden" name="operator" value="1";
                table {
                    @for f in SETTINGS {
                        tr {
                            td { label for=(f) { (f) } }
                            td { input type="text" id=(f) name=(f) value=(setting(&v, f)) placeholder="none"; }
                        }
                    }
                }
                p { button type="submit" { "Save settings" } " " span.muted { "(empty: none; sizes like 50M, durations like 24h)" } }
            }
        } @else {
            table {
                @for f in SETTINGS {
                    tr { td { (f) } td { (setting(&v, f)) } }
                }
            }
            p.muted { "You may view this volume; an operator of one of its sets may change these." }
        }
        h2 { "Changes to this volume" }
        (history_table(&history))
    };
    html::layout(&format!("Volume {name}"), Some(&page.viewer()), body).into_response()
}

/// What each replica of a volume can bring back, as it reported: its retention window's oldest
/// and newest points, and its snapshots (newest first) with their recovery checks.
fn recovery(v: &VolumeRow) -> Markup {
    let when = |x: &serde_json::Value| x.as_u64().filter(|t| *t > 0).map_or("-".to_owned(), utc);
    html! {
        @for r in &v.replicas {
            h3 { "On " (r.name) }
            @let w = &r.details["window"];
            @if w.is_object() {
                p {
                    "Any point from seq " (w["oldest"]["seq"]) " (captured " (when(&w["oldest"]["capture_unix"])) ")"
                    " to seq " (w["newest"]["seq"]) " (captured " (when(&w["newest"]["capture_unix"])) "): "
                    (w["points"]) " points, " (w["flush_points"]) " of them after a cache flush."
                }
            } @else { p.muted { "No retention window (set the volume's retention for any point in time)." } }
            @let snaps = r.details["snapshots"].as_array().cloned().unwrap_or_default();
            @if snaps.is_empty() { p.muted { "No snapshots." } } @else {
                table {
                    thead { tr { th { "Snapshot" } th { "Point (seq)" } th { "Captured" } th { "Taken" } th { "Recovery check" } } }
                    tbody {
                        @for s in &snaps {
                            tr {
                                td { (s["name"].as_str().unwrap_or("?")) }
                                td.num { (s["seq"]) }
                                td { (when(&s["capture_unix"])) }
                                td { (when(&s["created_unix"])) }
                                td {
                                    @match s["check_ok"].as_bool() {
                                        Some(true) => { "clean " span.muted { (when(&s["check_unix"])) } }
                                        Some(false) => { strong { "FAILED " } span.muted { (when(&s["check_unix"])) } }
                                        None => { span.muted { "not checked" } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A one-button form that makes the change `assignment` to volume `name` (at `version`: a
/// second click after someone else's change is refused as stale, not applied twice).
fn op_form(page: &PageUser, name: &str, version: u64, assignment: &str, label: &str) -> Markup {
    html! {
        form.inline method="post" action="/ui/set" {
            input type="hidden" name="csrf" value=(page.user.session.csrf);
            input type="hidden" name="kind" value="volume";
            input type="hidden" name="name" value=(name);
            input type="hidden" name="if_version" value=(version);
            input type="hidden" name="assignments" value=(assignment);
            input type="hidden" name="back" value={"/volume/" (name)};
            button type="submit" { (label) }
        }
    }
}

fn history_table(records: &[drv_config::LogRecord]) -> Markup {
    html! {
        table {
            thead { tr { th { "Version" } th { "When" } th { "Who" } th { "Change" } } }
            tbody {
                @for r in records {
                    tr {
                        td.num { (r.version) }
                        td { (utc(r.time_unix_ms / 1000)) }
                        td { (r.author) }
                        td { @for op in &r.ops { code { (op) } br; } }
                    }
                }
            }
        }
    }
}

pub async fn activity(State(api): State<Api>, page: PageUser) -> Response {
    let me = format!("user:{}", page.user.name);
    let login = format!("login:{}", page.user.name);
    let all = page.sight.is_admin();
    let rows = match api.sessions.activity(500, |r| all || r.who == me || r.who == login) {
        Ok(r) => r,
        Err(e) => return error_page(StatusCode::INTERNAL_SERVER_ERROR, Some(&page), &e.to_string()),
    };
    let body = html! {
        h1 { "Activity" }
        p.muted {
            "Logins, changes and refusals seen by this config server (" (api.name) ")"
            @if !all { ", yours only" } ", newest first."
        }
        table {
            thead { tr { th { "When" } th { "Who" } th { "From" } th { "What" } th { "Detail" } } }
            tbody {
                @for r in rows.iter().rev() {
                    tr class=(if r.what == "refused" || r.what == "login_failed" { "warn" } else { "" }) {
                        td { (utc(r.time_unix_ms / 1000)) }
                        td { (r.who) }
                        td { (r.addr) }
                        td { (r.what) }
                        td { (r.detail) }
                    }
                }
            }
        }
    };
    html::layout("Activity", Some(&page.viewer()), body).into_response()
}

pub async fn history(State(api): State<Api>, page: PageUser) -> Response {
    let records = match api.state.store().newest(2000) {
        Ok(r) => page.sight.records(r),
        Err(e) => return error_page(StatusCode::INTERNAL_SERVER_ERROR, Some(&page), &e.to_string()),
    };
    let shown: Vec<_> = records.into_iter().rev().take(200).collect();
    let body = html! {
        h1 { "Change history" }
        p.muted { "The newest changes you may see (every config server holds the same history)." }
        (history_table(&shown))
    };
    html::layout("History", Some(&page.viewer()), body).into_response()
}

pub async fn alerts(State(api): State<Api>, page: PageUser) -> Response {
    let sight = &page.sight;
    let rows = match api.alerts.list(|r| sight.volume(&r.volume), 500) {
        Ok(r) => r,
        Err(e) => return error_page(StatusCode::INTERNAL_SERVER_ERROR, Some(&page), &e.to_string()),
    };
    let table = |state: &str| {
        let mine: Vec<&crate::alerts::AlertRecord> = rows.iter().filter(|r| r.state() == state).collect();
        html! {
            @if mine.is_empty() { p.muted { "None." } } @else {
                table {
                    thead { tr { th { "Alert" } th { "Volume" } th { "Rule" } th { "What" } th { "Fired" } th { "Acknowledged" } th { "Resolved" } th {} } }
                    tbody {
                        @for r in mine {
                            tr class=(match state { "open" => "bad", "acknowledged" => "warn", _ => "" }) {
                                td.num { (r.id) }
                                td { a href={"/volume/" (r.volume)} { (r.volume) } }
                                td { (r.rule) }
                                td { (r.message) }
                                td { (utc(r.fired_unix_ms / 1000)) }
                                td { @if let Some(by) = &r.acked_by { (by) } }
                                td { @if let Some(t) = r.resolved_unix_ms { (utc(t / 1000)) } }
                                td {
                                    @if state == "open" && sight.may_operate(&r.volume) {
                                        form.inline method="post" action="/ui/ack" {
                                            input type="hidden" name="csrf" value=(page.user.session.csrf);
                                            input type="hidden" name="id" value=(r.id);
                                            button type="submit" { "Acknowledge" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    let body = html! {
        h1 { "Alerts" }
        p.muted { "As this config server (" (api.name) ") saw them; rules are entries of kind alert." }
        h2 { "Open" } (table("open"))
        h2 { "Acknowledged" } (table("acknowledged"))
        h2 { "Resolved" } (table("resolved"))
    };
    html::layout("Alerts", Some(&page.viewer()), body).into_response()
}

#[derive(Deserialize)]
pub struct AckForm {
    csrf: String,
    id: u64,
}

pub async fn ack(State(api): State<Api>, page: PageUser, Form(f): Form<AckForm>) -> Response {
    if !page.csrf_ok(&f.csrf) {
        return error_page(StatusCode::FORBIDDEN, Some(&page), "the form did not carry this session's CSRF token");
    }
    let who = Who::User(page.user.clone());
    match crate::alerts::acknowledge(&api, &who, f.id).await {
        Ok(r) => {
            let body =
                html! { h1 { "Alert " (r.id) } div.msg.done { "Acknowledged." } p { a href="/alerts" { "Back" } } };
            html::layout("Alert", Some(&page.viewer()), body).into_response()
        }
        Err(e) => error_page(e.status, Some(&page), &e.error.message),
    }
}

/// An entry as `FIELD=VALUE` lines, as `drv config set` takes them (a user's password hash
/// left out: a new password is typed as `password=...`).
fn assignments(v: &serde_json::Value) -> String {
    let Some(obj) = v.as_object() else { return String::new() };
    obj.iter()
        .filter(|(k, _)| k.as_str() != "password_hash")
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub async fn config(State(api): State<Api>, page: PageUser) -> Response {
    if !page.sight.is_admin() {
        return error_page(StatusCode::FORBIDDEN, Some(&page), "only an admin may see the whole configuration");
    }
    let (version, rows) = match api.state.store().entries(&Kind::ALL, None) {
        Ok(x) => x,
        Err(e) => return error_page(StatusCode::INTERNAL_SERVER_ERROR, Some(&page), &e.to_string()),
    };
    let rows = page.sight.entries(rows);
    let csrf = &page.user.session.csrf;
    let body = html! {
        h1 { "Configuration" }
        p.muted {
            "Version " (version) ". Each entry is a list of FIELD=VALUE lines, as " code { "drv config set" } " takes them. "
            "A line taken out keeps its value: write FIELD=null to clear a field."
        }
        @for kind in Kind::ALL {
            h2 { (kind) "s" }
            table {
                thead { tr { th { "Name" } th { "Version" } th { "Fields" } th {} } }
                tbody {
                    @for r in rows.iter().filter(|r| r.kind == kind) {
                        tr {
                            td { (r.name) }
                            td.num { (r.version) }
                            td {
                                form method="post" action="/ui/set" {
                                    input type="hidden" name="csrf" value=(csrf);
                                    input type="hidden" name="kind" value=(kind);
                                    input type="hidden" name="name" value=(r.name);
                                    input type="hidden" name="if_version" value=(r.version);
                                    textarea name="assignments" aria-label={"fields of " (kind) " " (r.name)} { (assignments(&r.value)) }
                                    button type="submit" { "Save" }
                                }
                            }
                            td {
                                form method="post" action="/ui/delete" {
                                    input type="hidden" name="csrf" value=(csrf);
                                    input type="hidden" name="kind" value=(kind);
                                    input type="hidden" name="name" value=(r.name);
                                    button type="submit" { "Delete" }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "New entry" }
        form method="post" action="/ui/set" {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="if_version" value="0";
            p {
                select name="kind" aria-label="kind" { @for k in Kind::ALL { option value=(k) { (k) } } }
                " "
                input type="text" name="name" placeholder="name" aria-label="name" required;
            }
            textarea name="assignments" aria-label="fields" placeholder="size_bytes=10G\nwrl=w0\nreplicas=[\"rep1\"]\nkey=k1" {}
            button type="submit" { "Create" }
        }
    };
    html::layout("Configuration", Some(&page.viewer()), body).into_response()
}

#[derive(Deserialize)]
pub struct SetForm {
    csrf: String,
    kind: String,
    name: String,
    #[serde(default)]
    assignments: String,
    /// (Text: a flattened form reads every field as text.)
    if_version: Option<String>,
    /// The operator form of a volume page: its fields, each its own input.
    operator: Option<String>,
    /// Where the result page links back to.
    back: Option<String>,
    #[serde(flatten)]
    fields: std::collections::BTreeMap<String, String>,
}

/// What a form's change did, as a page.
async fn outcome(api: &Api, page: PageUser, ops: Vec<Op>, back: String) -> Response {
    let who = Who::User(page.user.clone());
    let uri = Uri::from_static("/ui/set");
    let r = crate::api::change(api, &who, drv_config::random_id(), ops, &uri).await;
    let (status, body) = match r {
        Ok(w) => (StatusCode::OK, html! { div.msg.done { "Done: configuration version " (w.version) "." } }),
        Err(f) => (f.status, html! { div.msg.error { "Refused: " (f.error.message) } }),
    };
    let body = html! { h1 { "Change" } (body) p { a href=(back) { "Back" } } };
    (status, html::layout("Change", Some(&page.viewer()), body)).into_response()
}

pub async fn set(State(api): State<Api>, page: PageUser, Form(f): Form<SetForm>) -> Response {
    if !page.csrf_ok(&f.csrf) {
        return error_page(StatusCode::FORBIDDEN, Some(&page), "the form did not carry this session's CSRF token");
    }
    let kind: Kind = match f.kind.parse() {
        Ok(k) => k,
        Err(e) => return error_page(StatusCode::UNPROCESSABLE_ENTITY, Some(&page), &e.to_string()),
    };
    let (assignments, back) = if f.operator.is_some() {
        // Only what changed: an empty field that was set becomes none.
        let current: Option<Volume> = api.state.store().get_typed(Kind::Volume, &f.name).ok();
        let mut a = Vec::new();
        for field in SETTINGS {
            let new = f.fields.get(field).map(|s| s.trim().to_owned()).unwrap_or_default();
            let old = current.as_ref().map(|v| setting(v, field)).unwrap_or_default();
            if new != old {
                a.push(if new.is_empty() { format!("{field}=null") } else { format!("{field}={new}") });
            }
        }
        (a, format!("/volume/{}", f.name))
    } else {
        let a = f.assignments.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
        (a, super::safe_next(f.back.as_deref().or(Some("/config"))))
    };
    if assignments.is_empty() {
        let body = html! { h1 { "Change" } div.msg.done { "Nothing changed." } p { a href=(back) { "Back" } } };
        return html::layout("Change", Some(&page.viewer()), body).into_response();
    }
    let if_version = match f.if_version.as_deref().map(str::parse::<u64>) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => return error_page(StatusCode::UNPROCESSABLE_ENTITY, Some(&page), &format!("if_version: {e}")),
    };
    let ops = vec![Op::Set { kind, name: f.name, assignments, if_version }];
    outcome(&api, page, ops, back).await
}

#[derive(Deserialize)]
pub struct DeleteForm {
    csrf: String,
    kind: String,
    name: String,
}

pub async fn delete(State(api): State<Api>, page: PageUser, Form(f): Form<DeleteForm>) -> Response {
    if !page.csrf_ok(&f.csrf) {
        return error_page(StatusCode::FORBIDDEN, Some(&page), "the form did not carry this session's CSRF token");
    }
    let kind: Kind = match f.kind.parse() {
        Ok(k) => k,
        Err(e) => return error_page(StatusCode::UNPROCESSABLE_ENTITY, Some(&page), &e.to_string()),
    };
    let ops = vec![Op::Delete { kind, name: f.name, if_version: None }];
    outcome(&api, page, ops, "/config".into()).await
}

#[derive(Deserialize)]
pub struct EventsQuery {
    page: Option<String>,
    volume: Option<String>,
    range: Option<String>,
}

/// Live-update streams now (at most [`EVENT_STREAMS`]).
static STREAMS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(EVENT_STREAMS);

/// An event that replaces the inside of element `id` with `html`: its data is the id, a line
/// break, then the HTML (no second encoding of a large fragment; a carriage return, which an
/// event cannot carry, becomes a space).
fn fragment(id: &str, html: Markup) -> EventResult {
    let mut data = String::with_capacity(id.len() + 1 + 4096);
    data.push_str(id);
    data.push('\n');
    data.push_str(&html.into_string().replace('\r', " "));
    Ok(Event::default().event("fragment").data(data))
}

/// The fragments of a page for `sight`, from the overview `o`.
pub fn fragments(api: &Api, sight: &Sight, q: &EventsQuery, o: &Overview) -> Vec<EventResult> {
    match (q.page.as_deref(), &q.volume) {
        (Some("volume"), Some(v)) if sight.volume(v) => {
            let now = o.time_unix_ms / 1000;
            let mut out = vec![fragment("charts", charts(api, v, q.range.as_deref(), now))];
            if let Some(row) = o.volumes.iter().find(|r| &r.name == v) {
                out.push(fragment("status", status_table(row)));
            }
            out.push(fragment("live", html! { "live, as of " (utc(now)) }));
            out
        }
        _ => overview_fragments(o, sight, open_alerts(api, sight)),
    }
}

/// One live update of the overview: its fragments, as the event stream sends them.
pub fn overview_fragments(o: &Overview, sight: &Sight, open_alerts: usize) -> Vec<EventResult> {
    let rows = visible(o, sight);
    let comps = visible_components(o, sight, &rows);
    vec![
        fragment("summary", summary(open_alerts, &rows)),
        fragment("volumes", html::volume_rows(&rows)),
        fragment("components", html::component_rows(&comps, o.time_unix_ms)),
        fragment(
            "live",
            html! { "live, as of " (utc(o.time_unix_ms / 1000)) " (configuration version " (o.version) ")" },
        ),
    ]
}

/// Live-update streams one user has open at most (so that one user cannot take them all).
pub const STREAMS_PER_USER: usize = 8;

/// Streams by user.
static USER_STREAMS: std::sync::Mutex<Option<std::collections::HashMap<String, usize>>> = std::sync::Mutex::new(None);

/// One of a user's streams: given back when the stream ends.
struct UserStream(String);

impl UserStream {
    fn take(user: &str) -> Option<UserStream> {
        let mut m = USER_STREAMS.lock().expect("streams");
        let n = m.get_or_insert_with(Default::default).entry(user.to_owned()).or_default();
        if *n >= STREAMS_PER_USER {
            return None;
        }
        *n += 1;
        Some(UserStream(user.to_owned()))
    }
}

impl Drop for UserStream {
    fn drop(&mut self) {
        let mut m = USER_STREAMS.lock().expect("streams");
        if let Some(map) = m.as_mut()
            && let Some(n) = map.get_mut(&self.0)
        {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.0);
            }
        }
    }
}

pub async fn events(State(api): State<Api>, page: PageUser, Query(q): Query<EventsQuery>) -> Response {
    let Some(mine) = UserStream::take(&page.user.name) else {
        let m =
            format!("{STREAMS_PER_USER} live-update streams of this user are open already (other tabs); close some");
        return (StatusCode::TOO_MANY_REQUESTS, m).into_response();
    };
    let Ok(permit) = STREAMS.try_acquire() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many live-update streams on this server; reload later")
            .into_response();
    };
    let permit = (permit, mine);
    let token = page.token.clone();
    let addr = page.user.addr;
    let rx = api.overview.clone();
    // Each update: the session is checked again (logged out, disabled: the stream ends) and the
    // user's sight read again (a grant taken away shows at once).
    let state = (api, rx, q, token, addr, Some(permit), true);
    let stream = futures_util::stream::unfold(state, |(api, mut rx, q, token, addr, permit, first)| async move {
        permit.as_ref()?;
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let o: Arc<Overview> = rx.borrow_and_update().clone();
        let user = match crate::auth::session_user(&api, &token, addr).await {
            Ok(u) => u,
            Err(_) => {
                let end = vec![Ok(Event::default().event("ended").data("the session ended"))];
                return Some((futures_util::stream::iter(end), (api, rx, q, token, addr, None, false)));
            }
        };
        let sight = match Who::User(user).sight(&api) {
            Ok(Some(s)) => s,
            _ => return None,
        };
        let frags = fragments(&api, &sight, &q, &o);
        Some((futures_util::stream::iter(frags), (api, rx, q, token, addr, permit, false)))
    });
    use futures_util::StreamExt;
    Sse::new(stream.flatten()).keep_alive(KeepAlive::default()).into_response()
}
