//! The typed drv configuration (volumes, WRLs and their devices, endpoints, key references) kept
//! in a redb database. The config server of a later issue replicates this store to every
//! component; for now `drv config set|get|list|delete` operate on a local file.
//!
//! Each kind is a redb table from name to the JSON of its struct. Ids that must be unique in the
//! installation (volume ids, WRL nonce domains) are allocated here from a counter table, in the same
//! transaction that stores the entry, and never change afterwards. Every change is a
//! [`Command`] applied by [`command::apply`] in one transaction, with a version, an author, a time
//! and a place in the history (`drv config log`).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::Path;

pub mod command;
pub mod diff;
pub mod users;
mod validate;

pub use command::{Command, EntryRow, HISTORY_LIMIT, LogRecord, Op, Tables, Written};
pub use validate::is_mail_address;
pub use validate::{AddressError, MIN_FRAME_BYTES, check_address, human};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub(crate) const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// What can go wrong with the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The database could not be opened, read or written.
    #[error("configuration store {path}: {err}")]
    Store { path: String, err: Box<redb::Error> },
    /// An entry does not deserialize into its type (names the kind, entry and serde's reason).
    #[error("{kind} {name:?}: {reason}")]
    Invalid { kind: Kind, name: String, reason: String },
    /// A `field=value` argument is malformed.
    #[error("expected FIELD=VALUE, got {0:?}")]
    BadAssignment(String),
    /// An entry names another entry that does not exist or has the wrong role.
    #[error("{kind} {name:?}: {reason}")]
    Reference { kind: Kind, name: String, reason: String },
    /// No entry by that name.
    #[error("no {kind} named {name:?}")]
    NotFound { kind: Kind, name: String },
    /// A command that only reads (or deletes) was pointed at a store that does not exist.
    #[error("configuration store {0} does not exist (drv config set creates it; --store or DRV_CONFIG names another)")]
    Missing(String),
    /// An unknown kind was named.
    #[error("unknown kind {0:?} (kinds: volume, wrl, endpoint, key, set, user, alert, mail)")]
    UnknownKind(String),
    /// A conditional change found the entry at another version (0: the entry does not exist).
    #[error("{kind} {name:?} is at version {actual}, not {expected}: it changed since it was read (read it again)")]
    Stale { kind: Kind, name: String, expected: u64, actual: u64 },
    /// A user asked for a change their roles do not allow.
    #[error("user {user:?} may not make this change: {reason}")]
    Forbidden { user: String, reason: String },
}

impl ConfigError {
    /// The kind of error in one word, for a client that must tell them apart (an HTTP status).
    pub fn code(&self) -> &'static str {
        match self {
            ConfigError::Store { .. } => "store",
            ConfigError::Invalid { .. } => "invalid",
            ConfigError::BadAssignment(_) => "bad_assignment",
            ConfigError::Reference { .. } => "reference",
            ConfigError::NotFound { .. } => "not_found",
            ConfigError::Missing(_) => "missing",
            ConfigError::UnknownKind(_) => "unknown_kind",
            ConfigError::Stale { .. } => "stale",
            ConfigError::Forbidden { .. } => "forbidden",
        }
    }
}

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// The kinds of configuration entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Endpoint,
    Key,
    Wrl,
    Volume,
    /// A replication set: a named group of volumes whose operation is delegated to users.
    Set,
    /// A user of the web UI and the JSON API.
    User,
    /// An alert rule: what the config servers watch, and whom they tell.
    Alert,
    /// An SMTP server alerts and digests are sent through.
    Mail,
}

impl Kind {
    pub const ALL: [Kind; 8] =
        [Kind::Endpoint, Kind::Key, Kind::Wrl, Kind::Volume, Kind::Set, Kind::User, Kind::Alert, Kind::Mail];

    pub(crate) fn table(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        TableDefinition::new(match self {
            Kind::Endpoint => "endpoints",
            Kind::Key => "keys",
            Kind::Wrl => "wrls",
            Kind::Volume => "volumes",
            Kind::Set => "sets",
            Kind::User => "users",
            Kind::Alert => "alerts",
            Kind::Mail => "mail_servers",
        })
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Endpoint => "endpoint",
            Kind::Key => "key",
            Kind::Wrl => "wrl",
            Kind::Volume => "volume",
            Kind::Set => "set",
            Kind::User => "user",
            Kind::Alert => "alert",
            Kind::Mail => "mail",
        })
    }
}

impl std::str::FromStr for Kind {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Kind> {
        Ok(match s {
            "endpoint" | "endpoints" => Kind::Endpoint,
            "key" | "keys" => Kind::Key,
            "wrl" | "wrls" => Kind::Wrl,
            "volume" | "volumes" => Kind::Volume,
            "set" | "sets" => Kind::Set,
            "alert" | "alerts" => Kind::Alert,
            "mail" => Kind::Mail,
            "user" | "users" => Kind::User,
            other => return Err(ConfigError::UnknownKind(other.to_owned())),
        })
    }
}

