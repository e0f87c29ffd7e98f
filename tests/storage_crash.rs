//! The acceptor store against real process deaths.
//!
//! Each test re-executes this test binary as a child process (selected by an environment
//! variable) so the child can die for real: by SIGKILL from the parent, or by its own abort
//! on fail-stop.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use paxwasm::storage::{Ballot, FaultHook, FaultPoint, StorageConfig, Store, WriteBatch};

const CLUSTER: &str = "crash-cluster";
const NODE: u64 = 1;
/// Set in a child process: the data directory the child writes to.
const CHILD_DIR_ENV: &str = "PAXWASM_STORAGE_CHILD_DIR";
const WRITERS: u64 = 8;
const ENTRY_BYTES: usize = 128;
const KILL_ROUNDS: usize = 5;
/// The kill comes a random 0..this many milliseconds after the first acknowledgement.
const KILL_DELAY_MS_MAX: u64 = 550;
const SIGABRT: i32 = 6;
const SIGKILL: i32 = 9;

/// The entry a child writes at `slot`, so the parent can check the bytes, not just the key.
fn entry(slot: u64) -> Vec<u8> {
    let mut bytes = format!("slot {slot} ").into_bytes();
    bytes.resize(ENTRY_BYTES, b'.');
    bytes
}

/// Spawns this test binary running only `test_name`, as a child writing to `dir`.
fn spawn_child(test_name: &str, dir: &Path, stderr: Stdio) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// Kills the child if the parent test fails before it does, so no writer outlives the test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A small xorshift generator: the kill moment is random, and the seed is printed so a
/// failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Child half of `kill_9_loses_no_acknowledged_write`: writers that print every slot,
/// promise and chosen index as soon as it is acknowledged durable, until killed.
fn crash_child_writer(dir: &Path) {
    let (store, recovered) = Store::open(dir, CLUSTER, NODE).unwrap();
    let next_slot = recovered.accepted.keys().last().map_or(0, |slot| slot + 1);
    let next_round = recovered.promised.map_or(1, |ballot| ballot.round + 1);
    // libtest has already printed "test <name> ... " without a newline.
    println!("\nready");
    std::thread::scope(|scope| {
        for writer in 0..WRITERS {
            let store = &store;
            scope.spawn(move || {
                for i in 0.. {
                    let slot = next_slot + i * WRITERS + writer;
                    // Writer 0 also moves the promise and the chosen index, which must
                    // never be lost either (it is the only one, so they only grow).
                    let round = next_round + i;
                    let batch = WriteBatch {
                        promised: (writer == 0).then_some(Ballot { round, node: NODE }),
                        accepted: vec![(slot, entry(slot))],
                        chosen: (writer == 0).then_some(slot),
                        ..WriteBatch::default()
                    };
                    store.write_blocking(batch).unwrap();
                    let line = if writer == 0 {
                        format!("acked {slot} promised {round} chosen {slot}\n")
                    } else {
                        format!("acked {slot}\n")
                    };
                    std::io::stdout().lock().write_all(line.as_bytes()).unwrap();
                }
            });
        }
    });
}

#[derive(Default)]
struct Acknowledged {
    slots: Vec<u64>,
    promised_round_max: u64,
    chosen_max: Option<u64>,
}

fn parse_acknowledged(lines: &[String]) -> Acknowledged {
    let mut acked = Acknowledged::default();
    for line in lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["acked", slot] => acked.slots.push(slot.parse().unwrap()),
            ["acked", slot, "promised", round, "chosen", chosen] => {
                acked.slots.push(slot.parse().unwrap());
                acked.promised_round_max = acked.promised_round_max.max(round.parse().unwrap());
                let chosen: u64 = chosen.parse().unwrap();
                acked.chosen_max = Some(acked.chosen_max.map_or(chosen, |c| c.max(chosen)));
            }
            // libtest's own lines ("running 1 test", ...) and "ready".
            _ => {}
        }
    }
    acked
}

