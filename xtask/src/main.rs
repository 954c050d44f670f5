//! `cargo xtask`: the project's own tasks.
//!
//! - `cargo xtask test`: the whole test suite (what `.ci/run` and the README run), the VM test of
//!   the kernel module included; first `tidy`, last a check that the tests left the tree alone.
//! - `cargo xtask tidy`: cited paths exist, decoders are fuzzed (`tidy.rs`).
//! - `cargo xtask sim [--seeds N | --seed S] [--bug B]`: the deterministic simulator (`drv-sim`).
//! - `cargo xtask bench wrl`: WRL benchmarks against baselines measured in the same run, then a
//!   short fuzz run of the record decoder.
//! - `cargo xtask bench relay`: relay throughput and lag against network baselines (`relay.rs`).
//! - `cargo xtask bench agent`: write latency and IOPS through the agent against floors (`agent.rs`).
//! - `cargo xtask bench kmod`: writes on `/dev/drv0` against its backing device, in the VM (`kmod.rs`).
//! - `cargo xtask bench ebpf|user|snapshots|restore`: tracing, the user-mode device, snapshots,
//!   getting data back (`ebpf.rs`, `user.rs`, `snapshots.rs`, `restore.rs`).
//! - `cargo xtask fuzz [SECONDS]`: the fuzz run alone.
//! - `cargo xtask setup`, `cargo xtask kmod build`, `cargo xtask vm-test`: the kernel pieces (`kmod.rs`).

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod agent;
mod ebpf;
mod kmod;
mod relay;
mod restore;
mod snapshots;
mod tidy;
mod user;
mod window;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check formatting and lints, build every binary, then run every test of the workspace.
    Test,
    /// Check that every path the docs cite exists and every decoder has a fuzz target.
    Tidy,
    /// Run the deterministic simulator: `--seeds N` from seed 1 (or `--seed S` alone, to replay).
    Sim {
        #[arg(long, default_value_t = 1000)]
        seeds: u64,
        /// Replay this one seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Steps of each run's fault phase.
        #[arg(long, default_value_t = 3000)]
        steps: u64,
        /// Inject a bug: ack-before-durable, apply-partial-units, no-overlap-wait.
        #[arg(long)]
        bug: Option<drv_sim::Bug>,
    },
    /// Run a benchmark and print ratios against baselines measured in the same run.
    Bench {
        /// wrl, relay, agent, kmod, ebpf or user
        what: String,
        /// Smaller sizes, for a quick look.
        #[arg(long)]
        quick: bool,
        /// Seconds of fuzzing at the end (0 to skip).
        #[arg(long, default_value_t = 30)]
        fuzz_seconds: u64,
    },
    /// Install what the kernel pieces need (Debian packages, the kernel image for the VM, the
    /// eBPF toolchain: rust-src, llvm-22-dev, bpf-linker), idempotently.
    Setup,
    /// The kernel module: `kmod build` builds capture-kmod against Debian's headers.
    Kmod {
        /// build
        what: String,
    },
    /// Boot Debian's kernel in QEMU with the module and run the kernel-module test in the guest.
    VmTest,
    /// Fuzz the record decoder (needs the nightly toolchain; installs cargo-fuzz if missing).
    Fuzz {
        #[arg(default_value_t = 60)]
        seconds: u64,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {cmd:?}");
    let st = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    // Every build of xtask's making includes the eBPF programs: a missing toolchain is an error,
    // not a binary without eBPF.
    c.env("DRV_REQUIRE_EBPF", "1");
    c
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Test => test(),
        Cmd::Tidy => tidy::tidy(),
        Cmd::Sim { seeds, seed, steps, bug } => sim(seed.map_or(1..=seeds, |s| s..=s), steps, bug),
        Cmd::Bench { what, quick, fuzz_seconds } => match what.as_str() {
            "wrl" => bench_wrl(quick, fuzz_seconds),
            "relay" => bench_relay(quick),
            "agent" => bench_agent(quick),
            "kmod" => kmod::bench(quick),
            "ebpf" => bench_ebpf(quick),
            "user" => bench_user(quick),
            "snapshots" => bench_snapshots(quick),
            "restore" => bench_restore(quick),
            "config" => bench_config(quick),
            "ui" => bench_ui(quick),
            other => {
                bail!(
                    "unknown benchmark {other:?} (available: wrl, relay, agent, kmod, ebpf, user, snapshots, restore, config, ui)"
                )
            }
        },
        Cmd::Fuzz { seconds } => fuzz(seconds),
        Cmd::Setup => kmod::setup().and_then(|_| ebpf::setup()),
        Cmd::Kmod { what } => match what.as_str() {
            "build" => kmod::build(&kmod::kver()?).map(|p| println!("{}", p.display())),
            other => bail!("unknown kmod task {other:?} (available: build)"),
        },
        Cmd::VmTest => kmod::vm_test(),
    }
}

