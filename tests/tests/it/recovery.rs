//! Getting the data back: snapshots of a live ext4 (written by files and sqlite through the
//! user-mode device) served as block devices on the replica host (`drv snapshot mount`),
//! checked as an administrator would, with replication going on.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::agent::{drv_fails, kill_all, strings, wait_applied};
use crate::ebpf::root_or_skip;
use crate::snapshots::{conn, snapshot_json};
use crate::user::{Attached, Mounted, run, running, sqlite, start_workload};

/// The content of kept file `j` of round `k`.
fn kept(k: u64, j: u64) -> Vec<u8> {
    drv_tests::pattern(1000 * k + j, (40_000 + j * 4_099) as usize)
}

/// Writes round `k`'s kept files into `dir`, each made durable (`fsync`) before the next.
fn write_kept(dir: &Path, k: u64) {
    for j in 0..6 {
        let p = dir.join(format!("kept-{k}-{j}"));
        let mut f = std::fs::File::create(&p).unwrap();
        std::io::Write::write_all(&mut f, &kept(k, j)).unwrap();
        f.sync_all().unwrap();
    }
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
}

/// The xxh3-128 of a whole device or file, as `drv snapshot digest` prints it.
fn digest_of(path: &str) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("{:032x}", h.digest128())
}

async fn mount_snapshot(cl: &drv_tests::Cluster, name: &str, writable: bool) -> String {
    let mut args = vec!["mount", "vol1", name];
    if writable {
        args.push("--writable");
    }
    let m = snapshot_json(cl, &args).await;
    assert_eq!(m["writable"], writable, "{m}");
    m["device"].as_str().unwrap().to_owned()
}

