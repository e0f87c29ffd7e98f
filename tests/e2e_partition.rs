//! End to end: a leader frozen in place (SIGSTOP, as a long GC pause, a stalled VM or
//! a swapped-out process would freeze it) and cut off from its peers must not answer a
//! read from its old state when it wakes. Three real `paxwasm node` processes on
//! loopback, real clocks: the simulator checks leases on a virtual clock, this checks
//! that the runtime turns real time into the core's ticks before it serves anything
//! (`TickClock`).
//!
//! Peers reach each node through a TCP proxy the test controls (`--cluster` names the
//! proxies, as it would name a load balancer or NAT address in production). The leader
//! is cut off (nothing reaches it from its peers) and frozen; the other two elect a new
//! leader and choose a newer value. Reads sent to the old leader while it was frozen
//! wait in its sockets and are the first thing it sees on waking, and nothing from a
//! peer tells it that it was deposed: only its own clock can. Any read it answers 200
//! must return the newer value, in both linearizable and lease modes; a refusal (503,
//! 504) is what a correct node says. Then the cut heals and all three converge.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use paxwasm::node::probe;
use support::{
    deploy_through_leader, leader, query_stale, signal, status, submit, wait_converged, wait_until,
    Cluster, Writers, REQUEST_TIMEOUT,
};

const NODES: usize = 3;
/// Reads queued in the frozen leader's sockets, per consistency mode.
const QUEUED_READS: usize = 4;
/// How long fresh reads go on after the old leader wakes.
const AFTER_WAKE: Duration = Duration::from_secs(3);

