//! Errors of the write log. Every variant names what was wrong and where.

use drv_format::FormatError;

#[derive(Debug, thiserror::Error)]
pub enum WrlError {
    /// An I/O call failed; `what` says which one and where.
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
    /// A device does not hold a WRL device header this build can read.
    #[error("{device} is not a drv WRL device: {reason}")]
    NotAWrl { device: String, reason: FormatError },
    /// The devices given do not form one WRL (another WRL's device, wrong order, missing device).
    #[error("{device}: {reason}")]
    DeviceMismatch { device: String, reason: String },
    /// Neither meta block is valid.
    #[error("WRL meta blocks on {device} are both unreadable: A: {a}; B: {b}")]
    NoMeta { device: String, a: FormatError, b: FormatError },
    /// Damage in the middle of the log (not a torn tail): nothing past it is served.
    #[error(
        "corrupt WRL record in segment {segment_id} ({device}, slot {slot}, segment offset {offset}), expected lsn {expected_lsn}: {reason}"
    )]
    Corrupt { segment_id: u64, device: String, slot: u64, offset: u64, expected_lsn: u64, reason: String },
    /// The log has no room for the write until downstream confirms and trims older records.
    #[error("WRL log full: {used_segments} of {total_segments} segments in use ({capacity_bytes} bytes capacity)")]
    LogFull { used_segments: u64, total_segments: u64, capacity_bytes: u64 },
    /// The write is larger than one record of this WRL may be.
    #[error("write of {bytes} bytes exceeds this WRL's record limit of {limit} bytes")]
    RecordTooLarge { bytes: u64, limit: u64 },
    /// Invalid create options or geometry.
    #[error("invalid WRL geometry: {0}")]
    Geometry(String),
    /// A bad write request (flags, key) before anything was logged.
    #[error("invalid append: {0}")]
    InvalidAppend(String),
    /// A write or sync failed earlier; nothing after it is acknowledged. Reopen the WRL to recover.
    #[error("WRL failed after an I/O error and must be reopened: {0}")]
    Failed(String),
    /// The requested records were trimmed.
    #[error("lsn {lsn} was trimmed; the oldest record still held is lsn {first_available}")]
    Trimmed { lsn: u64, first_available: u64 },
    /// A record that does not follow its volume's last one (a gap, or one sent twice): never
    /// logged.
    #[error(
        "volume {volume_id} seq {seq} does not follow the log's last record of the volume (expected seq {expected})"
    )]
    OutOfOrder { volume_id: u64, seq: u64, expected: u64 },
    /// The WRL is shutting down.
    #[error("WRL is closed")]
    Closed,
    /// A device could not be opened or created (names it; or the process that holds it).
    #[error(transparent)]
    Open(#[from] crate::storage::OpenError),
}

impl WrlError {
    pub(crate) fn io(what: impl Into<String>, err: std::io::Error) -> Self {
        WrlError::Io { what: what.into(), err }
    }
}

pub type Result<T, E = WrlError> = std::result::Result<T, E>;
