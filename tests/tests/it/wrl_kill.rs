//! A real writer process appends through the library and is killed with SIGKILL mid-stream;
//! `drv wrl verify` must then report a consistent log holding every acknowledged record.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use drv_tests::{drv_bin, pattern, test_key};

#[test]
fn sigkill_mid_stream_keeps_every_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let wrl = dir.path().join("wrl0");
    let st = Command::new(drv_bin())
        .args(["wrl", "create", "--size", "64M", "--segment-size", "4M", "--wrl-id", "5"])
        .arg(&wrl)
        .status()
        .unwrap();
    assert!(st.success());
    for round in 0..3u64 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wrl-writer"))
            .arg(&wrl)
            .arg(round.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Let it run for a while, then kill it without warning.
        let mut max_acked = 0u64;
        let stop_after = 300 + round * 97;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(lsn) = line.strip_prefix("acked ") {
                max_acked = max_acked.max(lsn.trim().parse().unwrap());
                if max_acked >= stop_after {
                    break;
                }
            }
        }
        // Child::kill sends SIGKILL: no chance to flush or clean up.
        child.kill().unwrap();
        // Everything acknowledged before the kill, even lines we did not read yet.
        for line in lines.map_while(Result::ok) {
            if let Some(lsn) = line.strip_prefix("acked ") {
                max_acked = max_acked.max(lsn.trim().parse().unwrap());
            }
        }
        let _ = child.wait();
        let out = Command::new(drv_bin()).args(["wrl", "verify", "--json"]).arg(&wrl).output().unwrap();
        assert!(out.status.success(), "verify failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["consistent"], true, "{v}");
        let last = v["last_lsn"].as_u64().unwrap();
        assert!(last >= max_acked, "round {round}: acknowledged lsn {max_acked} missing, log ends at {last}");
        eprintln!("round {round}: acked up to {max_acked}, log ends at {last}, tail: {}", v["tail"]);
    }
    // Every record decrypts to what the writer wrote.
    let (w, rec) =
        drv_wrl::Wrl::open(vec![std::sync::Arc::new(drv_wrl::FileStorage::open(&wrl).unwrap())], Default::default())
            .unwrap();
    let key = test_key();
    let recs = w.read(rec.first_lsn, u64::MAX).unwrap();
    assert_eq!(recs.len() as u64, rec.last_lsn);
    for r in recs {
        let plain = key.open(&r.header.desc, &r.payload).unwrap();
        assert_eq!(plain, pattern(r.header.desc.volume_seq, plain.len()));
    }
}