fn test() -> Result<()> {
    // The kernel pieces' packages and kernel image: the one command sets everything up.
    kmod::setup()?;
    ebpf::setup()?;
    tidy::tidy()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    // The integration tests run the real `drv` binary: build it first.
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    // Stream the test output and add up the results, so the run ends with one summary line.
    let tree = tidy::Tree::now()?;
    let mut cmd = cargo();
    // The eBPF tests need root (loop devices, BPF); here they must run, never skip.
    cmd.args(["test", "--workspace"]).env("DRV_REQUIRE_ROOT_TESTS", "1").stdout(std::process::Stdio::piped());
    eprintln!("$ {cmd:?}");
    let mut child = cmd.spawn().context("run cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let out = std::io::BufReader::new(child.stdout.take().expect("piped"));
    for line in std::io::BufRead::lines(out) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |what: &str| -> u64 {
                rest.split(';')
                    .find_map(|p| p.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(what))
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let st = child.wait()?;
    println!("{passed} passed, {failed} failed");
    if !st.success() || failed > 0 {
        bail!("tests failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    tree.unchanged_since()?;
    // The whole pipeline under faults, deterministically: 1,000 seeds.
    sim(1..=1000, 3000, None)?;
    // The kernel module, in a VM booting Debian's kernel.
    kmod::vm_test()
}

/// Runs the simulator over `seeds` (on every core; each run is deterministic on its own); stops at
/// the first broken invariant, naming the seed that replays it.
fn sim(seeds: std::ops::RangeInclusive<u64>, steps: u64, bug: Option<drv_sim::Bug>) -> Result<()> {
    use std::collections::BTreeMap;
    let started = Instant::now();
    let seeds: Vec<u64> = seeds.collect();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let results: Vec<Result<drv_sim::Report, drv_sim::Failure>> = std::thread::scope(|s| {
        let chunks: Vec<_> = seeds
            .chunks(seeds.len().div_ceil(threads).max(1))
            .map(|chunk| {
                s.spawn(move || {
                    let mut out = Vec::new();
                    for &seed in chunk {
                        let r = drv_sim::run(&drv_sim::Config { steps, bug, ..drv_sim::Config::new(seed) });
                        let stop = r.is_err();
                        out.push(r);
                        if stop {
                            break;
                        }
                    }
                    out
                })
            })
            .collect();
        chunks.into_iter().flat_map(|h| h.join().expect("simulator thread")).collect()
    });
    let (mut runs, mut total_steps, mut writes) = (0u64, 0u64, 0u64);
    let (mut faults, mut events) = (BTreeMap::new(), BTreeMap::new());
    for r in results {
        let r = r.map_err(|f| {
            let bug = bug.map(|b| format!(" --bug {b}")).unwrap_or_default();
            anyhow::anyhow!("{f}\nreplay: cargo xtask sim --seed {} --steps {steps}{bug}", f.seed)
        })?;
        runs += 1;
        total_steps += r.steps;
        writes += r.writes;
        for (k, n) in r.faults {
            *faults.entry(k).or_insert(0u64) += n;
        }
        for (k, n) in r.events {
            *events.entry(k).or_insert(0u64) += n;
        }
    }
    let list =
        |m: &BTreeMap<&'static str, u64>| m.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ");
    println!(
        "sim: {runs} seeds, {total_steps} steps, {writes} writes, every invariant held ({:.1} s)\n  faults: {}\n  events: {}",
        started.elapsed().as_secs_f64(),
        list(&faults),
        list(&events)
    );
    Ok(())
}

/// Median of a few samples.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn json_f64(s: &str, key: &str) -> Result<f64> {
    let line = s.lines().rev().find(|l| l.trim_start().starts_with('{')).context("no JSON line in output")?;
    let pat = format!("\"{key}\":");
    let at = line.find(&pat).with_context(|| format!("{key} missing in {line}"))? + pat.len();
    let rest = &line[at..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().with_context(|| format!("parse {key} in {line}"))
}

/// Raw sequential O_DIRECT write of `bytes` over a prezeroed file with dd, 1 MiB blocks, one
/// fdatasync at the end. Returns MB/s.
fn dd_direct(path: &Path, bytes: u64) -> Result<f64> {
    let count = bytes >> 20;
    let t = Instant::now();
    output(Command::new("dd").args([
        "if=/dev/zero",
        &format!("of={}", path.display()),
        "bs=1M",
        &format!("count={count}"),
        "oflag=direct",
        "conv=notrunc,fdatasync",
        "status=none",
    ]))?;
    Ok(bytes as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// 4 KiB O_DIRECT pwrite + fdatasync to a prezeroed file, `n` times; returns (p50, p99) in us.
fn fdatasync_latency(path: &Path, n: usize) -> Result<(f64, f64)> {
    let mut lat = fdatasync_samples(path, n)?;
    lat.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    Ok((lat[n / 2], lat[n * 99 / 100]))
}

/// `n` latencies (us) of a 4 KiB `O_DIRECT` write + `fdatasync` to `path`.
fn fdatasync_samples(path: &Path, n: usize) -> Result<Vec<f64>> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let buf = drv_files::aligned::AlignedBuf::zeroed(4096);
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f.write_all_at(&buf, (i as u64 % 4096) * 4096)?;
        f.sync_data()?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(lat)
}

fn bench_wrl(quick: bool, fuzz_seconds: u64) -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "drv"]))?;
    let drv = root().join("target/release/drv");
    let dir = root().join("target/bench-wrl");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let ingest: u64 = if quick { 512 << 20 } else { 2 << 30 };
    // Disk throughput on this kind of host drifts by tens of percent between minutes: alternate the
    // two measurements and take medians of five.
    let rounds = if quick { 1 } else { 5 };

    // Same filesystem for everything: files under target/.
    let raw = dir.join("raw");
    output(Command::new("dd").args([
        "if=/dev/zero",
        &format!("of={}", raw.display()),
        "bs=1M",
        &format!("count={}", ingest >> 20),
        "conv=fdatasync",
        "status=none",
    ]))?;
    let wrl = dir.join("wrl");
    output(
        Command::new(&drv)
            .args(["wrl", "create", "--size", &format!("{}", ingest + (256 << 20))])
            .args(["--segment-size", "64M", "--wrl-id", "1"])
            .arg(&wrl),
    )?;
    let bench = |writers: usize, record: &str, total: u64| -> Result<String> {
        output(
            Command::new(&drv)
                .args(["wrl", "bench-append", "--json", "--writers", &writers.to_string(), "--record-size", record])
                .args(["--total", &total.to_string()])
                .arg(&wrl),
        )
    };

    // 1. Ingest: WRL (1 MiB records, 4 writers) vs raw O_DIRECT dd, alternated, medians.
    let (mut raw_mbs, mut wrl_mbs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        raw_mbs.push(dd_direct(&raw, ingest)?);
        wrl_mbs.push(json_f64(&bench(4, "1M", ingest)?, "mb_per_sec")?);
    }
    let (raw_m, wrl_m) = (median(raw_mbs), median(wrl_mbs));

    // 2. Acknowledged appends/s: 32 writers vs 1 writer, 4 KiB records.
    let one = bench(1, "4K", if quick { 16 << 20 } else { 40 << 20 })?;
    let many = bench(32, "4K", if quick { 64 << 20 } else { 256 << 20 })?;
    let (one_ops, many_ops) = (json_f64(&one, "appends_per_sec")?, json_f64(&many, "appends_per_sec")?);

    // 3. Ack latency of one writer vs a bare 4 KiB write + fdatasync on the same filesystem.
    let (sync_p50, sync_p99) = fdatasync_latency(&raw, if quick { 2000 } else { 5000 })?;
    let (p50, p99) = (json_f64(&one, "ack_p50_us")?, json_f64(&one, "ack_p99_us")?);

    println!();
    println!("== cargo xtask bench wrl ({}) ==", if quick { "quick" } else { "full" });
    println!("ingest, {} MiB of 1 MiB writes ({} rounds, medians):", ingest >> 20, rounds);
    println!("  raw O_DIRECT dd         {raw_m:>10.1} MB/s");
    println!("  WRL (4 writers, 1 MiB)  {wrl_m:>10.1} MB/s   ratio {:.3}  (goal >= 0.90)", wrl_m / raw_m);
    println!("acknowledged 4 KiB appends/s:");
    println!("  1 writer                {one_ops:>10.0}");
    println!(
        "  32 writers              {many_ops:>10.0}   ratio {:.1}x (goal >= 10x), {:.1} records per batch",
        many_ops / one_ops,
        json_f64(&many, "records_per_batch")?
    );
    println!("ack latency, 1 writer, 4 KiB:");
    println!("  4 KiB pwrite+fdatasync  p50 {sync_p50:>8.1} us  p99 {sync_p99:>8.1} us");
    println!(
        "  WRL append ack          p50 {p50:>8.1} us  p99 {p99:>8.1} us   ratio p50 {:.2} p99 {:.2}",
        p50 / sync_p50,
        p99 / sync_p99
    );
    if fuzz_seconds > 0 {
        fuzz(fuzz_seconds)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Benchmarks that measure in this process (baselines, the agent) run optimised: a dev-profile
/// xtask hands `bench WHAT` to a release build of itself. `Ok(true)` when it did.
fn handed_to_release(what: &str, quick: bool) -> Result<bool> {
    if !cfg!(debug_assertions) {
        return Ok(false);
    }
    let mut c = cargo();
    c.args(["run", "--quiet", "--release", "-p", "xtask", "--", "bench", what]);
    if quick {
        c.arg("--quick");
    }
    run(&mut c).map(|_| true)
}

fn bench_relay(quick: bool) -> Result<()> {
    // The baselines (rustls, s2n-quic) run inside this process: measure them as the relay runs.
    if handed_to_release("relay", quick)? {
        return Ok(());
    }
    run(cargo().args(["build", "--release", "-p", "drv"]))?;
    let dir = root().join("target/bench-relay");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // The directory (server logs) stays under target/ for a look afterwards.
    relay::bench(&root().join("target/release/drv"), &dir, quick)
}

fn bench_snapshots(quick: bool) -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "drv"]))?;
    let dir = root().join("target/bench-snapshots");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    snapshots::bench(&root().join("target/release/drv"), &dir, quick)
}