/// The role a node plays; certificates of a later issue carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Agent,
    Staging,
    Replica,
    Config,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Agent => "agent",
            Role::Staging => "staging",
            Role::Replica => "replica",
            Role::Config => "config",
        })
    }
}

/// A node and where to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub role: Role,
    /// `host:port`.
    pub address: String,
    /// Most concurrent peer connections a server accepts.
    #[serde(default = "default_connections")]
    pub max_connections: u32,
    /// Largest frame body accepted from a peer.
    #[serde(default = "default_frame", deserialize_with = "de_size")]
    pub frame_bytes_limit: u64,
    /// Bytes in flight per stream (agent writes not yet acknowledged; relayed records not yet
    /// durable at the replica).
    #[serde(default = "default_inflight", deserialize_with = "de_size")]
    pub inflight_bytes_limit: u64,
    /// Replica: directory of the DR log and of volume images without an explicit target.
    #[serde(default)]
    pub data_dir: Option<String>,
    /// Replica: size of the DR log file created in `data_dir`.
    #[serde(default = "default_drlog", deserialize_with = "de_size")]
    pub drlog_bytes: u64,
    /// Largest IP packet QUIC may probe for (path MTU discovery keeps only what the path carries).
    #[serde(default = "default_mtu")]
    pub max_mtu: u16,
}

fn default_mtu() -> u16 {
    9000
}

fn default_connections() -> u32 {
    256
}
fn default_frame() -> u64 {
    8 << 20
}
fn default_inflight() -> u64 {
    32 << 20
}
fn default_drlog() -> u64 {
    1 << 30
}

/// A reference to a data key; the key material stays in its file, never in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRef {
    /// Key version carried in every record (`key_id`).
    #[serde(default = "one")]
    pub key_id: u32,
    /// Path of the 32-byte key file on the nodes that use it.
    pub path: String,
}

fn one() -> u32 {
    1
}

/// A write log on a staging server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrlDef {
    /// Nonce domain, unique in the installation; allocated by the store.
    #[serde(default)]
    pub id: u32,
    /// The staging endpoint that runs it.
    pub staging: String,
    /// Files or block devices, in order.
    pub devices: Vec<String>,
    #[serde(default = "default_segment", deserialize_with = "de_size")]
    pub segment_bytes: u64,
    #[serde(default, deserialize_with = "de_opt_size")]
    pub capacity_bytes: Option<u64>,
    #[serde(default = "default_cache", deserialize_with = "de_size")]
    pub cache_bytes_limit: u64,
    #[serde(default = "default_queue", deserialize_with = "de_size")]
    pub queue_bytes_limit: u64,
    #[serde(default = "default_batch", deserialize_with = "de_size")]
    pub batch_bytes_limit: u64,
    /// Size of each device file, created by the staging server when none of them exists yet.
    #[serde(default, deserialize_with = "de_opt_size")]
    pub device_bytes: Option<u64>,
}

fn default_segment() -> u64 {
    64 << 20
}
fn default_cache() -> u64 {
    256 << 20
}
fn default_queue() -> u64 {
    64 << 20
}
fn default_batch() -> u64 {
    8 << 20
}

/// A replication set: a named group of volumes. Users are given a role on a set (`User::grants`);
/// a volume may be in several sets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSet {
    pub volumes: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// What a user may do on a replication set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetRole {
    /// Sees the set's volumes, their status and history.
    Viewer,
    /// And changes them and runs operations on them (pause, resync, snapshots, checks).
    Operator,
}

/// A user of the web UI and the JSON API. Set `password=SECRET` (or `password=-` to be asked):
/// only its argon2id hash is stored (`users.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// argon2id, in the PHC string format.
    pub password_hash: String,
    /// May do everything, everywhere (users, endpoints, keys, WRLs, every set).
    #[serde(default)]
    pub admin: bool,
    /// The user's role on each replication set, by set name.
    #[serde(default)]
    pub grants: BTreeMap<String, SetRole>,
    /// Refused at login, its sessions ended.
    #[serde(default)]
    pub disabled: bool,
}

/// What an alert rule watches (`over` is its threshold, in the unit its name says).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertCondition {
    /// The age of the oldest write not yet at every replica, over `over` seconds.
    LagSeconds,
    /// What a disaster now would lose, over `over` seconds (the lag, or out of sync mode the
    /// time since the volume left it).
    RpoSeconds,
    /// The volume in change-map mode for more than `over` minutes.
    ChangeMapMinutes,
    /// The volume's WRL fuller than `over` percent.
    WrlFillPercent,
    /// A component (staging, replica, agent) of the volume not heard from for `over` seconds.
    SilentSeconds,
    /// A recovery check of the volume failed.
    CheckFailed,
    /// The volume's snapshot store fuller than `over` percent of its `snapshot_bytes_limit`.
    SnapshotStorePercent,
}

