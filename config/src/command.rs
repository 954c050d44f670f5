//! One change to the configuration, as the configuration server's log will carry it: a
//! [`Command`] of one or more [`Op`]s, with the author, the time and a request id that travel
//! inside it. [`apply`] carries it out in a given redb write transaction, the same way wherever
//! it runs (the local store today, each config server's state machine later): it reads no clock,
//! no file and no environment, so every store that applies the same commands in the same order
//! holds the same bytes. Every op applies, or the caller aborts the transaction.
//!
//! Each applied command gets a version (the local store counts them; a replicated store will use
//! the log index): the entries it changed remember it (`entry_versions`, for conditional
//! updates, [`Op::Set::if_version`]), and the history keeps a [`LogRecord`] of it (the newest
//! [`HISTORY_LIMIT`] of them), found again by its request id, so a client that retries a
//! command whose answer it did not get is told the first outcome instead of changing twice.
//!
//! Tables (beside the entries' tables and `counters`, where `config_version` is the newest):
//!
//! | table            | key                 | value                                  |
//! |------------------|---------------------|----------------------------------------|
//! | `entry_versions` | `"KIND/NAME"`       | u64: the version that last changed it  |
//! | `history`        | u64 version         | JSON of its [`LogRecord`]              |
//! | `requests`       | u128 request id     | u64: the version it was applied at     |

use std::collections::BTreeMap;

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{COUNTERS, ConfigError, Kind, Result, check_name, validate};

const ENTRY_VERSIONS: TableDefinition<&str, u64> = TableDefinition::new("entry_versions");
const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("history");
const REQUESTS: TableDefinition<u128, u64> = TableDefinition::new("requests");
/// The counter holding the newest version.
pub(crate) const VERSION: &str = "config_version";

/// History records kept (older ones are dropped, with their request ids).
pub const HISTORY_LIMIT: u64 = 10_000;

/// One change: its ops apply together or not at all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Chosen by the client: a retry with the same id is answered with the first outcome.
    pub request_id: u128,
    pub author: String,
    /// When the client asked, in milliseconds since 1970.
    pub time_unix_ms: u64,
    pub ops: Vec<Op>,
    /// The user of the web UI or the JSON API who asked (none: an admin's certificate or the
    /// local store). Checked as the command applies, against the users and sets it applies to
    /// ([`users::may_change`](crate::users::may_change)), so a role taken away by an earlier
    /// command is never used by a later one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    /// Creates or updates an entry from `FIELD=VALUE` assignments.
    Set {
        kind: Kind,
        name: String,
        assignments: Vec<String>,
        /// Only if the entry is at this version (0: only if it does not exist).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        if_version: Option<u64>,
    },
    /// Deletes an entry nothing refers to.
    Delete {
        kind: Kind,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        if_version: Option<u64>,
    },
}

impl Op {
    fn entry(&self) -> (Kind, &str, Option<u64>) {
        match self {
            Op::Set { kind, name, if_version, .. } | Op::Delete { kind, name, if_version } => {
                (*kind, name, *if_version)
            }
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Set { kind, name, assignments, .. } => {
                // A password is never shown (it is hashed before a command is made, but an op
                // may be shown before that, in a refusal).
                let shown: Vec<String> = assignments
                    .iter()
                    .map(|a| match a.split_once('=').map(|(k, _)| k.trim()) {
                        Some("password") => "password=(hidden)".to_owned(),
                        Some("password_hash") => "password_hash=(hidden)".to_owned(),
                        _ => a.clone(),
                    })
                    .collect();
                write!(f, "set {kind} {name} {}", shown.join(" "))
            }
            Op::Delete { kind, name, .. } => write!(f, "delete {kind} {name}"),
        }
    }
}

/// What an applied command did: its version, and the stored entry of each op (null for a
/// delete).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Written {
    pub version: u64,
    pub values: Vec<Value>,
    /// This command had been applied before (a retry): `version` and `values` are the first
    /// outcome's.
    #[serde(default)]
    pub replayed: bool,
}

/// One applied command in the history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    pub version: u64,
    pub request_id: u128,
    pub author: String,
    pub time_unix_ms: u64,
    pub ops: Vec<Op>,
    pub values: Vec<Value>,
}

/// Opens every table a command touches. A store written before there were versions gets
/// version 1, and each of its entries with it (so that `if_version = 0`, "only if it does not
/// exist", still refuses them).
pub fn prepare(tx: &WriteTransaction) -> std::result::Result<(), redb::Error> {
    let mut versions = tx.open_table(ENTRY_VERSIONS)?;
    tx.open_table(HISTORY)?;
    tx.open_table(REQUESTS)?;
    let mut counters = tx.open_table(COUNTERS)?;
    if counters.get(VERSION)?.is_some() {
        return Ok(());
    }
    let mut any = false;
    for k in Kind::ALL {
        for row in tx.open_table(k.table())?.iter()? {
            versions.insert(version_key(k, row?.0.value()).as_str(), 1)?;
            any = true;
        }
    }
    if any {
        counters.insert(VERSION, 1)?;
    }
    Ok(())
}

/// The entries decoded as the rules between them see them, as of one version of a store. A
/// long-running store (a config server's state machine) keeps one between commands, so checking
/// a command does not decode every entry again: [`apply_viewed`] updates it with what the
/// command wrote and keeps it only if the command applied. It must be [`View::clear`]ed when the
/// tables change any other way (a snapshot installed).
#[derive(Default)]
pub struct View(Option<(u64, validate::Snapshot)>);

impl View {
    pub fn clear(&mut self) {
        self.0 = None;
    }

    /// The decoded entries of `tx`, at version `newest`: the kept ones if they are of that
    /// version, else decoded afresh.
    fn take(
        &mut self,
        tx: &WriteTransaction,
        newest: u64,
        e: &dyn Fn(redb::Error) -> ConfigError,
    ) -> Result<validate::Snapshot> {
        match self.0.take() {
            Some((v, snap)) if v == newest => Ok(snap),
            _ => snapshot(tx, e),
        }
    }
}

