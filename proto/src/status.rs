//! The status replies of the servers (`drv status`, the tests, the benchmarks): one serde type per
//! reply, built by the server and read by every client, so a field is named in one place.

use serde::{Deserialize, Serialize};

/// What staging answers to a status request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StagingStatus {
    pub role: String,
    pub name: String,
    pub uptime_seconds: f64,
    /// Connected peers (address, and `(link)` for agents on the agent link).
    pub peers: Vec<String>,
    pub volumes: Vec<StagingVolume>,
    pub wrls: Vec<WrlSummary>,
}

/// One volume at staging.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StagingVolume {
    pub volume_id: u64,
    pub name: String,
    pub wrl: String,
    /// The last write taken (submitted to the WRL).
    pub received_seq: u64,
    /// The last write durable in the WRL (acknowledged).
    pub durable_seq: u64,
    pub last_epoch: u64,
    /// The last write every replica holds durably.
    pub replicated_seq: u64,
    pub lag_records: u64,
    pub lag_bytes: u64,
    /// Age of the oldest write not yet at every replica.
    pub lag_seconds: f64,
    /// Payload bytes durable in the WRL since staging started, and durable on every replica
    /// (records replicated before a restart are not counted again).
    /// Replication paused by the configuration (writes logged, none relayed).
    #[serde(default)]
    pub paused: bool,
    #[serde(default)]
    pub written_bytes: u64,
    #[serde(default)]
    pub replicated_bytes: u64,
    pub replicas: Vec<ReplicaLink>,
}

/// The relay of one volume to one replica.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaLink {
    pub replica: String,
    pub connected: bool,
    pub sent_seq: u64,
    pub durable_seq: u64,
    pub applied_seq: u64,
    pub reconnects: u64,
    /// The replica holds nothing of the volume and this log no longer holds its first records:
    /// it waits for an initial sync from the agent (a run whose first record is `FULL`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub waiting_full_sync: bool,
}

/// One WRL at staging.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WrlSummary {
    pub wrl: String,
    pub first_lsn: u64,
    pub durable_lsn: u64,
    pub trim_lsn: u64,
    pub used_segments: u64,
    pub total_segments: u64,
    pub cache_bytes: u64,
    pub appends: u64,
    pub batches: u64,
    pub cache_reads: u64,
    pub disk_reads: u64,
    /// Why the log stopped taking writes, if it did.
    pub failed: Option<String>,
}

/// What a replica answers to a status request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub role: String,
    pub name: String,
    pub uptime_seconds: f64,
    pub peers: Vec<String>,
    pub volumes: Vec<ReplicaVolume>,
    pub drlog: DrLogSummary,
}

/// Where a replica's volume is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeState {
    /// Applying epochs as they come: the target is crash-consistent.
    #[default]
    Replicating,
    /// A resync run is arriving: the target is consistent again when it is applied whole.
    Resyncing,
    /// A media resync is in progress (see `media`).
    MediaResync,
    /// The apply step stopped (see `error`).
    Error,
    /// Failed over (`drv failover`): apply holds; the point serves as a writable device.
    FailedOver,
}

impl std::fmt::Display for VolumeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VolumeState::Replicating => "replicating",
            VolumeState::Resyncing => "resyncing",
            VolumeState::MediaResync => "media-resync",
            VolumeState::Error => "error",
            VolumeState::FailedOver => "failed-over",
        })
    }
}

/// One volume at a replica.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaVolume {
    pub volume_id: u64,
    pub name: String,
    pub target: String,
    pub state: VolumeState,
    pub media: Option<Phase>,
    pub received_seq: u64,
    pub durable_seq: u64,
    pub applied_seq: u64,
    pub applied_epoch: u64,
    pub apply_lag_records: u64,
    /// Records logged and waiting for their unit to complete.
    pub pending_records: u64,
    pub applied_units: u64,
    /// Why the apply step stopped, if it did.
    pub error: Option<String>,
    pub snapshots: Vec<SnapshotInfo>,
    /// Bytes the snapshot store holds for all of them.
    #[serde(default)]
    pub snapshot_store_bytes: u64,
    /// The retention window, when one is kept (its flush points left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<RecoveryWindow>,
    /// Scheduled recovery checks (`check_interval`), in seconds, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_interval_secs: Option<u64>,
    /// The newest recovery check of the volume (scheduled or asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<CheckResult>,
    /// A failover or failover test of the volume, while one lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverInfo>,
}

/// A failover (`drv failover VOLUME`: apply holds, the point is a writable device on the replica
/// host) or a failover test (`--test`: replication goes on).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverInfo {
    pub volume: String,
    pub test: bool,
    /// The snapshot of the point (kept while the failover lasts).
    pub snapshot: String,
    pub seq: u64,
    pub capture_unix: u32,
    pub started_unix: u64,
    /// The writable device on the replica host (empty while it is not attached).
    pub device: String,
    /// Bytes written on the device since the failover began (whole 4 KiB blocks).
    pub changed_bytes: u64,
    /// The change map of the blocks written (docs/formats.md, "Failover").
    pub change_map: String,
}

/// A recovery check of a snapshot (`drv snapshot check`, or scheduled by `check_interval`): the
/// point mounted through a private overlay, each filesystem found checked by its own checker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub volume: String,
    pub snapshot: String,
    pub seq: u64,
    /// The agent's clock at the point (0: unknown).
    pub capture_unix: u32,
    /// Every filesystem checked (one per partition of a partitioned image).
    pub filesystems: Vec<FsCheck>,
    /// Every filesystem found is clean (false also when none was found).
    pub ok: bool,
    /// One line for humans and alerts.
    pub summary: String,
    pub started_unix: u64,
    /// How long the check took.
    pub millis: u64,
    /// Run by the schedule (its snapshot is deleted after the check).
    pub scheduled: bool,
}

