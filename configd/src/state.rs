//! The state machine of one config server (`DATA/state.redb`): the configuration store's own
//! tables (`drv_config`: entries, counters, entry versions, history, request ids), and:
//!
//! | table      | key          | value                                                  |
//! |------------|--------------|--------------------------------------------------------|
//! | `sm_meta`  | `applied`    | JSON of the log id of the last entry applied           |
//! |            | `membership` | JSON of the last membership applied                    |
//! | `snapshot` | `meta`       | JSON of the newest snapshot's openraft metadata        |
//! |            | `data`       | its body (`snapshot.rs`)                               |
//!
//! Each entry is applied in one transaction with `applied`: a command's changes and the position
//! commit together, so a crash leaves the store either before the entry (openraft applies it
//! again from the log) or after it. Those commits are not synced (the log is: an applied entry is
//! on a majority's disks); a snapshot's commit is, so everything applied before it is durable
//! before openraft purges the log up to it. A command `drv_config` refuses changes nothing: its
//! transaction is dropped and `applied` moves on alone. The version of a change is its log
//! index. A snapshot is built from one read transaction (a consistent view while apply goes on)
//! and installed in one write transaction after its body was checked whole. The entries, decoded
//! as the rules between them see them, stay in memory from one command to the next
//! (`command::View`: used only while the store is at the version it was made for).

use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, Mutex};

use drv_config::{ConfigError, command};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::Deserialize;

use crate::{Applied, NodeId, PeerNode, Refusal, StorageError, TypeConfig};

const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

type Result<T> = std::result::Result<T, StorageError>;
type Membership = StoredMembership<NodeId, PeerNode>;

fn write_err<E: std::error::Error + 'static>(e: E) -> StorageError {
    StorageIOError::write_state_machine(&e).into()
}

fn read_err<E: std::error::Error + 'static>(e: E) -> StorageError {
    StorageIOError::read_state_machine(&e).into()
}

/// `drv_config`'s errors of the database itself, as the state machine's.
fn config_err(path: &str) -> impl Fn(redb::Error) -> ConfigError + '_ {
    move |e| ConfigError::Store { path: path.to_owned(), err: Box::new(e) }
}

/// The state machine (cheap to clone: one database shared).
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    path: Arc<str>,
    /// The entries decoded as of the newest applied command, kept so that checking the next
    /// one does not decode them all again (cleared when a snapshot replaces the tables).
    view: Arc<Mutex<command::View>>,
}

fn get_meta<T: for<'de> Deserialize<'de>>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    k: &str,
) -> Result<Option<T>> {
    let Some(v) = t.get(k).map_err(read_err)? else { return Ok(None) };
    serde_json::from_slice(v.value()).map(Some).map_err(read_err)
}

fn put_meta<T: serde::Serialize>(tx: &WriteTransaction, k: &str, v: &T) -> Result<()> {
    let b = serde_json::to_vec(v).map_err(write_err)?;
    tx.open_table(SM_META).map_err(write_err)?.insert(k, b.as_slice()).map_err(write_err)?;
    Ok(())
}

impl StateMachine {
    /// Opens (or creates) the state machine at `path`.
    pub fn open(path: &Path) -> Result<StateMachine> {
        let db = Database::create(path).map_err(write_err)?;
        let tx = db.begin_write().map_err(write_err)?;
        command::prepare(&tx).map_err(write_err)?;
        tx.open_table(SM_META).map_err(write_err)?;
        tx.open_table(SNAPSHOT).map_err(write_err)?;
        tx.commit().map_err(write_err)?;
        let view = Arc::new(Mutex::new(command::View::default()));
        Ok(StateMachine { db: Arc::new(db), path: path.display().to_string().into(), view })
    }

    /// A reading view of the configuration (changes go through raft only).
    pub fn store(&self) -> drv_config::ConfigStore {
        drv_config::ConfigStore::shared(self.db.clone(), &self.path)
    }

    /// Everything the configuration holds now (this server's view).
    pub fn tables(&self) -> std::result::Result<drv_config::Tables, ConfigError> {
        let e = config_err(&self.path);
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        command::dump(&tx, &e)
    }