/// Snapshot `k`, mounted writable: the journal replayed into the overlay, `e2fsck -fn` clean,
/// every kept file of rounds `0..=k` byte-exact, sqlite's integrity check ok, a write of the
/// drill's own; the snapshot's digest never changes.
async fn drill(cl: &drv_tests::Cluster, k: u64) {
    let name = format!("s{k}");
    let digest = snapshot_json(cl, &["digest", "vol1", &name]).await["xxh3_128"].as_str().unwrap().to_owned();
    let (ok, c) = check_json(cl, &name).await;
    assert!(ok && c["filesystems"][0]["filesystem"] == "ext4" && c["filesystems"][0]["clean"] == true, "{c}");
    let dev = mount_snapshot(cl, &name, false).await;
    let d = dev.clone();
    assert_eq!(tokio::task::spawn_blocking(move || digest_of(&d)).await.unwrap(), digest, "read-only device {dev}");
    let w =
        Command::new("dd").args(["if=/dev/zero", &format!("of={dev}"), "bs=4k", "count=1", "oflag=direct"]).output();
    assert!(!w.unwrap().status.success(), "a write to the read-only {dev} succeeded");
    snapshot_json(cl, &["unmount", "vol1", &name]).await;

    let dev = mount_snapshot(cl, &name, true).await;
    let replay = Command::new("e2fsck").args(["-E", "journal_only", "-y", &dev]).output().unwrap();
    assert!(matches!(replay.status.code(), Some(0 | 1)), "s{k}: journal replay: {replay:?}");
    run("e2fsck", &["-fn", &dev]);
    let mnt = cl.dir.path().join(format!("drill-{k}"));
    {
        let _m = Mounted::new(&dev, &mnt, "rw");
        for r in 0..=k {
            for j in 0..6 {
                let got = std::fs::read(mnt.join(format!("kept-{r}-{j}"))).unwrap();
                assert!(got == kept(r, j), "s{k}: kept-{r}-{j} differs");
            }
        }
        let ok = sqlite(&mnt.join("db.sqlite"), "PRAGMA integrity_check; SELECT count(*) FROM t;");
        assert_eq!(ok.split_whitespace().next(), Some("ok"), "s{k}: {ok}");
        std::fs::write(mnt.join("drill"), b"a failover test writes here").unwrap();
        let err = drv_fails({
            let mut a = strings(&["snapshot", "unmount", "vol1", &name]);
            a.extend(conn(cl, false));
            a
        })
        .await;
        assert!(err.contains("in use"), "{err}");
        let err = drv_fails({
            let mut a = strings(&["snapshot", "delete", "vol1", &name]);
            a.extend(conn(cl, false));
            a
        })
        .await;
        assert!(err.contains("mounted as") && err.contains("unmount"), "{err}");
    }
    snapshot_json(cl, &["unmount", "vol1", &name]).await;
    let after = snapshot_json(cl, &["digest", "vol1", &name]).await;
    assert_eq!(after["xxh3_128"].as_str(), Some(digest.as_str()), "s{k}: the writable mount changed the snapshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_of_a_live_ext4_mount_fsck_clean_and_hold_every_file_flushed_before_them() {
    if !root_or_skip("snapshots_of_a_live_ext4_mount_fsck_clean_and_hold_every_file_flushed_before_them") {
        return;
    }
    let (cl, mut staging, mut replica, image) = running(64 << 20, None).await;
    let a = Attached::start(&cl, &image, &[]);
    run("mkfs.ext4", &["-q", "-F", &a.dev]);
    let mnt = cl.dir.path().join("mnt");
    let m = Mounted::new(&a.dev, &mnt, "rw");
    let mut work = start_workload(&mnt, 0);
    for k in 0..3 {
        let dir = mnt.clone();
        tokio::task::spawn_blocking(move || write_kept(&dir, k)).await.unwrap();
        wait_applied(&cl, a.status().await["next_seq"].as_u64().unwrap()).await;
        // Taken while the workload writes.
        snapshot_json(&cl, &["create", "vol1", &format!("s{k}")]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Checked while replication goes on.
    for k in 0..3 {
        assert!(work.try_wait().unwrap().is_none(), "the workload stopped");
        drill(&cl, k).await;
    }
    // SAFETY: kill(2) of the workload's process group.
    unsafe { libc::kill(-(work.id() as i32), libc::SIGKILL) };
    let _ = work.wait();
    drop(m);
    let next = a.status().await["next_seq"].as_u64().unwrap();
    a.detach(&cl).await;
    crate::user::replica_equals(&cl, &image, next).await;
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&cl.dir.path().join("rep1/mounts").display().to_string()), "{mounts}");
    kill_all([&mut staging, &mut replica]);
}

/// A running `drv restore`, its stdout read line by line on a thread.
struct Restoring {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Restoring {
    fn start(cl: &drv_tests::Cluster, target: &Path, extra: &[&str]) -> Restoring {
        let mut child = Command::new(drv_tests::drv_bin())
            .args(["restore", "vol1", "r1", "--to"])
            .arg(target)
            .args(extra)
            .args(conn(cl, true))
            .env("DRV_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new().create(true).append(true).open(cl.dir.path().join("restore.log")).unwrap(),
            )
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufRead::lines(out) {
                let Ok(l) = l else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Restoring { child, lines }
    }

    /// The next line for which `f` says something, within 60 s.
    fn until<T>(&self, cl: &drv_tests::Cluster, mut f: impl FnMut(&str) -> Option<T>) -> T {
        let end = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(x) = f(&l) {
                        return x;
                    }
                }
                Err(e) => panic!(
                    "drv restore: {e}\n{}",
                    std::fs::read_to_string(cl.dir.path().join("restore.log")).unwrap_or_default()
                ),
            }
        }
    }
}

impl Drop for Restoring {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pread(dev: &str, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(dev).unwrap();
    let mut b = vec![0u8; len];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, offset).unwrap();
    b
}

