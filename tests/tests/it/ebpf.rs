//! eBPF on the host: exact events from a loop device (`drv trace`), and change tracking shipped
//! to a real staging and replica (`drv track`, `drv track sync`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use drv_tests::{Cluster, Rng};

use crate::agent::{assert_replica_equals, drv, json_lines, kill_all, staging_up, strings, until};

/// Whether this test can run: root is needed for loop devices and BPF. Without it the test is
/// skipped with a message, unless `DRV_REQUIRE_ROOT_TESTS=1` (CI), which makes it fail.
pub(crate) fn root_or_skip(test: &str) -> bool {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("DRV_REQUIRE_ROOT_TESTS").as_deref() != Ok("1"),
        "{test} needs root (DRV_REQUIRE_ROOT_TESTS=1)"
    );
    eprintln!("{test}: skipped, needs root");
    false
}

/// The backing file of a loop device, if it has one.
pub(crate) fn backing_of(dev: &str) -> Option<PathBuf> {
    drv_agent::user::backing_of(Path::new(dev))
}

/// A loop device with direct I/O over an image file; detached (only this one) on drop.
pub(crate) struct Loop {
    pub(crate) dev: PathBuf,
}

impl Loop {
    pub(crate) fn attach(image: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(image)
            .output()
            .expect("run losetup");
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        Loop { dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()) }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Unmounts (thawing first, in case a failed test left it frozen) on drop.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.0).output();
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Starts `drv track vol1` on `dev` and waits for its control socket: (the process, its run dir).
async fn start_tracker(cl: &Cluster, dev: &str) -> (Child, String) {
    let run = cl.dir.path().join("run");
    let run_dir = run.display().to_string();
    let mut tracker = Command::new(drv_tests::drv_bin())
        .args(["track", "vol1", "--name", "host1", "--device", dev, "--run-dir", &run_dir])
        .arg("--config")
        .arg(&cl.config)
        .arg("--certs")
        .arg(&cl.certs)
        .arg("--state-dir")
        .arg(cl.dir.path().join("track-state"))
        .env("DRV_LOG", "info")
        .stderr(std::fs::File::create(cl.dir.path().join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    until("the tracker's control socket", Duration::from_secs(30), || {
        if let Some(st) = tracker.try_wait().unwrap() {
            panic!("drv track exited ({st}): {}", cl.log("agent"));
        }
        run.join("vol1.sock").exists()
    })
    .await;
    (tracker, run_dir)
}

fn dd(args: &[String]) {
    let out = Command::new("dd").args(args).output().expect("run dd");
    assert!(out.status.success(), "dd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Stops a `drv trace` with SIGTERM and returns its JSON lines.
fn stop_trace(mut child: Child, mut out: BufReader<std::process::ChildStdout>) -> Vec<serde_json::Value> {
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let mut text = String::new();
    std::io::Read::read_to_string(&mut out, &mut text).unwrap();
    let st = child.wait().unwrap();
    assert!(st.success(), "drv trace failed: {text}");
    json_lines(&text)
}

/// Starts `drv trace ARGS --json` and waits for its ready line.
fn start_trace(args: &[&str]) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(drv_tests::drv_bin())
        .arg("trace")
        .args(args)
        .arg("--json")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn drv trace");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not the ready line: {line:?}: {e}"));
    assert_eq!(v["ready"], true, "{line}");
    (child, out)
}

#[test]
fn dd_writes_produce_exactly_their_issue_events_and_a_flush() {
    if !root_or_skip("dd_writes_produce_exactly_their_issue_events_and_a_flush") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(64 << 20).unwrap();
    let lo = Loop::attach(&image);
    let dev = lo.dev.display().to_string();
    let metrics = dir.path().join("drv.prom");
    let (child, out) = start_trace(&[&dev, "--events", "--metrics", &metrics.display().to_string()]);
    // 16 O_DIRECT writes of 4 KiB from block 100, one at a time, then fsync (a FLUSH).
    const N: u64 = 16;
    dd(&strings(&[
        "if=/dev/urandom",
        &format!("of={dev}"),
        "bs=4k",
        &format!("count={N}"),
        "seek=100",
        "oflag=direct",
        "conv=fsync",
    ]));
    std::thread::sleep(Duration::from_millis(200));
    let lines = stop_trace(child, out);
    let events: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("event").is_some()).collect();
    let issued = |op: &str| -> Vec<&serde_json::Value> {
        events.iter().copied().filter(|e| e["event"] == "issue" && e["op"] == op).collect()
    };
    let writes = issued("write");
    let offsets: Vec<u64> = writes.iter().map(|e| e["offset"].as_u64().unwrap()).collect();
    let expected: Vec<u64> = (0..N).map(|i| (100 + i) * 4096).collect();
    assert_eq!(offsets, expected, "issue events of the writes, in order: {events:#?}");
    assert!(writes.iter().all(|e| e["len"] == 4096 && e["dev"].as_str().unwrap().starts_with("7:")), "{writes:#?}");
    // One write at a time: each completed before the next was issued, so each has its own epoch.
    let epochs: Vec<u64> = writes.iter().map(|e| e["epoch"].as_u64().unwrap()).collect();
    assert_eq!(epochs, (1..=N).collect::<Vec<_>>(), "{writes:#?}");
    let flushes = issued("flush");
    assert_eq!(flushes.len(), 1, "one flush from conv=fsync: {events:#?}");
    assert_eq!(flushes[0]["preflush"], true);
    // Every request also completed, and nothing was lost (the counters are read and reported).
    let completed =
        events.iter().filter(|e| e["event"] == "complete" && e["op"] == "write" && e["len"] == 4096).count();
    assert_eq!(completed as u64, N);
    let lost = lines.iter().find_map(|l| l.get("lost")).expect("a loss report at the end");
    assert_eq!(lost["reserve_failed"], 0, "{lost}");
    assert_eq!(lost["recursion_misses"], 0, "{lost}");
    // The per-second figures add up to the same writes.
    let windows: Vec<&serde_json::Value> = lines.iter().filter_map(|l| l.get("window")).collect();
    let writes: u64 = windows.iter().map(|w| w["writes"].as_u64().unwrap()).sum();
    let flushes: u64 = windows.iter().map(|w| w["flushes"].as_u64().unwrap()).sum();
    assert_eq!((writes, flushes), (N, 1), "{windows:#?}");
    // The same figures as Prometheus text.
    let prom = std::fs::read_to_string(&metrics).unwrap();
    let dev_no = writes_dev(&lines);
    for want in [
        format!("drv_block_requests_total{{dev=\"{dev_no}\",op=\"write\"}} {N}"),
        format!("drv_block_bytes_total{{dev=\"{dev_no}\",op=\"write\"}} {}", N * 4096),
        format!("drv_block_flushes_total{{dev=\"{dev_no}\"}} 1"),
        "drv_ebpf_events_lost_total{cause=\"ring_full\"} 0".to_string(),
    ] {
        assert!(prom.contains(&want), "{want} not in\n{prom}");
    }
}

