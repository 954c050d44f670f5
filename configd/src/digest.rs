//! The digest of a period (a week, a day): per volume the bytes written and replicated, the
//! peak and 99th percentile of lag and RPO (from the time series), the status of every volume
//! and component now, the recovery checks, and the period's alerts and activity, as text and
//! as HTML. `GET /v1/digest?period=week` gives it; `POST /v1/digest/send` mails it through a
//! mail server of the configuration (`drv digest`, run weekly by cron or a systemd timer).

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::{StatusCode, Uri};
use maud::{Markup, html};
use serde::{Deserialize, Serialize};

use crate::api::{Api, Failure, internal};
use crate::auth::Who;
use crate::monitor::{Health, Overview};
use crate::series::TIERS;
use crate::web::{bytes, secs, utc};

/// One volume's figures over the period.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeUsage {
    pub name: String,
    pub written_bytes: f64,
    pub replicated_bytes: f64,
    pub peak_lag_seconds: Option<f64>,
    pub p99_lag_seconds: Option<f64>,
    pub peak_rpo_seconds: Option<f64>,
    pub p99_rpo_seconds: Option<f64>,
    /// The share of the period with samples (a config server that was down has gaps).
    pub covered: f64,
}

/// A digest, rendered.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Digest {
    pub subject: String,
    pub text: String,
    pub html: String,
    pub from_unix: u64,
    pub to_unix: u64,
    pub volumes: Vec<VolumeUsage>,
}

/// The seconds of a period's name.
pub fn period_seconds(p: &str) -> Option<u64> {
    match p {
        "week" => Some(7 * 86_400),
        "day" => Some(86_400),
        _ => None,
    }
}

fn quantile(mut v: Vec<f64>, q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    Some(v[i])
}

/// Volume `name`'s usage from `from` to `to` (unix seconds): the fine tier where it still
/// holds samples (the last day), the coarse one before.
pub fn usage(api: &Api, name: &str, from: u64, to: u64) -> VolumeUsage {
    let fine_from = to.saturating_sub(TIERS[0].keep).max(from);
    let mut parts = vec![(0, fine_from, to)];
    if fine_from > from {
        parts.push((1, from, fine_from - 1));
    }
    let (mut written, mut replicated, mut lag, mut rpo, mut covered) = (0.0, 0.0, Vec::new(), Vec::new(), 0.0);
    for (tier, a, b) in parts {
        let step = TIERS[tier].step as f64;
        let read = |s: &str| api.series.read(&format!("{name}/{s}"), tier, a, b).unwrap_or_default();
        written += read("write_bps").iter().fold(0.0, |t, x| t + x.1 * step);
        replicated += read("relay_bps").iter().fold(0.0, |t, x| t + x.1 * step);
        lag.extend(read("lag_seconds").into_iter().map(|x| x.1));
        let r = read("rpo_seconds");
        covered += r.len() as f64 * step;
        rpo.extend(r.into_iter().map(|x| x.1));
    }
    VolumeUsage {
        name: name.to_owned(),
        written_bytes: written,
        replicated_bytes: replicated,
        peak_lag_seconds: lag.iter().copied().reduce(f64::max),
        p99_lag_seconds: quantile(lag, 0.99),
        peak_rpo_seconds: rpo.iter().copied().reduce(f64::max),
        p99_rpo_seconds: quantile(rpo, 0.99),
        covered: (covered / (to - from).max(1) as f64).min(1.0),
    }
}

/// The digest of the `period` ending now.
pub fn make(api: &Api, period: &str, now: u64) -> Result<Digest, Failure> {
    let len = period_seconds(period).ok_or_else(|| {
        Failure::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", format!("period {period:?}: use week or day"))
    })?;
    let from = now.saturating_sub(len);
    let o = api.overview.borrow().clone();
    let volumes: Vec<VolumeUsage> =
        crate::monitor::configured(api).map_err(internal)?.volumes.keys().map(|v| usage(api, v, from, now)).collect();
    let in_period = |t_ms: u64| t_ms / 1000 >= from;
    let alerts =
        api.alerts.list(|r| in_period(r.fired_unix_ms) || r.resolved_unix_ms.is_none(), 1000).map_err(internal)?;
    let activity = api.sessions.activity(100_000, |r| in_period(r.time_unix_ms)).map_err(internal)?;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for a in &activity {
        *counts.entry(a.what.as_str()).or_default() += 1;
    }
    let notable: Vec<&crate::sessions::ActivityRecord> = activity
        .iter()
        .filter(|a| ["change", "refused", "login_failed", "alert_acked"].contains(&a.what.as_str()))
        .collect();
    let at_risk = o.volumes.iter().filter(|v| v.health == Health::Bad).count();
    let subject = format!(
        "[drv] {} digest {} to {}: {} volumes, {} at risk, {} alerts",
        if period == "week" { "weekly" } else { "daily" },
        &utc(from)[..10],
        &utc(now)[..10],
        o.volumes.len(),
        at_risk,
        alerts.len()
    );
    let text = text(&subject, &volumes, &o, &alerts, &counts, &notable);
    let html = page(&subject, &volumes, &o, &alerts, &counts, &notable).into_string();
    Ok(Digest { subject, text, html, from_unix: from, to_unix: now, volumes })
}

