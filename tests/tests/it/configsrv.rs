//! Three `drv config-server run` processes on loopback, changed with `drv config` from the
//! command line: a stream of changes survives `kill -9` of the leader (every acknowledged change
//! is there once, the killed server rejoins and catches up), and with two of three down a change
//! is refused with a clear message while a local read still answers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use drv_tests::{drv_bin, free_port};

/// The config server processes, killed when the test ends however it ends.
struct Servers {
    dir: PathBuf,
    certs: PathBuf,
    names: Vec<String>,
    addrs: Vec<String>,
    children: Vec<Option<Child>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn drv(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Out {
    let mut c = Command::new(drv_bin());
    c.args(args).current_dir(dir).env_remove("DRV_CONFIG").env_remove("DRV_CONFIG_SERVER");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run drv");
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Servers {
    fn new(n: usize) -> Servers {
        let dir = tempfile::tempdir().unwrap().keep();
        let certs = dir.join("certs");
        let c = certs.to_str().unwrap();
        assert!(drv(&["ca", "init", "--dir", c], &dir, &[]).ok);
        assert!(drv(&["ca", "issue", "--dir", c, "--role", "admin", "--name", "admin"], &dir, &[]).ok);
        let names: Vec<String> = (1..=n).map(|i| format!("c{i}")).collect();
        for name in &names {
            assert!(drv(&["ca", "issue", "--dir", c, "--role", "config", "--name", name], &dir, &[]).ok);
        }
        let addrs = names.iter().map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let mut s = Servers { dir, certs, names, addrs, children: Vec::new() };
        for i in 0..n {
            let child = s.spawn(i);
            s.children.push(Some(child));
        }
        s
    }

    fn spawn(&self, i: usize) -> Child {
        let peers: Vec<String> = self.names.iter().zip(&self.addrs).map(|(n, a)| format!("{n}={a}")).collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", self.names[i])))
            .unwrap();
        Command::new(drv_bin())
            .args(["config-server", "run", "--name", &self.names[i], "--listen", &self.addrs[i]])
            .arg("--certs")
            .arg(&self.certs)
            .arg("--data")
            .arg(self.dir.join(&self.names[i]))
            .args(["--peers", &peers.join(","), "--snapshot-every", "8"])
            .env("DRV_LOG", "info")
            .stderr(log)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn drv config-server")
    }

    /// `drv ARGS` against the servers at `addrs`.
    fn cli(&self, args: &[&str], addrs: &[String]) -> Out {
        let servers = addrs.join(",");
        let env = [("DRV_CONFIG_SERVER", servers.as_str()), ("DRV_CERTS", self.certs.to_str().unwrap())];
        drv(args, &self.dir, &env)
    }

    fn all(&self) -> Vec<String> {
        self.addrs.clone()
    }

    fn status(&self, i: usize) -> Option<serde_json::Value> {
        let out = self.cli(&["config-server", "status", "--json"], &[self.addrs[i].clone()]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
        v[0].get("status").cloned()
    }

    fn logs(&self) -> String {
        self.names
            .iter()
            .map(|n| std::fs::read_to_string(self.dir.join(format!("{n}.log"))).unwrap_or_default())
            .collect()
    }
}

fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn config_servers_keep_every_acknowledged_change_across_kill_9_of_the_leader() {
    let mut s = Servers::new(3);
    until("a leader", Duration::from_secs(30), || s.status(0).is_some_and(|v| v["leader"].is_string()));
    let mut acked = Vec::new();
    for i in 0..24 {
        if i == 8 {
            // kill -9 the leader in the middle of the stream.
            let leader = s.status(0).unwrap()["leader"].as_str().unwrap().to_owned();
            let li = s.names.iter().position(|n| *n == leader).unwrap();
            let mut child = s.children[li].take().unwrap();
            child.kill().unwrap();
            child.wait().unwrap();
            // It comes back later (same data, no --peers needed to rejoin).
            acked.push((format!("killed:{li}"), 0));
        }
        let key = format!("k{i}");
        let out = s.cli(&["config", "set", "key", &key, &format!("path=/keys/{key}"), "--json"], &s.all());
        assert!(out.ok, "change {i} failed: {}\n{}", out.stderr, s.logs());
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        acked.push((key, v["version"].as_u64().unwrap()));
    }
    let killed: usize = acked.iter().find_map(|(k, _)| k.strip_prefix("killed:")).unwrap().parse().unwrap();
    acked.retain(|(k, _)| !k.starts_with("killed:"));

    // Every acknowledged change is there, each applied once, at the version it was told.
    let out = s.cli(&["config", "log", "--json", "--limit", "1000"], &s.all());
    assert!(out.ok, "{}", out.stderr);
    let log: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    for (key, version) in &acked {
        let sets: Vec<&serde_json::Value> =
            log.iter().filter(|r| r["ops"][0]["name"] == key.as_str() && r["ops"][0]["kind"] == "key").collect();
        assert_eq!(sets.len(), 1, "{key} applied {} times", sets.len());
        assert_eq!(sets[0]["version"].as_u64(), Some(*version), "{key}");
        assert_eq!(sets[0]["author"], "admin:admin");
    }
    let list = s.cli(&["config", "list", "key"], &s.all());
    assert!(list.ok && list.stdout.starts_with("# configuration version "), "{}{}", list.stdout, list.stderr);
    assert_eq!(list.stdout.lines().filter(|l| l.starts_with("key")).count(), 24, "{}", list.stdout);

    // The killed server comes back and catches up (from a snapshot: the log was compacted).
    let newest = acked.last().unwrap().1;
    s.children[killed] = Some(s.spawn(killed));
    until("the killed server to catch up", Duration::from_secs(30), || {
        s.status(killed).is_some_and(|v| v["version"].as_u64() >= Some(newest))
    });

    // Two of three down: a change is refused with a clear message; a local read still answers.
    let up = (killed + 1) % 3;
    for i in 0..3 {
        if i != up {
            let mut c = s.children[i].take().unwrap();
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
    let t = Instant::now();
    let out = s.cli(&["config", "set", "key", "late", "path=/late"], &s.all());
    assert!(!out.ok, "a change committed without a majority");
    assert!(out.stderr.contains("majority") || out.stderr.contains("no config server leads"), "{}", out.stderr);
    assert!(t.elapsed() < Duration::from_secs(40), "refused after {:?}", t.elapsed());
    assert_eq!(out.stderr.lines().count(), 1, "said once: {}", out.stderr);
    let local = s.cli(&["config", "get", "key", "k3", "--local-read"], &[s.addrs[up].clone()]);
    assert!(local.ok && local.stdout.contains("/keys/k3"), "{}{}", local.stdout, local.stderr);
    let _ = std::fs::remove_dir_all(&s.dir);
}
