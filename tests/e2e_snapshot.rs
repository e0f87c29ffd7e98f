//! End to end: snapshots, compaction and snapshot transfer with three real `paxwasm node`
//! processes on loopback, a small snapshot interval and a throttled transfer.
//!
//! One cluster, in phases:
//! 1. while clients write, kill -9 a follower in the middle of a snapshot write (a
//!    hidden test flag pauses the write between the temporary file and its rename) and
//!    restart it; run until the logs are compacted past slot 1; stop the clients;
//! 2. corrupt every snapshot file of that follower and restart it: it reports them and
//!    fetches a peer's snapshot before its core starts;
//! 3. wipe another follower's data directory and restart it with `--rejoin`: it can only
//!    come back by snapshot transfer; kill -9 it while the transfer is half done (its
//!    partial file is on disk) and restart it: the transfer resumes and the snapshot is
//!    installed; it does not vote; every acknowledged write is on both restarted
//!    replicas, all three at the same state hash and index;
//! 4. a module that keeps its state in non-exported mutable globals replaces kv; after a
//!    snapshot of it, the wiped replica is wiped again and recovers it by transfer.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use paxwasm::node::probe::{self, Response};
use support::{
    converged, get, leader, metric, query_stale, status, submit, wait_converged, wait_until,
    Cluster, Writers,
};

const NODES: usize = 3;
const SNAPSHOT_ENTRIES: u64 = 150;
/// The core keeps this many entries below a snapshot for lagging peers
/// (`Params::compaction_margin_entries`); the leader's log starts after slot 1 only once
/// its snapshot is past it.
const COMPACTION_MARGIN_ENTRIES: u64 = 1000;
/// Slow enough that a transfer of a ~1–2 MB snapshot takes seconds (a window to kill
/// the receiver in), fast enough for the test.
const TRANSFER_BYTES_PER_SEC: u64 = 300_000;
/// How long the follower's snapshot writes pause between temp file and rename.
const WRITE_PAUSE_MS: u64 = 1500;
const CLIENTS: usize = 6;

/// A guest whose whole state is two non-exported mutable globals: the number of
/// commands applied and the sum of their lengths. `apply` and `query` answer both as
/// two little-endian u64s (the output buffer in memory is scratch, rewritten by every
/// call, so only the globals carry state from one command to the next).
const GLOBAL_STATE_WAT: &str = r#"
(module
  (memory (export "memory") 1)
  (global $count (mut i64) (i64.const 0))
  (global $total (mut i64) (i64.const 0))
  (func (export "paxwasm_alloc") (param $len i32) (result i32)
    (i32.const 1024))
  (func $answer (result i64)
    (i64.store (i32.const 0) (global.get $count))
    (i64.store (i32.const 8) (global.get $total))
    ;; (out_ptr << 32) | out_len with out_ptr = 0 and out_len = 16
    (i64.const 16))
  (func (export "paxwasm_apply") (param $ptr i32) (param $len i32) (result i64)
    (global.set $count (i64.add (global.get $count) (i64.const 1)))
    (global.set $total
      (i64.add (global.get $total) (i64.extend_i32_u (local.get $len))))
    (call $answer))
  (func (export "paxwasm_query") (param $ptr i32) (param $len i32) (result i64)
    (call $answer))
)
"#;

fn start(dir: &Path) -> Cluster {
    let snapshot_entries = SNAPSHOT_ENTRIES.to_string();
    let transfer_bytes_per_sec = TRANSFER_BYTES_PER_SEC.to_string();
    let args = [
        "--snapshot-entries",
        &snapshot_entries,
        "--snapshot-transfer-bytes-per-sec",
        &transfer_bytes_per_sec,
    ];
    Cluster::start(dir, NODES, "e2e-snapshot", &args)
}

