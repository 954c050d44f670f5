//! `drv bench-ui` (run by `cargo xtask bench ui`): the web UI's costs for 1,000 volumes: the
//! overview page rendered on the server, one live update of it (every volume's row, as the
//! event stream sends it), and the bytes the time series of 1,000 volumes x 10 series take for
//! their whole retention (35 days), filled with samples that do not compress.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use drv_configd::monitor::{ComponentRow, Health, Overview, ReplicaRow, VOLUME_SERIES, VolumeRow};
use drv_configd::series::{CHUNK, Series, TIERS, bytes_bound};

#[derive(Args)]
pub struct UiBenchArgs {
    /// A short run of the same shape.
    #[arg(long)]
    quick: bool,
    /// Where the series store goes (default: a new directory in /var/tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
}

const VOLUMES: usize = 1000;

fn overview() -> Overview {
    let now = drv_config::now_unix_ms();
    let volumes = (0..VOLUMES)
        .map(|i| {
            let bad = i % 50 == 0;
            VolumeRow {
                name: format!("volume-{i:04}"),
                wrl: format!("w{}", i % 4),
                staging: "stg1".into(),
                mode: if bad { "change-map" } else { "sync" }.into(),
                lag_seconds: Some(i as f64 / 100.0),
                lag_bytes: Some((i * 4096) as f64),
                rpo_seconds: Some(i as f64 / 100.0),
                dirty_bytes: Some(if bad { 1e9 } else { 0.0 }),
                wrl_fill: Some(0.25),
                write_bps: Some(1e6),
                relay_bps: Some(1e6),
                snapshot_bytes_limit: Some(1 << 40),
                out_of_sync_seconds: bad.then_some(120.0),
                paused: false,
                unheard_seconds: 5.0,
                replicas: ["rep1", "rep2"]
                    .iter()
                    .map(|r| ReplicaRow {
                        name: (*r).into(),
                        state: "replicating".into(),
                        connected: Some(true),
                        apply_lag_records: Some(3.0),
                        snapshot_store_bytes: Some(1e9),
                        check_ok: Some(true),
                        check_unix: Some(now / 1000 - 3600),
                        details: serde_json::Value::Null,
                    })
                    .collect(),
                health: if bad { Health::Bad } else { Health::Ok },
                problems: if bad {
                    vec!["the agent is in change-map mode: writes are not replicated".into()]
                } else {
                    vec![]
                },
            }
        })
        .collect();
    let mut components: Vec<ComponentRow> = ["stg1", "rep1", "rep2"]
        .iter()
        .map(|n| ComponentRow {
            name: (*n).into(),
            role: if *n == "stg1" { "staging" } else { "replica" }.into(),
            version: 1000,
            pending: vec![],
            last_heard_unix_ms: Some(now - 3000),
            silent: false,
            server: "c1".into(),
        })
        .collect();
    components.extend((0..VOLUMES).map(|i| ComponentRow {
        name: format!("host{}/volume-{i:04}", i / 10),
        role: "agent".into(),
        version: 1000,
        pending: vec![],
        last_heard_unix_ms: Some(now - 4000),
        silent: false,
        server: "c1".into(),
    }));
    Overview { time_unix_ms: now, version: 1000, volumes, components }
}

fn percentile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

pub fn run(a: UiBenchArgs) -> Result<()> {
    let rounds = if a.quick { 10 } else { 100 };
    let o = overview();
    let admin =
        drv_config::User { password_hash: String::new(), admin: true, grants: Default::default(), disabled: false };
    let sight = drv_configd::auth::Sight { name: "root".into(), user: admin, sets: Default::default() };
    let viewer = drv_configd::web::Viewer { name: "root", admin: true, csrf: "0" };
    let (mut page, mut update) = (Vec::new(), Vec::new());
    let mut size = (0, 0);
    // Alternating rounds: a page, then an update.
    for _ in 0..rounds {
        let t = Instant::now();
        let html = drv_configd::web::overview_page(&o, &sight, 3, &viewer).into_string();
        page.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let events = drv_configd::web::overview_fragments(&o, &sight, 3);
        update.push(t.elapsed().as_secs_f64() * 1e3);
        size = (html.len(), events.len());
    }
    println!("web UI, {VOLUMES} volumes, {rounds} rounds (release):");
    println!("  overview page {} KiB; {} fragments per live update", size.0 / 1024, size.1);
    println!("  overview page render p50 {:.2} ms (goal <= 200)", percentile(page.clone(), 0.5));
    println!("  overview page render p99 {:.2} ms", percentile(page, 0.99));
    println!("  live update render p50 {:.2} ms (goal <= 5)", percentile(update.clone(), 0.5));
    println!("  live update render p99 {:.2} ms", percentile(update, 0.99));

    let base = a.dir.unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let dir = base.join(format!("drv-bench-ui-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("series.redb");
    let _ = std::fs::remove_file(&path);
    let series = Series::open(&path)?;
    let now = drv_config::now_unix_ms() / 1000;
    let volumes = if a.quick { 100 } else { VOLUMES };
    let names: Vec<String> =
        (0..volumes).flat_map(|v| VOLUME_SERIES.iter().map(move |(s, _)| format!("volume-{v:04}/{s}"))).collect();
    // Every chunk of the retention, each sample different (nothing compresses).
    let t = Instant::now();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (ti, tier) in TIERS.iter().enumerate() {
        let last = now / tier.step / CHUNK;
        let first = (now - tier.keep) / tier.step / CHUNK;
        for batch in names.chunks(500) {
            let mut chunks = Vec::new();
            for name in batch {
                for n in first..=last {
                    let values = (0..CHUNK)
                        .map(|_| {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            (x % 1_000_000) as f32
                        })
                        .collect();
                    chunks.push((name.clone(), ti as u8, n, values));
                }
            }
            series.store_chunks(&chunks)?;
        }
    }
    // A day of expiry later, the store holds what the retention keeps and no more.
    series.flush(now)?;
    let bytes = series.file_bytes();
    let mut series = series;
    series.compact()?;
    let compacted = series.file_bytes();
    let n = names.len() as u64;
    println!(
        "time series, {volumes} volumes x {} series, full retention ({} s and {} s steps), filled in {:.1} s:",
        VOLUME_SERIES.len(),
        TIERS[0].step,
        TIERS[1].step,
        t.elapsed().as_secs_f64()
    );
    println!(
        "  samples' bound {} MB, file {} MB, compacted {} MB",
        bytes_bound(n) / 1_000_000,
        bytes / 1_000_000,
        compacted / 1_000_000
    );
    println!("  file bytes per series {} (goal <= {})", bytes / n, bytes_bound(1) * 4);
    println!("  compacted bytes per series {} (goal <= {})", compacted / n, bytes_bound(1) * 2);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
