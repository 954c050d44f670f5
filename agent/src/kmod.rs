//! The kernel-module capture path: `/dev/drvN` devices of the `drv_capture` module
//! (`capture-kmod/`), whose every write is held in the kernel until this agent releases it.
//!
//! The module's interface is `capture-kmod/drv_capture.h`; the structs here mirror it (sizes and
//! offsets asserted at compile time, as the header asserts them on its side). [`capture`] is the
//! loop that feeds the held writes to an [`Agent`]: each write goes to staging through
//! [`Agent::write_with`], whose local step releases it to the backing device and waits for the
//! module's DONE message.
//!
//! Order: the module queues a write's DONE before it completes the write to the application, so
//! a DONE precedes every write submitted after that completion. DONEs are numbered as read; a
//! write read after DONE k waits (in its task, not holding up the reader) until the agent has
//! completed the writes of DONEs 1..=k: a write the application issued after another completed is
//! issued to the agent after that completion, and so gets a later epoch (the rule in
//! ARCHITECTURE.md).
//!
//! The agent gone (crash, close) or too slow (the module's hold timeout): the module releases
//! what it holds, marks it in its dirty bitmap and passes later writes through, marked. The next
//! attach takes (and clears) that bitmap and resyncs it: [`capture`] does so at start and after
//! every hold timeout.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use drv_format::record::Flags;
use tokio::sync::oneshot;

use crate::Agent;

pub const CTL_PATH: &str = "/dev/drv-ctl";

pub mod attach;

pub use attach::{ATTACH_MARKER, AttachState, FULL_RESYNC_MARKER, Recovery, attach_device, recovery};

const KMSG_MAGIC: u32 = 0x4b56_5244;
const ABI_VERSION: u16 = 2;
/// Devices the module keeps at most (`DRV_MAX_DEVICES`).
pub const MAX_DEVICES: u32 = 64;
const NAME_LEN: usize = 64;
const PATH_LEN: usize = 256;
/// The largest held write (the device's `max_hw_sectors`).
pub const MAX_WRITE_BYTES: usize = 1 << 20;
const KMSG_WRITE: u16 = 1;
const KMSG_DONE: u16 = 2;
const F_FLUSH: u32 = 0x1;
const F_FUA: u32 = 0x2;

/// `struct drv_kmsg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct KMsg {
    magic: u32,
    version: u16,
    kind: u16,
    seq: u64,
    offset: u64,
    length: u32,
    flags: u32,
    status: i32,
    reserved0: u32,
    reserved1: u64,
}

/// `struct drv_kack`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct KAck {
    seq: u64,
    verdict: i32,
    reserved: u32,
}

/// `struct drv_create`.
#[repr(C)]
struct Create {
    backing: [u8; PATH_LEN],
    name: [u8; NAME_LEN],
    dirty_block_bytes: u32,
    index: u32,
    size_bytes: u64,
}

/// `struct drv_info`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawInfo {
    index: u32,
    mode: u32,
    name: [u8; NAME_LEN],
    backing: [u8; PATH_LEN],
    size_bytes: u64,
    next_seq: u64,
    held_writes: u64,
    held_bytes: u64,
    dirty_blocks: u64,
    dirty_block_bytes: u32,
    timeouts: u32,
    flush_writes: u64,
    fua_writes: u64,
}

/// `struct drv_dirty`.
#[repr(C)]
#[derive(Default)]
struct Dirty {
    bitmap: u64,
    bitmap_bytes: u64,
    blocks: u64,
    dirty_blocks: u64,
    block_bytes: u32,
    reserved: u32,
}

const _: () = {
    assert!(std::mem::size_of::<KMsg>() == 48);
    assert!(std::mem::offset_of!(KMsg, seq) == 8);
    assert!(std::mem::offset_of!(KMsg, length) == 24);
    assert!(std::mem::offset_of!(KMsg, status) == 32);
    assert!(std::mem::size_of::<KAck>() == 16);
    assert!(std::mem::size_of::<Create>() == 336);
    assert!(std::mem::offset_of!(Create, index) == 324);
    assert!(std::mem::size_of::<RawInfo>() == 392);
    assert!(std::mem::offset_of!(RawInfo, flush_writes) == 376);
    assert!(std::mem::offset_of!(RawInfo, size_bytes) == 328);
    assert!(std::mem::size_of::<Dirty>() == 40);
};

