//! The userspace capture path on the host (`drv attach --mode user`): a real ext4 on the FUSE +
//! loop device, fio with verification, sqlite, SIGKILL of the whole pipeline at random moments,
//! and staging paused or gone.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use drv_tests::{Cluster, Rng};

use crate::agent::{drv, kill_all, staging_up, strings, until, wait_applied};
use crate::ebpf::root_or_skip;

/// A running `drv attach vol1 --mode user` and the loop device it printed.
struct Attached {
    child: Child,
    dev: String,
    run_dir: String,
}

impl Attached {
    /// Starts the agent on `image` and waits for its `DEVICE` line.
    fn start(cl: &Cluster, image: &Path, extra: &[&str]) -> Attached {
        let run = cl.dir.path().join("run");
        let run_dir = run.display().to_string();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(cl.dir.path().join("agent.log")).unwrap();
        let mut child = Command::new(drv_tests::drv_bin())
            .args(["attach", "vol1", "--mode", "user", "--name", "host1", "--run-dir", &run_dir])
            .arg("--device")
            .arg(image)
            .arg("--config")
            .arg(&cl.config)
            .arg("--certs")
            .arg(&cl.certs)
            .arg("--state-dir")
            .arg(state(cl))
            .args(extra)
            .env("DRV_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn drv attach");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                panic!("drv attach ended before its DEVICE line ({:?}):\n{}", child.wait(), cl.log("agent"));
            }
            if let Some(dev) = line.trim().strip_prefix("DEVICE ") {
                let dev = dev.to_owned();
                // Keep reading (and dropping) its output so it never blocks on a full pipe.
                std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
                return Attached { child, dev, run_dir };
            }
        }
    }

    async fn status(&self) -> serde_json::Value {
        let out = drv(strings(&["agent", "status", "vol1", "--json", "--run-dir", &self.run_dir])).await;
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"))
    }

    /// `drv detach vol1`; the agent exits successfully.
    async fn detach(mut self, cl: &Cluster) {
        drv(strings(&["detach", "vol1", "--run-dir", &self.run_dir])).await;
        let st = tokio::task::spawn_blocking(move || self.child.wait()).await.unwrap().unwrap();
        assert!(st.success(), "drv attach after detach: {st}\n{}", cl.log("agent"));
    }
}

fn state(cl: &Cluster) -> PathBuf {
    cl.dir.path().join("agent-state")
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Unmounts on drop (a failed test must not leave a mount behind).
struct Mounted(PathBuf);

impl Mounted {
    fn new(dev: &str, dir: &Path, opts: &str) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        run("mount", &["-o", opts, dev, &dir.display().to_string()]);
        Mounted(dir.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if Command::new("umount").arg(&self.0).status().map(|s| !s.success()).unwrap_or(true) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// No FUSE mount of this test's agent and no loop device over it remain.
fn nothing_left(cl: &Cluster) {
    let fuse = state(cl).join("fuse");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&fuse.display().to_string()), "a FUSE mount is left:\n{mounts}");
    let loops = run("losetup", &["-a"]);
    assert!(!loops.contains(&fuse.display().to_string()), "a loop device is left: {loops}");
}

/// The `order-check.json` of the agent's eBPF cross-check: epochs were checked, none wrong.
fn order_checked(cl: &Cluster) -> serde_json::Value {
    let p = state(cl).join("order-check.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    assert!(v["checked"].as_u64().unwrap() > 0, "no epoch was checked: {v}");
    assert_eq!(v["violations"], 0, "{v}");
    v
}

/// Waits until the replica applied everything before the agent's next sequence number and then
/// compares its image with `image`.
async fn replica_equals(cl: &Cluster, image: &Path, next: u64) {
    wait_applied(cl, next).await;
    let src = std::fs::read(image).unwrap();
    let rep = std::fs::read(cl.dir.path().join("rep1/vol1.img")).unwrap();
    let first_diff = src.iter().zip(&rep).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "the replica differs at byte {first_diff:?}\n{}", cl.log("agent"));
}

/// A sqlite3 script: a table, then `n` transactions of one row each.
fn sqlite_script(start: u64, n: u64) -> String {
    let mut s = String::from("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, k INTEGER, v BLOB);\n");
    for i in start..start + n {
        s.push_str(&format!(
            "BEGIN; INSERT INTO t(k, v) VALUES ({i}, randomblob({})); COMMIT;\n",
            500 + (i % 13) * 700
        ));
    }
    s
}

fn sqlite(db: &Path, script: &str) -> String {
    let mut child = Command::new("sqlite3")
        .arg(db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sqlite3");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "sqlite3: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_fio_verify_and_sqlite_on_the_user_device_then_detach_leave_an_identical_replica() {
    if !root_or_skip("ext4_fio_verify_and_sqlite_on_the_user_device_then_detach_leave_an_identical_replica") {
        return;
    }
    const VOLUME: u64 = 64 << 20;
    let cl = Cluster::new(1, VOLUME);
    let mut staging = staging_up(&cl).await;
    let mut replica = cl.start("replica", "rep1");
    let image = cl.dir.path().join("source.img");
    std::fs::File::create(&image).unwrap().set_len(VOLUME).unwrap();
    let a = Attached::start(&cl, &image, &[]);
    assert!(a.dev.starts_with("/dev/loop"), "{}", a.dev);
    assert_eq!(crate::ebpf::backing_of(&a.dev), Some(state(&cl).join("fuse/volume")));
    run("mkfs.ext4", &["-q", "-F", &a.dev]);
    let mnt = cl.dir.path().join("mnt");
    {
        let _m = Mounted::new(&a.dev, &mnt, "rw");
        let fio = mnt.join("fio.dat").display().to_string();
        let out = tokio::task::spawn_blocking(move || {
            run(
                "fio",
                &[
                    "--name=verify",
                    &format!("--filename={fio}"),
                    "--size=8M",
                    "--bs=4k",
                    "--rw=randwrite",
                    "--direct=1",
                    "--ioengine=libaio",
                    "--iodepth=8",
                    "--verify=crc32c",
                    "--do_verify=1",
                    "--verify_fatal=1",
                    "--fsync_on_close=1",
                ],
            )
        })
        .await
        .unwrap();
        assert!(out.contains("verify"), "{out}");
        let db = mnt.join("db.sqlite");
        let d = db.clone();
        tokio::task::spawn_blocking(move || sqlite(&d, &sqlite_script(0, 150))).await.unwrap();
        let ok = sqlite(&db, "PRAGMA integrity_check; SELECT count(*) FROM t;");
        assert_eq!(ok.split_whitespace().collect::<Vec<_>>(), ["ok", "150"], "{ok}");
    }
    let st = a.status().await;
    assert_eq!(st["mode"], "sync", "{st}");
    let next = st["next_seq"].as_u64().unwrap();
    a.detach(&cl).await;
    // The final figures are written when the device is detached.
    let v = order_checked(&cl);
    eprintln!("order check: {v}");
    nothing_left(&cl);
    replica_equals(&cl, &image, next).await;
    // The replica holds the same filesystem: clean, with the database intact.
    let rep = cl.dir.path().join("rep1/vol1.img").display().to_string();
    run("e2fsck", &["-fn", &rep]);
    kill_all([&mut staging, &mut replica]);
}