/// `drv restore` of a snapshot: the target is usable at once (a block device here and NBD),
/// reads during the copy return the snapshot's data, writes during it survive; a SIGKILL mid-way
/// and the same command again resume where it stopped; at the end the target is the snapshot
/// plus the writes, and stays so after the snapshot is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_is_usable_at_once_survives_a_kill_and_ends_as_the_snapshot_plus_the_writes() {
    use crate::snapshots::{VOLUME, image_at, run_tool, writer_cluster};
    if !root_or_skip("a_restore_is_usable_at_once_survives_a_kill_and_ends_as_the_snapshot_plus_the_writes") {
        return;
    }
    let cl = drv_tests::Cluster::new(1, VOLUME);
    let (mut staging, mut replica, agent) = writer_cluster(&cl).await;
    let mut history = Vec::new();
    for i in 0..40u64 {
        let (offset, data) = ((i * 7919 % 120) * 65536, drv_tests::pattern(i, 65536));
        agent.write(offset, bytes::Bytes::from(data.clone()), drv_format::record::Flags::default()).await.unwrap();
        history.push((offset, data));
    }
    crate::agent::until_in(&cl, "the writes applied", Duration::from_secs(30), || {
        cl.replica_status().is_some_and(|s| s.volumes[0].applied_seq >= 39)
    })
    .await;
    let snap = snapshot_json(&cl, &["create", "vol1", "r1"]).await;
    let mut model = image_at(&history, snap["seq"].as_u64().unwrap());
    // Replication goes on.
    agent.write(0, bytes::Bytes::from(vec![0xee; 65536]), drv_format::record::Flags::default()).await.unwrap();
    let target = cl.dir.path().join("restored.img");
    let r = Restoring::start(&cl, &target, &["--listen", "127.0.0.1:0", "--bwlimit", "1M"]);
    let nbd = r.until(&cl, |l| l.strip_prefix("NBD ").map(str::to_owned));
    let dev = r.until(&cl, |l| l.strip_prefix("DEVICE ").map(str::to_owned));
    // Usable at once: reads anywhere show the snapshot, copied yet or not.
    for off in [0, 3 << 20, VOLUME - 65536] {
        assert!(pread(&dev, off, 65536) == model[off as usize..off as usize + 65536], "a read at {off}");
    }
    // Writes through the device (flushed) and through NBD (unaligned, flushed).
    let data = drv_tests::pattern(4242, 131072);
    let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &data, 5 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    model[5 << 20..(5 << 20) + 131072].copy_from_slice(&data);
    let out =
        run_tool("qemu-io", strings(&["-f", "raw", "-c", "write -P 0x3c 123457 70000", "-c", "flush", &nbd])).await;
    assert!(out.status.success(), "qemu-io: {}", String::from_utf8_lossy(&out.stderr));
    model[123457..193457].fill(0x3c);
    assert!(pread(&dev, 0, 262144) == model[..262144], "the device after the NBD write");
    // Killed part way.
    let present = r.until(&cl, |l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        let p = v["present_bytes"].as_u64()?;
        (p >= 2 << 20).then_some(p)
    });
    assert!(present < VOLUME, "the copy finished before the kill");
    let mut r = r;
    let _ = r.child.kill();
    let _ = r.child.wait();
    drop(r);
    // Resumed, unlimited, with no NBD: to the end.
    let r = Restoring::start(&cl, &target, &[]);
    let dev = r.until(&cl, |l| l.strip_prefix("DEVICE ").map(str::to_owned));
    let last = r.until(&cl, |l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        (v["complete"] == true).then_some(v)
    });
    assert!(last["copied_bytes"].as_u64().unwrap() < VOLUME, "the resumed copy started over: {last}");
    r.until(&cl, |l| l.starts_with("still serving").then_some(()));
    assert!(pread(&dev, 5 << 20, 131072) == data, "the device after the copy");
    // The snapshot is no longer needed.
    snapshot_json(&cl, &["delete", "vol1", "r1"]).await;
    assert!(pread(&dev, 0, VOLUME as usize) == model, "the device after the snapshot's deletion");
    let mut r = r;
    // SAFETY: kill(2).
    unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
    let st = r.child.wait().unwrap();
    assert!(st.success(), "drv restore after SIGTERM: {st}");
    assert!(std::fs::read(&target).unwrap() == model, "the restored image differs");
    assert!(!cl.dir.path().join("restored.img.drv-restore").exists(), "the state is left");
    kill_all([&mut staging, &mut replica]);
}