fn bench_restore(quick: bool) -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "drv"]))?;
    let dir = root().join("target/bench-restore");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    restore::bench(&root().join("target/release/drv"), &dir, quick)
}

/// The config servers against a local store (`drv bench-config`, in the release build).
fn bench_config(quick: bool) -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "drv"]))?;
    let dir = root().join("target/bench-config");
    let _ = std::fs::remove_dir_all(&dir);
    let mut cmd = Command::new(root().join("target/release/drv"));
    cmd.arg("bench-config").arg("--dir").arg(&dir);
    if quick {
        cmd.arg("--quick");
    }
    run(&mut cmd)
}

fn bench_ui(quick: bool) -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "drv"]))?;
    let dir = root().join("target/bench-ui");
    let _ = std::fs::remove_dir_all(&dir);
    let mut cmd = Command::new(root().join("target/release/drv"));
    cmd.arg("bench-ui").arg("--dir").arg(&dir);
    if quick {
        cmd.arg("--quick");
    }
    run(&mut cmd)
}

fn bench_agent(quick: bool) -> Result<()> {
    if handed_to_release("agent", quick)? {
        return Ok(());
    }
    run(cargo().args(["build", "--release", "-p", "drv"]))?;
    let dir = root().join("target/bench-agent");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    agent::bench(&root().join("target/release/drv"), &dir, quick)
}

