//! The mistakes administrators make, tried the way they make them, against the real `drv` binary:
//! a second process on one data directory or WRL, configurations that cannot work, a start that
//! fails half-way, bad inputs whose messages must name what was wrong (once), a resync while
//! staging's log is full, and the logs of ordinary status polling.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use drv_agent::{Agent, AgentOptions, FileDisk, Mode};
use drv_format::record::Flags;
use drv_tests::{Cluster, drv_bin};

use crate::agent::{assert_replica_equals, blank_image, host1, kill_all, staging_up, until};

/// What a `drv` command printed, and how it ended.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn drv(args: &[&str], dir: &Path) -> Run {
    let out = Command::new(drv_bin()).args(args).current_dir(dir).env_remove("DRV_CONFIG").output().expect("run drv");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A failed command's message: exit code non-zero, `expect` in it, every cause said once, no Rust
/// type names, no colour codes.
fn assert_said_once(what: &str, r: &Run, expect: &[&str]) {
    assert_ne!(r.code, Some(0), "{what}: exit code 0\nstdout: {}\nstderr: {}", r.stdout, r.stderr);
    let msg = r.stderr.trim();
    for e in expect {
        assert!(msg.contains(e), "{what}: {e:?} not in the message:\n{msg}");
    }
    let segments: Vec<&str> = msg.split(": ").map(str::trim).collect();
    for (i, s) in segments.iter().enumerate() {
        assert!(!segments[..i].contains(s), "{what}: {s:?} said twice:\n{msg}");
    }
    for bad in ["::", "untagged enum", "expected u32", "expected u64", "Some(", "\u{1b}["] {
        assert!(!msg.contains(bad), "{what}: {bad:?} in the message:\n{msg}");
    }
}

fn config_arg(cl: &Cluster) -> String {
    cl.config.display().to_string()
}

#[test]
fn config_set_refuses_what_cannot_work_naming_entry_field_value_and_range() {
    let cl = Cluster::new(1, 1 << 20);
    let store = config_arg(&cl);
    // Blocks of 2 MiB: a resync record that only a WRL with segments of 4 MiB or more holds.
    let r = drv(&["config", "--store", &store, "set", "volume", "vol1", "block_bytes=2M"], cl.dir.path());
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let before = drv(&["config", "--store", &store, "list", "--json"], cl.dir.path());
    assert_eq!(before.code, Some(0), "{}", before.stderr);
    // (entry kind, name, fields, what the message must contain)
    let table: &[(&str, &str, &[&str], &[&str])] = &[
        ("wrl", "w0", &["segment_bytes=0"], &["wrl \"w0\"", "segment_bytes=0", "1 MiB to 1 GiB"]),
        ("wrl", "w0", &["segment_bytes=1500000"], &["segment_bytes=1500000", "not a multiple of 1 MiB"]),
        ("wrl", "w0", &["segment_bytes=2G"], &["segment_bytes=2G", "over the maximum of 1 GiB"]),
        ("wrl", "w0", &["device_bytes=1K"], &["device_bytes=1K", "fewer segments"]),
        ("wrl", "w0", &["batch_bytes_limit=0"], &["batch_bytes_limit=0", "64 KiB to 1 GiB"]),
        ("wrl", "w0", &["queue_bytes_limit=0"], &["queue_bytes_limit=0", "below the minimum"]),
        ("wrl", "w0", &["devices=[\"/a\",\"/a\"]"], &["\"/a\"", "named twice"]),
        ("wrl", "w0", &["devices=[\"relative\"]"], &["relative", "not an absolute path"]),
        ("volume", "vol1", &["size_bytes=0"], &["volume \"vol1\"", "size_bytes=0", "512 bytes"]),
        ("volume", "vol1", &["size_bytes=1000"], &["size_bytes=1000", "not a multiple of 512 bytes"]),
        ("volume", "vol1", &["size_bytes=99999999999999999999"], &["99999999999999999999", "too large"]),
        ("volume", "vol1", &["size_bytes=12Q"], &["12Q", "unknown unit"]),
        ("volume", "vol1", &["block_bytes=3"], &["block_bytes=3", "power of two"]),
        ("volume", "vol1", &["block_bytes=8M"], &["block_bytes=8M", "512 bytes to 4 MiB"]),
        ("volume", "vol1", &["block_bytes=4M"], &["block_bytes=4194304 is larger than one record of wrl \"w0\""]),
        ("wrl", "w0", &["segment_bytes=1M"], &["volume \"vol1\" logs in it", "larger than one record"]),
        ("volume", "vol1", &["replicas=[\"rep1\",\"rep1\"]"], &["\"rep1\"", "named twice"]),
        ("volume", "vol1", &["targets={\"rep9\":\"/srv/x.img\"}"], &["\"rep9\"", "does not have"]),
        ("volume", "vol1", &["replicas=[\"stg1\"]"], &["\"stg1\" has role staging, expected replica"]),
        ("endpoint", "rep1", &["address=nonsense"], &["address=nonsense", "HOST:PORT"]),
        ("endpoint", "rep1", &["address=10.0.0.1:99999"], &["port 99999", "1 to 65535"]),
        ("endpoint", "rep1", &["max_connections=0"], &["max_connections=0", "1 to 65536"]),
        ("endpoint", "rep1", &["max_connections=abc"], &["max_connections=abc", "whole number"]),
        ("endpoint", "rep1", &["drlog_bytes=1K"], &["drlog_bytes=1K", "64 MiB"]),
        ("endpoint", "rep1", &["role=staging"], &["volume \"vol1\" replicates to it", "expected replica"]),
        ("endpoint", "bad/name", &["role=staging", "address=1.2.3.4:5"], &["bad/name", "not a valid name"]),
        ("key", "k1", &["path=relative.key"], &["relative.key", "absolute path"]),
    ];
    for (kind, name, fields, expect) in table {
        let mut args = vec!["config", "--store", &store, "set", kind, name];
        args.extend_from_slice(fields);
        let r = drv(&args, cl.dir.path());
        assert_said_once(&format!("config set {kind} {name} {fields:?}"), &r, expect);
    }
    // Nothing of it was stored.
    let after = drv(&["config", "--store", &store, "list", "--json"], cl.dir.path());
    assert_eq!(before.stdout, after.stdout, "a refused set changed the store");
}

