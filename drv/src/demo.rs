//! `drv demo`: the README's first command. Until the agent and the replica land, it demonstrates
//! the staging write log end to end on temporary files: concurrent writers append encrypted,
//! group-committed records; the log is closed, recovered and verified; every payload is read back,
//! authenticated and compared with what was written.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clap::Args;
use drv_format::crypto::VolumeKey;
use drv_format::record::Flags;
use drv_staging::storage::{FileStorage, Storage};
use drv_staging::wrl::{self, AppendRequest, CreateOptions, Wrl, WrlOptions};

#[derive(Args)]
pub struct DemoArgs {
    /// Concurrent writers (one volume each).
    #[arg(long, default_value_t = 8)]
    writers: u64,
    /// Writes per writer.
    #[arg(long, default_value_t = 2000)]
    writes: u64,
    /// Keep the temporary directory (its path is printed).
    #[arg(long)]
    keep: bool,
}

fn payload(volume: u64, seq: u64) -> Vec<u8> {
    drv_format::pattern(volume << 32 | seq, 4096 * (1 + (seq % 4) as usize))
}

pub fn run(a: DemoArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("drv-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let result = demo(&a, &dir);
    if a.keep {
        println!("kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn demo(a: &DemoArgs, dir: &std::path::Path) -> Result<()> {
    println!("drv demo: staging write log on {} (two devices, 16 MiB segments)", dir.display());
    let key_path = dir.join("volume.key");
    crate::generate_key(&key_path, false)?;
    let key = VolumeKey::load(1, &key_path)?;
    let paths = [dir.join("wrl-a"), dir.join("wrl-b")];
    let mut devs: Vec<Arc<dyn Storage>> = Vec::new();
    for p in &paths {
        devs.push(Arc::new(FileStorage::create_file(p, 128 << 20).with_context(|| format!("create {}", p.display()))?));
    }
    let mut uuid = [0u8; 16];
    getrandom::fill(&mut uuid).map_err(|e| anyhow::anyhow!("random: {e}"))?;
    wrl::create(
        &devs,
        &CreateOptions { uuid, wrl_id: 1, segment_bytes: 16 << 20, io_align: 4096, capacity_bytes: None },
    )?;
    let (w, _) = Wrl::open(devs, WrlOptions::default())?;
    let w = Arc::new(w);
    let started = Instant::now();
    let threads: Vec<_> = (0..a.writers)
        .map(|v| {
            let (w, key, n) = (w.clone(), key.clone(), a.writes);
            std::thread::spawn(move || -> Result<()> {
                for seq in 1..=n {
                    let data = payload(v, seq);
                    let req = AppendRequest {
                        volume_id: v,
                        volume_seq: seq,
                        epoch: seq,
                        offset: (seq % 1024) * 16384,
                        flags: if seq % 100 == 0 { Flags::FLUSH } else { Flags::default() },
                        data: &data,
                    };
                    w.append(&key, req)?;
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    }
    let secs = started.elapsed().as_secs_f64();
    let st = w.status();
    println!(
        "appended {} writes ({:.1} MB) from {} writers in {:.2}s: {:.0} writes/s, {:.1} MB/s, {} group commits ({:.1} writes per fdatasync)",
        st.appends,
        st.payload_bytes as f64 / 1e6,
        a.writers,
        secs,
        st.appends as f64 / secs,
        st.payload_bytes as f64 / secs / 1e6,
        st.batches,
        st.appends as f64 / st.batches.max(1) as f64
    );
    drop(w);

    // Recover from the files alone, check every record and payload.
    let devs: Vec<Arc<dyn Storage>> = paths
        .iter()
        .map(|p| FileStorage::open(p).map(|s| Arc::new(s) as Arc<dyn Storage>))
        .collect::<Result<_, _>>()?;
    let (w, rec) = Wrl::open(devs, WrlOptions::default()).context("recover the WRL")?;
    let expected = a.writers * a.writes;
    ensure!(rec.records == expected, "recovered {} records, expected {expected}", rec.records);
    let mut checked = 0u64;
    let mut lsn = rec.first_lsn;
    while lsn <= rec.last_lsn {
        for r in w.read(lsn, 16 << 20)? {
            let plain = key.open(&r.header.desc, &r.payload)?;
            ensure!(
                plain == payload(r.header.desc.volume_id, r.header.desc.volume_seq),
                "payload of lsn {} differs",
                r.header.lsn
            );
            checked += 1;
            lsn = r.header.lsn + 1;
        }
    }
    println!(
        "recovered lsn {}..{} across {} segments on 2 devices; all {} payloads authenticated and identical",
        rec.first_lsn,
        rec.last_lsn,
        rec.segments.len(),
        checked
    );
    for (v, s) in &rec.volumes {
        ensure!(s.last_seq == a.writes, "volume {v} ends at seq {}", s.last_seq);
    }
    println!("demo OK: staging write log (the replicated demo, agent -> staging -> replica, comes with the agent)");
    Ok(())
}