/// An alert rule: it fires for each volume (of `volumes`, or every volume) where its
/// condition holds, and resolves when it no longer does. Each firing and resolution goes to
/// the activity log and, if `email` names anyone, to them through the mail server `mail`, for
/// one volume at most once per `mail_every` (a flapping link does not send a mail per flap).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    pub when: AlertCondition,
    #[serde(default)]
    pub over: f64,
    /// The volumes it watches (none: every volume).
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Who is mailed.
    #[serde(default)]
    pub email: Vec<String>,
    /// The mail server entry (none: the only one there is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mail: Option<String>,
    /// At most one mail per volume this often (`1h`, `15m`, or seconds).
    #[serde(default = "default_mail_every", deserialize_with = "de_duration")]
    pub mail_every: u64,
    #[serde(default)]
    pub disabled: bool,
}

fn default_mail_every() -> u64 {
    3600
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    use serde::de::Error;
    d.deserialize_any(DurationVisitor)?.ok_or_else(|| D::Error::custom("a duration is needed, not null"))
}

/// How a mail server is reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailSecurity {
    /// Plain SMTP (a relay on the same host or network).
    None,
    /// SMTP upgraded with STARTTLS (refused if the server does not offer it).
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS, port 465).
    Tls,
}

/// An SMTP server the config servers send alerts and digests through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailServer {
    /// `host:port`.
    pub address: String,
    #[serde(default)]
    pub security: MailSecurity,
    /// The sender, e.g. `drv <drv@example.com>`.
    pub from: String,
    /// Log in as this user (with the password in `password_file` on each config server host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// A PEM file of the CA that signed the server's certificate (besides the public ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Mails sent through it per hour at most, by each config server (all rules together).
    #[serde(default = "default_per_hour")]
    pub per_hour: u32,
}

fn default_per_hour() -> u32 {
    60
}

/// A protected volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// Unique in the installation; allocated by the store.
    #[serde(default)]
    pub id: u64,
    #[serde(deserialize_with = "de_size")]
    pub size_bytes: u64,
    /// The WRL its writes are logged in.
    pub wrl: String,
    /// Replica endpoints (one or more).
    pub replicas: Vec<String>,
    /// The data key.
    pub key: String,
    /// Block size of the change map.
    #[serde(default = "default_block", deserialize_with = "de_size")]
    pub block_bytes: u64,
    /// Replica name -> target file or block device (default: `DATA_DIR/NAME.img` on that replica).
    #[serde(default)]
    pub targets: std::collections::BTreeMap<String, String>,
    /// Most bytes the volume's snapshot store may hold on each replica (none: no limit). Full,
    /// new snapshots are refused and apply waits for one to be deleted; none is ever dropped.
    #[serde(default, deserialize_with = "de_opt_size")]
    pub snapshot_bytes_limit: Option<u64>,
    /// Any point in time: how far back every epoch boundary stays recoverable on each replica
    /// (`24h`, `90m`, `7d`, or seconds; none: only snapshots). Measured by the agent's clock on
    /// the records and, as well, by the replica's: a point goes when both call it older.
    #[serde(default, deserialize_with = "de_opt_duration", skip_serializing_if = "Option::is_none")]
    pub retention: Option<u64>,
    /// Most bytes the snapshot store may hold before the window gives back its oldest points
    /// (none: only `retention` and `snapshot_bytes_limit` bound it). Snapshots are never dropped.
    #[serde(default, deserialize_with = "de_opt_size", skip_serializing_if = "Option::is_none")]
    pub retention_bytes: Option<u64>,
    /// Recovery checks on a schedule: every replica checks the volume's newest FLUSH point (or
    /// its image now, without a retention window) this often (`6h`; none: only when asked).
    #[serde(default, deserialize_with = "de_opt_duration", skip_serializing_if = "Option::is_none")]
    pub check_interval: Option<u64>,
    /// Bytes per second a resync or an initial sync of the volume may send (none: no limit);
    /// `drv sync start --bwlimit` sets another for one run. Changed live.
    #[serde(default, deserialize_with = "de_opt_size", skip_serializing_if = "Option::is_none")]
    pub bwlimit: Option<u64>,
    /// Replication paused by an operator: staging keeps logging the volume's writes (the agent
    /// stays in sync mode) but relays none to the replicas until it is set back to false. A
    /// long pause fills the WRL; the agent then falls back to its change map.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Full resyncs asked for: raising it makes the agent resync the whole volume once more
    /// (also when it was down meanwhile: it compares with the copy it keeps).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resync: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Parses a duration: `3600`, `90s`, `15m`, `24h`, `7d`, `2w` (into seconds).