/// Ships the 64 KiB pieces of `image` that differ from `before` through the agent.
async fn ship_changes(agent: &drv_agent::Agent, before: &[u8], image: &[u8]) -> u64 {
    let mut n = 0;
    for (i, (new, old)) in image.chunks(65536).zip(before.chunks(65536)).enumerate() {
        if new != old {
            let data = bytes::Bytes::copy_from_slice(new);
            agent.write(i as u64 * 65536, data, drv_format::record::Flags::default()).await.unwrap();
            n += 1;
        }
    }
    n
}

/// The writer cluster's writes are each their own unit, complete once the next is sent: one more
/// (the first piece again, unchanged) completes the last. Returns the sequence to wait for.
async fn close_unit(agent: &drv_agent::Agent, image: &[u8], sent: u64) -> u64 {
    let data = bytes::Bytes::copy_from_slice(&image[..65536]);
    agent.write(0, data, drv_format::record::Flags::default()).await.unwrap();
    sent + 1
}

/// An MBR with two Linux partitions: sectors 2048..133120 (64 MiB) and 133120..788480 (320 MiB).
fn partition_table(img: &mut [u8]) {
    for (i, (start, sectors)) in [(2048u32, 131_072u32), (133_120, 655_360)].into_iter().enumerate() {
        let e = &mut img[446 + 16 * i..462 + 16 * i];
        e[4] = 0x83;
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&sectors.to_le_bytes());
    }
    img[510] = 0x55;
    img[511] = 0xaa;
}

async fn check_json(cl: &drv_tests::Cluster, name: &str) -> (bool, serde_json::Value) {
    let mut a = strings(&["snapshot", "check", "vol1", name]);
    a.extend(conn(cl, true));
    let out = tokio::task::spawn_blocking(move || Command::new(drv_tests::drv_bin()).args(&a).output().unwrap())
        .await
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    (out.status.success(), v)
}

