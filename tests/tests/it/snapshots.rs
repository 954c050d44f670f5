//! Copy-on-write snapshots on a live replica: taken at random moments while an agent writes, their
//! images checked against the recorded write history (every write's sequence number and data)
//! replayed to exactly the snapshot's position, and again after more writes and SIGKILLs of the
//! replica while it applies.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use drv_agent::{Agent, AgentOptions, FileDisk};
use drv_format::record::Flags;
use drv_proto::status::SnapshotDigest;
use drv_tests::{Cluster, Rng, pattern};

use crate::agent::{blank_image, drv, host1, kill_all, staging_up, strings, until_in};

pub(crate) const VOLUME: u64 = 8 << 20;

/// The image after writes `1..=seq` of `history` (`(offset, data)` by `seq - 1`).
pub(crate) fn image_at(history: &[(u64, Vec<u8>)], seq: u64) -> Vec<u8> {
    let mut img = vec![0u8; VOLUME as usize];
    for (offset, data) in &history[..seq as usize] {
        img[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    img
}

pub(crate) fn conn(cl: &Cluster, json: bool) -> Vec<String> {
    let mut v = strings(&["--server", &cl.replica_addrs[0], "--certs", &cl.certs.display().to_string()]);
    if json {
        v.push("--json".into());
    }
    v
}

pub(crate) async fn snapshot_json(cl: &Cluster, args: &[&str]) -> serde_json::Value {
    let mut a = strings(&["snapshot"]);
    a.extend(strings(args));
    a.extend(conn(cl, true));
    serde_json::from_str(drv(a).await.trim()).unwrap()
}

/// Staging, replica rep1 and an agent whose writes are one at a time, each its own epoch, with no
/// idle EPOCH_END: write i gets sequence i + 1 (and ends a unit once the next one is sent).
pub(crate) async fn writer_cluster(cl: &Cluster) -> (std::process::Child, std::process::Child, Agent) {
    let staging = staging_up(cl).await;
    let replica = cl.start("replica", "rep1");
    let (_source, f) = blank_image(cl);
    let (id, addr) = host1(cl);
    let opts = AgentOptions { epoch_close_idle: Duration::from_secs(3600), ..AgentOptions::default() };
    let agent =
        Agent::start(&id, addr, cl.volume_id, cl.volume_bytes, Arc::new(FileDisk(f)), None, opts).await.unwrap();
    (staging, replica, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_taken_under_load_keep_their_images_through_replica_kills() {
    let cl = Cluster::new(1, VOLUME);
    let (mut staging, mut replica, agent) = writer_cluster(&cl).await;
    let mut rng = Rng::new(0x5a95);
    let mut history: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut snaps: Vec<(String, u64)> = Vec::new();
    let applied = |cl: &Cluster| cl.replica_status().map(|s| s.volumes[0].applied_seq).unwrap_or(0);
    for round in 0..6u64 {
        // A burst of writes, most to a hot eighth of the volume, with snapshots taken while it
        // runs (the replica applies as it goes).
        for i in 0..120u64 {
            let len = 4096 * (1 + rng.below(16));
            let span = if rng.below(4) == 0 { VOLUME } else { VOLUME / 8 + len };
            let offset = rng.below((span - len) / 4096 + 1) * 4096;
            let data = pattern(rng.next_u64(), len as usize);
            agent.write(offset, Bytes::from(data.clone()), Flags::default()).await.unwrap();
            history.push((offset, data));
            assert_eq!(agent.position().0, history.len() as u64 + 1, "one sequence number per write");
            if i % 40 == 39 {
                let up = || cl.replica_status().is_some();
                until_in(&cl, "the replica to answer", Duration::from_secs(30), up).await;
                let name = format!("r{round}-{i}");
                let s = snapshot_json(&cl, &["create", "vol1", &name]).await;
                snaps.push((name, s["seq"].as_u64().unwrap()));
            }
        }
        if round % 2 == 1 {
            // SIGKILL while it applies; the restarted replica catches up from its DR log.
            kill_all([&mut replica]);
            replica = cl.start("replica", "rep1");
        }
    }
    let last = history.len() as u64;
    // The last write's epoch closes with one more write (to a block already written).
    agent.write(history[0].0, Bytes::from(history[0].1.clone()), Flags::default()).await.unwrap();
    history.push(history[0].clone());
    until_in(&cl, "the replica to apply every write", Duration::from_secs(60), || applied(&cl) >= last).await;
    for (name, seq) in &snaps {
        assert!(*seq <= last, "{name} at seq {seq}");
        let d: SnapshotDigest = serde_json::from_value(snapshot_json(&cl, &["digest", "vol1", name]).await).unwrap();
        let want = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&image_at(&history, *seq)));
        assert_eq!(d.xxh3_128, want, "snapshot {name} at seq {seq} differs from the history replayed to it");
    }
    // Deleting them all frees the store.
    let list = snapshot_json(&cl, &["list", "vol1"]).await;
    assert_eq!(list.as_array().unwrap().len(), snaps.len(), "{list}");
    let on_disk = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(cl.dir.path().join("rep1/snapshots/vol1/cow.data")).unwrap().blocks() * 512
    };
    let before = on_disk();
    let mut freed = 0;
    for (name, _) in &snaps {
        freed += snapshot_json(&cl, &["delete", "vol1", name]).await["freed_bytes"].as_u64().unwrap();
    }
    assert!(freed > 0);
    // The freed slots' space went back to the file system.
    assert!(
        on_disk() + freed / 2 <= before,
        "store file: {before} bytes on disk before, {} after freeing {freed}",
        on_disk()
    );
    let st = cl.replica_status().unwrap();
    assert_eq!(st.volumes[0].snapshot_store_bytes, 0, "{st:?}");
    println!("{} snapshots checked against the history; {freed} bytes freed by deleting them", snaps.len());
    kill_all([&mut staging, &mut replica]);
}

/// A volume whose snapshot store has a limit: once the snapshots need more, apply waits (nothing
/// a snapshot needs is overwritten, no snapshot is dropped), the status says why, a new snapshot
/// is refused; deleting the snapshot lets apply go on to the source's image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_snapshot_store_holds_apply_back_until_a_snapshot_is_deleted() {
    let cl = Cluster::new(1, VOLUME);
    let store = cl.config.display().to_string();
    let set = strings(&["config", "--store", &store, "set", "volume", "vol1", "snapshot_bytes_limit=4M"]);
    drv(set).await;
    let mut staging = staging_up(&cl).await;
    let mut replica = cl.start("replica", "rep1");
    let (source, f) = blank_image(&cl);
    let (id, addr) = host1(&cl);
    let agent =
        Agent::start(&id, addr, cl.volume_id, cl.volume_bytes, Arc::new(FileDisk(f)), None, AgentOptions::default())
            .await
            .unwrap();
    let applied = |cl: &Cluster| cl.replica_status().map(|s| s.volumes[0].applied_seq).unwrap_or(0);
    agent.write(0, Bytes::from(pattern(1, 65536)), Flags::default()).await.unwrap();
    let first = agent.position().0 - 1;
    until_in(&cl, "the first write applied", Duration::from_secs(30), || applied(&cl) >= first).await;
    let snap = snapshot_json(&cl, &["create", "vol1", "keep"]).await;
    let digest = snapshot_json(&cl, &["digest", "vol1", "keep"]).await["xxh3_128"].clone();
    // 8 MiB of blocks the snapshot holds (zeros) overwritten: twice what the store may keep.
    for i in 0..128u64 {
        agent.write(i * 65536, Bytes::from(pattern(100 + i, 65536)), Flags::default()).await.unwrap();
    }
    let full = || cl.replica_status().and_then(|s| s.volumes[0].error.clone()).is_some_and(|e| e.contains("is full"));
    until_in(&cl, "apply to wait for room in the store", Duration::from_secs(30), full).await;
    let held = applied(&cl);
    assert!(held < agent.position().0 - 1, "apply went past the limit");
    let mut args = strings(&["snapshot", "create", "vol1", "another"]);
    args.extend(conn(&cl, false));
    let e = crate::agent::drv_fails(args).await;
    assert!(e.contains("snapshot_bytes_limit") && e.contains("vol1"), "{e}");
    assert_eq!(snapshot_json(&cl, &["digest", "vol1", "keep"]).await["xxh3_128"], digest, "{snap}");
    // Deleted: apply goes on to the source's image.
    snapshot_json(&cl, &["delete", "vol1", "keep"]).await;
    let (next, _) = agent.position();
    crate::agent::assert_replica_equals(&cl, &source, next).await;
    assert!(cl.log("rep1").matches("is full").count() == 1, "said once:\n{}", cl.log("rep1"));
    kill_all([&mut staging, &mut replica]);
}

