//! Group commit benchmark: syncs/s vs writes/s for 1, 16 and 256 concurrent writers of
//! 128-byte accepted entries, each writer in a closed loop (submit, wait until durable,
//! repeat).
//!
//! Two ways to drive the store: one OS thread per writer (`group-threads`) and one tokio
//! task per writer on a single runtime thread (`group-tasks`, how the node calls it). The
//! `in sync` column is the share of wall time the committer spent inside fdatasync;
//! `cpu us/write` is the CPU time of the whole process (all threads, fjall's included) per
//! acknowledged write.
//!
//! Baseline, measured in the same run: the same writers calling fjall directly, one
//! `insert` + `persist(SyncData)` per write, which is what fjall gives without a group
//! commit of our own.
//!
//! Run: `cargo bench -p paxwasm --bench storage` (`PAXWASM_BENCH_SECS` sets the seconds per
//! case, default 3; `PAXWASM_BENCH_CASES=group-tasks,group-threads` runs only those).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fjall::{Database, KeyspaceCreateOptions, PersistMode};
use paxwasm::storage::{Store, WriteBatch};

const WRITERS: [u64; 3] = [1, 16, 256];
const ENTRY_BYTES: usize = 128;
const SECS_DEFAULT: u64 = 3;

struct Outcome {
    writes: u64,
    syncs: u64,
    /// Time inside fdatasync, when known.
    sync_time: Option<Duration>,
    elapsed: Duration,
    latencies_us: Vec<u64>,
}

/// Linux reports process CPU time in /proc in USER_HZ ticks, fixed at 100 by the ABI.
const USER_HZ: u64 = 100;

/// User + system CPU time of this process so far.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces);
    // utime and stime are fields 14 and 15 of the whole line.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = after_name
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 1000 / USER_HZ)
}

/// Runs one case and prints its line, with the CPU time the whole process used; `None`
/// when `PAXWASM_BENCH_CASES` (a comma-separated list of case names) leaves it out.
fn run(name: &str, writers: u64, case: impl FnOnce() -> Outcome) -> Option<Outcome> {
    if let Ok(cases) = std::env::var("PAXWASM_BENCH_CASES") {
        if !cases.split(',').any(|c| c == name) {
            return None;
        }
    }
    let cpu_before = process_cpu();
    let outcome = case();
    let cpu = process_cpu() - cpu_before;
    outcome.print(name, writers, cpu);
    Some(outcome)
}

impl Outcome {
    fn print(&self, name: &str, writers: u64, cpu: Duration) {
        let secs = self.elapsed.as_secs_f64();
        let mut latencies = self.latencies_us.clone();
        latencies.sort_unstable();
        let percentile = |p: f64| {
            let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
            latencies.get(index).copied().unwrap_or(0)
        };
        println!(
            "{name:<13} {writers:>7} {:>10.0} {:>9.0} {:>12.1} {:>9} {:>9} {:>8} {:>11.1}",
            self.writes as f64 / secs,
            self.syncs as f64 / secs,
            self.writes as f64 / self.syncs.max(1) as f64,
            percentile(0.50),
            percentile(0.99),
            self.sync_time.map_or("-".to_string(), |t| format!(
                "{:.0}%",
                100.0 * t.as_secs_f64() / secs
            )),
            cpu.as_secs_f64() * 1e6 / self.writes.max(1) as f64,
        );
    }
}

/// Runs `writers` threads calling `write(writer, i)` in a closed loop for `duration`.
fn closed_loop(
    writers: u64,
    duration: Duration,
    write: &(dyn Fn(u64, u64) + Sync),
) -> (u64, Duration, Vec<u64>) {
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let latencies: Vec<Vec<u64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..writers)
            .map(|writer| {
                let stop = &stop;
                scope.spawn(move || {
                    let mut latencies = Vec::new();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let begun = Instant::now();
                        write(writer, i);
                        latencies.push(begun.elapsed().as_micros() as u64);
                        i += 1;
                    }
                    latencies
                })
            })
            .collect();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = started.elapsed();
    let latencies: Vec<u64> = latencies.into_iter().flatten().collect();
    (latencies.len() as u64, elapsed, latencies)
}

fn slot(writers: u64, writer: u64, i: u64) -> u64 {
    i * writers + writer
}

fn bench_store(writers: u64, duration: Duration) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), "bench", 1).unwrap();
    let entry = vec![0xAB; ENTRY_BYTES];
    let before = store.metrics();
    let (writes, elapsed, latencies_us) = closed_loop(writers, duration, &|writer, i| {
        let batch = WriteBatch {
            accepted: vec![(slot(writers, writer, i), entry.clone())],
            ..WriteBatch::default()
        };
        store.write_blocking(batch).unwrap();
    });
    let after = store.metrics();
    assert_eq!(after.batches - before.batches, writes);
    Outcome {
        writes,
        syncs: after.syncs - before.syncs,
        sync_time: Some(Duration::from_micros(
            after.sync_time_us - before.sync_time_us,
        )),
        elapsed,
        latencies_us,
    }
}

