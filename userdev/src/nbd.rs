//! An NBD server for any [`Image`]: the sockets around `drv_proto::nbd` (the protocol's rules,
//! I/O-free). The replica serves snapshots with it (`drv snapshot export`), `drv restore
//! --listen` the target it fills.
//!
//! One listener serves one export to at most [`CLIENTS_LIMIT`] clients. Each client has a thread
//! of its own that reads a request, carries it out and writes the reply, with blocking calls:
//! no hand-off between threads on a request's path (on a small host each costs more than a read
//! from the page cache), and a client that stops reading replies holds only its own thread
//! (bounded by a write timeout) and no memory. Clients run in parallel (the export announces
//! `CAN_MULTI_CONN`). Ending the listener's task shuts every client's socket down.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drv_proto::nbd::{self, Action, Export, Handshake, Refuse, Request, Step};
use tokio::net::TcpListener;

/// Clients of one export at once at most (more are closed at once).
pub const CLIENTS_LIMIT: usize = 16;
/// A client that takes no reply for this long is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// What an export serves. Calls are blocking and never reach past the export's size; the write
/// calls only come for a writable export.
pub trait Image: Send + Sync + 'static {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), String>;
    /// Writes `len` zero bytes at `offset` (by default as writes of at most 1 MiB).
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), String> {
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64);
            self.write(offset + done, &zeroes[..n as usize])?;
            done += n;
        }
        Ok(())
    }
    /// Makes every write answered so far durable.
    fn flush(&self) -> Result<(), String>;
    /// For the log.
    fn label(&self) -> String;
}

/// The sockets of the connected clients, shut down when the listener's task ends.
#[derive(Default)]
struct Clients(Mutex<Vec<(u64, TcpStream)>>);

struct ShutDownOnDrop(Arc<Clients>);

impl Drop for ShutDownOnDrop {
    fn drop(&mut self) {
        for (_, s) in self.0.0.lock().expect("clients").drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Serves `export` on `listener` until the task is aborted (which disconnects every client).
pub async fn serve_listener(listener: TcpListener, export: Export, image: Arc<dyn Image>) {
    let clients = Arc::new(Clients::default());
    let _guard = ShutDownOnDrop(clients.clone());
    let count = Arc::new(AtomicUsize::new(0));
    let mut next_id = 0u64;
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        if count.load(Ordering::Relaxed) >= CLIENTS_LIMIT {
            tracing::warn!(%peer, export = %export.name, "NBD client refused: {CLIENTS_LIMIT} are connected");
            continue;
        }
        let Ok(s) = stream.into_std().and_then(|s| s.set_nonblocking(false).map(|()| s)) else { continue };
        let Ok(shut) = s.try_clone() else { continue };
        next_id += 1;
        let id = next_id;
        clients.0.lock().expect("clients").push((id, shut));
        count.fetch_add(1, Ordering::Relaxed);
        let (export, image, clients, count) = (export.clone(), image.clone(), clients.clone(), count.clone());
        let spawned = std::thread::Builder::new().name("nbd-client".into()).spawn(move || {
            if let Err(e) = serve(s, &export, &*image) {
                tracing::info!(%peer, export = %export.name, "NBD client: {e}");
            }
            clients.0.lock().expect("clients").retain(|(i, _)| *i != id);
            count.fetch_sub(1, Ordering::Relaxed);
        });
        if let Err(e) = spawned {
            tracing::error!(%peer, "NBD client thread: {e}");
        }
    }
}

/// One client: the handshake, then requests until it disconnects or breaks the protocol.
fn serve(mut s: TcpStream, export: &Export, image: &dyn Image) -> Result<(), String> {
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(|e| e.to_string())?;
    s.write_all(&nbd::greeting()).map_err(|e| e.to_string())?;
    let exports = std::slice::from_ref(export);
    let mut h = Handshake::new();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        match h.step(&buf, exports) {
            Step::Need(n) => {
                let have = buf.len();
                buf.resize(n, 0);
                s.read_exact(&mut buf[have..]).map_err(|e| format!("handshake: {e}"))?;
            }
            Step::Reply { consumed, reply } => {
                s.write_all(&reply).map_err(|e| e.to_string())?;
                buf.drain(..consumed);
            }
            Step::Go { reply, .. } => {
                s.write_all(&reply).map_err(|e| e.to_string())?;
                break;
            }
            Step::Close { reply, why } => {
                let _ = s.write_all(&reply);
                return why.map_or(Ok(()), Err);
            }
        }
    }
    transmission(s, export, image)
}

fn transmission(mut s: TcpStream, export: &Export, image: &dyn Image) -> Result<(), String> {
    let mut head = [0u8; nbd::REQUEST_LEN];
    let mut out: Vec<u8> = Vec::new();
    loop {
        s.read_exact(&mut head).map_err(|e| format!("request: {e}"))?;
        let r = Request::decode(&head).ok_or("a request with the wrong magic")?;
        let action = match nbd::check(&r, export) {
            Ok(Action::Disconnect) => return Ok(()),
            Ok(a) => a,
            Err(Refuse::Error(errno)) => {
                if r.command == nbd::cmd::WRITE {
                    // Its data follows: read and drop it, to stay in step.
                    std::io::copy(&mut (&mut s).take(u64::from(r.length)), &mut std::io::sink())
                        .map_err(|e| e.to_string())?;
                }
                s.write_all(&nbd::simple_reply(r.cookie, errno)).map_err(|e| e.to_string())?;
                continue;
            }
            Err(Refuse::Close) => return Err(format!("a write of {} bytes (over the limit)", r.length)),
        };
        let data = match action {
            Action::Write { len, .. } => {
                let mut b = vec![0u8; len as usize];
                s.read_exact(&mut b).map_err(|e| format!("write data: {e}"))?;
                b
            }
            _ => Vec::new(),
        };
        if let Err(e) = perform(image, action, r.cookie, &data, &mut out) {
            tracing::error!(image = %image.label(), export = %export.name, ?action, "NBD request: {e}");
            out.clear();
            out.extend_from_slice(&nbd::simple_reply(r.cookie, nbd::errno::EIO));
        }
        s.write_all(&out).map_err(|e| e.to_string())?;
    }
}

/// Carries out a checked request on the image: its whole reply in `out` (a READ's data after
/// the header; the buffer is reused from request to request).
fn perform(image: &dyn Image, action: Action, cookie: u64, data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    // Resized, not cleared: a buffer as large as the last reply is not zeroed again.
    let len = match action {
        Action::Read { len, .. } => len as usize,
        _ => 0,
    };
    out.resize(16 + len, 0);
    out[..16].copy_from_slice(&nbd::simple_reply(cookie, 0));
    match action {
        Action::Read { offset, .. } => image.read(offset, &mut out[16..])?,
        Action::Write { offset, fua, .. } => {
            image.write(offset, data)?;
            if fua {
                image.flush()?
            }
        }
        Action::WriteZeroes { offset, len, fua } => {
            image.write_zeroes(offset, u64::from(len))?;
            if fua {
                image.flush()?
            }
        }
        Action::Flush => image.flush()?,
        // A TRIM is advice a server may ignore.
        Action::Trim { .. } | Action::Disconnect => {}
    }
    Ok(())
}
