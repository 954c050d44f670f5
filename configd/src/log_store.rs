//! The raft log and vote of one config server, in redb (`DATA/raft-log.redb`).
//!
//! | table      | key            | value                                                    |
//! |------------|----------------|----------------------------------------------------------|
//! | `log`      | u64 log index  | `[u8 format = 1]` then the JSON of the openraft entry     |
//! | `log_meta` | `vote`         | JSON of the vote                                         |
//! |            | `committed`    | JSON of the last committed log id (may lag: see below)   |
//! |            | `purged`       | JSON of the last purged log id                           |
//!
//! Crash analysis (a redb commit is atomic, and durable when `commit` returns):
//! - `append`: the entries of one call in one transaction, committed before openraft is told
//!   they are durable; a crash before leaves none of them, and nothing acknowledged them.
//! - `save_vote`: committed before it returns: a vote is never given twice in a term.
//! - `truncate` (delete from an index on) and `purge` (delete up to an index, and record it)
//!   are one transaction each: `purged` and the first entry never disagree.
//! - `committed` is committed without a sync (`Durability::None`): the next durable commit of this
//!   file carries it; lost, it is only lower, and openraft learns it again from the leader.
//!
//! Reading an entry checks its format byte and that it is the entry of its key, and names the
//! index when it is not.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageIOError, Vote};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Deserialize;

use crate::{NodeId, StorageError, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const LOG_META: TableDefinition<&str, &[u8]> = TableDefinition::new("log_meta");
const ENTRY_FORMAT: u8 = 1;

type Result<T> = std::result::Result<T, StorageError>;

fn encode(e: &Entry<TypeConfig>) -> Vec<u8> {
    let mut v = vec![ENTRY_FORMAT];
    serde_json::to_writer(&mut v, e).expect("JSON of an entry");
    v
}

fn decode(index: u64, b: &[u8]) -> Result<Entry<TypeConfig>> {
    let bad = |why: String| StorageIOError::read_log_at_index(index, openraft::AnyError::error(why));
    let (&format, rest) = b.split_first().ok_or_else(|| bad("an empty value".into()))?;
    if format != ENTRY_FORMAT {
        return Err(bad(format!("entry format {format}, this server reads format {ENTRY_FORMAT}")).into());
    }
    let e: Entry<TypeConfig> = serde_json::from_slice(rest).map_err(|e| bad(format!("entry: {e}")))?;
    if e.log_id.index != index {
        return Err(bad(format!("the entry stored at index {index} is entry {}", e.log_id.index)).into());
    }
    Ok(e)
}

fn write_err<E: std::error::Error + 'static>(e: E) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

fn read_err<E: std::error::Error + 'static>(e: E) -> StorageError {
    StorageIOError::read_logs(&e).into()
}

/// The log store (cheap to clone: one database shared).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    /// Opens (or creates) the log at `path`.
    pub fn open(path: &Path) -> Result<LogStore> {
        let db = Database::create(path).map_err(write_err)?;
        let tx = db.begin_write().map_err(write_err)?;
        tx.open_table(LOG).map_err(write_err)?;
        tx.open_table(LOG_META).map_err(write_err)?;
        tx.commit().map_err(write_err)?;
        Ok(LogStore { db: Arc::new(db) })
    }

    fn meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let t = tx.open_table(LOG_META).map_err(read_err)?;
        let Some(v) = t.get(key).map_err(read_err)? else { return Ok(None) };
        serde_json::from_slice(v.value()).map(Some).map_err(read_err)
    }

    /// Runs `f` in one write transaction, committed (durably unless `durable` is false), off the
    /// async threads: a commit syncs the file.
    async fn write<F>(&self, durable: bool, f: F) -> Result<()>
    where
        F: FnOnce(&redb::WriteTransaction) -> std::result::Result<(), redb::Error> + Send + 'static,
    {
        let db = self.db.clone();
        let done = tokio::task::spawn_blocking(move || -> std::result::Result<(), redb::Error> {
            let mut tx = db.begin_write()?;
            if !durable {
                tx.set_durability(redb::Durability::None).map_err(|e| redb::Error::Io(std::io::Error::other(e)))?;
            }
            f(&tx)?;
            tx.commit()?;
            Ok(())
        });
        done.await.map_err(write_err)?.map_err(write_err)
    }
}

fn bound(b: Bound<&u64>) -> Bound<u64> {
    match b {
        Bound::Included(&x) => Bound::Included(x),
        Bound::Excluded(&x) => Bound::Excluded(x),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let t = tx.open_table(LOG).map_err(read_err)?;
        let mut out = Vec::new();
        for row in t.range::<u64>((bound(range.start_bound()), bound(range.end_bound()))).map_err(read_err)? {
            let (k, v) = row.map_err(read_err)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let last = {
            let tx = self.db.begin_read().map_err(read_err)?;
            let t = tx.open_table(LOG).map_err(read_err)?;
            match t.last().map_err(read_err)? {
                Some((k, v)) => Some(decode(k.value(), v.value())?.log_id),
                None => None,
            }
        };
        let purged: Option<LogId<NodeId>> = self.meta("purged")?;
        Ok(LogState { last_purged_log_id: purged, last_log_id: last.or(purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<()> {
        let b = serde_json::to_vec(vote).map_err(write_err)?;
        self.write(true, move |tx| tx.open_table(LOG_META)?.insert("vote", b.as_slice()).map(drop).map_err(Into::into))
            .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>> {
        self.meta("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<()> {
        let b = serde_json::to_vec(&committed).map_err(write_err)?;
        self.write(false, move |tx| {
            tx.open_table(LOG_META)?.insert("committed", b.as_slice()).map(drop).map_err(Into::into)
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>> {
        Ok(self.meta::<Option<LogId<NodeId>>>("committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let rows: Vec<(u64, Vec<u8>)> = entries.into_iter().map(|e| (e.log_id.index, encode(&e))).collect();
        let done = self
            .write(true, move |tx| {
                let mut t = tx.open_table(LOG)?;
                for (i, b) in &rows {
                    t.insert(*i, b.as_slice())?;
                }
                Ok(())
            })
            .await;
        // Durable (or failed) before openraft hears of it: the commit above synced.
        callback.log_io_completed(done.as_ref().map(drop).map_err(|e| std::io::Error::other(e.to_string())));
        done
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        self.write(true, move |tx| tx.open_table(LOG)?.retain_in(log_id.index.., |_, _| false).map_err(Into::into))
            .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        let b = serde_json::to_vec(&log_id).map_err(write_err)?;
        self.write(true, move |tx| {
            tx.open_table(LOG_META)?.insert("purged", b.as_slice())?;
            tx.open_table(LOG)?.retain_in(..=log_id.index, |_, _| false)?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value that is not the entry of its key is refused, naming the index.
    #[test]
    fn a_damaged_log_names_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft-log.redb");
        let mut store = LogStore::open(&path).unwrap();
        let db = store.db.clone();
        let put = |i: u64, b: &[u8]| {
            let tx = db.begin_write().unwrap();
            tx.open_table(LOG).unwrap().insert(i, b).unwrap();
            tx.commit().unwrap();
        };
        let entry = |i: u64| Entry::<TypeConfig> {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 0), i),
            payload: openraft::EntryPayload::Blank,
        };
        put(5, &encode(&entry(6)));
        put(7, &[2, b'{']);
        put(8, &[]);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for (i, want) in [(5, "stored at index 5 is entry 6"), (7, "entry format 2"), (8, "an empty value")] {
            let e = rt.block_on(store.try_get_log_entries(i..=i)).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains(&i.to_string()), "{e}");
        }
    }
}
