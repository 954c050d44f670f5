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