/// Any point in time: a volume with a retention window; after writes (some with a cache flush)
/// and a replica SIGKILL, snapshots created afterwards `--at` random sequence numbers and at a
/// flush point's capture time show the history replayed to exactly the point picked, and keep it
/// while replication goes on; points before the window are refused with a clear message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_at_past_points_of_the_retention_window_show_the_history_there() {
    let cl = Cluster::new(1, VOLUME);
    let (mut staging, mut replica, agent) = writer_cluster(&cl).await;
    let mut rng = Rng::new(0xa7);
    let mut history: Vec<(u64, Vec<u8>)> = Vec::new();
    let write = async |rng: &mut Rng, history: &mut Vec<(u64, Vec<u8>)>, flags: Flags| {
        let len = 4096 * (1 + rng.below(8));
        let offset = rng.below((VOLUME / 4 - len) / 4096 + 1) * 4096;
        let data = pattern(rng.next_u64(), len as usize);
        agent.write(offset, Bytes::from(data.clone()), flags).await.unwrap();
        history.push((offset, data));
    };
    for _ in 0..20 {
        write(&mut rng, &mut history, Flags::default()).await;
    }
    let applied = |cl: &Cluster| cl.replica_status().map(|s| s.volumes[0].applied_seq).unwrap_or(0);
    until_in(&cl, "the first writes applied", Duration::from_secs(30), || applied(&cl) >= 19).await;
    let mut args = strings(&["snapshot", "points", "vol1"]);
    args.extend(conn(&cl, false));
    let text = drv(args).await;
    assert!(text.contains("no retention window") && text.contains("now     seq"), "{text}");
    let mut args = strings(&["snapshot", "create", "vol1", "early", "--at", "5"]);
    args.extend(conn(&cl, false));
    let e = crate::agent::drv_fails(args).await;
    assert!(e.contains("no retention window is kept for this volume"), "{e}");
    // Retention configured; the replica restarted opens the window where it stands.
    let store = cl.config.display().to_string();
    drv(strings(&["config", "--store", &store, "set", "volume", "vol1", "retention=1h"])).await;
    kill_all([&mut replica]);
    replica = cl.start("replica", "rep1");
    let window = || cl.replica_status().and_then(|s| s.volumes[0].window.clone()).and_then(|w| w.oldest);
    until_in(&cl, "the window to open", Duration::from_secs(30), || window().is_some()).await;
    let from = window().unwrap().seq;
    assert!((19..=20).contains(&from), "window opened at {from}");
    let mut flushes = Vec::new();
    for i in 0..200u64 {
        let flags = if i % 25 == 24 { Flags::FLUSH } else { Flags::default() };
        write(&mut rng, &mut history, flags).await;
        if flags == Flags::FLUSH {
            flushes.push(history.len() as u64);
        }
        if i == 120 {
            kill_all([&mut replica]);
            replica = cl.start("replica", "rep1");
        }
    }
    let last = history.len() as u64;
    write(&mut rng, &mut history, Flags::default()).await;
    until_in(&cl, "the replica to apply every write", Duration::from_secs(60), || applied(&cl) >= last).await;
    let mut args = strings(&["snapshot", "points", "vol1", "--flush", "3"]);
    args.extend(conn(&cl, false));
    let text = drv(args).await;
    assert!(
        text.contains(&format!("oldest  seq {from:>10}")) && text.contains("8 points end with a flush (the newest 3)"),
        "{text}"
    );
    let all = snapshot_json(&cl, &["points", "vol1", "--flush", "100"]).await;
    let points = all["window"].clone();
    assert_eq!(points["oldest"]["seq"].as_u64(), Some(from), "{points}");
    assert!(points["newest"]["seq"].as_u64().unwrap() >= last, "{points}");
    let listed: Vec<u64> =
        points["flush_points"].as_array().unwrap().iter().map(|p| p["seq"].as_u64().unwrap()).collect();
    assert_eq!(listed, flushes, "the flush points: {points}");
    let digest =
        |history: &[(u64, Vec<u8>)], seq: u64| format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&image_at(history, seq)));
    // Random sequence numbers inside the window, and a flush point's capture time.
    let mut made = Vec::new();
    for k in 0..6 {
        let at = from + rng.below(last - from + 1);
        let s = snapshot_json(&cl, &["create", "vol1", &format!("at{k}"), "--at", &at.to_string()]).await;
        assert_eq!(s["seq"].as_u64(), Some(at), "every write ends a unit here: {s}");
        made.push((format!("at{k}"), at));
    }
    let flush = &points["flush_points"][1];
    let when = flush["capture_unix"].as_u64().unwrap();
    let rfc = time::OffsetDateTime::from_unix_timestamp(when as i64)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let s = snapshot_json(&cl, &["create", "vol1", "at-time", "--at", &rfc]).await;
    let seq = s["seq"].as_u64().unwrap();
    assert!(seq >= flush["seq"].as_u64().unwrap() && s["capture_unix"].as_u64() == Some(when), "{s} for {flush}");
    made.push(("at-time".into(), seq));
    // Replication goes on; every image stays the history at its point.
    for _ in 0..60 {
        write(&mut rng, &mut history, Flags::default()).await;
    }
    let last = history.len() as u64 - 1;
    until_in(&cl, "the replica to apply the rest", Duration::from_secs(60), || applied(&cl) >= last).await;
    for (name, seq) in &made {
        let d: SnapshotDigest = serde_json::from_value(snapshot_json(&cl, &["digest", "vol1", name]).await).unwrap();
        assert_eq!(d.xxh3_128, digest(&history, *seq), "snapshot {name} at seq {seq}");
    }
    // Before the window: refused, nothing made.
    for at in ["5", "-50m"] {
        let mut args = strings(&["snapshot", "create", "vol1", "early", "--at", at]);
        args.extend(conn(&cl, false));
        let e = crate::agent::drv_fails(args).await;
        assert!(e.contains("before the retention window"), "--at {at}: {e}");
    }
    let mut args = strings(&["snapshot", "create", "vol1", "early", "--at", "yesterday"]);
    args.extend(conn(&cl, false));
    let e = crate::agent::drv_fails(args).await;
    assert!(e.contains("RFC 3339"), "{e}");
    let list = snapshot_json(&cl, &["list", "vol1"]).await;
    assert_eq!(list.as_array().unwrap().len(), made.len(), "{list}");
    let all = snapshot_json(&cl, &["points", "vol1"]).await;
    assert_eq!(all["snapshots"].as_array().unwrap().len(), made.len(), "{all}");
    assert!(all["current"]["seq"].as_u64().unwrap() >= last, "{all}");
    kill_all([&mut staging, &mut replica]);
}

