//! The pieces every page is made of: the layout, figures in words, and charts as SVG drawn on
//! the server (no chart library, nothing fetched at run time). maud escapes every value it
//! puts in a page, so a name or a message from anywhere shows as text.

use maud::{DOCTYPE, Markup, html};

use crate::monitor::{ComponentRow, Health, VolumeRow};

/// What the layout needs to know of the user.
pub struct Viewer<'a> {
    pub name: &'a str,
    pub admin: bool,
    pub csrf: &'a str,
}

/// A whole page: header with navigation and the user, then `body`.
pub fn layout(title: &str, who: Option<&Viewer>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " - drv" }
                link rel="stylesheet" href="/static/app.css";
                script src="/static/app.js" defer {}
            }
            body {
                header {
                    strong { "drv" }
                    @if let Some(w) = who {
                        a href="/" { "Overview" }
                        a href="/alerts" { "Alerts" }
                        a href="/activity" { "Activity" }
                        a href="/history" { "History" }
                        @if w.admin { a href="/config" { "Configuration" } }
                        span.who {
                            (w.name) @if w.admin { " (admin)" } " "
                            form.inline method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(w.csrf);
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub fn health_class(h: Health) -> &'static str {
    match h {
        Health::Ok => "ok",
        Health::Warn => "warn",
        Health::Bad => "bad",
    }
}

fn health_word(h: Health) -> &'static str {
    match h {
        Health::Ok => "OK",
        Health::Warn => "WARN",
        Health::Bad => "AT RISK",
    }
}

/// Bytes in binary units (`1.5 GiB`).
pub fn bytes(b: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b;
    let mut i = 0;
    while v.abs() >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{v:.0} B") } else { format!("{v:.1} {}", UNITS[i]) }
}

/// Seconds in words (`4.2 s`, `3 min 5 s`, `2 h 10 min`, `3 d 4 h`).
pub fn secs(s: f64) -> String {
    if s < 60.0 {
        return format!("{s:.1} s");
    }
    let s = s as u64;
    match s {
        0..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_owned(), f)
}

/// A unix time in UTC: `2026-12-07 22:35:10Z`.
pub fn utc(unix: u64) -> String {
    let (days, rem) = (unix / 86_400, unix % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// How long ago `then_ms` was, at `now_ms`.
pub fn ago(then_ms: u64, now_ms: u64) -> String {
    format!("{} ago", secs(now_ms.saturating_sub(then_ms) as f64 / 1000.0))
}

/// The rows of the overview's volume table (the live fragment `volumes`).
pub fn volume_rows(rows: &[&VolumeRow]) -> Markup {
    html! {
        @for v in rows {
            tr class=(health_class(v.health)) {
                td { span class={"dot " (health_class(v.health))} { (health_word(v.health)) } }
                td { a href={"/volume/" (v.name)} { (v.name) } }
                td { (v.mode) }
                td.num { (opt(v.lag_seconds, secs)) }
                td.num { (opt(v.rpo_seconds, secs)) }
                td.num { (opt(v.dirty_bytes, bytes)) }
                td.num { (opt(v.wrl_fill, |f| format!("{:.0}%", f * 100.0))) }
                td {
                    @for r in &v.replicas {
                        (r.name) ": " (r.state) br;
                    }
                }
                td {
                    @for r in &v.replicas {
                        @match (r.check_ok, r.check_unix) {
                            (Some(true), Some(t)) => { "ok " span.muted { (utc(t)) } br; }
                            (Some(false), Some(t)) => { strong { "FAILED " } span.muted { (utc(t)) } br; }
                            _ => { span.muted { "none" } br; }
                        }
                    }
                }
                td { @for p in &v.problems { (p) br; } }
            }
        }
    }
}

/// The head of the volume table.
pub fn volume_head() -> Markup {
    html! {
        tr {
            th { "Health" } th { "Volume" } th { "Mode" } th { "Lag" } th { "RPO" } th { "Dirty" }
            th { "WRL fill" } th { "Replicas" } th { "Last check" } th { "Why" }
        }
    }
}

/// The rows of the overview's component table (the live fragment `components`).
pub fn component_rows(rows: &[ComponentRow], now_ms: u64) -> Markup {
    html! {
        @for c in rows {
            tr class=(if c.silent { "bad" } else { "ok" }) {
                td { (c.name) }
                td { (c.role) }
                td { @if let Some(t) = c.last_heard_unix_ms { (ago(t, now_ms)) } @else { "never" } }
                td.num { (c.version) }
                td { @for p in &c.pending { (p) br; } }
                td.muted { (c.server) }
            }
        }
    }
}

/// A line chart of `lines` (label, points) between `from` and `to` (unix seconds), the y axis
/// from 0 to the largest value, labelled with `fmt`.
pub fn chart(title: &str, lines: &[(&str, Vec<(u64, f64)>)], from: u64, to: u64, fmt: fn(f64) -> String) -> Markup {
    const W: f64 = 560.0;
    const H: f64 = 140.0;
    const LEFT: f64 = 70.0;
    let max = lines.iter().flat_map(|(_, p)| p.iter().map(|x| x.1)).fold(0.0f64, f64::max);
    let top = if max > 0.0 { max * 1.1 } else { 1.0 };
    let span = to.saturating_sub(from).max(1) as f64;
    let x = |t: u64| LEFT + (t.saturating_sub(from) as f64 / span) * (W - LEFT - 10.0);
    let y = |v: f64| 10.0 + (1.0 - v / top) * (H - 30.0);
    let path = |p: &[(u64, f64)]| {
        let mut d = String::new();
        let mut last: Option<u64> = None;
        let gap = (span / 60.0).max(30.0) as u64;
        for (t, v) in p {
            // A step without samples breaks the line.
            let verb = if last.is_some_and(|l| t - l <= gap) { 'L' } else { 'M' };
            d.push_str(&format!("{verb}{:.1},{:.1} ", x(*t), y(*v)));
            last = Some(*t);
        }
        d
    };
    html! {
        div.chart {
            strong { (title) }
            " "
            @for (i, (label, _)) in lines.iter().enumerate() {
                span class={"l" (i)} { "— " (label) " " }
            }
            svg width=(W) height=(H) viewBox={"0 0 " (W) " " (H)} role="img" aria-label=(title) {
                line x1=(LEFT) y1=(y(0.0)) x2=(W - 10.0) y2=(y(0.0)) stroke="#999" {}
                line x1=(LEFT) y1="10" x2=(LEFT) y2=(y(0.0)) stroke="#999" {}
                text x=(LEFT - 4.0) y="16" text-anchor="end" font-size="10" { (fmt(top)) }
                text x=(LEFT - 4.0) y=(y(0.0)) text-anchor="end" font-size="10" { "0" }
                text x=(LEFT) y=(H - 4.0) font-size="10" { (utc(from)) }
                text x=(W - 10.0) y=(H - 4.0) text-anchor="end" font-size="10" { (utc(to)) }
                @for (i, (_, p)) in lines.iter().enumerate() {
                    path class={"l" (i)} d=(path(p)) fill="none" stroke-width="1.5" {}
                }
                @if lines.iter().all(|(_, p)| p.is_empty()) {
                    text x=((W + LEFT) / 2.0) y=(H / 2.0) text-anchor="middle" fill="#999" { "no samples yet" }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_in_words() {
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(1_796_682_910), "2026-12-07 22:35:10Z");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(bytes(0.0), "0 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(3.0 * (1u64 << 30) as f64), "3.0 GiB");
        assert_eq!(secs(4.25), "4.2 s");
        assert_eq!(secs(185.0), "3 min 5 s");
        assert_eq!(secs(7800.0), "2 h 10 min");
        let svg = chart("<lag>", &[("a", vec![(10, 1.0), (20, 2.0)])], 0, 100, |v| format!("{v}")).into_string();
        assert!(svg.contains("&lt;lag&gt;") && !svg.contains("<lag>"), "escaped: {svg}");
        assert!(svg.contains("M") && svg.contains("L"), "{svg}");
    }
}