/// Applies `cmd` as version `version` (greater than every version applied before) in `tx`.
/// On an error nothing must be committed: the caller aborts `tx`. `e` names the store in errors
/// of the database itself.
pub fn apply(
    tx: &WriteTransaction,
    cmd: &Command,
    version: u64,
    e: &dyn Fn(redb::Error) -> ConfigError,
) -> Result<Written> {
    apply_viewed(tx, cmd, version, e, &mut View::default())
}

/// [`apply`], with the decoded entries `view` kept from the command before (see [`View`]).
pub fn apply_viewed(
    tx: &WriteTransaction,
    cmd: &Command,
    version: u64,
    e: &dyn Fn(redb::Error) -> ConfigError,
    view: &mut View,
) -> Result<Written> {
    if let Some(first) = applied_before(tx, cmd.request_id, e)? {
        return Ok(Written { version: first.version, values: first.values, replayed: true });
    }
    let newest =
        tx.open_table(COUNTERS).map_err(|x| e(x.into()))?.get(VERSION).map_err(|x| e(x.into()))?.map(|v| v.value());
    assert!(newest.is_none_or(|n| n < version), "version {version} applied after version {newest:?}");
    // Taken: on any error below it is dropped, as the caller drops the transaction.
    let mut snap = view.take(tx, newest.unwrap_or(0), e)?;
    if let Some(user) = &cmd.user {
        authorise(&snap, user, &cmd.ops)?;
    }
    let mut values = Vec::with_capacity(cmd.ops.len());
    for op in &cmd.ops {
        let (kind, name, if_version) = op.entry();
        check_name(kind, name)?;
        let at = entry_version(tx, kind, name, e)?;
        if let Some(want) = if_version.filter(|&w| w != at) {
            return Err(ConfigError::Stale { kind, name: name.into(), expected: want, actual: at });
        }
        let value = match op {
            Op::Set { assignments, .. } => set(tx, kind, name, assignments, e)?,
            Op::Delete { .. } => delete(tx, &snap, kind, name, e).map(|()| Value::Null)?,
        };
        update(&mut snap, kind, name, &value);
        values.push(value);
        set_entry_version(tx, kind, name, matches!(op, Op::Set { .. }).then_some(version), e)?;
    }
    // The rules between entries, on the state the whole command leaves.
    for op in &cmd.ops {
        if let Op::Set { kind, name, .. } = op {
            let problems = validate::cross_check(&snap, *kind, name);
            if !problems.is_empty() {
                return Err(ConfigError::Reference { kind: *kind, name: name.clone(), reason: problems.join("; ") });
            }
        }
    }
    record(tx, cmd, version, &values, e)?;
    *view = View(Some((version, snap)));
    Ok(Written { version, values, replayed: false })
}

/// Whether `user` may make the change `ops` on the state `snap` shows.
fn authorise(snap: &validate::Snapshot, user: &str, ops: &[Op]) -> Result<()> {
    let forbidden = |reason: String| ConfigError::Forbidden { user: user.to_owned(), reason };
    let u = snap.users.get(user).ok_or_else(|| forbidden("no such user (any more)".into()))?;
    let volumes = snap.volumes.keys().cloned().collect();
    crate::users::may_change(u, &snap.sets, &volumes, ops).map_err(forbidden)
}

/// `snap` after entry `kind name` was stored as `value` (null: deleted). An entry that does not
/// read as its type is left out, as [`snapshot`] leaves it out.
fn update(snap: &mut validate::Snapshot, kind: Kind, name: &str, value: &Value) {
    fn put<T: for<'de> Deserialize<'de>>(m: &mut BTreeMap<String, T>, name: &str, value: &Value) {
        match T::deserialize(value) {
            Ok(x) if !value.is_null() => m.insert(name.to_owned(), x),
            _ => m.remove(name),
        };
    }
    match kind {
        Kind::Endpoint => put(&mut snap.endpoints, name, value),
        Kind::Key => put(&mut snap.keys, name, value),
        Kind::Wrl => put(&mut snap.wrls, name, value),
        Kind::Volume => put(&mut snap.volumes, name, value),
        Kind::Set => put(&mut snap.sets, name, value),
        Kind::User => put(&mut snap.users, name, value),
        Kind::Alert => put(&mut snap.alerts, name, value),
        Kind::Mail => put(&mut snap.mail, name, value),
    }
}

/// The first outcome of the command with this request id, while the history holds it.
fn applied_before(
    tx: &WriteTransaction,
    id: u128,
    e: &dyn Fn(redb::Error) -> ConfigError,
) -> Result<Option<LogRecord>> {
    let Some(version) =
        tx.open_table(REQUESTS).map_err(|x| e(x.into()))?.get(id).map_err(|x| e(x.into()))?.map(|v| v.value())
    else {
        return Ok(None);
    };
    let history = tx.open_table(HISTORY).map_err(|x| e(x.into()))?;
    let row = history.get(version).map_err(|x| e(x.into()))?;
    let row = row.ok_or_else(|| {
        e(redb::Error::Corrupted(format!("request {id:x} names version {version}, not in the history")))
    })?;
    let r = decode_record(version, row.value(), e)?;
    Ok(Some(r))
}

fn decode_record(version: u64, bytes: &[u8], e: &dyn Fn(redb::Error) -> ConfigError) -> Result<LogRecord> {
    serde_json::from_slice(bytes).map_err(|x| e(redb::Error::Corrupted(format!("history record {version}: {x}"))))
}

/// Keeps the history of `cmd` and its request id, dropping the oldest beyond the limit.
fn record(
    tx: &WriteTransaction,
    cmd: &Command,
    version: u64,
    values: &[Value],
    e: &dyn Fn(redb::Error) -> ConfigError,
) -> Result<()> {
    let r = LogRecord {
        version,
        request_id: cmd.request_id,
        author: cmd.author.clone(),
        time_unix_ms: cmd.time_unix_ms,
        ops: cmd.ops.clone(),
        values: values.to_vec(),
    };
    let mut history = tx.open_table(HISTORY).map_err(|x| e(x.into()))?;
    let mut requests = tx.open_table(REQUESTS).map_err(|x| e(x.into()))?;
    let bytes = serde_json::to_vec(&r).expect("JSON of a record");
    history.insert(version, bytes.as_slice()).map_err(|x| e(x.into()))?;
    requests.insert(cmd.request_id, version).map_err(|x| e(x.into()))?;
    while history.len().map_err(|x| e(x.into()))? > HISTORY_LIMIT {
        let (v, old) = history.pop_first().map_err(|x| e(x.into()))?.expect("a history over its limit is not empty");
        let old = decode_record(v.value(), old.value(), e)?;
        requests.remove(old.request_id).map_err(|x| e(x.into()))?;
    }
    tx.open_table(COUNTERS).map_err(|x| e(x.into()))?.insert(VERSION, version).map_err(|x| e(x.into()))?;
    Ok(())
}