#[test]
fn kill_9_loses_no_acknowledged_write() {
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        return crash_child_writer(Path::new(&dir));
    }
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("kill -9 test seed {seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut all_acked: BTreeMap<u64, ()> = BTreeMap::new();

    for round in 0..KILL_ROUNDS {
        let mut child = KillOnDrop(spawn_child(
            "kill_9_loses_no_acknowledged_write",
            dir.path(),
            Stdio::inherit(),
        ));
        let stdout = child.0.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let (first_ack_tx, first_ack_rx) = std::sync::mpsc::channel();
        let reader = {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                let mut stdout = BufReader::new(stdout);
                let mut line = String::new();
                while stdout.read_line(&mut line).unwrap() > 0 {
                    // A line cut short by the kill (no newline) acknowledges nothing.
                    if let Some(whole) = line.strip_suffix('\n') {
                        if whole.starts_with("acked ") {
                            // Only the first send matters; later ones find no receiver.
                            let _ = first_ack_tx.send(());
                        }
                        lines.lock().unwrap().push(whole.to_string());
                    }
                    line.clear();
                }
            })
        };
        // The random delay starts at the first acknowledgement, so a slow first sync on a
        // busy disk cannot make a round acknowledge nothing.
        first_ack_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the child acknowledged no write within 60 s");
        let delay_ms = rng.next() % KILL_DELAY_MS_MAX;
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.0.kill().unwrap();
        let status = child.0.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(SIGKILL),
            "child ended by itself: {status}"
        );
        reader.join().unwrap();

        let acked = parse_acknowledged(&lines.lock().unwrap());
        assert!(
            !acked.slots.is_empty(),
            "round {round}: no acknowledgement parsed"
        );
        let (_store, recovered) = Store::open(dir.path(), CLUSTER, NODE).unwrap();
        for slot in &acked.slots {
            assert_eq!(
                recovered.accepted.get(slot),
                Some(&entry(*slot)),
                "seed {seed} round {round}: acknowledged slot {slot} lost after kill -9"
            );
            all_acked.insert(*slot, ());
        }
        let promised = recovered.promised.expect("writer 0 acknowledged promises");
        assert!(
            promised.round >= acked.promised_round_max,
            "seed {seed}: promised {promised:?} below acknowledged round {}",
            acked.promised_round_max
        );
        assert!(
            recovered.chosen >= acked.chosen_max,
            "seed {seed}: chosen {:?} below acknowledged {:?}",
            recovered.chosen,
            acked.chosen_max
        );
        // Earlier rounds' acknowledged writes survive later crashes too.
        for slot in all_acked.keys() {
            assert!(recovered.accepted.contains_key(slot), "slot {slot} lost");
        }
        println!(
            "round {round}: killed after {delay_ms} ms, {} acknowledged slots all present",
            acked.slots.len()
        );
    }
}

/// Child half of `a_failed_sync_aborts_the_process_with_one_clear_line`: the production
/// fail-stop handler, a disk that reports ENOSPC at the sync.
fn disk_full_child(dir: &Path) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let hook: FaultHook = Arc::new(|point| match point {
        FaultPoint::Sync => Err(std::io::Error::from(std::io::ErrorKind::StorageFull)),
        FaultPoint::Write => Ok(()),
    });
    let config = StorageConfig {
        fault_hook: Some(hook),
        ..StorageConfig::default()
    };
    let (store, _) = Store::open_with(config, dir, CLUSTER, NODE).unwrap();
    let result = store.write_blocking(WriteBatch {
        accepted: vec![(1, entry(1))],
        ..WriteBatch::default()
    });
    // Reaching this line is the failure the parent checks for.
    println!("write returned {result:?}");
}

#[test]
fn a_failed_sync_aborts_the_process_with_one_clear_line() {
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        return disk_full_child(Path::new(&dir));
    }
    let dir = tempfile::tempdir().unwrap();
    let child = spawn_child(
        "a_failed_sync_aborts_the_process_with_one_clear_line",
        dir.path(),
        Stdio::piped(),
    );
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.signal(),
        Some(SIGABRT),
        "the child did not abort: {}\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    assert!(!stdout.contains("write returned"), "{stdout}");
    let fail_stop_lines: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("storage fail-stop"))
        .collect();
    assert_eq!(fail_stop_lines.len(), 1, "stderr: {stderr}");
    let line = fail_stop_lines[0];
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("the disk is full (ENOSPC)"), "{line}");
    assert!(line.contains(&dir.path().display().to_string()), "{line}");
}
