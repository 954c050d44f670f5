//! The raft log and vote of one config server, in redb (`DATA/raft-log.redb`).
//!
//! | table      | key            | value                                                    |
//! |------------|----------------|----------------------------------------------------------|
//! | `log`      | u64 log index  | `[u8 format = 1]` then the JSON of the openraft entry     |
//! | `log_meta` | `vote`         | JSON of the vote                                         |
//! |            | `committed`    | JSON of the last committed log id (may lag: see below)   |
//! |            | `purged`       | JSON of the last purged log id                           |
//!
//! One thread writes the file, in the order the operations were called, and takes whatever
//! is queued when it starts a transaction into that one transaction (group commit). `append`
//! returns once its entries are queued: until they are in the file they are kept in memory and
//! read from there, so a leader replicates them while they are being flushed (the vendored
//! openraft's patch, `vendor/openraft/DRV-PATCH.md`); openraft hears they are durable from the
//! callback, after the commit. Every other write (`save_vote`, `truncate`, `purge`) returns once
//! it, and everything queued before it, is committed. `save_committed` is queued and not waited
//! for.
//!
//! Crash analysis (a redb commit is atomic, and durable when `commit` returns):
//! - `append`: the entries of one call are in one transaction, committed before openraft is told
//!   they are durable; a crash before leaves none of them, and nothing acknowledged them.
//! - `save_vote`: committed before it returns: a vote is never given twice in a term.
//! - `truncate` (delete from an index on) and `purge` (delete up to an index, and record it)
//!   are one transaction each: `purged` and the first entry never disagree.
//! - `committed` is written in order after the entries it covers, with the next transaction the
//!   writer makes for something else: lost, it is only lower, and openraft learns it again from
//!   the leader. It is written at the end of a transaction, so it never names an entry the file
//!   lacks.
//!
//! Reading an entry checks its format byte and that it is the entry of its key, and names the
//! index when it is not.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex};

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

/// Operations queued for the writer at most; `append` and the others wait for room.
const JOBS_LIMIT: usize = 256;
/// Queued operations one transaction takes at most.
const BATCH_LIMIT: usize = 64;

type WriteFn = Box<dyn FnOnce(&redb::WriteTransaction) -> std::result::Result<(), redb::Error> + Send>;

/// One operation for the writer thread.
enum Job {
    /// Entries (index, log id, bytes) to add; the callback hears when they are durable.
    Append { rows: Vec<(u64, LogId<NodeId>, Vec<u8>)>, flushed: LogFlushed<TypeConfig> },
    /// The last committed log id (JSON); nobody waits for it.
    Committed(Vec<u8>),
    /// Any other change, answered once committed durably.
    Write { f: WriteFn, done: tokio::sync::oneshot::Sender<std::result::Result<(), String>> },
}

/// The log store (cheap to clone: one database and one writer shared).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// Appended and not yet in the file, by index: what readers see on top of the file.
    pending: Arc<Mutex<BTreeMap<u64, Entry<TypeConfig>>>>,
    jobs: tokio::sync::mpsc::Sender<Job>,
}

impl LogStore {
    /// Opens (or creates) the log at `path` and starts its writer thread (which ends when the
    /// last clone of the store is dropped, after the queued operations).
    pub fn open(path: &Path) -> Result<LogStore> {
        let db = Database::create(path).map_err(write_err)?;
        let tx = db.begin_write().map_err(write_err)?;
        tx.open_table(LOG).map_err(write_err)?;
        tx.open_table(LOG_META).map_err(write_err)?;
        tx.commit().map_err(write_err)?;
        let (db, pending) = (Arc::new(db), Arc::new(Mutex::new(BTreeMap::new())));
        let (jobs, queue) = tokio::sync::mpsc::channel(JOBS_LIMIT);
        let writer = Writer { db: db.clone(), pending: pending.clone(), committed: None };
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(write_err)?;
        Ok(LogStore { db, pending, jobs })
    }