/// Submits through any live node until one answers 200 (same key: applied at most once).
fn submit_retrying(cluster: &Cluster, command: &[u8], key: &str) -> Response {
    for attempt in 0..60 {
        let node = &cluster.nodes[attempt % NODES];
        if node.child.is_some() {
            if let Ok(reply) = submit(&node.http, command, key) {
                if reply.status == 200 {
                    return reply;
                }
                assert!(
                    reply.status == 503 || reply.status == 504,
                    "{key}: {} {}",
                    reply.status,
                    reply.text()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{key} was refused 60 times\n{}", cluster.log_tail());
}

fn deploy(cluster: &Cluster, module: &[u8]) -> String {
    let module_id = format!("sha256:{}", sha256_hex(module));
    for attempt in 0..20 {
        let node = &cluster.nodes[attempt % NODES];
        if node.child.is_none() {
            continue;
        }
        if let Ok(reply) = probe::request(
            &node.http,
            "PUT",
            "/v1/app",
            &[],
            module,
            Duration::from_secs(60),
        ) {
            if reply.status == 200 {
                return module_id;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let app = get(&node.http, "/v1/app").map(|r| r.text());
        if app.is_some_and(|app| app.contains(&module_id)) {
            return module_id;
        }
    }
    panic!("the module could not be deployed\n{}", cluster.log_tail());
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn files_in(dir: &Path, suffix: &str) -> Vec<(PathBuf, u64)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(suffix))
        .map(|entry| {
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            (entry.path(), len)
        })
        .collect()
}

#[test]
fn snapshots_compaction_and_transfer_survive_kill_9_and_a_wiped_disk() {
    let kv = std::fs::read(paxwasm::examples::example_module("kv").expect("build kv")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = start(dir.path());
    wait_until("a leader", &cluster, Duration::from_secs(30), || {
        leader(&cluster)
    });
    deploy(&cluster, &kv);

    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.http.clone()).collect();
    let writers = Writers::start(addrs, CLIENTS, |seq| {
        format!("v{seq}-{}", "x".repeat(seq % 64))
    });

    // 1. kill -9 a follower in the middle of a snapshot write.
    let first_leader = wait_until("a leader", &cluster, Duration::from_secs(10), || {
        leader(&cluster)
    });
    let slow = (first_leader + 1) % NODES;
    cluster.kill(slow);
    cluster.spawn(
        slow,
        &["--snapshot-write-pause-ms", &WRITE_PAUSE_MS.to_string()],
    );
    let snapshots = cluster.data_dir(slow).join("snapshots");
    wait_until(
        "a snapshot write in progress",
        &cluster,
        Duration::from_secs(60),
        || (!files_in(&snapshots, ".tmp").is_empty()).then_some(()),
    );
    cluster.kill(slow);
    assert!(
        !files_in(&snapshots, ".tmp").is_empty(),
        "the kill came after the write finished"
    );
    cluster.spawn(slow, &[]);
    wait_until(
        "the restarted replica to remove the half-written snapshot",
        &cluster,
        Duration::from_secs(30),
        || files_in(&snapshots, ".tmp").is_empty().then_some(()),
    );

    // Until the leader's and this follower's logs no longer start at slot 1.
    wait_until(
        "the logs to be compacted past slot 1",
        &cluster,
        Duration::from_secs(120),
        || {
            let i = leader(&cluster)?;
            let compacted = |n: usize| {
                status(&cluster.nodes[n].http)
                    .and_then(|s| s["snapshot_index"].as_u64())
                    .is_some_and(|slot| slot > COMPACTION_MARGIN_ENTRIES + SNAPSHOT_ENTRIES)
            };
            (compacted(i) && compacted(slow)).then_some(())
        },
    );
    // Stop writing: under a steady load, a transfer slower than the leader's compaction
    // margin would be chased by newer snapshots (see docs/notes/node-snap.md).
    let acknowledged = writers.stop();
    assert!(
        acknowledged.len() > 1000,
        "only {} writes",
        acknowledged.len()
    );
    let (index, hash) = wait_converged(&cluster);

    // 2. Every local snapshot of a replica whose log is compacted is corrupt: it reports
    //    them, fetches a peer's snapshot before its core starts, and catches up.
    cluster.kill(slow);
    let corrupted = files_in(&snapshots, ".pxsnap");
    assert!(!corrupted.is_empty());
    for (path, len) in &corrupted {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[(*len / 2) as usize] ^= 0x40;
        std::fs::write(path, bytes).unwrap();
    }
    cluster.spawn(slow, &[]);
    let after = wait_until(
        "equal state hashes",
        &cluster,
        Duration::from_secs(90),
        || converged(&cluster),
    );
    assert_eq!(after, (index, hash.clone()));
    let log = cluster.log_of(slow);
    assert!(
        log.contains("corrupt snapshot file"),
        "no corrupt-snapshot report:\n{}",
        cluster.log_tail()
    );
    assert!(
        log.contains("snapshot from a peer is durable"),
        "the replica did not fetch a peer's snapshot:\n{}",
        cluster.log_tail()
    );

    // 3. A replica that lost its data directory rejoins (`--rejoin`): only a snapshot
    //    transfer can bring it back, since the leader's log no longer starts at 1. It is
    //    killed while the transfer is half done and restarted: the transfer resumes.
    let leader_now = wait_until("a leader", &cluster, Duration::from_secs(10), || {
        leader(&cluster)
    });
    let wiped = (0..NODES)
        .find(|i| *i != leader_now && *i != slow)
        .unwrap_or(slow);
    cluster.kill(wiped);
    std::fs::remove_dir_all(cluster.data_dir(wiped)).unwrap();
    cluster.spawn(wiped, &["--rejoin"]);
    let incoming = cluster.data_dir(wiped).join("snapshots");
    wait_until(
        "a partial snapshot on the wiped replica",
        &cluster,
        Duration::from_secs(60),
        || {
            files_in(&incoming, ".partial")
                .iter()
                .any(|(_, len)| *len > 0)
                .then_some(())
        },
    );
    cluster.kill(wiped);
    let partial = files_in(&incoming, ".partial");
    assert!(
        partial.iter().any(|(_, len)| *len > 0),
        "the transfer finished before the kill"
    );
    cluster.spawn(wiped, &["--rejoin"]);
    wait_until(
        "the wiped replica to install a snapshot",
        &cluster,
        Duration::from_secs(90),
        || {
            (metric(
                &cluster.nodes[wiped].http,
                "paxwasm_snapshot_installs_total",
            )? >= 1)
                .then_some(())
        },
    );
    let log = cluster.log_of(wiped);
    assert!(
        log.lines()
            .any(|l| l.contains("receiving a snapshot") && !l.contains("resume_from=0")),
        "the transfer did not resume from the partial file:\n{}",
        cluster.log_tail()
    );
    let after = wait_converged(&cluster);
    assert_eq!(after, (index, hash.clone()));
    assert_eq!(
        status(&cluster.nodes[wiped].http).unwrap()["voting"],
        serde_json::json!(false),
        "a replica that lost its data must not vote"
    );

    // Nothing acknowledged is lost on the restarted replicas.
    for i in [slow, wiped] {
        for (key, value) in &acknowledged {
            let reply = query_stale(&cluster.nodes[i].http, format!("get {key}").as_bytes());
            assert_eq!(reply.status, 200, "get {key} on node {}", i + 1);
            assert_eq!(reply.text(), *value, "key {key} on node {}", i + 1);
        }
    }
    eprintln!(
        "e2e snapshot: {} writes acknowledged; state {hash} at {index}; wiped replica's snapshot index {}",
        acknowledged.len(),
        status(&cluster.nodes[wiped].http).unwrap()["snapshot_index"],
    );

    // 4. State in a non-exported mutable global survives a snapshot transfer. The
    //    amnesic replica is the one wiped again: the other two still form a quorum.
    let module = wat::parse_str(GLOBAL_STATE_WAT).unwrap();
    deploy(&cluster, &module);
    let mut count = 0u64;
    let mut total = 0u64;
    let deployed_at = status(&cluster.nodes[leader_now].http).unwrap()["applied_index"]
        .as_u64()
        .unwrap();
    while count < 2 * SNAPSHOT_ENTRIES + 20 {
        let command = vec![b'g'; (count % 50 + 1) as usize];
        let reply = submit_retrying(&cluster, &command, &format!("global-{count}"));
        count += 1;
        total += command.len() as u64;
        assert_eq!(reply.body.len(), 16, "{:?}", reply.body);
        assert_eq!(
            u64::from_le_bytes(reply.body[..8].try_into().unwrap()),
            count
        );
        assert_eq!(
            u64::from_le_bytes(reply.body[8..].try_into().unwrap()),
            total
        );
    }
    wait_until(
        "a snapshot of the global-state module",
        &cluster,
        Duration::from_secs(60),
        || {
            let i = leader(&cluster)?;
            let snapshot = status(&cluster.nodes[i].http)?["snapshot_index"].as_u64()?;
            (snapshot > deployed_at + SNAPSHOT_ENTRIES).then_some(())
        },
    );
    cluster.kill(wiped);
    std::fs::remove_dir_all(cluster.data_dir(wiped)).unwrap();
    cluster.spawn(wiped, &["--rejoin"]);
    wait_until(
        "the wiped replica to install the global-state snapshot",
        &cluster,
        Duration::from_secs(90),
        || {
            (metric(
                &cluster.nodes[wiped].http,
                "paxwasm_snapshot_installs_total",
            )? >= 1)
                .then_some(())
        },
    );
    let (index, hash) = wait_converged(&cluster);
    for node in &cluster.nodes {
        let reply = query_stale(&node.http, b"");
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(
            (
                u64::from_le_bytes(reply.body[..8].try_into().unwrap()),
                u64::from_le_bytes(reply.body[8..].try_into().unwrap())
            ),
            (count, total),
            "node {}",
            node.id
        );
    }
    eprintln!(
        "e2e snapshot: global-state module at {index}: {hash}; {count} commands, {total} bytes"
    );
}