/// The device (`major:minor`) of the first event.
fn writes_dev(lines: &[serde_json::Value]) -> String {
    lines.iter().find_map(|l| l.get("event").and(l["dev"].as_str())).expect("an event").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn track_sync_after_random_writes_leaves_a_byte_identical_replica() {
    if !root_or_skip("track_sync_after_random_writes_leaves_a_byte_identical_replica") {
        return;
    }
    const VOLUME: u64 = 16 << 20;
    let cl = Cluster::new(1, VOLUME);
    let mut staging = staging_up(&cl).await;
    let mut replica = cl.start("replica", "rep1");
    let image = cl.dir.path().join("source.img");
    std::fs::write(&image, drv_tests::pattern(7, VOLUME as usize)).unwrap();
    let lo = Loop::attach(&image);
    let dev = lo.dev.display().to_string();
    let (mut tracker, run_dir) = start_tracker(&cl, &dev).await;
    // Random writes of random sizes while the initial copy runs, from two kinds of writer:
    // O_DIRECT and buffered with a final fsync.
    let mut rng = Rng::new(0x7ac);
    for round in 0..40 {
        let bs = 4096 << rng.below(5);
        let blocks = VOLUME / bs;
        let seek = rng.below(blocks - 2);
        let count = 1 + rng.below(2);
        let mut args = strings(&[
            "if=/dev/urandom",
            &format!("of={dev}"),
            &format!("bs={bs}"),
            &format!("count={count}"),
            &format!("seek={seek}"),
            "conv=notrunc",
        ]);
        if round % 2 == 0 {
            args.push("oflag=direct".into());
        } else {
            args.push("conv=fsync".into());
        }
        tokio::task::spawn_blocking(move || dd(&args)).await.unwrap();
    }
    let out = drv(strings(&["track", "sync", "vol1", "--json", "--run-dir", &run_dir])).await;
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out}: {e}"));
    assert_eq!(report["complete"], true, "{report}");
    assert!(report["bytes"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["lost_events"], 0, "{report}");
    assert!(report["rpo_before_s"].as_f64().unwrap() > 0.0, "{report}");
    let st: serde_json::Value =
        serde_json::from_str(&drv(strings(&["agent", "status", "vol1", "--json", "--run-dir", &run_dir])).await)
            .unwrap();
    assert_eq!(st["mode"], "sync", "{st}");
    assert_replica_equals(&cl, &image, st["next_seq"].as_u64().unwrap()).await;
    // A second round after the cut: only the new changes are shipped.
    dd(&strings(&["if=/dev/urandom", &format!("of={dev}"), "bs=4k", "count=3", "seek=17", "oflag=direct"]));
    let out = drv(strings(&["track", "sync", "vol1", "--json", "--run-dir", &run_dir])).await;
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["complete"], true, "{report}");
    let block = 64 << 10; // the volume's change block
    assert_eq!(report["bytes"], block, "three 4 KiB writes inside one change block: {report}");
    let st: serde_json::Value =
        serde_json::from_str(&drv(strings(&["agent", "status", "vol1", "--json", "--run-dir", &run_dir])).await)
            .unwrap();
    assert_replica_equals(&cl, &image, st["next_seq"].as_u64().unwrap()).await;
    assert!(Command::new("kill").args(["-TERM", &tracker.id().to_string()]).status().unwrap().success());
    assert!(tracker.wait().unwrap().success(), "{}", cl.log("agent"));
    kill_all([&mut staging, &mut replica]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn track_sync_with_freeze_gives_a_replica_that_fsck_finds_clean() {
    if !root_or_skip("track_sync_with_freeze_gives_a_replica_that_fsck_finds_clean") {
        return;
    }
    // Small enough that two whole-volume resync passes fit in the cluster's 64 MiB WRL: the
    // replica applies a resync run only when it is complete (see the closing notes).
    const VOLUME: u64 = 16 << 20;
    let cl = Cluster::new(1, VOLUME);
    let mut staging = staging_up(&cl).await;
    let mut replica = cl.start("replica", "rep1");
    let image = cl.dir.path().join("source.img");
    std::fs::File::create(&image).unwrap().set_len(VOLUME).unwrap();
    let lo = Loop::attach(&image);
    let dev = lo.dev.display().to_string();
    let mkfs = Command::new("mkfs.ext4").args(["-q", "-F", &dev]).output().expect("run mkfs.ext4");
    assert!(mkfs.status.success(), "{}", String::from_utf8_lossy(&mkfs.stderr));
    let mnt = cl.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let (mut tracker, run_dir) = start_tracker(&cl, &dev).await;
    let mount = Command::new("mount").arg(&dev).arg(&mnt).output().unwrap();
    assert!(mount.status.success(), "{}", String::from_utf8_lossy(&mount.stderr));
    let _unmount = Unmount(mnt.clone());
    // A writer keeps creating files (each written, then fsynced) through the cut.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (stop, done, mnt) = (stop.clone(), done.clone(), mnt.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && i < 400 {
                let data = drv_tests::pattern(i, 20_000 + (i as usize % 7) * 4096);
                let p = mnt.join(format!("f{i}"));
                let mut f = std::fs::File::create(&p).unwrap();
                std::io::Write::write_all(&mut f, &data).unwrap();
                f.sync_all().unwrap();
                i += 1;
                done.store(i, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    until("some files written", Duration::from_secs(30), || done.load(std::sync::atomic::Ordering::SeqCst) >= 20).await;
    let before = done.load(std::sync::atomic::Ordering::SeqCst);
    let out = drv(strings(&[
        "track",
        "sync",
        "vol1",
        "--json",
        "--freeze",
        &mnt.display().to_string(),
        "--run-dir",
        &run_dir,
    ]))
    .await;
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out}: {e}"));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    assert_eq!(report["consistent"], true, "{report}");
    assert_eq!(report["frozen"], true, "{report}");
    let st: serde_json::Value =
        serde_json::from_str(&drv(strings(&["agent", "status", "vol1", "--json", "--run-dir", &run_dir])).await)
            .unwrap();
    let next = st["next_seq"].as_u64().unwrap();
    // The replica image at the cut: a clean filesystem holding every file completed before it.
    crate::agent::wait_applied(&cl, next).await;
    let rep = cl.dir.path().join("rep1/vol1.img");
    let fsck = Command::new("e2fsck").arg("-fn").arg(&rep).output().unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck of the replica: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    for i in 0..before {
        let cat = Command::new("debugfs").arg("-R").arg(format!("cat /f{i}")).arg(&rep).output().unwrap();
        let want = drv_tests::pattern(i, 20_000 + (i as usize % 7) * 4096);
        assert!(cat.stdout == want, "file f{i} on the replica differs ({} bytes)", cat.stdout.len());
    }
    drop(_unmount);
    assert!(Command::new("kill").args(["-TERM", &tracker.id().to_string()]).status().unwrap().success());
    assert!(tracker.wait().unwrap().success(), "{}", cl.log("agent"));
    kill_all([&mut staging, &mut replica]);
}
