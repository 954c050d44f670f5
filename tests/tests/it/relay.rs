//! Staging and replica as real processes on loopback with mTLS, a writer speaking the agent
//! protocol, and SIGKILLs of staging and replica at random moments. At sampled moments the replica
//! (brought to its last complete epoch by `drv replica recover`) equals the source as of an epoch
//! prefix of the write history; at the end it equals the source byte for byte.

use drv_proto::status::{ReplicaStatus, StagingStatus};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drv_tests::{Cluster, Rng, drv_bin, pattern};

struct Hist {
    seq: u64,
    epoch: u64,
    offset: u64,
    len: usize,
}

fn history(path: &std::path::Path) -> Vec<Hist> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let v: Vec<u64> = l.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            (v.len() == 4).then(|| Hist { seq: v[0], epoch: v[1], offset: v[2], len: v[3] as usize })
        })
        .collect()
}

/// The source image after writes 1..=upto of the history.
fn image_at(h: &[Hist], upto: u64, size: u64, seed: u64) -> Vec<u8> {
    let mut img = vec![0u8; size as usize];
    for w in h.iter().filter(|w| w.seq <= upto) {
        let d = pattern(seed.wrapping_mul(1_000_003).wrapping_add(w.seq), w.len);
        img[w.offset as usize..w.offset as usize + w.len].copy_from_slice(&d);
    }
    img
}

fn kill(c: &mut Child) {
    let _ = c.kill(); // SIGKILL
    let _ = c.wait();
}