/// Runs a program no one here wrote; its output, or a panic naming it.
pub(crate) async fn run_tool(prog: &str, args: Vec<String>) -> std::process::Output {
    let p = prog.to_owned();
    tokio::task::spawn_blocking(move || std::process::Command::new(&p).args(&args).output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("run {prog} (Debian: qemu-utils, libnbd-bin): {e}"))
}

/// A snapshot served over NBD by the replica while replication goes on, read by clients no one
/// here wrote: `qemu-img compare` against the write history replayed to the snapshot, `nbdinfo`'s
/// size and export name, `nbdcopy` to a file; a client that sends garbage is closed while the
/// others are served; a snapshot is not deleted while exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_exported_over_nbd_reads_back_with_qemu_img_nbdinfo_and_nbdcopy() {
    let cl = Cluster::new(1, VOLUME);
    let (mut staging, mut replica, agent) = writer_cluster(&cl).await;
    let mut rng = Rng::new(0xdb);
    let mut history: Vec<(u64, Vec<u8>)> = Vec::new();
    for _ in 0..60 {
        let len = 4096 * (1 + rng.below(16));
        let offset = rng.below((VOLUME - len) / 4096 + 1) * 4096;
        let data = pattern(rng.next_u64(), len as usize);
        agent.write(offset, Bytes::from(data.clone()), Flags::default()).await.unwrap();
        history.push((offset, data));
    }
    let applied = |cl: &Cluster| cl.replica_status().map(|s| s.volumes[0].applied_seq).unwrap_or(0);
    until_in(&cl, "the writes applied", Duration::from_secs(30), || applied(&cl) >= 59).await;
    let snap = snapshot_json(&cl, &["create", "vol1", "s1"]).await;
    let seq = snap["seq"].as_u64().unwrap();
    let expected = cl.dir.path().join("expected.img");
    std::fs::write(&expected, image_at(&history, seq)).unwrap();
    // Replication goes on under the export.
    for i in 0..20u64 {
        agent.write(i * 65536, Bytes::from(pattern(900 + i, 65536)), Flags::default()).await.unwrap();
    }
    let e = snapshot_json(&cl, &["export", "vol1", "s1", "--listen", "127.0.0.1:0"]).await;
    let url = format!("nbd://{}/s1", e["listen"].as_str().unwrap());
    let out =
        run_tool("qemu-img", strings(&["compare", "-f", "raw", "-F", "raw", &expected.display().to_string(), &url]))
            .await;
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_tool("nbdinfo", strings(&["--json", &url])).await;
    assert!(out.status.success(), "nbdinfo: {}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["exports"][0]["export-size"].as_u64(), Some(VOLUME), "{info}");
    assert_eq!(info["exports"][0]["is_read_only"].as_bool(), Some(true), "{info}");
    // A client that sends garbage is closed; the others are served.
    let mut junk = tokio::net::TcpStream::connect(e["listen"].as_str().unwrap()).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut junk, &[0xee; 64]).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read_to_end(&mut junk, &mut rest))
        .await
        .expect("the server closes a client that breaks the protocol");
    // Closed: an orderly end, or a reset (the junk it did not read was still queued).
    assert!(n.as_ref().map_or_else(|e| e.kind() == std::io::ErrorKind::ConnectionReset, |_| true), "{n:?}");
    let copy = cl.dir.path().join("copy.img");
    let out = run_tool("nbdcopy", strings(&[&url, &copy.display().to_string()])).await;
    assert!(out.status.success(), "nbdcopy: {}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&expected).unwrap(), "nbdcopy's copy differs");
    // Not deleted while exported; unexported, it is.
    let mut args = strings(&["snapshot", "delete", "vol1", "s1"]);
    args.extend(conn(&cl, false));
    let err = crate::agent::drv_fails(args).await;
    assert!(err.contains("exported over NBD") && err.contains("unexport"), "{err}");
    snapshot_json(&cl, &["unexport", "vol1", "s1"]).await;
    let out = run_tool("nbdinfo", strings(&[&url])).await;
    assert!(!out.status.success(), "still served after unexport");
    snapshot_json(&cl, &["delete", "vol1", "s1"]).await;
    kill_all([&mut staging, &mut replica]);
}