/// One filesystem's check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsCheck {
    /// `whole image` or `partition N`.
    pub part: String,
    /// What blkid says (`ext4`, `xfs`, ...).
    pub filesystem: String,
    /// The checker's command line (empty: no checker for this filesystem).
    pub checker: String,
    pub exit_code: Option<i32>,
    pub clean: bool,
    /// The end of the checker's output.
    pub output: String,
}

/// A recovery point of the window: a unit end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPoint {
    pub seq: u64,
    pub epoch: u64,
    /// The agent's clock when it captured the unit's last write (seconds since the UNIX epoch;
    /// 0: unknown).
    pub capture_unix: u32,
    /// The replica's clock when it applied the unit.
    pub applied_unix: u64,
    /// The unit holds a cache flush (a point worth choosing).
    pub flush: bool,
}

/// A volume's retention window (any point in time) at a replica.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryWindow {
    /// The oldest and newest recoverable points (unit ends).
    pub oldest: Option<RecoveryPoint>,
    pub newest: Option<RecoveryPoint>,
    /// Unit ends in the window.
    pub points: u64,
    /// The newest points that end with a flush, oldest first (at most `limit` of them), and how
    /// many there are in all.
    pub flush_points: Vec<RecoveryPoint>,
    pub flush_count: u64,
}

/// What a replica volume can bring back (`drv snapshot points`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPoints {
    pub volume: String,
    /// The image now, when the target shows a state the source had (none while a resync run is
    /// applied in part, in a media resync, or with apply stopped).
    pub current: Option<RecoveryPoint>,
    /// The retention window, when one is kept.
    pub window: Option<RecoveryWindow>,
    /// The snapshots, oldest first (`auto-resync-SEQ`: the last consistent image, kept while a
    /// resync run is applied in part).
    pub snapshots: Vec<SnapshotInfo>,
}

/// A replica's DR log.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DrLogSummary {
    pub first_lsn: u64,
    pub durable_lsn: u64,
    pub used_segments: u64,
    pub total_segments: u64,
    pub cache_bytes: u64,
    pub failed: Option<String>,
}

/// Where a volume's media resync is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// Applied records mark their blocks; the target is left to the operator's copy.
    Tracking { begun_seq: u64, begun_unix: u64 },
    /// The target is written again; the map holds the blocks the agent must ship.
    Completed { begun_seq: u64, completed_seq: u64 },
    /// The agent shipped every block in records up to `through_seq`; consistent once applied.
    Pending { through_seq: u64 },
}

/// A snapshot at a replica: a full copy of the target at an applied position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub volume: String,
    pub volume_id: u64,
    pub name: String,
    /// The applied position the image shows: every write up to `seq` (epoch `epoch`), none after.
    pub seq: u64,
    pub epoch: u64,
    /// The image's size (the volume's).
    pub bytes: u64,
    pub created_unix: u64,
    /// The agent's clock when it captured the point's last writes (0: unknown).
    #[serde(default)]
    pub capture_unix: u32,
    /// The volume's snapshot store (copy-on-write: the image is the target plus the blocks the
    /// store preserved for it).
    pub path: String,
    /// Bytes of the store only this snapshot needs (what deleting it frees); in `drv snapshot
    /// list`, not in the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_bytes: Option<u64>,
    /// Its newest recovery check, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckResult>,
}

/// What deleting a snapshot did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDeleted {
    pub volume: String,
    pub name: String,
    /// Store bytes freed (what no other snapshot needed).
    pub freed_bytes: u64,
}

/// The digest of a snapshot's image (xxh3-128 of the whole image, as `drv demo` prints).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDigest {
    pub volume: String,
    pub name: String,
    pub seq: u64,
    pub epoch: u64,
    pub bytes: u64,
    /// 32 hex digits.
    pub xxh3_128: String,
}

/// A tracker's report of one cut (`drv track sync`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CutReport {
    /// Extents (merged runs of marked blocks) shipped, and their bytes.
    pub extents: u64,
    pub bytes: u64,
    /// Seconds from the request to staging holding it all (or the timeout).
    pub took_s: f64,
    /// Staging holds the volume as of the cut (else the changes stay marked for the next one).
    pub complete: bool,
    /// The filesystem was frozen for the cut, and for how long.
    pub frozen: bool,
    pub frozen_s: Option<f64>,
    /// Complete and frozen: a crash-consistent point.
    pub consistent: bool,
    /// The age of the oldest change the cut covered (the RPO just before it).
    pub rpo_before_s: Option<f64>,
    /// Bytes marked again while the cut ran (shipped by the next one).
    pub pending_bytes: u64,
    /// eBPF events lost since the tracker started (their ranges were shipped as unknown).
    pub lost_events: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_phases_read_as_before() {
        let v = ReplicaVolume {
            state: VolumeState::MediaResync,
            media: Some(Phase::Pending { through_seq: 9 }),
            ..Default::default()
        };
        let j = serde_json::to_value(&v).unwrap();
        assert_eq!(j["state"], "media-resync");
        assert_eq!(j["media"]["phase"], "pending");
        assert_eq!(serde_json::from_value::<ReplicaVolume>(j).unwrap(), v);
    }
}