/// Recovery checks: a partitioned image with ext4 and xfs checks clean, partition by partition;
/// the same after damage to the ext4 fails (exit status 1, the checker's words kept); results are
/// listed with their snapshots; a volume with `check_interval` is checked on its own, and the
/// status shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_checks_find_ext4_and_xfs_clean_fail_a_damaged_one_and_run_on_a_schedule() {
    use crate::snapshots::writer_cluster;
    if !root_or_skip("recovery_checks_find_ext4_and_xfs_clean_fail_a_damaged_one_and_run_on_a_schedule") {
        return;
    }
    const SIZE: u64 = 400 << 20;
    let cl = drv_tests::Cluster::new(1, SIZE);
    let store = cl.config.display().to_string();
    crate::agent::drv(strings(&["config", "--store", &store, "set", "volume", "vol1", "check_interval=1m"])).await;
    let (mut staging, mut replica, agent) = writer_cluster(&cl).await;
    // The source image, made here with the filesystems' own tools.
    let src = cl.dir.path().join("parts.img");
    let mut img = vec![0u8; SIZE as usize];
    partition_table(&mut img);
    std::fs::write(&src, &img).unwrap();
    // Each partition as a loop device at its offset (a kernel without the MBR parser has no
    // partscan).
    let part = |start: u64, sectors: u64| {
        let (off, len) = ((start * 512).to_string(), (sectors * 512).to_string());
        let args = ["--find", "--show", "--offset", &off, "--sizelimit", &len, &src.display().to_string()];
        run("losetup", &args).trim().to_owned()
    };
    let (p1, p2) = (part(2048, 131_072), part(133_120, 655_360));
    let _detach = (crate::user::Detach(p1.clone()), crate::user::Detach(p2.clone()));
    run("mkfs.ext4", &["-q", "-F", "-b", "4096", &p1]);
    run("mkfs.xfs", &["-q", "-f", &p2]);
    run("sync", &[]);
    let before = vec![0u8; SIZE as usize];
    let img = std::fs::read(&src).unwrap();
    let mut sent = ship_changes(&agent, &before, &img).await;
    assert!(sent > 4, "{sent}");
    sent = close_unit(&agent, &img, sent).await;
    wait_applied(&cl, sent).await;
    snapshot_json(&cl, &["create", "vol1", "parts"]).await;
    let (ok, c) = check_json(&cl, "parts").await;
    assert!(ok && c["ok"] == true, "{c}");
    let fs: Vec<(String, String, bool)> = c["filesystems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["part"].as_str().unwrap().into(), f["filesystem"].as_str().unwrap().into(), f["clean"] == true))
        .collect();
    let want = [("partition 1".into(), "ext4".into(), true), ("partition 2".into(), "xfs".into(), true)];
    assert_eq!(fs, want, "{c}");
    // Damage: the root inode cleared.
    run("debugfs", &["-w", "-R", "clri <2>", &p1]);
    run("sync", &[]);
    let damaged = std::fs::read(&src).unwrap();
    sent += ship_changes(&agent, &img, &damaged).await;
    sent = close_unit(&agent, &damaged, sent).await;
    wait_applied(&cl, sent).await;
    snapshot_json(&cl, &["create", "vol1", "damaged"]).await;
    let (ok, c) = check_json(&cl, "damaged").await;
    assert!(!ok && c["ok"] == false, "{c}");
    assert!(c["summary"].as_str().unwrap().contains("partition 1 ext4: ERRORS"), "{c}");
    assert!(c["filesystems"][0]["output"].as_str().unwrap().contains("oot inode"), "{c}");
    // Kept with the snapshots; the snapshot never changed.
    let list = snapshot_json(&cl, &["list", "vol1"]).await;
    let checked: Vec<(&str, bool)> =
        list.as_array().unwrap().iter().map(|s| (s["name"].as_str().unwrap(), s["check"]["ok"] == true)).collect();
    assert!(checked.contains(&("parts", true)) && checked.contains(&("damaged", false)), "{list}");
    // The schedule ran on its own (the first check is due at start): the newest image, damaged.
    crate::agent::until_in(&cl, "a scheduled check", Duration::from_secs(120), || {
        cl.replica_status().and_then(|s| s.volumes[0].last_check.clone()).is_some_and(|c| c.scheduled)
    })
    .await;
    let st = cl.replica_status().unwrap();
    let v = &st.volumes[0];
    assert_eq!(v.check_interval_secs, Some(60));
    assert!(!v.snapshots.iter().any(|s| s.name.starts_with("check-")), "the schedule's snapshot is left: {v:?}");
    kill_all([&mut staging, &mut replica]);
}

async fn failover_json(cl: &drv_tests::Cluster, args: &[&str]) -> serde_json::Value {
    let mut a = strings(&["failover"]);
    a.extend(strings(args));
    a.extend(conn(cl, true));
    serde_json::from_str(crate::agent::drv(a).await.trim()).unwrap()
}

fn pwrite_sync(dev: &str, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, data, offset).unwrap();
    f.sync_all().unwrap();
}

