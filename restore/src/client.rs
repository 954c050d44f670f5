//! A blocking NBD client for reading an export (the replica's export of the snapshot being
//! restored): the handshake and replies are `drv_proto::nbd`'s, this is the socket around them.
//! [`Source`] keeps a few connections, one request at a time on each (the export announces
//! `CAN_MULTI_CONN`, so reads on different connections see the same image).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use drv_proto::nbd::{self, ClientHandshake, ClientStep, Opened, Request};

/// One connection.
pub struct NbdClient {
    s: TcpStream,
    cookie: u64,
}

impl NbdClient {
    /// Connects to `addr` and opens export `name`.
    pub fn connect(addr: &str, name: &str) -> Result<(NbdClient, Opened), String> {
        let s = TcpStream::connect(addr).map_err(|e| format!("connect to the NBD export at {addr}: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        // A server that stops answering fails the read instead of hanging the restore.
        s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
        let mut c = NbdClient { s, cookie: 0 };
        (&c.s).write_all(&nbd::client_hello(name)).map_err(|e| format!("NBD handshake with {addr}: {e}"))?;
        let mut h = ClientHandshake::new();
        let mut buf = Vec::new();
        loop {
            match h.step(&buf) {
                ClientStep::Need(n) => {
                    let have = buf.len();
                    buf.resize(n, 0);
                    c.s.read_exact(&mut buf[have..]).map_err(|e| format!("NBD handshake with {addr}: {e}"))?;
                }
                ClientStep::Consumed(n) => drop(buf.drain(..n)),
                ClientStep::Open { opened, .. } => return Ok((c, opened)),
                ClientStep::Fail(why) => return Err(format!("NBD export {name} at {addr}: {why}")),
            }
        }
    }

    /// Reads `buf.len()` bytes (at most the protocol's request limit) at `offset`.
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Failed> {
        assert!(buf.len() <= nbd::REQUEST_LIMIT as usize, "an NBD read over the request limit");
        self.cookie += 1;
        let r = Request { flags: 0, command: nbd::cmd::READ, cookie: self.cookie, offset, length: buf.len() as u32 };
        self.s.write_all(&r.encode()).map_err(lost("read request"))?;
        let mut head = [0u8; 16];
        self.s.read_exact(&mut head).map_err(lost("read reply"))?;
        match nbd::decode_simple_reply(&head) {
            Some((0, cookie)) if cookie == self.cookie => self.s.read_exact(buf).map_err(lost("read data")),
            Some((errno, cookie)) if cookie == self.cookie => Err(Failed::Refused(format!(
                "the NBD server failed the read of {} bytes at {offset} (errno {errno})",
                buf.len()
            ))),
            _ => Err(Failed::Connection("the NBD server's reply is out of step".into())),
        }
    }
}

/// A connection error of `what`.
fn lost(what: &'static str) -> impl Fn(std::io::Error) -> Failed {
    move |e| Failed::Connection(format!("NBD {what}: {e}"))
}

/// Finds the export's address again (the replica asked anew, after a restart ended its export).
pub type Resolve = Box<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Connections to one export, opened as needed up to a bound; a broken one is dropped. A read
/// that fails on the connection (not one the server refuses) is tried again on a new one, the
/// address found anew by `resolve` when connecting fails, for up to `patience`: a replica that
/// restarts pauses the restore's reads instead of failing them.
pub struct Source {
    addr: Mutex<String>,
    name: String,
    pub size: u64,
    idle: Mutex<(Vec<NbdClient>, usize)>,
    freed: Condvar,
    limit: usize,
    resolve: Option<Resolve>,
    patience: Duration,
    /// Set when the restore stops: no more tries.
    cancelled: std::sync::atomic::AtomicBool,
    /// Reads are waiting for the export (said once when it begins, once when it ends).
    waiting: std::sync::atomic::AtomicBool,
}

impl Source {
    /// Opens the first connection (which checks the export is there and gives its size).
    pub fn open(addr: &str, name: &str, limit: usize) -> Result<Source, String> {
        let (c, opened) = NbdClient::connect(addr, name)?;
        Ok(Source {
            addr: Mutex::new(addr.to_owned()),
            name: name.to_owned(),
            size: opened.size,
            idle: Mutex::new((vec![c], 1)),
            freed: Condvar::new(),
            limit: limit.max(1),
            resolve: None,
            patience: Duration::ZERO,
            cancelled: std::sync::atomic::AtomicBool::new(false),
            waiting: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Reads that fail on the connection are tried again for up to `patience`, finding the
    /// export's address with `resolve` when connecting fails.
    pub fn with_retries(mut self, resolve: Resolve, patience: Duration) -> Source {
        self.resolve = Some(resolve);
        self.patience = patience;
        self
    }

    /// Reads failing from now on fail at once (the restore stops).
    pub fn cancel(&self) {
        self.cancelled.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Reads `buf.len()` bytes at `offset` (pieces of at most 32 MiB).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        for (i, part) in buf.chunks_mut(nbd::REQUEST_LIMIT as usize).enumerate() {
            self.read_one(offset + (i * nbd::REQUEST_LIMIT as usize) as u64, part)?;
        }
        Ok(())
    }

    fn read_one(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let start = std::time::Instant::now();
        let mut wait = Duration::from_millis(100);
        loop {
            match self.try_read(offset, buf) {
                Ok(()) => {
                    if self.waiting.swap(false, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!("the snapshot's export answers again");
                    }
                    return Ok(());
                }
                Err(Failed::Refused(e)) => return Err(e),
                Err(Failed::Connection(e))
                    if start.elapsed() >= self.patience
                        || self.cancelled.load(std::sync::atomic::Ordering::Relaxed) =>
                {
                    return Err(e);
                }
                Err(Failed::Connection(e)) => {
                    if !self.waiting.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!("reads of the snapshot wait for its export: {e}");
                    }
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn try_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Failed> {
        let mut c = self.take()?;
        let r = c.read(offset, buf);
        let mut g = self.idle.lock().expect("source");
        match &r {
            Ok(()) => g.0.push(c),
            // A connection that failed may be out of step: it goes.
            Err(_) => g.1 -= 1,
        }
        self.freed.notify_one();
        r
    }

    fn take(&self) -> Result<NbdClient, Failed> {
        let mut g = self.idle.lock().expect("source");
        loop {
            if let Some(c) = g.0.pop() {
                return Ok(c);
            }
            if g.1 < self.limit {
                g.1 += 1;
                drop(g);
                return self.connect().inspect_err(|_| self.idle.lock().expect("source").1 -= 1);
            }
            g = self.freed.wait(g).expect("source");
        }
    }

    /// A new connection; when it cannot be made, the address is found anew for the next one.
    fn connect(&self) -> Result<NbdClient, Failed> {
        let addr = self.addr.lock().expect("addr").clone();
        match NbdClient::connect(&addr, &self.name) {
            Ok((c, opened)) if opened.size == self.size => Ok(c),
            Ok((_, opened)) => Err(Failed::Refused(format!(
                "the export at {addr} has {} bytes now, {} before",
                opened.size, self.size
            ))),
            Err(e) => {
                if let Some(resolve) = &self.resolve {
                    match resolve() {
                        Ok(a) => *self.addr.lock().expect("addr") = a,
                        Err(r) => return Err(Failed::Connection(format!("{e}; asking for the export again: {r}"))),
                    }
                }
                Err(Failed::Connection(e))
            }
        }
    }
}

/// Why a read failed: the connection (worth another try), or the server's answer.
enum Failed {
    Connection(String),
    Refused(String),
}

impl From<Failed> for String {
    fn from(f: Failed) -> String {
        match f {
            Failed::Connection(e) | Failed::Refused(e) => e,
        }
    }
}