fn opt(v: Option<f64>, f: fn(f64) -> String) -> String {
    v.map_or_else(|| "-".into(), f)
}

fn text(
    subject: &str,
    volumes: &[VolumeUsage],
    o: &Overview,
    alerts: &[crate::alerts::AlertRecord],
    counts: &BTreeMap<&str, usize>,
    notable: &[&crate::sessions::ActivityRecord],
) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let _ = writeln!(t, "{subject}\n\nUSAGE");
    let _ = writeln!(
        t,
        "{:<24} {:>12} {:>12} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "volume", "written", "replicated", "peak lag", "p99 lag", "peak RPO", "p99 RPO", "covered"
    );
    for v in volumes {
        let _ = writeln!(
            t,
            "{:<24} {:>12} {:>12} {:>10} {:>10} {:>10} {:>10} {:>7.0}%",
            v.name,
            bytes(v.written_bytes),
            bytes(v.replicated_bytes),
            opt(v.peak_lag_seconds, secs),
            opt(v.p99_lag_seconds, secs),
            opt(v.peak_rpo_seconds, secs),
            opt(v.p99_rpo_seconds, secs),
            v.covered * 100.0
        );
    }
    let _ = writeln!(t, "\nSTATUS NOW");
    for v in &o.volumes {
        let checks: Vec<String> = v
            .replicas
            .iter()
            .map(|r| match (r.check_ok, r.check_unix) {
                (Some(ok), Some(at)) => format!("{} {} at {}", r.name, if ok { "ok" } else { "FAILED" }, utc(at)),
                _ => format!("{} no check", r.name),
            })
            .collect();
        let _ = writeln!(t, "{:<24} {:?} {} ; checks: {}", v.name, v.health, v.mode, checks.join(", "));
        for p in &v.problems {
            let _ = writeln!(t, "{:<24}   - {p}", "");
        }
    }
    for c in &o.components {
        let heard = c.last_heard_unix_ms.map_or("never".into(), |ms| utc(ms / 1000));
        let _ =
            writeln!(t, "{:<24} {} last heard {}{}", c.name, c.role, heard, if c.silent { " (SILENT)" } else { "" });
    }
    let _ = writeln!(t, "\nALERTS ({})", alerts.len());
    for a in alerts {
        let _ = writeln!(t, "{} {:<12} {} {}: {}", utc(a.fired_unix_ms / 1000), a.state(), a.volume, a.rule, a.message);
    }
    let _ = writeln!(t, "\nACTIVITY");
    for (what, n) in counts {
        let _ = writeln!(t, "{what}: {n}");
    }
    for a in notable.iter().rev().take(50) {
        let _ = writeln!(t, "{} {} {} {}", utc(a.time_unix_ms / 1000), a.who, a.what, a.detail);
    }
    t
}

fn page(
    subject: &str,
    volumes: &[VolumeUsage],
    o: &Overview,
    alerts: &[crate::alerts::AlertRecord],
    counts: &BTreeMap<&str, usize>,
    notable: &[&crate::sessions::ActivityRecord],
) -> Markup {
    html! {
        html { body style="font-family: sans-serif" {
            h2 { (subject) }
            h3 { "Usage" }
            table border="1" cellpadding="4" cellspacing="0" {
                tr { th { "Volume" } th { "Written" } th { "Replicated" } th { "Peak lag" } th { "p99 lag" } th { "Peak RPO" } th { "p99 RPO" } th { "Covered" } }
                @for v in volumes {
                    tr {
                        td { (v.name) } td { (bytes(v.written_bytes)) } td { (bytes(v.replicated_bytes)) }
                        td { (opt(v.peak_lag_seconds, secs)) } td { (opt(v.p99_lag_seconds, secs)) }
                        td { (opt(v.peak_rpo_seconds, secs)) } td { (opt(v.p99_rpo_seconds, secs)) }
                        td { (format!("{:.0}%", v.covered * 100.0)) }
                    }
                }
            }
            h3 { "Status now" }
            table border="1" cellpadding="4" cellspacing="0" {
                tr { th { "Volume" } th { "Health" } th { "Mode" } th { "Recovery checks" } th { "Why" } }
                @for v in &o.volumes {
                    tr {
                        td { (v.name) } td { (format!("{:?}", v.health)) } td { (v.mode) }
                        td { @for r in &v.replicas {
                            (r.name) ": " @match (r.check_ok, r.check_unix) {
                                (Some(true), Some(at)) => { "ok " (utc(at)) }
                                (Some(false), Some(at)) => { b { "FAILED " } (utc(at)) }
                                _ => { "none" }
                            } br;
                        } }
                        td { @for p in &v.problems { (p) br; } }
                    }
                }
            }
            ul { @for c in &o.components {
                li { (c.name) " (" (c.role) "): last heard " (c.last_heard_unix_ms.map_or("never".into(), |ms| utc(ms / 1000))) @if c.silent { b { " SILENT" } } }
            } }
            h3 { "Alerts (" (alerts.len()) ")" }
            ul { @for a in alerts { li { (utc(a.fired_unix_ms / 1000)) " " (a.state()) " " b { (a.volume) } " " (a.rule) ": " (a.message) } } }
            h3 { "Activity" }
            p { @for (what, n) in counts { (what) ": " (n) br; } }
            ul { @for a in notable.iter().rev().take(50) { li { (utc(a.time_unix_ms / 1000)) " " (a.who) " " (a.what) " " (a.detail) } } }
        } }
    }
}