/// `_IOC(dir, 0xd7, nr, size)` as `asm-generic/ioctl.h` builds it.
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xd7 << 8) | nr
}
const W: u64 = 1;
const R: u64 = 2;
const IOC_CREATE: u64 = ioc(R | W, 1, std::mem::size_of::<Create>());
const IOC_REMOVE: u64 = ioc(W, 2, 4);
const IOC_INFO: u64 = ioc(R | W, 3, std::mem::size_of::<RawInfo>());
const IOC_ATTACH: u64 = ioc(W, 4, 4);
const IOC_TAKE_DIRTY: u64 = ioc(R | W, 5, std::mem::size_of::<Dirty>());

#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    #[error("{CTL_PATH} is missing: the drv_capture kernel module is not loaded (modprobe drv_capture)")]
    NotLoaded,
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error("device {name} already exists over {existing}, not over {asked}")]
    OtherBacking { name: String, existing: String, asked: String },
    #[error("{what}: name or path over {max} bytes")]
    TooLong { what: String, max: usize },
    #[error("malformed message from the module at byte {at} of a read: {reason}")]
    Malformed { at: usize, reason: String },
}

fn cstr<const N: usize>(what: &str, s: &str) -> Result<[u8; N], KmodError> {
    let mut b = [0u8; N];
    if s.len() >= N || s.contains('\0') {
        return Err(KmodError::TooLong { what: what.to_owned(), max: N - 1 });
    }
    b[..s.len()].copy_from_slice(s.as_bytes());
    Ok(b)
}

fn from_cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// A device's state as the module reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceInfo {
    pub index: u32,
    pub name: String,
    pub backing: String,
    /// `false`: pass-through (no agent attached), writes marked dirty.
    pub holding: bool,
    pub size_bytes: u64,
    pub next_seq: u64,
    pub held_writes: u64,
    pub held_bytes: u64,
    pub dirty_blocks: u64,
    pub dirty_block_bytes: u32,
    pub timeouts: u32,
    /// Writes with FLUSH (REQ_PREFLUSH) and with FUA the device has seen.
    pub flush_writes: u64,
    pub fua_writes: u64,
}

impl DeviceInfo {
    pub fn path(&self) -> String {
        format!("/dev/drv{}", self.index)
    }
}

/// An open `/dev/drv-ctl`: creates, finds and removes devices; attached, the channel of one.
pub struct Control {
    file: File,
}

impl Control {
    pub fn open() -> Result<Control, KmodError> {
        Self::open_at(Path::new(CTL_PATH))
    }

    pub fn open_at(path: &Path) -> Result<Control, KmodError> {
        match std::fs::OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => Ok(Control { file }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(KmodError::NotLoaded),
            Err(err) => Err(KmodError::Io { what: format!("open {}", path.display()), err }),
        }
    }

