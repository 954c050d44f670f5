//! The agent's synchronous path against real staging and replica processes: concurrent,
//! overlapping writes through `Agent::write` (the in-process capture) land on the local image only
//! after staging has them, the idle epoch close lets the replica apply the last epoch, and the
//! replica ends byte-identical to the local image. Plus the README's demo command.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use drv_agent::{Agent, AgentOptions, FileDisk};
use drv_format::record::Flags;
use drv_tests::{Cluster, Rng};
use drv_transport::Identity;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_overlapping_writes_end_byte_identical_on_the_replica() {
    const VOLUME: u64 = 4 << 20;
    let cl = Cluster::new(1, VOLUME);
    let mut staging = cl.start("staging", "stg1");
    let mut replica = cl.start("replica", "rep1");
    let source = cl.dir.path().join("source.img");
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&source).unwrap();
    f.set_len(VOLUME).unwrap();
    let id = Identity::load(&cl.certs, "host1").unwrap();
    let addr = cl.staging_addr.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let agent = loop {
        let disk = Arc::new(FileDisk(f.try_clone().unwrap()));
        match Agent::connect(&id, addr, cl.volume_id, disk, AgentOptions::default()).await {
            Ok(a) => break a,
            Err(e) => assert!(Instant::now() < deadline, "agent never connected: {e}\n{}", cl.log("stg1")),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Eight writers over a 4 MiB volume: many writes overlap others in flight.
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let agent = agent.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(w + 1);
            for n in 0..300u64 {
                let len = 512 * (1 + rng.below(64)) as usize;
                let offset = rng.below(VOLUME - len as u64) / 512 * 512;
                let data = Bytes::from(drv_format::pattern(rng.next_u64(), len));
                let flags = if n % 50 == 49 { Flags::FLUSH } else { Flags::default() };
                agent.write(offset, data, flags).await.expect("write");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (next, _) = agent.position();
    // The idle close ends the last epoch; then the replica applies it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = cl.status(&cl.replica_addrs[0], "replica", "admin");
        if s.as_ref().is_some_and(|s| s["volumes"][0]["applied_seq"].as_u64().unwrap_or(0) >= next) {
            break;
        }
        assert!(Instant::now() < deadline, "replica did not apply everything (next seq {next}): {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(agent.stats().epochs_closed.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    let src = std::fs::read(&source).unwrap();
    let rep = std::fs::read(cl.dir.path().join("rep1/vol1.img")).unwrap();
    assert_eq!(src.len(), rep.len());
    let first_diff = src.iter().zip(&rep).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "replica differs from the source at byte {first_diff:?}");
    let _ = staging.kill();
    let _ = replica.kill();
    let _ = staging.wait();
    let _ = replica.wait();
}

#[test]
fn the_readme_demo_proves_the_replica_equals_the_source() {
    let out = std::process::Command::new(drv_tests::drv_bin())
        .args(["demo", "--bytes", "24M", "--volume", "8M"])
        .output()
        .expect("run drv demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "drv demo failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("demo OK: the replica equals the source"), "{text}");
}