fn version_key(kind: Kind, name: &str) -> String {
    format!("{kind}/{name}")
}

/// The version that last changed entry `kind name` (0: it does not exist).
fn entry_version(tx: &WriteTransaction, kind: Kind, name: &str, e: &dyn Fn(redb::Error) -> ConfigError) -> Result<u64> {
    let t = tx.open_table(ENTRY_VERSIONS).map_err(|x| e(x.into()))?;
    let v = t.get(version_key(kind, name).as_str()).map_err(|x| e(x.into()))?.map(|v| v.value());
    Ok(v.unwrap_or(0))
}

fn set_entry_version(
    tx: &WriteTransaction,
    kind: Kind,
    name: &str,
    version: Option<u64>,
    e: &dyn Fn(redb::Error) -> ConfigError,
) -> Result<()> {
    let mut t = tx.open_table(ENTRY_VERSIONS).map_err(|x| e(x.into()))?;
    let key = version_key(kind, name);
    match version {
        Some(v) => t.insert(key.as_str(), v).map(drop),
        None => t.remove(key.as_str()).map(drop),
    }
    .map_err(|x| e(x.into()))
}

/// Creates or updates an entry: each field checked (`validate.rs`), ids allocated.
fn set(
    tx: &WriteTransaction,
    kind: Kind,
    name: &str,
    assignments: &[String],
    e: &dyn Fn(redb::Error) -> ConfigError,
) -> Result<Value> {
    let mut table = tx.open_table(kind.table()).map_err(|x| e(x.into()))?;
    if kind == Kind::User && assignments.iter().any(|a| crate::users::is_password(a)) {
        // Only reached by a command made without `users::hash_passwords`: refused without
        // repeating the value.
        let reason = "password: only its hash is stored, made where the change is asked (drv config set, the API)";
        return Err(ConfigError::Invalid { kind, name: name.into(), reason: reason.into() });
    }
    let mut obj: Map<String, Value> = match table.get(name).map_err(|x| e(x.into()))? {
        Some(v) => serde_json::from_slice(v.value()).unwrap_or_default(),
        None => Map::new(),
    };
    let old_id = obj.get("id").cloned();
    // The text of each field as given, for messages.
    let mut raw = BTreeMap::new();
    for a in assignments {
        let (k, v) = a.split_once('=').ok_or_else(|| ConfigError::BadAssignment(a.clone()))?;
        raw.insert(k.trim().to_owned(), v.to_owned());
        obj.insert(k.trim().to_owned(), crate::assignment_value(v));
    }
    if let Some(old) = old_id
        && obj.get("id") != Some(&old)
    {
        return Err(ConfigError::Invalid { kind, name: name.into(), reason: "id cannot change".into() });
    }
    let mut value = crate::typed_check(kind, name, Value::Object(obj), &raw)?;
    if matches!(kind, Kind::Wrl | Kind::Volume) && value["id"].as_u64() == Some(0) {
        let mut counters = tx.open_table(COUNTERS).map_err(|x| e(x.into()))?;
        let counter = if kind == Kind::Wrl { "wrl_id" } else { "volume_id" };
        let next = counters.get(counter).map_err(|x| e(x.into()))?.map(|v| v.value()).unwrap_or(0) + 1;
        counters.insert(counter, next).map_err(|x| e(x.into()))?;
        value["id"] = Value::from(next);
    }
    let bytes = serde_json::to_vec(&value).expect("JSON of a Value");
    table.insert(name, bytes.as_slice()).map_err(|x| e(x.into()))?;
    Ok(value)
}

/// Deletes an entry that nothing refers to (as the transaction sees it).
fn delete(
    tx: &WriteTransaction,
    snap: &validate::Snapshot,
    kind: Kind,
    name: &str,
    e: &dyn Fn(redb::Error) -> ConfigError,
) -> Result<()> {
    let mut users: Vec<String> = Vec::new();
    for (w, def) in &snap.wrls {
        if kind == Kind::Endpoint && def.staging == name {
            users.push(format!("wrl {w:?}"));
        }
    }
    for (v, vol) in &snap.volumes {
        let uses = match kind {
            Kind::Endpoint => vol.replicas.iter().any(|r| r == name),
            Kind::Wrl => vol.wrl == name,
            Kind::Key => vol.key == name,
            Kind::Volume | Kind::Set | Kind::User | Kind::Alert | Kind::Mail => false,
        };
        if uses {
            users.push(format!("volume {v:?}"));
        }
    }
    for (rule, def) in &snap.alerts {
        let uses = match kind {
            Kind::Volume => def.volumes.iter().any(|v| v == name),
            Kind::Mail => def.mail.as_deref() == Some(name) || (def.mail.is_none() && !def.email.is_empty()),
            _ => false,
        };
        if uses {
            users.push(format!("alert {rule:?}"));
        }
    }
    for (set, def) in &snap.sets {
        if kind == Kind::Volume && def.volumes.iter().any(|v| v == name) {
            users.push(format!("set {set:?}"));
        }
    }
    for (user, u) in &snap.users {
        if kind == Kind::Set && u.grants.contains_key(name) {
            users.push(format!("user {user:?}"));
        }
    }
    if !users.is_empty() {
        return Err(ConfigError::Reference {
            kind,
            name: name.into(),
            reason: format!("still used by {}", users.join(", ")),
        });
    }
    let mut t = tx.open_table(kind.table()).map_err(|x| e(x.into()))?;
    if t.remove(name).map_err(|x| e(x.into()))?.is_none() {
        return Err(ConfigError::NotFound { kind, name: name.into() });
    }
    Ok(())
}