/// Every change gets a version, an author and a time in `drv config log`; `--if-version` refuses a
/// change to an entry that changed since it was read, naming both versions.
#[test]
fn config_changes_are_versioned_logged_and_conditional() {
    let cl = Cluster::new(1, 1 << 20);
    let store = config_arg(&cl);
    let dir = cl.dir.path();
    let set = |extra: &[&str]| {
        let mut a = vec!["config", "--store", &store, "set", "key", "k9", "path=/etc/drv/k9.key", "--json"];
        a.extend_from_slice(extra);
        drv(&a, dir)
    };
    let r = set(&[]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let version = v["version"].as_u64().expect("a version");
    let stale = (version + 5).to_string();
    let r = set(&["--if-version", &stale]);
    let msg = format!("key \"k9\" is at version {version}, not {stale}");
    assert_said_once("a stale --if-version", &r, &[&msg]);
    let r = set(&["--if-version", "0"]);
    assert_said_once("--if-version 0 of an existing entry", &r, &["not 0"]);
    let r = set(&["--if-version", &version.to_string()]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let r = drv(&["config", "--store", &store, "delete", "key", "k9", "--if-version", &version.to_string()], dir);
    assert_said_once("a delete at a stale version", &r, &["is at version"]);
    let r = drv(&["config", "--store", &store, "log", "--json"], dir);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let log: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let last = log.last().unwrap();
    assert_eq!(last["version"], version + 1, "refused changes leave no record: {last}");
    assert!(last["author"].as_str().unwrap().starts_with("local:"), "{last}");
    assert!(last["time_unix_ms"].as_u64().unwrap() > 1_700_000_000_000, "{last}");
    assert_eq!(last["ops"][0]["op"], "set");
    let r = drv(&["config", "--store", &store, "log", "--limit", "2"], dir);
    assert_eq!(r.stdout.lines().count(), 2, "{}", r.stdout);
    assert!(r.stdout.contains("set key k9 path=/etc/drv/k9.key"), "{}", r.stdout);
}

#[test]
fn read_only_config_commands_on_a_missing_store_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("no/such/dir/c.redb");
    let s = store.display().to_string();
    for args in [vec!["list"], vec!["get", "volume", "vol1"], vec!["delete", "volume", "vol1"]] {
        let mut a = vec!["config", "--store", &s];
        a.extend(args.iter().copied());
        let r = drv(&a, dir.path());
        assert_said_once(&format!("{args:?}"), &r, &[&s, "does not exist"]);
    }
    assert!(!dir.path().join("no").exists(), "a read-only command created the store's directory");
}

/// `drv replica recover` while `drv replica run` serves the same data directory is refused,
/// naming the running process; the live replica keeps applying and ends equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_beside_a_running_replica_is_refused_and_the_replica_stays_intact() {
    const VOLUME: u64 = 4 << 20;
    let cl = Cluster::new(1, VOLUME);
    let mut staging = staging_up(&cl).await;
    let mut replica = cl.start("replica", "rep1");
    until("replica", Duration::from_secs(20), || cl.status(&cl.replica_addrs[0], "replica", "admin").is_some()).await;
    let (source, f) = blank_image(&cl);
    let (id, addr) = host1(&cl);
    let agent = Agent::start(&id, addr, cl.volume_id, VOLUME, Arc::new(FileDisk(f)), None, AgentOptions::default())
        .await
        .unwrap();
    let mut seed = 1;
    let mut write_some = async |agent: &Agent| {
        for i in 0..64u64 {
            seed += 1;
            let data = Bytes::from(drv_format::pattern(seed, 16 << 10));
            agent.write(((i * 48) << 10) % (VOLUME - (16 << 10)), data, Flags::default()).await.unwrap();
        }
    };
    write_some(&agent).await;
    let (c, certs) = (config_arg(&cl), cl.certs.display().to_string());
    for _ in 0..3 {
        let r = drv(&["replica", "recover", "--name", "rep1", "--config", &c, "--certs", &certs], cl.dir.path());
        let holder = format!("is locked by process {} (", replica.id());
        assert_said_once("replica recover beside run", &r, &["replica data directory", &holder, "replica run"]);
        write_some(&agent).await;
    }
    let (next, _) = agent.position();
    assert_replica_equals(&cl, &source, next).await;
    let st = cl.replica_status().unwrap();
    assert_eq!(st.volumes[0].state, drv_proto::status::VolumeState::Replicating, "{st:?}");
    assert!(st.volumes[0].error.is_none(), "{st:?}");
    let leftovers: Vec<_> = std::fs::read_dir(cl.dir.path().join("rep1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    kill_all([&mut staging, &mut replica]);
    // Once the server is gone, recover runs (the lock went with the process).
    let r = drv(&["replica", "recover", "--name", "rep1", "--config", &c, "--certs", &certs], cl.dir.path());
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}

/// A second `drv staging run` on the same WRL is refused because of the WRL's lock (before it
/// would bind its port); offline tools refuse to write a WRL a server runs on, and read it only
/// read-only, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_a_running_wrl_is_refused_naming_the_lock() {
    let cl = Cluster::new(1, 1 << 20);
    let mut staging = staging_up(&cl).await;
    let (c, certs) = (config_arg(&cl), cl.certs.display().to_string());
    let wrl = cl.dir.path().join("wrl0").display().to_string();
    let holder = format!("is locked by process {} (", staging.id());
    let r = drv(&["staging", "run", "--name", "stg1", "--config", &c, "--certs", &certs], cl.dir.path());
    assert_said_once("second staging run", &r, &["WRL w0", &wrl, &holder, "staging run"]);
    assert!(!r.stderr.contains("Address already in use"), "refused for its port, not the WRL: {}", r.stderr);
    for (what, args) in [
        ("wrl create --force", vec!["wrl", "create", "--force", "--segment-size", "4M", &wrl]),
        ("wrl bench-append", vec!["wrl", "bench-append", "--total", "1M", &wrl]),
    ] {
        let r = drv(&args, cl.dir.path());
        assert_said_once(what, &r, &[&wrl, &holder]);
    }
    let r = drv(&["wrl", "verify", &wrl], cl.dir.path());
    assert_eq!(r.code, Some(0), "verify of a live WRL: {}", r.stderr);
    assert!(r.stderr.contains("read-only") && r.stderr.contains(&format!("process {}", staging.id())), "{}", r.stderr);
    // The server was not disturbed.
    assert!(cl.status(&cl.staging_addr, "staging", "admin").is_some());
    kill_all([&mut staging]);
    let r = drv(&["wrl", "verify", &wrl], cl.dir.path());
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(!r.stderr.contains("read-only"), "no writer, no note: {}", r.stderr);
}

/// A staging start that fails while creating its WRL leaves nothing that blocks the next start
/// (the replica's DR log is created by the same code, `storage::create_files`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_leaves_nothing_behind_and_the_next_start_works() {
    let cl = Cluster::new(1, 1 << 20);
    let (c, certs) = (config_arg(&cl), cl.certs.display().to_string());
    let (a, b) = (cl.dir.path().join("wrl-a"), cl.dir.path().join("nodir/wrl-b"));
    let devices = format!("devices=[\"{}\",\"{}\"]", a.display(), b.display());
    let r = drv(
        &["config", "--store", &c, "set", "wrl", "w0", &devices, "segment_bytes=1M", "device_bytes=8M"],
        cl.dir.path(),
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let r = drv(&["staging", "run", "--name", "stg1", "--config", &c, "--certs", &certs], cl.dir.path());
    assert_said_once("staging start with a device in a missing directory", &r, &["WRL w0", "nodir"]);
    let names: Vec<_> = std::fs::read_dir(cl.dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!names.iter().any(|n| n.to_string_lossy().contains("wrl-a")), "the failed start left {names:?}");
    std::fs::create_dir(cl.dir.path().join("nodir")).unwrap();
    let mut staging = staging_up(&cl).await;
    kill_all([&mut staging]);
    assert!(a.exists() && b.exists());
}

/// Bad inputs an administrator gives: each message names the file, address or entry, says each
/// cause once, and the command fails.
#[test]
fn bad_inputs_get_one_clear_message_each() {
    let cl = Cluster::new(1, 1 << 20);
    let d = cl.dir.path();
    let (c, certs) = (config_arg(&cl), cl.certs.display().to_string());
    // A certificate directory with a broken CA file.
    let bad_certs = d.join("bad-certs");
    std::fs::create_dir(&bad_certs).unwrap();
    for f in ["admin.pem", "admin.key"] {
        std::fs::copy(cl.certs.join(f), bad_certs.join(f)).unwrap();
    }
    std::fs::write(bad_certs.join("ca.pem"), "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n").unwrap();
    let bad = bad_certs.display().to_string();
    // A replica whose key file is gone.
    let key = d.join("vol.key");
    let cases: Vec<(&str, Vec<&str>, Vec<String>)> = vec![
        (
            "status with a server that is not HOST:PORT",
            vec!["status", "--server", "nonsense", "--certs", &certs],
            vec!["\"nonsense\"".into()],
        ),
        (
            "status with a missing certificate directory",
            vec!["status", "--server", "127.0.0.1:9", "--certs", "/no/such/certs"],
            vec!["/no/such/certs/admin.key".into(), "No such file".into()],
        ),
        (
            "status with a broken CA file",
            vec!["status", "--server", "127.0.0.1:9", "--certs", &bad],
            vec![format!("{bad}/ca.pem"), "not a PEM certificate".into()],
        ),
        ("verify of a missing device", vec!["wrl", "verify", "/no/such/wrl"], vec!["/no/such/wrl".into()]),
        (
            "a node that is not configured",
            vec!["staging", "run", "--name", "nobody", "--config", &c, "--certs", &certs],
            vec!["\"nobody\"".into()],
        ),
    ];
    for (what, args, expect) in &cases {
        let r = drv(args, d);
        let expect: Vec<&str> = expect.iter().map(String::as_str).collect();
        assert_said_once(what, &r, &expect);
    }
    // A replica whose data directory is a file.
    let data = d.join("rep1");
    std::fs::write(&data, b"not a directory").unwrap();
    let r = drv(&["replica", "run", "--name", "rep1", "--config", &c, "--certs", &certs], d);
    assert_said_once("replica with a file for its data directory", &r, &[&data.display().to_string()]);
    std::fs::remove_file(&data).unwrap();
    std::fs::rename(&key, d.join("moved.key")).unwrap();
    let r = drv(&["replica", "run", "--name", "rep1", "--config", &c, "--certs", &certs], d);
    assert_said_once(
        "replica with its key file gone",
        &r,
        &["volume vol1", &key.display().to_string(), "No such file"],
    );
    std::fs::rename(d.join("moved.key"), &key).unwrap();
    // A WRL with a corrupt record in the middle, written by the bench tool.
    let wrl = d.join("bench-wrl");
    let w = wrl.display().to_string();
    assert_eq!(drv(&["wrl", "create", "--size", "16M", "--segment-size", "1M", &w], d).code, Some(0));
    let r = drv(&["wrl", "bench-append", "--writers", "1", "--total", "2M", "--record-size", "64K", &w], d);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let f = std::fs::OpenOptions::new().write(true).open(&wrl).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xa5; 512], (64 << 10) + 8192 + 4096).unwrap();
    let r = drv(&["wrl", "verify", &w], d);
    assert_said_once("verify of a corrupt WRL", &r, &["corrupt WRL record in segment"]);
    assert_eq!(r.stderr.matches("corrupt WRL record").count(), 1, "{}", r.stderr);
}