/// A TCP proxy in front of one node's peer port. While cut, nothing reaches the node
/// from its peers: open connections are shut down and new ones are closed at once
/// (the peers' transports keep redialing).
struct PeerProxy {
    addr: String,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl PeerProxy {
    fn start(target: String) -> PeerProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (accept_cut, accept_open) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for incoming in listener.incoming() {
                let Ok(client) = incoming else { continue };
                if accept_cut.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let mut open = accept_open.lock().unwrap();
                // Checked again under the lock `cut` takes, so no connection made
                // while cutting survives it.
                if accept_cut.load(Ordering::SeqCst) {
                    continue;
                }
                open.extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                pump(client.try_clone().unwrap(), server.try_clone().unwrap());
                pump(server, client);
            }
        });
        PeerProxy { addr, cut, open }
    }

    fn cut(&self) {
        let mut open = self.open.lock().unwrap();
        self.cut.store(true, Ordering::SeqCst);
        for stream in open.drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` on a thread of its own until either side closes.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// Three nodes whose peers reach each other through a `PeerProxy` each (`--cluster`
/// names the proxies), with kv deployed. Returns the cluster, the proxies (by node
/// index) and the index of the node that was leading at the deploy.
fn start_proxied(dir: &Path, cluster_id: &str) -> (Cluster, Vec<PeerProxy>, usize) {
    let kv_path = paxwasm::examples::example_module("kv").expect("build the kv example");
    let kv = std::fs::read(&kv_path).unwrap();
    let mut cluster = Cluster::new(dir, NODES, NODES, cluster_id, &[]);
    let proxies: Vec<PeerProxy> = cluster
        .nodes
        .iter()
        .map(|node| PeerProxy::start(node.peer.clone()))
        .collect();
    cluster.cluster_arg = cluster
        .nodes
        .iter()
        .zip(&proxies)
        .map(|(node, proxy)| format!("{}={}", node.id, proxy.addr))
        .collect::<Vec<_>>()
        .join(",");
    for i in 0..NODES {
        cluster.spawn(i, &[]);
    }
    let deployed_at = deploy_through_leader(&cluster, &kv);
    (cluster, proxies, deployed_at)
}

/// Writes `key = value` through `addr`, retrying a 503/504 with the same idempotency
/// key (applied at most once) until it is acknowledged.
fn put_acknowledged(cluster: &Cluster, addr: &str, key: &str, value: &str) {
    let command = format!("put {key} {value}");
    let idempotency = format!("{key}-{value}");
    wait_until(
        &format!("{command:?} acknowledged"),
        cluster,
        Duration::from_secs(30),
        || {
            let reply = submit(addr, &command, &idempotency).ok()?;
            match reply.status {
                200 => {
                    assert_eq!(reply.text(), "OK");
                    Some(())
                }
                503 | 504 => None,
                other => panic!("{command:?} answered {other}: {}", reply.text()),
            }
        },
    );
}

/// A query request on a connection of its own, written before the node can read it.
struct QueuedRead {
    mode: &'static str,
    stream: TcpStream,
}

impl QueuedRead {
    fn send(addr: &str, mode: &'static str, query: &str) -> QueuedRead {
        let mut stream = TcpStream::connect(addr).expect("connect to the frozen leader");
        // Connecting needs only the kernel; the node is frozen and reads nothing yet.
        stream
            .set_read_timeout(Some(REQUEST_TIMEOUT + Duration::from_secs(5)))
            .unwrap();
        let request = format!(
            "POST /v1/queries?consistency={mode} HTTP/1.1\r\nHost: {addr}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{query}",
            query.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        QueuedRead { mode, stream }
    }

    /// `(status, body)` of the answer.
    fn answer(mut self) -> (u16, String) {
        let mut raw = Vec::new();
        if let Err(error) = self.stream.read_to_end(&mut raw) {
            panic!("no answer to a queued {} read: {error}", self.mode);
        }
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head:?}"));
        (status, body.to_string())
    }
}

/// What the old leader said to reads after waking.
#[derive(Default)]
struct Answers {
    fresh: usize,
    refused: usize,
}

impl Answers {
    fn record(&mut self, mode: &str, status: u16, body: &str, when: &str) {
        match status {
            200 => {
                assert_eq!(
                    body, "v2",
                    "the woken old leader answered a {mode} read {when} from its old state"
                );
                self.fresh += 1;
            }
            503 | 504 => self.refused += 1,
            other => panic!("a {mode} read {when} answered {other}: {body}"),
        }
    }
}

#[test]
fn frozen_leader_serves_no_stale_read_when_it_wakes() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, proxies, deployed_at) = start_proxied(dir.path(), "pause");
    put_acknowledged(&cluster, &cluster.nodes[deployed_at].http, "k", "v1");
    let old = wait_until("a leader", &cluster, Duration::from_secs(30), || {
        leader(&cluster)
    });
    // The leader holds its lease and answers from it.
    let reply = probe::request(
        &cluster.nodes[old].http,
        "POST",
        "/v1/queries?consistency=lease",
        &[],
        b"get k",
        REQUEST_TIMEOUT,
    )
    .unwrap();
    assert_eq!((reply.status, reply.text()), (200, "v1".to_string()));

    proxies[old].cut();
    signal(&cluster, old, "STOP");
    let old_id = cluster.nodes[old].id;
    let others: Vec<usize> = (0..NODES).filter(|&i| i != old).collect();
    let new = wait_until(
        "the other two to elect a new leader",
        &cluster,
        Duration::from_secs(30),
        || {
            let leaders: Vec<u64> = others
                .iter()
                .map(|&i| status(&cluster.nodes[i].http)?["leader"].as_u64())
                .collect::<Option<_>>()?;
            let leader = leaders[0];
            (leader != old_id && leaders.iter().all(|&l| l == leader))
                .then(|| cluster.nodes.iter().position(|n| n.id == leader))
                .flatten()
        },
    );
    put_acknowledged(&cluster, &cluster.nodes[new].http, "k", "v2");

    let old_addr = cluster.nodes[old].http.clone();
    let queued: Vec<QueuedRead> = ["linearizable", "lease"]
        .into_iter()
        .flat_map(|mode| (0..QUEUED_READS).map(move |_| mode))
        .map(|mode| QueuedRead::send(&old_addr, mode, "get k"))
        .collect();
    // Frozen well past any lease and election timeout, on the old leader's own clock.
    std::thread::sleep(Duration::from_secs(1));
    signal(&cluster, old, "CONT");

    let mut answers = Answers::default();
    for read in queued {
        let mode = read.mode;
        let (status, body) = read.answer();
        answers.record(mode, status, &body, "queued while it was frozen");
    }
    let woke = Instant::now();
    while woke.elapsed() < AFTER_WAKE {
        for mode in ["linearizable", "lease"] {
            let path = format!("/v1/queries?consistency={mode}");
            let reply =
                probe::request(&old_addr, "POST", &path, &[], b"get k", REQUEST_TIMEOUT).unwrap();
            answers.record(mode, reply.status, &reply.text(), "after it woke");
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    // Once it hears from its peers again, the old leader follows the new one and
    // holds the same state.
    proxies[old].heal();
    let (index, hash) = wait_converged(&cluster);
    for node in &cluster.nodes {
        let reply = query_stale(&node.http, b"get k");
        assert_eq!((reply.status, reply.text()), (200, "v2".to_string()));
    }
    // And it serves linearizable reads again (through the new leader).
    wait_until(
        "a linearizable read through the old leader",
        &cluster,
        Duration::from_secs(30),
        || {
            let reply = probe::request(
                &old_addr,
                "POST",
                "/v1/queries",
                &[],
                b"get k",
                REQUEST_TIMEOUT,
            )
            .ok()?;
            answers.record("linearizable", reply.status, &reply.text(), "after healing");
            (reply.status == 200).then_some(())
        },
    );
    eprintln!(
        "e2e_pause: old leader {old_id} woke; {} reads answered v2, {} refused; state {hash} at {index}",
        answers.fresh, answers.refused
    );
}

/// The leader stops hearing from its peers (every connection into it is cut) while it
/// can still send to them: its accepts and heartbeats arrive, the answers never come
/// back. It must acknowledge no write it could not make durable on a quorum, the other
/// two must take over (its heartbeats reach them, so they only do once it steps
/// down), and after the cut heals every acknowledged write is on every replica.
#[test]
fn leader_that_cannot_hear_its_peers_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, proxies, _) = start_proxied(dir.path(), "cut");
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.http.clone()).collect();
    let writers = Writers::start(addrs, 4, |seq| format!("v{seq}"));
    writers.wait_for_acks(&cluster, "writes before the cut", 0, 20);
    let cut = wait_until("a leader", &cluster, Duration::from_secs(30), || {
        leader(&cluster)
    });
    let cut_id = cluster.nodes[cut].id;
    proxies[cut].cut();
    let cut_at = Instant::now();
    let at_cut = writers.acks();
    let others: Vec<usize> = (0..NODES).filter(|&i| i != cut).collect();
    wait_until(
        "the other two to follow a new leader",
        &cluster,
        Duration::from_secs(60),
        || {
            others
                .iter()
                .map(|&i| status(&cluster.nodes[i].http)?["leader"].as_u64())
                .collect::<Option<Vec<u64>>>()?
                .iter()
                .all(|&l| l != cut_id && l != 0)
                .then_some(())
        },
    );
    let failover = cut_at.elapsed();
    writers.wait_for_acks(&cluster, "writes while the leader is cut off", at_cut, 20);
    let during_cut = writers.acks() - at_cut;
    proxies[cut].heal();
    let at_heal = writers.acks();
    writers.wait_for_acks(&cluster, "writes after healing", at_heal, 20);
    let acknowledged = writers.stop();

    let (index, hash) = wait_converged(&cluster);
    // Equal hashes at equal indexes: checking every write on the node that was cut off
    // checks it on all three.
    for (key, value) in &acknowledged {
        let reply = query_stale(&cluster.nodes[cut].http, format!("get {key}").as_bytes());
        assert_eq!(
            (reply.status, reply.text()),
            (200, value.clone()),
            "acknowledged write {key} on node {cut_id}"
        );
    }
    eprintln!(
        "e2e_partition: node {cut_id} cut off; the others followed a new leader after {failover:?}; {} writes acknowledged ({during_cut}+ during the cut); state {hash} at {index}",
        acknowledged.len()
    );
}