    fn ioctl<T>(&self, what: &str, req: u64, arg: *mut T) -> Result<(), KmodError> {
        // SAFETY: `arg` points to a live value of the type the request expects (see the header).
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), req as _, arg) };
        if r < 0 {
            return Err(KmodError::Io { what: what.to_owned(), err: std::io::Error::last_os_error() });
        }
        Ok(())
    }

    /// The device named `name`, if it exists.
    pub fn find(&self, name: &str) -> Result<Option<DeviceInfo>, KmodError> {
        // SAFETY: all-zero is a valid RawInfo (integers and byte arrays).
        let mut raw: RawInfo = unsafe { std::mem::zeroed() };
        raw.name = cstr("device name", name)?;
        match self.ioctl(&format!("look up device {name}"), IOC_INFO, &mut raw) {
            Ok(()) => Ok(Some(info(&raw))),
            Err(KmodError::Io { err, .. }) if err.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every device the module has, by index.
    pub fn list(&self) -> Result<Vec<DeviceInfo>, KmodError> {
        let mut all = Vec::new();
        for index in 0..MAX_DEVICES {
            match self.info(index) {
                Ok(d) => all.push(d),
                Err(KmodError::Io { err, .. }) if err.raw_os_error() == Some(libc::ENODEV) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(all)
    }

    pub fn info(&self, index: u32) -> Result<DeviceInfo, KmodError> {
        // SAFETY: as in `find`.
        let mut raw: RawInfo = unsafe { std::mem::zeroed() };
        raw.index = index;
        self.ioctl(&format!("state of /dev/drv{index}"), IOC_INFO, &mut raw)?;
        Ok(info(&raw))
    }

    /// The device `name` over `backing`: the existing one (an agent restarting), or a new one
    /// (`true`).
    pub fn create_or_find(
        &self,
        name: &str,
        backing: &Path,
        dirty_block_bytes: u32,
    ) -> Result<(DeviceInfo, bool), KmodError> {
        let asked = backing.display().to_string();
        if let Some(d) = self.find(name)? {
            let same = |a: &str, b: &str| {
                a == b || std::fs::canonicalize(a).ok().zip(std::fs::canonicalize(b).ok()).is_some_and(|(x, y)| x == y)
            };
            if !same(&d.backing, &asked) {
                return Err(KmodError::OtherBacking { name: name.to_owned(), existing: d.backing, asked });
            }
            return Ok((d, false));
        }
        let mut c = Create {
            backing: cstr("backing device path", &asked)?,
            name: cstr("device name", name)?,
            dirty_block_bytes,
            index: 0,
            size_bytes: 0,
        };
        self.ioctl(&format!("create a drv device named {name} over {asked}"), IOC_CREATE, &mut c)?;
        Ok((self.info(c.index)?, true))
    }

    /// Removes `/dev/drvN` (refused while it is open, e.g. mounted, or an agent is attached).
    pub fn remove(&self, index: u32) -> Result<(), KmodError> {
        let mut i = index;
        self.ioctl(&format!("remove /dev/drv{index}"), IOC_REMOVE, &mut i)
    }

    /// Makes this channel the agent of `/dev/drvN`: its writes are held from now on.
    pub fn attach(&self, index: u32) -> Result<(), KmodError> {
        let mut i = index;
        self.ioctl(&format!("attach to /dev/drv{index}"), IOC_ATTACH, &mut i)
    }

    /// Takes (and clears) the dirty bitmap of `/dev/drv{index}` (this channel must be attached):
    /// the byte ranges written while no agent held them, merged where adjacent, clipped to
    /// `limit` bytes.
    pub fn take_dirty(&self, index: u32, limit: u64) -> Result<Vec<(u64, u64)>, KmodError> {
        let i = self.info(index)?;
        let blocks = i.size_bytes.div_ceil(i.dirty_block_bytes.max(1) as u64);
        let mut buf = vec![0u8; blocks.div_ceil(8) as usize];
        let mut d = Dirty { bitmap: buf.as_mut_ptr() as u64, bitmap_bytes: buf.len() as u64, ..Dirty::default() };
        self.ioctl(&format!("take the dirty bitmap of /dev/drv{index}"), IOC_TAKE_DIRTY, &mut d)?;
        Ok(bitmap_ranges(&buf, d.blocks.min(blocks), d.block_bytes as u64, limit))
    }
}

/// The byte ranges of the set bits of `bitmap` (bit i: byte i/8, bit i%8; block i covers
/// `[i*block_bytes, (i+1)*block_bytes)`), adjacent ones merged, clipped to `limit`.
fn bitmap_ranges(bitmap: &[u8], blocks: u64, block_bytes: u64, limit: u64) -> Vec<(u64, u64)> {
    drv_changemap::extents(drv_changemap::set_bits(bitmap, blocks), block_bytes, limit)
}

fn info(r: &RawInfo) -> DeviceInfo {
    DeviceInfo {
        index: r.index,
        name: from_cstr(&r.name),
        backing: from_cstr(&r.backing),
        holding: r.mode == 1,
        size_bytes: r.size_bytes,
        next_seq: r.next_seq,
        held_writes: r.held_writes,
        held_bytes: r.held_bytes,
        dirty_blocks: r.dirty_blocks,
        dirty_block_bytes: r.dirty_block_bytes,
        timeouts: r.timeouts,
        flush_writes: r.flush_writes,
        fua_writes: r.fua_writes,
    }
}

/// The backing device as the agent reads it for resyncs: with `O_DIRECT`. Writes reach the
/// backing device as bios from the module, around its page cache, so a buffered read could return
/// a page cached before them (and resync stale data).
pub struct DirectDisk {
    file: File,
}

/// Alignment (and granularity) of `DirectDisk`'s reads: covers every logical block size.
const DIRECT_ALIGN: usize = 4096;

impl DirectDisk {
    pub fn open(path: &Path) -> std::io::Result<DirectDisk> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path)?;
        Ok(DirectDisk { file })
    }
}

impl crate::LocalDisk for DirectDisk {
    fn write_at(&self, offset: u64, _data: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::other(format!(
            "write at {offset}: with the kernel module, writes reach the backing device through /dev/drvN only"
        )))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + buf.len() as u64).div_ceil(a) * a;
        let mut bounce = drv_files::aligned::AlignedBuf::zeroed((end - start) as usize);
        self.file.read_exact_at(&mut bounce, start)?;
        let from = (offset - start) as usize;
        buf.copy_from_slice(&bounce[from..from + buf.len()]);
        Ok(())
    }

    fn flush(&self) -> std::io::Result<()> {
        // Writes are the module's; a FLUSH reaches the backing device with the write it came with.
        Ok(())
    }
}

