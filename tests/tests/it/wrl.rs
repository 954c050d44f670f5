//! The WRL through its public API on real files: append, group commit, read-back, cache, trim and
//! slot reuse, log full, multiple devices, reopen, and corruption in the middle.

use std::sync::Arc;

use drv_format::record::Flags;
use drv_tests::{pattern, test_key};
use drv_wrl::storage::{FileStorage, Storage};
use drv_wrl::{self as wrl, AppendRequest, CreateOptions, Tail, Wrl, WrlError, WrlOptions};

fn make(dir: &std::path::Path, n: usize, bytes: u64, seg: u64, cap: Option<u64>) -> Vec<Arc<dyn Storage>> {
    let devs: Vec<Arc<dyn Storage>> = (0..n)
        .map(|i| Arc::new(FileStorage::create_file(&dir.join(format!("dev{i}")), bytes).unwrap()) as Arc<dyn Storage>)
        .collect();
    let opts = CreateOptions { uuid: [7; 16], wrl_id: 3, segment_bytes: seg, io_align: 4096, capacity_bytes: cap };
    wrl::create(&devs, &opts).unwrap();
    devs
}

fn reopen(dir: &std::path::Path, n: usize) -> Vec<Arc<dyn Storage>> {
    (0..n).map(|i| Arc::new(FileStorage::open(&dir.join(format!("dev{i}"))).unwrap()) as Arc<dyn Storage>).collect()
}

fn req(volume_id: u64, seq: u64, data: &[u8]) -> AppendRequest<'_> {
    AppendRequest {
        volume_id,
        volume_seq: seq,
        epoch: seq / 4,
        offset: seq * 4096,
        flags: Flags::default(),
        data,
        capture_unix: 0,
    }
}

#[test]
fn append_read_reopen_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let devs = make(dir.path(), 1, 16 << 20, 1 << 20, None);
    let key = test_key();
    let (w, rec) = Wrl::open(devs, WrlOptions::default()).unwrap();
    assert_eq!(rec.last_lsn, 0);
    let mut lsns = Vec::new();
    // Three volumes, interleaved; each one's writes numbered 1, 2, 3, ...
    let mut vseq = [0u64; 4];
    for n in 1..=200u64 {
        let vol = 1 + n % 3;
        vseq[vol as usize] += 1;
        let seq = vseq[vol as usize];
        let data = pattern(seq, (n as usize * 37) % 9000);
        lsns.push(w.append(&key, req(vol, seq, &data)).unwrap().header.lsn);
    }
    assert_eq!(lsns, (1..=200).collect::<Vec<_>>());
    // Read back through the cache and decrypt.
    let recs = w.read(1, u64::MAX).unwrap();
    assert_eq!(recs.len(), 200);
    for r in &recs {
        let plain = key.open(&r.header.desc, &r.payload).unwrap();
        assert_eq!(plain, pattern(r.header.desc.volume_seq, plain.len()));
    }
    drop(w);
    // After reopen nothing is cached: records come back from the file, checked again.
    let (w, rec) = Wrl::open(reopen(dir.path(), 1), WrlOptions::default()).unwrap();
    assert_eq!((rec.first_lsn, rec.last_lsn, rec.records), (1, 200, 200));
    assert_eq!(rec.tail, Tail::Clean);
    assert_eq!(rec.volumes.values().map(|v| v.records).sum::<u64>(), 200);
    let recs = w.read(150, u64::MAX).unwrap();
    assert_eq!(recs.first().unwrap().header.lsn, 150);
    assert_eq!(recs.len(), 51);
    assert_eq!(w.status().disk_reads, 1);
    // Each volume goes on after its last record, across the reopen; anything else is refused.
    let e = w.append(&key, req(1, vseq[1] + 2, b"a gap")).unwrap_err();
    assert!(matches!(e, WrlError::OutOfOrder { volume_id: 1, expected, .. } if expected == vseq[1] + 1), "{e}");
    let next = w.append(&key, req(1, vseq[1] + 1, b"after reopen")).unwrap();
    assert_eq!(next.header.lsn, 201);
    // Nonces never repeat across the reopen.
    let n0 = recs.iter().map(|r| r.header.desc.nonce).collect::<std::collections::HashSet<_>>();
    assert!(!n0.contains(&next.header.desc.nonce));
}

