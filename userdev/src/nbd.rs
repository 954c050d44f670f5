//! An NBD server for any [`Image`]: the tokio and TCP shell around `drv_proto::nbd` (the
//! protocol's rules, I/O-free). The replica serves snapshots with it (`drv snapshot export`),
//! `drv restore --listen` the target it fills. One listener serves one export to at most
//! [`CLIENTS_LIMIT`] clients; each request runs on the blocking pool.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use drv_proto::nbd::{self, Action, Export, Handshake, Refuse, Request, Step};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Clients of one export at once at most (more are closed at once).
pub const CLIENTS_LIMIT: usize = 16;

/// What an export serves. Calls are blocking (they run on the blocking pool) and never reach
/// past the export's size; the write calls only come for a writable export.
pub trait Image: Send + Sync + 'static {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), String>;
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), String>;
    /// Makes every write answered so far durable.
    fn flush(&self) -> Result<(), String>;
    /// For the log.
    fn label(&self) -> String;
}

/// Serves `export` on `listener` until the task is aborted (which disconnects every client).
pub async fn serve_listener(listener: TcpListener, export: Export, image: Arc<dyn Image>) {
    let clients = Arc::new(AtomicUsize::new(0));
    // The connection tasks end with the listener's.
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        if clients.load(Ordering::Relaxed) >= CLIENTS_LIMIT {
            tracing::warn!(%peer, export = %export.name, "NBD client refused: {CLIENTS_LIMIT} are connected");
            continue;
        }
        clients.fetch_add(1, Ordering::Relaxed);
        let (export, image, clients) = (export.clone(), image.clone(), clients.clone());
        tasks.spawn(async move {
            if let Err(e) = serve(stream, &export, image).await {
                tracing::info!(%peer, export = %export.name, "NBD client: {e}");
            }
            clients.fetch_sub(1, Ordering::Relaxed);
        });
        while tasks.try_join_next().is_some() {}
    }
}

/// One client: the handshake, then requests until it disconnects or breaks the protocol.
async fn serve(mut s: TcpStream, export: &Export, image: Arc<dyn Image>) -> Result<(), String> {
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.write_all(&nbd::greeting()).await.map_err(|e| e.to_string())?;
    let exports = std::slice::from_ref(export);
    let mut h = Handshake::new();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        match h.step(&buf, exports) {
            Step::Need(n) => {
                let have = buf.len();
                buf.resize(n, 0);
                s.read_exact(&mut buf[have..]).await.map_err(|e| format!("handshake: {e}"))?;
            }
            Step::Reply { consumed, reply } => {
                s.write_all(&reply).await.map_err(|e| e.to_string())?;
                buf.drain(..consumed);
            }
            Step::Go { reply, .. } => {
                s.write_all(&reply).await.map_err(|e| e.to_string())?;
                break;
            }
            Step::Close { reply, why } => {
                let _ = s.write_all(&reply).await;
                return why.map_or(Ok(()), Err);
            }
        }
    }
    transmission(s, export, image).await
}

async fn transmission(mut s: TcpStream, export: &Export, image: Arc<dyn Image>) -> Result<(), String> {
    let mut head = [0u8; nbd::REQUEST_LEN];
    loop {
        s.read_exact(&mut head).await.map_err(|e| format!("request: {e}"))?;
        let r = Request::decode(&head).ok_or("a request with the wrong magic")?;
        let action = match nbd::check(&r, export) {
            Ok(Action::Disconnect) => return Ok(()),
            Ok(a) => a,
            Err(Refuse::Error(errno)) => {
                if r.command == nbd::cmd::WRITE {
                    // Its data follows: read and drop it, to stay in step.
                    let mut skip = (&mut s).take(u64::from(r.length));
                    tokio::io::copy(&mut skip, &mut tokio::io::sink()).await.map_err(|e| e.to_string())?;
                }
                s.write_all(&nbd::simple_reply(r.cookie, errno)).await.map_err(|e| e.to_string())?;
                continue;
            }
            Err(Refuse::Close) => return Err(format!("a write of {} bytes (over the limit)", r.length)),
        };
        let data = match action {
            Action::Write { len, .. } => {
                let mut b = vec![0u8; len as usize];
                s.read_exact(&mut b).await.map_err(|e| format!("write data: {e}"))?;
                b
            }
            _ => Vec::new(),
        };
        let img = image.clone();
        let done =
            tokio::task::spawn_blocking(move || perform(&*img, action, data)).await.map_err(|e| e.to_string())?;
        match done {
            Ok(out) => {
                s.write_all(&nbd::simple_reply(r.cookie, 0)).await.map_err(|e| e.to_string())?;
                s.write_all(&out).await.map_err(|e| e.to_string())?;
            }
            Err(e) => {
                tracing::error!(image = %image.label(), export = %export.name, ?action, "NBD request: {e}");
                s.write_all(&nbd::simple_reply(r.cookie, nbd::errno::EIO)).await.map_err(|e| e.to_string())?;
            }
        }
    }
}

/// Carries out a checked request on the image (on the blocking pool): a READ's data.
fn perform(image: &dyn Image, action: Action, data: Vec<u8>) -> Result<Vec<u8>, String> {
    match action {
        Action::Read { offset, len } => {
            let mut b = vec![0u8; len as usize];
            image.read(offset, &mut b)?;
            Ok(b)
        }
        Action::Write { offset, fua, .. } => {
            image.write(offset, &data)?;
            if fua {
                image.flush()?
            }
            Ok(Vec::new())
        }
        Action::WriteZeroes { offset, len, fua } => {
            image.write_zeroes(offset, u64::from(len))?;
            if fua {
                image.flush()?
            }
            Ok(Vec::new())
        }
        Action::Flush => image.flush().map(|()| Vec::new()),
        // A TRIM is advice a server may ignore.
        Action::Trim { .. } | Action::Disconnect => Ok(Vec::new()),
    }
}
