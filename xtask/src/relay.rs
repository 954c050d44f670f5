//! `cargo xtask bench relay`: relay throughput staging -> replica (QUIC + mTLS, records with
//! AES-GCM payloads, through to the replica's durable DR log) against two baselines moving the same
//! bytes over loopback in the same run: a raw TCP copy and a TCP + TLS copy (rustls, AES-GCM). CPU
//! seconds per GiB for all three. The relay is timed twice: with the backlog in staging's cache, and
//! after a staging restart, when every record is read back from the WRL device (on this one-disk
//! host that read competes with the replica's DR log writes). Then replica lag p99 under a sustained
//! load at 50% of the measured relay capacity.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use drv_config::{ConfigStore, Kind};
use drv_format::frame::Frame;
use drv_proto::status::StagingStatus;
use drv_transport::{FrameReader, FrameWriter, Identity, Role, ca, quic};

const CHUNK: usize = 1 << 20;

/// User + system CPU seconds of this process.
fn self_cpu() -> f64 {
    // SAFETY: rusage is plain integers; all zeroes is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// User + system CPU seconds of another process.
fn proc_cpu(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state is [0]; utime [11], stime [12].
    // SAFETY: sysconf reads a constant, no pointers.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let get = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (get(11) + get(12)) / tick
}

/// Copies `bytes` over a loopback TCP connection; returns (MB/s, CPU seconds).
fn tcp_copy(bytes: u64) -> Result<(f64, f64)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let server = std::thread::spawn(move || -> Result<u64> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0u64;
        loop {
            let r = s.read(&mut buf)?;
            if r == 0 {
                return Ok(n);
            }
            n += r as u64;
        }
    });
    let (c0, t0) = (self_cpu(), Instant::now());
    let mut c = TcpStream::connect(addr)?;
    let buf = vec![7u8; CHUNK];
    let mut sent = 0;
    while sent < bytes {
        c.write_all(&buf)?;
        sent += CHUNK as u64;
    }
    drop(c);
    let got = server.join().map_err(|_| anyhow::anyhow!("server thread"))??;
    anyhow::ensure!(got == sent, "TCP copy lost bytes");
    Ok((bytes as f64 / t0.elapsed().as_secs_f64() / 1e6, self_cpu() - c0))
}

/// The same over TLS 1.3 (rustls, AES-GCM); returns (MB/s, CPU seconds, cipher suite).
fn tls_copy(bytes: u64) -> Result<(f64, f64, String)> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let mut server_cfg =
        rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(vec![cert.clone()], key)?;
    // No session tickets: the client never reads, and unread tickets would make its close a reset.
    server_cfg.send_tls13_tickets = 0;
    let server_cfg = Arc::new(server_cfg);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let client_cfg = Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth());
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let server = std::thread::spawn(move || -> Result<u64> {
        let (s, _) = l.accept()?;
        let conn = rustls::ServerConnection::new(server_cfg)?;
        let mut tls = rustls::StreamOwned::new(conn, s);
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0u64;
        loop {
            match tls.read(&mut buf) {
                Ok(0) => return Ok(n),
                Ok(r) => n += r as u64,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(n),
                Err(e) => return Err(anyhow::Error::from(e).context("server read")),
            }
        }
    });
    let (c0, t0) = (self_cpu(), Instant::now());
    let conn = rustls::ClientConnection::new(client_cfg, ServerName::try_from("localhost")?)?;
    let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(addr)?);
    let buf = vec![7u8; CHUNK];
    let mut sent = 0;
    while sent < bytes {
        tls.write_all(&buf).context("client write")?;
        sent += CHUNK as u64;
    }
    let suite = tls.conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
    tls.conn.send_close_notify();
    tls.flush()?;
    drop(tls);
    let got = server.join().map_err(|_| anyhow::anyhow!("server thread"))?.context("TLS server")?;
    anyhow::ensure!(got == sent, "TLS copy lost bytes");
    Ok((bytes as f64 / t0.elapsed().as_secs_f64() / 1e6, self_cpu() - c0, suite))
}