fn recover_replica(cl: &Cluster, name: &str) -> ReplicaStatus {
    let out = Command::new(drv_bin())
        .args(["replica", "recover", "--name", name])
        .arg("--config")
        .arg(&cl.config)
        .arg("--certs")
        .arg(&cl.certs)
        .output()
        .unwrap();
    assert!(out.status.success(), "replica recover failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn kills_of_staging_and_replica_keep_the_replica_epoch_consistent() {
    let seed: u64 = std::env::var("DRV_RELAY_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261126);
    let size = 8u64 << 20;
    let cl = Cluster::new(1, size);
    let target = cl.dir.path().join("rep1").join("vol1.img");
    let source = cl.dir.path().join("source.img");
    let hist = cl.dir.path().join("history");
    let mut replica = cl.start("replica", "rep1");
    let mut staging = cl.start("staging", "stg1");
    let count = 3000u64;
    let mut writer = Command::new(env!("CARGO_BIN_EXE_agent-writer"))
        .arg(&cl.certs)
        .args(["host1", &cl.staging_addr, &cl.volume_id.to_string(), &size.to_string()])
        .arg(&source)
        .arg(&hist)
        .args([&count.to_string(), &seed.to_string(), "16"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let (mut staging_kills, mut replica_kills, mut samples) = (0, 0, 0);
    while writer.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(240), "writer did not finish in time");
        std::thread::sleep(Duration::from_millis(200 + rng.below(600)));
        match rng.below(3) {
            0 => {
                kill(&mut staging);
                staging_kills += 1;
                std::thread::sleep(Duration::from_millis(rng.below(300)));
                staging = cl.start("staging", "stg1");
            }
            1 => {
                kill(&mut replica);
                replica_kills += 1;
                std::thread::sleep(Duration::from_millis(rng.below(300)));
                replica = cl.start("replica", "rep1");
            }
            _ => {
                // Sample: stop the replica hard, bring it to its last complete epoch offline, and
                // compare with the source as of that prefix of the history.
                kill(&mut replica);
                replica_kills += 1;
                let st = recover_replica(&cl, "rep1");
                let applied = st.volumes[0].applied_seq;
                let h = history(&hist);
                let img = std::fs::read(&target).unwrap();
                assert!(
                    img == image_at(&h, applied, size, seed),
                    "replica at seq {applied} is not the source as of that prefix"
                );
                // The applied prefix ends an epoch.
                let epoch_of = |s: u64| h.iter().find(|w| w.seq == s).map(|w| w.epoch);
                if applied > 0
                    && let Some(next) = epoch_of(applied + 1)
                {
                    assert_ne!(epoch_of(applied), Some(next), "applied seq {applied} is in the middle of an epoch");
                }
                samples += 1;
                replica = cl.start("replica", "rep1");
            }
        }
    }
    let status = writer.wait().unwrap();
    let out = BufReader::new(writer.stdout.take().unwrap()).lines().map_while(Result::ok).collect::<Vec<_>>();
    assert!(status.success(), "writer failed: {out:?}");
    let last: u64 = out.iter().find_map(|l| l.strip_prefix("done ")).unwrap().parse().unwrap();
    assert_eq!(last, count);
    // Wait for the replica to apply everything.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = cl.replica_status();
        let applied = st.as_ref().map(|s| s.volumes[0].applied_seq).unwrap_or(0);
        if applied >= last {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica applied only up to {applied} of {last}: {st:?}\n{}",
            cl.log("rep1")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let s = cl.status(&cl.staging_addr, "staging", "admin").expect("staging status");
    eprintln!("staging kills {staging_kills}, replica kills {replica_kills}, samples {samples}; staging status: {s}");
    kill(&mut staging);
    kill(&mut replica);
    let a = std::fs::read(&source).unwrap();
    let b = std::fs::read(&target).unwrap();
    assert!(a == b, "replica differs from the source at the end");
    assert!(staging_kills + replica_kills > 0);
}

#[test]
fn one_volume_to_two_replicas_trims_only_what_both_hold() {
    let size = 4u64 << 20;
    let cl = Cluster::new(2, size);
    let source = cl.dir.path().join("source.img");
    let mut staging = cl.start("staging", "stg1");
    let mut rep1 = cl.start("replica", "rep1");
    let mut writer = Command::new(env!("CARGO_BIN_EXE_agent-writer"))
        .arg(&cl.certs)
        .args(["host1", &cl.staging_addr, &cl.volume_id.to_string(), &size.to_string()])
        .arg(&source)
        .arg(cl.dir.path().join("history"))
        .args(["600", "7", "8"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(writer.wait().unwrap().success());
    let last = 600;
    let wait = |what: &str, f: &dyn Fn(&StagingStatus) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = cl.staging_status()
                && f(&s)
            {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: {:?}", cl.status(&cl.staging_addr, "staging", "admin"));
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // rep1 has everything; rep2 is down, so nothing is confirmed and nothing is trimmed.
    let s = wait("rep1 durable", &|s| s.volumes[0].replicas[0].durable_seq == last + 1);
    assert_eq!(s.volumes[0].replicated_seq, 0, "{s:?}");
    assert_eq!(s.wrls[0].trim_lsn, 0, "records were trimmed before every replica had them: {s:?}");
    assert_eq!(s.volumes[0].lag_records, last + 1);
    // rep2 comes up: it catches up from the log, and both replicas equal the source.
    let mut rep2 = cl.start("replica", "rep2");
    wait("rep2 durable", &|s| s.volumes[0].replicated_seq == last + 1);
    let src = std::fs::read(&source).unwrap();
    for (name, addr) in [("rep1", &cl.replica_addrs[0]), ("rep2", &cl.replica_addrs[1])] {
        let deadline = Instant::now() + Duration::from_secs(60);
        while cl.replica_status_at(addr).map(|s| s.volumes[0].applied_seq) != Some(last) {
            assert!(Instant::now() < deadline, "{name} did not apply everything");
            std::thread::sleep(Duration::from_millis(200));
        }
        let img = std::fs::read(cl.dir.path().join(name).join("vol1.img")).unwrap();
        assert!(img == src, "{name} differs from the source");
    }
    for c in [&mut staging, &mut rep1, &mut rep2] {
        kill(c);
    }
}
