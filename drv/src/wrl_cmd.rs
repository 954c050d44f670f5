//! `drv wrl create|inspect|verify|bench-append`: a WRL offline.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use drv_format::crypto::VolumeKey;
use drv_format::layout::DeviceHeader;
use drv_format::record::Flags;
use drv_wrl::storage::{FileStorage, Storage};
use drv_wrl::{self as wrl, AppendRequest, CreateOptions, Recovery, Tail, Wrl, WrlOptions};
use serde_json::json;

#[derive(Subcommand)]
pub enum WrlCommand {
    /// Format files or block devices as a new WRL (files that do not exist are created and prezeroed).
    Create(CreateArgs),
    /// Show a WRL's geometry, segments, positions and volumes (runs recovery read-only).
    Inspect(DevicesArgs),
    /// Check every record (checksums, sequence, hash chain; with --key also decrypt) and report
    /// the consistent prefix. Exits 1 on corruption.
    Verify(VerifyArgs),
    /// Append synthetic writes from concurrent writers and report throughput and ack latency.
    BenchAppend(BenchArgs),
}

#[derive(Args)]
pub struct DevicesArgs {
    /// The WRL's devices, in order.
    #[arg(required = true)]
    pub devices: Vec<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CreateArgs {
    #[arg(required = true)]
    devices: Vec<PathBuf>,
    /// Size of each file to create (e.g. 1G). Not needed for existing files or block devices.
    #[arg(long, value_parser = drv_config::size_bytes)]
    size: Option<u64>,
    #[arg(long, value_parser = drv_config::size_bytes, default_value = "64M")]
    segment_size: u64,
    /// Write alignment: 4096, or 512 for devices with 512-byte logical blocks.
    #[arg(long, default_value_t = 4096)]
    io_align: u32,
    /// Use at most this many bytes of the devices for segments.
    #[arg(long, value_parser = drv_config::size_bytes)]
    capacity: Option<u64>,
    /// Nonce domain, unique in the installation (the configuration store allocates it; random if omitted).
    #[arg(long)]
    wrl_id: Option<u32>,
    /// Overwrite devices that already hold a WRL.
    #[arg(long)]
    force: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    d: DevicesArgs,
    /// Also authenticate and decrypt every payload with this key file.
    #[arg(long)]
    key: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    key_id: u32,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    d: DevicesArgs,
    /// Concurrent writers (each its own volume, one append in flight each).
    #[arg(long, default_value_t = 32)]
    writers: usize,
    #[arg(long, value_parser = drv_config::size_bytes, default_value = "4K")]
    record_size: u64,
    /// Total payload bytes to append.
    #[arg(long, value_parser = drv_config::size_bytes, default_value = "256M")]
    total: u64,
    #[arg(long, value_parser = drv_config::size_bytes, default_value = "8M")]
    batch_limit: u64,
}

/// Opens a WRL's devices for writing: refused while another process (a staging server) has them.
fn open_devices(paths: &[PathBuf]) -> Result<Vec<Arc<dyn Storage>>> {
    paths.iter().map(|p| Ok(Arc::new(FileStorage::open(p)?) as Arc<dyn Storage>)).collect()
}

/// Opens a WRL's devices for reading only. When a running process has them open for writing, says
/// so once: the log is read as it is at this moment and may move on meanwhile.
fn open_devices_read_only(paths: &[PathBuf]) -> Result<Vec<Arc<dyn Storage>>> {
    let mut writer = None;
    let mut devs = Vec::new();
    for p in paths {
        let (s, w) = FileStorage::open_read_only(p)?;
        writer = writer.or(w.map(|w| (p, w)));
        devs.push(Arc::new(s) as Arc<dyn Storage>);
    }
    if let Some((p, w)) = writer {
        eprintln!(
            "drv: note: {} is in use by {w}: reading the live log read-only; records appended while it is read may be missing or show as a torn tail",
            p.display()
        );
    }
    Ok(devs)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn run(c: WrlCommand) -> Result<()> {
    match c {
        WrlCommand::Create(a) => create(a),
        WrlCommand::Inspect(a) => inspect(a),
        WrlCommand::Verify(a) => verify(a),
        WrlCommand::BenchAppend(a) => bench(a),
    }
}

fn create(a: CreateArgs) -> Result<()> {
    let mut devs: Vec<Arc<dyn Storage>> = Vec::new();
    for p in &a.devices {
        let dev: Arc<dyn Storage> = if p.exists() {
            // Locked: a WRL a server is running on is never formatted, not even with --force.
            let d = FileStorage::open(p)?;
            let mut head = vec![0u8; 4096];
            if d.read_at(0, &mut head).is_ok() && DeviceHeader::decode(&head).is_ok() && !a.force {
                bail!("{} already holds a WRL; pass --force to overwrite it", p.display());
            }
            Arc::new(d)
        } else {
            let n = a.size.with_context(|| format!("{} does not exist: give --size to create it", p.display()))?;
            Arc::new(FileStorage::create_file(p, n)?)
        };
        devs.push(dev);
    }
    let mut uuid = [0u8; 16];
    getrandom::fill(&mut uuid).map_err(|e| anyhow::anyhow!("get random bytes: {e}"))?;
    let wrl_id = match a.wrl_id {
        Some(id) => id,
        None => getrandom::u32().map_err(|e| anyhow::anyhow!("get random bytes: {e}"))?,
    };
    let opts =
        CreateOptions { uuid, wrl_id, segment_bytes: a.segment_size, io_align: a.io_align, capacity_bytes: a.capacity };
    wrl::create(&devs, &opts).context("create WRL")?;
    let (_, rec) = drv_wrl::core::LogCore::open(devs).context("open the new WRL")?;
    if a.json {
        println!("{}", summary_json(&rec, &a.devices));
    } else {
        println!(
            "created WRL {} (id {}) on {} device(s): {} segments of {} bytes",
            hex(&uuid),
            wrl_id,
            a.devices.len(),
            rec.slots_per_device.iter().sum::<u64>(),
            a.segment_size
        );
    }
    Ok(())
}

fn tail_json(t: &Tail) -> serde_json::Value {
    match t {
        Tail::Clean => json!({"kind": "clean"}),
        Tail::Torn { segment_id, offset, reason } => {
            json!({"kind": "torn", "segment_id": segment_id, "offset": offset, "reason": reason})
        }
    }
}

fn summary_json(rec: &Recovery, paths: &[PathBuf]) -> serde_json::Value {
    json!({
        "uuid": hex(&rec.uuid),
        "wrl_id": rec.wrl_id,
        "devices": paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "segment_bytes": rec.segment_bytes,
        "io_align": rec.io_align,
        "slots_per_device": rec.slots_per_device,
        "meta_generation": rec.meta.generation,
        "nonce_hwm": rec.meta.nonce_hwm,
        "trim_lsn": rec.meta.trim_lsn,
        "first_lsn": rec.first_lsn,
        "last_lsn": rec.last_lsn,
        "records": rec.records,
        "tail": tail_json(&rec.tail),
        "segments": rec.segments.iter().map(|s| json!({
            "id": s.loc.id, "device": s.loc.device, "slot": s.loc.slot,
            "first_lsn": s.first_lsn, "last_lsn": s.next_lsn - 1, "used_bytes": s.end,
        })).collect::<Vec<_>>(),
        "volumes": rec.volumes.iter().map(|(id, v)| json!({
            "volume_id": id, "records": v.records, "payload_bytes": v.payload_bytes,
            "first_lsn": v.first_lsn, "last_lsn": v.last_lsn, "last_seq": v.last_seq, "last_epoch": v.last_epoch,
        })).collect::<Vec<_>>(),
    })
}

fn inspect(a: DevicesArgs) -> Result<()> {
    let devs = open_devices_read_only(&a.devices)?;
    let rec = wrl::recover(&devs, &mut |_, _| {}).context("read WRL")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary_json(&rec, &a.devices))?);
        return Ok(());
    }
    println!("WRL {} (id {}), {} device(s)", hex(&rec.uuid), rec.wrl_id, rec.device_count);
    println!(
        "  segments: {} of {} in use, {} bytes each, io_align {}",
        rec.segments.len(),
        rec.slots_per_device.iter().sum::<u64>(),
        rec.segment_bytes,
        rec.io_align
    );
    println!(
        "  lsn: first {} last {} ({} records held), trimmed through {}",
        rec.first_lsn, rec.last_lsn, rec.records, rec.meta.trim_lsn
    );
    println!("  meta generation {}, nonce high-water mark {}", rec.meta.generation, rec.meta.nonce_hwm);
    match &rec.tail {
        Tail::Clean => println!("  tail: clean"),
        Tail::Torn { segment_id, offset, reason } => {
            println!("  tail: torn batch in segment {segment_id} at offset {offset} (will be discarded): {reason}")
        }
    }
    println!("  {:>8} {:>6} {:>6} {:>12} {:>12} {:>12}", "segment", "device", "slot", "first_lsn", "last_lsn", "bytes");
    for s in &rec.segments {
        println!(
            "  {:>8} {:>6} {:>6} {:>12} {:>12} {:>12}",
            s.loc.id,
            s.loc.device,
            s.loc.slot,
            s.first_lsn,
            s.next_lsn as i64 - 1,
            s.end
        );
    }
    println!("  {:>8} {:>10} {:>14} {:>12} {:>12}", "volume", "records", "bytes", "last_seq", "last_epoch");
    for (id, v) in &rec.volumes {
        println!("  {:>8} {:>10} {:>14} {:>12} {:>12}", id, v.records, v.payload_bytes, v.last_seq, v.last_epoch);
    }
    Ok(())
}

