//! The agent protocol against a real staging server (and replica), frame by frame, on the agent
//! link (TLS over TCP) agents use: refused peers (other CA, wrong role), malformed/truncated/
//! oversized/corrupted frames, unknown volumes, sequence gaps and retries, a RESYNC run that is
//! applied only once complete (snapshots refused meanwhile), snapshots taken at the applied epoch,
//! and writes refused on QUIC (status only).

use std::time::{Duration, Instant};

use drv_format::frame::{Frame, code};
use drv_format::record::Flags;
use drv_proto::status::VolumeState;
use drv_tests::Cluster;
use drv_transport::link::{self, Link, LinkReader};
use drv_transport::{FrameReader, FrameWriter, Identity, Role, ca, quic, tls};

type Reader = LinkReader;
type Writer = std::sync::Arc<Link>;

/// An agent link to staging, as agents open it.
async fn open(agent: &Identity, addr: std::net::SocketAddr) -> (Reader, Writer) {
    let cfg = tls::client_config(agent, Role::Staging).expect("client config");
    let (w, r) = link::connect(addr, cfg, 1 << 20).await.expect("connect");
    (r, w)
}

async fn next(r: &mut Reader) -> Frame {
    tokio::time::timeout(Duration::from_secs(10), r.next())
        .await
        .expect("answer in time")
        .expect("frame")
        .expect("open")
}

fn write(vid: u64, seq: u64, epoch: u64, flags: Flags, byte: u8) -> Frame {
    Frame::Write {
        volume_id: vid,
        seq,
        epoch,
        offset: seq * 4096,
        flags: flags.0,
        capture_unix: 0,
        data: vec![byte; 4096].into(),
    }
}

