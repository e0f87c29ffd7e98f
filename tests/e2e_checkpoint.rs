//! End to end: state-hash checkpoints across three real `paxwasm node` processes.
//!
//! The replicas take a checkpoint every `CHECKPOINT_ENTRIES` applied entries. One
//! follower's machine is made to diverge on purpose (`--test-hooks`, `POST
//! /v1/debug/flip-byte`); the test shows the alarm at the first checkpoint after the
//! flip (status `agreed: false`, `/readyz` 503, reads and commands refused, the
//! mismatch metric), on that replica only, and that the replica repairs itself: it asks
//! a majority replica for its newest snapshot, installs it (applying its log after the
//! snapshot again), serves again and agrees with the others at the next checkpoint.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use paxwasm::node::probe::{self, Response};
use support::{status, wait_until, Cluster};

const NODES: usize = 3;
const CHECKPOINT_ENTRIES: u64 = 20;
/// Small, so that the majority has a snapshot to send by the time of the repair.
const SNAPSHOT_ENTRIES: u64 = 10;
/// The diverged replica waits this long before it asks for a snapshot, so the test can
/// observe the alarm before the repair ends it.
const REPAIR_DELAY_MS: u64 = 3_000;
const TIMEOUT: Duration = Duration::from_secs(15);

fn start(dir: &Path) -> Cluster {
    let checkpoint_entries = CHECKPOINT_ENTRIES.to_string();
    let snapshot_entries = SNAPSHOT_ENTRIES.to_string();
    let repair_delay_ms = REPAIR_DELAY_MS.to_string();
    let args = [
        "--checkpoint-entries",
        &checkpoint_entries,
        "--snapshot-entries",
        &snapshot_entries,
        "--checkpoint-repair-delay-ms",
        &repair_delay_ms,
        "--test-hooks",
    ];
    Cluster::start(dir, NODES, "e2e-checkpoint", &args)
}

fn call(addr: &str, method: &str, path: &str, body: &[u8]) -> Option<Response> {
    probe::request(addr, method, path, &[], body, TIMEOUT).ok()
}