fn verify(a: VerifyArgs) -> Result<()> {
    let devs = open_devices_read_only(&a.d.devices)?;
    let key = a.key.as_deref().map(|p| VolumeKey::load(a.key_id, p)).transpose().context("load key")?;
    let mut decrypted = 0u64;
    let mut auth_error: Option<String> = None;
    let started = Instant::now();
    let result = wrl::recover(&devs, &mut |h, p| {
        // Checkpoints are the log's own records of a position: nothing encrypted in them.
        if let Some(k) = &key
            && auth_error.is_none()
            && !h.desc.flags.contains(Flags::CHECKPOINT)
        {
            match k.open(&h.desc, p) {
                Ok(_) => decrypted += 1,
                Err(e) => auth_error = Some(format!("lsn {}: {e}", h.lsn)),
            }
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let (ok, out) = match &result {
        Ok(rec) => {
            let mut v = summary_json(rec, &a.d.devices);
            v["consistent"] = json!(auth_error.is_none());
            v["decrypted"] = json!(decrypted);
            if let Some(e) = &auth_error {
                v["error"] = json!(e);
            }
            (auth_error.is_none(), v)
        }
        Err(e) => (false, json!({"consistent": false, "error": e.to_string()})),
    };
    if a.d.json {
        println!("{out}");
    } else if let Ok(rec) = &result {
        println!(
            "WRL {}: lsn {}..{} ({} records) verified in {:.2}s{}",
            hex(&rec.uuid),
            rec.first_lsn,
            rec.last_lsn,
            rec.records,
            secs,
            if key.is_some() { format!(", {decrypted} payloads authenticated") } else { String::new() }
        );
        if let Tail::Torn { segment_id, offset, reason } = &rec.tail {
            println!("torn tail (never acknowledged) in segment {segment_id} at offset {offset}: {reason}");
        }
    }
    if !ok {
        let msg = match (&result, &auth_error) {
            (Err(e), _) => e.to_string(),
            (_, Some(e)) => e.clone(),
            _ => unreachable!(),
        };
        if !a.d.json {
            eprintln!("drv: verify FAILED: {msg}");
        }
        std::process::exit(1);
    }
    Ok(())
}

/// The figures `bench-append` prints (also used by `cargo xtask bench wrl`).
fn bench(a: BenchArgs) -> Result<()> {
    let devs = open_devices(&a.d.devices)?;
    let opts = WrlOptions { batch_bytes_limit: a.batch_limit, ..WrlOptions::default() };
    let (w, _) = Wrl::open(devs, opts).context("open WRL")?;
    let w = Arc::new(w);
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).map_err(|e| anyhow::anyhow!("random key: {e}"))?;
    let key = VolumeKey::from_bytes(1, &k);
    let per_writer = (a.total / a.record_size / a.writers as u64).max(1);
    // Records of earlier runs count as relayed, so the log can trim them.
    for (v, s) in w.volumes() {
        w.confirm(v, s.log.last_lsn);
    }
    let start_lsn = w.status().durable_lsn;
    // Like the staging server: each writer has one append in flight; a pool of submitter threads
    // (one per core, as a tokio runtime would have) encrypts and submits the next append of a
    // writer when its previous one completes.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let pool = a.writers.min(cores);
    let started = Instant::now();
    let threads: Vec<_> = (0..pool)
        .map(|tid| {
            let (w, key) = (w.clone(), key.clone());
            let mine: Vec<u64> = (0..a.writers as u64).filter(|x| *x as usize % pool == tid).collect();
            let record = a.record_size;
            std::thread::spawn(move || -> Result<Vec<Duration>> {
                let (tx, rx) = std::sync::mpsc::channel::<(u64, u64, Result<u64, drv_wrl::WrlError>, Duration)>();
                let data: Vec<Vec<u8>> = mine.iter().map(|t| vec![(*t as u8) ^ 0x5a; record as usize]).collect();
                // Each writer's volume goes on after its records of an earlier run (no gaps).
                let base: Vec<u64> =
                    mine.iter().map(|t| w.volume(1_000_000 + t).map(|v| v.log.last_seq).unwrap_or(0)).collect();
                let submit = |idx: usize, i: u64| {
                    let t = mine[idx];
                    let tx = tx.clone();
                    let t0 = Instant::now();
                    w.submit(
                        &key,
                        AppendRequest {
                            volume_id: 1_000_000 + t,
                            volume_seq: base[idx] + i + 1,
                            epoch: i,
                            offset: i * record,
                            flags: Flags::default(),
                            data: &data[idx],
                            capture_unix: drv_format::record::capture_clock(),
                        },
                        Box::new(move |r| {
                            let _ = tx.send((idx as u64, i, r.map(|a| a.header.lsn), t0.elapsed()));
                        }),
                    )
                    .hand_off();
                };
                for idx in 0..mine.len() {
                    submit(idx, 0);
                }
                let mut lat = Vec::with_capacity(per_writer as usize * mine.len());
                let mut running = mine.len();
                while running > 0 {
                    let (idx, i, r, took) = rx.recv().expect("completions arrive");
                    let lsn = r?;
                    lat.push(took);
                    // Downstream "confirms" as it goes, so the log trims and never fills.
                    if i % 64 == 63 {
                        w.confirm(1_000_000 + mine[idx as usize], lsn);
                    }
                    if i + 1 < per_writer {
                        submit(idx as usize, i + 1);
                    } else {
                        running -= 1;
                    }
                }
                Ok(lat)
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in threads {
        lat.extend(t.join().map_err(|_| anyhow::anyhow!("writer panicked"))??);
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e6;
    let st = w.status();
    let appends = lat.len() as u64;
    let bytes = appends * a.record_size;
    let out = json!({
        "writers": a.writers,
        "record_bytes": a.record_size,
        "appends": appends,
        "payload_bytes": bytes,
        "seconds": secs,
        "appends_per_sec": appends as f64 / secs,
        "mb_per_sec": bytes as f64 / secs / 1e6,
        "batches": st.batches,
        "records_per_batch": appends as f64 / st.batches.max(1) as f64,
        "ack_p50_us": pct(0.50),
        "ack_p99_us": pct(0.99),
        "ack_max_us": pct(1.0),
        "first_lsn": start_lsn + 1,
        "last_lsn": st.durable_lsn,
    });
    if a.d.json {
        println!("{out}");
    } else {
        println!(
            "{} writers x {} B: {} appends in {:.2}s = {:.0} appends/s, {:.1} MB/s, {:.1} records/batch, ack p50 {:.0} us p99 {:.0} us",
            a.writers,
            a.record_size,
            appends,
            secs,
            appends as f64 / secs,
            bytes as f64 / secs / 1e6,
            appends as f64 / st.batches.max(1) as f64,
            pct(0.5),
            pct(0.99)
        );
    }
    Ok(())
}
