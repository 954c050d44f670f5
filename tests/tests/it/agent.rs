//! The agent's synchronous path against real staging and replica processes: concurrent,
//! overlapping writes through `Agent::write` (the in-process capture) land on the local image only
//! after staging has them, the idle epoch close lets the replica apply the last epoch, and the
//! replica ends byte-identical to the local image. Plus the README's demo command.

use drv_proto::status::{Phase, ReplicaStatus, VolumeState};
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
    let (source, f) = blank_image(&cl);
    let (id, addr) = host1(&cl);
    let deadline = Instant::now() + Duration::from_secs(20);
    let agent = loop {
        let disk = Arc::new(FileDisk(f.try_clone().unwrap()));
        match Agent::start(&id, addr, cl.volume_id, VOLUME, disk, None, AgentOptions::default()).await {
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
    assert_replica_equals(&cl, &source, next).await;
    kill_all([&mut staging, &mut replica]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_volume_is_refused_at_start_with_its_reason() {
    let cl = Cluster::new(1, 1 << 20);
    let mut staging = staging_up(&cl).await;
    let (_, f) = blank_image(&cl);
    let (id, addr) = host1(&cl);
    let state = cl.dir.path().join("agent-state");
    let disk = Arc::new(FileDisk(f));
    let r = Agent::start(&id, addr, 999, 1 << 20, disk, Some(&state), AgentOptions::default()).await;
    let e = r.err().expect("an unknown volume must not start");
    assert!(e.to_string().contains("999"), "{e}");
    let _ = staging.kill();
    let _ = staging.wait();
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

/// The agent's certificate and the staging address of the cluster.
pub(crate) fn host1(cl: &Cluster) -> (Identity, std::net::SocketAddr) {
    (Identity::load(&cl.certs, "host1").unwrap(), cl.staging_addr.parse().unwrap())
}

/// A zero-filled source image of the cluster's volume size.
pub(crate) fn blank_image(cl: &Cluster) -> (std::path::PathBuf, std::fs::File) {
    let source = cl.dir.path().join("source.img");
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&source).unwrap();
    f.set_len(cl.volume_bytes).unwrap();
    (source, f)
}

/// A source image full of `pattern(seed)` (data the replica has never seen), opened for the agent.
pub(crate) fn pattern_image(cl: &Cluster, seed: u64) -> (std::path::PathBuf, std::fs::File) {
    let source = cl.dir.path().join("source.img");
    std::fs::write(&source, drv_format::pattern(seed, cl.volume_bytes as usize)).unwrap();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&source).unwrap();
    (source, f)
}

/// Waits until the replica applied every record before sequence `next` (the last epoch is closed
/// by the agent when idle), then compares its image with `image` byte for byte.
pub(crate) async fn assert_replica_equals(cl: &Cluster, image: &std::path::Path, next: u64) {
    let last = wait_applied(cl, next).await;
    let src = std::fs::read(image).unwrap();
    let rep = std::fs::read(cl.dir.path().join("rep1/vol1.img")).unwrap();
    assert_eq!(src.len(), rep.len());
    let first_diff = src.iter().zip(&rep).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "replica differs at byte {first_diff:?}; status {last:?}\n{}", cl.log("agent"));
}

/// Waits until the replica applied every record before sequence `next` (the last epoch is closed
/// by the agent when idle); returns its last status.
pub(crate) async fn wait_applied(cl: &Cluster, next: u64) -> Option<ReplicaStatus> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let last = cl.replica_status();
        if last.as_ref().is_some_and(|s| s.volumes[0].applied_seq + 1 >= next) {
            return last;
        }
        if Instant::now() >= end {
            panic!(
                "timed out waiting for the replica to apply everything before {next}\nreplica status {last:?}\n\
                 staging status {:?}\n--- staging log\n{}\n--- replica log\n{}",
                cl.status(&cl.staging_addr, "staging", "admin"),
                cl.log("stg1"),
                cl.log("rep1")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Kills the server processes of a test.
pub(crate) fn kill_all<const N: usize>(children: [&mut std::process::Child; N]) {
    for c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Starts staging and waits until it answers.
pub(crate) async fn staging_up(cl: &Cluster) -> std::process::Child {
    let staging = cl.start("staging", "stg1");
    until("staging", Duration::from_secs(20), || cl.status(&cl.staging_addr, "staging", "admin").is_some()).await;
    staging
}

/// Waits until `f` holds, polling every 50 ms; a timeout shows the servers' status and logs.
pub(crate) async fn until_in(cl: &Cluster, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        if Instant::now() >= end {
            panic!(
                "timed out waiting for {what}\nreplica status {:?}\nstaging status {:?}\n--- staging log\n{}\n--- replica log\n{}",
                cl.replica_status(),
                cl.status(&cl.staging_addr, "staging", "admin"),
                cl.log("stg1"),
                cl.log("rep1")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `f` holds, polling every 50 ms.
pub(crate) async fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_killed_mid_workload_change_map_then_resync_byte_identical() {
    use drv_agent::Mode;
    const VOLUME: u64 = 8 << 20;
    let cl = Cluster::new(1, VOLUME);
    let mut staging = cl.start("staging", "stg1");
    let mut replica = cl.start("replica", "rep1");
    let (source, f) = blank_image(&cl);
    let (id, addr) = host1(&cl);
    let state = cl.dir.path().join("agent-state");
    let opts = AgentOptions {
        ack_timeout: Duration::from_millis(800),
        reconnect_interval: Duration::from_millis(200),
        ..AgentOptions::default()
    };
    let disk = Arc::new(FileDisk(f.try_clone().unwrap()));
    // Wait for staging before starting, so the run begins in sync mode.
    until("staging", Duration::from_secs(20), || cl.status(&cl.staging_addr, "staging", "admin").is_some()).await;
    let agent = Agent::start(&id, addr, cl.volume_id, VOLUME, disk, Some(&state), opts).await.unwrap();
    assert_eq!(agent.mode(), Mode::Sync);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let (agent, stop) = (agent.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(100 + w);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let len = 4096 * (1 + rng.below(8)) as usize;
                let offset = rng.below(VOLUME - len as u64) / 4096 * 4096;
                let data = Bytes::from(drv_format::pattern(rng.next_u64(), len));
                // No write may fail: staging's absence is covered by the change map.
                agent.write(offset, data, Flags::default()).await.expect("write while staging is away");
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _ = staging.kill();
    let _ = staging.wait();
    let killed = Instant::now();
    until("change-map mode", Duration::from_secs(10), || agent.mode() == Mode::ChangeMap).await;
    let switched = killed.elapsed();
    assert!(switched < Duration::from_millis(800) + Duration::from_secs(2), "switch took {switched:?}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(agent.dirty_bytes() > 0, "writes while staging is away are marked");
    let mut staging = cl.start("staging", "stg1");
    until("resync back to sync mode", Duration::from_secs(30), || agent.mode() == Mode::Sync).await;
    assert_eq!(agent.dirty_bytes(), 0, "the change map is clear after the resync");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut writes = 0;
    for t in tasks {
        writes += t.await.unwrap();
    }
    assert!(writes > 0);
    assert!(agent.stats().mapped_writes.load(std::sync::atomic::Ordering::Relaxed) > 0);
    assert!(agent.stats().resync_bytes.load(std::sync::atomic::Ordering::Relaxed) > 0);
    let (next, _) = agent.position();
    assert_replica_equals(&cl, &source, next).await;
    kill_all([&mut staging, &mut replica]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_notices_staging_gone_and_comes_back_to_sync() {
    use drv_agent::Mode;
    const VOLUME: u64 = 4 << 20;
    let cl = Cluster::new(1, VOLUME);
    let opts = AgentOptions { reconnect_interval: Duration::from_millis(200), ..AgentOptions::default() };
    let (mut staging, mut replica, source, agent) = protected(&cl, opts).await;
    // Staging goes away while nothing is being written: status must not keep saying "sync".
    let _ = staging.kill();
    let _ = staging.wait();
    until("change-map mode without a write", Duration::from_secs(5), || agent.mode() == Mode::ChangeMap).await;
    // A write meanwhile is marked, staging returns, the agent resyncs it and is back in sync.
    agent.write(65536, Bytes::from(drv_format::pattern(2, 8192)), Flags::default()).await.unwrap();
    assert!(agent.dirty_bytes() > 0);
    let mut staging = cl.start("staging", "stg1");
    resynced_and_identical(&cl, &agent, &source).await;
    kill_all([&mut staging, &mut replica]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_too_slow_past_the_ack_timeout_switches_to_the_change_map_and_back() {
    use drv_agent::Mode;
    const VOLUME: u64 = 4 << 20;
    let signal = |sig: &str, pid: u32| {
        let st = std::process::Command::new("kill").arg(sig).arg(pid.to_string()).status().expect("run kill");
        assert!(st.success(), "kill {sig} {pid}");
    };
    let cl = Cluster::new(1, VOLUME);
    let timeout = Duration::from_millis(500);
    let opts = AgentOptions {
        ack_timeout: timeout,
        reconnect_interval: Duration::from_millis(200),
        ..AgentOptions::default()
    };
    let (mut staging, mut replica, source, agent) = protected(&cl, opts).await;
    // Staging stops answering but keeps its connection (a stalled server, not a dead one).
    // `kill` returns once the signal is queued; wait until every thread of staging has stopped,
    // or a loaded host may still let it acknowledge the next write.
    signal("-STOP", staging.id());
    until("every staging thread stopped", Duration::from_secs(10), || all_threads_stopped(staging.id())).await;
    let t = Instant::now();
    agent.write(65536, Bytes::from(drv_format::pattern(2, 8192)), Flags::default()).await.expect("no write fails");
    let took = t.elapsed();
    assert_eq!(agent.mode(), Mode::ChangeMap, "a write past the ack timeout moves the agent to its change map");
    assert!(took >= timeout, "the write waited for the timeout first ({took:?})");
    assert!(took < timeout * 6, "the write completed soon after the timeout ({took:?})");
    assert!(agent.dirty_bytes() > 0, "the write is marked");
    signal("-CONT", staging.id());
    resynced_and_identical(&cl, &agent, &source).await;
    kill_all([&mut staging, &mut replica]);
}

/// Whether every thread of process `pid` is in state T (stopped), from `/proc/PID/task/*/stat`.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().all(|t| {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // The state follows the command name, which is in parentheses and may contain spaces.
        stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
    })
}

/// Staging and replica up, and an agent with a state directory in sync mode on a blank image,
/// with one write done: (staging, replica, source image, agent).
async fn protected(
    cl: &Cluster,
    opts: AgentOptions,
) -> (std::process::Child, std::process::Child, std::path::PathBuf, Agent) {
    let staging = staging_up(cl).await;
    let replica = cl.start("replica", "rep1");
    let (source, f) = blank_image(cl);
    let (id, addr) = host1(cl);
    let disk = Arc::new(FileDisk(f));
    let state = cl.dir.path().join("agent-state");
    let agent = Agent::start(&id, addr, cl.volume_id, cl.volume_bytes, disk, Some(&state), opts).await.unwrap();
    assert_eq!(agent.mode(), drv_agent::Mode::Sync);
    agent.write(0, Bytes::from(drv_format::pattern(1, 8192)), Flags::default()).await.unwrap();
    (staging, replica, source, agent)
}

/// Waits until the agent is back in sync mode with nothing dirty, then checks the replica.
async fn resynced_and_identical(cl: &Cluster, agent: &Agent, source: &std::path::Path) {
    use drv_agent::Mode;
    until("sync mode again", Duration::from_secs(30), || agent.mode() == Mode::Sync && agent.dirty_bytes() == 0).await;
    let (next, _) = agent.position();
    assert_replica_equals(cl, source, next).await;
}

/// `agent-run` with the cluster's arguments; stdout piped.
fn agent_run(cl: &Cluster, image: &std::path::Path, state: &std::path::Path, cmd: &[&str]) -> std::process::Child {
    let bin = drv_tests::drv_bin().with_file_name("agent-run");
    std::process::Command::new(bin)
        .arg(&cl.certs)
        .arg(&cl.staging_addr)
        .arg(cl.volume_id.to_string())
        .arg(cl.volume_bytes.to_string())
        .arg(image)
        .arg(state)
        .args(cmd)
        .env("DRV_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(cl.dir.path().join("agent.log")).unwrap())
        .spawn()
        .expect("spawn agent-run")
}

/// Reads the child's stdout until a line starts with `prefix`; returns that line.
fn read_until(child: &mut std::process::Child, prefix: &str) -> String {
    use std::io::BufRead;
    let out = child.stdout.as_mut().expect("piped");
    let mut r = std::io::BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line).expect("read agent output");
        assert!(n > 0, "agent-run ended before printing {prefix:?}");
        if line.starts_with(prefix) {
            return line.trim().to_owned();
        }
    }
}

/// Runs `agent-run resync` to completion, waits until the replica applied everything, and checks
/// the replica image equals `image`.
async fn resync_and_compare(cl: &Cluster, image: &std::path::Path, state: &std::path::Path) {
    let mut r = agent_run(cl, image, state, &["resync"]);
    let line = read_until(&mut r, "SYNCED");
    assert!(r.wait().unwrap().success());
    let next: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_replica_equals(cl, image, next).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_with_dirty_blocks_resyncs_on_restart() {
    let cl = Cluster::new(1, 8 << 20);
    let mut replica = cl.start("replica", "rep1");
    let (image, state) = (cl.dir.path().join("source.img"), cl.dir.path().join("agent-state"));
    // Staging is down: every write goes to the change map. Kill the agent mid-workload.
    let mut a = agent_run(&cl, &image, &state, &["write", "7", "1000000"]);
    read_until(&mut a, "WROTE 300");
    a.kill().unwrap();
    a.wait().unwrap();
    let map = std::fs::read(state.join("changemap")).unwrap();
    assert!(map[4096..].iter().any(|b| *b != 0), "the killed agent left its marks on disk");
    let mut staging = staging_up(&cl).await;
    resync_and_compare(&cl, &image, &state).await;
    kill_all([&mut staging, &mut replica]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_doubt_is_resynced_from_the_local_disk() {
    let cl = Cluster::new(1, 8 << 20);
    let mut replica = cl.start("replica", "rep1");
    let mut staging = staging_up(&cl).await;
    let (image, state) = (cl.dir.path().join("source.img"), cl.dir.path().join("agent-state"));
    // The 40th write is durable at staging, then the agent dies before writing it locally.
    let mut a = agent_run(&cl, &image, &state, &["write", "9", "40", "40"]);
    read_until(&mut a, "HANG");
    a.kill().unwrap();
    a.wait().unwrap();
    let s = cl.staging_status().unwrap();
    assert!(s.volumes[0].durable_seq >= 40, "staging holds the write in doubt: {s:?}");
    // Restart: the activity log names the extents in doubt; they are resynced from the local disk,
    // so the replica ends equal to the local disk (which never got that write).
    resync_and_compare(&cl, &image, &state).await;
    kill_all([&mut staging, &mut replica]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_under_concurrent_writes_is_byte_identical() {
    use drv_agent::Mode;
    const VOLUME: u64 = 8 << 20;
    const BWLIMIT: u64 = 16 << 20;
    let cl = Cluster::new(1, VOLUME);
    let mut staging = cl.start("staging", "stg1");
    let mut replica = cl.start("replica", "rep1");
    // The source already holds data the replica has never seen.
    let (source, f) = pattern_image(&cl, 0x5eed);
    let (id, addr) = host1(&cl);
    until("staging", Duration::from_secs(20), || cl.status(&cl.staging_addr, "staging", "admin").is_some()).await;
    let state = cl.dir.path().join("agent-state");
    let disk = Arc::new(FileDisk(f));
    let opts = AgentOptions { reconnect_interval: Duration::from_millis(100), ..AgentOptions::default() };
    let agent = Agent::start(&id, addr, cl.volume_id, VOLUME, disk, Some(&state), opts).await.unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..3u64 {
        let (agent, stop) = (agent.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(500 + w);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let len = 4096 * (1 + rng.below(4)) as usize;
                let offset = rng.below(VOLUME - len as u64) / 4096 * 4096;
                let data = Bytes::from(drv_format::pattern(rng.next_u64(), len));
                agent.write(offset, data, Flags::default()).await.expect("write during the initial sync");
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    agent.start_initial_sync(Some(BWLIMIT)).await.unwrap();
    assert!(agent.dirty_bytes() >= VOLUME);
    until("the initial sync", Duration::from_secs(60), || agent.mode() == Mode::Sync && agent.dirty_bytes() == 0).await;
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let shipped = agent.stats().resync_bytes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(shipped >= VOLUME, "the whole volume was shipped: {shipped}");
    // The limiter held the first pass to BWLIMIT (a lower bound: a busy host only makes it slower).
    assert!(took >= Duration::from_secs_f64(0.8 * VOLUME as f64 / BWLIMIT as f64), "took {took:?}");
    agent.write(0, Bytes::from(drv_format::pattern(1, 4096)), Flags::FLUSH).await.unwrap();
    let (next, _) = agent.position();
    assert_replica_equals(&cl, &source, next).await;
    kill_all([&mut staging, &mut replica]);
}

/// An agent that died before staging acknowledged its initial sync's FULL record left the marker
/// in its state directory: the next start marks every block and sends the FULL record again, and
/// removes the marker once staging has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_sync_cut_short_by_a_crash_starts_again_with_its_full_record() {
    const VOLUME: u64 = 4 << 20;
    let cl = Cluster::new(1, VOLUME);
    let mut staging = staging_up(&cl).await;
    let mut replica = cl.start("replica", "rep1");
    // The source holds data the replica has never seen; the agent's state says a FULL is owed.
    let (source, f) = pattern_image(&cl, 0xf011);
    let state = cl.dir.path().join("agent-state");
    std::fs::create_dir_all(&state).unwrap();
    let marker = state.join(drv_agent::FULL_MARKER);
    std::fs::write(&marker, "an initial sync owes its FULL record\n").unwrap();
    let (id, addr) = host1(&cl);
    let opts = AgentOptions { reconnect_interval: Duration::from_millis(100), ..AgentOptions::default() };
    let agent = Agent::start(&id, addr, cl.volume_id, VOLUME, Arc::new(FileDisk(f)), Some(&state), opts).await.unwrap();
    assert!(agent.dirty_bytes() >= VOLUME, "every block marked again: {}", agent.dirty_bytes());
    agent.write(0, Bytes::from(drv_format::pattern(2, 4096)), Flags::FLUSH).await.unwrap();
    resynced_and_identical(&cl, &agent, &source).await;
    assert!(!marker.exists(), "the marker outlived the acknowledged FULL record");
    kill_all([&mut staging, &mut replica]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_sync_larger_than_the_replicas_dr_log_completes_byte_identical() {
    use drv_agent::Mode;
    // The cluster's DR log is 64 MiB (and staging's WRL too): a 96 MiB initial sync is one RESYNC
    // run that cannot fit. The replica applies it as it arrives and says it is resyncing.
    const VOLUME: u64 = 96 << 20;
    let cl = Cluster::new(1, VOLUME);
    let mut staging = staging_up(&cl).await;
    let mut replica = cl.start("replica", "rep1");
    let (source, f) = pattern_image(&cl, 0xb16);
    let (id, addr) = host1(&cl);
    let state = cl.dir.path().join("agent-state");
    let agent =
        Agent::start(&id, addr, cl.volume_id, VOLUME, Arc::new(FileDisk(f)), Some(&state), AgentOptions::default())
            .await
            .unwrap();
    // Paced, so that the run is applied in part for a few seconds.
    agent.start_initial_sync(Some(24 << 20)).await.unwrap();
    let (mut saw_resyncing, mut checked_point, mut listed_point) = (false, false, false);
    let blank = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&vec![0u8; VOLUME as usize]));
    let end = Instant::now() + Duration::from_secs(120);
    while !(agent.mode() == Mode::Sync && agent.dirty_bytes() == 0) {
        assert!(Instant::now() < end, "timed out waiting for the initial sync");
        let st = cl.replica_status();
        saw_resyncing |= st.as_ref().is_some_and(|s| s.volumes[0].state == VolumeState::Resyncing);
        // While the run is applied in part, the last consistent image (the blank target) is
        // kept as a snapshot of the replica's own, readable and unchanged.
        let auto = st.and_then(|s| s.volumes[0].snapshots.iter().find(|x| x.name.starts_with("auto-resync-")).cloned());
        if let (Some(a), false) = (auto.clone(), checked_point) {
            let mut args = strings(&["snapshot", "digest", "vol1", &a.name, "--json"]);
            args.extend(strings(&["--server", &cl.replica_addrs[0], "--certs", &cl.certs.display().to_string()]));
            let out = tokio::task::spawn_blocking(move || {
                std::process::Command::new(drv_tests::drv_bin()).args(&args).output().expect("run drv")
            })
            .await
            .unwrap();
            // Gone already if the run ended meanwhile.
            if out.status.success() {
                let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(d["xxh3_128"], blank.as_str(), "the consistent point during the resync: {d}");
                assert_eq!(d["seq"], a.seq);
                checked_point = true;
            }
        }
        // `drv snapshot points` says so: no consistent image now, the kept one listed.
        if let (Some(a), false) = (auto, listed_point) {
            let mut args = strings(&["snapshot", "points", "vol1", "--json"]);
            args.extend(strings(&["--server", &cl.replica_addrs[0], "--certs", &cl.certs.display().to_string()]));
            let out = tokio::task::spawn_blocking(move || {
                std::process::Command::new(drv_tests::drv_bin()).args(&args).output().expect("run drv")
            })
            .await
            .unwrap();
            if out.status.success() {
                let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                let kept = p["snapshots"].as_array().unwrap().iter().any(|s| s["name"] == a.name.as_str());
                listed_point |= kept && p["current"].is_null();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_resyncing, "the replica never said it was resyncing");
    assert!(checked_point, "the consistent point was never seen during the resync\n{}", cl.log("rep1"));
    assert!(listed_point, "drv snapshot points never listed the kept image as the only consistent one");
    let (next, _) = agent.position();
    assert_replica_equals(&cl, &source, next).await;
    let st = cl.replica_status().unwrap();
    assert_eq!(st.volumes[0].state, VolumeState::Replicating, "consistent again once the run ended: {st:?}");
    assert!(st.volumes[0].snapshots.is_empty(), "the consistent point is released: {st:?}");
    assert_eq!(st.volumes[0].snapshot_store_bytes, 0, "and its space freed");
    assert!(cl.log("rep1").contains("resync run larger than half the DR log"), "{}", cl.log("rep1"));
    kill_all([&mut staging, &mut replica]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_write_after_many_small_ones_never_makes_a_frame_over_the_replica_limit() {
    const VOLUME: u64 = 16 << 20;
    let cl = Cluster::new(1, VOLUME);
    let mut staging = staging_up(&cl).await;
    let (source, f) = blank_image(&cl);
    let (id, addr) = host1(&cl);
    let disk = Arc::new(FileDisk(f));
    let agent = Agent::start(&id, addr, cl.volume_id, VOLUME, disk, None, AgentOptions::default()).await.unwrap();
    // With the replica down, just under 4 MiB of 4 KiB writes and then one of 3.9 MiB (near the
    // record limit of this cluster's 4 MiB segments) wait in staging: one frame holding all of them
    // would be over the replica's 8 MiB frame limit.
    for i in 0..1023u64 {
        agent.write(i * 4096, Bytes::from(drv_format::pattern(i, 4096)), Flags::default()).await.unwrap();
    }
    let r = agent.write(8 << 20, Bytes::from(drv_format::pattern(7, 998 * 4096)), Flags::default()).await;
    assert!(r.is_ok(), "{r:?}\n{}", cl.log("stg1"));
    agent.write(0, Bytes::from(drv_format::pattern(8, 4096)), Flags::FLUSH).await.unwrap();
    let mut replica = cl.start("replica", "rep1");
    let (next, _) = agent.position();
    assert_replica_equals(&cl, &source, next).await;
    assert!(!cl.log("stg1").contains("over the limit"), "{}", cl.log("stg1"));
    kill_all([&mut staging, &mut replica]);
}

/// Runs `drv ARGS` (with the cluster's certificates) off the async runtime; returns stdout, or
/// panics with stdout and stderr if it failed.
pub(crate) async fn drv(args: Vec<String>) -> String {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(drv_tests::drv_bin()).args(&args).output().expect("run drv")
    })
    .await
    .unwrap();
    let (o, e) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "drv failed: {o}{e}");
    o
}

/// Runs `drv ARGS` off the async runtime, expecting it to fail; returns its stderr.
pub(crate) async fn drv_fails(args: Vec<String>) -> String {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(drv_tests::drv_bin()).args(&args).output().expect("run drv")
    })
    .await
    .unwrap();
    assert!(!out.status.success(), "drv succeeded: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub(crate) fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The JSON lines of a command's output.
pub(crate) fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drv_agent_run_and_sync_start_copy_the_whole_volume() {
    const VOLUME: u64 = 8 << 20;
    let cl = Cluster::new(1, VOLUME);
    let mut staging = staging_up(&cl).await;
    let mut replica = cl.start("replica", "rep1");
    // The source holds data the replica has never seen.
    let source = cl.dir.path().join("source.img");
    std::fs::write(&source, drv_format::pattern(0xabc, VOLUME as usize)).unwrap();
    let run = cl.dir.path().join("run");
    let mut agent = std::process::Command::new(drv_tests::drv_bin())
        .args(["agent", "run", "--volume", "vol1", "--name", "host1"])
        .arg("--config")
        .arg(&cl.config)
        .arg("--certs")
        .arg(&cl.certs)
        .arg("--device")
        .arg(&source)
        .arg("--state-dir")
        .arg(cl.dir.path().join("agent-state"))
        .arg("--run-dir")
        .arg(&run)
        .env("DRV_LOG", "info")
        .stderr(std::fs::File::create(cl.dir.path().join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    let run_dir = run.display().to_string();
    until("the agent's control socket", Duration::from_secs(20), || run.join("vol1.sock").exists()).await;
    let st: serde_json::Value =
        serde_json::from_str(&drv(strings(&["agent", "status", "vol1", "--json", "--run-dir", &run_dir])).await)
            .unwrap();
    assert_eq!(st["mode"], "sync", "{st}");
    assert_eq!(st["dirty_bytes"], 0, "{st}");
    // A second agent for the volume stops at once, leaving the first one's socket alone.
    let mut second = strings(&["agent", "run", "--volume", "vol1", "--name", "host1", "--run-dir", &run_dir]);
    for (flag, path) in [("--config", &cl.config), ("--certs", &cl.certs), ("--device", &source)] {
        second.extend([flag.to_string(), path.display().to_string()]);
    }
    let e = drv_fails(second).await;
    assert!(e.contains("another agent is serving it"), "{e}");
    assert!(run.join("vol1.sock").exists());
    // Bad requests get a reason and change nothing.
    {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(run.join("vol1.sock")).unwrap();
        let mut r = std::io::BufReader::new(s.try_clone().unwrap());
        for (req, why) in [
            ("garbage\n", "malformed request"),
            ("{\"op\":\"resync\",\"extents\":[[8388608,1]]}\n", "outside the volume"),
        ] {
            s.write_all(req.as_bytes()).unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["ok"], false, "{line}");
            assert!(v["error"].as_str().unwrap().contains(why), "{line}");
        }
    }
    // Not a terminal: JSON progress lines, the last one done.
    let out = drv(strings(&["sync", "start", "vol1", "--bwlimit", "32M", "--run-dir", &run_dir])).await;
    let lines = json_lines(&out);
    let last = lines.last().expect("progress lines");
    assert_eq!(last["done"], true, "{out}");
    assert!(last["shipped_bytes"].as_u64().unwrap() >= VOLUME, "{out}");
    assert!(lines.iter().all(|l| l["total_bytes"].as_u64() >= Some(VOLUME)), "{out}");
    let st: serde_json::Value =
        serde_json::from_str(&drv(strings(&["agent", "status", "vol1", "--json", "--run-dir", &run_dir])).await)
            .unwrap();
    assert_eq!(st["mode"], "sync", "{st}");
    assert_replica_equals(&cl, &source, st["next_seq"].as_u64().unwrap()).await;
    // The source's digest at a sequence number, and a replica snapshot's at it: the same.
    let d: serde_json::Value =
        serde_json::from_str(&drv(strings(&["agent", "digest", "vol1", "--json", "--run-dir", &run_dir])).await)
            .unwrap();
    let want = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&std::fs::read(&source).unwrap()));
    assert_eq!(d["xxh3_128"], want.as_str(), "{d}");
    let conn = strings(&["--server", &cl.replica_addrs[0], "--certs", &cl.certs.display().to_string(), "--json"]);
    let mut create = strings(&["snapshot", "create", "vol1", "verify"]);
    create.extend(conn.clone());
    let snap: serde_json::Value = serde_json::from_str(&drv(create).await).unwrap();
    assert!(snap["seq"].as_u64() >= d["seq"].as_u64(), "{snap} {d}");
    let mut digest = strings(&["snapshot", "digest", "vol1", "verify"]);
    digest.extend(conn);
    let r: serde_json::Value = serde_json::from_str(&drv(digest).await).unwrap();
    assert_eq!(r["xxh3_128"], d["xxh3_128"], "the replica at seq {} and the source at seq {}", r["seq"], d["seq"]);
    // SIGTERM: a clean stop that removes the socket.
    assert!(std::process::Command::new("kill").args(["-TERM", &agent.id().to_string()]).status().unwrap().success());
    assert!(agent.wait().unwrap().success(), "{}", cl.log("agent"));
    assert!(!run.join("vol1.sock").exists());
    kill_all([&mut staging, &mut replica]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_resync_with_dd_ships_only_the_blocks_changed_since_begin() {
    use drv_agent::Mode;
    const VOLUME: u64 = 16 << 20;
    const BLOCK: u64 = 64 << 10; // the volume's change-map block size (the default)
    let cl = Cluster::new(1, VOLUME);
    let mut staging = staging_up(&cl).await;
    let mut replica = cl.start("replica", "rep1");
    until("replica", Duration::from_secs(20), || cl.status(&cl.replica_addrs[0], "replica", "admin").is_some()).await;
    // The source holds data the replica has never seen: media resync is its initial copy.
    let source = cl.dir.path().join("source.img");
    std::fs::write(&source, drv_format::pattern(0x3ed1a, VOLUME as usize)).unwrap();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&source).unwrap();
    let (id, addr) = host1(&cl);
    let opts = AgentOptions { reconnect_interval: Duration::from_millis(100), ..AgentOptions::default() };
    let state = cl.dir.path().join("agent-state");
    let agent = Agent::start(&id, addr, cl.volume_id, VOLUME, Arc::new(FileDisk(f)), Some(&state), opts).await.unwrap();
    // One agent per state directory.
    let f2 = std::fs::OpenOptions::new().read(true).write(true).open(&source).unwrap();
    let r =
        Agent::start(&id, addr, cl.volume_id, VOLUME, Arc::new(FileDisk(f2)), Some(&state), AgentOptions::default());
    let e = r.await.err().expect("a second agent on the same state directory");
    assert!(
        e.to_string().contains("agent state directory") && e.to_string().contains("is locked by this process"),
        "{e}"
    );
    let run = cl.dir.path().join("run");
    let listener = drv_agent::control::bind(&run.join("vol1.sock")).unwrap();
    let control = tokio::spawn(drv_agent::control::serve(agent.clone(), listener, run.join("vol1.sock")));
    let run_dir = run.display().to_string();
    let conn = |json: bool| {
        let mut v = strings(&["--server", &cl.replica_addrs[0], "--certs", &cl.certs.display().to_string()]);
        if json {
            v.push("--json".into());
        }
        v
    };
    let mut begin = strings(&["media-resync", "begin", "vol1"]);
    begin.extend(conn(false));
    drv(begin).await;
    let mut snap = strings(&["snapshot", "create", "vol1", "during-media"]);
    snap.extend(conn(false));
    let e = drv_fails(snap).await;
    assert!(e.contains("media resync"), "{e}");
    // Writes after `begin`, some before the "backup" is taken and some while it is copied.
    let mut changed = std::collections::BTreeSet::new();
    let mut rng = Rng::new(77);
    let mut write = async |n: usize, changed: &mut std::collections::BTreeSet<u64>| {
        for _ in 0..n {
            let len = 4096 * (1 + rng.below(8));
            let offset = rng.below(VOLUME - len) / 4096 * 4096;
            agent
                .write(offset, Bytes::from(drv_format::pattern(rng.next_u64(), len as usize)), Flags::default())
                .await
                .unwrap();
            changed.extend(offset / BLOCK..(offset + len).div_ceil(BLOCK));
        }
    };
    write(20, &mut changed).await;
    // The replica dies while tracking (SIGKILL) and comes back: the phase and the marks of what it
    // applied are on disk; what it had not applied is still in staging or its DR log.
    let _ = replica.kill();
    let _ = replica.wait();
    write(10, &mut changed).await;
    replica = cl.start("replica", "rep1");
    until("replica back", Duration::from_secs(20), || cl.status(&cl.replica_addrs[0], "replica", "admin").is_some())
        .await;
    let st = cl.replica_status().unwrap();
    assert!(matches!(st.volumes[0].media, Some(Phase::Tracking { .. })), "{st:?}");
    // The backup: dd of the source onto the replica's target.
    let target = cl.dir.path().join("rep1/vol1.img");
    let dd = std::process::Command::new("dd")
        .arg(format!("if={}", source.display()))
        .arg(format!("of={}", target.display()))
        .args(["bs=1M", "conv=notrunc,fsync", "status=none"])
        .status()
        .unwrap();
    assert!(dd.success());
    write(20, &mut changed).await;
    agent.close_epoch();
    // Every write applied (marked) on the replica before `complete`: the count is then exact.
    let (next, _) = agent.position();
    until("the replica to take every write", Duration::from_secs(30), || {
        cl.replica_status().is_some_and(|s| s.volumes[0].applied_seq + 1 >= next)
    })
    .await;
    let mut complete = strings(&["media-resync", "complete", "vol1", "--run-dir", &run_dir]);
    complete.extend(conn(true));
    let out = drv(complete).await;
    let lines = json_lines(&out);
    let expected = changed.len() as u64 * BLOCK;
    assert_eq!(lines[0]["changed_bytes"], expected, "{out}");
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true, "{out}");
    // Only the changed blocks went over the network: a small part of the volume.
    assert_eq!(last["shipped_bytes"], expected, "{out}");
    assert!(expected < VOLUME / 4, "{expected}");
    assert_eq!(agent.mode(), Mode::Sync);
    let (next, _) = agent.position();
    assert_replica_equals(&cl, &source, next).await;
    let st = cl.replica_status().unwrap();
    assert_eq!(st.volumes[0].media, None, "{st:?}");
    assert_eq!(st.volumes[0].state, VolumeState::Replicating, "{st:?}");
    // Nothing left to complete: a clear refusal.
    let mut again = strings(&["media-resync", "complete", "vol1", "--run-dir", &run_dir]);
    again.extend(conn(false));
    let e = drv_fails(again).await;
    assert!(e.contains("media-resync begin` first"), "{e}");
    control.abort();
    kill_all([&mut staging, &mut replica]);
}

/// A volume whose every record staging has trimmed (relayed and confirmed, then pushed out of the
/// WRL by another volume's writes) keeps its sequence across a staging restart: the agent
/// continues after its last write, and the replica applies what comes next. Before, staging
/// recovered the volume's position from the records in its log alone and told the agent to start
/// again at seq 1 (which the replica skipped as already logged), and the replica's apply of the
/// idle volume stopped for good ("lsn was trimmed"). And records the replica held before a restart
/// count as confirmed when the relay resumes: before, an idle volume's records held the log's
/// trimming back until that volume wrote again, and the other volume's writes found the log full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_trimmed_out_of_the_wrl_keeps_its_sequence_across_a_staging_restart() {
    const VOLUME: u64 = 4 << 20;
    let cl = Cluster::new(1, VOLUME);
    // A second volume on the same WRL (64 MiB of 4 MiB segments), to push the first one's records
    // out of it.
    let st = drv_config::ConfigStore::open(&cl.config).unwrap();
    let v2 = st
        .set(drv_config::Kind::Volume, "vol2", &strings(&["size_bytes=64M", "wrl=w0", "replicas=[\"rep1\"]", "key=k1"]))
        .unwrap();
    drop(st);
    let vol2 = v2["id"].as_u64().unwrap();
    let mut replica = cl.start("replica", "rep1");
    let mut staging = staging_up(&cl).await;
    let (source, f) = blank_image(&cl);
    let (id, addr) = host1(&cl);
    let other = cl.dir.path().join("other.img");
    std::fs::File::create(&other).unwrap().set_len(64 << 20).unwrap();
    // The other volume writes `mib` MiB (no change map: a full log would fail these writes).
    let push = async |round: u64, mib: u64| {
        let g = std::fs::OpenOptions::new().read(true).write(true).open(&other).unwrap();
        let b = Agent::start(&id, addr, vol2, 64 << 20, Arc::new(FileDisk(g)), None, AgentOptions::default())
            .await
            .unwrap();
        for i in 0..mib {
            let data = Bytes::from(drv_format::pattern(round * 100 + i, 1 << 20));
            b.write((i % 64) << 20, data, Flags::default()).await.unwrap();
        }
    };
    let vol1 = async |seed: u64| {
        let disk = Arc::new(FileDisk(f.try_clone().unwrap()));
        let a = Agent::start(&id, addr, cl.volume_id, VOLUME, disk, None, AgentOptions::default()).await.unwrap();
        let before = a.position().0;
        for i in 0..8u64 {
            a.write(i * 65536, Bytes::from(drv_format::pattern(seed + i, 65536)), Flags::default()).await.unwrap();
        }
        // The agent ends its last epoch (EPOCH_END) once idle: stay until the replica applied it.
        a.close_epoch();
        wait_applied(&cl, a.position().0).await;
        (before, a.position().0)
    };
    let (_, next) = vol1(1).await;
    push(1, 40).await;
    until("vol1's records trimmed", Duration::from_secs(60), || {
        cl.staging_status().is_some_and(|s| s.wrls[0].first_lsn > next + 16)
    })
    .await;
    kill_all([&mut staging]);
    let mut staging = staging_up(&cl).await;
    let (resumed, next) = vol1(10).await;
    assert!(resumed >= 9, "staging forgot vol1's position: its next seq was {resumed}");
    assert_replica_equals(&cl, &source, next).await;
    // vol1's last records are in the log, relayed, and idle: after a restart they must not hold
    // the log's trimming back.
    kill_all([&mut staging]);
    let mut staging = staging_up(&cl).await;
    // More than the whole log: it must trim as it goes.
    push(2, 80).await;
    let (_, next) = vol1(20).await;
    assert_replica_equals(&cl, &source, next).await;
    kill_all([&mut staging, &mut replica]);
}
