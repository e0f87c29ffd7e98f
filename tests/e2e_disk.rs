//! End to end: a replica whose disk runs nearly full keeps serving and loses nothing.
//!
//! Three real `paxwasm node` processes. The leader is told (test hook `POST
//! /v1/debug/disk-free?bytes=0`) that its data disk has no space left. It must not crash
//! and must not write: it answers commands with 507, stops leading (the other two elect
//! a leader and go on committing), still serves stale reads and its status and metrics.
//! Once space is "freed" (`?bytes=measured`), it catches up and the three converge on
//! the same state hash, with every acknowledged write present.

mod support;

use std::time::Duration;

use paxwasm::node::probe::{self, Response};
use support::{status, wait_until, Cluster};

const TIMEOUT: Duration = Duration::from_secs(15);

fn call(addr: &str, method: &str, path: &str, body: &[u8]) -> Option<Response> {
    probe::request(addr, method, path, &[], body, TIMEOUT).ok()
}

/// Submits `command` through `addr` until it is acknowledged (same idempotency key on
/// every attempt: applied at most once).
fn submit_acknowledged(cluster: &Cluster, addr: &str, command: &str) {
    let key = command.replace(' ', "-");
    wait_until(command, cluster, Duration::from_secs(30), || {
        let reply = support::submit(addr, command, &key).ok()?;
        (reply.status == 200).then_some(())
    });
}

fn stale_get(addr: &str, key: &str) -> String {
    let reply = support::query_stale(addr, format!("get {key}").as_bytes());
    assert_eq!(reply.status, 200, "{reply:?}");
    String::from_utf8_lossy(&reply.body).into_owned()
}

/// Three replicas with the disk test hook and kv deployed; the leader's index.
fn start_with_kv(dir: &std::path::Path, cluster_id: &str, extra: &[&str]) -> (Cluster, usize) {
    let kv = std::fs::read(paxwasm::examples::example_module("kv").unwrap()).unwrap();
    // A minimum of 1 byte: the real disk is never "low", only the test hook's 0 is.
    let mut args = vec!["--test-hooks", "--disk-free-bytes-min", "1"];
    args.extend_from_slice(extra);
    let cluster = Cluster::start(dir, 3, cluster_id, &args);
    let leader = support::deploy_through_leader(&cluster, &kv);
    (cluster, leader)
}

#[test]
fn a_replica_out_of_disk_space_refuses_writes_steps_aside_and_catches_up_afterwards() {
    let kv = std::fs::read(paxwasm::examples::example_module("kv").unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cluster, leader) = start_with_kv(dir.path(), "e2e-disk", &[]);
    let http = cluster.addrs();
    submit_acknowledged(&cluster, &http[leader], "put before 1");

    // The leader's disk "fills up".
    let low = &http[leader];
    let reply = call(low, "POST", "/v1/debug/disk-free?bytes=0", b"").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    let shown: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(shown["disk"]["low"], true, "{shown}");
    assert_eq!(shown["disk"]["free_bytes"], 0, "{shown}");

    let refused = support::submit(low, "put during 2", "refused").unwrap();
    assert_eq!(refused.status, 507, "{refused:?}");
    let body = String::from_utf8_lossy(&refused.body);
    assert!(body.contains("nearly full"), "{body}");
    assert!(refused.header("retry-after").is_some(), "{refused:?}");
    let deploy = call(low, "PUT", "/v1/app", &kv).unwrap();
    assert_eq!(deploy.status, 507, "{deploy:?}");

    // The other two elect a leader among themselves; the low replica follows it.
    let successor = wait_until(
        "a new leader that every replica follows",
        &cluster,
        Duration::from_secs(30),
        || support::leader(&cluster).filter(|new| *new != leader),
    );
    submit_acknowledged(&cluster, &http[successor], "put during 2");
    let healthy = (0..3).find(|i| *i != leader && *i != successor).unwrap();
    submit_acknowledged(&cluster, &http[healthy], "put during-follower 3");

    // Meanwhile the low replica serves what it has, and says why it takes no writes.
    assert_eq!(stale_get(low, "before"), "1");
    assert_eq!(
        stale_get(low, "during"),
        "NOT_FOUND",
        "a replica out of space must not have accepted later entries"
    );
    assert_eq!(call(low, "GET", "/livez", b"").unwrap().status, 200);
    let readyz = call(low, "GET", "/readyz", b"").unwrap();
    assert_eq!(readyz.status, 503, "{readyz:?}");
    assert!(readyz.text().contains("nearly full"), "{}", readyz.text());
    assert_eq!(support::metric(low, "paxwasm_disk_low"), Some(1));
    assert!(support::metric(low, "paxwasm_disk_low_dropped_messages_total").unwrap() > 0);
    let again = support::submit(low, "put during 9", "still-refused").unwrap();
    assert_eq!(again.status, 507, "{again:?}");

    // Space is back: it takes part again and catches up.
    let reply = call(low, "POST", "/v1/debug/disk-free?bytes=measured", b"").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    submit_acknowledged(&cluster, low, "put after 4");
    let (index, hash) = wait_until(
        "all replicas at the same state hash",
        &cluster,
        Duration::from_secs(30),
        || support::converged(&cluster),
    );
    assert!(hash.starts_with("sha256:"), "{hash} at {index}");
    for addr in &http {
        assert_eq!(stale_get(addr, "before"), "1", "{addr}");
        assert_eq!(stale_get(addr, "during"), "2", "{addr}");
        assert_eq!(stale_get(addr, "during-follower"), "3", "{addr}");
        assert_eq!(stale_get(addr, "after"), "4", "{addr}");
        assert_eq!(status(addr).unwrap()["disk"]["low"], false, "{addr}");
        assert_eq!(
            call(addr, "GET", "/readyz", b"").unwrap().status,
            200,
            "{addr}"
        );
    }
    assert_eq!(support::metric(low, "paxwasm_disk_low"), Some(0));
}

/// A follower out of space misses more than the leader keeps in its log for lagging
/// peers (`compaction_margin_entries`, 1000): once space is back, it refused nothing it
/// needs and catches up from a snapshot.
#[test]
fn a_follower_out_of_disk_space_catches_up_from_a_snapshot_once_space_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, leader) = start_with_kv(
        dir.path(),
        "e2e-disk-follower",
        &["--snapshot-entries", "100"],
    );
    let http = cluster.addrs();
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let low = &http[follower];
    let reply = call(low, "POST", "/v1/debug/disk-free?bytes=0", b"").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");

    // More slots than the leader keeps for lagging peers, one command per slot.
    const PUTS: usize = 1_300;
    for n in 0..PUTS {
        let reply =
            support::submit(&http[leader], format!("put k{n} v{n}"), &format!("k{n}")).unwrap();
        assert_eq!(
            reply.status,
            200,
            "put {n}: {reply:?}\n{}",
            cluster.log_tail()
        );
    }
    assert_eq!(stale_get(low, &format!("k{}", PUTS - 1)), "NOT_FOUND");
    assert_eq!(
        support::metric(low, "paxwasm_snapshot_installs_total"),
        Some(0)
    );

    let reply = call(low, "POST", "/v1/debug/disk-free?bytes=measured", b"").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    wait_until(
        "all replicas at the same state hash",
        &cluster,
        Duration::from_secs(60),
        || support::converged(&cluster),
    );
    assert!(support::metric(low, "paxwasm_snapshot_installs_total").unwrap() >= 1);
    for n in [0, PUTS / 2, PUTS - 1] {
        assert_eq!(stale_get(low, &format!("k{n}")), format!("v{n}"));
    }
}