/// Every entry that reads as its type, as the transaction sees them (entries that do not are
/// skipped here: they are refused when they are set).
pub(crate) fn snapshot(tx: &WriteTransaction, e: &dyn Fn(redb::Error) -> ConfigError) -> Result<validate::Snapshot> {
    fn table<T: for<'de> Deserialize<'de>>(
        tx: &WriteTransaction,
        k: Kind,
    ) -> std::result::Result<BTreeMap<String, T>, redb::Error> {
        let t = tx.open_table(k.table())?;
        let mut out = BTreeMap::new();
        for row in t.iter()? {
            let (n, v) = row?;
            if let Ok(x) = serde_json::from_slice(v.value()) {
                out.insert(n.value().to_owned(), x);
            }
        }
        Ok(out)
    }
    Ok(validate::Snapshot {
        endpoints: table(tx, Kind::Endpoint).map_err(e)?,
        keys: table(tx, Kind::Key).map_err(e)?,
        wrls: table(tx, Kind::Wrl).map_err(e)?,
        volumes: table(tx, Kind::Volume).map_err(e)?,
        sets: table(tx, Kind::Set).map_err(e)?,
        users: table(tx, Kind::User).map_err(e)?,
        alerts: table(tx, Kind::Alert).map_err(e)?,
        mail: table(tx, Kind::Mail).map_err(e)?,
    })
}

/// The history after version `after`, oldest first, at most `limit` records.
pub(crate) fn history(
    tx: &redb::ReadTransaction,
    after: u64,
    limit: usize,
    e: &dyn Fn(redb::Error) -> ConfigError,
) -> Result<Vec<LogRecord>> {
    // A store written before there was a history has no table.
    let Some(t) = open_if_there(tx, HISTORY, e)? else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for row in t.range(after.saturating_add(1)..).map_err(|x| e(x.into()))?.take(limit) {
        let (v, bytes) = row.map_err(|x| e(x.into()))?;
        out.push(decode_record(v.value(), bytes.value(), e)?);
    }
    Ok(out)
}

/// The newest `n` records of the history, oldest first.
pub(crate) fn newest(
    tx: &redb::ReadTransaction,
    n: usize,
    e: &dyn Fn(redb::Error) -> ConfigError,
) -> Result<Vec<LogRecord>> {
    let Some(t) = open_if_there(tx, HISTORY, e)? else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for row in t.iter().map_err(|x| e(x.into()))?.rev().take(n) {
        let (v, bytes) = row.map_err(|x| e(x.into()))?;
        out.push(decode_record(v.value(), bytes.value(), e)?);
    }
    out.reverse();
    Ok(out)
}

/// Everything a store holds: what a replicated store's snapshot carries, and what two stores
/// are compared by.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tables {
    /// Kind (`endpoint`, ...) to name to entry.
    pub entries: BTreeMap<String, BTreeMap<String, Value>>,
    pub counters: BTreeMap<String, u64>,
    pub entry_versions: BTreeMap<String, u64>,
    pub history: Vec<LogRecord>,
    /// Request id (32 hex digits) to version.
    pub requests: BTreeMap<String, u64>,
}

/// Reads every table (`iter` of a table that is not there yet: empty).
fn rows<K: redb::Key + 'static, V: redb::Value + 'static, T>(
    tx: &redb::ReadTransaction,
    def: TableDefinition<K, V>,
    mut f: impl FnMut(redb::AccessGuard<'_, K>, redb::AccessGuard<'_, V>) -> Result<T>,
    e: &dyn Fn(redb::Error) -> ConfigError,
) -> Result<Vec<T>> {
    let Some(t) = open_if_there(tx, def, e)? else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for row in t.iter().map_err(|x| e(x.into()))? {
        let (k, v) = row.map_err(|x| e(x.into()))?;
        out.push(f(k, v)?);
    }
    Ok(out)
}

/// A table for reading, or `None` if no transaction ever created it.
fn open_if_there<K: redb::Key + 'static, V: redb::Value + 'static>(
    tx: &redb::ReadTransaction,
    def: TableDefinition<K, V>,
    e: &dyn Fn(redb::Error) -> ConfigError,
) -> Result<Option<redb::ReadOnlyTable<K, V>>> {
    match tx.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(x) => Err(e(x.into())),
    }
}

/// One entry as a reader sees it: its value and the version that last changed it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntryRow {
    pub kind: Kind,
    pub name: String,
    pub value: Value,
    pub version: u64,
}

/// The entries of `kinds` (only `name`, if given), in name order, and the version they are at,
/// all from one transaction.
pub fn entries(
    tx: &redb::ReadTransaction,
    kinds: &[Kind],
    name: Option<&str>,
    e: &dyn Fn(redb::Error) -> ConfigError,
) -> Result<(u64, Vec<EntryRow>)> {
    let version = match open_if_there(tx, COUNTERS, e)? {
        Some(c) => c.get(VERSION).map_err(|x| e(x.into()))?.map_or(0, |v| v.value()),
        None => 0,
    };
    let versions = open_if_there(tx, ENTRY_VERSIONS, e)?;
    let mut out = Vec::new();
    for &kind in kinds {
        let Some(t) = open_if_there(tx, kind.table(), e)? else { continue };
        let rows: Vec<(String, Value)> = match name {
            Some(n) => match t.get(n).map_err(|x| e(x.into()))? {
                Some(v) => vec![(n.to_owned(), serde_json::from_slice(v.value()).unwrap_or(Value::Null))],
                None => Vec::new(),
            },
            None => rows(
                tx,
                kind.table(),
                |n, v| Ok((n.value().to_owned(), serde_json::from_slice(v.value()).unwrap_or(Value::Null))),
                e,
            )?,
        };
        for (n, value) in rows {
            let version = match &versions {
                Some(t) => t.get(version_key(kind, &n).as_str()).map_err(|x| e(x.into()))?.map_or(0, |v| v.value()),
                None => 0,
            };
            out.push(EntryRow { kind, name: n, value, version });
        }
    }
    Ok((version, out))
}

