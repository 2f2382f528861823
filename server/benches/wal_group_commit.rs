//! What group commit buys: WAL entries per second against the disk's raw `fdatasync` rate.
//!
//! All cases run in the same process, on the same disk, one after the other:
//! - `raw_fdatasync`: append 256 bytes to a plain file and `fdatasync` it: the ceiling for any
//!   design that syncs once per write;
//! - `wal/1`: one 256-byte entry appended to the [`Wal`], then `sync`;
//! - `wal/16`, `wal/64`, `wal/256`: that many entries (one `append` call each, as separate client
//!   proposals would arrive) and one `sync`: the group commit.
//!
//! Criterion reports each case in entries per second (`Throughput::Elements`). A short second pass
//! then measures each case again with its own loop, to print per-sync latency percentiles and the
//! ratio that matters: entries/s ÷ raw fdatasync/s (1.0 = as fast as a bare write + fdatasync).
//! That pass measures the raw rate before and after the WAL cases and divides by the mean, so a
//! disk whose speed drifts during the run does not favour either side.
//!
//! Where: `$CARGO_TARGET_TMPDIR` (`target/tmp` in the workspace), i.e. the disk the workspace is
//! on, not a tmpfs: `fdatasync` on tmpfs costs nothing and would make the numbers meaningless.
//! The directory is removed at the end. The default run takes well under a minute.

use std::fs::{self, OpenOptions};
use std::hint::black_box;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use sync_proto::raft::v1::Entry;
use syncd::storage::{LogStore, Wal, WalOptions};

/// Payload of every entry, and size of every raw write.
const PAYLOAD: usize = 256;
/// Entries per sync in the group-commit cases (1 = no grouping).
const GROUPS: [u64; 4] = [1, 16, 64, 256];
/// How long the summary pass measures each case.
const SUMMARY_TIME: Duration = Duration::from_millis(1500);

/// A scratch directory on the workspace's disk, removed on drop.
struct BenchDir(PathBuf);

impl BenchDir {
    fn new() -> std::io::Result<BenchDir> {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("wal_group_commit-{}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path)?;
        }
        fs::create_dir_all(&path)?;
        Ok(BenchDir(path))
    }

    fn sub(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A plain file that we append to and fdatasync: the raw rate.
struct RawFile {
    file: fs::File,
    buf: [u8; PAYLOAD],
}

impl RawFile {
    fn create(path: &Path) -> std::io::Result<RawFile> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)?;
        Ok(RawFile {
            file,
            buf: [0x5a; PAYLOAD],
        })
    }

    fn write_and_sync(&mut self) -> std::io::Result<()> {
        self.file.write_all(&self.buf)?;
        self.file.sync_data()
    }
}

/// A Wal that appends `group` entries per sync.
struct WalWriter {
    wal: Wal,
    next: u64,
    payload: Bytes,
}

impl WalWriter {
    fn open(dir: &Path) -> Result<WalWriter, Box<dyn std::error::Error>> {
        let (wal, state) = Wal::open(dir, WalOptions::default())?;
        let next = state.entries.last().map_or(1, |e| e.index + 1);
        Ok(WalWriter {
            wal,
            next,
            payload: Bytes::from(vec![0xa5; PAYLOAD]),
        })
    }

    fn commit(&mut self, group: u64) -> Result<(), Box<dyn std::error::Error>> {
        for _ in 0..group {
            let entry = Entry {
                term: 1,
                index: self.next,
                data: self.payload.clone(),
                ..Default::default()
            };
            self.wal.append(std::slice::from_ref(&entry))?;
            self.next += 1;
        }
        self.wal.sync()?;
        Ok(())
    }
}