/// One parsed message of a read.
#[derive(Debug)]
enum Msg {
    Write { seq: u64, offset: u64, flags: Flags, data: Bytes },
    Done { seq: u64, status: i32 },
}

/// Parses the whole messages of one read.
fn parse(buf: &[u8]) -> Result<Vec<Msg>, KmodError> {
    const H: usize = std::mem::size_of::<KMsg>();
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let bad = |reason: String| KmodError::Malformed { at, reason };
        if buf.len() - at < H {
            return Err(bad(format!("{} bytes left, a header is {H}", buf.len() - at)));
        }
        // SAFETY: H bytes are there; KMsg is plain integers, read unaligned.
        let m: KMsg = unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
        if m.magic != KMSG_MAGIC || m.version != ABI_VERSION {
            return Err(bad(format!("magic {:#x} version {} (module and drv do not match?)", m.magic, m.version)));
        }
        match m.kind {
            KMSG_WRITE => {
                let len = m.length as usize;
                if len > MAX_WRITE_BYTES || buf.len() - at - H < len {
                    return Err(bad(format!("write of {len} bytes with {} bytes left", buf.len() - at - H)));
                }
                let mut flags = Flags::default();
                if m.flags & F_FLUSH != 0 {
                    flags = flags | Flags::FLUSH;
                }
                if m.flags & F_FUA != 0 {
                    flags = flags | Flags::FUA;
                }
                if m.flags & !(F_FLUSH | F_FUA) != 0 {
                    return Err(bad(format!("unknown flags {:#x}", m.flags)));
                }
                let data = Bytes::copy_from_slice(&buf[at + H..at + H + len]);
                out.push(Msg::Write { seq: m.seq, offset: m.offset, flags, data });
                at += H + len;
            }
            KMSG_DONE => {
                out.push(Msg::Done { seq: m.seq, status: m.status });
                at += H;
            }
            k => return Err(bad(format!("unknown message type {k}"))),
        }
    }
    Ok(out)
}

/// Sends one verdict to the module.
fn ack(file: &File, seq: u64, verdict: i32) -> std::io::Result<()> {
    let a = KAck { seq, verdict, reserved: 0 };
    // SAFETY: KAck is plain integers; its bytes are what the module reads.
    let b: [u8; 16] = unsafe { std::mem::transmute(a) };
    let n = std::io::Write::write(&mut &*file, &b)?;
    if n != b.len() {
        return Err(std::io::Error::other(format!("module took {n} of 16 ack bytes")));
    }
    Ok(())
}