/// Ordinary status polling leaves staging's log free of warnings; the CLI does not log the
/// server's side of a refusal as its own warning, and nothing written to files has colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_polling_is_quiet_and_a_refusal_is_said_once_by_the_cli() {
    let cl = Cluster::new(1, 1 << 20);
    // The replica first: staging's relay then connects at once (a replica that is away is worth
    // one warning, which is not what this test is about).
    let mut replica = cl.start("replica", "rep1");
    until("replica", Duration::from_secs(20), || cl.status(&cl.replica_addrs[0], "replica", "admin").is_some()).await;
    let mut staging = staging_up(&cl).await;
    for _ in 0..5 {
        assert!(cl.status(&cl.staging_addr, "staging", "admin").is_some());
        assert!(cl.status(&cl.replica_addrs[0], "replica", "admin").is_some());
    }
    // Long enough for a connection the CLI did not close to hit the 6 s idle timeout.
    tokio::time::sleep(Duration::from_secs(7)).await;
    for name in ["stg1", "rep1"] {
        let log = cl.log(name);
        assert!(!log.contains(" WARN "), "{name} logged warnings for status polls:\n{log}");
        assert!(!log.contains('\u{1b}'), "{name}'s log file has colour codes:\n{log}");
    }
    // The CLI refuses a server with the wrong role: said once, as its error, not as a warning.
    let r = drv(
        &["status", "--server", &cl.staging_addr, "--role", "replica", "--certs", &cl.certs.display().to_string()],
        cl.dir.path(),
    );
    assert_said_once("status with the wrong role", &r, &["stg1's certificate has role staging, expected replica"]);
    assert!(!r.stderr.contains("WARN"), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    kill_all([&mut staging, &mut replica]);
}

