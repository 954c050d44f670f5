//! Three `drv config-server run` processes on loopback, changed with `drv config` from the
//! command line: a stream of changes survives `kill -9` of the leader (every acknowledged change
//! is there once, the killed server rejoins and catches up), and with two of three down a change
//! is refused with a clear message while a local read still answers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use drv_tests::{drv_bin, free_port};

/// The config server processes, killed when the test ends however it ends.
pub(crate) struct Servers {
    pub(crate) dir: PathBuf,
    pub(crate) certs: PathBuf,
    names: Vec<String>,
    pub(crate) addrs: Vec<String>,
    /// Where each serves its Prometheus metrics, and its users (the web UI).
    metrics: Vec<String>,
    pub(crate) web: Vec<String>,
    pub(crate) children: Vec<Option<Child>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) struct Out {
    pub(crate) ok: bool,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

pub(crate) fn drv(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Out {
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
    pub(crate) fn new(n: usize) -> Servers {
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
        let metrics = names.iter().map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let web = names.iter().map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let mut s = Servers { dir, certs, names, addrs, metrics, web, children: Vec::new() };
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
            .args(["--peers", &peers.join(","), "--snapshot-every", "8", "--metrics", &self.metrics[i]])
            .args(["--web", &self.web[i]])
            .env("DRV_LOG", "info")
            .stderr(log)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn drv config-server")
    }

    /// `drv ARGS` against the servers at `addrs`.
    pub(crate) fn cli(&self, args: &[&str], addrs: &[String]) -> Out {
        let servers = addrs.join(",");
        let env = [("DRV_CONFIG_SERVER", servers.as_str()), ("DRV_CERTS", self.certs.to_str().unwrap())];
        drv(args, &self.dir, &env)
    }

    pub(crate) fn all(&self) -> Vec<String> {
        self.addrs.clone()
    }

    pub(crate) fn status(&self, i: usize) -> Option<serde_json::Value> {
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

pub(crate) fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
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

    // The client file names the servers and the certificate when no flag or variable does.
    let file = s.dir.join("drv.toml");
    let text = format!("config_server = \"{}\"\ncerts = \"{}\"\n", s.addrs.join(","), s.certs.display());
    std::fs::write(&file, text).unwrap();
    let out = drv(&["config", "get", "key", "k3"], &s.dir, &[("DRV_CLIENT_FILE", file.to_str().unwrap())]);
    assert!(out.ok && out.stdout.contains("/keys/k3"), "{}{}", out.stdout, out.stderr);

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

/// A component process run by the test, killed when it ends.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Servers {
    pub(crate) fn issue(&self, role: &str, name: &str) {
        let c = self.certs.to_str().unwrap();
        assert!(drv(&["ca", "issue", "--dir", c, "--role", role, "--name", name], &self.dir, &[]).ok);
    }

    pub(crate) fn set(&self, args: &[&str]) {
        let mut a = vec!["config", "set"];
        a.extend_from_slice(args);
        let out = self.cli(&a, &self.all());
        assert!(out.ok, "{args:?}: {}", out.stderr);
    }

    /// `drv ARGS` as a component of this installation: its own state, the config servers, the
    /// shared CA directory; stderr to `DIR/LOG.log`.
    pub(crate) fn component(&self, args: &[&str], log: &str) -> Proc {
        let log = std::fs::File::create(self.dir.join(format!("{log}.log"))).unwrap();
        let child = Command::new(drv_bin())
            .args(args)
            .arg("--certs")
            .arg(&self.certs)
            .args(["--config-server", &self.addrs.join(",")])
            .env_remove("DRV_CONFIG")
            .env("DRV_LOG", "info")
            .stderr(log)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Proc(child)
    }

    /// `drv config set ARGS`: the version of the change.
    fn set_version(&self, args: &[&str]) -> u64 {
        let mut a = vec!["config", "set"];
        a.extend_from_slice(args);
        a.push("--json");
        let out = self.cli(&a, &self.all());
        assert!(out.ok, "{args:?}: {}", out.stderr);
        serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap()["version"].as_u64().unwrap()
    }

    /// Waits until change `version` is in force on `n` components, and waits nowhere.
    fn in_force_everywhere(&self, version: u64, n: usize) {
        until("the change in force everywhere", Duration::from_secs(60), || {
            let st = self.components();
            let change = st["changes"].as_array().unwrap().iter().find(|c| c["version"] == version).cloned();
            change.is_some_and(|c| {
                c["in_force"].as_array().unwrap().len() == n && c["waiting"].as_array().unwrap().is_empty()
            })
        });
    }

    fn components(&self) -> serde_json::Value {
        let out = self.cli(&["config", "status", "--json"], &self.all());
        assert!(out.ok, "{}", out.stderr);
        serde_json::from_str(&out.stdout).unwrap()
    }
}

/// `GET http://ADDR/PATH`: the status code and the body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|| panic!("nothing listens on {addr}"))
}

/// [`http_get`], `None` while nothing listens at `addr`.
fn try_http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Some((code, unchunk(body)));
    }
    Some((code, body.to_owned()))
}