/// A failover test while replication runs: the device takes writes, the replica keeps applying
/// and matches the source. A failover: apply holds while records keep arriving; the device's
/// writes survive a SIGKILL of the replica (the failover resumes on a new device); `end` is
/// refused while it holds writes, then with --discard-writes replication catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_test_leaves_replication_running_and_a_failover_holds_apply_through_a_restart() {
    use crate::snapshots::{VOLUME, image_at, writer_cluster};
    if !root_or_skip("a_failover_test_leaves_replication_running_and_a_failover_holds_apply_through_a_restart") {
        return;
    }
    let cl = drv_tests::Cluster::new(1, VOLUME);
    let (mut staging, mut replica, agent) = writer_cluster(&cl).await;
    let mut history: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut n = 0u64;
    let mut write = async |history: &mut Vec<(u64, Vec<u8>)>| {
        n += 1;
        let (offset, data) = ((n * 37 % 128) * 65536, drv_tests::pattern(n, 65536));
        agent.write(offset, bytes::Bytes::from(data.clone()), drv_format::record::Flags::default()).await.unwrap();
        history.push((offset, data));
    };
    for _ in 0..20 {
        write(&mut history).await;
    }
    let applied = |cl: &drv_tests::Cluster| cl.replica_status().map(|s| s.volumes[0].applied_seq).unwrap_or(0);
    crate::agent::until_in(&cl, "the writes applied", Duration::from_secs(30), || applied(&cl) >= 19).await;

    let f = failover_json(&cl, &["vol1", "--test"]).await;
    assert_eq!(f["test"], true, "{f}");
    let (dev, seq) = (f["device"].as_str().unwrap().to_owned(), f["seq"].as_u64().unwrap());
    let drill = drv_tests::pattern(777, 65536);
    pwrite_sync(&dev, 1 << 20, &drill);
    assert!(pread(&dev, 1 << 20, 65536) == drill);
    let at_point = image_at(&history, seq);
    assert!(pread(&dev, 2 << 20, 65536) == at_point[2 << 20..(2 << 20) + 65536]);
    // Replication goes on and the replica matches the source.
    for _ in 0..20 {
        write(&mut history).await;
    }
    crate::agent::until_in(&cl, "applied during the test", Duration::from_secs(30), || applied(&cl) >= 39).await;
    let st = cl.replica_status().unwrap();
    assert_eq!(st.volumes[0].state.to_string(), "replicating");
    assert_eq!(st.volumes[0].failover.as_ref().map(|f| f.test), Some(true));
    let target = std::fs::read(cl.dir.path().join("rep1/vol1.img")).unwrap();
    assert!(target == image_at(&history, st.volumes[0].applied_seq), "the replica during the test");
    let e = failover_json(&cl, &["end", "vol1"]).await;
    assert_eq!(e["changed_bytes"], 65536, "{e}");
    assert!(!snapshot_json(&cl, &["list", "vol1"]).await.to_string().contains("failover"));

    // A failover: apply holds.
    let f = failover_json(&cl, &["vol1"]).await;
    assert_eq!(f["test"], false, "{f}");
    let (dev, seq) = (f["device"].as_str().unwrap().to_owned(), f["seq"].as_u64().unwrap());
    let at_point = image_at(&history, seq);
    let ours = drv_tests::pattern(888, 12_288);
    pwrite_sync(&dev, (3 << 20) + 4096, &ours);
    for _ in 0..10 {
        write(&mut history).await;
    }
    crate::agent::until_in(&cl, "records logged while held", Duration::from_secs(30), || {
        cl.replica_status().is_some_and(|s| s.volumes[0].durable_seq >= 50)
    })
    .await;
    let st = cl.replica_status().unwrap();
    assert_eq!(st.volumes[0].state.to_string(), "failed-over");
    assert_eq!(st.volumes[0].applied_seq, seq, "apply moved while failed over");
    // The replica killed and restarted: the failover resumes with its writes.
    kill_all([&mut replica]);
    replica = cl.start("replica", "rep1");
    crate::agent::until_in(&cl, "the failover resumed", Duration::from_secs(30), || {
        cl.replica_status().and_then(|s| s.volumes[0].failover.clone()).is_some_and(|f| !f.device.is_empty())
    })
    .await;
    let f = cl.replica_status().unwrap().volumes[0].failover.clone().unwrap();
    let dev = f.device.clone();
    assert_eq!(f.changed_bytes, 12_288, "{f:?}");
    let mut want = at_point.clone();
    want[(3 << 20) + 4096..(3 << 20) + 16_384].copy_from_slice(&ours);
    assert!(pread(&dev, 0, VOLUME as usize) == want, "the failover device after the restart");
    let mut a = strings(&["failover", "end", "vol1"]);
    a.extend(conn(&cl, false));
    let err = drv_fails(a).await;
    assert!(err.contains("--discard-writes") && err.contains("12288 bytes"), "{err}");
    failover_json(&cl, &["end", "vol1", "--discard-writes"]).await;
    let last = history.len() as u64 - 1;
    crate::agent::until_in(&cl, "apply resumed", Duration::from_secs(30), || applied(&cl) >= last).await;
    let st = cl.replica_status().unwrap();
    let target = std::fs::read(cl.dir.path().join("rep1/vol1.img")).unwrap();
    assert!(target == image_at(&history, st.volumes[0].applied_seq), "the replica after the failover");
    kill_all([&mut staging, &mut replica]);
}