pub fn parse_duration(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 =
        num.parse().map_err(|_| format!("{s:?} is not a duration (durations look like 3600, 90s, 15m, 24h, 7d)"))?;
    let mul = match unit.trim() {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        u => return Err(format!("{s:?}: unknown unit {u:?} (use s, m, h, d or w)")),
    };
    n.checked_mul(mul).ok_or_else(|| format!("{s:?} is too long"))
}

struct DurationVisitor;

impl<'de> serde::de::Visitor<'de> for DurationVisitor {
    type Value = Option<u64>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a duration such as 3600, 90m, 24h or 7d, or null")
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
        Ok(Some(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
        u64::try_from(v).map(Some).map_err(|_| E::custom(format!("{v} is negative: a duration is 0 or more seconds")))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
        parse_duration(v).map(Some).map_err(E::custom)
    }
    fn visit_none<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_any(DurationVisitor)
    }
}

fn de_opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    d.deserialize_option(DurationVisitor)
}

fn default_block() -> u64 {
    64 << 10
}

/// Parses `4096`, `64K`, `64KiB`, `1M`, `2G`, `1T` (binary units).
pub fn parse_size(s: &str) -> Option<u64> {
    size_bytes(s).ok()
}

/// What is wrong with a size's text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0:?} is not a size: it does not start with a number (sizes look like 4096, 64K, 1M, 2G)")]
    NoNumber(String),
    #[error("{0} is too large (the largest size is 16 EiB - 1 byte)")]
    TooLarge(String),
    #[error("{text:?} has an unknown unit {unit:?} (use B, K, M, G, T or P: powers of 1024)")]
    UnknownUnit { text: String, unit: String },
}

/// Parses a size like [`parse_size`], or says what is wrong with the text (also the `value_parser`
/// of size arguments on the command line).
pub fn size_bytes(s: &str) -> Result<u64, SizeError> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(digits);
    if n.is_empty() {
        return Err(SizeError::NoNumber(s.to_owned()));
    }
    let n: u64 = n.parse().map_err(|_| SizeError::TooLarge(s.to_owned()))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        _ => return Err(SizeError::UnknownUnit { text: s.to_owned(), unit: unit.to_owned() }),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| SizeError::TooLarge(s.to_owned()))
}

/// Sizes in entries: a number of bytes, or text with a unit.
struct SizeVisitor;

impl serde::de::Visitor<'_> for SizeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a size in bytes such as 4096, 64K, 1M or 2G")
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<u64, E> {
        Ok(v)
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative: a size is 0 or more bytes")))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<u64, E> {
        Err(E::custom(format!("{v} is not a whole number of bytes")))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<u64, E> {
        size_bytes(v).map_err(E::custom)
    }
}

fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    d.deserialize_any(SizeVisitor)
}

fn de_opt_size<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    struct Opt;
    impl<'de> serde::de::Visitor<'de> for Opt {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a size in bytes such as 4096, 64K, 1M or 2G, or null")
        }
        fn visit_none<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
            de_size(d).map(Some)
        }
    }
    d.deserialize_option(Opt)
}

/// Entry names become parts of file names (`NAME.img`, `NAME.applied`) and, for endpoints,
/// certificate names (`NAME.ROLE.drv`): so only letters, digits and a few safe signs.
pub(crate) fn check_name(kind: Kind, name: &str) -> Result<()> {
    let (ok, allowed) = match kind {
        Kind::Endpoint => (
            (1..=63).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "1 to 63 letters, digits or '-' (it is the name in the node's certificate)",
        ),
        _ => (
            (1..=64).contains(&name.len())
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                && !name.starts_with(['.', '-']),
            "1 to 64 letters, digits, '-', '_' or '.', not starting with '.' or '-'",
        ),
    };
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid { kind, name: name.into(), reason: format!("not a valid name: use {allowed}") })
    }
}

/// The JSON value of the text after `FIELD=`: JSON where it parses as JSON, else the text. A
/// number JSON cannot hold exactly (`99999999999999999999`) stays text, so that a message about
/// it shows it as it was typed.
pub(crate) fn assignment_value(raw: &str) -> Value {
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::Number(n)) if n.is_f64() && raw.trim().bytes().all(|b| b.is_ascii_digit()) => {
            Value::String(raw.trim().to_owned())
        }
        Ok(v) => v,
        Err(_) => Value::String(raw.to_owned()),
    }
}

