//! `drv restore VOLUME SNAPSHOT --to PATH|DEVICE`: a snapshot copied onto a local disk in the
//! background while that disk is already in use.
//!
//! ```text
//!   replica ──NBD (its export of the snapshot)──► Source ─┐
//!                                                         ├─ Restore ─► target (PATH|DEVICE)
//!   /dev/loopN (FUSE, drv_userdev) ─┐                     │      └─ STATE_DIR/state (bitmap)
//!   nbd://LISTEN/SNAPSHOT ──────────┴─► reads, writes ────┘
//! ```
//!
//! The target is divided into chunks of [`state::CHUNK_BYTES`]; a bit per chunk (`state.rs`, with
//! the format and its crash analysis) says the target holds the chunk's final data. A read takes
//! each chunk from the target when its bit is set, else from the snapshot. A write to a chunk not
//! yet present first completes the chunk from the snapshot (when it covers only part of it),
//! writes, and sets the bit: the background copy never copies over it, because it writes a chunk
//! only under the same gate and only while its bit is clear. The copy reads the snapshot in
//! batches of 64 chunks (one bitmap word) on a few reader threads, writes the chunks still
//! missing, paced by `--bwlimit`, while a thread beside it persists the bits every 5 s (target
//! first, then the bitmap; a target fdatasync each second halved the copy on this disk). At the
//! end every bit is set: the target is the whole image and the replica is no longer needed.

pub mod client;
pub mod state;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use client::Source;
use state::StateFile;

/// Chunks per copy batch: one word of the bitmap.
const BATCH_CHUNKS: u64 = 64;
/// Reader threads of the background copy.
const READERS: usize = 2;
/// How often the copy makes its progress durable.
const PERSIST_EVERY: Duration = Duration::from_secs(5);

/// A restore in progress (or complete).
pub struct Restore {
    src: Source,
    target: File,
    state: StateFile,
    bits: Vec<AtomicU64>,
    /// Held by whoever writes a chunk that is not yet present (the copy, or a user's write).
    gate: Mutex<()>,
    /// One persist at a time.
    persisting: Mutex<()>,
    /// Bytes the background copy wrote (this run).
    pub copied: AtomicU64,
    /// Bytes written by users of the target (this run).
    pub written: AtomicU64,
    stop: AtomicBool,
}

impl Restore {
    /// A restore from `src` into `target` with the state `state` (new or resumed).
    pub fn new(src: Source, target: File, state: StateFile) -> Result<Restore, String> {
        let size = state.header.size;
        if src.size != size {
            return Err(format!("the export has {} bytes, the restore state says {size}", src.size));
        }
        let bits = state.read_bits()?.into_iter().map(AtomicU64::new).collect();
        Ok(Restore {
            src,
            target,
            state,
            bits,
            gate: Mutex::new(()),
            persisting: Mutex::new(()),
            copied: AtomicU64::new(0),
            written: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        })
    }

    pub fn header(&self) -> &state::Header {
        &self.state.header
    }

    pub fn size(&self) -> u64 {
        self.state.header.size
    }

    fn chunk(&self) -> u64 {
        u64::from(self.state.header.chunk_bytes)
    }

    fn chunks(&self) -> u64 {
        self.state.header.chunks()
    }

    fn done(&self, c: u64) -> bool {
        self.bits[(c / 64) as usize].load(Ordering::Acquire) & (1 << (c % 64)) != 0
    }

    fn set(&self, c: u64) {
        self.bits[(c / 64) as usize].fetch_or(1 << (c % 64), Ordering::AcqRel);
    }

    /// The byte range of chunk `c`.
    fn range(&self, c: u64) -> (u64, u64) {
        (c * self.chunk(), ((c + 1) * self.chunk()).min(self.size()))
    }

    /// Bytes of the image the target holds.
    pub fn present_bytes(&self) -> u64 {
        let n: u64 = self.bits.iter().map(|w| u64::from(w.load(Ordering::Relaxed).count_ones())).sum();
        (n * self.chunk()).min(self.size())
    }

    pub fn complete(&self) -> bool {
        (0..self.chunks()).step_by(64).all(|c| {
            let want = if self.chunks() - c >= 64 { u64::MAX } else { (1u64 << (self.chunks() - c)) - 1 };
            self.bits[(c / 64) as usize].load(Ordering::Acquire) == want
        })
    }