fn unchunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
}

/// A daemon's `/metrics`, checked by Prometheus's own `promtool check metrics` (format and
/// naming conventions) when it is installed (`.ci/run` installs it).
fn scrape(addr: &str) -> String {
    let (code, text) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "{text}");
    if let Ok(mut p) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        use std::io::Write;
        p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = p.wait_with_output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool check metrics: {said}\n{text}");
    } else {
        assert!(std::env::var_os("CI").is_none(), "promtool is not installed (.ci/run installs prometheus)");
    }
    text
}

/// A Prometheus server (Debian's) scraping `targets` every second, killed when dropped; `None`
/// if it is not installed (`.ci/run` installs it).
struct Prometheus {
    child: Child,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(dir: &Path, targets: &[&str]) -> Option<Prometheus> {
        let config = dir.join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let yml = format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s}}\nscrape_configs:\n  - job_name: drv\n    static_configs: [{{targets: [{}]}}]\n",
            targets.join(", ")
        );
        std::fs::write(&config, yml).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("prometheus-data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn();
        match child {
            Ok(child) => Some(Prometheus { child, addr }),
            Err(e) => {
                assert!(std::env::var_os("CI").is_none(), "prometheus is not installed (.ci/run installs it): {e}");
                None
            }
        }
    }

    /// The values of an instant query, by the `instance` label.
    fn query(&self, q: &str) -> Vec<(String, f64)> {
        let q: String = q
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        let Some((200, body)) = try_http_get(&self.addr, &format!("/api/v1/query?query={q}")) else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let rows = v["data"]["result"].as_array().cloned().unwrap_or_default();
        rows.iter()
            .map(|r| {
                let at = r["metric"]["instance"].as_str().unwrap_or("").to_owned();
                (at, r["value"][1].as_str().and_then(|x| x.parse().ok()).unwrap_or(f64::NAN))
            })
            .collect()
    }
}

/// The value of the sample `name{labels}` (labels as written, `""` for none) in `text`.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = if labels.is_empty() { name.to_owned() } else { format!("{name}{{{labels}}}") };
    text.lines().find_map(|l| l.strip_prefix(&key)?.strip_prefix(' ')?.parse().ok())
}

/// Waits until the replica at `addr` applied everything before `next`, then compares images.
fn replica_equals(s: &Servers, addr: &str, source: &Path, image: &Path, next: u64) {
    until("the replica to apply everything", Duration::from_secs(60), || {
        replica_status(s, addr)["volumes"][0]["applied_seq"].as_u64().is_some_and(|a| a + 1 >= next)
    });
    assert!(std::fs::read(source).unwrap() == std::fs::read(image).unwrap(), "the replica differs from the source");
}

/// `drv agent run` of `volume` on `source` (its state in `DIR/agent-VOLUME`, its control socket
/// in `run`), once its control socket is there.
pub(crate) fn run_agent(s: &Servers, volume: &str, source: &Path, run: &Path) -> Proc {
    run_agent_with(s, volume, source, run, &[])
}