#[derive(Deserialize)]
struct DigestQuery {
    period: Option<String>,
}

/// Admins only (the digest covers every volume).
fn admin(api: &Api, who: &Who) -> Result<(), Failure> {
    who.admin(api, &[drv_transport::Role::Admin])
}

async fn get(State(api): State<Api>, who: Who, Query(q): Query<DigestQuery>) -> Result<axum::Json<Digest>, Failure> {
    admin(&api, &who)?;
    let period = q.period.unwrap_or_else(|| "week".into());
    make(&api, &period, drv_config::now_unix_ms() / 1000).map(axum::Json)
}

/// A digest to mail.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    #[serde(default = "week")]
    pub period: String,
    pub to: Vec<String>,
    /// The mail server entry (none: the only one there is).
    #[serde(default)]
    pub mail: Option<String>,
}

fn week() -> String {
    "week".into()
}

/// What a sent digest says.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sent {
    pub subject: String,
    pub to: Vec<String>,
    pub mail_server: String,
}

async fn send(
    State(api): State<Api>,
    who: Who,
    _uri: Uri,
    b: Result<bytes::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::Json<Sent>, Failure> {
    admin(&api, &who)?;
    let req: SendRequest = crate::api::body(b)?;
    let bad = |m: String| Failure::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m);
    if req.to.is_empty() || req.to.len() > 32 {
        return Err(bad("a digest goes to 1 to 32 addresses (--to ADDR)".into()));
    }
    if let Some(a) = req.to.iter().find(|a| !drv_config::is_mail_address(a)) {
        return Err(bad(format!("{a:?} is not a mail address")));
    }
    let servers = crate::monitor::configured(&api).map_err(internal)?.mail;
    let name = match &req.mail {
        Some(n) => n.clone(),
        None if servers.len() == 1 => servers.keys().next().cloned().expect("one"),
        None => {
            return Err(bad(format!(
                "there are {} mail servers in the configuration: name one (--mail NAME, kind mail)",
                servers.len()
            )));
        }
    };
    let server = servers.get(&name).ok_or_else(|| bad(format!("no mail server named {name:?}")))?;
    let d = make(&api, &req.period, drv_config::now_unix_ms() / 1000)?;
    let mail = crate::mail::Mail { to: req.to.clone(), subject: d.subject.clone(), text: d.text, html: Some(d.html) };
    let outcome = crate::mail::send(server, &name, &api.mail_budget, &mail).await;
    let (what, detail) = match &outcome {
        Ok(()) => ("mail_sent", format!("{:?} to {}", d.subject, req.to.join(", "))),
        Err(e) => ("mail_failed", format!("{:?} to {}: {e}", d.subject, req.to.join(", "))),
    };
    api.sessions.record(crate::sessions::Event { who: who.label(), addr: who.addr().to_string(), what, detail });
    outcome.map_err(|e| Failure::new(StatusCode::BAD_GATEWAY, "mail", e.to_string()))?;
    Ok(axum::Json(Sent { subject: d.subject, to: req.to, mail_server: name }))
}

/// `GET /v1/digest?period=week|day`, `POST /v1/digest/send` ([`SendRequest`]): admins.
pub fn router() -> axum::Router<Api> {
    use axum::routing::{get as g, post};
    axum::Router::new().route("/v1/digest", g(get)).route("/v1/digest/send", post(send))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        assert_eq!(quantile(vec![], 0.99), None);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(v.clone(), 0.99), Some(99.0));
        assert_eq!(quantile(v, 1.0), Some(100.0));
        assert_eq!(period_seconds("week"), Some(604_800));
        assert_eq!(period_seconds("month"), None);
    }
}