    /// Applies one entry, with its position, in one transaction.
    fn apply_one(db: &Database, path: &str, view: &mut command::View, entry: Entry<TypeConfig>) -> Result<Applied> {
        let index = entry.log_id.index;
        let tx = db.begin_write().map_err(write_err)?;
        let outcome = match entry.payload {
            EntryPayload::Blank => None,
            EntryPayload::Membership(m) => {
                put_meta(&tx, "membership", &StoredMembership::new(Some(entry.log_id), m))?;
                None
            }
            EntryPayload::Normal(cmd) => Some(command::apply_viewed(&tx, &cmd, index, &config_err(path), view)),
        };
        let (tx, outcome) = match outcome {
            Some(Err(e)) => {
                // Refused: nothing of it stays; only the position moves.
                tx.abort().map_err(write_err)?;
                let refusal = Refusal { code: e.code().into(), message: e.to_string() };
                (db.begin_write().map_err(write_err)?, Some(Err(refusal)))
            }
            Some(Ok(w)) => (tx, Some(Ok(w))),
            None => (tx, None),
        };
        put_meta(&tx, "applied", &entry.log_id)?;
        // Not synced: the entry is durable in the raft log (on a majority), and a crash that
        // loses this commit loses `applied` with it, so openraft applies the entry again. The
        // next synced commit (a snapshot's) makes it durable before the log is purged below it.
        let mut tx = tx;
        tx.set_durability(redb::Durability::None).map_err(write_err)?;
        tx.commit().map_err(write_err)?;
        Ok(Applied { index, outcome })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let (db, path) = (self.db.clone(), self.path.clone());
        let built = tokio::task::spawn_blocking(move || -> Result<(SnapshotMeta<NodeId, PeerNode>, Vec<u8>)> {
            let (meta, data) = {
                // One read transaction: a consistent view while apply goes on.
                let rtx = db.begin_read().map_err(read_err)?;
                let m = rtx.open_table(SM_META).map_err(read_err)?;
                let applied: Option<LogId<NodeId>> = get_meta(&m, "applied")?;
                let membership: Membership = get_meta(&m, "membership")?.unwrap_or_default();
                let tables = command::dump(&rtx, &config_err(&path)).map_err(read_err)?;
                let data = crate::snapshot::encode(&tables);
                let snapshot_id = match applied {
                    Some(l) => format!("{}-{}-{:016x}", l.leader_id, l.index, xxhash_rust::xxh3::xxh3_64(&data)),
                    None => format!("none-{:016x}", xxhash_rust::xxh3::xxh3_64(&data)),
                };
                (SnapshotMeta { last_log_id: applied, last_membership: membership, snapshot_id }, data)
            };
            let tx = db.begin_write().map_err(write_err)?;
            store_snapshot(&tx, &meta, &data)?;
            tx.commit().map_err(write_err)?;
            Ok((meta, data))
        });
        let (meta, data) = built.await.map_err(write_err)??;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

fn store_snapshot(tx: &WriteTransaction, meta: &SnapshotMeta<NodeId, PeerNode>, data: &[u8]) -> Result<()> {
    let mut s = tx.open_table(SNAPSHOT).map_err(write_err)?;
    s.insert("meta", serde_json::to_vec(meta).map_err(write_err)?.as_slice()).map_err(write_err)?;
    s.insert("data", data).map_err(write_err)?;
    Ok(())
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership)> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let m = tx.open_table(SM_META).map_err(read_err)?;
        Ok((get_meta(&m, "applied")?, get_meta(&m, "membership")?.unwrap_or_default()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let (db, path, view) = (self.db.clone(), self.path.clone(), self.view.clone());
        let applied = tokio::task::spawn_blocking(move || {
            let mut view = view.lock().expect("the state machine's view");
            entries.into_iter().map(|e| Self::apply_one(&db, &path, &mut view, e)).collect::<Result<Vec<_>>>()
        });
        applied.await.map_err(write_err)?
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, PeerNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        let data = snapshot.into_inner();
        // Checked whole before anything is replaced.
        let tables =
            crate::snapshot::decode(&data).map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let (meta, db, path, view) = (meta.clone(), self.db.clone(), self.path.clone(), self.view.clone());
        let installed = tokio::task::spawn_blocking(move || -> Result<()> {
            // Held until the new tables are in: no apply may use a view of the old ones.
            let mut view = view.lock().expect("the state machine's view");
            view.clear();
            let tx = db.begin_write().map_err(write_err)?;
            command::load(&tx, &tables, &config_err(&path)).map_err(write_err)?;
            put_meta(&tx, "applied", &meta.last_log_id)?;
            put_meta(&tx, "membership", &meta.last_membership)?;
            store_snapshot(&tx, &meta, &data)?;
            tx.commit().map_err(write_err)
        });
        installed.await.map_err(write_err)?
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let s = tx.open_table(SNAPSHOT).map_err(read_err)?;
        let Some(meta) = get_meta::<SnapshotMeta<NodeId, PeerNode>>(&s, "meta")? else { return Ok(None) };
        let data = s.get("data").map_err(read_err)?.map(|v| v.value().to_vec()).unwrap_or_default();
        Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

#[cfg(test)]
mod tests {
    use drv_config::{Kind, Op};
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::{CommittedLeaderId, EntryPayload};
    use tempfile::TempDir;

    use super::*;
    use crate::log_store::LogStore;

    struct RedbBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for RedbBuilder {
        async fn build(&self) -> Result<(TempDir, LogStore, StateMachine)> {
            let d = TempDir::new().expect("a temporary directory");
            let l = LogStore::open(&d.path().join("raft-log.redb"))?;
            let s = StateMachine::open(&d.path().join("state.redb"))?;
            Ok((d, l, s))
        }
    }

    /// openraft's own storage conformance suite, against the redb stores. A plain `#[test]`: the
    /// suite makes a runtime per case.
    #[test]
    fn openraft_storage_suite() -> Result<()> {
        Suite::test_all(RedbBuilder)
    }

    fn entry(index: u64, ops: Vec<Op>) -> Entry<TypeConfig> {
        let cmd =
            drv_config::Command { request_id: u128::from(index), author: "t".into(), time_unix_ms: 1, ops, user: None };
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 0), index), payload: EntryPayload::Normal(cmd) }
    }

    fn key(name: &str, path: &str) -> Op {
        Op::Set { kind: Kind::Key, name: name.into(), assignments: vec![format!("path={path}")], if_version: None }
    }

    /// Commands apply at their log index as version; a refused one changes nothing but the
    /// position and comes back as a refusal; a snapshot carries everything to another server,
    /// and a damaged one is refused before anything is replaced.
    #[test]
    fn commands_apply_at_their_index_and_snapshots_carry_them() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = TempDir::new().unwrap();
        let mut a = StateMachine::open(&dir.path().join("a.redb")).unwrap();
        let out = rt
            .block_on(a.apply(vec![
                entry(3, vec![key("k1", "/a")]),
                entry(4, vec![Op::Delete { kind: Kind::Key, name: "nope".into(), if_version: None }]),
                entry(6, vec![key("k2", "/b")]),
            ]))
            .unwrap();
        assert_eq!(out[0].outcome.as_ref().unwrap().as_ref().unwrap().version, 3);
        let refused = out[1].outcome.clone().unwrap().unwrap_err();
        assert_eq!(refused.code, "not_found", "{refused:?}");
        assert!(refused.message.contains("no key named \"nope\""), "{refused:?}");
        assert_eq!(out[2].outcome.as_ref().unwrap().as_ref().unwrap().version, 6);
        let (applied, _) = rt.block_on(a.applied_state()).unwrap();
        assert_eq!(applied.unwrap().index, 6);
        let t = a.tables().unwrap();
        assert_eq!(t.counters["config_version"], 6);
        assert_eq!(t.history.iter().map(|r| r.version).collect::<Vec<_>>(), [3, 6]);

        let snap = rt.block_on(a.build_snapshot()).unwrap();
        let mut b = StateMachine::open(&dir.path().join("b.redb")).unwrap();
        let empty = b.tables().unwrap();
        let mut bad = snap.snapshot.get_ref().clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        let e = rt.block_on(b.install_snapshot(&snap.meta, Box::new(Cursor::new(bad)))).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        assert_eq!(b.tables().unwrap(), empty, "a refused snapshot changed nothing");
        rt.block_on(b.install_snapshot(&snap.meta, snap.snapshot.clone())).unwrap();
        assert_eq!(b.tables().unwrap(), t);
        assert_eq!(rt.block_on(b.applied_state()).unwrap().0.unwrap().index, 6);
        // The next command on the installed copy goes on from there.
        let out = rt.block_on(b.apply(vec![entry(7, vec![key("k1", "/c")])])).unwrap();
        assert_eq!(out[0].outcome.as_ref().unwrap().as_ref().unwrap().version, 7);
    }
}