/// The same bytes over one s2n-quic stream with drv's endpoint settings (mTLS, windows, MTU), to
/// show the transport's own ceiling on this host; returns (MB/s, CPU seconds).
fn quic_copy(dir: &Path, bytes: u64) -> Result<(f64, f64)> {
    let certs = dir.join("quic-certs");
    let _ = std::fs::remove_dir_all(&certs);
    ca::init(&certs)?;
    ca::issue(&certs, Role::Replica, "sink")?;
    ca::issue(&certs, Role::Staging, "source")?;
    let sink = Identity::load(&certs, "sink")?;
    let source = Identity::load(&certs, "source")?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let mut server = quic::server("127.0.0.1:0".parse()?, &sink, &[Role::Staging])?;
        let addr = server.local_addr()?;
        let recv = tokio::spawn(async move {
            let mut conn = server.accept().await.context("accept")?;
            let mut s = conn.accept_receive_stream().await?.context("stream")?;
            let mut n = 0u64;
            while let Some(chunk) = s.receive().await? {
                n += chunk.len() as u64;
            }
            Ok::<u64, anyhow::Error>(n)
        });
        let client = quic::client(&source, Role::Replica)?;
        let (c0, t0) = (self_cpu(), Instant::now());
        let mut conn = quic::connect(&client, addr, Role::Replica).await?;
        let mut s = conn.open_send_stream().await?;
        let chunk = bytes::Bytes::from(vec![7u8; CHUNK]);
        let mut sent = 0;
        while sent < bytes {
            s.send(chunk.clone()).await?;
            sent += CHUNK as u64;
        }
        s.finish()?;
        let got = recv.await??;
        anyhow::ensure!(got == sent, "QUIC copy lost bytes");
        Ok((bytes as f64 / t0.elapsed().as_secs_f64() / 1e6, self_cpu() - c0))
    })
}

pub fn free_port() -> u16 {
    drv_transport::free_port([127, 0, 0, 1].into()).unwrap_or(47000)
}

pub struct Setup {
    pub certs: std::path::PathBuf,
    pub config: std::path::PathBuf,
    pub staging: SocketAddr,
    pub volume_id: u64,
}

/// `cache_bytes`: the staging WRL's cache of unrelayed records.
fn setup(dir: &Path, wrl_bytes: u64, cache_bytes: u64) -> Result<Setup> {
    setup_volume(dir, &dir.join("rep1"), wrl_bytes, cache_bytes, 64 << 20)
}

/// An installation on loopback (CA, certificates, staging stg1, replica rep1 keeping its data in
/// `replica_data`, volume vol1).
pub fn setup_volume(
    dir: &Path,
    replica_data: &Path,
    wrl_bytes: u64,
    cache_bytes: u64,
    volume_bytes: u64,
) -> Result<Setup> {
    let certs = dir.join("certs");
    ca::init(&certs)?;
    for (r, n) in [(Role::Staging, "stg1"), (Role::Replica, "rep1"), (Role::Agent, "host1"), (Role::Admin, "admin")] {
        ca::issue(&certs, r, n)?;
    }
    let key = dir.join("vol.key");
    std::fs::write(&key, [9u8; 32])?;
    let config = dir.join("config.redb");
    let st = ConfigStore::open(&config)?;
    let staging: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let replica: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let s = |v: Vec<String>| v;
    st.set(Kind::Endpoint, "stg1", &s(vec!["role=staging".into(), format!("address={staging}")]))?;
    st.set(
        Kind::Endpoint,
        "rep1",
        &s(vec![
            "role=replica".into(),
            format!("address={replica}"),
            format!("data_dir={}", replica_data.display()),
            format!("drlog_bytes={}", wrl_bytes + (256 << 20)),
        ]),
    )?;
    st.set(Kind::Key, "k1", &s(vec![format!("path={}", key.display())]))?;
    st.set(
        Kind::Wrl,
        "w0",
        &s(vec![
            "staging=stg1".into(),
            format!("devices=[\"{}\"]", dir.join("wrl0").display()),
            "segment_bytes=64M".into(),
            format!("device_bytes={wrl_bytes}"),
            format!("cache_bytes_limit={cache_bytes}"),
        ]),
    )?;
    let v = st.set(
        Kind::Volume,
        "vol1",
        &s(vec![format!("size_bytes={volume_bytes}"), "wrl=w0".into(), "replicas=[\"rep1\"]".into(), "key=k1".into()]),
    )?;
    Ok(Setup { certs, config, staging, volume_id: v["id"].as_u64().context("volume id")? })
}

pub fn start(drv: &Path, s: &Setup, role: &str, name: &str, log: &Path) -> Result<Child> {
    Ok(Command::new(drv)
        .args([role, "run", "--name", name])
        .arg("--config")
        .arg(&s.config)
        .arg("--certs")
        .arg(&s.certs)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?)
}