pub(crate) fn run_agent_with(s: &Servers, volume: &str, source: &Path, run: &Path, more: &[&str]) -> Proc {
    let state = s.dir.join(format!("agent-{volume}"));
    let mut args = vec![
        "agent",
        "run",
        "--volume",
        volume,
        "--name",
        "host1",
        "--device",
        source.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    let p = s.component(&args, &format!("agent-{volume}"));
    until("the agent's control socket", Duration::from_secs(30), || run.join(format!("{volume}.sock")).exists());
    p
}

pub(crate) fn replica_status(s: &Servers, addr: &str) -> serde_json::Value {
    let c = s.certs.to_str().unwrap();
    let out = drv(&["status", "--role", "replica", "--server", addr, "--certs", c, "--json"], &s.dir, &[]);
    serde_json::from_str(&out.stdout).unwrap_or_default()
}

fn sync_and_next_seq(s: &Servers, run: &Path) -> u64 {
    let run = run.to_str().unwrap();
    let out = drv(&["sync", "start", "vol1", "--run-dir", run], &s.dir, &[]);
    assert!(out.ok && out.stdout.contains("\"done\":true"), "{}{}", out.stdout, out.stderr);
    let st = drv(&["agent", "status", "vol1", "--json", "--run-dir", run], &s.dir, &[]);
    let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    v["next_seq"].as_u64().unwrap()
}

#[test]
fn a_volume_set_up_by_config_calls_alone_replicates_and_keeps_replicating_without_config_servers() {
    const VOLUME: usize = 8 << 20;
    let mut s = Servers::new(1);
    until("a leader", Duration::from_secs(30), || s.status(0).is_some_and(|v| v["leader"].is_string()));
    for (role, name) in [("staging", "stg1"), ("replica", "rep1"), ("agent", "host1")] {
        s.issue(role, name);
    }
    let d = s.dir.clone();
    let key = d.join("vol1.key");
    assert!(drv(&["key", "generate", key.to_str().unwrap()], &d, &[]).ok);
    let (stg, rep) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let (wrl, data) = (d.join("stg1/wrl0"), d.join("rep1"));
    s.set(&["endpoint", "stg1", "role=staging", &format!("address={stg}")]);
    s.set(&[
        "endpoint",
        "rep1",
        "role=replica",
        &format!("address={rep}"),
        &format!("data_dir={}", data.display()),
        "drlog_bytes=64M",
    ]);
    s.set(&["key", "k1", &format!("path={}", key.display())]);
    s.set(&[
        "wrl",
        "w0",
        "staging=stg1",
        &format!("devices=[\"{}\"]", wrl.display()),
        "segment_bytes=4M",
        "device_bytes=64M",
    ]);
    s.set(&["volume", "vol1", &format!("size_bytes={VOLUME}"), "wrl=w0", "replicas=[\"rep1\"]", "key=k1"]);
    std::fs::create_dir_all(d.join("stg1")).unwrap();
    let cache = |n: &str| d.join(n).join("config-cache.redb").display().to_string();
    let m: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let run_args = |role: &str, name: &str, metrics: &str| {
        let a = [role, "run", "--name", name, "--config-cache", &cache(name), "--metrics", metrics];
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let stg_args = run_args("staging", "stg1", &m[0]);
    let _staging = s.component(&stg_args.iter().map(String::as_str).collect::<Vec<_>>(), "stg1");
    let rep_args = run_args("replica", "rep1", &m[1]);
    let _replica = s.component(&rep_args.iter().map(String::as_str).collect::<Vec<_>>(), "rep1");
    let source = d.join("source.img");
    std::fs::write(&source, drv_format::pattern(0x51, VOLUME)).unwrap();
    let run = d.join("run");
    let _agent = run_agent_with(&s, "vol1", &source, &run, &["--metrics", &m[2]]);
    let next = sync_and_next_seq(&s, &run);
    let image = data.join("vol1.img");
    replica_equals(&s, &rep, &source, &image, next);
    // Every component reported the version it runs.
    until("three components reporting", Duration::from_secs(20), || {
        s.components()["components"].as_array().is_some_and(|c| c.len() == 3)
    });
    // Each daemon's /metrics says the same as its status, in a format Prometheus takes.
    let last = (next - 1) as f64;
    let stg_m = scrape(&m[0]);
    assert_eq!(sample(&stg_m, "drv_staging_durable_seq", "volume=\"vol1\""), Some(last), "{stg_m}");
    assert_eq!(sample(&stg_m, "drv_staging_relay_connected", "volume=\"vol1\",replica=\"rep1\""), Some(1.0));
    assert!(sample(&stg_m, "drv_wrl_used_ratio", "wrl=\"w0\"").is_some_and(|r| r > 0.0 && r <= 1.0), "{stg_m}");
    let rep_m = scrape(&m[1]);
    assert_eq!(sample(&rep_m, "drv_replica_applied_seq", "volume=\"vol1\""), Some(last), "{rep_m}");
    assert_eq!(sample(&rep_m, "drv_replica_volume_state", "volume=\"vol1\",state=\"replicating\""), Some(1.0));
    assert_eq!(sample(&rep_m, "drv_replica_volume_state", "volume=\"vol1\",state=\"error\""), Some(0.0));
    let agent_m = scrape(&m[2]);
    assert_eq!(sample(&agent_m, "drv_agent_mode", "volume=\"vol1\",mode=\"sync\""), Some(1.0), "{agent_m}");
    assert_eq!(sample(&agent_m, "drv_agent_next_seq", "volume=\"vol1\""), Some(next as f64));
    let cfg_m = scrape(&s.metrics[0]);
    assert_eq!(sample(&cfg_m, "drv_config_leader", ""), Some(1.0), "{cfg_m}");
    assert!(sample(&cfg_m, "drv_config_component_version", "component=\"rep1\",role=\"replica\"").is_some(), "{cfg_m}");
    assert_eq!(http_get(&m[0], "/").0, 404, "only /metrics is served");
    // And Prometheus itself scrapes all four and reads the figures.
    if let Some(p) = Prometheus::start(&d, &[&m[0], &m[1], &m[2], &s.metrics[0]]) {
        until("Prometheus scraping all four daemons", Duration::from_secs(60), || {
            let up = p.query("up");
            up.len() == 4 && up.iter().all(|(_, v)| *v == 1.0)
        });
        let applied = p.query("drv_replica_applied_seq{volume=\"vol1\"}");
        assert_eq!(applied, vec![(m[1].clone(), last)], "what Prometheus read");
    }
    // The components' figures reach the config servers with their reports.
    until("the components' figures at the config server", Duration::from_secs(40), || {
        let c = s.components();
        let of = |name: &str| c["components"].as_array().unwrap().iter().find(|x| x["component"] == name).cloned();
        let fig = |name: &str, vol: &str, f: &str| of(name).and_then(|x| x["figures"][vol][f].as_f64());
        fig("stg1", "vol1", "durable_seq") == Some(last)
            && fig("stg1", "vol1", "lag_seconds") == Some(0.0)
            && fig("rep1", "vol1", "applied_seq") == Some(last)
            && fig("rep1", "vol1", "state") == Some(0.0)
            && fig("host1/vol1", "vol1", "mode") == Some(0.0)
            && fig("host1/vol1", "vol1", "next_seq") == Some(next as f64)
    });

    // Every config server away: replication goes on.
    let mut c = s.children[0].take().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    std::fs::write(&source, drv_format::pattern(0x52, VOLUME)).unwrap();
    let next = sync_and_next_seq(&s, &run);
    replica_equals(&s, &rep, &source, &image, next);

    // A config server comes back; a change made then reaches every component and is in force.
    s.children[0] = Some(s.spawn(0));
    until("a leader again", Duration::from_secs(30), || s.status(0).is_some_and(|v| v["leader"].is_string()));
    let version = s.set_version(&["volume", "vol1", "bwlimit=64M"]);
    s.in_force_everywhere(version, 3);
    let text = s.cli(&["config", "status"], &s.all());
    assert!(text.stdout.contains("in force on all 3"), "{}", text.stdout);

    // The retention window opens on the running replica.
    let version = s.set_version(&["volume", "vol1", "retention=1h"]);
    s.in_force_everywhere(version, 3);
    until("the replica's retention window", Duration::from_secs(30), || {
        replica_status(&s, &rep)["volumes"][0]["window"].is_object()
    });

    // A second volume is added while everything runs: staging and the replica take it live.
    let version =
        s.set_version(&["volume", "vol2", &format!("size_bytes={VOLUME}"), "wrl=w0", "replicas=[\"rep1\"]", "key=k1"]);
    s.in_force_everywhere(version, 3);
    let status = |role: &str, addr: &str| {
        let c = s.certs.to_str().unwrap();
        drv(&["status", "--role", role, "--server", addr, "--certs", c, "--json"], &d, &[]).stdout
    };
    assert!(status("staging", &stg).contains("\"vol2\""), "staging took vol2 live");
    assert!(status("replica", &rep).contains("\"vol2\""), "the replica took vol2 live");
    let source2 = d.join("source2.img");
    std::fs::write(&source2, drv_format::pattern(0x53, VOLUME)).unwrap();
    let run2 = d.join("run2");
    let _agent2 = run_agent(&s, "vol2", &source2, &run2);
    let out = drv(&["sync", "start", "vol2", "--run-dir", run2.to_str().unwrap()], &d, &[]);
    assert!(out.ok && out.stdout.contains("\"done\":true"), "{}{}", out.stdout, out.stderr);
    until("vol2 replicated", Duration::from_secs(60), || {
        std::fs::read(data.join("vol2.img")).is_ok_and(|b| b == std::fs::read(&source2).unwrap())
    });

    // And removed again: both stop serving it live; its image stays on the replica.
    drop(_agent2);
    let out = s.cli(&["config", "delete", "volume", "vol2"], &s.all());
    assert!(out.ok, "{}", out.stderr);
    until("vol2 gone from staging and the replica", Duration::from_secs(60), || {
        !status("staging", &stg).contains("\"vol2\"") && !status("replica", &rep).contains("\"vol2\"")
    });
    assert!(data.join("vol2.img").exists(), "the removed volume's image stays");
    // A change the replica can apply only at its next restart is reported as waiting.
    s.set(&["endpoint", "rep1", "max_connections=64"]);
    until("the replica's pending change reported", Duration::from_secs(60), || {
        s.components()["components"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["component"] == "rep1" && c["pending"].to_string().contains("max_connections"))
    });
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// An attached user-mode device: detached (`drv detach`), then its agent killed, however the
/// test ends.
struct Attached {
    _agent: Proc,
    run: PathBuf,
    state: PathBuf,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = Command::new(drv_bin())
            .args(["detach", "vol1", "--run-dir"])
            .arg(&self.run)
            .arg("--state-dir")
            .arg(&self.state)
            .output();
    }
}

/// `drv attach VOLUME --mode user` as a component: the process and its device.
fn attach_user(s: &Servers, image: &Path, state: &Path, run: &Path) -> (Attached, String) {
    use std::io::BufRead;
    let log = std::fs::File::create(s.dir.join("agent.log")).unwrap();
    let child = Command::new(drv_bin())
        .args(["attach", "vol1", "--mode", "user", "--name", "host1", "--no-order-check"])
        .arg("--device")
        .arg(image)
        .arg("--state-dir")
        .arg(state)
        .arg("--run-dir")
        .arg(run)
        .arg("--certs")
        .arg(&s.certs)
        .args(["--config-server", &s.addrs.join(",")])
        .env_remove("DRV_CONFIG")
        .env("DRV_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    // Killed and waited for however this ends.
    let mut p = Proc(child);
    let mut out = std::io::BufReader::new(p.0.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "drv attach ended before its DEVICE line");
        if let Some(dev) = line.trim().strip_prefix("DEVICE ") {
            std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
            return (Attached { _agent: p, run: run.to_owned(), state: state.to_owned() }, dev.to_owned());
        }
    }
}

/// Writes `count` MiB of the pattern `seed` at MiB `at` of `dev` with O_DIRECT.
fn write_mib(dev: &str, at: u64, count: u64, seed: u64) {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(dev).unwrap();
    let data = drv_format::pattern(seed, 1 << 20);
    let mut buf = vec![0u8; (1 << 20) + 4096];
    let off = buf.as_ptr().align_offset(4096);
    buf[off..off + (1 << 20)].copy_from_slice(&data);
    for i in 0..count {
        f.write_all_at(&buf[off..off + (1 << 20)], (at + i) << 20).unwrap();
    }
    f.sync_all().unwrap();
}

#[test]
fn a_replica_added_after_staging_trimmed_the_log_gets_an_initial_sync_while_writes_go_on() {
    if !crate::ebpf::root_or_skip("a_replica_added_after_staging_trimmed_the_log") {
        return;
    }
    const VOLUME: u64 = 8 << 20;
    let s = Servers::new(1);
    until("a leader", Duration::from_secs(30), || s.status(0).is_some_and(|v| v["leader"].is_string()));
    for (role, name) in [("staging", "stg1"), ("replica", "rep1"), ("replica", "rep2"), ("agent", "host1")] {
        s.issue(role, name);
    }
    let d = s.dir.clone();
    let key = d.join("vol1.key");
    assert!(drv(&["key", "generate", key.to_str().unwrap()], &d, &[]).ok);
    let stg = format!("127.0.0.1:{}", free_port());
    let reps = [format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port())];
    s.set(&["endpoint", "stg1", "role=staging", &format!("address={stg}")]);
    for (i, r) in reps.iter().enumerate() {
        let data = format!("data_dir={}", d.join(format!("rep{}", i + 1)).display());
        s.set(&[
            "endpoint",
            &format!("rep{}", i + 1),
            "role=replica",
            &format!("address={r}"),
            &data,
            "drlog_bytes=64M",
        ]);
    }
    s.set(&["key", "k1", &format!("path={}", key.display())]);
    let wrl = format!("devices=[\"{}\"]", d.join("stg1/wrl0").display());
    s.set(&["wrl", "w0", "staging=stg1", &wrl, "segment_bytes=1M", "device_bytes=32M"]);
    s.set(&["volume", "vol1", &format!("size_bytes={VOLUME}"), "wrl=w0", "replicas=[\"rep1\"]", "key=k1"]);
    std::fs::create_dir_all(d.join("stg1")).unwrap();
    let cache = |n: &str| d.join(n).join("config-cache.redb").display().to_string();
    let _staging = s.component(&["staging", "run", "--name", "stg1", "--config-cache", &cache("stg1")], "stg1");
    let _rep1 = s.component(&["replica", "run", "--name", "rep1", "--config-cache", &cache("rep1")], "rep1");
    let image = d.join("source.img");
    std::fs::write(&image, vec![0u8; VOLUME as usize]).unwrap();
    let (_agent, dev) = attach_user(&s, &image, &d.join("agent"), &d.join("run"));
    // 24 MiB of writes over the 8 MiB volume: the log trims its first segments once rep1 has them.
    for round in 0..3 {
        write_mib(&dev, 0, 8, 100 + round);
    }
    let staging_status = || -> serde_json::Value {
        let c = s.certs.to_str().unwrap();
        let out = drv(&["status", "--role", "staging", "--server", &stg, "--certs", c, "--json"], &d, &[]);
        serde_json::from_str(&out.stdout).unwrap_or_default()
    };
    until("the log trimmed its first records", Duration::from_secs(60), || {
        staging_status()["wrls"][0]["first_lsn"].as_u64().is_some_and(|l| l > 1)
    });

    // rep2 is added while writes go on; it gets everything by an initial sync.
    let _rep2 = s.component(&["replica", "run", "--name", "rep2", "--config-cache", &cache("rep2")], "rep2");
    let writer = {
        let dev = dev.clone();
        std::thread::spawn(move || {
            for i in 0..16u64 {
                write_mib(&dev, i % 8, 1, 200 + i);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let rep1_before = replica_status(&s, &reps[0])["volumes"][0]["applied_seq"].as_u64().unwrap();
    s.set(&["volume", "vol1", "replicas=[\"rep1\",\"rep2\"]"]);
    writer.join().unwrap();
    let run = d.join("run");
    until("the initial sync done", Duration::from_secs(120), || {
        let st = drv(&["agent", "status", "vol1", "--json", "--run-dir", run.to_str().unwrap()], &d, &[]);
        let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap_or_default();
        v["mode"] == "sync" && v["dirty_bytes"] == 0 && v["resync_bytes"].as_u64().is_some_and(|b| b >= VOLUME)
    });
    let st = drv(&["agent", "status", "vol1", "--json", "--run-dir", run.to_str().unwrap()], &d, &[]);
    let next = serde_json::from_str::<serde_json::Value>(&st.stdout).unwrap()["next_seq"].as_u64().unwrap();
    for (i, r) in reps.iter().enumerate() {
        let target = d.join(format!("rep{}/vol1.img", i + 1));
        replica_equals(&s, r, &image, &target, next);
    }
    let rep1_after = replica_status(&s, &reps[0])["volumes"][0]["applied_seq"].as_u64().unwrap();
    assert!(rep1_after > rep1_before, "rep1 went on applying ({rep1_before} -> {rep1_after})");
    // rep2 started at the run's first record: the records before it were gone from staging.
    let log = std::fs::read_to_string(d.join("rep2.log")).unwrap();
    assert!(log.contains("starts at the full resync run"), "rep2 did not start at a full run:\n{log}");
    let _ = std::fs::remove_dir_all(&s.dir);
}