/// Per released write: its DONE's status and the DONE's index in the stream (0: none came).
type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<(i32, u64)>>>>;

/// Which DONEs (numbered from 1 in the order read) the agent has completed: a write read after
/// DONE k is issued only once DONEs 1..=k are complete, without holding up the reader.
#[derive(Default)]
struct DoneOrder {
    /// (every DONE up to this one is complete, the complete ones above it)
    state: Mutex<(u64, std::collections::BTreeSet<u64>)>,
    changed: tokio::sync::Notify,
}

impl DoneOrder {
    fn complete(&self, k: u64) {
        if k == 0 {
            return;
        }
        let mut s = self.state.lock().expect("done order");
        s.1.insert(k);
        loop {
            let next = s.0 + 1;
            if !s.1.remove(&next) {
                break;
            }
            s.0 = next;
        }
        drop(s);
        self.changed.notify_waiters();
    }

    async fn wait_for(&self, k: u64) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.state.lock().expect("done order").0 >= k {
                return;
            }
            changed.await;
        }
    }
}

/// A capture running on its own thread: `ended` resolves when it stops (detached, or failed);
/// `detach` removes the device (refused while it is in use, and the capture goes on).
pub struct Running {
    pub ended: oneshot::Receiver<Result<(), KmodError>>,
    pub detach: crate::control::DetachHook,
}

/// Starts [`capture`] of device `index` on a thread of its own.
pub fn spawn_capture(ctl: Control, index: u32, agent: Agent, rt: tokio::runtime::Handle) -> std::io::Result<Running> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (tx, ended) = oneshot::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    std::thread::Builder::new().name(format!("drv{index}-capture")).spawn(move || {
        let _ = tx.send(capture(ctl, index, agent, rt, st));
    })?;
    let detach: crate::control::DetachHook = Arc::new(move || {
        stop.store(true, Ordering::SeqCst);
        let r = Control::open().and_then(|c| c.remove(index));
        r.map_err(|e| {
            stop.store(false, Ordering::SeqCst);
            format!("{e} (unmount it and close every program using it, then detach again)").into()
        })
    });
    Ok(Running { ended, detach })
}

