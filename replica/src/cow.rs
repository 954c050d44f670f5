//! The copy-on-write snapshot store of one replica volume: the snapshots (points), the preserved
//! versions of blocks, and the slots that hold them. The rules (which blocks to preserve, where a
//! point reads a block, what is garbage) are `drv_proto::cow`'s; this is their I/O.
//!
//! Layout, under the replica's data directory (format and crash analysis: docs/formats.md,
//! "Snapshot store"):
//!
//! ```text
//! snapshots/VOLUME/cow.redb   snapshots, versions, free slots, counters (redb, one writer)
//! snapshots/VOLUME/cow.data   slots of `slot_bytes` (the volume's block size), each one block
//! ```
//!
//! The apply step calls [`CowStore::preserve`] with a batch's writes before it writes the
//! target: the old content of every block a point needs is copied into free slots, the data file
//! synced, then the versions committed (redb, durable). Only then is the target written. Taking
//! a snapshot is one small commit (its position), whatever the volume's size.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use drv_proto::cow::{self, Points, Source, UnitEnd, Version, Write};
use drv_proto::status::{RecoveryPoint, RecoveryWindow};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

/// name -> [`SnapshotMeta`] (JSON).
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// (block, hi) -> (lo, slot).
const VERSIONS: TableDefinition<(u64, u64), (u64, u64)> = TableDefinition::new("versions");
/// Free slots below `next_slot`.
const FREE: TableDefinition<u64, ()> = TableDefinition::new("free");
/// `next_slot`, `slot_bytes`, `volume_id`, `versions` (how many `VERSIONS` holds: slots in use),
/// `window_from` (present while a window is kept: its start).
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// The window's unit ends: seq -> (epoch, capture_unix, applied_unix, flags: bit 0 a flush).
const POINTS: TableDefinition<u64, (u64, u32, u64, u8)> = TableDefinition::new("points");
/// The versions made while the window was open, by (hi, block): expiry frees them in `hi` order.
const EXPIRING: TableDefinition<(u64, u64), ()> = TableDefinition::new("expiring");

fn point_from(seq: u64, (epoch, capture_unix, applied_unix, flags): (u64, u32, u64, u8)) -> RecoveryPoint {
    RecoveryPoint { seq, epoch, capture_unix, applied_unix, flush: flags & 1 != 0 }
}

/// Where `--at` points: at or before a sequence number, or a capture time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    Seq(u64),
    Time(u64),
}

/// What a snapshot records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The applied position it shows: every write up to `seq` (epoch `epoch`), none after.
    pub seq: u64,
    pub epoch: u64,
    pub created_unix: u64,
    /// The agent's clock at capture of the point's last unit, when known.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub capture_unix: u32,
}

fn is_zero(x: &u32) -> bool {
    *x == 0
}

#[derive(Debug, thiserror::Error)]
pub enum CowError {
    #[error("snapshot store {path}: {err}")]
    Store { path: String, err: Box<redb::Error> },
    #[error("snapshot store {path}: {what}: {err}")]
    Io { path: String, what: String, err: std::io::Error },
    #[error("snapshot store {path} belongs to volume {found}, not {want}")]
    OtherVolume { path: String, found: u64, want: u64 },
    #[error("snapshot store {path} keeps blocks of {found} bytes; the volume's blocks are {want} bytes")]
    OtherBlockSize { path: String, found: u64, want: u64 },
    #[error("snapshot {0} exists already")]
    Exists(String),
    #[error("no snapshot {0}")]
    NotFound(String),
    #[error("{0}")]
    NoPoint(String),
    #[error(
        "snapshot store {path} is full: {used} of {limit} bytes in use; delete a snapshot (or raise the volume's snapshot_bytes_limit) so that apply can go on"
    )]
    Full { path: String, used: u64, limit: u64 },
}

/// The store of one volume.
pub struct CowStore {
    db: Database,
    db_path: String,
    data: File,
    data_path: PathBuf,
    slot_bytes: u64,
    /// The live points, from `SNAPSHOTS` (kept in memory: a few per snapshot).
    points: Points,
    /// At most this many bytes of slots in use (`None`: no limit).
    limit_bytes: Option<u64>,
    /// Counts the commits that added versions, each before its batch reaches the target: a reader
    /// that sees it unchanged across its target read knows no block it read was overwritten.
    preserved: std::sync::atomic::AtomicU64,
}

