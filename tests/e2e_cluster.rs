//! End to end: three real `paxwasm node` processes on loopback. Deploys kv, checks that
//! bad input gets clear 4xx answers without hurting the process, then runs concurrent
//! clients (one of them pipelining its writes) while the leader is killed with SIGKILL
//! and restarted, and checks that every acknowledged write is present and all replicas
//! reach the same state hash at the same index. Then pipelined commands through the
//! leader and a follower come back in order.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use paxwasm::node::probe::{self, Response};
use support::{
    get, leader, query_stale, status, submit, wait_converged, wait_until, Cluster, Writers,
    REQUEST_TIMEOUT,
};

const NODES: usize = 3;
const BODY_BYTES_MAX: usize = 4096;
const CLIENTS: usize = 6;

fn start(dir: &Path) -> Cluster {
    let body_bytes_max = BODY_BYTES_MAX.to_string();
    Cluster::start(dir, NODES, "e2e", &["--body-bytes-max", &body_bytes_max])
}

/// Submits until the answer is neither 503 nor 504 (same key, so at most once).
fn submit_retrying(addr: &str, command: &str, key: &str) -> Response {
    for _attempt in 0..20 {
        let reply = submit(addr, command, key).unwrap();
        if reply.status != 503 && reply.status != 504 {
            return reply;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("{command:?} was refused 20 times");
}

fn raw_exchange(addr: &str, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn check_bad_input(cluster: &Cluster, kv: &[u8]) {
    let addr = &cluster.nodes[1].http;
    let timeout = Duration::from_secs(30);

    let oversized = vec![b'x'; BODY_BYTES_MAX + 1];
    let reply = probe::request(addr, "POST", "/v1/commands", &[], &oversized, timeout).unwrap();
    assert_eq!(reply.status, 413, "oversized command: {}", reply.text());

    let reply = probe::request(
        addr,
        "PUT",
        "/v1/app",
        &[],
        b"\0asm but not really",
        timeout,
    )
    .unwrap();
    assert_eq!(reply.status, 400, "invalid module: {}", reply.text());
    assert!(reply.text().contains("error"), "{}", reply.text());

    let reply = probe::request(addr, "GET", "/v1/no-such-route", &[], b"", timeout).unwrap();
    assert_eq!(reply.status, 404, "unknown route: {}", reply.text());

    let reply = probe::request(
        addr,
        "POST",
        "/v1/queries?consistency=sometimes",
        &[],
        b"get a",
        timeout,
    )
    .unwrap();
    assert_eq!(reply.status, 400, "bad consistency: {}", reply.text());

    let answer = raw_exchange(addr, b"THIS IS NOT HTTP\r\n\r\n");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "garbage got {answer:?}"
    );

    // The process keeps serving commands. Early on the leader may still change (an
    // in-flight command is then answered 503/504); retrying with the same
    // Idempotency-Key is safe: it is applied at most once.
    let reply = submit_retrying(addr, "put bad-input-check 1", "bad-input-check");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "OK");
    let unknown = submit_retrying(addr, "frobnicate", "unknown-verb");
    assert_eq!(unknown.status, 200, "{}", unknown.text());
    assert!(unknown.text().starts_with("ERR"), "{}", unknown.text());

    // The module is still the same one and the process keeps serving.
    assert!(kv.len() > 8);
    for node in &cluster.nodes {
        assert_eq!(get(&node.http, "/livez").map(|r| r.status), Some(200));
    }
}

/// Deploys kv through node 1. Right after the first election the leader may still
/// change, which answers an in-flight deploy 503/504 (outcome unknown): then look
/// whether it took effect before trying again.
fn deploy(cluster: &Cluster, kv: &[u8]) -> serde_json::Value {
    let addr = &cluster.nodes[0].http;
    for _attempt in 0..10 {
        let reply =
            probe::request(addr, "PUT", "/v1/app", &[], kv, Duration::from_secs(60)).unwrap();
        match reply.status {
            200 => {
                let deployed: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
                assert!(deployed["module"].as_str().unwrap().starts_with("sha256:"));
                return deployed;
            }
            503 | 504 => {
                std::thread::sleep(Duration::from_millis(500));
                let app = get(addr, "/v1/app").expect("GET /v1/app");
                let app: serde_json::Value = serde_json::from_slice(&app.body).unwrap();
                if app["module"].is_string() {
                    return app;
                }
            }
            other => panic!("deploy answered {other}: {}", reply.text()),
        }
    }
    panic!("kv could not be deployed\n{}", cluster.log_tail());
}

#[test]
fn kill_leader_under_load_loses_no_acknowledged_write() {
    let kv_path = paxwasm::examples::example_module("kv").expect("build the kv example");
    let kv = std::fs::read(&kv_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = start(dir.path());

    wait_until("a leader", &cluster, Duration::from_secs(30), || {
        leader(&cluster)
    });
    let deployed = deploy(&cluster, &kv);
    wait_until(
        "the module on every replica",
        &cluster,
        Duration::from_secs(30),
        || {
            cluster
                .nodes
                .iter()
                .all(|n| status(&n.http).is_some_and(|s| s["module"] == deployed["module"]))
                .then_some(())
        },
    );

    check_bad_input(&cluster, &kv);

    // Concurrent clients: each writes its own keys, retrying a failed write with the same
    // idempotency key on the next node; only 200 answers count as acknowledged.
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.http.clone()).collect();
    let writers = Writers::start(addrs.clone(), CLIENTS, |seq| format!("v{seq}"));
    // And one client that pipelines its writes (HTTP/1.1), 16 per connection at a time.
    let pipelined_stop = Arc::new(AtomicBool::new(false));
    let pipelined = start_pipelined_writer(addrs, pipelined_stop.clone());

    std::thread::sleep(Duration::from_secs(2));
    let before_kill = writers.acks();
    assert!(
        before_kill > 0,
        "no write acknowledged before the kill\n{}",
        cluster.log_tail()
    );
    let victim = wait_until(
        "a leader to kill",
        &cluster,
        Duration::from_secs(10),
        || leader(&cluster),
    );
    cluster.kill(victim);
    std::thread::sleep(Duration::from_secs(4));
    let after_kill = writers.acks();
    assert!(
        after_kill > before_kill,
        "no write acknowledged after the leader was killed\n{}",
        cluster.log_tail()
    );
    cluster.spawn(victim, &[]);
    std::thread::sleep(Duration::from_secs(2));
    let mut acknowledged = writers.stop();
    pipelined_stop.store(true, Ordering::Relaxed);
    let pipelined = pipelined.join().expect("pipelined writer");
    assert!(!pipelined.is_empty(), "no pipelined write acknowledged");
    let pipelined_count = pipelined.len();
    acknowledged.extend(pipelined);

    // Every replica reaches the same state hash at the same index.
    let (index, hash) = wait_converged(&cluster);
    assert!(hash.starts_with("sha256:"));
    assert!(index > 0);

    // Every acknowledged write is present: all of them on the restarted replica (it
    // recovered from its store and caught up), a sample on the others (their state hash
    // equals its own, so they hold the same data).
    assert!(acknowledged.len() >= before_kill);
    let sample_every = (acknowledged.len() / 200).max(1);
    for node in &cluster.nodes {
        let every = if node.id == victim as u64 + 1 {
            1
        } else {
            sample_every
        };
        for (key, value) in acknowledged.iter().step_by(every) {
            let reply = query_stale(&node.http, format!("get {key}").as_bytes());
            assert_eq!(
                reply.status,
                200,
                "get {key} on node {}: {}",
                node.id,
                reply.text()
            );
            assert_eq!(reply.text(), *value, "key {key} on node {}", node.id);
        }
    }
    // A linearizable read through a follower reaches the leader.
    let reply = probe::request(
        &cluster.nodes[(victim + 1) % NODES].http,
        "POST",
        "/v1/queries",
        &[],
        b"get bad-input-check",
        REQUEST_TIMEOUT,
    )
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "1");
    // Commands through a follower are answered from the result the leader sends once it
    // applied them (the follower need not wait to learn the commit). Ten in a row, so
    // that the follower learning a commit first every time cannot hide the path.
    let leader_index = wait_until("a leader", &cluster, Duration::from_secs(30), || {
        leader(&cluster)
    });
    let follower = &cluster.nodes[(leader_index + 1) % NODES];
    let metric = "paxwasm_command_results_from_peers_total";
    let before = support::metric(&follower.http, metric).unwrap();
    for n in 0..10 {
        let reply = submit_retrying(
            &follower.http,
            &format!("put via-follower {n}"),
            &format!("via-follower-{n}"),
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), "OK");
        assert!(reply.header("paxwasm-index").is_some());
    }
    let after = support::metric(&follower.http, metric).unwrap();
    assert!(
        after > before,
        "no forwarded command was answered from the leader's result ({before} -> {after})"
    );
    // Pipelined commands (HTTP/1.1): many on one connection, answered in request order,
    // through the leader and through a follower.
    let leader_http = cluster.nodes[leader_index].http.clone();
    let indexes = pipelined_puts(&leader_http, "pipe-leader", 64);
    assert!(
        indexes.windows(2).all(|pair| pair[0] <= pair[1]),
        "one connection's commands are decided in the order sent: {indexes:?}"
    );
    pipelined_puts(&follower.http, "pipe-follower", 64);
    let (index, hash) = wait_converged(&cluster);
    for node in &cluster.nodes {
        for name in ["pipe-leader", "pipe-follower"] {
            for n in [0, 31, 63] {
                let reply = query_stale(&node.http, format!("get {name}-{n}").as_bytes());
                assert_eq!(reply.text(), format!("v{n}"), "node {}", node.id);
            }
        }
    }
    eprintln!(
        "e2e: {} writes acknowledged ({pipelined_count} of them pipelined; {} before the kill, {} before the restart); state {hash} at {index}",
        acknowledged.len(),
        before_kill,
        after_kill
    );
}