/// Runs `drv snapshot ARGS` against the first replica; (success, stdout + stderr).
fn snapshot(cl: &Cluster, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(drv_tests::drv_bin())
        .arg("snapshot")
        .args(args)
        .args(["--server", &cl.replica_addrs[0], "--certs"])
        .arg(&cl.certs)
        .output()
        .expect("run drv snapshot");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

async fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_refuses_bad_peers_and_frames_and_keeps_serving() {
    let cl = Cluster::new(1, 1 << 20);
    let mut staging = cl.start("staging", "stg1");
    let mut replica = cl.start("replica", "rep1");
    let addr: std::net::SocketAddr = cl.staging_addr.parse().unwrap();
    let agent = Identity::load(&cl.certs, "host1").unwrap();
    let vid = cl.volume_id;
    // Wait until staging listens.
    assert!(wait_for(Duration::from_secs(20), || cl.status(&cl.staging_addr, "staging", "admin").is_some()).await);

    // A certificate from another CA, and a certificate with the wrong role, are refused and logged.
    let other = cl.dir.path().join("other-ca");
    ca::init(&other).unwrap();
    ca::issue(&other, Role::Admin, "admin").unwrap();
    std::fs::copy(cl.certs.join("ca.pem"), other.join("ca.pem")).unwrap(); // it even trusts the right CA
    let out = std::process::Command::new(drv_tests::drv_bin())
        .args(["status", "--server", &cl.staging_addr, "--name", "admin"])
        .arg("--certs")
        .arg(&other)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a certificate from another CA was accepted");
    assert!(cl.status(&cl.staging_addr, "staging", "rep1").is_none(), "a replica certificate was accepted by staging");
    let log_has = |s: &str| cl.log("stg1").contains(s);
    assert!(
        wait_for(Duration::from_secs(5), || log_has(": rep1's certificate has role replica, expected admin")).await,
        "wrong role not logged:\n{}",
        cl.log("stg1")
    );
    assert_eq!(cl.log("stg1").matches("rep1's certificate").count(), 1, "said once:\n{}", cl.log("stg1"));
    assert!(wait_for(Duration::from_secs(5), || log_has("TLS handshake with 127.0.0.1:")).await, "{}", cl.log("stg1"));

    // An unknown volume is refused by number.
    let (mut r, w) = open(&agent, addr).await;
    w.send(&Frame::OpenVolume { volume_id: 999 }).unwrap();
    match next(&mut r).await {
        Frame::Error { code: c, message } => {
            assert_eq!(c, code::UNKNOWN_VOLUME);
            assert!(message.contains("volume 999"), "{message}");
        }
        f => panic!("{f:?}"),
    }

    // Malformed frames: each on its own stream, each refused with a message naming the problem.
    let good = write(vid, 1, 1, Flags::default(), 1).encode();
    let mut bad_magic = good.clone();
    bad_magic[0] ^= 0xff;
    let mut corrupt = good.clone();
    corrupt[100] ^= 1;
    let mut oversized = good.clone();
    oversized[8..12].copy_from_slice(&(64u32 << 20).to_le_bytes());
    let truncated = good[..good.len() - 100].to_vec();
    for (bytes, expect) in [
        (bad_magic, "bad magic"),
        (corrupt, "checksum mismatch"),
        (oversized, "over the limit"),
        (truncated, "truncated"),
    ] {
        let (mut r, w) = open(&agent, addr).await;
        w.send(&Frame::OpenVolume { volume_id: vid }).unwrap();
        assert!(matches!(next(&mut r).await, Frame::VolumeState { last_seq: 0, .. }));
        w.send_bytes(&bytes).unwrap();
        // The server may already have abandoned the stream (it stops reading after a bad frame).
        let _ = w.finish();
        match next(&mut r).await {
            Frame::Error { code: c, message } => {
                assert_eq!(c, code::MALFORMED);
                assert!(message.contains(expect), "expected {expect:?} in {message:?}");
            }
            f => panic!("{expect}: {f:?}"),
        }
    }
    let s = cl.staging_status().unwrap();
    assert_eq!(s.volumes[0].durable_seq, 0, "nothing from a bad frame is logged");

    // QUIC is for status: an agent certificate is refused there, and writes are refused even with
    // an administrator's, naming the transport agents use.
    let quic_to = |id: &Identity| quic::client(id, Role::Staging).unwrap();
    let as_agent = async {
        let mut c = quic::connect(&quic_to(&agent), addr, Role::Staging).await.ok()?;
        let (rx, tx) = c.open_bidirectional_stream().await.ok()?.split();
        let (mut r, mut w) = (FrameReader::new(rx, 1 << 20), FrameWriter::new(tx));
        w.send(&Frame::StatusRequest).await.ok()?;
        tokio::time::timeout(Duration::from_secs(5), r.next()).await.ok()?.ok()?
    };
    assert!(!matches!(as_agent.await, Some(Frame::StatusReply { .. })), "an agent certificate was served on QUIC");
    assert!(
        wait_for(Duration::from_secs(5), || log_has(": host1's certificate has role agent, expected admin")).await,
        "{}",
        cl.log("stg1")
    );
    let admin = Identity::load(&cl.certs, "admin").unwrap();
    let mut conn = quic::connect(&quic_to(&admin), addr, Role::Staging).await.expect("admin on QUIC");
    let (rx, tx) = conn.open_bidirectional_stream().await.expect("stream").split();
    let (mut qr, mut qw) = (FrameReader::new(rx, 1 << 20), FrameWriter::new(tx));
    qw.send(&Frame::OpenVolume { volume_id: vid }).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), qr.next()).await.expect("answer").expect("frame") {
        Some(Frame::Error { code: c, message }) => {
            assert_eq!(c, code::MALFORMED);
            assert!(message.contains("agent link"), "{message}");
        }
        f => panic!("{f:?}"),
    }

    // The server keeps serving: writes, a retry acknowledged without a second append, a gap refused.
    let (mut r, w) = open(&agent, addr).await;
    w.send(&Frame::OpenVolume { volume_id: vid }).unwrap();
    assert!(matches!(next(&mut r).await, Frame::VolumeState { last_seq: 0, .. }));
    for seq in 1..=3 {
        w.send(&write(vid, seq, 1, Flags::default(), seq as u8)).unwrap();
        assert!(matches!(next(&mut r).await, Frame::Ack { seq: s, .. } if s == seq));
    }
    w.send(&write(vid, 2, 1, Flags::default(), 2)).unwrap();
    assert!(matches!(next(&mut r).await, Frame::Ack { seq: 2, .. }));
    w.send(&write(vid, 9, 2, Flags::default(), 9)).unwrap();
    match next(&mut r).await {
        Frame::Error { code: c, message } => {
            assert_eq!(c, code::SEQUENCE_GAP);
            assert!(message.contains("seq 9") && message.contains("up to seq 3"), "{message}");
        }
        f => panic!("{f:?}"),
    }
    let s = cl.staging_status().unwrap();
    assert_eq!(s.wrls[0].appends, 3, "the retry was not appended again: {s:?}");

    // A RESYNC run is logged but not applied until it is complete.
    for seq in 4..=6 {
        w.send(&write(vid, seq, 2, Flags::RESYNC, 0x70 + seq as u8)).unwrap();
        assert!(matches!(next(&mut r).await, Frame::Ack { .. }));
    }
    let rep = |c: &Cluster| c.replica_status();
    assert!(
        wait_for(Duration::from_secs(20), || rep(&cl).is_some_and(|s| s.volumes[0].state == VolumeState::Resyncing))
            .await,
        "replica never reported resyncing: {:?}\n{}",
        rep(&cl),
        cl.log("rep1")
    );
    let s = rep(&cl).unwrap();
    assert_eq!(s.volumes[0].applied_seq, 3, "nothing of the resync run is applied yet: {s:?}");
    // A snapshot now is refused, with the reason.
    let (ok, out) = snapshot(&cl, &["create", "vol1", "during-resync"]);
    assert!(!ok && out.contains("resyncing"), "snapshot during a resync: {out}");
    // The run ends with the next ordered write; that completes it.
    w.send(&write(vid, 7, 3, Flags::default(), 7)).unwrap();
    assert!(matches!(next(&mut r).await, Frame::Ack { seq: 7, .. }));
    w.send(&write(vid, 8, 4, Flags::FLUSH, 8)).unwrap();
    assert!(matches!(next(&mut r).await, Frame::Ack { seq: 8, .. }));
    assert!(
        wait_for(Duration::from_secs(20), || rep(&cl).is_some_and(|s| s.volumes[0].applied_seq == 7)).await,
        "{:?}",
        rep(&cl)
    );
    let img = std::fs::read(cl.dir.path().join("rep1/vol1.img")).unwrap();
    for seq in 1..=7u64 {
        let expect = if (4..=6).contains(&seq) { 0x70 + seq as u8 } else { seq as u8 };
        assert!(img[seq as usize * 4096..(seq as usize + 1) * 4096].iter().all(|b| *b == expect), "block {seq}");
    }
    // Resync complete: a snapshot is taken at the applied epoch and shows exactly that state.
    let (ok, out) = snapshot(&cl, &["create", "vol1", "after-resync", "--json"]);
    assert!(ok, "snapshot: {out}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["seq"], 7, "{info}");
    let digest = |cl: &Cluster| {
        let (ok, out) = snapshot(cl, &["digest", "vol1", "after-resync", "--json"]);
        assert!(ok, "digest: {out}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["xxh3_128"].as_str().unwrap().to_owned()
    };
    let want = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&img));
    assert_eq!(digest(&cl), want, "the snapshot is the applied image");
    // Replication goes on and overwrites a block the snapshot holds: its image stays.
    let mut over = write(vid, 9, 5, Flags::default(), 0xaa);
    if let Frame::Write { offset, .. } = &mut over {
        *offset = 4096;
    }
    w.send(&over).unwrap();
    assert!(matches!(next(&mut r).await, Frame::Ack { seq: 9, .. }));
    w.send(&write(vid, 10, 6, Flags::default(), 10)).unwrap();
    assert!(matches!(next(&mut r).await, Frame::Ack { seq: 10, .. }));
    assert!(
        wait_for(Duration::from_secs(20), || rep(&cl).is_some_and(|s| s.volumes[0].applied_seq >= 9)).await,
        "{:?}",
        rep(&cl)
    );
    let now = std::fs::read(cl.dir.path().join("rep1/vol1.img")).unwrap();
    assert!(now[4096..8192].iter().all(|b| *b == 0xaa), "the target moved on");
    assert_eq!(digest(&cl), want, "the snapshot's image did not");
    assert!(rep(&cl).unwrap().volumes[0].snapshot_store_bytes > 0, "the old block is in the store");
    let (ok, out) = snapshot(&cl, &["create", "vol1", "after-resync"]);
    assert!(!ok && out.contains("exists"), "a second snapshot of the same name: {out}");
    let (ok, out) = snapshot(&cl, &["create", "vol1", "../escape"]);
    assert!(!ok && out.contains("snapshot name"), "a bad name: {out}");
    let (ok, out) = snapshot(&cl, &["list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    assert!(ok && list.as_array().is_some_and(|l| l.len() == 1 && l[0]["name"] == "after-resync"), "{out}");
    assert!(list[0]["own_bytes"].as_u64().unwrap() > 0, "{out}");
    let (ok, out) = snapshot(&cl, &["delete", "vol1", "after-resync", "--json"]);
    let deleted: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    assert!(ok && deleted["freed_bytes"] == list[0]["own_bytes"], "{out}");
    let (ok, out) = snapshot(&cl, &["delete", "vol1", "after-resync"]);
    assert!(!ok && out.contains("has no snapshot after-resync"), "a second delete: {out}");
    assert_eq!(rep(&cl).unwrap().volumes[0].snapshot_store_bytes, 0);
    let _ = staging.kill();
    let _ = replica.kill();
    let _ = staging.wait();
    let _ = replica.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_over_the_record_limit_is_refused_and_leaves_no_gap() {
    let cl = Cluster::new(1, 16 << 20);
    let mut staging = cl.start("staging", "stg1");
    let addr: std::net::SocketAddr = cl.staging_addr.parse().unwrap();
    let agent = Identity::load(&cl.certs, "host1").unwrap();
    assert!(wait_for(Duration::from_secs(20), || cl.status(&cl.staging_addr, "staging", "admin").is_some()).await);
    let vid = cl.volume_id;
    let (mut r, w) = open(&agent, addr).await;
    w.send(&Frame::OpenVolume { volume_id: vid }).unwrap();
    assert!(matches!(next(&mut r).await, Frame::VolumeState { last_seq: 0, .. }));
    // This cluster's WRL has 4 MiB segments: a 4 MiB write cannot be one record.
    let big = Frame::Write {
        volume_id: vid,
        seq: 1,
        epoch: 1,
        offset: 0,
        flags: 0,
        capture_unix: 0,
        data: vec![1u8; 4 << 20].into(),
    };
    w.send(&big).unwrap();
    match next(&mut r).await {
        Frame::Error { code: c, message } => {
            assert_eq!(c, code::INVALID);
            assert!(message.contains("record limit"), "{message}");
        }
        f => panic!("{f:?}"),
    }
    // The sequence did not move: seq 1 is still the next write, and it is logged.
    w.send(&write(vid, 1, 1, Flags::default(), 1)).unwrap();
    assert!(matches!(next(&mut r).await, Frame::Ack { seq: 1, .. }));
    let _ = staging.kill();
    let _ = staging.wait();
}