/// Feeds the writes held on `/dev/drv{index}` to `agent` until the device is removed with `stop`
/// set (`drv detach`: [`Control::remove`] from any channel lets this one go), or reading fails.
/// Attaches `ctl`, takes the module's dirty bitmap and resyncs it first, and again after every
/// hold timeout. Blocking: run it on a thread of its own; `rt` runs the writes.
pub fn capture(
    ctl: Control,
    index: u32,
    agent: Agent,
    rt: tokio::runtime::Handle,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), KmodError> {
    use std::sync::atomic::Ordering;
    let file = Arc::new(ctl.file);
    let ctl = Control { file: file.try_clone().map_err(|err| KmodError::Io { what: "dup".into(), err })? };
    let volume_bytes = agent.status().volume_bytes;
    let resync = |ctl: &Control| -> Result<(), KmodError> {
        let ranges = ctl.take_dirty(index, volume_bytes)?;
        if ranges.is_empty() {
            return Ok(());
        }
        let bytes: u64 = ranges.iter().map(|r| r.1).sum();
        tracing::info!(ranges = ranges.len(), bytes, "resyncing what /dev/drv{index} wrote without an agent");
        for chunk in ranges.chunks(crate::control::MAX_EXTENTS) {
            rt.block_on(agent.resync_ranges(chunk)).map_err(|e| KmodError::Io {
                what: "resync the module's dirty blocks".into(),
                err: std::io::Error::other(e),
            })?;
        }
        Ok(())
    };
    ctl.attach(index)?;
    resync(&ctl)?;
    tracing::info!("holding the writes of /dev/drv{index}");
    let waiters: Waiters = Arc::new(Mutex::new(HashMap::new()));
    let order = Arc::new(DoneOrder::default());
    let mut dones_read = 0u64;
    let mut buf = vec![0u8; MAX_WRITE_BYTES + 64 * std::mem::size_of::<KMsg>() + (4 << 20)];
    loop {
        let n = match (&*file).read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                // Let go: the device was removed (detach), or the hold timeout passed what the
                // module held through, marked. Either way nobody answers the writes in flight.
                for (_, w) in waiters.lock().expect("waiters").drain() {
                    let _ = w.send((-libc::EPIPE, 0));
                }
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                tracing::warn!("/dev/drv{index}: the module's hold timeout passed writes through; attaching again");
                ctl.attach(index)?;
                resync(&ctl)?;
                continue;
            }
            Err(err) => return Err(KmodError::Io { what: format!("read /dev/drv{index}'s writes"), err }),
        };
        for m in parse(&buf[..n])? {
            match m {
                Msg::Write { seq, offset, flags, data } => {
                    let (tx, rx) = oneshot::channel();
                    waiters.lock().expect("waiters").insert(seq, tx);
                    let (agent, f, waiters, order) = (agent.clone(), file.clone(), waiters.clone(), order.clone());
                    let after = dones_read;
                    rt.spawn(async move {
                        // Submitted after those writes completed: issued after them too.
                        order.wait_for(after).await;
                        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
                        let completed = Arc::new(Mutex::new(None));
                        let (r2, f2, c2) = (released.clone(), f.clone(), completed.clone());
                        let r = agent
                            .write_with(offset, data, flags, move || async move {
                                r2.store(true, Ordering::Relaxed);
                                ack(&f2, seq, 0)?;
                                let (status, k) =
                                    rx.await.map_err(|_| std::io::Error::other("module channel closed"))?;
                                *c2.lock().expect("completed") = Some(k);
                                if status < 0 {
                                    return Err(std::io::Error::from_raw_os_error(-status));
                                }
                                Ok(())
                            })
                            .await;
                        if let Err(e) = &r {
                            tracing::warn!(seq, offset, "held write: {e}");
                        }
                        if !released.load(Ordering::Relaxed) {
                            // Failed before the local step: nothing protects it, fail it.
                            waiters.lock().expect("waiters").remove(&seq);
                            let _ = ack(&f, seq, -libc::EIO);
                        }
                        if let Some(k) = completed.lock().expect("completed").take() {
                            order.complete(k);
                        }
                    });
                }
                Msg::Done { seq, status } => {
                    dones_read += 1;
                    let k = dones_read;
                    // The write's task completes it in the agent; with no task to (a write failed
                    // by its verdict, or one that gave up waiting), it is complete now.
                    let w = waiters.lock().expect("waiters").remove(&seq);
                    if w.is_none_or(|w| w.send((status, k)).is_err()) {
                        order.complete(k);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_that_went_away_uncleanly_means_a_full_resync() {
        assert_eq!(recovery(true, true, false), Recovery::FullResync, "created again while the marker was there");
        assert_eq!(recovery(false, true, false), Recovery::Resume, "the agent died, the device and its bitmap stayed");
        assert_eq!(recovery(true, false, false), Recovery::Fresh, "first attach");
        assert_eq!(recovery(false, false, false), Recovery::Resume, "attached to a device someone else created");
        assert_eq!(recovery(false, true, true), Recovery::FullResync, "an attach decided it and failed before marking");
    }

    fn header(kind: u16, seq: u64, offset: u64, length: u32, flags: u32) -> Vec<u8> {
        let m = KMsg { magic: KMSG_MAGIC, version: ABI_VERSION, kind, seq, offset, length, flags, ..KMsg::default() };
        // SAFETY: KMsg is plain integers.
        let b: [u8; 48] = unsafe { std::mem::transmute(m) };
        b.to_vec()
    }

    #[test]
    fn parse_reads_writes_and_dones_in_order() {
        let mut buf = header(KMSG_WRITE, 7, 8192, 4096, F_FLUSH | F_FUA);
        buf.extend(std::iter::repeat_n(0xab, 4096));
        buf.extend(header(KMSG_DONE, 6, 0, 0, 0));
        buf.extend(header(KMSG_WRITE, 8, 0, 0, F_FLUSH)); // an empty flush
        let m = parse(&buf).unwrap();
        assert_eq!(m.len(), 3);
        match &m[0] {
            Msg::Write { seq: 7, offset: 8192, flags, data } => {
                assert!(flags.contains(Flags::FLUSH) && flags.contains(Flags::FUA));
                assert_eq!(data.len(), 4096);
                assert!(data.iter().all(|&b| b == 0xab));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(m[1], Msg::Done { seq: 6, status: 0 }));
        assert!(matches!(&m[2], Msg::Write { seq: 8, data, .. } if data.is_empty()));
    }

    #[test]
    fn parse_names_what_is_wrong() {
        let err = |b: &[u8]| parse(b).unwrap_err().to_string();
        assert!(err(&header(KMSG_WRITE, 1, 0, 4096, 0)).contains("write of 4096 bytes with 0 bytes left"));
        assert!(err(&header(KMSG_DONE, 1, 0, 0, 0)[..40]).contains("40 bytes left, a header is 48"));
        let mut bad = header(KMSG_DONE, 1, 0, 0, 0);
        bad[0] ^= 1;
        assert!(err(&bad).contains("magic"));
        assert!(err(&header(9, 1, 0, 0, 0)).contains("unknown message type 9"));
        assert!(err(&header(KMSG_WRITE, 1, 0, 0, 0x10)).contains("unknown flags 0x10"));
        let mut second = header(KMSG_DONE, 1, 0, 0, 0);
        second.extend(header(7, 2, 0, 0, 0));
        assert!(err(&second).contains("at byte 48"), "{}", err(&second));
        assert!(err(&header(KMSG_WRITE, 1, 0, (MAX_WRITE_BYTES + 4096) as u32, 0)).contains("write of"));
    }

    #[test]
    fn bitmap_ranges_merges_neighbours_and_clips_to_the_volume() {
        // blocks 0, 1, 3, 8, 9 of 10 (64 KiB each); the volume ends inside block 9.
        let bm = [0b0000_1011u8, 0b0000_0011];
        let r = bitmap_ranges(&bm, 10, 65536, 9 * 65536 + 4096);
        assert_eq!(r, vec![(0, 2 * 65536), (3 * 65536, 65536), (8 * 65536, 65536 + 4096)]);
        assert!(bitmap_ranges(&[0, 0], 16, 4096, u64::MAX).is_empty());
        assert_eq!(bitmap_ranges(&[0xff], 3, 4096, u64::MAX), vec![(0, 3 * 4096)]);
    }

    #[test]
    fn ioctl_numbers_match_the_header() {
        // _IOWR(0xd7, 1, struct drv_create) etc., as the C compiler computes them.
        assert_eq!(IOC_CREATE, 0xc150_d701);
        assert_eq!(IOC_REMOVE, 0x4004_d702);
        assert_eq!(IOC_INFO, 0xc188_d703);
        assert_eq!(IOC_ATTACH, 0x4004_d704);
        assert_eq!(IOC_TAKE_DIRTY, 0xc028_d705);
        assert_eq!(ioc(0, 6, 0), 0xd706); // DRV_IOC_DETACH (drv detach removes the device instead)
    }
}

#[cfg(test)]
mod order_tests {
    use super::DoneOrder;

    #[tokio::test]
    async fn a_write_waits_for_every_done_read_before_it() {
        let o = std::sync::Arc::new(DoneOrder::default());
        o.wait_for(0).await; // nothing read before it
        let w = tokio::spawn({
            let o = o.clone();
            async move { o.wait_for(3).await }
        });
        o.complete(1);
        o.complete(3); // out of order: 2 is still in flight
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!w.is_finished(), "issued before DONE 2 completed");
        o.complete(2);
        tokio::time::timeout(std::time::Duration::from_secs(5), w).await.unwrap().unwrap();
        assert_eq!(o.state.lock().unwrap().0, 3);
        assert!(o.state.lock().unwrap().1.is_empty());
        o.complete(0); // "no DONE": nothing to do
    }
}