/// Sends `count` kv puts `put <name>-<n> v<n>` on one connection without waiting
/// (each with its own idempotency key), checks each answer is `200 OK` and returns
/// their `Paxwasm-Index` values in request order.
fn pipelined_puts(addr: &str, name: &str, count: usize) -> Vec<u64> {
    let requests: Vec<(String, String)> = (0..count)
        .map(|n| (format!("{name}-{n}"), format!("put {name}-{n} v{n}")))
        .collect();
    let answers = pipelined_exchange(addr, &requests);
    assert_eq!(answers.len(), count, "answers of {name}: {answers:?}");
    answers
        .iter()
        .enumerate()
        .map(|(n, answer)| {
            assert_eq!(
                (answer.status, answer.text()),
                (200, "OK".to_owned()),
                "answer {n} of {name}"
            );
            let index = answer
                .header("paxwasm-index")
                .expect("a 200 answer carries Paxwasm-Index");
            index.parse().unwrap()
        })
        .collect()
}

/// A client that pipelines: rounds of 16 puts `put pw<round>-<i> v<round>` sent on one
/// connection at once, each with its own idempotency key. What was not answered 200 is
/// sent again, same keys, on the next node. Returns the acknowledged keys and values.
fn start_pipelined_writer(
    addrs: Vec<String>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<BTreeMap<String, String>> {
    std::thread::spawn(move || {
        let mut acked = BTreeMap::new();
        let mut target = 0;
        let mut round = 0;
        while !stop.load(Ordering::Relaxed) {
            round += 1;
            // A pause per round keeps the count of writes to check afterwards modest.
            std::thread::sleep(Duration::from_millis(5));
            let mut pending: Vec<(String, String)> = (0..16)
                .map(|i| (format!("pw{round}-{i}"), format!("v{round}")))
                .collect();
            for _attempt in 0..8 {
                let requests: Vec<(String, String)> = pending
                    .iter()
                    .map(|(key, value)| (key.clone(), format!("put {key} {value}")))
                    .collect();
                let answers = pipelined_exchange(&addrs[target], &requests);
                let mut unanswered = Vec::new();
                for (n, (key, value)) in pending.into_iter().enumerate() {
                    match answers.get(n) {
                        Some(answer) if answer.status == 200 => {
                            assert_eq!(answer.text(), "OK", "put {key} {value}");
                            acked.insert(key, value);
                        }
                        _ => unanswered.push((key, value)),
                    }
                }
                pending = unanswered;
                if pending.is_empty() {
                    break;
                }
                target = (target + 1) % addrs.len();
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        acked
    })
}

/// Sends `POST /v1/commands` for every `(idempotency key, body)` on one connection
/// without waiting, then reads the answers in order: each answered before the
/// connection failed, closed or stayed silent for 10 s.
fn pipelined_exchange(addr: &str, requests: &[(String, String)]) -> Vec<Response> {
    let mut answers = Vec::new();
    let Ok(socket) = addr.parse() else {
        panic!("{addr} is not IP:PORT");
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&socket, Duration::from_secs(5)) else {
        return answers;
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut bytes = Vec::new();
    for (key, body) in requests {
        bytes.extend_from_slice(
            format!(
                "POST /v1/commands HTTP/1.1\r\nhost: {addr}\r\nidempotency-key: {key}\r\n\
                 content-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    if stream.write_all(&bytes).is_err() {
        return answers;
    }
    let mut buffer = Vec::new();
    while answers.len() < requests.len() {
        if let Some((answer, used)) = probe::parse_next(&buffer).unwrap() {
            answers.push(answer);
            buffer.drain(..used);
            continue;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(read) if read > 0 => buffer.extend_from_slice(&chunk[..read]),
            _ => break,
        }
    }
    answers
}