/// With staging's log full and the replica away, the agent waits for room instead of shipping
/// its change map again and again; once the replica is back it ships the dirty blocks about once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_into_a_full_log_waits_for_room_and_ships_the_dirty_bytes_about_once() {
    const VOLUME: u64 = 32 << 20;
    let cl = Cluster::new(1, VOLUME);
    let c = config_arg(&cl);
    // A log of 23 one-MiB segments: the volume does not fit it.
    let r = drv(&["config", "--store", &c, "set", "wrl", "w0", "segment_bytes=1M", "device_bytes=24M"], cl.dir.path());
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let mut staging = staging_up(&cl).await;
    let (source, f) = blank_image(&cl);
    let (id, addr) = host1(&cl);
    let opts = AgentOptions { reconnect_interval: Duration::from_millis(100), ..AgentOptions::default() };
    let state = cl.dir.path().join("agent-state");
    let agent = Agent::start(&id, addr, cl.volume_id, VOLUME, Arc::new(FileDisk(f)), Some(&state), opts).await.unwrap();
    assert_eq!(agent.mode(), Mode::Sync);
    // The whole volume, then half of it again: the log fills (no replica trims it), and the rest
    // goes to the change map.
    let mut seed = 7;
    for offset in (0..VOLUME).step_by(256 << 10).chain((0..VOLUME / 2).step_by(256 << 10)) {
        seed += 1;
        agent.write(offset, Bytes::from(drv_format::pattern(seed, 256 << 10)), Flags::default()).await.unwrap();
    }
    until("change-map mode", Duration::from_secs(10), || agent.mode() == Mode::ChangeMap).await;
    let dirty = agent.dirty_bytes();
    let shipped = |a: &Agent| a.stats().resync_bytes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(dirty >= 8 << 20, "only {dirty} bytes dirty");
    // Many reconnect intervals with a full log: nothing is shipped into it.
    let before = shipped(&agent);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(shipped(&agent), before, "the agent shipped into a full log");
    assert_eq!(agent.mode(), Mode::ChangeMap);
    // The replica returns, relaying frees room, the agent resyncs.
    let started = Instant::now();
    let mut replica = cl.start("replica", "rep1");
    let synced = || agent.mode() == Mode::Sync && agent.dirty_bytes() == 0;
    crate::agent::until_in(&cl, "sync mode again", Duration::from_secs(90), synced).await;
    let total = shipped(&agent) - before;
    println!(
        "log-full resync: {dirty} bytes dirty, {total} bytes shipped ({:.2}x, goal <= 2) in {:.1}s",
        total as f64 / dirty as f64,
        started.elapsed().as_secs_f64()
    );
    assert!(total <= 2 * dirty, "shipped {total} bytes for {dirty} dirty bytes");
    let (next, _) = agent.position();
    assert_replica_equals(&cl, &source, next).await;
    kill_all([&mut staging, &mut replica]);
}

