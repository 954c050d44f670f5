//! Recovery checks (`drv snapshot check VOLUME NAME`, and on a schedule with the volume's
//! `check_interval`): proof, before any disaster, that a point of the replica mounts and checks
//! clean.
//!
//! A check serves the snapshot as a loop device through a private overlay (`image.rs`; the
//! snapshot never changes), asks `blkid` what is there, and runs each
//! filesystem's own checker: ext2/3/4 `e2fsck -E journal_only -y` (the journal replayed, as a
//! mount would, into the overlay) then `e2fsck -fn`; xfs a mount and unmount (the log replayed)
//! then `xfs_repair -n`. A partition table (read by `partx`): each partition, as a loop device of its
//! own at the partition's offset. One check runs at a time per replica.
//!
//! Results are kept in `DATA/checks/VOLUME_ID.json` (replaced whole, atomically): the newest check
//! of each snapshot (shown by `drv snapshot list`, dropped with the snapshot) and the newest 20
//! scheduled ones with the time of the last (so a restart does not run one early). The schedule
//! checks the newest point whose unit ends with a FLUSH when a retention window is kept, else the
//! image now, as a snapshot `check-UNIXTIME` deleted after its check.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cow::At;
use drv_proto::status::{CheckResult, FsCheck};
use drv_userdev::{Attach, UserDevice};
use serde::{Deserialize, Serialize};

use crate::apply::ReplicaVolume;
use crate::image::{Overlay, SnapImage, View};
use crate::snapshot::Snapshots;

/// Scheduled results kept per volume.
const SCHEDULED_KEPT: usize = 20;
/// The end of a checker's output kept with the result.
const OUTPUT_KEPT: usize = 2000;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Record {
    snapshots: BTreeMap<String, CheckResult>,
    scheduled: Vec<CheckResult>,
    last_scheduled_unix: u64,
}

