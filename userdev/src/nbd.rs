//! An NBD server for any [`Image`]: the sockets around `drv_proto::nbd` (the protocol's rules,
//! I/O-free). The replica serves snapshots with it (`drv snapshot export`), `drv restore
//! --listen` the target it fills.
//!
//! One listener serves one export to at most [`CLIENTS_LIMIT`] clients. Each client has
//! [`WORKERS`] threads of its own, with blocking calls and no hand-off between threads on a
//! request's path: a worker takes the socket's read side, reads one request (and a write's
//! data), lets go, carries the request out and takes the write side for its reply (replies go in
//! the order requests finish; the cookie says which is which, as the protocol allows). So reads
//! from a cold disk overlap one another and the sending of other replies, as nbdkit's threads
//! do; and each client may read through an image of its own ([`Image::for_client`]: the replica
//! gives each a descriptor of the target, so the kernel's readahead follows each client's
//! sequential reads apart). The bytes of requests being served are bounded per listener ([`BYTES_IN_FLIGHT`]); a
//! client that stops reading replies holds only its own threads (each bounded by a write
//! timeout). Clients run in parallel (the export announces `CAN_MULTI_CONN`). Ending the
//! listener's task shuts every client's socket down.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use drv_proto::nbd::{self, Action, Export, Handshake, Refuse, Request, Step};
use tokio::net::TcpListener;

/// Clients of one export at once at most (more are closed at once).
pub const CLIENTS_LIMIT: usize = 16;
/// A client that takes no reply for this long is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests of one client carried out at once at most (its threads).
pub const WORKERS: usize = 16;
/// Bytes of the requests being carried out on one listener at most (reads' replies and writes'
/// data; a request waits for room). One request may be as large as `nbd::REQUEST_LIMIT`.
pub const BYTES_IN_FLIGHT: u64 = 256 << 20;
/// A worker's buffer grown past this by a large request is given back after its reply (so the
/// buffers kept between requests are at most `CLIENTS_LIMIT * WORKERS` MiB).
const KEEP_BUFFER: usize = 1 << 20;

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
    /// The image one client reads and writes, when it should not be this one: an image read
    /// from a file may give each client a descriptor of its own, so that the kernel's readahead
    /// follows each client's sequential reads apart. Writes through it reach the same image.
    fn for_client(&self) -> Option<Arc<dyn Image>> {
        None
    }
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
    let budget = Arc::new(Budget::default());
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
        let budget = budget.clone();
        let spawned = std::thread::Builder::new().name("nbd-client".into()).spawn(move || {
            if let Err(e) = serve(s, &export, &*image, &budget) {
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
fn serve(mut s: TcpStream, export: &Export, image: &dyn Image, budget: &Budget) -> Result<(), String> {
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
    let own = image.for_client();
    transmission(s, export, own.as_deref().unwrap_or(image), budget)
}

/// The bytes of the requests being carried out on one listener.
#[derive(Default)]
struct Budget {
    used: Mutex<u64>,
    freed: Condvar,
}

/// Room for one request's bytes, given back when dropped.
struct Room<'a>(&'a Budget, u64);

impl Budget {
    /// Waits until `n` more bytes fit (a request alone always does).
    fn take(&self, n: u64) -> Room<'_> {
        let mut used = self.used.lock().expect("budget");
        while *used > 0 && *used + n > BYTES_IN_FLIGHT {
            used = self.freed.wait(used).expect("budget");
        }
        *used += n;
        Room(self, n)
    }
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        *self.0.used.lock().expect("budget") -= self.1;
        self.0.freed.notify_all();
    }
}

/// What the workers of one client share.
struct Conn<'a> {
    /// The read side, and whether the client is done (it disconnected, or it failed).
    reader: Mutex<(TcpStream, bool)>,
    writer: Mutex<TcpStream>,
    /// The first error, which ends the connection.
    failed: Mutex<Option<String>>,
    export: &'a Export,
    image: &'a dyn Image,
    budget: &'a Budget,
}

