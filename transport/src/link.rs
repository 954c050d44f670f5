//! The agent link: drv frames over TLS 1.3 over TCP, between an agent and its staging server.
//!
//! Why not QUIC like the other links: every write waits for this round trip, and the fewest
//! thread hand-offs on it is what sets its latency. Here the staging side serves each connection on
//! a thread of its own that reads a frame, logs it and writes the acknowledgement itself (blocking
//! socket, no runtime in between); the agent writes a frame into the socket on the writer's own
//! task and reads acknowledgements on one task woken by the socket. TLS (rustls, [`crate::tls`])
//! gives the same mutual authentication and role checks as QUIC. Staging listens for the link on
//! TCP at the port number of its QUIC endpoint.
//!
//! A [`Link`] is shared by its reader and any number of senders: sending encrypts under the
//! link's lock and writes the TLS bytes at once. On the async side a full socket leaves them in
//! rustls's buffer and a flusher task writes them once the socket is writable; on the blocking
//! side the write blocks (with a timeout: a peer that stops reading for that long is cut off).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use drv_format::frame::{FRAME_HEADER_LEN, Frame, decode_body, decode_header};
use rustls::{ClientConnection, Connection, ServerConnection};

use crate::TransportError;

/// How long a blocking send may wait for the peer to read before the link is cut.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a TLS handshake may take on the server side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// TCP keep-alive: a peer whose host vanished is noticed after about idle + count * interval.
const KEEPALIVE_IDLE_SECS: i32 = 5;
const KEEPALIVE_INTERVAL_SECS: i32 = 2;
const KEEPALIVE_COUNT: i32 = 3;

/// Socket reads are this large (many small frames per read under load).
const READ_CHUNK: usize = 256 << 10;

fn stream_err(what: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::Stream(format!("{what}: {e}"))
}

/// Low latency (no Nagle: every frame goes out at once) and dead-peer detection.
fn tune(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    s.set_nodelay(true)?;
    let fd = s.as_raw_fd();
    let set = |level, opt, v: i32| -> std::io::Result<()> {
        // SAFETY: `fd` is an open socket; the option value is a live i32 of the size passed.
        let r = unsafe {
            libc::setsockopt(fd, level, opt, (&v as *const i32).cast(), std::mem::size_of::<i32>() as libc::socklen_t)
        };
        if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_SECS)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, KEEPALIVE_INTERVAL_SECS)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_COUNT)
}

enum Io {
    /// The server side: a blocking socket.
    Blocking(TcpStream),
    /// The agent side: a non-blocking socket registered with tokio (`tokio`), and the same socket
    /// as a std handle (`std`) for shutdown.
    Async { tokio: tokio::net::TcpStream, std: TcpStream, flush: Arc<tokio::sync::Notify> },
}

struct State {
    tls: Connection,
    broken: Option<String>,
}

/// One TLS connection, shared by its reader and senders.
pub struct Link {
    state: Mutex<State>,
    io: Io,
    peer: SocketAddr,
}

/// `io::Write` over a non-blocking tokio socket (WouldBlock when full).
struct TryWrite<'a>(&'a tokio::net::TcpStream);