/// One status connection, reused for every poll (a handshake per poll would load staging).
pub(crate) struct StatusConn {
    _client: quic::QuicClient,
    conn: s2n_quic::Connection,
}

impl StatusConn {
    async fn open(id: &Identity, addr: SocketAddr) -> Result<StatusConn> {
        StatusConn::open_to(id, addr, Role::Staging).await
    }

    /// A connection to the server of `role` at `addr`, reused for every request.
    pub(crate) async fn open_to(id: &Identity, addr: SocketAddr, role: Role) -> Result<StatusConn> {
        let c = quic::client(id, role)?;
        let conn = quic::connect(&c, addr, role).await?;
        Ok(StatusConn { _client: c, conn })
    }

    pub(crate) async fn get(&mut self) -> Result<StagingStatus> {
        match self.request(&Frame::StatusRequest).await? {
            Some(Frame::StatusReply { json }) => Ok(serde_json::from_slice(&json)?),
            other => bail!("unexpected status answer {other:?}"),
        }
    }

    /// One request on a stream of its own; the answer.
    pub(crate) async fn request(&mut self, f: &Frame) -> Result<Option<Frame>> {
        let st = self.conn.open_bidirectional_stream().await?;
        let (rx, tx) = st.split();
        let (mut r, mut w) = (FrameReader::new(rx, 16 << 20), FrameWriter::new(tx));
        w.send(f).await?;
        Ok(r.next().await?)
    }
}

/// An agent link writing `write_bytes`-sized writes; `rate` (bytes/s) paces it when set.
/// Returns the last sequence written.
pub(crate) async fn agent_load(
    id: &Identity,
    addr: SocketAddr,
    volume_id: u64,
    total: u64,
    write_bytes: usize,
    rate: Option<f64>,
    first_seq: u64,
) -> Result<u64> {
    agent_load_at(id, addr, volume_id, total, write_bytes, rate, first_seq, &|_| 0).await
}

/// [`agent_load`] with capture times: `capture(i)` for the `i`th write (seconds since the UNIX
/// epoch, as the agent's clock would stamp them).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn agent_load_at(
    id: &Identity,
    addr: SocketAddr,
    volume_id: u64,
    total: u64,
    write_bytes: usize,
    rate: Option<f64>,
    first_seq: u64,
    capture: &(dyn Fn(u64) -> u32 + Sync),
) -> Result<u64> {
    let cfg = drv_transport::tls::client_config(id, Role::Staging)?;
    let (w, mut r) = drv_transport::link::connect(addr, cfg, 1 << 20).await?;
    w.send(&Frame::OpenVolume { volume_id })?;
    match r.next().await? {
        Some(Frame::VolumeState { .. }) => {}
        other => bail!("staging refused the volume: {other:?}"),
    }
    let n = total / write_bytes as u64;
    let data = bytes::Bytes::from(vec![0x5au8; write_bytes]);
    let started = Instant::now();
    let (mut sent, mut acked) = (0u64, 0u64);
    let window = 32u64;
    while acked < n {
        while sent < n && sent - acked < window {
            if let Some(rate) = rate {
                let due = Duration::from_secs_f64(sent as f64 * write_bytes as f64 / rate);
                if started.elapsed() < due {
                    break;
                }
            }
            let seq = first_seq + sent;
            // Round and round a 64 MiB working set.
            let offset = (seq % ((64 << 20) / write_bytes as u64)) * write_bytes as u64;
            w.send(&Frame::Write {
                volume_id,
                seq,
                epoch: seq,
                offset,
                flags: 0,
                capture_unix: capture(sent),
                data: data.clone(),
            })?;
            sent += 1;
        }
        let wait = if sent < n && sent - acked < window { Duration::from_millis(2) } else { Duration::from_secs(30) };
        match tokio::time::timeout(wait, r.next()).await {
            // Cumulative: every write up to `seq` is durable.
            Ok(Ok(Some(Frame::Ack { seq, .. }))) => acked = acked.max(seq + 1 - first_seq),
            Ok(Ok(Some(other))) => bail!("staging answered {other:?}"),
            Ok(Ok(None)) => bail!("staging closed the stream"),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) if wait < Duration::from_secs(1) => {}
            Err(_) => bail!("no acknowledgement for 30 s"),
        }
    }
    Ok(first_seq + n - 1)
}