    fn meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let t = tx.open_table(LOG_META).map_err(read_err)?;
        let Some(v) = t.get(key).map_err(read_err)? else { return Ok(None) };
        serde_json::from_slice(v.value()).map(Some).map_err(read_err)
    }

    async fn queue(&self, job: Job) -> Result<()> {
        self.jobs.send(job).await.map_err(|_| write_err(std::io::Error::other("the raft log's writer has stopped")))
    }

    /// Runs `f` in the writer's next transaction and waits until it is committed durably.
    async fn write<F>(&self, f: F) -> Result<()>
    where
        F: FnOnce(&redb::WriteTransaction) -> std::result::Result<(), redb::Error> + Send + 'static,
    {
        let (done, answer) = tokio::sync::oneshot::channel();
        self.queue(Job::Write { f: Box::new(f), done }).await?;
        let stopped = || "the raft log's writer stopped before the commit".to_owned();
        answer.await.unwrap_or_else(|_| Err(stopped())).map_err(|e| write_err(std::io::Error::other(e)))
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry<TypeConfig>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The thread that writes the log file.
struct Writer {
    db: Arc<Database>,
    pending: Arc<Mutex<BTreeMap<u64, Entry<TypeConfig>>>>,
    /// The newest committed log id queued and not yet written: it goes with the next transaction.
    committed: Option<Vec<u8>>,
}

impl Writer {
    fn run(mut self, mut queue: tokio::sync::mpsc::Receiver<Job>) {
        while let Some(first) = queue.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < BATCH_LIMIT {
                match queue.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    /// One durable transaction for the whole batch, in order; then every job hears the outcome.
    /// A batch of committed log ids alone writes nothing: the newest waits for the next one.
    fn commit(&mut self, batch: Vec<Job>) {
        // Taken apart: what goes into the transaction (consumed there), and who hears after.
        let mut work: Vec<Work> = Vec::with_capacity(batch.len());
        let mut replies: Vec<Reply> = Vec::with_capacity(batch.len());
        for job in batch {
            match job {
                Job::Committed(b) => self.committed = Some(b),
                Job::Append { rows, flushed } => {
                    replies.push(Reply::Appended(rows.iter().map(|(i, id, _)| (*i, *id)).collect(), flushed));
                    work.push(Work::Rows(rows.into_iter().map(|(i, _, b)| (i, b)).collect()));
                }
                Job::Write { f, done } => {
                    work.push(Work::Write(f));
                    replies.push(Reply::Written(done));
                }
            }
        }
        if work.is_empty() {
            return;
        }
        let committed = self.committed.as_deref();
        let outcome = (|| -> std::result::Result<(), redb::Error> {
            let tx = self.db.begin_write()?;
            for w in work {
                match w {
                    Work::Rows(rows) => {
                        let mut t = tx.open_table(LOG)?;
                        for (i, b) in &rows {
                            t.insert(*i, b.as_slice())?;
                        }
                    }
                    Work::Write(f) => f(&tx)?,
                }
            }
            // After every entry of the batch: it never names an entry the file lacks.
            if let Some(b) = committed {
                tx.open_table(LOG_META)?.insert("committed", b)?;
            }
            tx.commit()?;
            Ok(())
        })();
        if outcome.is_ok() {
            self.committed = None;
        }
        let said = outcome.as_ref().err().map(|e| e.to_string());
        if let Some(e) = &said {
            tracing::error!("the raft log: a write failed: {e}");
        }
        for r in replies {
            match r {
                Reply::Appended(ids, flushed) => {
                    if said.is_none() {
                        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                        for (i, id) in &ids {
                            if pending.get(i).is_some_and(|e| e.log_id == *id) {
                                pending.remove(i);
                            }
                        }
                    }
                    // Durable (or failed) before openraft hears of it.
                    flushed.log_io_completed(said.clone().map_or(Ok(()), |e| Err(std::io::Error::other(e))));
                }
                Reply::Written(done) => drop(done.send(said.clone().map_or(Ok(()), Err))),
            }
        }
    }
}

/// What one job puts into the writer's transaction.
enum Work {
    Rows(Vec<(u64, Vec<u8>)>),
    Write(WriteFn),
}

/// Who hears how the writer's transaction went.
enum Reply {
    Appended(Vec<(u64, LogId<NodeId>)>, LogFlushed<TypeConfig>),
    Written(tokio::sync::oneshot::Sender<std::result::Result<(), String>>),
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
        let r = (bound(range.start_bound()), bound(range.end_bound()));
        // Pending first: an entry leaves it only once it is in the file, read after.
        let pending: Vec<Entry<TypeConfig>> = self.pending().range(r).map(|(_, e)| e.clone()).collect();
        let tx = self.db.begin_read().map_err(read_err)?;
        let t = tx.open_table(LOG).map_err(read_err)?;
        let mut out = BTreeMap::new();
        for row in t.range::<u64>(r).map_err(read_err)? {
            let (k, v) = row.map_err(read_err)?;
            out.insert(k.value(), decode(k.value(), v.value())?);
        }
        out.extend(pending.into_iter().map(|e| (e.log_id.index, e)));
        Ok(out.into_values().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let queued = self.pending().last_key_value().map(|(_, e)| e.log_id);
        let last = {
            let tx = self.db.begin_read().map_err(read_err)?;
            let t = tx.open_table(LOG).map_err(read_err)?;
            match t.last().map_err(read_err)? {
                Some((k, v)) => Some(decode(k.value(), v.value())?.log_id),
                None => None,
            }
        };
        let purged: Option<LogId<NodeId>> = self.meta("purged")?;
        Ok(LogState { last_purged_log_id: purged, last_log_id: queued.max(last).or(purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<()> {
        let b = serde_json::to_vec(vote).map_err(write_err)?;
        self.write(move |tx| tx.open_table(LOG_META)?.insert("vote", b.as_slice()).map(drop).map_err(Into::into)).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>> {
        self.meta("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<()> {
        let b = serde_json::to_vec(&committed).map_err(write_err)?;
        // In order after the entries it covers; not waited for (see the crash analysis).
        self.queue(Job::Committed(b)).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>> {
        Ok(self.meta::<Option<LogId<NodeId>>>("committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, flushed: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let rows = entries.iter().map(|e| (e.log_id.index, e.log_id, encode(e))).collect();
        self.pending().extend(entries.into_iter().map(|e| (e.log_id.index, e)));
        self.queue(Job::Append { rows, flushed }).await
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        self.pending().retain(|&i, _| i < log_id.index);
        self.write(move |tx| tx.open_table(LOG)?.retain_in(log_id.index.., |_, _| false).map_err(Into::into)).await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        let b = serde_json::to_vec(&log_id).map_err(write_err)?;
        self.write(move |tx| {
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