impl Write for TryWrite<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.try_write(b)
    }
    fn write_vectored(&mut self, b: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.0.try_write_vectored(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Link {
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Encrypts and writes a frame. Frames from one sender leave in the order sent.
    pub fn send(&self, f: &Frame) -> Result<(), TransportError> {
        self.send_bytes(&f.encode())
    }

    /// Writes already-encoded frame bytes (tests use it for malformed frames).
    pub fn send_bytes(&self, bytes: &[u8]) -> Result<(), TransportError> {
        let mut st = self.state.lock().expect("link state");
        if let Some(why) = &st.broken {
            return Err(TransportError::Stream(why.clone()));
        }
        st.tls.writer().write_all(bytes).map_err(|e| stream_err("TLS", e))?;
        let r = self.write_out(&mut st);
        if let Err(e) = &r {
            st.broken.get_or_insert_with(|| e.to_string());
        }
        r
    }

    /// Writes what rustls holds for the socket: blocking on the server side; on the async side
    /// until the socket is full (the flusher does the rest).
    fn write_out(&self, st: &mut State) -> Result<(), TransportError> {
        while st.tls.wants_write() {
            let r = match &self.io {
                Io::Blocking(s) => st.tls.write_tls(&mut &*s),
                Io::Async { tokio, .. } => st.tls.write_tls(&mut TryWrite(tokio)),
            };
            match r {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Io::Async { flush, .. } = &self.io {
                        flush.notify_one();
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(stream_err(&format!("send to {}", self.peer), e)),
            }
        }
        Ok(())
    }

    /// Ends the sending side after what was sent (TLS `close_notify`, then a TCP half-close):
    /// the peer reads to the end of it, and this side still receives. Tests use it to end the
    /// link inside a frame.
    pub fn finish(&self) -> Result<(), TransportError> {
        let mut st = self.state.lock().expect("link state");
        st.tls.send_close_notify();
        self.write_out(&mut st)?;
        if st.tls.wants_write() {
            return Err(TransportError::Stream("finish: the socket's send buffer is full".into()));
        }
        st.broken.get_or_insert_with(|| "link finished".to_owned());
        let s = match &self.io {
            Io::Blocking(s) => s,
            Io::Async { std, .. } => std,
        };
        s.shutdown(std::net::Shutdown::Write).map_err(|e| stream_err("finish", e))
    }

    /// Closes the connection both ways (the reader sees the end; later sends fail).
    pub fn shutdown(&self) {
        self.state.lock().expect("link state").broken.get_or_insert_with(|| "link closed".to_owned());
        let s = match &self.io {
            Io::Blocking(s) => s,
            Io::Async { std, .. } => std,
        };
        let _ = s.shutdown(std::net::Shutdown::Both);
    }

    fn fail(&self, why: &TransportError) {
        self.state.lock().expect("link state").broken.get_or_insert_with(|| why.to_string());
    }

    /// Feeds received TLS bytes to rustls and moves the plaintext to `plain`. Also called with
    /// nothing received right after the handshake: application data that arrived with the peer's
    /// last handshake message is already inside rustls.
    fn absorb(&self, mut raw: &[u8], plain: &mut BytesMut) -> Result<(), TransportError> {
        use std::io::BufRead;
        let mut st = self.state.lock().expect("link state");
        loop {
            if !raw.is_empty() {
                st.tls.read_tls(&mut raw).map_err(|e| stream_err("TLS", e))?;
            }
            st.tls.process_new_packets().map_err(|e| TransportError::Stream(format!("TLS from {}: {e}", self.peer)))?;
            // Straight from rustls's buffer (one copy, not two through a bounce buffer).
            loop {
                let mut r = st.tls.reader();
                let n = match r.fill_buf() {
                    Ok([]) => break,
                    Ok(b) => {
                        plain.extend_from_slice(b);
                        b.len()
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(stream_err("TLS", e)),
                };
                r.consume(n);
            }
            if raw.is_empty() {
                break;
            }
        }
        // TLS messages of its own (alerts, key updates) go out at once.
        self.write_out(&mut st)
    }
}

/// The next whole frame at the front of `plain`, if there is one (the body is not copied).
fn take_frame(plain: &mut BytesMut, limit: u32) -> Result<Option<Frame>, TransportError> {
    if plain.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let hb: [u8; FRAME_HEADER_LEN] = plain[..FRAME_HEADER_LEN].try_into().expect("length checked");
    let h = decode_header(&hb, limit)?;
    let whole = FRAME_HEADER_LEN + h.body_len as usize;
    if plain.len() < whole {
        plain.reserve(whole - plain.len());
        return Ok(None);
    }
    let body: Bytes = plain.split_to(whole).split_off(FRAME_HEADER_LEN).freeze();
    Ok(Some(decode_body(&hb, &h, body)?))
}

/// The receiving half of a link.
pub struct LinkReader {
    link: Arc<Link>,
    raw: Vec<u8>,
    plain: BytesMut,
    limit: u32,
    eof: bool,
}

impl LinkReader {
    /// Takes over whatever plaintext came in with the handshake.
    fn new(link: Arc<Link>, limit: u32) -> Result<LinkReader, TransportError> {
        let mut plain = BytesMut::new();
        link.absorb(&[], &mut plain)?;
        Ok(LinkReader { link, raw: vec![0; READ_CHUNK], plain, limit, eof: false })
    }

    fn end(&mut self) -> Result<Option<Frame>, TransportError> {
        self.eof = true;
        if self.plain.is_empty() {
            return Ok(None);
        }
        Err(TransportError::BadFrame(drv_format::FormatError::Truncated {
            what: "frame",
            need: FRAME_HEADER_LEN.max(self.plain.len() + 1),
            have: self.plain.len(),
        }))
    }

    /// The next frame if a whole one was received already (no socket read).
    pub fn buffered(&mut self) -> Result<Option<Frame>, TransportError> {
        take_frame(&mut self.plain, self.limit)
    }

    /// Takes in the outcome of one socket read.
    fn got(&mut self, r: std::io::Result<usize>) -> Result<Got, TransportError> {
        match r {
            Ok(0) => {
                self.eof = true;
                Ok(Got::End)
            }
            Ok(n) => {
                self.link.absorb(&self.raw[..n], &mut self.plain).inspect_err(|e| self.link.fail(e))?;
                Ok(Got::Data)
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {
                Ok(Got::Again)
            }
            Err(e) => {
                // A peer that went away between frames (its process killed: a reset instead of a
                // close) ended the link like a close does; inside a frame it is an error.
                let gone =
                    matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted);
                let e = stream_err(&format!("receive from {}", self.link.peer), e);
                self.link.fail(&e);
                if gone && self.plain.is_empty() {
                    tracing::debug!("link ended between frames: {e}");
                    self.eof = true;
                    return Ok(Got::End);
                }
                Err(e)
            }
        }
    }

    /// Takes in what the socket holds now without waiting (blocking socket); `false` when it held
    /// nothing. A server that commits what it received in one batch calls it first: frames that
    /// arrived while it decoded the earlier ones join the batch at no cost.
    pub fn receive_ready(&mut self) -> Result<bool, TransportError> {
        use std::os::fd::AsRawFd;
        let Io::Blocking(s) = &self.link.io else { unreachable!("receive_ready on an async link") };
        if self.eof {
            return Ok(false);
        }
        // SAFETY: `raw` is a live buffer of the length passed; the socket is open.
        let n = unsafe { libc::recv(s.as_raw_fd(), self.raw.as_mut_ptr().cast(), self.raw.len(), libc::MSG_DONTWAIT) };
        let r = if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(n as usize) };
        Ok(matches!(self.got(r)?, Got::Data))
    }

    /// The next frame (blocking socket), or `None` when the peer closed the link between frames.
    pub fn next_blocking(&mut self) -> Result<Option<Frame>, TransportError> {
        loop {
            if let Some(f) = take_frame(&mut self.plain, self.limit)? {
                return Ok(Some(f));
            }
            if self.eof {
                return self.end();
            }
            let Io::Blocking(s) = &self.link.io else { unreachable!("next_blocking on an async link") };
            let r = (&*s).read(&mut self.raw);
            self.got(r)?;
        }
    }

    /// The next frame (async socket), or `None` when the peer closed the link between frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, TransportError> {
        loop {
            if let Some(f) = take_frame(&mut self.plain, self.limit)? {
                return Ok(Some(f));
            }
            if self.eof {
                return self.end();
            }
            let Io::Async { tokio, .. } = &self.link.io else { unreachable!("next on a blocking link") };
            let r = tokio.try_read(&mut self.raw);
            if let Got::Again = self.got(r)? {
                let Io::Async { tokio, .. } = &self.link.io else { unreachable!() };
                tokio.readable().await.map_err(|e| stream_err("receive", e))?;
            }
        }
    }
}

/// What one socket read gave.
enum Got {
    Data,
    /// Nothing now (would block, or interrupted).
    Again,
    End,
}

/// Accepts one connection on the server side: TLS handshake (blocking, bounded in time) with the
/// role checks of `cfg`. Returns the shared link and its reader (`limit`: the largest frame body).
pub fn accept(
    sock: TcpStream,
    cfg: Arc<rustls::ServerConfig>,
    limit: u32,
) -> Result<(Arc<Link>, LinkReader), TransportError> {
    let peer = sock.peer_addr().map_err(|e| stream_err("peer address", e))?;
    tune(&sock).map_err(|e| stream_err("socket options", e))?;
    let mut tls = ServerConnection::new(cfg).map_err(|e| stream_err("TLS", e))?;
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| stream_err("socket options", e))?;
    sock.set_write_timeout(Some(SEND_TIMEOUT)).map_err(|e| stream_err("socket options", e))?;
    let mut s = &sock;
    while tls.is_handshaking() {
        tls.complete_io(&mut s)
            .map_err(|e| TransportError::Connect { peer: peer.to_string(), reason: format!("TLS handshake: {e}") })?;
    }
    sock.set_read_timeout(None).map_err(|e| stream_err("socket options", e))?;
    let mut tls = Connection::Server(tls);
    // The agent's in-flight limit bounds what is queued here.
    tls.set_buffer_limit(None);
    let link = Arc::new(Link { state: Mutex::new(State { tls, broken: None }), io: Io::Blocking(sock), peer });
    let reader = LinkReader::new(link.clone(), limit)?;
    Ok((link, reader))
}

/// Connects to a link server (the agent side). Spawns the link's flusher task on the current
/// runtime; it ends when the link is dropped.
pub async fn connect(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    limit: u32,
) -> Result<(Arc<Link>, LinkReader), TransportError> {
    let cerr = |reason: String| TransportError::Connect { peer: addr.to_string(), reason };
    let s = tokio::net::TcpStream::connect(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => TransportError::NotListening { peer: addr.to_string() },
        _ => cerr(e.to_string()),
    })?;
    let std = s.into_std().map_err(|e| cerr(e.to_string()))?;
    tune(&std).map_err(|e| cerr(format!("socket options: {e}")))?;
    let dup = std.try_clone().map_err(|e| cerr(e.to_string()))?;
    let tokio = tokio::net::TcpStream::from_std(std).map_err(|e| cerr(e.to_string()))?;
    let name = rustls::pki_types::ServerName::try_from("staging.drv").expect("literal name");
    let mut tls = ClientConnection::new(cfg, name).map_err(|e| cerr(format!("TLS: {e}")))?;
    // The handshake, driven on the async socket.
    loop {
        while tls.wants_write() {
            match tls.write_tls(&mut TryWrite(&tokio)) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio.writable().await.map_err(|e| cerr(e.to_string()))?;
                }
                Err(e) => return Err(cerr(format!("TLS handshake: {e}"))),
            }
        }
        if !tls.is_handshaking() {
            break;
        }
        tokio.readable().await.map_err(|e| cerr(e.to_string()))?;
        let mut buf = [0u8; 16 << 10];
        match tokio.try_read(&mut buf) {
            Ok(0) => return Err(cerr("TLS handshake: the server closed the connection (refused?)".into())),
            Ok(n) => {
                let mut rd = &buf[..n];
                while !rd.is_empty() {
                    tls.read_tls(&mut rd).map_err(|e| cerr(format!("TLS handshake: {e}")))?;
                    tls.process_new_packets().map_err(|e| cerr(format!("TLS handshake: {e}")))?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(cerr(format!("TLS handshake: {e}"))),
        }
    }
    let mut tls = Connection::Client(tls);
    tls.set_buffer_limit(None);
    let flush = Arc::new(tokio::sync::Notify::new());
    let link = Arc::new(Link {
        state: Mutex::new(State { tls, broken: None }),
        io: Io::Async { tokio, std: dup, flush: flush.clone() },
        peer: addr,
    });
    tokio::spawn(flusher(Arc::downgrade(&link), flush));
    let reader = LinkReader::new(link.clone(), limit)?;
    Ok((link, reader))
}