/// The same closed loop with writers as tasks on one tokio thread, as the node runtime
/// will call the store (no OS thread per writer to wake).
fn bench_store_tasks(writers: u64, duration: Duration) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), "bench", 1).unwrap();
    let store = Arc::new(store);
    let stop = Arc::new(AtomicBool::new(false));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let before = store.metrics();
    let started = Instant::now();
    let timer = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            std::thread::sleep(duration);
            stop.store(true, Ordering::Relaxed);
        })
    };
    let latencies_us: Vec<u64> = runtime.block_on(async {
        let tasks: Vec<_> = (0..writers)
            .map(|writer| {
                let store = Arc::clone(&store);
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let begun = Instant::now();
                        let batch = WriteBatch {
                            accepted: vec![(slot(writers, writer, i), vec![0xAB; ENTRY_BYTES])],
                            ..WriteBatch::default()
                        };
                        store.write(batch).await.unwrap();
                        latencies.push(begun.elapsed().as_micros() as u64);
                        i += 1;
                    }
                    latencies
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all
    });
    let elapsed = started.elapsed();
    timer.join().unwrap();
    let after = store.metrics();
    let writes = latencies_us.len() as u64;
    assert_eq!(after.batches - before.batches, writes);
    Outcome {
        writes,
        syncs: after.syncs - before.syncs,
        sync_time: Some(Duration::from_micros(
            after.sync_time_us - before.sync_time_us,
        )),
        elapsed,
        latencies_us,
    }
}

fn bench_fjall_direct(writers: u64, duration: Duration) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::builder(dir.path())
        .manual_journal_persist(true)
        .open()
        .unwrap();
    let entries = db
        .keyspace("entries", || {
            KeyspaceCreateOptions::default().manual_journal_persist(true)
        })
        .unwrap();
    let entry = vec![0xAB; ENTRY_BYTES];
    let (writes, elapsed, latencies_us) = closed_loop(writers, duration, &|writer, i| {
        entries
            .insert(slot(writers, writer, i).to_be_bytes(), entry.as_slice())
            .unwrap();
        db.persist(PersistMode::SyncData).unwrap();
    });
    Outcome {
        writes,
        // One persist (one fdatasync) per write.
        syncs: writes,
        sync_time: None,
        elapsed,
        latencies_us,
    }
}

/// The disk itself at the time of the run: append 4 KiB and fdatasync, in a loop.
fn raw_fdatasync(duration: Duration) -> Outcome {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut file = std::fs::File::create(dir.path().join("probe")).unwrap();
    let block = vec![0x5A; 4096];
    let (writes, elapsed, latencies_us) = closed_loop(1, duration, &|_, _| {
        // Only one writer, so the closure is never entered concurrently.
        let mut file = &file;
        file.write_all(&block).unwrap();
        file.sync_data().unwrap();
    });
    file.flush().unwrap();
    Outcome {
        writes,
        syncs: writes,
        sync_time: Some(elapsed),
        elapsed,
        latencies_us,
    }
}

fn first_line_with(path: &str, prefix: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|line| line.starts_with(prefix))
        .unwrap_or("?")
        .to_string()
}

fn main() {
    let secs = std::env::var("PAXWASM_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SECS_DEFAULT);
    let duration = Duration::from_secs(secs);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("storage group commit benchmark: {ENTRY_BYTES}-byte entries, {secs} s per case");
    println!(
        "machine: {cpus} CPUs, {}, load average at start: {}",
        first_line_with("/proc/cpuinfo", "model name"),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "{:<13} {:>7} {:>10} {:>9} {:>12} {:>9} {:>9} {:>8} {:>11}",
        "store",
        "writers",
        "writes/s",
        "syncs/s",
        "writes/sync",
        "p50 us",
        "p99 us",
        "in sync",
        "cpu us/write"
    );
    run("raw-4KiB-sync", 1, || raw_fdatasync(duration));
    for writers in WRITERS {
        let direct = run("fjall-direct", writers, || {
            bench_fjall_direct(writers, duration)
        });
        let grouped = run("group-threads", writers, || bench_store(writers, duration));
        let tasks = run("group-tasks", writers, || {
            bench_store_tasks(writers, duration)
        });
        let rate = |o: &Outcome| o.writes as f64 / o.elapsed.as_secs_f64();
        if let (Some(direct), Some(grouped), Some(tasks)) = (direct, grouped, tasks) {
            println!(
                "{:<13} {writers:>7} {:>9.1}x {:>8.1}x  (writes/s vs fjall-direct: threads, tasks)",
                "ratio",
                rate(&grouped) / rate(&direct),
                rate(&tasks) / rate(&direct),
            );
        }
    }
    println!(
        "load average at end: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