fn bench_ebpf(quick: bool) -> Result<()> {
    ebpf::setup()?;
    run(cargo().args(["build", "--release", "-p", "drv"]))?;
    let dir = root().join("target/bench-ebpf");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let r = ebpf::bench(&root().join("target/release/drv"), &dir, quick);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn bench_user(quick: bool) -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "drv"]))?;
    let dir = root().join("target/bench-user");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let r = user::bench(&root().join("target/release/drv"), &dir, quick);
    let _ = std::fs::remove_file(dir.join("disk.img"));
    let _ = std::fs::remove_file(dir.join("wrl0"));
    r
}

fn fuzz(seconds: u64) -> Result<()> {
    let have = Command::new("cargo").args(["fuzz", "--version"]).output().map(|o| o.status.success()).unwrap_or(false);
    if !have {
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    // Every target, the time shared between them.
    let each = (seconds / FUZZ_TARGETS.len() as u64).max(1);
    for (target, seed) in FUZZ_TARGETS {
        let corpus = root().join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        seed(&corpus)?;
        run(Command::new("cargo").current_dir(root().join("fuzz")).args([
            "+nightly",
            "fuzz",
            "run",
            target,
            "--",
            &format!("-max_total_time={each}"),
        ]))?;
        println!("fuzz: {target} ran {each}s without a crash");
    }
    Ok(())
}

/// Writes the seed inputs of a fuzz target's corpus into a directory.
type Seeder = fn(&Path) -> Result<()>;

/// The fuzz targets (`fuzz/fuzz_targets`) and how to seed each one's corpus.
const FUZZ_TARGETS: [(&str, Seeder); 4] = [
    ("record_decode", seed_corpus),
    ("frame_decode", seed_frame_corpus),
    ("nbd_server", seed_nbd_corpus),
    ("nbd_client", seed_nbd_client_corpus),
];

/// A server's side of a whole NBD session, as this server answers `drv restore`'s client: the
/// greeting, the replies to GO, one READ's reply.
fn seed_nbd_client_corpus(dir: &Path) -> Result<()> {
    use drv_proto::nbd::{self, Export, Handshake, Step};
    let exports = [Export { name: "snap".into(), size: 1 << 20, writable: false, description: String::new() }];
    let mut s = vec![8u8];
    s.extend(nbd::greeting());
    let mut h = Handshake::new();
    let mut from_client = nbd::client_hello("snap");
    for _ in 0..4 {
        match h.step(&from_client, &exports) {
            Step::Reply { consumed, reply } => {
                from_client.drain(..consumed);
                s.extend(reply);
            }
            Step::Go { reply, .. } => {
                s.extend(reply);
                break;
            }
            _ => bail!("the server core did not open the export for the seed"),
        }
    }
    s.extend(nbd::simple_reply(1, 0));
    s.extend([0x5a; 64]);
    std::fs::write(dir.join("session"), s)?;
    Ok(())
}

/// A client's side of a whole NBD session: flags, LIST, INFO, GO, a READ, a FLUSH, a DISC.
fn seed_nbd_corpus(dir: &Path) -> Result<()> {
    use drv_proto::nbd::{self, Request, cmd, opt};
    let option = |o: u32, data: &[u8]| {
        let mut b = nbd::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    };
    let go = [&4u32.to_be_bytes()[..], b"snap", &1u16.to_be_bytes(), &nbd::info::NAME.to_be_bytes()].concat();
    let mut s = vec![8u8];
    s.extend_from_slice(&(nbd::FLAG_C_FIXED_NEWSTYLE | nbd::FLAG_C_NO_ZEROES).to_be_bytes());
    s.extend(option(opt::LIST, &[]));
    s.extend(option(opt::INFO, &go));
    s.extend(option(opt::GO, &go));
    for (command, length) in [(cmd::READ, 4096), (cmd::FLUSH, 0), (cmd::DISC, 0)] {
        s.extend(Request { flags: 0, command, cookie: 1, offset: 0, length }.encode());
    }
    std::fs::write(dir.join("session"), s)?;
    Ok(())
}

/// One encoding of every frame type, so the fuzzer starts from valid bodies.
fn seed_frame_corpus(dir: &Path) -> Result<()> {
    use drv_format::frame::Frame;
    let frames = [
        Frame::OpenVolume { volume_id: 3 },
        Frame::VolumeState { volume_id: 3, last_seq: 10, last_epoch: 4, room_bytes: 1 << 30, capacity_bytes: 2 << 30 },
        Frame::Write {
            volume_id: 3,
            seq: 11,
            epoch: 5,
            offset: 4096,
            flags: 2,
            capture_unix: 1_800_000_000,
            data: vec![9; 100].into(),
        },
        Frame::Ack { volume_id: 3, seq: 11, lsn: 77 },
        Frame::Error { code: 3, message: "gap".into() },
        Frame::RelayOpen { volume_id: 3 },
        Frame::ReplicaPosition { volume_id: 3, durable_seq: 9, applied_seq: 8 },
        Frame::StatusRequest,
        Frame::StatusReply { json: b"{}".to_vec() },
        Frame::SnapshotRequest { volume_id: 3, op: drv_format::frame::snapshot_op::CREATE, arg: 0, name: "s1".into() },
        Frame::MediaRequest { volume_id: 3, op: 1, arg: 0 },
    ];
    for (i, f) in frames.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), f.encode())?;
    }
    Ok(())
}

