//! Test helper: appends deterministic records to a WRL from several threads and prints
//! `acked LSN` for every acknowledged record, until killed.

use std::io::Write;
use std::sync::Arc;

use drv_format::record::Flags;
use drv_tests::{pattern, test_key};
use drv_wrl::{AppendRequest, Wrl, WrlOptions};
use drv_wrl::{FileStorage, Storage};

fn main() {
    let mut args = std::env::args().skip(1);
    // (The test passes its round number too; each round goes on after the last one's records.)
    let path = args.next().expect("usage: wrl-writer PATH");
    let dev: Arc<dyn Storage> = Arc::new(FileStorage::open(path.as_ref()).expect("open WRL device"));
    let (wrl, rec) = Wrl::open(vec![dev], WrlOptions::default()).expect("open WRL");
    let wrl = Arc::new(wrl);
    let key = test_key();
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (wrl, key, out) = (wrl.clone(), key.clone(), out.clone());
            let base = rec.last_lsn;
            // Each volume goes on after its last record in the log (the log refuses gaps).
            let last_seq = rec.volumes.get(&t).map(|v| v.last_seq).unwrap_or(0);
            std::thread::spawn(move || {
                for i in 0.. {
                    // volume_seq doubles as the pattern seed, so readers can check payloads.
                    let seq = last_seq + 1 + i;
                    let data = pattern(seq, 512 * (1 + (i as usize % 16)));
                    let req = AppendRequest {
                        volume_id: t,
                        volume_seq: seq,
                        epoch: base + i,
                        offset: i * 4096,
                        flags: Flags::default(),
                        data: &data,
                        capture_unix: 0,
                    };
                    let a = wrl.append(&key, req).expect("append");
                    let mut o = out.lock().unwrap();
                    writeln!(o, "acked {}", a.header.lsn).unwrap();
                    o.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}