/// Staging's write log replaced while an agent protects the volume (a log re-created, a new disk,
/// a damaged tail): the staging server comes back holding less than it acknowledged. The agent
/// never numbers on from there (the replica holds those sequence numbers with the old data, and
/// would skip the new ones as already held): it says why once, shows it in its status, and keeps
/// every write in its change map; the replica keeps its image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staging_log_that_lost_acknowledged_writes_is_never_written_on() {
    const VOLUME: u64 = 4 << 20;
    let cl = Cluster::new(1, VOLUME);
    let mut staging = staging_up(&cl).await;
    let mut replica = cl.start("replica", "rep1");
    let (source, f) = blank_image(&cl);
    let (id, addr) = host1(&cl);
    let opts = AgentOptions { reconnect_interval: Duration::from_millis(100), ..AgentOptions::default() };
    let state = cl.dir.path().join("agent-state");
    let agent = Agent::start(&id, addr, cl.volume_id, VOLUME, Arc::new(FileDisk(f)), Some(&state), opts).await.unwrap();
    for i in 0..16u64 {
        agent.write(i * 65536, Bytes::from(drv_format::pattern(i, 65536)), Flags::default()).await.unwrap();
    }
    let (next, _) = agent.position();
    assert_replica_equals(&cl, &source, next).await;
    let replica_image = std::fs::read(cl.dir.path().join("rep1/vol1.img")).unwrap();
    // Staging stops, and its log is replaced by a new, empty one.
    kill_all([&mut staging]);
    std::fs::remove_file(cl.dir.path().join("wrl0")).unwrap();
    let mut staging = staging_up(&cl).await;
    agent.write(0, Bytes::from(drv_format::pattern(99, 65536)), Flags::default()).await.unwrap();
    until("change-map mode", Duration::from_secs(10), || agent.mode() == Mode::ChangeMap).await;
    until("the agent's verdict", Duration::from_secs(10), || agent.status().problem.is_some()).await;
    // Many reconnect intervals: it never resyncs into that log.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let st = agent.status();
    assert_eq!(st.mode, Mode::ChangeMap, "{st:?}");
    assert_eq!(st.resync_bytes, 0, "nothing shipped into the new log: {st:?}");
    let problem = st.problem.clone().unwrap();
    assert!(problem.contains("holds it only up to seq 0") && problem.contains("lost acknowledged writes"), "{problem}");
    assert!(st.dirty_bytes >= 65536, "the write since is kept in the change map: {st:?}");
    // No digest claims a sequence number the local disk is ahead of.
    let e = agent.digest().await.unwrap_err().to_string();
    assert!(e.contains("no exact digest") && e.contains("change-map mode"), "{e}");
    let rep = cl.replica_status().unwrap();
    assert!(rep.volumes[0].applied_seq + 1 >= next, "the replica stays where it was: {rep:?}");
    assert_eq!(std::fs::read(cl.dir.path().join("rep1/vol1.img")).unwrap(), replica_image);
    kill_all([&mut staging, &mut replica]);
}