fn criterion_pass(c: &mut Criterion, dir: &BenchDir) -> Result<(), Box<dyn std::error::Error>> {
    let mut group = c.benchmark_group("wal_group_commit");
    group
        .warm_up_time(Duration::from_millis(800))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);

    group.throughput(Throughput::Elements(1));
    let mut raw = RawFile::create(&dir.sub("raw-criterion"))?;
    group.bench_function("raw_fdatasync", |b| {
        b.iter(|| {
            if let Err(e) = raw.write_and_sync() {
                panic!("raw write failed: {e}");
            }
        })
    });

    for n in GROUPS {
        group.throughput(Throughput::Elements(n));
        let mut writer = WalWriter::open(&dir.sub(&format!("wal-criterion-{n}")))?;
        group.bench_with_input(BenchmarkId::new("wal", n), &n, |b, &n| {
            b.iter(|| {
                if let Err(e) = writer.commit(black_box(n)) {
                    panic!("wal commit failed: {e}");
                }
            })
        });
    }
    group.finish();
    Ok(())
}

/// One case of the summary pass.
struct Measured {
    name: String,
    entries_per_sync: u64,
    syncs: u64,
    elapsed: Duration,
    /// Per-sync latencies, sorted.
    latencies: Vec<Duration>,
}

impl Measured {
    fn entries_per_sec(&self) -> f64 {
        (self.syncs * self.entries_per_sync) as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies.get(i).copied().unwrap_or_default()
    }
}

fn measure(
    name: String,
    entries_per_sync: u64,
    mut op: impl FnMut() -> Result<(), Box<dyn std::error::Error>>,
) -> Result<Measured, Box<dyn std::error::Error>> {
    for _ in 0..20 {
        op()?; // warm up: first segment creation, page cache
    }
    let mut latencies = Vec::new();
    let start = Instant::now();
    while start.elapsed() < SUMMARY_TIME {
        let t = Instant::now();
        op()?;
        latencies.push(t.elapsed());
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Ok(Measured {
        name,
        entries_per_sync,
        syncs: latencies.len() as u64,
        elapsed,
        latencies,
    })
}

fn summary_pass(dir: &BenchDir) -> Result<(), Box<dyn std::error::Error>> {
    // The raw rate is measured before and after the WAL cases, and the ratios use the mean, so
    // that a disk that speeds up or slows down during the run does not favour either side.
    let mut raw = RawFile::create(&dir.sub("raw-summary"))?;
    let raw_before = measure("raw write+fdatasync (1st)".into(), 1, || {
        Ok(raw.write_and_sync()?)
    })?;
    let mut results = Vec::new();
    for n in GROUPS {
        let mut writer = WalWriter::open(&dir.sub(&format!("wal-summary-{n}")))?;
        results.push(measure(format!("wal, {n} entries/sync"), n, || {
            writer.commit(n)
        })?);
    }
    let raw_after = measure("raw write+fdatasync (2nd)".into(), 1, || {
        Ok(raw.write_and_sync()?)
    })?;
    let raw_rate = (raw_before.entries_per_sec() + raw_after.entries_per_sec()) / 2.0;
    results.insert(0, raw_before);
    results.push(raw_after);

    println!();
    println!(
        "summary ({PAYLOAD}-byte entries, {} s per case, dir {}); \
         raw fdatasync/s (mean of both raw runs) = {raw_rate:.0}",
        SUMMARY_TIME.as_secs_f64(),
        dir.0.display()
    );
    for m in &results {
        println!(
            "  {:<26} {:>9.0} entries/s {:>6.0} syncs/s  p50 {:>7.1} us  p99 {:>7.1} us  \
             entries/s / raw fdatasync/s = {:>6.2}",
            m.name,
            m.entries_per_sec(),
            m.syncs as f64 / m.elapsed.as_secs_f64(),
            m.percentile(0.50).as_secs_f64() * 1e6,
            m.percentile(0.99).as_secs_f64() * 1e6,
            m.entries_per_sec() / raw_rate,
        );
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = BenchDir::new()?;
    let mut c = Criterion::default().configure_from_args();
    criterion_pass(&mut c, &dir)?;
    c.final_summary();
    // `cargo bench` passes --bench; without it (cargo test --benches) criterion only smoke-tests
    // each case once, and so do we: no summary pass.
    if std::env::args().any(|a| a == "--bench") {
        summary_pass(&dir)?;
    }
    Ok(())
}
