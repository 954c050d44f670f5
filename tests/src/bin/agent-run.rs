//! A real agent process for the kill tests: the drv agent library on a local image with its state
//! directory (change map, activity log).
//!
//! `agent-run CERTS STAGING VOLUME_ID VOLUME_BYTES IMAGE STATE_DIR write SEED COUNT [HANG_AT]`
//!   writes COUNT seeded random writes one after another (printing `WROTE n` as it goes); with
//!   HANG_AT it stops after staging acknowledged write number HANG_AT, before its local write (a
//!   write in doubt, made through `Agent::write_with`, not a hook in the agent).
//! `agent-run ... resync`
//!   starts the agent (which resyncs whatever its state directory holds), waits until it is back
//!   in sync mode with a clear change map, writes one more block (so every earlier epoch is
//!   complete for the replica), ends the epoch and prints `SYNCED NEXT_SEQ`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use drv_agent::{Agent, AgentOptions, FileDisk, Mode};
use drv_format::record::Flags;
use drv_tests::Rng;
use drv_transport::Identity;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let id = Identity::load(std::path::Path::new(&a[1]), "host1").expect("certificate");
    let staging = a[2].parse().expect("staging address");
    let volume_id: u64 = a[3].parse().expect("volume id");
    let volume: u64 = a[4].parse().expect("volume bytes");
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&a[5]).expect("image");
    f.set_len(volume).expect("size");
    let state = std::path::PathBuf::from(&a[6]);
    let hang = a.get(10).map(|s| s.parse::<u64>().expect("hang at write"));
    let opts = AgentOptions {
        ack_timeout: Duration::from_millis(800),
        reconnect_interval: Duration::from_millis(200),
        ..AgentOptions::default()
    };
    let disk = Arc::new(FileDisk(f));
    let agent = Agent::start(&id, staging, volume_id, volume, disk, Some(&state), opts).await.expect("start agent");
    match a[7].as_str() {
        "write" => {
            let mut rng = Rng::new(a[8].parse().expect("seed"));
            let count: u64 = a[9].parse().expect("count");
            for n in 1..=count {
                let len = 4096 * (1 + rng.below(8)) as usize;
                let offset = rng.below(volume - len as u64) / 4096 * 4096;
                let data = Bytes::from(drv_format::pattern(rng.next_u64(), len));
                if hang == Some(n) {
                    // The local write of this one never happens: staging has it, the disk not
                    // (the test kills the agent here, making it a write in doubt).
                    let ag = agent.clone();
                    let hold = agent.write_with(offset, data, Flags::default(), move || async move {
                        // Acknowledged by staging, not marked in the change map: in doubt.
                        assert_eq!(ag.mode(), Mode::Sync, "write {n} went to the change map: not a write in doubt");
                        println!("HANG after the acknowledgement of write {n}");
                        std::future::pending::<std::io::Result<()>>().await
                    });
                    hold.await.expect("never completes");
                } else {
                    agent.write(offset, data, Flags::default()).await.expect("write");
                }
                println!("WROTE {n}");
            }
            println!("DONE {:?}", agent.mode());
        }
        "resync" => {
            let end = Instant::now() + Duration::from_secs(60);
            while agent.mode() != Mode::Sync || agent.dirty_bytes() > 0 {
                assert!(Instant::now() < end, "no resync within 60 s: {:?}", agent.status());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // One more write, in a later epoch: every earlier epoch is complete for the replica.
            agent.write(0, Bytes::from(drv_format::pattern(0xfeed, 4096)), Flags::FLUSH).await.expect("write");
            agent.close_epoch();
            tokio::time::sleep(Duration::from_millis(100)).await;
            println!("SYNCED {}", agent.position().0);
        }
        other => panic!("unknown command {other}"),
    }
}