impl Conn<'_> {
    /// Ends the connection for `e`: the first error is the one reported.
    fn fail(&self, e: String) {
        self.failed.lock().expect("failed").get_or_insert(e);
        // Wakes a worker blocked reading a request; replies being written fail.
        let _ = self.writer.lock().expect("writer").shutdown(std::net::Shutdown::Both);
    }

    fn reply(&self, bytes: &[u8]) -> Result<(), String> {
        self.writer.lock().expect("writer").write_all(bytes).map_err(|e| format!("reply: {e}"))
    }
}

/// The transmission phase, carried out by [`WORKERS`] threads, until the client disconnects
/// (every request read before its `DISC` is answered first) or breaks the protocol.
fn transmission(s: TcpStream, export: &Export, image: &dyn Image, budget: &Budget) -> Result<(), String> {
    let conn = Conn {
        reader: Mutex::new((s.try_clone().map_err(|e| e.to_string())?, false)),
        writer: Mutex::new(s),
        failed: Mutex::new(None),
        export,
        image,
        budget,
    };
    std::thread::scope(|scope| {
        for _ in 1..WORKERS {
            let spawned = std::thread::Builder::new().name("nbd-client".into()).spawn_scoped(scope, || worker(&conn));
            if let Err(e) = spawned {
                conn.fail(format!("a worker thread: {e}"));
            }
        }
        worker(&conn);
    });
    conn.failed.into_inner().expect("failed").map_or(Ok(()), Err)
}

/// One worker of a client: requests in turn with the others until the client is done. `buf`
/// holds a write's data, then a read's reply.
fn worker(conn: &Conn) {
    let mut buf = Vec::new();
    loop {
        let next = {
            let mut rd = conn.reader.lock().expect("reader");
            if rd.1 {
                return;
            }
            let next = next_request(conn, &mut rd.0, &mut buf);
            rd.1 = !matches!(next, Ok(Some(_)));
            next
        };
        let (cookie, action, room) = match next {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => return conn.fail(e),
        };
        let sent = match perform(conn.image, action, cookie, &mut buf) {
            Ok(()) => conn.reply(&buf),
            Err(e) => {
                tracing::error!(image = %conn.image.label(), export = %conn.export.name, ?action, "NBD request: {e}");
                conn.reply(&nbd::simple_reply(cookie, nbd::errno::EIO))
            }
        };
        drop(room);
        if let Err(e) = sent {
            return conn.fail(e);
        }
        if buf.capacity() > KEEP_BUFFER {
            buf = Vec::new();
        }
    }
}

/// A request to carry out, with room for its bytes.
type Next<'a> = Option<(u64, Action, Room<'a>)>;

/// Reads the next request to carry out (a write's data into `buf`), answering refused ones
/// itself; `None` at a disconnect.
fn next_request<'a>(conn: &Conn<'a>, s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Next<'a>, String> {
    let mut head = [0u8; nbd::REQUEST_LEN];
    loop {
        s.read_exact(&mut head).map_err(|e| format!("request: {e}"))?;
        let r = Request::decode(&head).ok_or("a request with the wrong magic")?;
        match nbd::check(&r, conn.export) {
            Ok(Action::Disconnect) => return Ok(None),
            Ok(action) => {
                let bytes = match action {
                    Action::Read { len, .. } | Action::Write { len, .. } => u64::from(len),
                    _ => 0,
                };
                let room = conn.budget.take(bytes);
                if let Action::Write { len, .. } = action {
                    buf.clear();
                    buf.resize(len as usize, 0);
                    s.read_exact(buf).map_err(|e| format!("write data: {e}"))?;
                }
                return Ok(Some((r.cookie, action, room)));
            }
            Err(Refuse::Error(errno)) => {
                if r.command == nbd::cmd::WRITE {
                    // Its data follows: read and drop it, to stay in step.
                    std::io::copy(&mut (&mut *s).take(u64::from(r.length)), &mut std::io::sink())
                        .map_err(|e| e.to_string())?;
                }
                conn.reply(&nbd::simple_reply(r.cookie, errno))?;
            }
            Err(Refuse::Close) => return Err(format!("a write of {} bytes (over the limit)", r.length)),
        }
    }
}

