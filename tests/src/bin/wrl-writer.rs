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
    let path = args.next().expect("usage: wrl-writer PATH ROUND");
    let round: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let dev: Arc<dyn Storage> = Arc::new(FileStorage::open(path.as_ref()).expect("open WRL device"));
    let (wrl, rec) = Wrl::open(vec![dev], WrlOptions::default()).expect("open WRL");
    let wrl = Arc::new(wrl);
    let key = test_key();
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (wrl, key, out) = (wrl.clone(), key.clone(), out.clone());
            let base = rec.last_lsn;
            std::thread::spawn(move || {
                for i in 0.. {
                    // volume_seq doubles as the pattern seed, so readers can check payloads.
                    let seq = (round << 40) | (t << 32) | i;
                    let data = pattern(seq, 512 * (1 + (i as usize % 16)));
                    let req = AppendRequest {
                        volume_id: t,
                        volume_seq: seq,
                        epoch: base + i,
                        offset: i * 4096,
                        flags: Flags::default(),
                        data: &data,
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
