//! Helpers shared by the integration tests.

#![forbid(unsafe_code)]

use drv_format::crypto::VolumeKey;
use drv_proto::status::{ReplicaStatus, StagingStatus};

/// The key every test record is encrypted with.
pub fn test_key() -> VolumeKey {
    VolumeKey::from_bytes(1, &[0x5a; 32])
}

pub use drv_format::pattern;

/// A seeded xorshift generator: tests and helpers replay any run from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The `drv` binary of this build (built by `cargo build --bins`, which `cargo xtask test` runs first).
pub fn drv_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let bin = dir.join("drv");
    assert!(bin.exists(), "{} not found: run `cargo build --bins` first (cargo xtask test does)", bin.display());
    bin
}

/// Sends the log of what runs inside the test process (an agent started by the test) to the
/// test's captured output, so a failing test shows it. `RUST_LOG` filters it (default `info`).
pub fn trace_to_test_output() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().with_ansi(false).try_init();
    });
}

/// Where test servers' ports come from: below the kernel's ephemeral range (32768 and up by
/// default), so no client socket of a test running beside this one (a `drv status`, a QUIC
/// client) is given a port that a cluster chose and has not bound yet.
const TEST_PORTS: std::ops::Range<u16> = 12_000..32_000;

/// A loopback port free for both UDP and TCP now (a staging server's agent link listens at its
/// QUIC port number), never handed out twice by one test process: tests run side by side, and a
/// server starts long after its cluster chose its port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = (TEST_PORTS.end - TEST_PORTS.start) as u32;
    // Each test process starts somewhere else in the range (two test binaries may run at once).
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let port = TEST_PORTS.start + (NEXT.fetch_add(1, Ordering::SeqCst) % span) as u16;
        let ip = std::net::Ipv4Addr::LOCALHOST;
        if std::net::TcpListener::bind((ip, port)).is_ok() && std::net::UdpSocket::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no loopback port in {TEST_PORTS:?} is free for both TCP and UDP");
}

/// A small installation on loopback: CA and certificates, a key, a configuration store with one
/// staging server, one or more replicas and one volume.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub certs: std::path::PathBuf,
    pub config: std::path::PathBuf,
    pub staging_addr: String,
    pub replica_addrs: Vec<String>,
    pub volume_id: u64,
    pub volume_bytes: u64,
}

impl Cluster {
    pub fn new(replicas: usize, volume_bytes: u64) -> Cluster {
        trace_to_test_output();
        use drv_config::{ConfigStore, Kind};
        use drv_transport::{Role, ca};
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        ca::init(&certs).expect("ca");
        ca::issue(&certs, Role::Staging, "stg1").expect("issue");
        ca::issue(&certs, Role::Agent, "host1").expect("issue");
        ca::issue(&certs, Role::Admin, "admin").expect("issue");
        let key = dir.path().join("vol.key");
        std::fs::write(&key, [0x42u8; 32]).expect("key");
        let config = dir.path().join("config.redb");
        let st = ConfigStore::open(&config).expect("config");
        let s = |v: &[String]| v.to_vec();
        let staging_addr = format!("127.0.0.1:{}", free_port());
        st.set(Kind::Endpoint, "stg1", &s(&["role=staging".into(), format!("address={staging_addr}")])).unwrap();
        let mut names = Vec::new();
        let mut replica_addrs = Vec::new();
        for i in 0..replicas {
            let name = format!("rep{}", i + 1);
            ca::issue(&certs, Role::Replica, &name).expect("issue");
            let addr = format!("127.0.0.1:{}", free_port());
            let data = dir.path().join(&name);
            st.set(
                Kind::Endpoint,
                &name,
                &s(&[
                    "role=replica".into(),
                    format!("address={addr}"),
                    format!("data_dir={}", data.display()),
                    "drlog_bytes=64M".into(),
                ]),
            )
            .unwrap();
            names.push(format!("\"{name}\""));
            replica_addrs.push(addr);
        }
        st.set(Kind::Key, "k1", &s(&[format!("path={}", key.display())])).unwrap();
        let wrl = dir.path().join("wrl0");
        st.set(
            Kind::Wrl,
            "w0",
            &s(&[
                "staging=stg1".into(),
                format!("devices=[\"{}\"]", wrl.display()),
                "segment_bytes=4M".into(),
                "device_bytes=64M".into(),
            ]),
        )
        .unwrap();
        let v = st
            .set(
                Kind::Volume,
                "vol1",
                &s(&[
                    format!("size_bytes={volume_bytes}"),
                    "wrl=w0".into(),
                    format!("replicas=[{}]", names.join(",")),
                    "key=k1".into(),
                ]),
            )
            .unwrap();
        Cluster { certs, config, staging_addr, replica_addrs, volume_id: v["id"].as_u64().unwrap(), volume_bytes, dir }
    }

    /// Starts `drv staging run` or `drv replica run` for `name`, logging to `DIR/NAME.log`.
    pub fn start(&self, role: &str, name: &str) -> std::process::Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .expect("log");
        std::process::Command::new(drv_bin())
            .args([role, "run", "--name", name])
            .arg("--config")
            .arg(&self.config)
            .arg("--certs")
            .arg(&self.certs)
            .env("DRV_LOG", "info")
            .stderr(log)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn drv")
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The status of staging, if it answers (typed: `drv status --json` read as the reply type).
    pub fn staging_status(&self) -> Option<StagingStatus> {
        self.status(&self.staging_addr, "staging", "admin")
            .map(|v| serde_json::from_value(v).expect("a staging status"))
    }

    /// The status of the replica at `addr`, if it answers.
    pub fn replica_status_at(&self, addr: &str) -> Option<ReplicaStatus> {
        self.status(addr, "replica", "admin").map(|v| serde_json::from_value(v).expect("a replica status"))
    }

    /// The status of the first replica, if it answers.
    pub fn replica_status(&self) -> Option<ReplicaStatus> {
        self.replica_status_at(&self.replica_addrs[0])
    }

    /// `drv status --json` of a server, if it answers.
    pub fn status(&self, addr: &str, role: &str, cert: &str) -> Option<serde_json::Value> {
        let out = std::process::Command::new(drv_bin())
            .args(["status", "--json", "--server", addr, "--role", role, "--name", cert])
            .arg("--certs")
            .arg(&self.certs)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }
}

impl Drop for Cluster {
    /// Stops every process still running with this cluster's configuration (its servers and
    /// agents): a test that panics never reaches its own kill, and servers it leaves running
    /// would hold ports and CPU for the tests after it. Found by command line, so a process id
    /// another process took over is never signalled.
    fn drop(&mut self) {
        let config = self.config.display().to_string();
        let Ok(procs) = std::fs::read_dir("/proc") else { return };
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if pid == std::process::id() {
                continue;
            }
            let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else { continue };
            if cmdline.split(|b| *b == 0).any(|arg| arg == config.as_bytes()) {
                let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}
