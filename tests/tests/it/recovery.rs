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