/// A status connection to staging, once it answers.
pub(crate) async fn status_conn(admin: &Identity, addr: SocketAddr, dir: &Path) -> Result<StatusConn> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut sc) = StatusConn::open(admin, addr).await
            && sc.get().await.is_ok()
        {
            return Ok(sc);
        }
        anyhow::ensure!(Instant::now() < deadline, "staging did not start: see {}", dir.join("stg1.log").display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until staging has noticed that the replica is gone (so that the next `catch_up` times a
/// new connection, not the old one's idle timeout).
pub(crate) async fn disconnected(sc: &mut StatusConn) -> Result<()> {
    let t = Instant::now();
    loop {
        if let Ok(st) = sc.get().await
            && !st.volumes[0].replicas[0].connected
        {
            return Ok(());
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "staging did not notice the replica is gone");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Times the relay of a backlog ending at `last` from the moment it connects until the replica
/// reports everything durable in its DR log; returns (MB/s, CPU seconds of staging and replica).
async fn catch_up(sc: &mut StatusConn, staging: u32, replica: u32, bytes: u64, last: u64) -> Result<(f64, f64)> {
    // The relay retries with backoff while the replica is down: time from when it is connected.
    let w0 = Instant::now();
    loop {
        if let Ok(st) = sc.get().await
            && st.volumes[0].replicas[0].connected
        {
            break;
        }
        anyhow::ensure!(w0.elapsed() < Duration::from_secs(30), "relay did not connect");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (st0, rep0, t0) = (proc_cpu(staging), proc_cpu(replica), Instant::now());
    loop {
        if let Ok(st) = sc.get().await
            && replicated(&st) >= last
        {
            break;
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(600), "relay did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let (stg_cpu, rep_cpu) = (proc_cpu(staging) - st0, proc_cpu(replica) - rep0);
    eprintln!("relay of {} MiB: {secs:.2} s; CPU staging {stg_cpu:.2} s, replica {rep_cpu:.2} s", bytes >> 20);
    Ok((bytes as f64 / secs / 1e6, stg_cpu + rep_cpu))
}

fn replicated(s: &StagingStatus) -> u64 {
    s.volumes[0].replicated_seq
}

pub fn bench(drv: &Path, dir: &Path, quick: bool) -> Result<()> {
    let bytes: u64 = if quick { 256 << 20 } else { 1 << 30 };
    let rounds = 3;
    let mut tcp = Vec::new();
    let mut tls = Vec::new();
    let mut suite = String::new();
    for _ in 0..rounds {
        tcp.push(tcp_copy(bytes).context("raw TCP copy")?);
        let (mbs, cpu, s) = tls_copy(bytes).context("TLS copy")?;
        suite = s;
        tls.push((mbs, cpu));
    }
    let med = |mut v: Vec<(f64, f64)>| {
        v.sort_by(|a, b| a.0.partial_cmp(&b.0).expect("no NaN"));
        v[v.len() / 2]
    };
    let (tcp_mbs, tcp_cpu) = med(tcp);
    let (tls_mbs, tls_cpu) = med(tls);
    let (quic_mbs, quic_cpu) = quic_copy(dir, bytes).context("QUIC copy")?;

    // Relay: load the staging WRL while the replica is down, then time the catch-up. Twice: first
    // with every record still in staging's cache (the relay's own cost: network, records, DR log),
    // then after a staging restart, so that every record is read back from the WRL device first.
    let s = setup(dir, (rounds as u64 + 1) * bytes + (512 << 20), bytes + (64 << 20))?;
    let mut staging = start(drv, &s, "staging", "stg1", &dir.join("stg1.log"))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let agent = Identity::load(&s.certs, "host1")?;
    let admin = Identity::load(&s.certs, "admin")?;
    let result = rt.block_on(async {
        let mut sc = status_conn(&admin, s.staging, dir).await?;
        let mut last = 0;
        let mut cached = Vec::new();
        for _ in 0..rounds {
            let tl = Instant::now();
            last = agent_load(&agent, s.staging, s.volume_id, bytes, CHUNK, None, last + 1).await?;
            eprintln!("agent -> staging ingest: {:.1} MB/s", bytes as f64 / tl.elapsed().as_secs_f64() / 1e6);
            let mut replica = start(drv, &s, "replica", "rep1", &dir.join("rep1.log"))?;
            cached.push(catch_up(&mut sc, staging.id(), replica.id(), bytes, last).await?);
            let _ = replica.kill();
            let _ = replica.wait();
            disconnected(&mut sc).await?;
        }
        let cached = med(cached);

        let last = agent_load(&agent, s.staging, s.volume_id, bytes, CHUNK, None, last + 1).await?;
        let _ = staging.kill();
        let _ = staging.wait();
        staging = start(drv, &s, "staging", "stg1", &dir.join("stg1.log"))?;
        let sc = status_conn(&admin, s.staging, dir).await;
        let mut replica = start(drv, &s, "replica", "rep1", &dir.join("rep1.log"))?;
        let mut sc = sc?;
        let from_disk = catch_up(&mut sc, staging.id(), replica.id(), bytes, last).await?;
        let relay_mbs = cached.0;
        // The lag is measured from a steady state: the replica has applied the backlogs (all but
        // the last epoch, which stays open until a record of a later epoch shows it complete).
        let ta = Instant::now();
        loop {
            if let Ok(st) = sc.get().await
                && st.volumes[0].replicas[0].applied_seq >= last - 1
            {
                break;
            }
            anyhow::ensure!(ta.elapsed() < Duration::from_secs(600), "the replica did not apply the backlog");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("replica applied the backlog {:.2} s after it was durable", ta.elapsed().as_secs_f64());

        // Lag under a sustained load at half the relay capacity (and of what staging ingests).
        let rate = relay_mbs * 1e6 * 0.5;
        let duration = if quick { 5.0 } else { 15.0 };
        let write = 256 << 10;
        let load_bytes = ((rate * duration) as u64 / write as u64).max(1) * write as u64;
        let sampler = {
            let admin = admin.clone();
            let addr = s.staging;
            tokio::spawn(async move {
                let mut lags = Vec::new();
                let end = Instant::now() + Duration::from_secs_f64(duration + 1.0);
                let Ok(mut sc) = StatusConn::open(&admin, addr).await else { return lags };
                while Instant::now() < end {
                    if let Ok(st) = sc.get().await {
                        lags.push(st.volumes[0].lag_seconds);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                lags
            })
        };
        let t1 = Instant::now();
        agent_load(&agent, s.staging, s.volume_id, load_bytes, write, Some(rate), last + 1).await?;
        let achieved = load_bytes as f64 / t1.elapsed().as_secs_f64() / 1e6;
        let mut lags = sampler.await?;
        lags.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        let p99 = lags[((lags.len() as f64 * 0.99) as usize).min(lags.len() - 1)];
        let p50 = lags[lags.len() / 2];
        let _ = replica.kill();
        let _ = replica.wait();
        Ok::<_, anyhow::Error>((cached, from_disk, rate / 1e6, achieved, p50, p99, lags.len()))
    });
    let _ = staging.kill();
    let _ = staging.wait();
    let ((relay_mbs, relay_cpu), (disk_mbs, disk_cpu), target, achieved, p50, p99, samples) = result?;
    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!();
    println!("== cargo xtask bench relay ({}) ==", if quick { "quick" } else { "full" });
    println!("loopback, {} MiB each ({rounds} rounds for the baselines and the cached relay, medians):", bytes >> 20);
    println!("  raw TCP copy            {tcp_mbs:>9.1} MB/s   CPU {:>6.2} s/GiB", tcp_cpu / gib);
    println!("  TCP + TLS (rustls)      {tls_mbs:>9.1} MB/s   CPU {:>6.2} s/GiB   ({suite})", tls_cpu / gib);
    println!(
        "  s2n-quic stream (mTLS)  {quic_mbs:>9.1} MB/s   CPU {:>6.2} s/GiB   (the transport's ceiling here)",
        quic_cpu / gib
    );
    println!(
        "  drv relay -> DR log     {relay_mbs:>9.1} MB/s   CPU {:>6.2} s/GiB   ratio vs TLS {:.2} (goal >= 0.50), vs raw TCP {:.2}",
        relay_cpu / gib,
        relay_mbs / tls_mbs,
        relay_mbs / tcp_mbs
    );
    println!(
        "  ... read back from disk  {disk_mbs:>9.1} MB/s   CPU {:>6.2} s/GiB   ratio vs TLS {:.2} (catch-up after a staging restart)",
        disk_cpu / gib,
        disk_mbs / tls_mbs
    );
    println!(
        "replica lag at 50% of relay capacity ({target:.0} MB/s offered, {achieved:.0} MB/s achieved, {samples} samples):"
    );
    println!("  lag p50 {p50:.3} s, p99 {p99:.3} s (goal p99 <= 1 s)");
    Ok(())
}