/// The entry typed (defaults filled in) and checked field by field; back as JSON.
pub(crate) fn typed_check(kind: Kind, name: &str, value: Value, raw: &BTreeMap<String, String>) -> Result<Value> {
    fn rt<T: Serialize + for<'de> Deserialize<'de> + validate::Entry>(
        v: Value,
        raw: &BTreeMap<String, String>,
    ) -> std::result::Result<Value, String> {
        let t: T = serde_path_to_error::deserialize(v).map_err(|e| {
            let field = e.path().to_string();
            let why = validate::plain_serde(&e.inner().to_string());
            match raw.get(&field) {
                Some(r) => format!("{field}={r}: {why}"),
                None if field != "." => format!("{field}: {why}"),
                None => why,
            }
        })?;
        let mut c = validate::Check::new(raw);
        t.check(&mut c);
        if !c.problems.is_empty() {
            return Err(c.problems.join("; "));
        }
        Ok(serde_json::to_value(t).expect("serializable"))
    }
    match kind {
        Kind::Endpoint => rt::<Endpoint>(value, raw),
        Kind::Key => rt::<KeyRef>(value, raw),
        Kind::Wrl => rt::<WrlDef>(value, raw),
        Kind::Volume => rt::<Volume>(value, raw),
        Kind::Set => rt::<ReplicationSet>(value, raw),
        Kind::User => rt::<User>(value, raw),
        Kind::Alert => rt::<AlertRule>(value, raw),
        Kind::Mail => rt::<MailServer>(value, raw),
    }
    .map_err(|reason| ConfigError::Invalid { kind, name: name.into(), reason })
}

enum Db {
    ReadWrite(Database),
    ReadOnly(redb::ReadOnlyDatabase),
    /// Another owner's database (a config server's state machine), read here only: every
    /// change goes through the owner.
    Shared(std::sync::Arc<Database>),
}

/// The configuration store.
pub struct ConfigStore {
    db: Db,
    path: String,
}