    /// Asks the background copy to stop after its current batch.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.src.cancel();
    }

    /// Reads `buf.len()` bytes at `offset`: present chunks from the target, the rest from the
    /// snapshot.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let present = self.done(pos / self.chunk());
            let mut stop = self.range(pos / self.chunk()).1.min(end);
            while stop < end && self.done(stop / self.chunk()) == present {
                stop = self.range(stop / self.chunk()).1.min(end);
            }
            let part = &mut buf[(pos - offset) as usize..(stop - offset) as usize];
            if present {
                self.target.read_exact_at(part, pos).map_err(|e| format!("read the target at {pos}: {e}"))?;
            } else {
                self.src.read(pos, part)?;
            }
            pos = stop;
        }
        Ok(())
    }

    /// Writes `data` at `offset` of the target; its chunks are present from then on.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        assert!(end <= self.size(), "a write past the end of the restore target");
        let (first, last) = (offset / self.chunk(), (end - 1) / self.chunk());
        // Present chunks are never written by the copy again: no gate needed.
        let _gate = (!(first..=last).all(|c| self.done(c))).then(|| self.gate.lock().expect("gate"));
        for c in [first, last] {
            let (cs, ce) = self.range(c);
            if self.done(c) || (offset <= cs && end >= ce) {
                continue;
            }
            // Part of a chunk not yet present: the rest of it comes from the snapshot first.
            let mut b = vec![0u8; (ce - cs) as usize];
            self.src.read(cs, &mut b)?;
            let (from, to) = (offset.max(cs), end.min(ce));
            b[(from - cs) as usize..(to - cs) as usize]
                .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            self.target.write_all_at(&b, cs).map_err(|e| format!("write the target at {cs}: {e}"))?;
            self.set(c);
        }
        write_pieces(&self.target, data, offset)?;
        for c in first..=last {
            self.set(c);
        }
        self.written.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Makes every write so far and the bits of every present chunk durable: the bits are read
    /// first, the target synced, then the bitmap written (see `state.rs`).
    pub fn persist(&self) -> Result<(), String> {
        let _one = self.persisting.lock().expect("persisting");
        let words: Vec<u64> = self.bits.iter().map(|w| w.load(Ordering::Acquire)).collect();
        self.target.sync_data().map_err(|e| format!("sync the restore target: {e}"))?;
        self.state.write_bits(&words)
    }

    /// The background copy: every chunk not yet present, from the snapshot, at most `bwlimit`
    /// bytes a second; `progress` is called after each batch. Returns whether the target is
    /// complete (false: stopped).
    pub fn copy(&self, bwlimit: Option<u64>, mut progress: impl FnMut(&Restore)) -> Result<bool, String> {
        let words = self.bits.len() as u64;
        let next = AtomicU64::new(0);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(u64, Vec<u8>), String>>(READERS);
        let started = Instant::now();
        let copying = AtomicBool::new(true);
        let result = std::thread::scope(|scope| {
            for _ in 0..READERS {
                let (tx, next) = (tx.clone(), &next);
                scope.spawn(move || {
                    loop {
                        let w = next.fetch_add(1, Ordering::Relaxed);
                        if w >= words || self.stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let Some(batch) = self.read_batch(w) else { continue };
                        if tx.send(batch).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(tx);
            // The progress made durable every 5 s, beside the copy (which goes on
            // writing while the target syncs).
            let persister = scope.spawn(|| {
                let mut last = Instant::now();
                while copying.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                    if last.elapsed() >= PERSIST_EVERY {
                        self.persist()?;
                        last = Instant::now();
                    }
                }
                Ok::<(), String>(())
            });
            let mut sent = 0u64;
            let copied = (|| {
                for batch in rx {
                    let (w, data) = batch?;
                    self.write_batch(w, &data)?;
                    sent += data.len() as u64;
                    if let Some(rate) = bwlimit.filter(|r| *r > 0) {
                        let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    }
                    progress(self);
                    if self.stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                Ok::<(), String>(())
            })();
            copying.store(false, Ordering::Relaxed);
            self.stop.store(copied.is_err() || self.stop.load(Ordering::Relaxed), Ordering::Relaxed);
            let persisted = persister.join().unwrap_or_else(|_| Err("the persisting thread panicked".into()));
            copied.and(persisted)
        });
        if let Err(e) = result {
            self.stop();
            let _ = self.persist();
            return Err(e);
        }
        self.persist()?;
        progress(self);
        Ok(self.complete())
    }

    /// Batch `w`'s bytes from the snapshot, when a chunk of it is missing.
    fn read_batch(&self, w: u64) -> Option<Result<(u64, Vec<u8>), String>> {
        let first = w * BATCH_CHUNKS;
        let last = (first + BATCH_CHUNKS).min(self.chunks());
        let missing: Vec<u64> = (first..last).filter(|c| !self.done(*c)).collect();
        let (lo, hi) = (self.range(*missing.first()?).0, self.range(*missing.last()?).1);
        let mut b = vec![0u8; (hi - lo) as usize];
        Some(self.src.read(lo, &mut b).map(|()| (lo, b)))
    }

    /// Writes the chunks of a batch read at `lo` that are still missing, in runs.
    fn write_batch(&self, lo: u64, data: &[u8]) -> Result<(), String> {
        let _gate = self.gate.lock().expect("gate");
        let end = lo + data.len() as u64;
        let mut c = lo / self.chunk();
        while self.range(c).0 < end {
            if self.done(c) {
                c += 1;
                continue;
            }
            let start = c;
            while self.range(c).0 < end && !self.done(c) {
                c += 1;
            }
            let (from, to) = (self.range(start).0, self.range(c - 1).1);
            let part = &data[(from - lo) as usize..(to - lo) as usize];
            write_pieces(&self.target, part, from)?;
            for k in start..c {
                self.set(k);
            }
            self.copied.fetch_add(to - from, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Writes of at most this many bytes each: on this host's kernel (6.18, ext4 on virtio) a 1 MiB
/// or larger buffered write runs at a quarter of the rate of 128 KiB ones (`dd bs=4M` against
/// `bs=128K` of the same file: 3.9 s against 0.8 s per GiB with the sync).
const WRITE_PIECE: usize = 128 << 10;

/// Writes `data` at `offset` of the target in pieces of [`WRITE_PIECE`].
fn write_pieces(f: &File, data: &[u8], offset: u64) -> Result<(), String> {
    for (i, piece) in data.chunks(WRITE_PIECE).enumerate() {
        let at = offset + (i * WRITE_PIECE) as u64;
        f.write_all_at(piece, at).map_err(|e| format!("write the target at {at}: {e}"))?;
    }
    Ok(())
}

impl drv_userdev::nbd::Image for Restore {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        Restore::read(self, offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        Restore::write(self, offset, data)
    }

    fn flush(&self) -> Result<(), String> {
        self.persist()
    }

    fn label(&self) -> String {
        format!("restore of {}@{} to {}", self.header().volume, self.header().snapshot, self.header().target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drv_proto::nbd::Export;
    use std::sync::Arc;

    /// An image in memory behind an NBD server (drv_userdev's, on its own runtime).
    struct Mem(Mutex<Vec<u8>>);

    impl drv_userdev::nbd::Image for Mem {
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
            buf.copy_from_slice(&self.0.lock().unwrap()[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8]) -> Result<(), String> {
            Err("read-only".into())
        }
        fn write_zeroes(&self, _: u64, _: u64) -> Result<(), String> {
            Err("read-only".into())
        }
        fn flush(&self) -> Result<(), String> {
            Ok(())
        }
        fn label(&self) -> String {
            "mem".into()
        }
    }

    fn serve(image: Vec<u8>) -> (tokio::runtime::Runtime, String) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let size = image.len() as u64;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let export = Export { name: "snap".into(), size, writable: false, description: String::new() };
        rt.spawn(drv_userdev::nbd::serve_listener(listener, export, Arc::new(Mem(Mutex::new(image)))));
        (rt, addr)
    }

    fn open(addr: &str, dir: &std::path::Path, size: u64) -> Restore {
        let path = dir.join("state");
        let state = if path.exists() {
            StateFile::open(&path).unwrap()
        } else {
            let h = state::Header {
                chunk_bytes: state::CHUNK_BYTES,
                size,
                volume_id: 1,
                seq: 9,
                snapshot: "snap".into(),
                volume: "vol1".into(),
                target: "target".into(),
            };
            StateFile::create(&path, h).unwrap()
        };
        let target = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("target"))
            .unwrap();
        target.set_len(size).unwrap();
        Restore::new(Source::open(addr, "snap", 2).unwrap(), target, state).unwrap()
    }

    /// Writes at any alignment before, during and after a copy that is stopped and resumed
    /// (with the process's memory gone, as after a kill): reads always show the snapshot with the
    /// writes over it, and the finished target is exactly that, read from the target alone.
    #[test]
    fn writes_survive_the_background_copy_and_a_resume() {
        let size = (20 << 20) + 12_288;
        let base: Vec<u8> = (0..size).map(|i| (i * 31 % 253) as u8).collect();
        let (_rt, addr) = serve(base.clone());
        let dir = tempfile::tempdir().unwrap();
        let mut model = base.clone();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for round in 0..3 {
            let r = open(&addr, dir.path(), size);
            for _ in 0..20 {
                let at = next(size);
                let len = (1 + next(200_000)).min(size - at);
                let data: Vec<u8> = (0..len).map(|i| (i as u8) ^ (round * 17)).collect();
                r.write(at, &data).unwrap();
                model[at as usize..(at + len) as usize].copy_from_slice(&data);
                let at = next(size);
                let len = (1 + next(300_000)).min(size - at);
                let mut b = vec![0u8; len as usize];
                r.read(at, &mut b).unwrap();
                assert!(b == model[at as usize..(at + len) as usize], "round {round}: a read at {at}");
            }
            if round < 2 {
                // Stopped part way: a batch or two, then the bits persisted, then dropped.
                let mut batches = 0;
                let complete = r
                    .copy(None, |r| {
                        batches += 1;
                        if batches == 2 {
                            r.stop()
                        }
                    })
                    .unwrap();
                assert!(!complete);
                // A write after the copy's last persist: flushed, it survives the resume.
                r.write(100, b"flushed").unwrap();
                model[100..107].copy_from_slice(b"flushed");
                r.persist().unwrap();
            } else {
                assert!(r.copy(Some(64 << 20), |_| ()).unwrap());
                assert_eq!(r.present_bytes(), size);
            }
        }
        assert!(std::fs::read(dir.path().join("target")).unwrap() == model, "the finished target differs");
    }
}