/// A raw NBD client through the handshake (fixed newstyle, `OPT_GO` for `name`), ready for
/// requests.
async fn nbd_go(addr: &str, name: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).await.unwrap();
    // Option replies until the ACK (type 1).
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await.unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut skip = vec![0u8; len as usize];
        s.read_exact(&mut skip).await.unwrap();
        assert!(kind < 1 << 31, "option error {kind:#x}");
        if kind == 1 {
            return s;
        }
    }
}

fn nbd_request(command: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&command.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// A writable export: qemu-io's unaligned writes and nbdcopy's whole-image write land in the
/// private overlay and read back from it; several clients at once, some dropping mid-request,
/// leave the others served; the snapshot's digest never changes, and a new export after
/// `unexport` shows the snapshot as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writable_export_takes_writes_from_several_clients_and_never_changes_the_snapshot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cl = Cluster::new(1, VOLUME);
    let (mut staging, mut replica, agent) = writer_cluster(&cl).await;
    for i in 0..32u64 {
        agent.write(i * 131072, Bytes::from(pattern(i, 65536)), Flags::default()).await.unwrap();
    }
    let applied = |cl: &Cluster| cl.replica_status().map(|s| s.volumes[0].applied_seq).unwrap_or(0);
    until_in(&cl, "the writes applied", Duration::from_secs(30), || applied(&cl) >= 31).await;
    let snap = snapshot_json(&cl, &["create", "vol1", "w1"]).await;
    let digest = snapshot_json(&cl, &["digest", "vol1", "w1"]).await["xxh3_128"].clone();
    let dir = cl.dir.path();
    let original = dir.join("original.img");
    let e = snapshot_json(&cl, &["export", "vol1", "w1", "--listen", "127.0.0.1:0"]).await;
    let url = format!("nbd://{}/w1", e["listen"].as_str().unwrap());
    let out = run_tool("nbdcopy", strings(&[&url, &original.display().to_string()])).await;
    assert!(out.status.success(), "nbdcopy: {}", String::from_utf8_lossy(&out.stderr));
    snapshot_json(&cl, &["unexport", "vol1", "w1"]).await;

    let e = snapshot_json(&cl, &["export", "vol1", "w1", "--listen", "127.0.0.1:0", "--writable"]).await;
    assert_eq!(e["writable"], true, "{e}");
    let addr = e["listen"].as_str().unwrap().to_owned();
    let url = format!("nbd://{addr}/w1");
    // Replication goes on under it.
    for i in 0..8u64 {
        agent.write(i * 4096, Bytes::from(pattern(500 + i, 4096)), Flags::default()).await.unwrap();
    }
    // Unaligned writes, a zeroed range, and a flush, from qemu-io.
    let mut model = std::fs::read(&original).unwrap();
    let cmds = ["write -P 0xab 1000 5000", "write -z 70000 9000", "write -P 0x5c 8388000 608", "flush"];
    let mut args = strings(&["-f", "raw"]);
    for c in cmds {
        args.extend(strings(&["-c", c]));
    }
    args.push(url.clone());
    let out = run_tool("qemu-io", args).await;
    assert!(
        out.status.success(),
        "qemu-io: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    model[1000..6000].fill(0xab);
    model[70000..79000].fill(0);
    model[8388000..8388608].fill(0x5c);
    let expected = dir.join("expected.img");
    std::fs::write(&expected, &model).unwrap();
    // Clients that drop mid-request: a READ whose reply is never read, a WRITE whose data
    // never comes.
    let mut r = nbd_go(&addr, "w1").await;
    r.write_all(&nbd_request(0, 1, 0, 8 << 20)).await.unwrap();
    drop(r);
    let mut w = nbd_go(&addr, "w1").await;
    w.write_all(&nbd_request(1, 2, 0, 1 << 20)).await.unwrap();
    w.write_all(&[0x77; 100]).await.unwrap();
    drop(w);
    // A bad request gets an error reply, and the connection goes on.
    let mut c = nbd_go(&addr, "w1").await;
    c.write_all(&nbd_request(0, 3, VOLUME, 4096)).await.unwrap();
    let mut reply = [0u8; 16];
    c.read_exact(&mut reply).await.unwrap();
    assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 22, "a read past the end is EINVAL");
    c.write_all(&nbd_request(0, 4, 1000, 8)).await.unwrap();
    let mut reply = [0u8; 24];
    c.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply[16..], &[0xab; 8], "the overlay's data");
    // Several clients at once, each comparing the whole export.
    let compares: Vec<_> = (0..3)
        .map(|_| {
            let args = strings(&["compare", "-f", "raw", "-F", "raw", &expected.display().to_string(), &url]);
            tokio::spawn(run_tool("qemu-img", args))
        })
        .collect();
    for c in compares {
        let out = c.await.unwrap();
        assert!(out.status.success(), "qemu-img compare: {}", String::from_utf8_lossy(&out.stdout));
    }
    // nbdcopy writes a whole image into it.
    let other = dir.join("other.img");
    std::fs::write(&other, pattern(77, VOLUME as usize)).unwrap();
    let out = run_tool("nbdcopy", strings(&[&other.display().to_string(), &url])).await;
    assert!(out.status.success(), "nbdcopy to the export: {}", String::from_utf8_lossy(&out.stderr));
    let out =
        run_tool("qemu-img", strings(&["compare", "-f", "raw", "-F", "raw", &other.display().to_string(), &url])).await;
    assert!(out.status.success(), "after nbdcopy: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(snapshot_json(&cl, &["digest", "vol1", "w1"]).await["xxh3_128"], digest, "the snapshot changed");
    // The overlay goes with the export.
    snapshot_json(&cl, &["unexport", "vol1", "w1"]).await;
    let e = snapshot_json(&cl, &["export", "vol1", "w1", "--listen", "127.0.0.1:0"]).await;
    let url = format!("nbd://{}/w1", e["listen"].as_str().unwrap());
    let out =
        run_tool("qemu-img", strings(&["compare", "-f", "raw", "-F", "raw", &original.display().to_string(), &url]))
            .await;
    assert!(out.status.success(), "the snapshot after the overlay: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(snap["seq"], e["seq"]);
    kill_all([&mut staging, &mut replica]);
}
