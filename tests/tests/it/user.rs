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
pub(crate) struct Attached {
    child: Child,
    pub(crate) dev: String,
    run_dir: String,
    state: PathBuf,
}

impl Drop for Attached {
    /// A failed test must not leave its FUSE mount and loop device behind: the agent is killed
    /// and `drv detach` (with no agent) removes them, as an administrator would.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new(drv_tests::drv_bin())
            .args(["detach", "vol1", "--run-dir", &self.run_dir])
            .arg("--state-dir")
            .arg(&self.state)
            .output();
    }
}

impl Attached {
    /// Starts the agent on `image` and waits for its `DEVICE` line. The caller waits for the
    /// process (`detach`, or a kill in the crash test).
    #[allow(clippy::zombie_processes)]
    pub(crate) fn start(cl: &Cluster, image: &Path, extra: &[&str]) -> Attached {
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
                let st = child.wait();
                panic!("drv attach ended before its DEVICE line ({st:?}):\n{}", cl.log("agent"));
            }
            if let Some(dev) = line.trim().strip_prefix("DEVICE ") {
                let dev = dev.to_owned();
                // Keep reading (and dropping) its output so it never blocks on a full pipe.
                std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
                return Attached { child, dev, run_dir, state: state(cl) };
            }
        }
    }

    pub(crate) async fn status(&self) -> serde_json::Value {
        let out = drv(strings(&["agent", "status", "vol1", "--json", "--run-dir", &self.run_dir])).await;
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"))
    }

    /// Waits until the agent is in sync mode with nothing dirty (a resync finished).
    async fn synced(&self) {
        until("sync mode with nothing dirty", Duration::from_secs(60), || {
            let out = Command::new(drv_tests::drv_bin())
                .args(["agent", "status", "vol1", "--json", "--run-dir", &self.run_dir])
                .output()
                .unwrap();
            let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            st["mode"] == "sync" && st["dirty_bytes"] == 0
        })
        .await;
    }

    /// `drv detach vol1`; the agent exits successfully.
    pub(crate) async fn detach(mut self, cl: &Cluster) {
        drv(strings(&["detach", "vol1", "--run-dir", &self.run_dir])).await;
        let st = tokio::task::spawn_blocking(move || self.child.wait()).await.unwrap().unwrap();
        assert!(st.success(), "drv attach after detach: {st}\n{}", cl.log("agent"));
    }
}

/// A cluster with staging and replica running, and the source image of its volume: zeros, or a
/// pattern from seed `fill`.
pub(crate) async fn running(volume: u64, fill: Option<u64>) -> (Cluster, Child, Child, PathBuf) {
    let cl = Cluster::new(1, volume);
    let staging = staging_up(&cl).await;
    let replica = cl.start("replica", "rep1");
    let image = cl.dir.path().join("source.img");
    match fill {
        Some(seed) => std::fs::write(&image, drv_tests::pattern(seed, volume as usize)).unwrap(),
        None => std::fs::File::create(&image).unwrap().set_len(volume).unwrap(),
    }
    (cl, staging, replica, image)
}

fn state(cl: &Cluster) -> PathBuf {
    cl.dir.path().join("agent-state")
}