/// Valid encodings of every structure, so the fuzzer starts past the checksums.
fn seed_corpus(dir: &Path) -> Result<()> {
    use drv_format::layout::{BatchHeader, MetaBlock, SegmentHeader};
    use drv_format::record::{Flags, RecordHeader, WriteDesc};
    let payload = vec![7u8; 40];
    let desc = WriteDesc {
        volume_id: 1,
        volume_seq: 2,
        epoch: 3,
        offset: 4096,
        length: 24,
        flags: Flags::FUA,
        key_id: 1,
        nonce: drv_format::nonce(1, 9),
        capture_unix: 0,
    };
    let h = RecordHeader { lsn: 5, prev_hash: 6, desc, stored_len: 40, payload_crc: drv_format::crc32c(&payload) };
    let mut rec = h.encode().to_vec();
    rec.extend_from_slice(&payload);
    let seg = SegmentHeader {
        wrl_uuid: [1; 16],
        wrl_id: 1,
        device_index: 0,
        segment_id: 2,
        first_lsn: 5,
        prev_hash: 6,
        slot: 0,
        segment_bytes: 1 << 20,
        io_align: 4096,
        created_unix_ns: 0,
    };
    let meta = MetaBlock { wrl_uuid: [1; 16], generation: 3, nonce_hwm: 9, trim_lsn: 4, oldest_segment_id: 2 };
    let batch = BatchHeader { segment_id: 2, first_lsn: 5, record_count: 1, batch_bytes: 64 + rec.len() as u32 };
    for (name, bytes) in [
        ("record", rec),
        ("segment", seg.encode().to_vec()),
        ("meta", meta.encode().to_vec()),
        ("batch", batch.encode().to_vec()),
    ] {
        std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
    }
    Ok(())
}