/// Carries out a checked request on the image and leaves its reply in `buf`, where a WRITE's
/// data came in (a READ's reply: the header, then the data, read in place; `buf` is resized, not
/// cleared, so a buffer as large as the last reply is not zeroed again).
fn perform(image: &dyn Image, action: Action, cookie: u64, buf: &mut Vec<u8>) -> Result<(), String> {
    match action {
        Action::Read { offset, len } => {
            buf.resize(16 + len as usize, 0);
            buf[..16].copy_from_slice(&nbd::simple_reply(cookie, 0));
            return image.read(offset, &mut buf[16..]);
        }
        Action::Write { offset, fua, .. } => {
            image.write(offset, buf)?;
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
    buf.clear();
    buf.extend_from_slice(&nbd::simple_reply(cookie, 0));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use drv_proto::nbd::{ClientHandshake, ClientStep, cmd};

    /// An image in memory; a read at `slow` takes a while. Each client gets a view of its own
    /// (as the replica gives each a descriptor of its own), counted in `clients`.
    struct Mem {
        bytes: Arc<Mutex<Vec<u8>>>,
        slow: u64,
        clients: Arc<AtomicUsize>,
        own: bool,
    }

    impl Image for Mem {
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
            assert!(self.own, "a client reads through its own view");
            if offset == self.slow {
                std::thread::sleep(Duration::from_millis(300));
            }
            buf.copy_from_slice(&self.bytes.lock().unwrap()[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), String> {
            self.bytes.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn flush(&self) -> Result<(), String> {
            Ok(())
        }
        fn label(&self) -> String {
            "mem".into()
        }
        fn for_client(&self) -> Option<Arc<dyn Image>> {
            self.clients.fetch_add(1, Ordering::SeqCst);
            let (bytes, clients) = (self.bytes.clone(), self.clients.clone());
            Some(Arc::new(Mem { bytes, slow: self.slow, clients, own: true }))
        }
    }

    const SIZE: u64 = 1 << 20;

    fn serve(slow: u64) -> (tokio::runtime::Runtime, String, Arc<Mem>) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let bytes = Arc::new(Mutex::new((0..SIZE).map(|i| (i * 7 % 251) as u8).collect()));
        let image = Arc::new(Mem { bytes, slow, clients: Arc::default(), own: false });
        let export = Export { name: "e".into(), size: SIZE, writable: true, description: String::new() };
        rt.spawn(serve_listener(listener, export, image.clone()));
        (rt, addr, image)
    }

    fn open(addr: &str) -> TcpStream {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&nbd::client_hello("e")).unwrap();
        let (mut h, mut buf) = (ClientHandshake::new(), Vec::new());
        loop {
            match h.step(&buf) {
                ClientStep::Need(n) => {
                    let have = buf.len();
                    buf.resize(n, 0);
                    s.read_exact(&mut buf[have..]).unwrap();
                }
                ClientStep::Consumed(n) => drop(buf.drain(..n)),
                ClientStep::Open { .. } => return s,
                ClientStep::Fail(why) => panic!("{why}"),
            }
        }
    }

    fn request(command: u16, cookie: u64, offset: u64, length: u32) -> [u8; nbd::REQUEST_LEN] {
        Request { flags: 0, command, cookie, offset, length }.encode()
    }

    /// Replies in the order they come: (cookie, errno, a read's data).
    fn replies(s: &mut TcpStream, reads: &std::collections::HashMap<u64, u32>) -> Vec<(u64, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut head = [0u8; 16];
        while s.read_exact(&mut head).is_ok() {
            let (errno, cookie) = nbd::decode_simple_reply(&head).expect("a simple reply");
            let mut data = vec![0u8; if errno == 0 { reads.get(&cookie).copied().unwrap_or(0) as usize } else { 0 }];
            s.read_exact(&mut data).unwrap();
            out.push((cookie, errno, data));
        }
        out
    }

    /// Requests sent together are carried out at once (a slow read does not hold up the ones
    /// behind it), each answered once, every one read before the disconnect before the server
    /// closes; writes land, reads see the image.
    #[test]
    fn pipelined_requests_are_all_answered_before_a_disconnect() {
        let (_rt, addr, image) = serve(0);
        let want = image.bytes.lock().unwrap().clone();
        let mut s = open(&addr);
        let (mut batch, mut reads) = (Vec::new(), std::collections::HashMap::new());
        for i in 0..16u64 {
            let at = i * 65_536;
            batch.extend_from_slice(&request(cmd::READ, 100 + i, at, 4096));
            reads.insert(100 + i, 4096);
            batch.extend_from_slice(&request(cmd::WRITE, 200 + i, at + 32_768, 512));
            batch.extend_from_slice(&[i as u8 + 1; 512]);
        }
        batch.extend_from_slice(&request(cmd::FLUSH, 300, 0, 0));
        batch.extend_from_slice(&request(cmd::DISC, 301, 0, 0));
        s.write_all(&batch).unwrap();
        let got = replies(&mut s, &reads);
        let mut cookies: Vec<u64> = got.iter().map(|r| r.0).collect();
        cookies.sort();
        let mut expected: Vec<u64> = (100..116).chain(200..216).chain([300]).collect();
        expected.sort();
        assert_eq!(cookies, expected, "every request answered once, the DISC not at all");
        assert!(got.iter().all(|r| r.1 == 0), "no errors: {:?}", got.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>());
        // The slow read at offset 0 (cookie 100) was overtaken.
        assert_ne!(got[0].0, 100, "the first reply is not the slow read's");
        for (cookie, _, data) in &got {
            if (100..116).contains(cookie) {
                let at = ((cookie - 100) * 65_536) as usize;
                assert_eq!(data[..], want[at..at + 4096], "read {cookie}");
            }
        }
        assert_eq!(image.clients.load(Ordering::SeqCst), 1, "the client had a view of its own");
        let now = image.bytes.lock().unwrap();
        for i in 0..16usize {
            let at = i * 65_536 + 32_768;
            assert!(now[at..at + 512].iter().all(|&b| b == i as u8 + 1), "write {i}");
        }
    }

    /// A client that breaks the protocol with requests in flight loses its connection; the
    /// others are served on.
    #[test]
    fn a_broken_client_ends_alone() {
        let (_rt, addr, _image) = serve(u64::MAX);
        let mut bad = open(&addr);
        let mut good = open(&addr);
        let mut batch = request(cmd::READ, 1, 0, 4096).to_vec();
        batch.extend_from_slice(&[0xAB; nbd::REQUEST_LEN]);
        bad.write_all(&batch).unwrap();
        let got = replies(&mut bad, &[(1, 4096)].into());
        assert!(got.len() <= 1, "at most the read before the junk is answered: {got:?}");
        good.write_all(&request(cmd::READ, 7, 4096, 512)).unwrap();
        good.write_all(&request(cmd::DISC, 8, 0, 0)).unwrap();
        let got = replies(&mut good, &[(7, 512)].into());
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0, got[0].1), (7, 0));
    }

    /// Room for requests' bytes: a request waits until it fits, and one alone always fits.
    #[test]
    fn the_bytes_in_flight_are_bounded() {
        let budget = Arc::new(Budget::default());
        let big = budget.take(BYTES_IN_FLIGHT - 1);
        let b = budget.clone();
        let waiter = std::thread::spawn(move || drop(b.take(2)));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished(), "a request over the bound waits");
        drop(big);
        waiter.join().unwrap();
        drop(budget.take(BYTES_IN_FLIGHT * 2));
        assert_eq!(*budget.used.lock().unwrap(), 0);
    }
}
