//! Time series of the volumes' figures on one config server (`DATA/series.redb`, this
//! server's own), for the web UI's graphs, the alerts and the weekly digest.
//!
//! Two tiers: every [`TIERS`]`[0].step` seconds for a day, and every `[1].step` for 35 days
//! (its value for a step is the mean of the samples in it for a rate, their largest for a
//! level: [`Agg`]). A tier's samples are kept in chunks of [`CHUNK`] consecutive steps:
//!
//! | table    | key                                   | value                                   |
//! |----------|---------------------------------------|-----------------------------------------|
//! | `chunks` | (series name, tier, chunk number)     | `[0][bf16 LE]`: every step that value, or |
//! |          |                                       | `[1][bf16 LE x CHUNK]`: one per step      |
//!
//! Values are bfloat16 (the upper 16 bits of an f32: about 0.4% precision, plenty for a graph;
//! what is stored are rates and levels, never counters). A step without a sample holds NaN. Chunk number n of a tier covers the steps
//! `n * CHUNK .. (n + 1) * CHUNK` (step = unix seconds / tier step). The bytes are bounded: at
//! most [`SERIES_LIMIT`] series, each at most `keep / (step * CHUNK) + 2` chunks per tier of
//! at most `1 + 2 * CHUNK` bytes ([`bytes_bound`]).
//!
//! The chunks being filled stay in memory and are written every [`FLUSH_EVERY`] and when they
//! are full; expired chunks are deleted once an hour. Crash analysis: a crash loses the samples
//! since the last flush (at most [`FLUSH_EVERY`]); each flush is one transaction, so the file
//! holds whole chunks as of some flush.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, TableDefinition};

const CHUNKS: TableDefinition<(&str, u8, u64), &[u8]> = TableDefinition::new("chunks");

/// Steps per chunk.
pub const CHUNK: u64 = 360;
/// Series kept at most (1,000 volumes of 10 series, and room).
pub const SERIES_LIMIT: usize = 20_000;
/// How often the chunks in memory are written.
pub const FLUSH_EVERY: u64 = 60;

/// A tier: its step and how long it keeps samples (seconds).
#[derive(Clone, Copy, Debug)]
pub struct Tier {
    pub step: u64,
    pub keep: u64,
}

pub const TIERS: [Tier; 2] = [Tier { step: 10, keep: 86_400 }, Tier { step: 300, keep: 35 * 86_400 }];

/// How a coarser tier sums up the samples of one of its steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agg {
    /// A rate: their mean.
    Mean,
    /// A level (lag, fill, a state): the largest.
    Max,
}

/// The most bytes `series` series take on disk.
pub fn bytes_bound(series: u64) -> u64 {
    TIERS.iter().map(|t| (t.keep / (t.step * CHUNK) + 2) * (1 + 2 * CHUNK)).sum::<u64>() * series
}

#[derive(Debug, thiserror::Error)]
#[error("time series store {path}: {err}")]
pub struct SeriesError {
    path: String,
    err: Box<redb::Error>,
}

/// A chunk being filled.
struct Open {
    number: u64,
    values: Vec<f32>,
    dirty: bool,
}

impl Open {
    fn new(number: u64) -> Open {
        Open { number, values: vec![f32::NAN; CHUNK as usize], dirty: false }
    }
}

/// Reads a chunk (series, tier, number) as stored.
type Stored<'a> = &'a dyn Fn((&str, u8, u64)) -> Option<Vec<f32>>;

/// The samples of the coarser tier's current step: (step, sum, count, max).
type Acc = (u64, f64, u32, f64);

#[derive(Default)]
struct Mem {
    open: HashMap<(String, u8), Open>,
    acc: HashMap<String, (Agg, Acc)>,
    /// Chunks that filled up (or were replaced) since the last flush.
    full: Vec<((String, u8, u64), Vec<u8>)>,
    last_flush: u64,
    last_expiry: u64,
    refused: bool,
}

/// One server's time series.
#[derive(Clone)]
pub struct Series {
    db: Arc<Database>,
    path: String,
    mem: Arc<Mutex<Mem>>,
}

