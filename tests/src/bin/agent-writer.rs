//! Test helper that speaks the agent protocol to a staging server on the agent link: a random
//! concurrent workload with epochs (a write issued after another completed gets a later epoch),
//! at most `inflight` writes in flight and never two overlapping ones. A write reaches the local
//! "source" image only after staging acknowledged it. Survives staging restarts: it reconnects,
//! learns the durable position and resends what is not durable.
//!
//! Every issued write is recorded in the history file (`seq epoch offset len`) before it is sent;
//! the data is `pattern(seed * 1_000_003 + seq, len)`. Prints `done LAST_DATA_SEQ` at the end.
//!
//! usage: agent-writer CERTS NAME STAGING_ADDR VOLUME_ID SIZE SOURCE HISTORY COUNT SEED INFLIGHT

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use drv_format::frame::Frame;
use drv_format::record::Flags;
use drv_tests::{Rng, pattern};
use drv_transport::{Identity, Role, link, tls};

struct W {
    epoch: u64,
    offset: u64,
    data: Vec<u8>,
    flags: u32,
    capture_unix: u32,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    assert_eq!(
        a.len(),
        10,
        "usage: agent-writer CERTS NAME STAGING_ADDR VOLUME_ID SIZE SOURCE HISTORY COUNT SEED INFLIGHT"
    );
    let id = Identity::load(a[0].as_ref(), &a[1]).expect("certificate");
    let addr: std::net::SocketAddr = a[2].parse().expect("address");
    let volume_id: u64 = a[3].parse().unwrap();
    let size: u64 = a[4].parse().unwrap();
    let source = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&a[5]).unwrap();
    source.set_len(size).unwrap();
    let mut history = std::fs::OpenOptions::new().create(true).append(true).open(&a[6]).unwrap();
    let count: u64 = a[7].parse().unwrap();
    let seed: u64 = a[8].parse().unwrap();
    let window: usize = a[9].parse().unwrap();
    let mut rng = Rng::new(seed);
    let cfg = tls::client_config(&id, Role::Staging).expect("client");

    let blocks = size / 4096;
    let mut inflight: BTreeMap<u64, W> = BTreeMap::new();
    let mut next_seq = 1u64;
    let mut epoch = 1u64;
    let mut completed_since_issue = false;
    let mut final_seq: Option<u64> = None;
    let mut last_progress = Instant::now();

    'session: loop {
        if last_progress.elapsed() > Duration::from_secs(90) {
            panic!("no progress for 90 s");
        }
        let Ok((w, mut r)) = link::connect(addr, cfg.clone(), 1 << 20).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if w.send(&Frame::OpenVolume { volume_id }).is_err() {
            continue;
        }
        let last_seq = match r.next().await {
            Ok(Some(Frame::VolumeState { last_seq, .. })) => last_seq,
            Ok(Some(Frame::Error { message, .. })) => panic!("staging refused the volume: {message}"),
            _ => continue,
        };
        // Writes the log holds are complete: write them locally. Resend the rest, in order.
        let done: Vec<u64> = inflight.range(..=last_seq).map(|(s, _)| *s).collect();
        for s in done {
            let wr = inflight.remove(&s).unwrap();
            source.write_all_at(&wr.data, wr.offset).unwrap();
            completed_since_issue = true;
        }
        for (s, wr) in &inflight {
            let f = Frame::Write {
                volume_id,
                seq: *s,
                epoch: wr.epoch,
                offset: wr.offset,
                flags: wr.flags,
                capture_unix: wr.capture_unix,
                data: wr.data.clone().into(),
            };
            if w.send(&f).is_err() {
                continue 'session;
            }
        }
        loop {
            if final_seq.is_some_and(|f| inflight.is_empty() && next_seq > f) {
                println!("done {}", final_seq.unwrap() - 1);
                return;
            }
            // Issue while there is room.
            while inflight.len() < window && final_seq.is_none_or(|f| next_seq <= f) {
                if completed_since_issue {
                    epoch += 1;
                    completed_since_issue = false;
                }
                let seq = next_seq;
                let (offset, data, flags) = if seq > count {
                    // The last write: an empty flush in a new epoch, which completes the previous epoch.
                    epoch += 1;
                    final_seq = Some(seq);
                    (0, Vec::new(), Flags::FLUSH.0)
                } else {
                    let len_blocks = 1 + rng.below(8);
                    let mut start;
                    let mut tries = 0;
                    loop {
                        start = rng.below(blocks - len_blocks);
                        let (a0, a1) = (start * 4096, (start + len_blocks) * 4096);
                        let overlaps = inflight.values().any(|x| x.offset < a1 && a0 < x.offset + x.data.len() as u64);
                        tries += 1;
                        if !overlaps || tries > 100 {
                            break;
                        }
                    }
                    let len = (len_blocks * 4096) as usize;
                    (start * 4096, pattern(seed.wrapping_mul(1_000_003).wrapping_add(seq), len), 0)
                };
                writeln!(history, "{seq} {epoch} {offset} {}", data.len()).unwrap();
                history.flush().unwrap();
                let capture_unix = drv_format::record::capture_clock();
                let f = Frame::Write { volume_id, seq, epoch, offset, flags, capture_unix, data: data.clone().into() };
                inflight.insert(seq, W { epoch, offset, data, flags, capture_unix });
                next_seq += 1;
                if w.send(&f).is_err() {
                    continue 'session;
                }
            }
            match tokio::time::timeout(Duration::from_secs(5), r.next()).await {
                Ok(Ok(Some(Frame::Ack { seq, .. }))) => {
                    last_progress = Instant::now();
                    // Cumulative: this write and every earlier one are durable at staging.
                    let rest = inflight.split_off(&(seq + 1));
                    for (_, wr) in std::mem::replace(&mut inflight, rest) {
                        // Only now does the write reach the local disk.
                        source.write_all_at(&wr.data, wr.offset).unwrap();
                        completed_since_issue = true;
                    }
                }
                Ok(Ok(Some(Frame::Error { code, message }))) => {
                    eprintln!("staging error {code}: {message}; reconnecting");
                    continue 'session;
                }
                Ok(Ok(Some(other))) => panic!("unexpected frame {other:?}"),
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => continue 'session,
            }
        }
    }
}