impl ConfigStore {
    /// Opens the store at `path`, creating it (and its directory) if it does not exist: what
    /// `drv config set` does.
    pub fn open(path: &Path) -> Result<ConfigStore> {
        let p = path.display().to_string();
        let err = |e: redb::Error| ConfigError::Store { path: p.clone(), err: Box::new(e) };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(redb::Error::Io(e)))?;
        }
        let db = Database::create(path).map_err(|e| err(e.into()))?;
        let tx = db.begin_write().map_err(|e| err(e.into()))?;
        for k in Kind::ALL {
            tx.open_table(k.table()).map_err(|e| err(e.into()))?;
        }
        tx.open_table(COUNTERS).map_err(|e| err(e.into()))?;
        command::prepare(&tx).map_err(&err)?;
        tx.commit().map_err(|e| err(e.into()))?;
        Ok(ConfigStore { db: Db::ReadWrite(db), path: p })
    }

    /// Opens the store at `path` only if it exists (never creates anything): for commands that
    /// read or delete.
    pub fn open_existing(path: &Path) -> Result<ConfigStore> {
        if !path.exists() {
            return Err(ConfigError::Missing(path.display().to_string()));
        }
        Self::open(path)
    }

    /// Opens an existing store for reading only, as servers do at start-up: several processes may
    /// do this at once. Waits up to five seconds while another process holds it for writing.
    pub fn open_read_only(path: &Path) -> Result<ConfigStore> {
        let p = path.display().to_string();
        if !path.exists() {
            return Err(ConfigError::Missing(p));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match redb::ReadOnlyDatabase::open(path) {
                Ok(db) => return Ok(ConfigStore { db: Db::ReadOnly(db), path: p }),
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(ConfigError::Store { path: p, err: Box::new(e.into()) }),
            }
        }
    }

    /// A reading view of `db`, a database someone else owns and changes (a config server's
    /// state machine, which must have been prepared with [`command::prepare`]).
    pub fn shared(db: std::sync::Arc<Database>, path: &str) -> ConfigStore {
        ConfigStore { db: Db::Shared(db), path: path.to_owned() }
    }

    fn writable(&self) -> Result<&Database> {
        match &self.db {
            Db::ReadWrite(db) => Ok(db),
            Db::ReadOnly(_) | Db::Shared(_) => Err(ConfigError::Store {
                path: self.path.clone(),
                err: Box::new(redb::Error::Io(std::io::Error::other("opened read-only"))),
            }),
        }
    }

    fn begin_read(&self) -> std::result::Result<redb::ReadTransaction, redb::TransactionError> {
        match &self.db {
            Db::ReadWrite(db) => db.begin_read(),
            Db::ReadOnly(db) => db.begin_read(),
            Db::Shared(db) => db.begin_read(),
        }
    }

    fn err(&self) -> impl Fn(redb::Error) -> ConfigError + '_ {
        |e| ConfigError::Store { path: self.path.clone(), err: Box::new(e) }
    }

    /// Creates or updates an entry from `field=value` assignments (a value is JSON if it parses
    /// as JSON, else a string; sizes accept K/M/G/T). Checks the name, the type and range of every
    /// field and the rules between entries (`validate.rs`), and allocates ids, all in one
    /// transaction: nothing is stored unless all of it holds. Returns the stored entry.
    pub fn set(&self, kind: Kind, name: &str, assignments: &[String]) -> Result<Value> {
        let op = Op::Set { kind, name: name.into(), assignments: assignments.to_vec(), if_version: None };
        Ok(self.commit(vec![op])?.values.swap_remove(0))
    }

    /// Applies `ops` as one command of this host's user, now (users' passwords hashed first).
    pub fn commit(&self, mut ops: Vec<Op>) -> Result<Written> {
        users::hash_passwords(&mut ops)?;
        let cmd =
            Command { request_id: random_id(), author: local_author(), time_unix_ms: now_unix_ms(), ops, user: None };
        self.apply(&cmd)
    }

    /// Applies `cmd` as the next version: all of it in one transaction, or nothing. A volume's
    /// targets on this host's block devices are checked here too (the local store only: a
    /// replicated store must not read its own host's devices).
    pub fn apply(&self, cmd: &Command) -> Result<Written> {
        let e = self.err();
        let tx = self.writable()?.begin_write().map_err(|x| e(x.into()))?;
        let version = {
            let counters = tx.open_table(COUNTERS).map_err(|x| e(x.into()))?;
            let newest = counters.get(command::VERSION).map_err(|x| e(x.into()))?;
            newest.map_or(0, |v| v.value()) + 1
        };
        let written = command::apply(&tx, cmd, version, &e)?;
        if written.replayed {
            return Ok(written);
        }
        for (op, value) in cmd.ops.iter().zip(&written.values) {
            if let Op::Set { kind: Kind::Volume, name, .. } = op {
                let vol: Volume = serde_json::from_value(value.clone()).expect("checked by apply");
                let problems = validate::small_local_targets(&vol);
                if !problems.is_empty() {
                    let reason = problems.join("; ");
                    return Err(ConfigError::Reference { kind: Kind::Volume, name: name.clone(), reason });
                }
            }
        }
        tx.commit().map_err(|x| e(x.into()))?;
        Ok(written)
    }

    /// The newest version (0: nothing was ever changed).
    pub fn version(&self) -> Result<u64> {
        let e = self.err();
        let tx = self.begin_read().map_err(|x| e(x.into()))?;
        let t = tx.open_table(COUNTERS).map_err(|x| e(x.into()))?;
        let v = t.get(command::VERSION).map_err(|x| e(x.into()))?;
        Ok(v.map_or(0, |v| v.value()))
    }

    /// The changes after version `after`, oldest first, at most `limit`.
    pub fn log(&self, after: u64, limit: usize) -> Result<Vec<LogRecord>> {
        let e = self.err();
        let tx = self.begin_read().map_err(|x| e(x.into()))?;
        command::history(&tx, after, limit, &e)
    }

    /// The newest `n` records of the history, oldest first.
    pub fn newest(&self, n: usize) -> Result<Vec<LogRecord>> {
        let e = self.err();
        let tx = self.begin_read().map_err(|x| e(x.into()))?;
        command::newest(&tx, n, &e)
    }

    /// The entries of `kinds` (only `name`, if given) and the version they show, read together.
    pub fn entries(&self, kinds: &[Kind], name: Option<&str>) -> Result<(u64, Vec<command::EntryRow>)> {
        let e = self.err();
        let tx = self.begin_read().map_err(|x| e(x.into()))?;
        command::entries(&tx, kinds, name, &e)
    }

    /// Everything the store holds (entries, counters, versions, history).
    pub fn dump(&self) -> Result<Tables> {
        let e = self.err();
        let tx = self.begin_read().map_err(|x| e(x.into()))?;
        command::dump(&tx, &e)
    }

    /// Replaces everything the store holds with `t`, in one transaction.
    pub fn load(&self, t: &Tables) -> Result<()> {
        let e = self.err();
        let tx = self.writable()?.begin_write().map_err(|x| e(x.into()))?;
        command::load(&tx, t, &e)?;
        tx.commit().map_err(|x| e(x.into()))
    }

    /// One entry as JSON.
    pub fn get(&self, kind: Kind, name: &str) -> Result<Value> {
        let e = self.err();
        let tx = self.begin_read().map_err(|x| e(x.into()))?;
        let t = tx.open_table(kind.table()).map_err(|x| e(x.into()))?;
        let v = t.get(name).map_err(|x| e(x.into()))?;
        let v = v.ok_or_else(|| ConfigError::NotFound { kind, name: name.into() })?;
        serde_json::from_slice(v.value()).map_err(|x| ConfigError::Invalid {
            kind,
            name: name.into(),
            reason: x.to_string(),
        })
    }

    /// One entry, typed.
    pub fn get_typed<T: for<'de> Deserialize<'de>>(&self, kind: Kind, name: &str) -> Result<T> {
        serde_json::from_value(self.get(kind, name)?).map_err(|x| ConfigError::Invalid {
            kind,
            name: name.into(),
            reason: x.to_string(),
        })
    }

    /// Every entry of the given kinds, in name order.
    pub fn list(&self, kinds: &[Kind]) -> Result<Vec<(Kind, String, Value)>> {
        let e = self.err();
        let tx = self.begin_read().map_err(|x| e(x.into()))?;
        let mut out = Vec::new();
        for k in kinds {
            let t = tx.open_table(k.table()).map_err(|x| e(x.into()))?;
            for row in t.iter().map_err(|x| e(x.into()))? {
                let (name, v) = row.map_err(|x| e(x.into()))?;
                let v: Value = serde_json::from_slice(v.value()).unwrap_or(Value::Null);
                out.push((*k, name.value().to_owned(), v));
            }
        }
        Ok(out)
    }

    /// Deletes an entry that nothing refers to.
    pub fn delete(&self, kind: Kind, name: &str) -> Result<()> {
        self.commit(vec![Op::Delete { kind, name: name.into(), if_version: None }]).map(drop)
    }
}