/// `v` as bfloat16 (the upper half of an f32, rounded to nearest even: 8 bits of precision,
/// about 0.4%, the f32 range; small integers such as states are exact).
fn bf16(v: f32) -> u16 {
    if v.is_nan() {
        return 0x7fc0;
    }
    let b = v.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

fn encode(values: &[f32]) -> Vec<u8> {
    let h: Vec<u16> = values.iter().map(|v| bf16(*v)).collect();
    if h.iter().all(|x| *x == h[0]) {
        let mut b = vec![0u8];
        b.extend_from_slice(&h[0].to_le_bytes());
        return b;
    }
    let mut b = Vec::with_capacity(1 + 2 * values.len());
    b.push(1);
    h.iter().for_each(|v| b.extend_from_slice(&v.to_le_bytes()));
    b
}

/// A chunk's values (a chunk that does not decode reads as no samples).
fn decode(b: &[u8]) -> Vec<f32> {
    let f = |x: &[u8]| from_bf16(u16::from_le_bytes(x.try_into().expect("2 bytes")));
    match b {
        [0, v @ ..] if v.len() == 2 => vec![f(v); CHUNK as usize],
        [1, v @ ..] if v.len() == 2 * CHUNK as usize => v.chunks_exact(2).map(f).collect(),
        _ => vec![f32::NAN; CHUNK as usize],
    }
}

impl Series {
    pub fn open(path: &Path) -> Result<Series, SeriesError> {
        let p = path.display().to_string();
        let err = |e: redb::Error| SeriesError { path: p.clone(), err: Box::new(e) };
        let db = Database::create(path).map_err(|e| err(e.into()))?;
        let tx = db.begin_write().map_err(|e| err(e.into()))?;
        tx.open_table(CHUNKS).map_err(|e| err(e.into()))?;
        tx.commit().map_err(|e| err(e.into()))?;
        Ok(Series { db: Arc::new(db), path: p, mem: Default::default() })
    }

    fn err(&self, e: impl Into<redb::Error>) -> SeriesError {
        SeriesError { path: self.path.clone(), err: Box::new(e.into()) }
    }

    /// Takes the samples of time `now` (unix seconds): `(series, how it sums up, value)`.
    /// Writes what is due (a flush, the expiry) before it returns: call it off the runtime.
    pub fn record(&self, now: u64, samples: &[(String, Agg, f64)]) -> Result<(), SeriesError> {
        {
            let mut m = self.mem.lock().expect("series");
            for (name, agg, v) in samples {
                m.put(name, *agg, now, *v as f32, &|k| self.stored(k));
            }
        }
        let due = {
            let m = self.mem.lock().expect("series");
            now >= m.last_flush + FLUSH_EVERY || !m.full.is_empty()
        };
        if due {
            self.flush(now)?;
        }
        Ok(())
    }

    /// Writes the chunks in memory, and once an hour deletes the expired ones.
    pub fn flush(&self, now: u64) -> Result<(), SeriesError> {
        let (mut writes, expire) = {
            let mut m = self.mem.lock().expect("series");
            let mut w = std::mem::take(&mut m.full);
            for ((name, tier), o) in m.open.iter_mut().filter(|(_, o)| o.dirty) {
                o.dirty = false;
                w.push(((name.clone(), *tier, o.number), encode(&o.values)));
            }
            m.last_flush = now;
            let expire = now >= m.last_expiry + 3600;
            if expire {
                m.last_expiry = now;
                // Chunks in memory go too once expired, and with them the series no longer
                // sampled (a deleted volume's), which then no longer count toward the limit.
                m.open.retain(|(_, tier), o| {
                    TIERS.get(*tier as usize).is_some_and(|t| (o.number + 1) * CHUNK * t.step + t.keep > now)
                });
                let live: std::collections::HashSet<String> = m.open.keys().map(|(n, _)| n.clone()).collect();
                m.acc.retain(|n, _| live.contains(n));
            }
            (w, expire)
        };
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = tx.open_table(CHUNKS).map_err(|e| self.err(e))?;
            for ((name, tier, n), b) in writes.drain(..) {
                t.insert((name.as_str(), tier, n), b.as_slice()).map_err(|e| self.err(e))?;
            }
            if expire {
                t.retain(|(_, tier, n), _| {
                    let Some(tr) = TIERS.get(tier as usize) else { return false };
                    (n + 1) * CHUNK * tr.step + tr.keep > now
                })
                .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// The samples of `name` in tier `tier` from `from` to `to` (unix seconds): (time, value),
    /// steps without a sample left out.
    pub fn read(&self, name: &str, tier: usize, from: u64, to: u64) -> Result<Vec<(u64, f64)>, SeriesError> {
        let step = TIERS[tier].step;
        let (first, last) = (from / step / CHUNK, to / step / CHUNK);
        let mut chunks: Vec<(u64, Vec<f32>)> = Vec::new();
        {
            let tx = self.db.begin_read().map_err(|e| self.err(e))?;
            let t = tx.open_table(CHUNKS).map_err(|e| self.err(e))?;
            for kv in t.range((name, tier as u8, first)..=(name, tier as u8, last)).map_err(|e| self.err(e))? {
                let (k, v) = kv.map_err(|e| self.err(e))?;
                chunks.push((k.value().2, decode(v.value())));
            }
        }
        {
            let m = self.mem.lock().expect("series");
            if let Some(o) = m.open.get(&(name.to_owned(), tier as u8)) {
                chunks.retain(|(n, _)| *n != o.number);
                chunks.push((o.number, o.values.clone()));
            }
        }
        chunks.sort_by_key(|c| c.0);
        let mut out = Vec::new();
        for (n, values) in chunks {
            for (i, v) in values.iter().enumerate() {
                let t = (n * CHUNK + i as u64) * step;
                if (from..=to).contains(&t) && !v.is_nan() {
                    out.push((t, f64::from(*v)));
                }
            }
        }
        Ok(out)
    }

    /// Stores whole chunks as they are (for the benchmark: what a month of samples leaves,
    /// without a month of calls to [`record`](Self::record)).
    #[doc(hidden)]
    pub fn store_chunks(&self, chunks: &[(String, u8, u64, Vec<f32>)]) -> Result<(), SeriesError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = tx.open_table(CHUNKS).map_err(|e| self.err(e))?;
            for (name, tier, n, values) in chunks {
                t.insert((name.as_str(), *tier, *n), encode(values).as_slice()).map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// A chunk as stored, if it is.
    fn stored(&self, (name, tier, n): (&str, u8, u64)) -> Option<Vec<f32>> {
        let tx = self.db.begin_read().ok()?;
        let t = tx.open_table(CHUNKS).ok()?;
        let v = t.get((name, tier, n)).ok()??;
        Some(decode(v.value()))
    }

    /// Compacts the file (only when nothing else holds the store: the benchmark's figure of
    /// the live data); whether it could.
    #[doc(hidden)]
    pub fn compact(&mut self) -> Result<bool, SeriesError> {
        let Some(db) = Arc::get_mut(&mut self.db) else { return Ok(false) };
        db.compact().map_err(|e| SeriesError { path: self.path.clone(), err: Box::new(e.into()) })
    }

    /// Bytes of the store's file.
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }
}

impl Mem {
    /// `stored` reads a chunk from the file: a chunk opened after a restart starts from what
    /// was flushed of it, not empty.
    fn put(&mut self, name: &str, agg: Agg, now: u64, v: f32, stored: Stored<'_>) {
        let known = self.acc.contains_key(name);
        if !known && self.acc.len() >= SERIES_LIMIT {
            if !self.refused {
                self.refused = true;
                tracing::warn!("time series: {SERIES_LIMIT} series kept already; {name} and later ones are not");
            }
            return;
        }
        self.sample(name, 0, now / TIERS[0].step, v, stored);
        let coarse = now / TIERS[1].step;
        let (_, acc) = self.acc.entry(name.to_owned()).or_insert((agg, (coarse, 0.0, 0, f64::MIN)));
        if acc.0 != coarse {
            let done = *acc;
            *acc = (coarse, 0.0, 0, f64::MIN);
            if done.2 > 0 {
                let value = match agg {
                    Agg::Mean => done.1 / f64::from(done.2),
                    Agg::Max => done.3,
                };
                self.sample(name, 1, done.0, value as f32, stored);
            }
        }
        let (_, acc) = self.acc.get_mut(name).expect("just put");
        if !v.is_nan() {
            acc.1 += f64::from(v);
            acc.2 += 1;
            acc.3 = acc.3.max(f64::from(v));
        }
    }

    /// Puts `v` at step `step` of tier `tier`.
    fn sample(&mut self, name: &str, tier: u8, step: u64, v: f32, stored: Stored<'_>) {
        let number = step / CHUNK;
        let key = (name.to_owned(), tier);
        let o = self.open.entry(key.clone()).or_insert_with(|| {
            let values = stored((name, tier, number)).unwrap_or_else(|| vec![f32::NAN; CHUNK as usize]);
            Open { number, values, dirty: false }
        });
        if o.number != number {
            if number < o.number {
                return; // the clock went back: later samples are kept, not this one
            }
            let old = std::mem::replace(o, Open::new(number));
            self.full.push(((key.0.clone(), tier, old.number), encode(&old.values)));
        }
        let o = self.open.get_mut(&key).expect("just put");
        o.values[(step % CHUNK) as usize] = v;
        o.dirty = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_come_back_from_memory_and_from_disk_and_sum_up() {
        let d = tempfile::tempdir().unwrap();
        let s = Series::open(&d.path().join("series.redb")).unwrap();
        let t0 = 1_800_000_000 / 3600 * 3600;
        // Two hours of samples every 10 s: a rate rising by 1 each step, a level of 5 with one 50.
        for i in 0..720u64 {
            let level = if i == 100 { 50.0 } else { 5.0 };
            let samples = [("v/rate".to_owned(), Agg::Mean, i as f64), ("v/level".to_owned(), Agg::Max, level)];
            s.record(t0 + i * 10, &samples).unwrap();
        }
        let r = s.read("v/rate", 0, t0, t0 + 7200).unwrap();
        assert_eq!(r.len(), 720);
        assert_eq!(r[3], (t0 + 30, 3.0));
        let coarse = s.read("v/rate", 1, t0, t0 + 7200).unwrap();
        // 5-minute means of 30 samples each: (0..30).mean() = 14.5, then +30 each.
        assert_eq!(coarse[0], (t0, 14.5));
        assert_eq!(coarse[1], (t0 + 300, 44.5));
        let level = s.read("v/level", 1, t0, t0 + 7200).unwrap();
        assert_eq!(level[3].1, 50.0, "the largest of the step (sample 100 is in step 3)");
        assert_eq!(level[4].1, 5.0);
        // A reopened store has what was flushed (every minute), and keeps it when the chunk
        // being filled goes on.
        s.flush(t0 + 7200).unwrap();
        drop(s);
        let s = Series::open(&d.path().join("series.redb")).unwrap();
        assert_eq!(s.read("v/rate", 0, t0, t0 + 7200).unwrap().len(), 720);
        s.record(t0 + 7195, &[("v/rate".to_owned(), Agg::Mean, 999.0)]).unwrap();
        s.flush(t0 + 7200).unwrap();
        let r = s.read("v/rate", 0, t0, t0 + 7200).unwrap();
        assert_eq!((r.len(), r[719].1, r[400].1), (720, 999.0, 400.0), "nothing of the open chunk lost at the restart");
        // Expired chunks go.
        s.flush(t0 + 2 * 86_400).unwrap();
        assert!(s.read("v/rate", 0, t0, t0 + 7200).unwrap().is_empty());
        assert!(!s.read("v/rate", 1, t0, t0 + 7200).unwrap().is_empty(), "the coarse tier keeps 35 days");
    }

    #[test]
    fn chunks_of_one_value_are_small() {
        assert_eq!(encode(&vec![0.0; CHUNK as usize]).len(), 3);
        let mut v = vec![1.0; CHUNK as usize];
        v[7] = 2.0;
        v[8] = f32::NAN;
        let b = encode(&v);
        assert_eq!(b.len(), 1 + 2 * CHUNK as usize);
        let back = decode(&b);
        assert!(back[8].is_nan());
        assert_eq!((back[0], back[7]), (1.0, 2.0));
        assert!(decode(&[9, 9]).iter().all(|x| x.is_nan()), "junk reads as no samples");
        assert_eq!(bytes_bound(1), (24 + 2 + 28 + 2) * 721);
        for x in [0.0f32, 1.0, 3.0, 250.0, 1e9, 123_456.7, 1e-3] {
            let y = from_bf16(bf16(x));
            assert!((y - x).abs() <= x.abs() / 256.0, "{x} -> {y}");
        }
    }
}