/// Submits `count` puts through `addr`, each retried (same idempotency key, so applied
/// at most once) while the cluster settles.
fn submit_puts(cluster: &Cluster, addr: &str, prefix: &str, count: usize) {
    for n in 0..count {
        let key = format!("{prefix}-{n}");
        let command = format!("put {key} v{n}");
        let mut attempts = 0;
        loop {
            let reply = probe::request(
                addr,
                "POST",
                "/v1/commands",
                &[("Idempotency-Key", &key)],
                command.as_bytes(),
                TIMEOUT,
            );
            match reply {
                Ok(reply) if reply.status == 200 => break,
                other => {
                    attempts += 1;
                    assert!(
                        attempts < 20,
                        "{command:?} failed: {other:?}\n{}",
                        cluster.log_tail()
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}

/// `(index, hash)` once every replica shows the same agreed checkpoint at `index_min`
/// or later.
fn agreed_checkpoint(cluster: &Cluster, index_min: u64) -> (u64, String) {
    wait_until(
        "an agreed checkpoint on every replica",
        cluster,
        Duration::from_secs(20),
        || {
            let mut seen = Vec::new();
            for addr in &cluster.addrs() {
                let checkpoint = status(addr)?["checkpoint"].clone();
                if checkpoint["agreed"] != true || checkpoint["index"].as_u64()? < index_min {
                    return None;
                }
                seen.push((
                    checkpoint["index"].as_u64()?,
                    checkpoint["hash"].as_str()?.to_string(),
                ));
            }
            seen.iter().all(|s| *s == seen[0]).then(|| seen[0].clone())
        },
    )
}

fn metric(addr: &str, name: &str) -> u64 {
    support::metric(addr, name).unwrap_or_else(|| panic!("no metric {name}"))
}

#[test]
fn a_diverged_replica_is_detected_at_the_next_checkpoint_and_repaired() {
    let started = Instant::now();
    let kv = std::fs::read(paxwasm::examples::example_module("kv").unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = start(dir.path());
    let http = cluster.addrs();

    let leader = support::deploy_through_leader(&cluster, &kv);
    submit_puts(
        &cluster,
        &http[leader],
        "warm",
        2 * CHECKPOINT_ENTRIES as usize,
    );
    let (index, hash) = agreed_checkpoint(&cluster, CHECKPOINT_ENTRIES);
    assert!(
        hash.starts_with("sha256:") && hash.len() == 7 + 64,
        "{hash}"
    );
    assert_eq!(index % CHECKPOINT_ENTRIES, 0);

    // The victim is a follower (a diverged leader would also refuse the reads that
    // followers forward to it). Leadership may move in the first seconds, so the
    // leader is asked again once it has held for a while.
    let leader = wait_until("a stable leader", &cluster, Duration::from_secs(30), || {
        let first = support::leader(&cluster)?;
        std::thread::sleep(Duration::from_millis(500));
        (support::leader(&cluster)? == first).then_some(first)
    });
    let leader_addr = http[leader].clone();
    let victim = (leader + 1) % NODES;
    let victim_addr = http[victim].clone();
    let reply = call(&victim_addr, "POST", "/v1/debug/flip-byte", b"").unwrap();
    assert_eq!(reply.status, 400, "{}", reply.text());
    let reply = call(
        &victim_addr,
        "POST",
        "/v1/debug/flip-byte?offset=99999999999",
        b"",
    )
    .unwrap();
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(reply.text().contains("outside"), "{}", reply.text());
    for addr in &http {
        assert_eq!(metric(addr, "paxwasm_checkpoint_mismatches_total"), 0);
    }

    // Flip byte 0 of the follower's memory (address 0 is never used by Rust code, so
    // the module keeps working; only the state hash changes).
    let reply = call(&victim_addr, "POST", "/v1/debug/flip-byte?offset=0", b"").unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let flipped: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let flipped_at = flipped["applied_index"].as_u64().unwrap();
    let detect_at = (flipped_at / CHECKPOINT_ENTRIES + 1) * CHECKPOINT_ENTRIES;
    let flip_time = Instant::now();

    // One checkpoint interval of traffic (plus a margin for no-ops) reaches `detect_at`.
    submit_puts(
        &cluster,
        &leader_addr,
        "after",
        CHECKPOINT_ENTRIES as usize + 5,
    );
    let readyz = wait_until(
        "the diverged replica to fail /readyz",
        &cluster,
        Duration::from_secs(10),
        || {
            let reply = call(&victim_addr, "GET", "/readyz", b"")?;
            (reply.status == 503).then(|| reply.text())
        },
    );
    let detected_ms = flip_time.elapsed().as_millis();
    // Found at the first checkpoint after the flip: within one interval.
    assert!(
        readyz.contains(&format!(
            "diverged from the majority at checkpoint index {detect_at}:"
        )),
        "flipped at {flipped_at}, expected detection at {detect_at}: {readyz}"
    );
    let others: Vec<usize> = (0..NODES).filter(|i| *i != victim).collect();
    assert!(
        readyz.contains(&format!("(nodes [{}, {}])", others[0] + 1, others[1] + 1)),
        "{readyz}"
    );
    let victim_status = status(&victim_addr).unwrap();
    assert_eq!(
        victim_status["checkpoint"]["agreed"], false,
        "{victim_status}"
    );
    assert!(metric(&victim_addr, "paxwasm_checkpoint_mismatches_total") >= 2);
    assert_eq!(metric(&victim_addr, "paxwasm_checkpoint_diverged"), 1);
    let log = cluster.log_of(victim);
    assert!(log.contains("STATE DIVERGED"), "{}", cluster.log_tail());
    assert!(
        log.contains(&format!("index={detect_at}")),
        "{}",
        cluster.log_tail()
    );

    // Reads of every consistency, and commands, are refused on that replica only.
    for consistency in ["stale", "lease", "linearizable"] {
        let path = format!("/v1/queries?consistency={consistency}");
        let reply = call(&victim_addr, "POST", &path, b"get warm-1").unwrap();
        assert_eq!(reply.status, 503, "{consistency}: {}", reply.text());
        assert!(reply.text().contains("diverged"), "{}", reply.text());
        for &other in &others {
            let reply = call(&http[other], "POST", &path, b"get warm-1").unwrap();
            assert_eq!(
                reply.status,
                200,
                "{consistency} on node {}: {}\n{}",
                other + 1,
                reply.text(),
                cluster.log_tail()
            );
            assert_eq!(reply.text(), "v1");
        }
    }
    let reply = call(&victim_addr, "POST", "/v1/commands", b"put refused 1").unwrap();
    assert_eq!(reply.status, 503, "{}", reply.text());
    for &other in &others {
        let addr = &http[other];
        assert_eq!(call(addr, "GET", "/readyz", b"").unwrap().status, 200);
        assert_eq!(metric(addr, "paxwasm_checkpoint_diverged"), 0);
        // The majority sees the mismatch too (an alarm on every replica), but serves.
        assert!(metric(addr, "paxwasm_checkpoint_mismatches_total") >= 1);
    }

    assert!(
        flip_time.elapsed() < Duration::from_millis(REPAIR_DELAY_MS),
        "the checks above must run before the repair starts; they took {} ms",
        flip_time.elapsed().as_millis()
    );

    // Repair: the victim asks a majority replica for its newest snapshot and installs
    // it, without a restart.
    wait_until(
        "/readyz on the repaired replica",
        &cluster,
        Duration::from_secs(30),
        || (call(&victim_addr, "GET", "/readyz", b"")?.status == 200).then_some(()),
    );
    let repaired_ms = flip_time.elapsed().as_millis();
    let log = cluster.log_of(victim);
    assert!(
        log.contains("a snapshot from the majority is installed"),
        "{}",
        cluster.log_tail()
    );
    assert_eq!(metric(&victim_addr, "paxwasm_checkpoint_diverged"), 0);
    submit_puts(
        &cluster,
        &leader_addr,
        "repair",
        CHECKPOINT_ENTRIES as usize + 5,
    );
    let (index, hash) = agreed_checkpoint(&cluster, detect_at + CHECKPOINT_ENTRIES);
    let reply = call(
        &victim_addr,
        "POST",
        "/v1/queries?consistency=stale",
        b"get after-3",
    )
    .unwrap();
    assert_eq!((reply.status, reply.text()), (200, "v3".to_string()));
    eprintln!(
        "flipped at index {flipped_at}, detected at checkpoint {detect_at} after {detected_ms} ms; \
         repaired {repaired_ms} ms after the flip ({REPAIR_DELAY_MS} ms of it a deliberate \
         delay), agreed at {index} ({hash}); test took {} ms",
        started.elapsed().as_millis()
    );
}