/// A replica killed and restarted under a restore (its export ends with it): the copy's reads and
/// a read of the device wait, the export is asked for again, and the restore ends with the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_rides_out_a_replica_restart() {
    use crate::snapshots::writer_cluster;
    if !root_or_skip("a_restore_rides_out_a_replica_restart") {
        return;
    }
    const SIZE: u64 = 64 << 20;
    let cl = drv_tests::Cluster::new(1, SIZE);
    let (mut staging, mut replica, agent) = writer_cluster(&cl).await;
    let mut image = vec![0u8; SIZE as usize];
    for i in 0..16u64 {
        let (offset, data) = (i * (SIZE / 16), drv_tests::pattern(i, 65536));
        agent.write(offset, bytes::Bytes::from(data.clone()), drv_format::record::Flags::default()).await.unwrap();
        image[offset as usize..offset as usize + 65536].copy_from_slice(&data);
    }
    // Each write is its own unit, complete when the next is sent: this one completes the last
    // (and is not in the snapshot).
    agent.write(65536, bytes::Bytes::from(vec![7u8; 4096]), drv_format::record::Flags::default()).await.unwrap();
    crate::agent::until_in(&cl, "the writes applied", Duration::from_secs(30), || {
        cl.replica_status().is_some_and(|s| s.volumes[0].applied_seq >= 16)
    })
    .await;
    let snap = snapshot_json(&cl, &["create", "vol1", "r1"]).await;
    assert_eq!(snap["seq"], 16, "{snap}");
    let target = cl.dir.path().join("restored.img");
    // 4 MiB a second: the readers are a few batches ahead at most when the replica goes.
    let r = Restoring::start(&cl, &target, &["--bwlimit", "4M"]);
    let dev = r.until(&cl, |l| l.strip_prefix("DEVICE ").map(str::to_owned));
    r.until(&cl, |l| l.contains("present_bytes").then_some(()));
    kill_all([&mut replica]);
    // A read of the device's last block (not copied yet) waits for the replica.
    let d = dev.clone();
    let last = tokio::task::spawn_blocking(move || pread(&d, SIZE - 65536, 65536));
    tokio::time::sleep(Duration::from_secs(1)).await;
    replica = cl.start("replica", "rep1");
    assert!(last.await.unwrap() == image[(SIZE - 65536) as usize..], "the device's read across the restart");
    let done = r.until(&cl, |l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        (v["complete"] == true).then_some(v)
    });
    assert_eq!(done["present_bytes"], SIZE, "{done}");
    r.until(&cl, |l| l.starts_with("still serving").then_some(()));
    let log = std::fs::read_to_string(cl.dir.path().join("restore.log")).unwrap();
    assert!(log.contains("wait for its export") && log.contains("answers again"), "no outage seen:\n{log}");
    let mut r = r;
    // SAFETY: kill(2).
    unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
    assert!(r.child.wait().unwrap().success());
    assert!(std::fs::read(&target).unwrap() == image, "the restored image differs");
    kill_all([&mut staging, &mut replica]);
}