/// Everything the store holds, as of `tx`.
pub fn dump(tx: &redb::ReadTransaction, e: &dyn Fn(redb::Error) -> ConfigError) -> Result<Tables> {
    let mut t = Tables::default();
    for k in Kind::ALL {
        let entries = rows(
            tx,
            k.table(),
            |n, v| Ok((n.value().to_owned(), serde_json::from_slice(v.value()).unwrap_or(Value::Null))),
            e,
        )?;
        t.entries.insert(k.to_string(), entries.into_iter().collect());
    }
    t.counters = rows(tx, COUNTERS, |n, v| Ok((n.value().to_owned(), v.value())), e)?.into_iter().collect();
    t.entry_versions = rows(tx, ENTRY_VERSIONS, |n, v| Ok((n.value().to_owned(), v.value())), e)?.into_iter().collect();
    t.history = history(tx, 0, usize::MAX, e)?;
    t.requests = rows(tx, REQUESTS, |id, v| Ok((format!("{:032x}", id.value()), v.value())), e)?.into_iter().collect();
    Ok(t)
}

/// Replaces everything the store holds with `t` in `tx` (a snapshot installed). `t` is checked
/// whole first: on an error nothing was changed.
pub fn load(tx: &WriteTransaction, t: &Tables, e: &dyn Fn(redb::Error) -> ConfigError) -> Result<()> {
    let bad = |why: String| e(redb::Error::Corrupted(format!("configuration tables: {why}")));
    let mut requests = Vec::with_capacity(t.requests.len());
    for (id, v) in &t.requests {
        let id = u128::from_str_radix(id, 16).map_err(|x| bad(format!("request id {id:?}: {x}")))?;
        requests.push((id, *v));
    }
    let mut kinds = Vec::new();
    for (k, entries) in &t.entries {
        let kind: Kind = k.parse().map_err(|_| bad(format!("unknown kind {k:?}")))?;
        kinds.push((kind, entries));
    }
    let mut history = Vec::with_capacity(t.history.len());
    for r in &t.history {
        history.push((r.version, serde_json::to_vec(r).expect("JSON of a record")));
    }
    for k in Kind::ALL {
        tx.open_table(k.table()).map_err(|x| e(x.into()))?.retain(|_, _| false).map_err(|x| e(x.into()))?;
    }
    for (kind, entries) in kinds {
        let mut table = tx.open_table(kind.table()).map_err(|x| e(x.into()))?;
        for (name, v) in entries {
            table.insert(name.as_str(), serde_json::to_vec(v).expect("JSON").as_slice()).map_err(|x| e(x.into()))?;
        }
    }
    let mut counters = tx.open_table(COUNTERS).map_err(|x| e(x.into()))?;
    counters.retain(|_, _| false).map_err(|x| e(x.into()))?;
    for (n, v) in &t.counters {
        counters.insert(n.as_str(), *v).map_err(|x| e(x.into()))?;
    }
    let mut versions = tx.open_table(ENTRY_VERSIONS).map_err(|x| e(x.into()))?;
    versions.retain(|_, _| false).map_err(|x| e(x.into()))?;
    for (n, v) in &t.entry_versions {
        versions.insert(n.as_str(), *v).map_err(|x| e(x.into()))?;
    }
    let mut h = tx.open_table(HISTORY).map_err(|x| e(x.into()))?;
    h.retain(|_, _| false).map_err(|x| e(x.into()))?;
    for (v, bytes) in &history {
        h.insert(*v, bytes.as_slice()).map_err(|x| e(x.into()))?;
    }
    let mut r = tx.open_table(REQUESTS).map_err(|x| e(x.into()))?;
    r.retain(|_, _| false).map_err(|x| e(x.into()))?;
    for (id, v) in requests {
        r.insert(id, v).map_err(|x| e(x.into()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConfigStore;
    use proptest::prelude::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn set(kind: Kind, name: &str, a: &[&str]) -> Op {
        Op::Set { kind, name: name.into(), assignments: s(a), if_version: None }
    }

    fn cmd(id: u128, ops: Vec<Op>) -> Command {
        Command { request_id: id, author: "test".into(), time_unix_ms: 1_000 + id as u64, ops, user: None }
    }

    fn store() -> (tempfile::TempDir, ConfigStore) {
        let dir = tempfile::tempdir().unwrap();
        let st = ConfigStore::open(&dir.path().join("c.redb")).unwrap();
        (dir, st)
    }

    /// A base: two endpoints, a key and a WRL.
    fn base() -> Vec<Op> {
        vec![
            set(Kind::Endpoint, "stg1", &["role=staging", "address=127.0.0.1:7001"]),
            set(Kind::Endpoint, "rep1", &["role=replica", "address=127.0.0.1:7002"]),
            set(Kind::Key, "k1", &["path=/etc/drv/k1.key"]),
            set(Kind::Wrl, "w0", &["staging=stg1", "devices=[\"/dev/sdb\"]"]),
        ]
    }

    /// Ops apply in order on what the earlier ones left, references are checked on the state the
    /// whole command leaves, and one bad op leaves the store as it was.
    #[test]
    fn a_command_applies_whole_or_not_at_all() {
        let (_d, st) = store();
        // The volume comes before the WRL it names: checked at the end, it holds.
        let mut ops = vec![set(Kind::Volume, "db", &["size_bytes=1G", "wrl=w0", "replicas=[\"rep1\"]", "key=k1"])];
        ops.extend(base());
        let w = st.apply(&cmd(1, ops)).unwrap();
        assert_eq!((w.version, w.values.len(), w.replayed), (1, 5, false));
        assert_eq!(w.values[0]["id"], 1, "the volume's id");
        let before = st.dump().unwrap();
        let bad = vec![
            set(Kind::Endpoint, "rep2", &["role=replica", "address=127.0.0.1:7003"]),
            set(Kind::Volume, "db", &["replicas=[\"rep1\",\"rep2\"]"]),
            Op::Delete { kind: Kind::Key, name: "k1".into(), if_version: None },
        ];
        let e = st.apply(&cmd(2, bad)).unwrap_err();
        assert!(e.to_string().contains("key \"k1\": still used by volume \"db\""), "{e}");
        assert_eq!(st.dump().unwrap(), before, "nothing of the refused command stayed");
        assert_eq!(st.version().unwrap(), 1);
        // A delete and the set that would need it, in one command: the reference is named.
        let e = st
            .apply(&cmd(
                3,
                vec![
                    set(Kind::Endpoint, "rep3", &["role=replica", "address=127.0.0.1:7004"]),
                    set(Kind::Volume, "db", &["replicas=[\"rep9\"]"]),
                ],
            ))
            .unwrap_err();
        assert!(e.to_string().contains("rep9"), "{e}");
        assert_eq!(st.dump().unwrap(), before);
    }

    /// Replication sets name volumes that exist, users name sets that exist, and neither a
    /// volume in a set nor a set a user holds a role on can be deleted; a user's password is
    /// stored as its hash only.
    #[test]
    fn sets_and_users_refer_to_what_exists() {
        let (_d, st) = store();
        let mut ops = base();
        ops.push(set(Kind::Volume, "db", &["size_bytes=1G", "wrl=w0", "replicas=[\"rep1\"]", "key=k1"]));
        st.commit(ops).unwrap();
        let e = st.commit(vec![set(Kind::Set, "prod", &["volumes=[\"db\",\"web\"]"])]).unwrap_err();
        assert!(e.to_string().contains("volume \"web\" does not exist"), "{e}");
        st.commit(vec![set(Kind::Set, "prod", &["volumes=[\"db\"]", "description=production"])]).unwrap();
        let e = st.commit(vec![set(Kind::User, "ann", &["password=correct horse", "grants={\"dev\":\"viewer\"}"])]);
        assert!(e.unwrap_err().to_string().contains("set \"dev\" does not exist"));
        let e = st.commit(vec![set(Kind::User, "ann", &["password=correct horse", "grants={\"prod\":\"boss\"}"])]);
        assert!(e.unwrap_err().to_string().contains("grants"), "an unknown role is refused");
        st.commit(vec![set(Kind::User, "ann", &["password=correct horse", "grants={\"prod\":\"operator\"}"])]).unwrap();
        let del = |k: Kind, n: &str| Op::Delete { kind: k, name: n.into(), if_version: None };
        let e = st.commit(vec![del(Kind::Volume, "db")]).unwrap_err();
        assert!(e.to_string().contains("still used by set \"prod\""), "{e}");
        let e = st.commit(vec![del(Kind::Set, "prod")]).unwrap_err();
        assert!(e.to_string().contains("still used by user \"ann\""), "{e}");
        let dump = serde_json::to_string(&st.dump().unwrap()).unwrap();
        assert!(dump.contains("$argon2id$") && !dump.contains("correct horse"), "only the hash is stored");
        let e = st.commit(vec![set(Kind::User, "bob", &["password_hash=plain"])]).unwrap_err();
        assert!(e.to_string().contains("password_hash"), "{e}");
        // Taken apart in order: the user's grant, the set, then the volume.
        st.commit(vec![set(Kind::User, "ann", &["grants={}"])]).unwrap();
        st.commit(vec![del(Kind::Set, "prod"), del(Kind::Volume, "db")]).unwrap();
    }

    /// Alert rules name volumes and a mail server that exist; neither goes while a rule uses it.
    #[test]
    fn alert_rules_refer_to_what_exists() {
        let (_d, st) = store();
        let mut ops = base();
        ops.push(set(Kind::Volume, "db", &["size_bytes=1G", "wrl=w0", "replicas=[\"rep1\"]", "key=k1"]));
        st.commit(ops).unwrap();
        let rule = |a: &[&str]| set(Kind::Alert, "lag", a);
        let e = st.commit(vec![rule(&["when=lag_seconds", "over=60", "volumes=[\"web\"]"])]).unwrap_err();
        assert!(e.to_string().contains("volume \"web\" does not exist"), "{e}");
        let e = st.commit(vec![rule(&["when=lag_seconds", "over=60", "email=[\"ops@example.com\"]"])]).unwrap_err();
        assert!(e.to_string().contains("names no mail server"), "{e}");
        let e = st.commit(vec![rule(&["when=wrl_fill_percent", "over=150"])]).unwrap_err();
        assert!(e.to_string().contains("more than 100 percent"), "{e}");
        let e = st.commit(vec![rule(&["when=lag_seconds", "email=[\"not an address\"]"])]).unwrap_err();
        assert!(e.to_string().contains("not a mail address"), "{e}");
        let e = st.commit(vec![rule(&["when=sometimes"])]).unwrap_err();
        assert!(e.to_string().contains("when"), "{e}");
        st.commit(vec![set(
            Kind::Mail,
            "smtp",
            &["address=127.0.0.1:25", "security=none", "from=drv <drv@localhost>"],
        )])
        .unwrap();
        let w = st
            .commit(vec![rule(&[
                "when=lag_seconds",
                "over=60",
                "volumes=[\"db\"]",
                "email=[\"ops@example.com\"]",
                "mail_every=15m",
            ])])
            .unwrap();
        assert_eq!(w.values[0]["mail_every"], 900);
        let del = |k: Kind, n: &str| Op::Delete { kind: k, name: n.into(), if_version: None };
        let e = st.commit(vec![del(Kind::Volume, "db")]).unwrap_err();
        assert!(e.to_string().contains("still used by alert \"lag\""), "{e}");
        let e = st.commit(vec![del(Kind::Mail, "smtp")]).unwrap_err();
        assert!(e.to_string().contains("still used by alert \"lag\""), "{e}");
        st.commit(vec![del(Kind::Alert, "lag"), del(Kind::Mail, "smtp")]).unwrap();
    }

    /// A user's command is checked as it applies: against the roles and sets of that moment, so a
    /// grant taken away by an earlier command is not used by a later one.
    #[test]
    fn a_users_change_is_authorised_as_it_applies() {
        let (_d, st) = store();
        let mut ops = base();
        ops.push(set(Kind::Volume, "db", &["size_bytes=1G", "wrl=w0", "replicas=[\"rep1\"]", "key=k1"]));
        ops.push(set(Kind::Volume, "web", &["size_bytes=1G", "wrl=w0", "replicas=[\"rep1\"]", "key=k1"]));
        ops.push(set(Kind::Set, "a", &["volumes=[\"db\"]"]));
        ops.push(set(Kind::Set, "b", &["volumes=[\"web\"]"]));
        ops.push(set(Kind::User, "op", &["password=correct horse", "grants={\"a\":\"operator\",\"b\":\"viewer\"}"]));
        st.commit(ops).unwrap();
        let as_op = |id: u128, ops: Vec<Op>| Command { user: Some("op".into()), ..cmd(id, ops) };
        let w = st.apply(&as_op(100, vec![set(Kind::Volume, "db", &["bwlimit=10M"])])).unwrap();
        assert!(!w.replayed);
        let e = st.apply(&as_op(101, vec![set(Kind::Volume, "web", &["bwlimit=10M"])])).unwrap_err();
        assert_eq!(e.code(), "forbidden");
        assert!(e.to_string().contains("user \"op\" may not") && e.to_string().contains("web"), "{e}");
        let e = st.apply(&as_op(102, vec![set(Kind::User, "op", &["admin=true"])])).unwrap_err();
        assert_eq!(e.code(), "forbidden", "no user raises their own role");
        st.commit(vec![set(Kind::User, "op", &["grants={\"b\":\"viewer\"}"])]).unwrap();
        let before = st.dump().unwrap();
        let e = st.apply(&as_op(103, vec![set(Kind::Volume, "db", &["bwlimit=20M"])])).unwrap_err();
        assert_eq!(e.code(), "forbidden", "the grant is gone: {e}");
        let ghost = Command { user: Some("ghost".into()), ..cmd(104, vec![set(Kind::Volume, "db", &["bwlimit=1M"])]) };
        assert!(st.apply(&ghost).unwrap_err().to_string().contains("no such user"));
        assert_eq!(st.dump().unwrap(), before, "refusals change nothing");
        // A replay of the first, allowed change is answered as it was.
        assert!(st.apply(&as_op(100, vec![set(Kind::Volume, "db", &["bwlimit=10M"])])).unwrap().replayed);
    }

    /// `if_version` refuses a change to an entry that changed since it was read; a retry of an
    /// applied command is answered with its first outcome and changes nothing.
    #[test]
    fn conditional_changes_and_retries() {
        let (_d, st) = store();
        st.apply(&cmd(1, base())).unwrap();
        let cond = |v: u64| Op::Set {
            kind: Kind::Key,
            name: "k1".into(),
            assignments: s(&["path=/etc/drv/k2.key"]),
            if_version: Some(v),
        };
        let e = st.apply(&cmd(2, vec![cond(7)])).unwrap_err();
        assert!(matches!(e, ConfigError::Stale { expected: 7, actual: 1, .. }), "{e}");
        assert!(e.to_string().contains("key \"k1\" is at version 1, not 7"), "{e}");
        let w = st.apply(&cmd(3, vec![cond(1)])).unwrap();
        assert_eq!(w.version, 2);
        // Only if it does not exist yet.
        let new = |name: &str| Op::Set {
            kind: Kind::Key,
            name: name.into(),
            assignments: s(&["path=/k"]),
            if_version: Some(0),
        };
        assert!(matches!(st.apply(&cmd(4, vec![new("k1")])), Err(ConfigError::Stale { actual: 2, .. })));
        st.apply(&cmd(5, vec![new("k3")])).unwrap();
        // The retry of command 3.
        let again = st.apply(&cmd(3, vec![cond(1)])).unwrap();
        assert_eq!((again.version, again.replayed), (2, true));
        assert_eq!(again.values, w.values);
        assert_eq!(st.version().unwrap(), 3);
        let log = st.log(0, 100).unwrap();
        let versions: Vec<u64> = log.iter().map(|r| r.version).collect();
        assert_eq!(versions, [1, 2, 3], "refused commands leave no history; a retry adds none");
        assert_eq!((log[1].request_id, log[1].author.as_str(), log[1].time_unix_ms), (3, "test", 1_003));
        assert_eq!(st.log(2, 100).unwrap().len(), 1);
        // A delete forgets the entry's version: a new one starts again from "does not exist".
        st.apply(&cmd(6, vec![Op::Delete { kind: Kind::Key, name: "k3".into(), if_version: Some(3) }])).unwrap();
        st.apply(&cmd(7, vec![new("k3")])).unwrap();
    }

    /// A store written before there were versions: its entries are at version 1 when it is
    /// opened, so "only if it does not exist" refuses them.
    #[test]
    fn entries_of_an_older_store_get_a_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.redb");
        {
            let db = redb::Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(Kind::Key.table()).unwrap().insert("k1", br#"{"path":"/k"}"#.as_slice()).unwrap();
            tx.open_table(COUNTERS).unwrap();
            tx.commit().unwrap();
        }
        let st = ConfigStore::open(&path).unwrap();
        assert_eq!(st.version().unwrap(), 1);
        let op = Op::Set { kind: Kind::Key, name: "k1".into(), assignments: s(&["path=/j"]), if_version: Some(0) };
        assert!(matches!(st.apply(&cmd(1, vec![op])), Err(ConfigError::Stale { actual: 1, .. })));
        let op = Op::Set { kind: Kind::Key, name: "k1".into(), assignments: s(&["path=/j"]), if_version: Some(1) };
        assert_eq!(st.apply(&cmd(2, vec![op])).unwrap().version, 2);
    }

    /// The history keeps the newest [`HISTORY_LIMIT`] commands, and their request ids only.
    #[test]
    fn the_history_is_bounded() {
        let (_d, st) = store();
        let db = st.writable().unwrap();
        let tx = db.begin_write().unwrap();
        let e = st.err();
        let n = HISTORY_LIMIT + 5;
        for i in 1..=n {
            let name = format!("k{}", i % 7);
            let op = set(Kind::Key, &name, &[&format!("path=/k/{i}")]);
            apply(&tx, &cmd(u128::from(i), vec![op]), i, &e).unwrap();
        }
        tx.commit().unwrap();
        let log = st.log(0, usize::MAX).unwrap();
        assert_eq!(log.len() as u64, HISTORY_LIMIT);
        assert_eq!(log[0].version, 6);
        let newest: Vec<u64> = st.newest(3).unwrap().iter().map(|r| r.version).collect();
        assert_eq!(newest, [n - 2, n - 1, n], "the newest, oldest first");
        // The oldest request ids are forgotten with their records: a retry applies again.
        let w = st.apply(&cmd(1, vec![set(Kind::Key, "k1", &["path=/again"])])).unwrap();
        assert_eq!((w.version, w.replayed), (n + 1, false));
        let w = st.apply(&cmd(u128::from(n), vec![set(Kind::Key, "k1", &["path=/again"])])).unwrap();
        assert_eq!((w.version, w.replayed), (n, true));
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        let kind = prop_oneof![
            Just(Kind::Endpoint),
            Just(Kind::Key),
            Just(Kind::Wrl),
            Just(Kind::Volume),
            Just(Kind::Set),
            Just(Kind::User)
        ];
        let name = prop_oneof![Just("a"), Just("b"), Just("c")];
        let field = prop_oneof![
            Just("role=staging"),
            Just("role=replica"),
            Just("address=127.0.0.1:7001"),
            Just("path=/k"),
            Just("staging=a"),
            Just("devices=[\"/dev/sdb\"]"),
            Just("size_bytes=1G"),
            Just("wrl=b"),
            Just("replicas=[\"a\"]"),
            Just("key=c"),
            Just("colour=blue"),
            Just("volumes=[\"a\"]"),
            Just("grants={\"b\":\"viewer\"}"),
            Just(
                "password_hash=$argon2id$v=19$m=19456,t=2,p=1$Nf+S8scgr+kFhhaWA0lRNg$dJz/7oVlCEPxcUX+4zYUpgY0RdYiLcpPNykyajTprbs"
            ),
        ];
        let version = prop::option::of(0u64..4);
        (kind, name, prop::collection::vec(field, 0..4), version, any::<bool>()).prop_map(
            |(kind, name, a, if_version, del)| {
                if del {
                    Op::Delete { kind, name: name.into(), if_version }
                } else {
                    Op::Set {
                        kind,
                        name: name.into(),
                        assignments: a.iter().map(|x| x.to_string()).collect(),
                        if_version,
                    }
                }
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        /// Two stores given the same commands in the same order give the same outcomes and hold
        /// the same bytes (apply reads nothing but the transaction), one of them reopened midway;
        /// every entry has a version and every version an entry.
        #[test]
        fn the_same_commands_make_the_same_store(cmds in prop::collection::vec(prop::collection::vec(op_strategy(), 1..4), 1..12)) {
            let dir = tempfile::tempdir().unwrap();
            let (pa, pb) = (dir.path().join("a.redb"), dir.path().join("b.redb"));
            let a = ConfigStore::open(&pa).unwrap();
            let mut b = ConfigStore::open(&pb).unwrap();
            for (i, ops) in cmds.into_iter().enumerate() {
                let c = cmd(i as u128 + 1, ops);
                let (x, y) = (a.apply(&c), b.apply(&c));
                prop_assert_eq!(x.as_ref().map_err(|e| e.to_string()), y.as_ref().map_err(|e| e.to_string()));
                if i == 5 {
                    drop(b);
                    b = ConfigStore::open(&pb).unwrap();
                }
            }
            let (da, db) = (a.dump().unwrap(), b.dump().unwrap());
            prop_assert_eq!(&da, &db);
            let entries: std::collections::BTreeSet<String> =
                da.entries.iter().flat_map(|(k, m)| m.keys().map(move |n| format!("{k}/{n}"))).collect();
            let versioned: std::collections::BTreeSet<String> = da.entry_versions.keys().cloned().collect();
            prop_assert_eq!(entries, versioned);
            // What a snapshot carries makes the same store again.
            let c = ConfigStore::open(&dir.path().join("c.redb")).unwrap();
            c.load(&da).unwrap();
            prop_assert_eq!(c.dump().unwrap(), da);
        }

        /// A kept [`View`] gives the same outcomes as decoding every entry for each command, and
        /// after each applied command it holds what decoding the store would give.
        #[test]
        fn a_kept_view_is_what_decoding_gives(cmds in prop::collection::vec(prop::collection::vec(op_strategy(), 1..4), 1..16)) {
            let dir = tempfile::tempdir().unwrap();
            let plain = ConfigStore::open(&dir.path().join("a.redb")).unwrap();
            let viewed = ConfigStore::open(&dir.path().join("b.redb")).unwrap();
            let (db, e) = (viewed.writable().unwrap(), viewed.err());
            let mut view = View::default();
            for (i, ops) in cmds.into_iter().enumerate() {
                // Every fourth command retries the one before (a replay if that one applied).
                let id = if i % 4 == 3 { i as u128 } else { i as u128 + 1 };
                let c = cmd(id, ops);
                let x = plain.apply(&c);
                let tx = db.begin_write().unwrap();
                let version = viewed.version().unwrap() + 1;
                let y = apply_viewed(&tx, &c, version, &e, &mut view);
                prop_assert_eq!(x.as_ref().map_err(|e| e.to_string()), y.as_ref().map_err(|e| e.to_string()));
                if let Ok(w) = &y {
                    tx.commit().unwrap();
                    let tx = db.begin_write().unwrap();
                    // A replay leaves the view as it was (of the version the store is at).
                    let at = viewed.version().unwrap();
                    prop_assert_eq!(at, if w.replayed { version - 1 } else { version });
                    if let Some((v, snap)) = &view.0 {
                        prop_assert_eq!(*v, at);
                        prop_assert_eq!(snap, &snapshot(&tx, &e).unwrap());
                    } else {
                        prop_assert!(w.replayed, "an applied command leaves a view");
                    }
                } else {
                    prop_assert!(view.0.is_none(), "a refused command leaves no view");
                }
            }
            prop_assert_eq!(plain.dump().unwrap(), viewed.dump().unwrap());
        }
    }
}