/// Space a store uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Slots holding a version, in bytes.
    pub used_bytes: u64,
    pub versions: u64,
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl CowStore {
    /// Opens (or creates) the store of volume `volume_id` (blocks of `slot_bytes`) in `dir`.
    /// Sets the most bytes the store may hold (a configuration change; `None`: no limit).
    pub fn set_limit(&mut self, limit_bytes: Option<u64>) {
        self.limit_bytes = limit_bytes;
    }

    pub fn open(dir: &Path, volume_id: u64, slot_bytes: u64, limit_bytes: Option<u64>) -> Result<CowStore, CowError> {
        assert!(slot_bytes > 0 && slot_bytes.is_multiple_of(512), "slot size {slot_bytes}");
        let db_path = dir.join("cow.redb").display().to_string();
        let data_path = dir.join("cow.data");
        let io = |what: &str| {
            let (path, what) = (data_path.display().to_string(), what.to_owned());
            move |err| CowError::Io { path, what, err }
        };
        std::fs::create_dir_all(dir).map_err(io("create the directory"))?;
        let data = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(io("open"))?;
        let store_err = |e: redb::Error| CowError::Store { path: db_path.clone(), err: Box::new(e) };
        let db = Database::create(&db_path).map_err(|e| store_err(e.into()))?;
        let points = {
            let tx = db.begin_write().map_err(|e| store_err(e.into()))?;
            {
                let mut c = tx.open_table(COUNTERS).map_err(|e| store_err(e.into()))?;
                let found = |c: &redb::Table<&str, u64>, k: &str| c.get(k).map(|v| v.map(|v| v.value()));
                match found(&c, "volume_id").map_err(|e| store_err(e.into()))? {
                    Some(found) if found != volume_id => {
                        return Err(CowError::OtherVolume { path: db_path.clone(), found, want: volume_id });
                    }
                    Some(_) => {}
                    None => {
                        c.insert("volume_id", volume_id).map_err(|e| store_err(e.into()))?;
                        c.insert("slot_bytes", slot_bytes).map_err(|e| store_err(e.into()))?;
                        c.insert("next_slot", 0).map_err(|e| store_err(e.into()))?;
                    }
                }
                let have = found(&c, "slot_bytes").map_err(|e| store_err(e.into()))?.unwrap_or(slot_bytes);
                if have != slot_bytes {
                    return Err(CowError::OtherBlockSize { path: db_path.clone(), found: have, want: slot_bytes });
                }
                let n =
                    tx.open_table(VERSIONS).map_err(|e| store_err(e.into()))?.len().map_err(|e| store_err(e.into()))?;
                if found(&c, "versions").map_err(|e| store_err(e.into()))?.is_none() {
                    c.insert("versions", n).map_err(|e| store_err(e.into()))?;
                }
                tx.open_table(FREE).map_err(|e| store_err(e.into()))?;
                tx.open_table(POINTS).map_err(|e| store_err(e.into()))?;
                tx.open_table(EXPIRING).map_err(|e| store_err(e.into()))?;
            }
            let window = {
                let c = tx.open_table(COUNTERS).map_err(|e| store_err(e.into()))?;
                c.get("window_from").map_err(|e| store_err(e.into()))?.map(|v| v.value())
            };
            let points = {
                let s = tx.open_table(SNAPSHOTS).map_err(|e| store_err(e.into()))?;
                let mut p = Points::default();
                p.set_window(window);
                for entry in s.iter().map_err(|e| store_err(e.into()))? {
                    let (_, v) = entry.map_err(|e| store_err(e.into()))?;
                    p.pin(parse_meta(&db_path, v.value())?.seq);
                }
                p
            };
            tx.commit().map_err(|e| store_err(e.into()))?;
            points
        };
        Ok(CowStore { db, db_path, data, data_path, slot_bytes, points, limit_bytes, preserved: Default::default() })
    }

    fn err(&self) -> impl Fn(redb::Error) -> CowError + use<> {
        let path = self.db_path.clone();
        move |e| CowError::Store { path: path.clone(), err: Box::new(e) }
    }

    fn io(&self, what: String) -> impl FnOnce(std::io::Error) -> CowError + '_ {
        move |err| CowError::Io { path: self.data_path.display().to_string(), what, err }
    }

    /// Whether any snapshot exists (nothing to preserve otherwise).
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// A snapshot `name` at applied position `seq`/`epoch` (the caller holds the apply step at
    /// that position). One small commit, whatever the volume's size.
    pub fn create(&mut self, name: &str, seq: u64, epoch: u64, capture_unix: u32) -> Result<SnapshotMeta, CowError> {
        assert!(self.points.can_pin(seq), "a snapshot at position {seq}, outside the window and older than a snapshot");
        let e = self.err();
        let meta = SnapshotMeta { seq, epoch, created_unix: unix_now(), capture_unix };
        let tx = self.db.begin_write().map_err(|x| e(x.into()))?;
        {
            let mut s = tx.open_table(SNAPSHOTS).map_err(|x| e(x.into()))?;
            if s.get(name).map_err(|x| e(x.into()))?.is_some() {
                return Err(CowError::Exists(name.to_owned()));
            }
            let json = serde_json::to_vec(&meta).expect("serializable");
            s.insert(name, json.as_slice()).map_err(|x| e(x.into()))?;
        }
        tx.commit().map_err(|x| e(x.into()))?;
        self.points.pin(seq);
        Ok(meta)
    }

    /// Every snapshot, by name.
    pub fn list(&self) -> Result<Vec<(String, SnapshotMeta)>, CowError> {
        let e = self.err();
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let s = tx.open_table(SNAPSHOTS).map_err(|x| e(x.into()))?;
        let mut out = Vec::new();
        for entry in s.iter().map_err(|x| e(x.into()))? {
            let (k, v) = entry.map_err(|x| e(x.into()))?;
            out.push((k.value().to_owned(), parse_meta(&self.db_path, v.value())?));
        }
        Ok(out)
    }

    /// The snapshot `name`.
    pub fn get(&self, name: &str) -> Result<SnapshotMeta, CowError> {
        let e = self.err();
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let s = tx.open_table(SNAPSHOTS).map_err(|x| e(x.into()))?;
        let v = s.get(name).map_err(|x| e(x.into()))?.ok_or_else(|| CowError::NotFound(name.to_owned()))?;
        parse_meta(&self.db_path, v.value())
    }

    /// Deletes snapshot `name` and frees the versions no other snapshot needs (their slots are
    /// reused, and their space handed back to the file system). Returns the bytes freed.
    pub fn delete(&mut self, name: &str) -> Result<u64, CowError> {
        let e = self.err();
        let meta = self.get(name)?;
        let mut points = self.points.clone();
        points.unpin(meta.seq);
        let tx = self.db.begin_write().map_err(|x| e(x.into()))?;
        tx.open_table(SNAPSHOTS).map_err(|x| e(x.into()))?.remove(name).map_err(|x| e(x.into()))?;
        let dead = self.unneeded(&tx, &points)?;
        self.commit_freeing(tx, points, &dead)
    }

    /// Every version `points` does not need (a scan of all of them).
    fn unneeded(&self, tx: &redb::WriteTransaction, points: &Points) -> Result<Vec<Dead>, CowError> {
        let e = self.err();
        let versions = tx.open_table(VERSIONS).map_err(|x| e(x.into()))?;
        let mut dead = Vec::new();
        for entry in versions.iter().map_err(|x| e(x.into()))? {
            let (k, v) = entry.map_err(|x| e(x.into()))?;
            let ((block, hi), (lo, slot)) = (k.value(), v.value());
            if !points.need(lo, hi) {
                dead.push(((block, hi), slot));
            }
        }
        Ok(dead)
    }

    /// Removes versions `dead` (key, slot) and frees their slots in `tx`, commits, and takes
    /// `points` as the live ones. Returns the bytes freed.
    fn commit_freeing(&mut self, tx: redb::WriteTransaction, points: Points, dead: &[Dead]) -> Result<u64, CowError> {
        let e = self.err();
        {
            let mut versions = tx.open_table(VERSIONS).map_err(|x| e(x.into()))?;
            let mut free = tx.open_table(FREE).map_err(|x| e(x.into()))?;
            for (k, slot) in dead {
                versions.remove(k).map_err(|x| e(x.into()))?;
                free.insert(slot, ()).map_err(|x| e(x.into()))?;
            }
            let mut c = tx.open_table(COUNTERS).map_err(|x| e(x.into()))?;
            let n = counter(&c, "versions").map_err(|x| e(x.into()))?;
            c.insert("versions", n - dead.len() as u64).map_err(|x| e(x.into()))?;
        }
        tx.commit().map_err(|x| e(x.into()))?;
        self.points = points;
        // Committed: the slots are free (a crash before this only keeps their space allocated).
        for (_, slot) in dead {
            punch_hole(&self.data, slot * self.slot_bytes, self.slot_bytes);
        }
        Ok(dead.len() as u64 * self.slot_bytes)
    }

    /// The start of the window (`None`: none is kept).
    pub fn window(&self) -> Option<u64> {
        self.points.window()
    }

    /// Opens the window at `at`, the applied position (the caller holds the apply step there):
    /// from now on every unit end applied is a point.
    pub fn open_window(&mut self, at: RecoveryPoint) -> Result<(), CowError> {
        assert!(self.points.window().is_none(), "a window is open already");
        let e = self.err();
        let tx = self.db.begin_write().map_err(|x| e(x.into()))?;
        {
            let mut c = tx.open_table(COUNTERS).map_err(|x| e(x.into()))?;
            c.insert("window_from", at.seq).map_err(|x| e(x.into()))?;
            let mut p = tx.open_table(POINTS).map_err(|x| e(x.into()))?;
            p.insert(at.seq, point_entry(&at)).map_err(|x| e(x.into()))?;
        }
        tx.commit().map_err(|x| e(x.into()))?;
        self.points.set_window(Some(at.seq));
        Ok(())
    }

    /// Closes the window: its points go, and what only they needed is freed. Returns the bytes
    /// freed.
    pub fn close_window(&mut self) -> Result<u64, CowError> {
        if self.points.window().is_none() {
            return Ok(0);
        }
        let e = self.err();
        let mut points = self.points.clone();
        points.set_window(None);
        let tx = self.db.begin_write().map_err(|x| e(x.into()))?;
        {
            tx.open_table(COUNTERS).map_err(|x| e(x.into()))?.remove("window_from").map_err(|x| e(x.into()))?;
            tx.delete_table(POINTS).map_err(|x| e(x.into()))?;
            tx.delete_table(EXPIRING).map_err(|x| e(x.into()))?;
            tx.open_table(POINTS).map_err(|x| e(x.into()))?;
            tx.open_table(EXPIRING).map_err(|x| e(x.into()))?;
        }
        let dead = self.unneeded(&tx, &points)?;
        self.commit_freeing(tx, points, &dead)
    }

    /// Moves the window's start forward to `to` (a point in it), and frees the versions that no
    /// point needs any more, at most `EXPIRE_STEP` of them (call again while it returns `true`).
    /// Returns the bytes freed and whether more may be due.
    pub fn expire_to(&mut self, to: u64) -> Result<(u64, bool), CowError> {
        let from = self.points.window().expect("a window");
        assert!(to >= from, "the window's start would move back from {from} to {to}");
        let e = self.err();
        let mut points = self.points.clone();
        points.set_window(Some(to));
        let tx = self.db.begin_write().map_err(|x| e(x.into()))?;
        let (dead, more) = {
            let mut c = tx.open_table(COUNTERS).map_err(|x| e(x.into()))?;
            c.insert("window_from", to).map_err(|x| e(x.into()))?;
            let mut p = tx.open_table(POINTS).map_err(|x| e(x.into()))?;
            p.retain_in(..to, |_, _| false).map_err(|x| e(x.into()))?;
            let mut expiring = tx.open_table(EXPIRING).map_err(|x| e(x.into()))?;
            let keys: Vec<(u64, u64)> = expiring
                .range(..=(to, u64::MAX))
                .map_err(|x| e(x.into()))?
                .take(EXPIRE_STEP + 1)
                .map(|r| r.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()
                .map_err(|x| e(x.into()))?;
            let more = keys.len() > EXPIRE_STEP;
            let versions = tx.open_table(VERSIONS).map_err(|x| e(x.into()))?;
            let mut dead = Vec::new();
            for &(hi, block) in keys.iter().take(EXPIRE_STEP) {
                expiring.remove((hi, block)).map_err(|x| e(x.into()))?;
                // Gone already when a snapshot's delete freed it.
                if let Some(v) = versions.get((block, hi)).map_err(|x| e(x.into()))? {
                    let (lo, slot) = v.value();
                    if !points.need(lo, hi) {
                        dead.push(((block, hi), slot));
                    }
                }
            }
            (dead, more)
        };
        let freed = self.commit_freeing(tx, points, &dead)?;
        Ok((freed, more))
    }

    /// The window's points: its oldest and newest, and the newest `limit` that end with a flush.
    pub fn window_info(&self, limit: usize) -> Result<RecoveryWindow, CowError> {
        self.window_scan(Some(limit))
    }

    /// The window's oldest and newest point and how many it has, without the scan for flush
    /// points (what the apply thread's upkeep reads every second).
    pub fn window_bounds(&self) -> Result<RecoveryWindow, CowError> {
        self.window_scan(None)
    }

    fn window_scan(&self, flush_limit: Option<usize>) -> Result<RecoveryWindow, CowError> {
        let e = self.err();
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let p = tx.open_table(POINTS).map_err(|x| e(x.into()))?;
        let first = p.first().map_err(|x| e(x.into()))?;
        let last = p.last().map_err(|x| e(x.into()))?;
        let mut info = RecoveryWindow {
            oldest: first.map(|(k, v)| point_from(k.value(), v.value())),
            newest: last.map(|(k, v)| point_from(k.value(), v.value())),
            points: p.len().map_err(|x| e(x.into()))?,
            ..RecoveryWindow::default()
        };
        let Some(limit) = flush_limit else { return Ok(info) };
        for entry in p.iter().map_err(|x| e(x.into()))?.rev() {
            let (k, v) = entry.map_err(|x| e(x.into()))?;
            let r = point_from(k.value(), v.value());
            if r.flush {
                info.flush_count += 1;
                if info.flush_points.len() < limit {
                    info.flush_points.push(r);
                }
            }
        }
        info.flush_points.reverse();
        Ok(info)
    }

    /// The point `at` picks: the last unit end of the window at or before a sequence number, or
    /// the newest whose capture time is at or before a time; never past `applied`.
    pub fn resolve(&self, at: At, applied: u64) -> Result<RecoveryPoint, CowError> {
        let e = self.err();
        let Some(from) = self.points.window() else {
            return Err(CowError::NoPoint(
                "no retention window is kept for this volume (set `retention` or `retention_bytes` in its configuration)"
                    .into(),
            ));
        };
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let p = tx.open_table(POINTS).map_err(|x| e(x.into()))?;
        let mut found = None;
        for entry in p.range(from..=applied).map_err(|x| e(x.into()))?.rev() {
            let (k, v) = entry.map_err(|x| e(x.into()))?;
            let r = point_from(k.value(), v.value());
            let fits = match at {
                At::Seq(n) => r.seq <= n,
                At::Time(t) => r.capture_unix != 0 && u64::from(r.capture_unix) <= t,
            };
            if fits {
                found = Some(r);
                break;
            }
        }
        found.ok_or_else(|| {
            let what = match at {
                At::Seq(n) => format!("sequence {n}"),
                At::Time(t) => format!("time {t} (seconds since the UNIX epoch)"),
            };
            CowError::NoPoint(format!(
                "{what} is before the retention window, which starts at sequence {from}: `drv snapshot points` shows what can be recovered"
            ))
        })
    }

    /// The oldest point of the window that `gone` does not call expired (scanning from the
    /// oldest), and the `n`th point (0: the oldest), each if there is one.
    pub fn first_kept(
        &self,
        gone: impl Fn(&RecoveryPoint) -> bool,
        n: u64,
    ) -> Result<(Option<RecoveryPoint>, Option<RecoveryPoint>), CowError> {
        let e = self.err();
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let p = tx.open_table(POINTS).map_err(|x| e(x.into()))?;
        let mut kept = None;
        for entry in p.iter().map_err(|x| e(x.into()))? {
            let (k, v) = entry.map_err(|x| e(x.into()))?;
            let r = point_from(k.value(), v.value());
            if !gone(&r) {
                kept = Some(r);
                break;
            }
        }
        let nth = match p.iter().map_err(|x| e(x.into()))?.nth(n as usize) {
            Some(entry) => {
                let (k, v) = entry.map_err(|x| e(x.into()))?;
                Some(point_from(k.value(), v.value()))
            }
            None => None,
        };
        Ok((kept, nth))
    }

    /// The window's point at `seq`, if it has one.
    pub fn point(&self, seq: u64) -> Result<Option<RecoveryPoint>, CowError> {
        let e = self.err();
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let p = tx.open_table(POINTS).map_err(|x| e(x.into()))?;
        Ok(p.get(seq).map_err(|x| e(x.into()))?.map(|v| point_from(seq, v.value())))
    }

    /// Per point position, the bytes of the versions only it needs (what deleting its snapshot
    /// frees). Reads every version.
    pub fn own_bytes(&self) -> Result<std::collections::BTreeMap<u64, u64>, CowError> {
        let e = self.err();
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let versions = tx.open_table(VERSIONS).map_err(|x| e(x.into()))?;
        let mut own = std::collections::BTreeMap::new();
        for entry in versions.iter().map_err(|x| e(x.into()))? {
            let (k, v) = entry.map_err(|x| e(x.into()))?;
            if let Some(p) = self.points.sole(v.value().0, k.value().1) {
                *own.entry(p).or_insert(0) += self.slot_bytes;
            }
        }
        Ok(own)
    }

    /// Space in use.
    pub fn usage(&self) -> Result<Usage, CowError> {
        let e = self.err();
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let c = tx.open_table(COUNTERS).map_err(|x| e(x.into()))?;
        let versions = c.get("versions").map_err(|x| e(x.into()))?.map(|v| v.value()).unwrap_or(0);
        Ok(Usage { used_bytes: versions * self.slot_bytes, versions })
    }

    /// Preserves what the points need of the blocks `writes` (one apply batch, in order) are about
    /// to overwrite on `target`: copies into free slots, syncs them, then commits the versions.
    /// Returns the versions preserved. Call it before any of the writes reaches the target.
    /// With a window, the batch's unit ends `ends` become its points in the same commit.
    pub fn preserve(&self, target: &File, writes: &[Write], ends: &[UnitEnd]) -> Result<Vec<Version>, CowError> {
        if self.points.is_empty() {
            return Ok(Vec::new());
        }
        let record_ends = self.points.window().is_some() && !ends.is_empty();
        let e = self.err();
        let tx = self.db.begin_write().map_err(|x| e(x.into()))?;
        let plan = {
            let versions = tx.open_table(VERSIONS).map_err(|x| e(x.into()))?;
            let mut failed = None;
            let plan = cow::plan(&self.points, self.slot_bytes, writes, |block| {
                match versions.range((block, 0)..=(block, u64::MAX)).map(|mut r| r.next_back()) {
                    Ok(Some(Ok((k, _)))) => k.value().1,
                    Ok(None) => 0,
                    Ok(Some(Err(x))) | Err(x) => {
                        failed.get_or_insert(x);
                        0
                    }
                }
            });
            if let Some(x) = failed {
                return Err(e(x.into()));
            }
            plan
        };
        if plan.is_empty() && !record_ends {
            return Ok(plan);
        }
        // Only the unit ends to record: no slot is taken (nor refused for a full store).
        let slots = if plan.is_empty() { Vec::new() } else { self.take_slots(&tx, plan.len())? };
        let mut buf = vec![0u8; self.slot_bytes as usize];
        for (v, slot) in plan.iter().zip(&slots) {
            read_block(target, v.block * self.slot_bytes, &mut buf).map_err(|err| CowError::Io {
                path: "target".into(),
                what: format!("read block {}", v.block),
                err,
            })?;
            self.data.write_all_at(&buf, slot * self.slot_bytes).map_err(self.io(format!("write slot {slot}")))?;
        }
        if !plan.is_empty() {
            self.data.sync_data().map_err(self.io("fdatasync".into()))?;
        }
        {
            let mut versions = tx.open_table(VERSIONS).map_err(|x| e(x.into()))?;
            let mut expiring = tx.open_table(EXPIRING).map_err(|x| e(x.into()))?;
            let window = self.points.window();
            for (v, slot) in plan.iter().zip(&slots) {
                versions.insert((v.block, v.hi), (v.lo, *slot)).map_err(|x| e(x.into()))?;
                if window.is_some_and(|w| w < v.hi) {
                    expiring.insert((v.hi, v.block), ()).map_err(|x| e(x.into()))?;
                }
            }
            if record_ends {
                let mut p = tx.open_table(POINTS).map_err(|x| e(x.into()))?;
                let applied_unix = unix_now();
                for u in ends {
                    let r = RecoveryPoint {
                        seq: u.seq,
                        epoch: u.epoch,
                        capture_unix: u.capture_unix,
                        applied_unix,
                        flush: u.flush,
                    };
                    p.insert(u.seq, point_entry(&r)).map_err(|x| e(x.into()))?;
                }
            }
        }
        tx.commit().map_err(|x| e(x.into()))?;
        if !plan.is_empty() {
            self.preserved.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(plan)
    }

    /// How many of `writes` one apply pass takes ([`cow::pass_len`]).
    pub fn pass_len(&self, writes: &[Write]) -> usize {
        cow::pass_len(&self.points, self.slot_bytes, writes)
    }

    /// `n` slots: free ones first, then new ones past the end, within the limit.
    fn take_slots(&self, tx: &redb::WriteTransaction, n: usize) -> Result<Vec<u64>, CowError> {
        let e = self.err();
        let mut free = tx.open_table(FREE).map_err(|x| e(x.into()))?;
        let mut slots = Vec::with_capacity(n);
        while slots.len() < n {
            match free.pop_first().map_err(|x| e(x.into()))? {
                Some((k, _)) => slots.push(k.value()),
                None => break,
            }
        }
        let mut c = tx.open_table(COUNTERS).map_err(|x| e(x.into()))?;
        let next = c.get("next_slot").map_err(|x| e(x.into()))?.map(|v| v.value()).unwrap_or(0);
        let more = (n - slots.len()) as u64;
        let in_use = counter(&c, "versions").map_err(|x| e(x.into()))?;
        if let Some(limit) = self.limit_bytes {
            let used = (in_use + n as u64) * self.slot_bytes;
            if used > limit {
                return Err(CowError::Full { path: self.db_path.clone(), used: in_use * self.slot_bytes, limit });
            }
        }
        slots.extend(next..next + more);
        c.insert("next_slot", next + more).map_err(|x| e(x.into()))?;
        c.insert("versions", in_use + n as u64).map_err(|x| e(x.into()))?;
        Ok(slots)
    }

    /// Reads block `block` of the image at position `seq` (a snapshot's) into `buf` (one block,
    /// shorter for the volume's last block): from its version, or from `target`, checking again
    /// after a target read (the apply step preserves before it overwrites).
    pub fn read_at_point(&self, target: &File, seq: u64, block: u64, buf: &mut [u8]) -> Result<(), CowError> {
        self.read_range_at_point(target, seq, block * self.slot_bytes, buf)
    }

    /// Whether a snapshot pins position `seq` (its image is kept).
    pub fn pinned(&self, seq: u64) -> bool {
        self.points.is_pinned(seq)
    }

    /// Reads `buf.len()` bytes at `offset` of the image at position `seq` (within the volume):
    /// runs of blocks the store holds no version of in one target read each, the others from
    /// their slots, only the bytes asked for; then, as any reader of the target must (the apply
    /// step preserves before it overwrites), the sources are looked up again (unless no commit
    /// added versions meanwhile) and a block whose version appeared is read again from it.
    pub fn read_range_at_point(&self, target: &File, seq: u64, offset: u64, buf: &mut [u8]) -> Result<(), CowError> {
        if buf.is_empty() {
            return Ok(());
        }
        let (bs, end) = (self.slot_bytes, offset + buf.len() as u64);
        let first = offset / bs;
        let n = (end - 1) / bs - first + 1;
        // The bytes of block index `i` (from `first`) within the request: (from, to) in the image.
        let span = |i: u64| (((first + i) * bs).max(offset), ((first + i + 1) * bs).min(end));
        let mut generation = self.preserved.load(std::sync::atomic::Ordering::SeqCst);
        let mut src = self.sources(seq, first, n)?;
        let mut todo = vec![true; n as usize];
        loop {
            let mut i = 0;
            while i < n {
                if !todo[i as usize] {
                    i += 1;
                    continue;
                }
                if let Some(slot) = src[i as usize] {
                    let (from, to) = span(i);
                    let at = slot * bs + from % bs;
                    let part = &mut buf[(from - offset) as usize..(to - offset) as usize];
                    self.data.read_exact_at(part, at).map_err(self.io(format!("read slot {slot}")))?;
                    i += 1;
                    continue;
                }
                let mut j = i + 1;
                while j < n && todo[j as usize] && src[j as usize].is_none() {
                    j += 1;
                }
                let (from, to) = (span(i).0, span(j - 1).1);
                read_block(target, from, &mut buf[(from - offset) as usize..(to - offset) as usize]).map_err(
                    |err| CowError::Io { path: "target".into(), what: format!("read bytes {from}..{to}"), err },
                )?;
                i = j;
            }
            // No commit added versions since the lookup: the target reads were the point's.
            let now = self.preserved.load(std::sync::atomic::Ordering::SeqCst);
            if now == generation {
                return Ok(());
            }
            generation = now;
            let again = self.sources(seq, first, n)?;
            let mut any = false;
            for k in 0..n as usize {
                todo[k] = src[k].is_none() && again[k].is_some();
                any |= todo[k];
            }
            if !any {
                return Ok(());
            }
            src = again;
        }
    }

    /// The slot of the version each block of `first..first + n` reads at position `seq`
    /// (`None`: the target), in one read transaction: one seek per block that has versions.
    fn sources(&self, seq: u64, first: u64, n: u64) -> Result<Vec<Option<u64>>, CowError> {
        let e = self.err();
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let versions = tx.open_table(VERSIONS).map_err(|x| e(x.into()))?;
        let mut out = vec![None; n as usize];
        let (mut b, end) = (first, first + n);
        while b < end {
            let mut r = versions.range((b, seq + 1)..=(end - 1, u64::MAX)).map_err(|x| e(x.into()))?;
            let Some(entry) = r.next() else { break };
            let (k, v) = entry.map_err(|x| e(x.into()))?;
            let ((vb, hi), (lo, slot)) = (k.value(), v.value());
            if vb != b {
                // No version of `b` ends after `seq`; `vb`'s first entry may end before it.
                b = vb;
                continue;
            }
            let version = Version { block: b, lo, hi };
            if matches!(cow::read_source(seq, [&version]), Source::Version(_)) {
                out[(b - first) as usize] = Some(slot);
            }
            b += 1;
        }
        Ok(out)
    }

    /// Bytes the data file occupies on disk (freed slots are handed back).
    pub fn data_disk_bytes(&self) -> Result<u64, CowError> {
        use std::os::unix::fs::MetadataExt;
        let m = self.data.metadata().map_err(self.io("stat".into()))?;
        Ok(m.blocks() * 512)
    }
}

/// A version to free: its key `(block, hi)` and its slot.
type Dead = ((u64, u64), u64);

/// Versions one expiry step frees at most (one commit).
const EXPIRE_STEP: usize = 65_536;

fn point_entry(r: &RecoveryPoint) -> (u64, u32, u64, u8) {
    (r.epoch, r.capture_unix, r.applied_unix, u8::from(r.flush))
}

fn counter(c: &redb::Table<&str, u64>, name: &str) -> Result<u64, redb::StorageError> {
    Ok(c.get(name)?.map(|v| v.value()).unwrap_or(0))
}

fn parse_meta(path: &str, bytes: &[u8]) -> Result<SnapshotMeta, CowError> {
    serde_json::from_slice(bytes).map_err(|e| CowError::Io {
        path: path.to_owned(),
        what: "a snapshot's record".into(),
        err: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

/// Reads `buf.len()` bytes at `offset`; what lies past the end of `f` reads as zeros.
fn read_block(f: &File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// Hands a freed slot's space back to the file system (best effort: a file system without hole
/// punching keeps it allocated, and the slot is reused anyway).
fn punch_hole(f: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate(2) on an open descriptor with plain integer arguments.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        tracing::debug!("punch a hole at {offset} in the snapshot store: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u64 = 4096;

    fn target(dir: &Path, blocks: u64) -> File {
        let f =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.join("t")).unwrap();
        f.set_len(blocks * BS).unwrap();
        f
    }

    fn fill(b: u64, v: u8) -> Vec<u8> {
        vec![v.wrapping_add(b as u8); BS as usize]
    }

    /// Writes block `b` with value `v` in the unit ending at `e`, through the store first.
    fn write(s: &CowStore, t: &File, b: u64, v: u8, e: u64) {
        s.preserve(t, &[Write { offset: b * BS, len: BS, unit_end: e }], &[]).unwrap();
        t.write_all_at(&fill(b, v), b * BS).unwrap();
    }

    fn read(s: &CowStore, t: &File, seq: u64, b: u64) -> Vec<u8> {
        let mut buf = vec![0u8; BS as usize];
        s.read_at_point(t, seq, b, &mut buf).unwrap();
        // The range read agrees: the block alone, and within the whole image.
        let mut one = vec![0u8; BS as usize];
        s.read_range_at_point(t, seq, b * BS, &mut one).unwrap();
        assert_eq!(one, buf, "block {b} at {seq}");
        let mut all = vec![0u8; t.metadata().unwrap().len() as usize];
        s.read_range_at_point(t, seq, 0, &mut all).unwrap();
        assert_eq!(&all[(b * BS) as usize..((b + 1) * BS) as usize], &buf[..], "block {b} at {seq} in the image");
        // And any part of it, across its neighbours.
        let (from, to) = ((b * BS).saturating_sub(100) + 7, ((b + 1) * BS + 300).min(all.len() as u64));
        let mut part = vec![0u8; (to - from) as usize];
        s.read_range_at_point(t, seq, from, &mut part).unwrap();
        assert_eq!(&part[..], &all[from as usize..to as usize], "bytes {from}..{to} at {seq}");
        buf
    }

    /// Reads of a snapshot's whole image while the apply step overwrites its blocks (preserve,
    /// then the target write) always show the snapshot's image.
    #[test]
    fn range_reads_during_apply_show_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path(), 32);
        for b in 0..32 {
            t.write_all_at(&fill(b, 1), b * BS).unwrap();
        }
        let mut s = CowStore::open(&dir.path().join("store"), 1, BS, None).unwrap();
        s.create("a", 2, 1, 0).unwrap();
        let want: Vec<u8> = (0..32).flat_map(|b| fill(b, 1)).collect();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for e in 3..400u64 {
                    write(&s, &t, e * 7 % 32, e as u8, e);
                }
                done.store(true, std::sync::atomic::Ordering::Relaxed);
            });
            let mut reads = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) || reads == 0 {
                let mut all = vec![0u8; 32 * BS as usize];
                s.read_range_at_point(&t, 2, 0, &mut all).unwrap();
                assert!(all == want, "read {reads} differs from the snapshot");
                reads += 1;
            }
        });
    }

    #[test]
    fn snapshots_keep_their_images_share_versions_and_delete_frees() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path(), 8);
        let mut s = CowStore::open(&dir.path().join("store"), 1, BS, None).unwrap();
        write(&s, &t, 0, 1, 1);
        write(&s, &t, 1, 1, 2);
        assert_eq!(s.usage().unwrap().versions, 0, "no snapshot: nothing preserved");
        s.create("a", 2, 1, 0).unwrap();
        s.create("b", 2, 1, 0).unwrap();
        assert!(matches!(s.create("a", 2, 1, 0), Err(CowError::Exists(_))));
        write(&s, &t, 0, 2, 3);
        write(&s, &t, 0, 3, 4);
        s.create("c", 4, 2, 0).unwrap();
        write(&s, &t, 0, 4, 5);
        write(&s, &t, 2, 4, 5);
        // Block 0: one version for a and b (written at 1, overwritten at 3), one for c.
        assert_eq!(s.usage().unwrap().versions, 3);
        for snap in [2, 2, 4] {
            assert_eq!(read(&s, &t, snap, 1), fill(1, 1), "block 1 never changed");
        }
        assert_eq!(read(&s, &t, 2, 0), fill(0, 1));
        assert_eq!(read(&s, &t, 4, 0), fill(0, 3));
        assert_eq!(read(&s, &t, 4, 2), vec![0; BS as usize], "block 2 was zero at c");
        // Reopened: the same.
        drop(s);
        let mut s = CowStore::open(&dir.path().join("store"), 1, BS, None).unwrap();
        assert_eq!(s.list().unwrap().iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(read(&s, &t, 2, 0), fill(0, 1));
        assert_eq!(s.delete("a").unwrap(), 0, "b still needs the version");
        assert_eq!(s.delete("b").unwrap(), BS);
        assert_eq!(read(&s, &t, 4, 0), fill(0, 3), "c is untouched");
        assert!(matches!(s.delete("b"), Err(CowError::NotFound(_))));
        // The freed slot is reused.
        write(&s, &t, 1, 5, 6);
        assert_eq!(s.usage().unwrap().versions, 3);
        assert_eq!(read(&s, &t, 4, 1), fill(1, 1));
        assert_eq!(s.delete("c").unwrap(), 3 * BS);
        assert_eq!(s.usage().unwrap(), Usage::default());
    }

    #[test]
    fn a_full_store_refuses_to_preserve_and_a_store_is_bound_to_its_volume() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path(), 8);
        let mut s = CowStore::open(&dir.path().join("store"), 1, BS, Some(2 * BS)).unwrap();
        s.create("a", 0, 0, 0).unwrap();
        write(&s, &t, 0, 1, 1);
        write(&s, &t, 1, 1, 1);
        let full = s.preserve(&t, &[Write { offset: 2 * BS, len: BS, unit_end: 2 }], &[]).unwrap_err();
        assert!(full.to_string().contains("is full: 8192 of 8192 bytes"), "{full}");
        drop(s);
        let other = CowStore::open(&dir.path().join("store"), 2, BS, None).err().unwrap();
        assert!(other.to_string().contains("belongs to volume 1, not 2"), "{other}");
        let other = CowStore::open(&dir.path().join("store"), 1, 2 * BS, None).err().unwrap();
        assert!(other.to_string().contains("blocks of 4096 bytes"), "{other}");
    }

    /// A crash after the versions were committed and before (or while) the target was written:
    /// the replayed batch preserves nothing again, and the snapshot reads the old content.
    #[test]
    fn a_replayed_batch_does_not_preserve_the_new_content() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path(), 4);
        let mut s = CowStore::open(&dir.path().join("store"), 1, BS, None).unwrap();
        write(&s, &t, 0, 1, 1);
        s.create("a", 1, 1, 0).unwrap();
        let batch = [Write { offset: 0, len: BS, unit_end: 2 }];
        assert_eq!(s.preserve(&t, &batch, &[]).unwrap().len(), 1);
        t.write_all_at(&fill(0, 9), 0).unwrap();
        drop(s);
        let s = CowStore::open(&dir.path().join("store"), 1, BS, None).unwrap();
        assert_eq!(s.preserve(&t, &batch, &[]).unwrap(), [], "already preserved");
        assert_eq!(read(&s, &t, 1, 0), fill(0, 1));
    }

    /// Applies `writes` (block, value, unit end) the way the apply step does: in passes, each
    /// preserved before it is written; the unit ends (with capture time `100 + seq`, a flush at
    /// even ones) recorded with the last pass.
    fn apply(s: &CowStore, t: &File, writes: &[(u64, u8, u64)]) {
        let ws: Vec<Write> = writes.iter().map(|&(b, _, e)| Write { offset: b * BS, len: BS, unit_end: e }).collect();
        let mut ends: Vec<UnitEnd> = writes
            .iter()
            .map(|&(_, _, e)| UnitEnd { seq: e, epoch: e, capture_unix: 100 + e as u32, flush: e % 2 == 0 })
            .collect();
        ends.dedup();
        let mut done = 0;
        while done < ws.len() {
            let n = s.pass_len(&ws[done..]);
            let last = done + n == ws.len();
            s.preserve(t, &ws[done..done + n], if last { &ends } else { &[] }).unwrap();
            for &(b, v, _) in &writes[done..done + n] {
                t.write_all_at(&fill(b, v), b * BS).unwrap();
            }
            done += n;
        }
    }

    #[test]
    fn the_window_keeps_every_unit_end_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path(), 4);
        let mut s = CowStore::open(&dir.path().join("store"), 1, BS, None).unwrap();
        apply(&s, &t, &[(0, 1, 1)]);
        let no = s.resolve(At::Seq(1), 1).unwrap_err().to_string();
        assert!(no.contains("no retention window"), "{no}");
        s.open_window(RecoveryPoint { seq: 1, epoch: 1, ..Default::default() }).unwrap();
        // One batch, block 0 written in three units (three passes), block 1 in two.
        apply(&s, &t, &[(0, 2, 2), (1, 2, 2), (0, 3, 3), (1, 3, 4), (0, 4, 4)]);
        apply(&s, &t, &[(2, 5, 5)]);
        let want = |p: u64, b: u64| -> Vec<u8> {
            let v = match (p, b) {
                (1, 0) => 1,
                (2 | 3, 1) => 2,
                (2, 0) => 2,
                (3, 0) => 3,
                (4 | 5, 0) => 4,
                (4 | 5, 1) => 3,
                (5, 2) => 5,
                _ => return vec![0; BS as usize],
            };
            fill(b, v)
        };
        for p in 1..=5 {
            for b in 0..3 {
                assert_eq!(read(&s, &t, p, b), want(p, b), "point {p} block {b}");
            }
        }
        // Points: by sequence and by capture time (100 + seq); a flush at even ones.
        assert_eq!(s.resolve(At::Seq(3), 5).unwrap().seq, 3);
        assert_eq!(s.resolve(At::Time(104), 5).unwrap().seq, 4);
        assert_eq!(s.resolve(At::Seq(99), 4).unwrap().seq, 4, "never past the applied position");
        let w = s.window_info(10).unwrap();
        assert_eq!((w.points, w.oldest.unwrap().seq, w.newest.unwrap().seq, w.flush_count), (5, 1, 5, 2));
        assert_eq!(w.flush_points.iter().map(|p| p.seq).collect::<Vec<_>>(), [2, 4]);
        // A snapshot pinned afterwards at 3 outlives the window's move past it.
        s.create("was", 3, 3, 103).unwrap();
        let before = s.usage().unwrap().versions;
        let (freed, more) = s.expire_to(4).unwrap();
        assert!(!more);
        assert!(freed > 0 && s.usage().unwrap().versions < before, "versions only points 1..3 needed are freed");
        let e = s.resolve(At::Seq(2), 5).unwrap_err().to_string();
        assert!(e.contains("before the retention window, which starts at sequence 4"), "{e}");
        for b in 0..3 {
            assert_eq!(read(&s, &t, 3, b), want(3, b), "snapshot block {b}");
            assert_eq!(read(&s, &t, 4, b), want(4, b), "point 4 block {b}");
        }
        // Reopened: the same window.
        drop(s);
        let mut s = CowStore::open(&dir.path().join("store"), 1, BS, None).unwrap();
        assert_eq!(s.window(), Some(4));
        assert_eq!(read(&s, &t, 4, 0), want(4, 0));
        s.close_window().unwrap();
        assert_eq!(s.window(), None);
        assert_eq!(read(&s, &t, 3, 0), want(3, 0), "the snapshot stays");
        s.delete("was").unwrap();
        assert_eq!(s.usage().unwrap(), Usage::default());
    }
}