/// Writes out what a full socket left in rustls's buffer, once the socket is writable.
async fn flusher(link: Weak<Link>, flush: Arc<tokio::sync::Notify>) {
    loop {
        // The link's last holder going away also ends this task: check on a timer too.
        tokio::select! {
            _ = flush.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        loop {
            let Some(l) = link.upgrade() else { return };
            let Io::Async { tokio, .. } = &l.io else { return };
            let pending = {
                let mut st = l.state.lock().expect("link state");
                if st.broken.is_some() {
                    return;
                }
                if let Err(e) = l.write_out(&mut st) {
                    st.broken.get_or_insert_with(|| e.to_string());
                    return;
                }
                st.tls.wants_write()
            };
            if !pending {
                break;
            }
            if tokio.writable().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Role, ca, tls};

    fn certs(dir: &std::path::Path) -> (crate::Identity, crate::Identity, crate::Identity) {
        ca::init(dir).unwrap();
        ca::issue(dir, Role::Staging, "stg").unwrap();
        ca::issue(dir, Role::Agent, "host").unwrap();
        ca::issue(dir, Role::Replica, "rep").unwrap();
        let l = |n| crate::Identity::load(dir, n).unwrap();
        (l("stg"), l("host"), l("rep"))
    }

    /// Echo server: answers every frame with an `Ack` carrying its sequence number.
    fn serve(id: &crate::Identity) -> SocketAddr {
        let cfg = tls::server_config(id, &[Role::Agent]).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let cfg = cfg.clone();
                std::thread::spawn(move || {
                    let Ok((link, mut r)) = accept(s.unwrap(), cfg, 4 << 20) else { return };
                    while let Ok(Some(f)) = r.next_blocking() {
                        if let Frame::Write { seq, volume_id, .. } = f {
                            link.send(&Frame::Ack { volume_id, seq, lsn: seq }).unwrap();
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_cross_both_ways_in_order_and_large_ones_survive_a_full_socket() {
        let dir = tempfile::tempdir().unwrap();
        let (stg, host, _) = certs(dir.path());
        let addr = serve(&stg);
        let (link, mut r) = connect(addr, tls::client_config(&host, Role::Staging).unwrap(), 1 << 20).await.unwrap();
        // 64 frames of 1 MiB: far more than the socket buffers hold, so the flusher runs.
        for seq in 1..=64u64 {
            let data = Bytes::from(vec![seq as u8; 1 << 20]);
            link.send(&Frame::Write { volume_id: 7, seq, epoch: 1, offset: 0, flags: 0, capture_unix: 0, data })
                .unwrap();
        }
        for seq in 1..=64u64 {
            match r.next().await.unwrap() {
                Some(Frame::Ack { seq: s, volume_id: 7, .. }) => assert_eq!(s, seq),
                other => panic!("expected Ack {seq}, got {other:?}"),
            }
        }
        link.shutdown();
        assert!(link.send(&Frame::StatusRequest).is_err(), "a shut link refuses sends");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_role_or_wrong_ca_is_refused_in_the_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let (stg, host, rep) = certs(dir.path());
        let addr = serve(&stg);
        // A replica certificate is not an agent: the server refuses it.
        let refused = async |cfg| match connect(addr, cfg, 1 << 20).await {
            Err(e) => e.to_string(),
            Ok((link, mut r)) => {
                // TLS 1.3: the client learns of a refused certificate on its first read.
                let _ = link.send(&Frame::StatusRequest);
                match r.next().await {
                    Err(e) => e.to_string(),
                    Ok(f) => panic!("refused peer got {f:?}"),
                }
            }
        };
        let e = refused(tls::client_config(&rep, Role::Staging).unwrap()).await;
        assert!(e.contains("TLS") || e.contains("closed") || e.contains("receive"), "{e}");
        // An agent expecting a replica refuses the staging server.
        let e = refused(tls::client_config(&host, Role::Replica).unwrap()).await;
        assert!(e.contains("role staging"), "{e}");
        // Another installation's CA: refused.
        let other = tempfile::tempdir().unwrap();
        let (_, stranger, _) = certs(other.path());
        let e = refused(tls::client_config(&stranger, Role::Staging).unwrap()).await;
        assert!(e.contains("CA") || e.contains("certificate") || e.contains("TLS"), "{e}");
    }

    #[test]
    fn a_truncated_or_oversized_frame_is_named() {
        let mut b = BytesMut::from(&Frame::StatusRequest.encode()[..10]);
        assert!(take_frame(&mut b, 1 << 20).unwrap().is_none(), "partial header waits for more");
        let big = Frame::Write {
            volume_id: 1,
            seq: 1,
            epoch: 1,
            offset: 0,
            flags: 0,
            capture_unix: 0,
            data: Bytes::from(vec![0; 4096]),
        };
        let mut b = BytesMut::from(&big.encode()[..]);
        let e = take_frame(&mut b, 1024).unwrap_err().to_string();
        assert!(e.contains("1024") || e.contains("limit"), "{e}");
    }
}