/// The recovery checks of a replica's volumes.
pub struct Checks {
    dir: PathBuf,
    one: Mutex<()>,
    records: Mutex<HashMap<u64, Record>>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Checks {
    /// The checks under `DATA/checks`; devices a previous process left are detached.
    pub fn open(data: &Path) -> Checks {
        let dir = data.join("checks");
        let mut records = HashMap::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let (path, name) = (e.path(), e.file_name().to_string_lossy().into_owned());
                if let Some(id) = name.strip_suffix(".json").and_then(|n| n.parse::<u64>().ok()) {
                    match std::fs::read(&path).map(|b| serde_json::from_slice::<Record>(&b)) {
                        Ok(Ok(r)) => drop(records.insert(id, r)),
                        _ => tracing::warn!("{}: unreadable recovery-check results, started afresh", path.display()),
                    }
                } else if name.starts_with("dev-") {
                    let _ = drv_userdev::recover(&path);
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
        }
        Checks { dir, one: Mutex::new(()), records: Mutex::new(records) }
    }

    /// The newest check of snapshot `name` of `v`.
    pub fn of_snapshot(&self, v: &ReplicaVolume, name: &str) -> Option<CheckResult> {
        self.records.lock().expect("checks").get(&v.id)?.snapshots.get(name).cloned()
    }

    /// The newest check of `v`, scheduled or asked for.
    pub fn last(&self, v: &ReplicaVolume) -> Option<CheckResult> {
        let g = self.records.lock().expect("checks");
        let r = g.get(&v.id)?;
        r.scheduled.iter().chain(r.snapshots.values()).max_by_key(|c| c.started_unix).cloned()
    }

    /// Forgets the check of a deleted snapshot.
    pub fn forget(&self, v: &ReplicaVolume, name: &str) {
        let mut g = self.records.lock().expect("checks");
        if let Some(r) = g.get_mut(&v.id)
            && r.snapshots.remove(name).is_some()
        {
            self.save(v.id, r);
        }
    }

    fn save(&self, id: u64, r: &Record) {
        let path = self.dir.join(format!("{id}.json"));
        let res = std::fs::create_dir_all(&self.dir)
            .and_then(|()| drv_files::replace(&path, &serde_json::to_vec(r).expect("serializable")));
        if let Err(e) = res {
            tracing::error!("{}: keep the recovery-check results: {e}", path.display());
        }
    }

    /// Whether the schedule wants a check of `v` now.
    pub fn due(&self, v: &ReplicaVolume, now: u64) -> bool {
        let Some(every) = v.limits().check_interval_secs else { return false };
        let last = self.records.lock().expect("checks").get(&v.id).map_or(0, |r| r.last_scheduled_unix);
        now >= last.saturating_add(every)
    }

    /// Checks snapshot `name` of `v` (blocking; one check at a time) and keeps the result.
    pub fn run(
        &self,
        snaps: &Arc<Snapshots>,
        v: &Arc<ReplicaVolume>,
        name: &str,
        scheduled: bool,
        rt: tokio::runtime::Handle,
    ) -> Result<CheckResult, String> {
        let _one = self.one.lock().expect("one check");
        let meta = snaps.get(v, name).map_err(|e| e.to_string())?;
        let (started_unix, t0) = (now_unix(), Instant::now());
        let state = self.dir.join(format!("dev-{}-{name}", v.id));
        let _ = drv_userdev::recover(&state);
        std::fs::create_dir_all(&state).map_err(|e| format!("create {}: {e}", state.display()))?;
        let base = SnapImage::new(snaps.clone(), v.clone(), name, meta.seq);
        let view = Arc::new(View { base, overlay: Some(Arc::new(Overlay::create(&self.dir, v.size_bytes)?)) });
        let label = format!("check:{}@{name}", v.name);
        let attach = Attach { label: &label, size: v.size_bytes, state: &state, read_only: false };
        let mut dev =
            UserDevice::attach(attach, drv_userdev::ImageBackend { image: view, rt }).map_err(|e| e.to_string())?;
        let filesystems = check_device(&dev.loop_dev, &state);
        let detached = detach_patiently(&mut dev);
        let _ = std::fs::remove_dir_all(&state);
        detached?;
        let ok = !filesystems.is_empty() && filesystems.iter().all(|f| f.clean);
        let result = CheckResult {
            volume: v.name.clone(),
            snapshot: name.to_owned(),
            seq: meta.seq,
            capture_unix: meta.capture_unix,
            summary: summary(&filesystems, ok),
            filesystems,
            ok,
            started_unix,
            millis: t0.elapsed().as_millis() as u64,
            scheduled,
        };
        let mut g = self.records.lock().expect("checks");
        let r = g.entry(v.id).or_default();
        if scheduled {
            r.scheduled.push(result.clone());
            let over = r.scheduled.len().saturating_sub(SCHEDULED_KEPT);
            r.scheduled.drain(..over);
            r.last_scheduled_unix = started_unix;
        } else {
            r.snapshots.insert(name.to_owned(), result.clone());
        }
        self.save(v.id, r);
        if ok {
            tracing::info!(volume = %v.name, snapshot = name, "recovery check: {}", result.summary);
        } else {
            tracing::error!(volume = %v.name, snapshot = name, "recovery check FAILED: {}", result.summary);
        }
        Ok(result)
    }

    /// A scheduled check of `v`: a snapshot of its newest flush point (or of now), checked, then
    /// deleted. `None` when the volume has no consistent point to check now.
    pub fn scheduled(
        &self,
        snaps: &Arc<Snapshots>,
        v: &Arc<ReplicaVolume>,
        rt: tokio::runtime::Handle,
    ) -> Option<Result<CheckResult, String>> {
        let name = format!("check-{}", now_unix());
        let at = snaps
            .points(v, 1)
            .ok()
            .and_then(|p| p.window)
            .and_then(|w| w.flush_points.last().map(|p| p.seq))
            .map(At::Seq);
        if let Err(e) = snaps.create(v, &name, at) {
            tracing::debug!(volume = %v.name, "no scheduled recovery check now: {e}");
            return None;
        }
        let r = self.run(snaps, v, &name, true, rt);
        if let Err(e) = snaps.delete(v, &name) {
            tracing::warn!(volume = %v.name, snapshot = %name, "delete the scheduled check's snapshot: {e}");
        }
        Some(r)
    }
}

fn detach_patiently(dev: &mut UserDevice) -> Result<(), String> {
    // A checker just exited may hold the device for a moment.
    let mut last = String::new();
    for _ in 0..50 {
        match dev.detach() {
            Ok(()) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last)
}

fn summary(fs: &[FsCheck], ok: bool) -> String {
    if fs.is_empty() {
        return "nothing to check".into();
    }
    let parts: Vec<String> = fs
        .iter()
        .map(|f| {
            let verdict = if f.clean {
                "clean"
            } else if f.checker.is_empty() {
                "not checked"
            } else {
                "ERRORS"
            };
            format!("{} {}: {verdict}", f.part, f.filesystem)
        })
        .collect();
    format!("{} ({})", if ok { "clean" } else { "FAILED" }, parts.join("; "))
}

/// A command's exit code and the end of its output.
fn run(cmd: &str, args: &[&str]) -> (Option<i32>, String) {
    match Command::new(cmd).args(args).output() {
        Ok(o) => {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            let cut = text.len().saturating_sub(OUTPUT_KEPT);
            let cut = (cut..text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
            (o.status.code(), text[cut..].to_owned())
        }
        Err(e) => (None, format!("run {cmd}: {e}")),
    }
}

/// `blkid -p`'s `TYPE` and `PTTYPE` of a device.
fn probe(dev: &str) -> (Option<String>, Option<String>) {
    let (_, out) = run("blkid", &["-p", "-o", "export", dev]);
    let get = |k: &str| out.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).map(str::to_owned);
    (get("TYPE"), get("PTTYPE"))
}

/// Checks what is on `dev`: a filesystem on the whole image, or each partition's.
fn check_device(dev: &Path, state: &Path) -> Vec<FsCheck> {
    let d = dev.display().to_string();
    match probe(&d) {
        (Some(fs), _) => vec![check_fs(&d, &fs, "whole image", state)],
        (None, Some(pt)) => {
            let parts = match partitions(&d) {
                Ok(p) if !p.is_empty() => p,
                found => {
                    let why = found.err().unwrap_or_else(|| "no partitions in it".into());
                    return vec![FsCheck {
                        part: "whole image".into(),
                        filesystem: format!("{pt} partition table"),
                        output: why,
                        ..FsCheck::default()
                    }];
                }
            };
            parts
                .iter()
                .map(|p| {
                    let part = format!("partition {}", p.number);
                    match probe(&p.dev).0 {
                        Some(fs) => check_fs(&p.dev, &fs, &part, state),
                        None => FsCheck { part, filesystem: "none".into(), clean: true, ..FsCheck::default() },
                    }
                })
                .collect()
        }
        (None, None) => vec![FsCheck {
            part: "whole image".into(),
            filesystem: "none".into(),
            output: "blkid found no filesystem and no partition table".into(),
            ..FsCheck::default()
        }],
    }
}

/// A partition of the checked image, as a loop device of its own over the image's (the table
/// is read in userspace by `partx`: a kernel without the table's parser still gets its checks).
struct Partition {
    number: u32,
    dev: String,
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = run("losetup", &["-d", &self.dev]);
    }
}

/// The partitions of `dev`'s table, each bound to a loop device.
fn partitions(dev: &str) -> Result<Vec<Partition>, String> {
    let (code, out) = run("partx", &["--show", "--bytes", "--noheadings", "-o", "NR,START,SECTORS", dev]);
    if code != Some(0) {
        return Err(format!("partx: {out}"));
    }
    let mut parts = Vec::new();
    for l in out.lines() {
        let f: Vec<u64> = l.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        let [nr, start, sectors] = f[..] else { continue };
        let (off, len) = ((start * 512).to_string(), (sectors * 512).to_string());
        let (code, out) = run("losetup", &["--find", "--show", "--offset", &off, "--sizelimit", &len, dev]);
        if code != Some(0) {
            return Err(format!("losetup of partition {nr}: {out}"));
        }
        parts.push(Partition { number: nr as u32, dev: out.trim().to_owned() });
    }
    Ok(parts)
}

/// Checks one filesystem with its own checker.
fn check_fs(dev: &str, fs: &str, part: &str, state: &Path) -> FsCheck {
    let mut c = FsCheck { part: part.into(), filesystem: fs.into(), ..FsCheck::default() };
    match fs {
        "ext2" | "ext3" | "ext4" => {
            // Exit 1: the journal was replayed (into the overlay).
            let (code, out) = run("e2fsck", &["-E", "journal_only", "-y", dev]);
            if !matches!(code, Some(0 | 1)) {
                c.checker = format!("e2fsck -E journal_only -y {dev}");
                (c.exit_code, c.output) = (code, out);
                return c;
            }
            c.checker = format!("e2fsck -fn {dev}");
            (c.exit_code, c.output) = run("e2fsck", &["-fn", dev]);
        }
        "xfs" => {
            // A mount replays the log (into the overlay); xfs_repair -n refuses a dirty log.
            let mnt = state.join("xfs");
            let _ = std::fs::create_dir_all(&mnt);
            let m = mnt.display().to_string();
            let (code, out) = run("mount", &["-t", "xfs", dev, &m]);
            if code != Some(0) {
                c.checker = format!("mount -t xfs {dev}");
                (c.exit_code, c.output) = (code, out);
                return c;
            }
            let _ = run("umount", &[&m]);
            c.checker = format!("xfs_repair -n {dev}");
            (c.exit_code, c.output) = run("xfs_repair", &["-n", dev]);
        }
        "swap" => {
            c.clean = true;
            c.output = "swap space: nothing to check".into();
            return c;
        }
        other => {
            c.output = format!("no checker for {other} here (ext2/3/4 and xfs are checked)");
            return c;
        }
    }
    c.clean = c.exit_code == Some(0);
    c
}