/// A request id no other command will have (std's hasher keys are random per process; the time
/// and a counter tell this process's ids apart).
pub fn random_id() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    let hi = h.finish();
    h.write_u64(hi);
    (u128::from(hi) << 64) | u128::from(h.finish())
}

/// Who changes the local store: `local:USER` (the user sudo was run by, if any).
fn local_author() -> String {
    let user = ["SUDO_USER", "USER", "LOGNAME"].iter().find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()));
    format!("local:{}", user.as_deref().unwrap_or("unknown"))
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Everything one volume involves, resolved by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeView {
    pub name: String,
    pub volume: Volume,
    pub key: KeyRef,
    pub wrl_name: String,
    pub wrl: WrlDef,
    pub staging: (String, Endpoint),
    pub replicas: Vec<(String, Endpoint)>,
}

/// What one node needs to run: its endpoint, the WRLs it hosts (staging) and the volumes it serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    pub name: String,
    pub endpoint: Endpoint,
    /// WRLs whose staging server is this node.
    pub wrls: Vec<(String, WrlDef)>,
    /// Volumes logged on this node (staging) or replicated to it (replica).
    pub volumes: Vec<VolumeView>,
}

impl ConfigStore {
    /// Resolves the configuration of node `name`.
    pub fn node(&self, name: &str) -> Result<NodeConfig> {
        let endpoint: Endpoint = self.get_typed(Kind::Endpoint, name)?;
        let mut wrls = Vec::new();
        for (_, n, v) in self.list(&[Kind::Wrl])? {
            let w: WrlDef = serde_json::from_value(v).map_err(|e| ConfigError::Invalid {
                kind: Kind::Wrl,
                name: n.clone(),
                reason: e.to_string(),
            })?;
            if w.staging == name {
                wrls.push((n, w));
            }
        }
        let mut volumes = Vec::new();
        for (_, n, v) in self.list(&[Kind::Volume])? {
            let volume: Volume = serde_json::from_value(v).map_err(|e| ConfigError::Invalid {
                kind: Kind::Volume,
                name: n.clone(),
                reason: e.to_string(),
            })?;
            let wrl: WrlDef = self.get_typed(Kind::Wrl, &volume.wrl)?;
            let mine = match endpoint.role {
                Role::Staging => wrl.staging == name,
                Role::Replica => volume.replicas.iter().any(|r| r == name),
                Role::Agent | Role::Config => true,
            };
            if !mine {
                continue;
            }
            volumes.push(self.view(n, volume, wrl)?);
        }
        Ok(NodeConfig { name: name.to_owned(), endpoint, wrls, volumes })
    }

    /// Resolves volume `name` with everything it involves (what an agent needs).
    pub fn volume(&self, name: &str) -> Result<VolumeView> {
        let volume: Volume = self.get_typed(Kind::Volume, name)?;
        let wrl: WrlDef = self.get_typed(Kind::Wrl, &volume.wrl)?;
        self.view(name.to_owned(), volume, wrl)
    }