pub(crate) fn run(cmd: &str, args: &[&str]) -> String {
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
pub(crate) struct Mounted(PathBuf);

impl Mounted {
    pub(crate) fn new(dev: &str, dir: &Path, opts: &str) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        run("mount", &["-o", opts, dev, &dir.display().to_string()]);
        Mounted(dir.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // Processes just killed may still hold files open for a moment.
        for _ in 0..100 {
            let out = Command::new("umount").arg(&self.0).output();
            if out.is_ok_and(|o| o.status.success()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
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
pub(crate) async fn replica_equals(cl: &Cluster, image: &Path, next: u64) {
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

pub(crate) fn sqlite(db: &Path, script: &str) -> String {
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
    let (cl, mut staging, mut replica, image) = running(64 << 20, None).await;
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
                    // fio would leave its verify state file in the working directory.
                    "--verify_state_save=0",
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
        // Mounted: detach is refused, with the reason, and the device keeps working.
        let err = crate::agent::drv_fails(strings(&["detach", "vol1", "--run-dir", &a.run_dir])).await;
        assert!(err.contains("is in use") && err.contains(&a.dev), "{err}");
        sqlite(&db, &sqlite_script(150, 1));
    }
    let st = a.status().await;
    assert_eq!(st["mode"], "sync", "{st}");
    // Every write and flush of the filesystem went through the agent.
    let c = &st["capture"];
    assert_eq!(c["device"], a.dev.as_str(), "{st}");
    assert!(c["writes"].as_u64().unwrap() > 2048, "{st}");
    assert!(c["flushes"].as_u64().unwrap() > 150, "sqlite's commits and fio's fsync are flushes: {st}");
    assert_eq!(c["failed"], 0, "{st}");
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

/// A workload on the mounted filesystem, as its own process group: sqlite transactions and files
/// written with `fsync`, forever (until killed).
pub(crate) fn start_workload(mnt: &Path, round: u64) -> Child {
    let script = format!(
        "i={start}\n\
         while :; do\n\
           sqlite3 {db} \"CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, k INTEGER, v BLOB); \
             BEGIN; INSERT INTO t(k, v) VALUES ($i, randomblob(1000 + $i % 9 * 900)); COMMIT;\" || exit 1\n\
           dd if=/dev/urandom of={dir}/f$((i % 64)) bs=16k count=$((1 + i % 5)) conv=fsync status=none || exit 1\n\
           i=$((i + 1))\n\
         done",
        start = round * 1_000_000,
        db = mnt.join("db.sqlite").display(),
        dir = mnt.display()
    );
    use std::os::unix::process::CommandExt;
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start the workload")
}

/// Checks a copy of the replica's image as an administrator would after a disaster: the ext4
/// journal replayed (as a mount would), then `e2fsck -fn` clean, a read-only mount, and sqlite's
/// integrity check of the database (on a copy: a hot journal is rolled back there). Returns the
/// database's row count.
fn check_replica_image(dir: &Path, point: usize) -> u64 {
    let copy = dir.join("check.img");
    std::fs::copy(dir.join("rep1/vol1.img"), &copy).unwrap();
    let c = copy.display().to_string();
    // Exit status 1 means "the journal was replayed" (a change, not an error).
    let replay = Command::new("e2fsck").args(["-E", "journal_only", "-y", &c]).output().unwrap();
    assert!(
        matches!(replay.status.code(), Some(0 | 1)),
        "crash point {point}: journal replay: {}{}",
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&replay.stderr)
    );
    let fsck = Command::new("e2fsck").args(["-fn", &c]).output().unwrap();
    assert!(
        fsck.status.success(),
        "crash point {point}: e2fsck -fn of the replica: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let lo = run("losetup", &["--find", "--show", "--read-only", &c]).trim().to_owned();
    let detach = Detach(lo.clone());
    let mnt = dir.join("check-mnt");
    let rows = {
        let _m = Mounted::new(&lo, &mnt, "ro");
        let db = mnt.join("db.sqlite");
        if db.exists() {
            let copy = dir.join("check-db");
            let _ = std::fs::remove_dir_all(&copy);
            std::fs::create_dir(&copy).unwrap();
            for f in ["db.sqlite", "db.sqlite-journal"] {
                if mnt.join(f).exists() {
                    std::fs::copy(mnt.join(f), copy.join(f)).unwrap();
                }
            }
            let out = sqlite(&copy.join("db.sqlite"), "PRAGMA integrity_check; SELECT count(*) FROM t;");
            let words: Vec<&str> = out.split_whitespace().collect();
            assert_eq!(words.first(), Some(&"ok"), "crash point {point}: sqlite integrity_check: {out}");
            words.get(1).and_then(|n| n.parse().ok()).unwrap_or(0)
        } else {
            0
        }
    };
    drop(detach);
    rows
}

/// Detaches a loop device on drop.
pub(crate) struct Detach(pub(crate) String);

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn kill9(pid: u32) {
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_whole_pipeline_at_random_moments_leaves_a_consistent_replica() {
    if !root_or_skip("sigkill_of_the_whole_pipeline_at_random_moments_leaves_a_consistent_replica") {
        return;
    }
    // DRV_CRASH_POINTS raises the count (the benchmark run uses more).
    let points: usize = std::env::var("DRV_CRASH_POINTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    const VOLUME: u64 = 64 << 20;
    let cl = Cluster::new(1, VOLUME);
    let image = cl.dir.path().join("source.img");
    std::fs::File::create(&image).unwrap().set_len(VOLUME).unwrap();
    let mnt = cl.dir.path().join("mnt");
    let mut rng = Rng::new(0xc4a5);
    let mut rows_seen = Vec::new();
    for point in 0..points {
        let mut staging = staging_up(&cl).await;
        let mut replica = cl.start("replica", "rep1");
        let a = Attached::start(&cl, &image, &[]);
        if point == 0 {
            // The filesystem reaches the replica before the first crash (a replica from before
            // mkfs is consistent too, but has nothing to check).
            run("mkfs.ext4", &["-q", "-F", &a.dev]);
            run("sync", &[]);
            wait_applied(&cl, a.status().await["next_seq"].as_u64().unwrap()).await;
        }
        let m = Mounted::new(&a.dev, &mnt, "rw");
        let mut work = start_workload(&mnt, point as u64);
        // A random moment: some runs die early (the first writes after a restart), most later.
        let ms = 100 + rng.below(1400);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        assert!(work.try_wait().unwrap().is_none(), "crash point {point}: the workload failed before the crash");
        // The whole pipeline at once: agent, staging, replica (and the application with them).
        for pid in [a.child.id(), staging.id(), replica.id()] {
            kill9(pid);
        }
        // SAFETY: kill(2) of the workload's process group.
        unsafe { libc::kill(-(work.id() as i32), libc::SIGKILL) };
        let _ = work.wait();
        let mut a = a;
        let _ = a.child.wait();
        kill_all([&mut staging, &mut replica]);
        // The source's filesystem saw I/O errors from the moment the agent died.
        drop(m);
        if point == 2 {
            // As if the agent had died between binding the loop device and recording it: the
            // next attach finds it by its backing file (`nothing_left` at the end checks).
            std::fs::remove_file(state(&cl).join("user-attached")).unwrap();
        }
        if point == 1 {
            // `drv detach` with no agent running cleans up what the dead one left (the next
            // attach would do it too).
            let state = state(&cl).display().to_string();
            let run_dir = cl.dir.path().join("run").display().to_string();
            let out = drv(strings(&["detach", "vol1", "--state-dir", &state, "--run-dir", &run_dir])).await;
            assert!(out.contains("detached"), "{out}");
            nothing_left(&cl);
        }
        // The replica, restarted alone, recovers its image to an epoch boundary.
        let mut replica = cl.start("replica", "rep1");
        until("the replica answers", Duration::from_secs(30), || {
            cl.status(&cl.replica_addrs[0], "replica", "admin").is_some()
        })
        .await;
        kill_all([&mut replica]);
        let dir = cl.dir.path().to_path_buf();
        let rows = tokio::task::spawn_blocking(move || check_replica_image(&dir, point)).await.unwrap();
        rows_seen.push(rows);
        eprintln!("crash point {point} after {ms} ms: replica consistent, {rows} rows");
    }
    // Last: everything back, a clean detach, and the replica equal to the source.
    let mut staging = staging_up(&cl).await;
    let mut replica = cl.start("replica", "rep1");
    let a = Attached::start(&cl, &image, &[]);
    {
        let _m = Mounted::new(&a.dev, &mnt, "rw");
        let ok = sqlite(&mnt.join("db.sqlite"), "PRAGMA integrity_check;");
        assert_eq!(ok.trim(), "ok", "the source's database: {ok}");
    }
    a.synced().await;
    let next = a.status().await["next_seq"].as_u64().unwrap();
    a.detach(&cl).await;
    nothing_left(&cl);
    replica_equals(&cl, &image, next).await;
    assert!(rows_seen.iter().any(|r| *r > 0), "no crash point had data on the replica: {rows_seen:?}");
    kill_all([&mut staging, &mut replica]);
}

/// Whether every thread of process `pid` is stopped (SIGSTOP delivered to all of them).
fn stopped(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().all(|t| {
        let stat = std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap_or_default();
        stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
    })
}

/// `dd` of `count` 64 KiB blocks of a pattern at block `seek`, O_DIRECT, as a child process.
fn dd_child(dev: &str, seek: u64, count: u64) -> Child {
    Command::new("dd")
        .args(["if=/dev/urandom", &format!("of={dev}"), "bs=64k", &format!("count={count}"), &format!("seek={seek}")])
        .args(["oflag=direct", "conv=notrunc,fsync", "status=none"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dd")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_paused_holds_writers_and_staging_gone_goes_to_the_change_map_then_resyncs() {
    if !root_or_skip("staging_paused_holds_writers_and_staging_gone_goes_to_the_change_map_then_resyncs") {
        return;
    }
    let (cl, mut staging, mut replica, image) = running(32 << 20, Some(3)).await;
    let a = Attached::start(&cl, &image, &["--ack-timeout-ms", "3000"]);
    // The initial copy of the image first (a resync run), so later comparisons are whole.
    drv(strings(&["sync", "start", "vol1", "--json", "--run-dir", &a.run_dir])).await;
    let mut w = dd_child(&a.dev, 0, 16);
    assert!(w.wait().unwrap().success());
    // Paused: a writer waits (well within the ack timeout), and finishes once staging resumes.
    let pid = staging.id().to_string();
    run("kill", &["-STOP", &pid]);
    until("staging stopped", Duration::from_secs(10), || stopped(staging.id())).await;
    let mut w = dd_child(&a.dev, 40, 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(w.try_wait().unwrap().is_none(), "a write completed while staging was paused");
    assert_eq!(a.status().await["mode"], "sync");
    run("kill", &["-CONT", &pid]);
    let st = tokio::task::spawn_blocking(move || w.wait()).await.unwrap().unwrap();
    assert!(st.success(), "the held write failed after staging resumed");
    assert_eq!(a.status().await["mode"], "sync");
    // Gone past the timeout: writes go on, marked in the change map.
    kill_all([&mut staging]);
    let mut w = dd_child(&a.dev, 100, 32);
    let st = tokio::task::spawn_blocking(move || w.wait()).await.unwrap().unwrap();
    assert!(st.success(), "writes failed with staging gone");
    let s = a.status().await;
    assert_eq!(s["mode"], "change-map", "{s}");
    assert!(s["dirty_bytes"].as_u64().unwrap() >= 32 << 16, "{s}");
    // Back: resync of the dirty blocks only, then sync mode and an identical replica.
    let mut staging = staging_up(&cl).await;
    a.synced().await;
    let s = a.status().await;
    let next = s["next_seq"].as_u64().unwrap();
    a.detach(&cl).await;
    nothing_left(&cl);
    replica_equals(&cl, &image, next).await;
    kill_all([&mut staging, &mut replica]);
}