/// A replica target that is a block device smaller than the volume is refused when the entry is
/// set on the replica's host, and by the replica at start wherever the entry was set.
#[test]
fn a_target_device_smaller_than_the_volume_is_refused() {
    if !crate::ebpf::root_or_skip("a_target_device_smaller_than_the_volume_is_refused") {
        return;
    }
    let cl = Cluster::new(1, 4 << 20);
    let (c, certs) = (config_arg(&cl), cl.certs.display().to_string());
    let image = cl.dir.path().join("small.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let dev = crate::ebpf::Loop::attach(&image);
    let d = dev.dev.display().to_string();
    let target = format!("targets={{\"rep1\":\"{d}\"}}");
    let r = drv(&["config", "--store", &c, "set", "volume", "vol1", &target], cl.dir.path());
    assert_said_once("a 1 MiB target for a 4 MiB volume", &r, &[&d, "1 MiB (1048576 bytes)", "size_bytes=4 MiB"]);
    // Set on a host where the target does not exist (yet): the replica refuses it at start.
    let later = cl.dir.path().join("target-link");
    let t = later.display().to_string();
    let target = format!("targets={{\"rep1\":\"{t}\"}}");
    let r = drv(&["config", "--store", &c, "set", "volume", "vol1", &target], cl.dir.path());
    assert_eq!(r.code, Some(0), "no such device here: nothing to check ({})", r.stderr);
    std::os::unix::fs::symlink(&dev.dev, &later).unwrap();
    let r = drv(&["replica", "run", "--name", "rep1", "--config", &c, "--certs", &certs], cl.dir.path());
    assert_said_once("replica start with a small target", &r, &["volume vol1", &t, "smaller than the volume"]);
}

/// A block device that is mounted is never taken as a WRL device, not even with `--force`: the
/// open claims it from the kernel (`O_EXCL`) and is refused, saying why; its filesystem is intact.
#[test]
fn a_mounted_device_is_never_formatted_as_a_wrl() {
    if !crate::ebpf::root_or_skip("a_mounted_device_is_never_formatted_as_a_wrl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("fs.img");
    std::fs::write(&image, vec![0u8; 32 << 20]).unwrap();
    let ok = |cmd: &mut Command| assert!(cmd.status().unwrap().success(), "{cmd:?}");
    ok(Command::new("mkfs.ext4").arg("-q").arg(&image));
    let dev = crate::ebpf::Loop::attach(&image);
    let d = dev.dev.display().to_string();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    ok(Command::new("mount").arg(&d).arg(&mnt));
    std::fs::write(mnt.join("precious"), b"data").unwrap();
    let r = drv(&["wrl", "create", "--force", "--segment-size", "4M", &d], dir.path());
    ok(Command::new("umount").arg(&mnt));
    assert_said_once("wrl create on a mounted device", &r, &[&d, "busy", "mounted"]);
    ok(Command::new("e2fsck").args(["-fn"]).arg(&d));
}