    fn view(&self, name: String, volume: Volume, wrl: WrlDef) -> Result<VolumeView> {
        let key: KeyRef = self.get_typed(Kind::Key, &volume.key)?;
        let staging = (wrl.staging.clone(), self.get_typed(Kind::Endpoint, &wrl.staging)?);
        let mut replicas = Vec::new();
        for r in &volume.replicas {
            replicas.push((r.clone(), self.get_typed(Kind::Endpoint, r)?));
        }
        Ok(VolumeView { name, wrl_name: volume.wrl.clone(), volume, key, wrl, staging, replicas })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn typed_entries_references_and_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let st = ConfigStore::open(&path).unwrap();
        st.set(Kind::Endpoint, "stg1", &s(&["role=staging", "address=127.0.0.1:7001"])).unwrap();
        st.set(Kind::Endpoint, "rep1", &s(&["role=replica", "address=127.0.0.1:7002"])).unwrap();
        let e = st.set(Kind::Endpoint, "rep1", &s(&["max_mtu=65000"])).unwrap_err();
        assert!(e.to_string().contains("max_mtu=65000 is out of range (allowed: 1228"), "{e}");
        st.set(Kind::Key, "k1", &s(&["path=/etc/drv/k1.key"])).unwrap();
        // A volume that names a missing WRL is refused, naming it.
        let e =
            st.set(Kind::Volume, "db", &s(&["size_bytes=10G", "wrl=w0", "replicas=[\"rep1\"]", "key=k1"])).unwrap_err();
        assert!(e.to_string().contains("wrl \"w0\" does not exist"), "{e}");
        let w = st.set(Kind::Wrl, "w0", &s(&["staging=stg1", "devices=[\"/dev/sdb\"]", "segment_bytes=32M"])).unwrap();
        assert_eq!(w["id"], 1);
        assert_eq!(w["segment_bytes"], 32 << 20);
        let w2 = st.set(Kind::Wrl, "w1", &s(&["staging=stg1", "devices=[\"/dev/sdc\"]"])).unwrap();
        assert_eq!(w2["id"], 2, "nonce domains are unique");
        // Wrong role is refused.
        let e =
            st.set(Kind::Volume, "db", &s(&["size_bytes=10G", "wrl=w0", "replicas=[\"stg1\"]", "key=k1"])).unwrap_err();
        assert!(e.to_string().contains("has role staging, expected replica"), "{e}");
        let v = st.set(Kind::Volume, "db", &s(&["size_bytes=10G", "wrl=w0", "replicas=[\"rep1\"]", "key=k1"])).unwrap();
        assert_eq!(v["size_bytes"], 10u64 << 30);
        // A retention window: a duration, in range; bad text named.
        let v = st.set(Kind::Volume, "db", &s(&["retention=24h", "retention_bytes=1G"])).unwrap();
        assert_eq!((v["retention"].as_u64(), v["retention_bytes"].as_u64()), (Some(86_400), Some(1 << 30)), "{v}");
        let e = st.set(Kind::Volume, "db", &s(&["retention=banana"])).unwrap_err();
        assert!(e.to_string().contains("\"banana\" is not a duration"), "{e}");
        let e = st.set(Kind::Volume, "db", &s(&["retention=30s"])).unwrap_err();
        assert!(e.to_string().contains("retention") && e.to_string().contains("1 minute to 366 days"), "{e}");
        let e = st.set(Kind::Volume, "db", &s(&["retention=3fortnights"])).unwrap_err();
        assert!(e.to_string().contains("unknown unit"), "{e}");
        let v = st.set(Kind::Volume, "db", &s(&["check_interval=6h"])).unwrap();
        assert_eq!(v["check_interval"].as_u64(), Some(6 * 3600), "{v}");
        let e = st.set(Kind::Volume, "db", &s(&["check_interval=10s"])).unwrap_err();
        assert!(e.to_string().contains("check_interval") && e.to_string().contains("1 minute"), "{e}");
        let v = st.set(Kind::Volume, "db", &s(&["retention=null", "retention_bytes=null"])).unwrap();
        assert!(v.get("retention").is_none_or(|x| x.is_null()), "{v}");
        // Unknown fields and bad types are named.
        let e = st.set(Kind::Volume, "db", &s(&["colour=blue"])).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = st.set(Kind::Wrl, "w0", &s(&["id=9"])).unwrap_err();
        assert!(e.to_string().contains("id cannot change"), "{e}");
        drop(st);
        // Survives reopen; typed access works.
        let st = ConfigStore::open(&path).unwrap();
        let vol: Volume = st.get_typed(Kind::Volume, "db").unwrap();
        assert_eq!((vol.id, vol.wrl.as_str(), vol.block_bytes), (1, "w0", 64 << 10));
        assert_eq!(st.list(&Kind::ALL).unwrap().len(), 6);
        let e = st.delete(Kind::Wrl, "w0").unwrap_err();
        assert!(e.to_string().contains("still used by volume \"db\""), "{e}");
        st.delete(Kind::Volume, "db").unwrap();
        st.delete(Kind::Wrl, "w0").unwrap();
        assert!(matches!(st.get(Kind::Wrl, "w0"), Err(ConfigError::NotFound { .. })));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("1X"), None);
    }
}
