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
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        assert!(buf.len() <= nbd::REQUEST_LIMIT as usize, "an NBD read over the request limit");
        self.cookie += 1;
        let r = Request { flags: 0, command: nbd::cmd::READ, cookie: self.cookie, offset, length: buf.len() as u32 };
        self.s.write_all(&r.encode()).map_err(|e| format!("NBD read request: {e}"))?;
        let mut head = [0u8; 16];
        self.s.read_exact(&mut head).map_err(|e| format!("NBD read reply: {e}"))?;
        match nbd::decode_simple_reply(&head) {
            Some((0, cookie)) if cookie == self.cookie => {
                self.s.read_exact(buf).map_err(|e| format!("NBD read data: {e}"))
            }
            Some((errno, cookie)) if cookie == self.cookie => {
                Err(format!("the NBD server failed the read of {} bytes at {offset} (errno {errno})", buf.len()))
            }
            _ => Err("the NBD server's reply is out of step".into()),
        }
    }
}

/// Connections to one export, opened as needed up to a bound; a broken one is dropped.
pub struct Source {
    addr: String,
    name: String,
    pub size: u64,
    idle: Mutex<(Vec<NbdClient>, usize)>,
    freed: Condvar,
    limit: usize,
}

impl Source {
    /// Opens the first connection (which checks the export is there and gives its size).
    pub fn open(addr: &str, name: &str, limit: usize) -> Result<Source, String> {
        let (c, opened) = NbdClient::connect(addr, name)?;
        Ok(Source {
            addr: addr.to_owned(),
            name: name.to_owned(),
            size: opened.size,
            idle: Mutex::new((vec![c], 1)),
            freed: Condvar::new(),
            limit: limit.max(1),
        })
    }

    /// Reads `buf.len()` bytes at `offset` (pieces of at most 32 MiB).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        for (i, part) in buf.chunks_mut(nbd::REQUEST_LIMIT as usize).enumerate() {
            self.read_one(offset + (i * nbd::REQUEST_LIMIT as usize) as u64, part)?;
        }
        Ok(())
    }

    fn read_one(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let mut c = self.take()?;
        let r = c.read(offset, buf);
        let mut g = self.idle.lock().expect("source");
        match r {
            Ok(()) => g.0.push(c),
            // A connection that failed may be out of step: it goes.
            Err(_) => g.1 -= 1,
        }
        self.freed.notify_one();
        r
    }

    fn take(&self) -> Result<NbdClient, String> {
        let mut g = self.idle.lock().expect("source");
        loop {
            if let Some(c) = g.0.pop() {
                return Ok(c);
            }
            if g.1 < self.limit {
                g.1 += 1;
                drop(g);
                return NbdClient::connect(&self.addr, &self.name).map(|(c, _)| c).inspect_err(|_| {
                    self.idle.lock().expect("source").1 -= 1;
                });
            }
            g = self.freed.wait(g).expect("source");
        }
    }
}