#[test]
fn concurrent_appends_share_batches() {
    let dir = tempfile::tempdir().unwrap();
    let devs = make(dir.path(), 1, 64 << 20, 8 << 20, None);
    let key = test_key();
    let (w, _) = Wrl::open(devs, WrlOptions::default()).unwrap();
    let w = Arc::new(w);
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let w = w.clone();
            let key = key.clone();
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    let data = pattern(t * 1000 + i, 4096);
                    w.append(&key, req(t, i + 1, &data)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let st = w.status();
    assert_eq!(st.appends, 800);
    assert_eq!(st.durable_lsn, 800);
    assert!(st.batches < 800, "16 concurrent writers should share fdatasyncs ({} batches)", st.batches);
    // Per-volume order follows submission order.
    let recs = w.read(1, u64::MAX).unwrap();
    for t in 0..16u64 {
        let seqs: Vec<u64> =
            recs.iter().filter(|r| r.header.desc.volume_id == t).map(|r| r.header.desc.volume_seq).collect();
        assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
    }
}

/// Appenders committing on their own threads (`commit_here`) alongside the committer: every
/// append completes once, in each volume's order, and exactly one completion per batch and volume
/// is marked the last of its volume (what staging sends a cumulative ack on).
#[test]
fn commit_here_from_many_threads_keeps_order_and_marks_the_last_of_each_volume() {
    use std::sync::Mutex;
    let dir = tempfile::tempdir().unwrap();
    let devs = make(dir.path(), 1, 64 << 20, 8 << 20, None);
    let key = test_key();
    let (w, _) = Wrl::open(devs, WrlOptions::default()).unwrap();
    let w = Arc::new(w);
    // (volume, seq, lsn, last_of_volume) in completion order.
    let done = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (w, key, done) = (w.clone(), key.clone(), done.clone());
            std::thread::spawn(move || {
                let (tx, rx) = std::sync::mpsc::channel();
                let mut pending: Option<drv_wrl::Submitted> = None;
                for i in 0..60u64 {
                    let data = pattern(t * 1000 + i, 4096);
                    let (tx, done) = (tx.clone(), done.clone());
                    let s = w.submit(
                        &key,
                        req(t, i + 1, &data),
                        Box::new(move |r| {
                            let a = r.expect("append");
                            done.lock().unwrap().push((t, i + 1, a.header.lsn, a.last_of_volume));
                            tx.send(()).unwrap();
                        }),
                    );
                    // Bursts of three, then one commit for them, as a link thread does.
                    if let Some(p) = pending.take() {
                        p.covered_by(&s);
                    }
                    pending = Some(s);
                    if i % 3 == 2 {
                        pending.take().unwrap().commit_here();
                        for _ in 0..3 {
                            rx.recv().unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let done = done.lock().unwrap();
    assert_eq!(done.len(), 480, "every append completes exactly once");
    for t in 0..8u64 {
        let seqs: Vec<u64> = done.iter().filter(|d| d.0 == t).map(|d| d.1).collect();
        assert_eq!(seqs, (1..=60).collect::<Vec<_>>(), "volume {t} completes in order");
    }
    // A volume's final record is the last of its volume in whatever batch held it, so the
    // cumulative ack sent on it covers the whole volume.
    for t in 0..8u64 {
        let last = done.iter().filter(|d| d.0 == t).max_by_key(|d| d.2).unwrap();
        assert!(last.3, "volume {t}: its final record is marked last of its volume");
    }
    let st = w.status();
    assert_eq!(st.appends, 480);
    assert!(st.batches < 480, "appenders committing on their own threads still share batches ({})", st.batches);
}

#[test]
fn log_full_then_trim_frees_slots() {
    let dir = tempfile::tempdir().unwrap();
    // Two devices, 4 slots of 1 MiB in all.
    let devs = make(dir.path(), 2, (64 << 10) + (2 << 20), 1 << 20, None);
    let key = test_key();
    let opts = WrlOptions { cache_bytes_limit: 256 << 10, ..WrlOptions::default() };
    let (w, _) = Wrl::open(devs, opts).unwrap();
    let data = vec![0xabu8; 64 << 10];
    let mut seq = 0;
    let full = loop {
        seq += 1;
        match w.append(&key, req(1, seq, &data)) {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(matches!(full, WrlError::LogFull { total_segments: 4, .. }), "{full}");
    assert!(full.to_string().contains("log full"));
    let last = seq - 1;
    // The cache is bounded: early records come back from disk.
    assert!(w.status().cache_bytes <= 256 << 10);
    let early = w.read(1, 1).unwrap();
    assert_eq!(early[0].header.lsn, 1);
    assert!(w.status().disk_reads >= 1);
    // Segments alternate devices so appends and read-back use different devices.
    // Confirm most records: whole segments are trimmed and their slots reused.
    w.confirm(1, last - 2);
    let mut more = 0;
    while w.append(&key, req(1, seq + more, &data)).is_ok() {
        more += 1;
        if more > 100 {
            break;
        }
    }
    assert!(more >= 14, "appends after trim: {more}");
    let st = w.status();
    assert!(st.trim_lsn > 0 && st.first_lsn > 1);
    assert!(matches!(w.read(1, 1), Err(WrlError::Trimmed { .. })));
    drop(w);
    let (_, rec) = Wrl::open(reopen(dir.path(), 2), WrlOptions::default()).unwrap();
    assert_eq!(rec.last_lsn, last + more);
    assert!(rec.first_lsn > 1);
}

/// A volume that goes idle while another keeps writing: once its records are confirmed and the
/// segments holding them are freed, the log still knows its position (a CHECKPOINT record in the
/// head), after a reopen too; readers never see the checkpoint as a write, and `drv wrl verify
/// --key` passes over it.
#[test]
fn an_idle_volume_keeps_its_position_when_its_records_are_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let devs = make(dir.path(), 1, (64 << 10) + (6 << 20), 1 << 20, None);
    let key = test_key();
    let (w, _) = Wrl::open(devs, WrlOptions { cache_bytes_limit: 256 << 10, ..WrlOptions::default() }).unwrap();
    let data = vec![0x5au8; 64 << 10];
    for seq in 1..=3 {
        w.append(&key, AppendRequest { epoch: 7, ..req(1, seq, &data) }).unwrap();
    }
    w.confirm(1, w.volume(1).unwrap().log.last_lsn);
    // Volume 2 writes through several segments, confirming as it goes.
    for seq in 1..=120 {
        let a = w.append(&key, req(2, seq, &data)).unwrap();
        w.confirm(2, a.header.lsn);
    }
    let st = w.status();
    assert!(st.first_lsn > 3, "volume 1's records were trimmed (first lsn {})", st.first_lsn);
    let v1 = w.volume(1).unwrap().log;
    assert_eq!((v1.last_seq, v1.last_epoch), (3, 7), "position kept by a checkpoint");
    // Readers see volume 2's writes and the checkpoint only as what it is.
    for r in w.read(st.first_lsn, u64::MAX).unwrap() {
        if r.header.desc.volume_id == 1 {
            assert!(r.header.desc.flags.contains(Flags::CHECKPOINT) && r.header.desc.length == 0);
        }
    }
    drop(w);
    let (w, _) = Wrl::open(reopen(dir.path(), 1), WrlOptions::default()).unwrap();
    let v1 = w.volume(1).unwrap().log;
    assert_eq!((v1.last_seq, v1.last_epoch), (3, 7), "and after a reopen");
    // An agent may never append a checkpoint.
    let e = w.append(&key, AppendRequest { flags: Flags::CHECKPOINT, ..req(1, 4, &data) }).unwrap_err();
    assert!(e.to_string().contains("not a write's"), "{e}");
    drop(w);
    let keyfile = dir.path().join("key");
    std::fs::write(&keyfile, [0x5au8; 32]).unwrap();
    let out = std::process::Command::new(drv_tests::drv_bin())
        .args(["wrl", "verify", "--key"])
        .arg(&keyfile)
        .arg(dir.path().join("dev0"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn corruption_in_the_middle_is_named_and_stops_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let devs = make(dir.path(), 1, 8 << 20, 1 << 20, None);
    let key = test_key();
    let (w, _) = Wrl::open(devs, WrlOptions::default()).unwrap();
    for seq in 1..=40 {
        w.append(&key, req(1, seq, &pattern(seq, 3000))).unwrap();
    }
    drop(w);
    // Flip one payload byte of an early record (second batch, first record).
    let path = dir.path().join("dev0");
    let mut bytes = std::fs::read(&path).unwrap();
    let batch2 = 64 * 1024 + 4096 + 4096; // data start + segment header + first (padded) batch
    bytes[batch2 + 64 + 96 + 10] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let err = match Wrl::open(reopen(dir.path(), 1), WrlOptions::default()) {
        Err(e) => e,
        Ok(_) => panic!("corruption not detected"),
    };
    let msg = err.to_string();
    assert!(matches!(err, WrlError::Corrupt { segment_id: 1, expected_lsn: 2, .. }), "{msg}");
    assert!(msg.contains("segment 1") && msg.contains("offset") && msg.contains("lsn 2"), "{msg}");
}

/// The head segment's header lost (a misdirected or lost write of the disk) while its batches are
/// there: the log refuses to open, naming the segment, instead of ending at the segment before and
/// dropping records it acknowledged.
#[test]
fn a_lost_head_segment_header_is_named_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let devs = make(dir.path(), 1, 8 << 20, 1 << 20, None);
    let key = test_key();
    let (w, _) = Wrl::open(devs, WrlOptions::default()).unwrap();
    for seq in 1..=40 {
        w.append(&key, req(1, seq, &pattern(seq, 60_000))).unwrap();
    }
    drop(w);
    let (w, rec) = Wrl::open(reopen(dir.path(), 1), WrlOptions::default()).unwrap();
    drop(w);
    assert!(rec.segments.len() >= 3, "{} segments", rec.segments.len());
    let head = rec.segments.last().unwrap();
    let path = dir.path().join("dev0");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = (64 << 10) + head.loc.slot as usize * (1 << 20);
    bytes[at..at + 4096].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let err = match Wrl::open(reopen(dir.path(), 1), WrlOptions::default()) {
        Err(e) => e,
        Ok((_, r)) => panic!("opened with records up to lsn {} of 40", r.last_lsn),
    };
    let msg = err.to_string();
    assert!(matches!(err, WrlError::Corrupt { expected_lsn, .. } if expected_lsn == head.first_lsn), "{msg}");
    assert!(msg.contains("header is damaged or missing"), "{msg}");
}

#[test]
fn devices_must_match() {
    let dir = tempfile::tempdir().unwrap();
    let _ = make(dir.path(), 2, 4 << 20, 1 << 20, None);
    let devs = reopen(dir.path(), 2);
    let swapped = vec![devs[1].clone(), devs[0].clone()];
    let err = Wrl::open(swapped, WrlOptions::default()).err().expect("swapped devices refused");
    assert!(err.to_string().contains("device 1 of its WRL"), "{err}");
    let err = Wrl::open(vec![devs[0].clone()], WrlOptions::default()).err().expect("missing device refused");
    assert!(err.to_string().contains("2 devices"), "{err}");
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![1u8; 1 << 20]).unwrap();
    let err = Wrl::open(vec![Arc::new(FileStorage::open(&junk).unwrap())], WrlOptions::default())
        .err()
        .expect("junk refused");
    assert!(err.to_string().contains("is not a drv WRL device"), "{err}");
}

#[test]
fn oversized_write_is_refused_before_logging() {
    let dir = tempfile::tempdir().unwrap();
    let devs = make(dir.path(), 1, 8 << 20, 1 << 20, None);
    let (w, _) = Wrl::open(devs, WrlOptions::default()).unwrap();
    let big = vec![0u8; 2 << 20];
    let err = w.append(&test_key(), req(1, 1, &big)).unwrap_err();
    assert!(matches!(err, WrlError::RecordTooLarge { .. }), "{err}");
    assert_eq!(w.status().durable_lsn, 0);
}

#[test]
fn new_segments_avoid_the_device_relay_reads_from() {
    let dir = tempfile::tempdir().unwrap();
    // Two devices with two 1 MiB slots each.
    let devs = make(dir.path(), 2, (64 << 10) + (2 << 20), 1 << 20, None);
    let key = test_key();
    let (w, _) = Wrl::open(devs, WrlOptions::default()).unwrap();
    let data = vec![1u8; 64 << 10];
    let mut seq = 0;
    while w.append(&key, req(1, seq + 1, &data)).is_ok() {
        seq += 1;
    }
    drop(w);
    let rec = wrl::recover(&reopen(dir.path(), 2), &mut |_, _| {}).unwrap();
    let devices: Vec<usize> = rec.segments.iter().map(|s| s.loc.device).collect();
    // Nothing is confirmed, so relay reads from segment 1 on device 0: appends go to device 1
    // while it has room, and only then back to device 0.
    assert_eq!(devices, vec![0, 1, 1, 0]);
}

#[test]
fn verify_cli_reports_corruption_and_exits_1() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w");
    let st = Command::new(drv_tests::drv_bin())
        .args(["wrl", "create", "--size", "8M", "--segment-size", "1M", "--wrl-id", "2"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success());
    {
        let (w, _) = Wrl::open(reopen_one(&path), WrlOptions::default()).unwrap();
        for seq in 1..=30 {
            w.append(&test_key(), req(4, seq, &pattern(seq, 5000))).unwrap();
        }
    }
    let key_path = dir.path().join("k");
    std::fs::write(&key_path, [0x5a; 32]).unwrap();
    let ok = Command::new(drv_tests::drv_bin())
        .args(["wrl", "verify", "--json", "--key"])
        .arg(&key_path)
        .arg(&path)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!((v["last_lsn"].as_u64(), v["decrypted"].as_u64()), (Some(30), Some(30)));
    // Damage the first batch's record: everything after it is in the middle.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[64 * 1024 + 4096 + 64 + 20] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let bad = Command::new(drv_tests::drv_bin()).args(["wrl", "verify", "--json"]).arg(&path).output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&bad.stdout).unwrap();
    assert_eq!(v["consistent"], false);
    let err = v["error"].as_str().unwrap();
    assert!(err.contains("segment 1") && err.contains("expected lsn 1"), "{err}");
}

fn reopen_one(path: &std::path::Path) -> Vec<Arc<dyn Storage>> {
    vec![Arc::new(FileStorage::open(path).unwrap())]
}

#[test]
fn io_error_fails_the_log_and_loses_nothing_acknowledged() {
    use drv_wrl::storage::sim::{SimStorage, SimWorld};
    let world = SimWorld::new(&[(64 << 10) + (4 << 20)]);
    let opts = CreateOptions { uuid: [2; 16], wrl_id: 8, segment_bytes: 1 << 20, io_align: 4096, capacity_bytes: None };
    wrl::create(&SimStorage::all(&world), &opts).unwrap();
    let key = test_key();
    let (w, _) = Wrl::open(SimStorage::all(&world), WrlOptions::default()).unwrap();
    let mut acked = 0;
    for seq in 1..=20 {
        acked = w.append(&key, req(1, seq, &pattern(seq, 1000))).unwrap().header.lsn;
    }
    // The next write or sync of the device fails.
    {
        let mut wl = world.lock().unwrap();
        wl.fail_at = Some(wl.trace.len());
    }
    let first = w.append(&key, req(1, 21, b"lost")).unwrap_err();
    assert!(matches!(first, WrlError::Io { .. }), "{first}");
    assert!(first.to_string().contains("lsn 21"), "the error names the batch: {first}");
    let later = w.append(&key, req(1, 22, b"refused")).unwrap_err();
    assert!(matches!(later, WrlError::Failed(_)), "{later}");
    assert!(w.status().failed.is_some());
    drop(w);
    world.lock().unwrap().fail_at = None;
    let (w, rec) = Wrl::open(SimStorage::all(&world), WrlOptions::default()).unwrap();
    assert_eq!(rec.last_lsn, acked);
    assert_eq!(w.append(&key, req(1, 21, b"again")).unwrap().header.lsn, acked + 1);
}

/// Driven mode (the simulator's): nothing is written until the owner commits, completions run in
/// `commit`, and the log is the same log (reopened by the threaded front).
#[test]
fn a_driven_wrl_writes_only_when_told_and_is_the_same_log() {
    let dir = tempfile::tempdir().unwrap();
    let devs = make(dir.path(), 1, 16 << 20, 1 << 20, None);
    let key = test_key();
    let (w, _) = Wrl::open_driven(devs, WrlOptions::default()).unwrap();
    let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    for seq in 1..=5u64 {
        let d = done.clone();
        w.submit(
            &key,
            req(1, seq, &pattern(seq, 1000)),
            Box::new(move |r| d.lock().unwrap().push(r.unwrap().header.lsn)),
        )
        .hand_off();
    }
    assert!(done.lock().unwrap().is_empty(), "nothing written before commit");
    assert_eq!(w.status().durable_lsn, 0);
    assert!(w.commit());
    assert_eq!(*done.lock().unwrap(), vec![1, 2, 3, 4, 5]);
    assert!(!w.commit(), "nothing queued");
    assert_eq!(w.append(&key, req(1, 6, b"sync")).unwrap().header.lsn, 6, "append commits itself");
    drop(w);
    let (w, rec) = Wrl::open(reopen(dir.path(), 1), WrlOptions::default()).unwrap();
    assert_eq!((rec.last_lsn, w.volume(1).unwrap().log.last_seq), (6, 6));
}
