//! The harness shared by the end-to-end tests that run real `paxwasm node` processes on
//! loopback: free ports, a cluster of child processes (killed when it is dropped), their
//! logs, and small HTTP helpers over `paxwasm::node::probe`. It only starts, stops and
//! asks nodes; what a test checks stays in the test.

// Every test binary compiles this module on its own and uses a subset of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use paxwasm::node::probe::{self, Response};

/// How long a command or query may take before the test treats it as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a status or metrics probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often `wait_until` looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How many last lines of each node's log a failure message shows.
const LOG_TAIL_LINES: usize = 25;

pub struct Node {
    pub id: u64,
    pub http: String,
    pub peer: String,
    pub child: Option<Child>,
}

/// Nodes with fixed addresses, each started as a child process with its data directory
/// and log file under `dir`.
pub struct Cluster {
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    /// `--cluster` naming the initial members.
    pub cluster_arg: String,
    /// `--cluster-id` of every node.
    pub cluster_id: String,
    /// Arguments every node is started with, after the common ones.
    pub args: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `count` distinct ports on 127.0.0.1 that nothing listens on, for nodes started later.
///
/// They come from outside the kernel's ephemeral range (`ip_local_port_range`): a port
/// from port 0 is let go before the node binds it, and meanwhile any outgoing connection
/// (another node's, a client's) may take it as its local port, so the node fails with
/// "address in use" and its peers reach the wrong process. Ports outside the range are
/// only ever taken by an explicit bind. This process never hands out a port twice, so a
/// killed node's port stays its own for its restart.
pub fn free_ports(count: usize) -> Vec<u16> {
    static GIVEN: Mutex<Option<PortPicker>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let picker = given.get_or_insert_with(PortPicker::new);
    (0..count).map(|_| picker.next()).collect()
}

struct PortPicker {
    low: u16,
    high: u16,
    next: u16,
    given: std::collections::HashSet<u16>,
}

impl PortPicker {
    fn new() -> Self {
        let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| {
                let mut bounds = range.split_whitespace().map(|b| b.parse::<u16>().ok());
                Some((bounds.next()??, bounds.next()??))
            })
            .unwrap_or((32768, 60999));
        // 10 000 ports below the ephemeral range if it leaves room, else above it. A
        // kernel whose range covers both (an unusual setting) brings the race back.
        let (low, high) = if ephemeral.0 >= 11_024 {
            (ephemeral.0 - 10_000, ephemeral.0)
        } else if ephemeral.1 <= 55_534 {
            (ephemeral.1 + 1, ephemeral.1 + 10_001)
        } else {
            eprintln!(
                "warning: the ephemeral port range {ephemeral:?} leaves no 10 000 ports \
                 outside it; test nodes may race outgoing connections for their ports"
            );
            (20_000, 30_000)
        };
        // Test binaries started at the same time by something other than cargo start
        // far apart in the window.
        let seed = std::process::id() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() as u64)
                .unwrap_or(0);
        let next = low + (seed % u64::from(high - low)) as u16;
        PortPicker {
            low,
            high,
            next,
            given: Default::default(),
        }
    }

    fn next(&mut self) -> u16 {
        for _ in self.low..self.high {
            let port = self.next;
            self.next = if port + 1 >= self.high {
                self.low
            } else {
                port + 1
            };
            if self.given.contains(&port) {
                continue;
            }
            // Somebody listening there (or holding it) is skipped.
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                self.given.insert(port);
                return port;
            }
        }
        panic!("no free port in {}..{}", self.low, self.high);
    }
}

impl Cluster {
    /// Addresses for `total` nodes with ids 1..=total, the first `members` of them named
    /// by `--cluster`; no node runs yet.
    pub fn new(dir: &Path, total: usize, members: usize, cluster_id: &str, args: &[&str]) -> Self {
        assert!(members <= total);
        let ports = free_ports(2 * total);
        let nodes: Vec<Node> = (0..total)
            .map(|i| Node {
                id: i as u64 + 1,
                http: format!("127.0.0.1:{}", ports[i]),
                peer: format!("127.0.0.1:{}", ports[total + i]),
                child: None,
            })
            .collect();
        let cluster_arg = nodes[..members]
            .iter()
            .map(|n| format!("{}={}", n.id, n.peer))
            .collect::<Vec<_>>()
            .join(",");
        Cluster {
            dir: dir.to_path_buf(),
            nodes,
            cluster_arg,
            cluster_id: cluster_id.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// `new` with every node a member, all of them started.
    pub fn start(dir: &Path, nodes: usize, cluster_id: &str, args: &[&str]) -> Self {
        let mut cluster = Cluster::new(dir, nodes, nodes, cluster_id, args);
        for i in 0..nodes {
            cluster.spawn(i, &[]);
        }
        cluster
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{}", self.nodes[i].id))
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{}.log", self.nodes[i].id))
    }

    /// Starts node `i` with `--cluster` and the extra arguments `extra`.
    pub fn spawn(&mut self, i: usize, extra: &[&str]) {
        let cluster_arg = self.cluster_arg.clone();
        self.spawn_with(i, Some(&cluster_arg), extra);
    }

    /// Starts node `i` with `--cluster cluster_arg` if given (a joining node starts
    /// without) and the extra arguments `extra`. Its log is appended to across restarts.
    pub fn spawn_with(&mut self, i: usize, cluster_arg: Option<&str>, extra: &[&str]) {
        assert!(self.nodes[i].child.is_none(), "node {i} is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .unwrap();
        let node = &self.nodes[i];
        let mut command = Command::new(env!("CARGO_BIN_EXE_paxwasm"));
        command
            .arg("node")
            .args(["--id", &node.id.to_string()])
            .arg("--data")
            .arg(self.data_dir(i))
            .args(["--http", &node.http])
            .args(["--peer", &node.peer])
            .args(["--cluster-id", &self.cluster_id])
            .args(&self.args)
            .args(extra);
        if let Some(cluster_arg) = cluster_arg {
            command.args(["--cluster", cluster_arg]);
        }
        // Every setting a test relies on is on the command line, not inherited.
        let child = command
            .env_remove("PAXWASM_TOKEN")
            .env_remove("PAXWASM_CHECKPOINT_ENTRIES")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start paxwasm node");
        self.nodes[i].child = Some(child);
    }

    /// SIGKILL.
    pub fn kill(&mut self, i: usize) {
        let mut child = self.nodes[i].child.take().expect("node is running");
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
    }

    pub fn running(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.child.is_some())
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.http.clone()).collect()
    }

    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    /// The last lines of every node's log, and the message of a panic if one shows.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for i in 0..self.nodes.len() {
            let log = self.log_of(i);
            let id = self.nodes[i].id;
            // A panic's message comes before its backtrace note: keep it in view.
            let lines: Vec<&str> = log.lines().collect();
            if let Some(at) = lines.iter().position(|l| l.contains("panicked at")) {
                out.push_str(&format!("--- node {id} panicked ---\n"));
                for line in &lines[at..(at + 3).min(lines.len())] {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            let skip = lines.len().saturating_sub(LOG_TAIL_LINES);
            out.push_str(&format!("--- node {id} ---\n"));
            for line in &lines[skip..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

pub fn get(addr: &str, path: &str) -> Option<Response> {
    probe::request(addr, "GET", path, &[], b"", PROBE_TIMEOUT).ok()
}

/// The JSON body of `GET path` if it answers 200.
pub fn get_json(addr: &str, path: &str) -> Option<serde_json::Value> {
    let reply = get(addr, path)?;
    (reply.status == 200).then(|| serde_json::from_slice(&reply.body).ok())?
}

pub fn status(addr: &str) -> Option<serde_json::Value> {
    get_json(addr, "/v1/status")
}

/// The value of a metric without labels in `GET /metrics`.
pub fn metric(addr: &str, name: &str) -> Option<u64> {
    let reply = get(addr, "/metrics")?;
    reply
        .text()
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} "))?.trim().parse().ok())
}

/// Polls `check` until it gives a value; past `timeout`, panics with the nodes' logs.
pub fn wait_until<T>(
    what: &str,
    cluster: &Cluster,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}\n{}", cluster.log_tail());
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The id every running member follows as leader (a node removed from the cluster
/// reports `"membership":"outside"` and is not asked).
pub fn leader_id(cluster: &Cluster) -> Option<u64> {
    let mut leaders = Vec::new();
    for node in cluster.running() {
        let status = status(&node.http)?;
        if status["membership"] == "outside" {
            continue;
        }
        leaders.push(status["leader"].as_u64()?);
    }
    let first = *leaders.first()?;
    leaders.iter().all(|l| *l == first).then_some(first)
}

/// The index in `cluster.nodes` of the node every running member follows as leader.
pub fn leader(cluster: &Cluster) -> Option<usize> {
    let id = leader_id(cluster)?;
    cluster.nodes.iter().position(|n| n.id == id)
}

/// `POST /v1/queries?consistency=stale` with `query`: this node's own applied state.
pub fn query_stale(addr: &str, query: &[u8]) -> Response {
    probe::request(
        addr,
        "POST",
        "/v1/queries?consistency=stale",
        &[],
        query,
        REQUEST_TIMEOUT,
    )
    .unwrap()
}

/// `POST /v1/commands` with an idempotency key (a retry with the same key is applied
/// at most once).
pub fn submit(addr: &str, command: impl AsRef<[u8]>, key: &str) -> std::io::Result<Response> {
    probe::request(
        addr,
        "POST",
        "/v1/commands",
        &[("Idempotency-Key", key)],
        command.as_ref(),
        REQUEST_TIMEOUT,
    )
}

/// `(index, hash)` when every node applied everything chosen and reports its state hash
/// at that index, the same on all of them.
pub fn converged(cluster: &Cluster) -> Option<(u64, String)> {
    let mut seen = Vec::new();
    for node in &cluster.nodes {
        let status = status(&node.http)?;
        let applied = status["applied_index"].as_u64()?;
        if applied != status["commit_index"].as_u64()? {
            return None;
        }
        let hash = &status["state_hash"];
        if hash["index"].as_u64()? != applied {
            return None;
        }
        seen.push((applied, hash["hash"].as_str()?.to_string()));
    }
    let first = seen[0].clone();
    seen.iter().all(|s| *s == first).then_some(first)
}

/// Waits up to a minute for `converged`: every node applied everything chosen and
/// reports the same state hash at the same index. Returns that index and hash.
pub fn wait_converged(cluster: &Cluster) -> (u64, String) {
    wait_until(
        "equal state hashes",
        cluster,
        Duration::from_secs(60),
        || converged(cluster),
    )
}

/// Waits for a leader, then deploys `module` through it (`PUT /v1/app`, repeated until
/// a 200 while the cluster settles). Returns the leader's index in `cluster.nodes`.
pub fn deploy_through_leader(cluster: &Cluster, module: &[u8]) -> usize {
    let leader = wait_until("a leader", cluster, Duration::from_secs(30), || {
        leader(cluster)
    });
    let addr = &cluster.nodes[leader].http;
    wait_until(
        "the module deployed",
        cluster,
        Duration::from_secs(30),
        || {
            let reply =
                probe::request(addr, "PUT", "/v1/app", &[], module, REQUEST_TIMEOUT).ok()?;
            (reply.status == 200).then_some(())
        },
    );
    leader
}

/// Sends `signal` (`STOP`, `CONT`) to node `i`'s process.
pub fn signal(cluster: &Cluster, i: usize, signal: &str) {
    let pid = cluster.nodes[i]
        .child
        .as_ref()
        .expect("node is running")
        .id();
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// One acknowledged write: its key, value and output, when it was sent and how long it
/// took (retries included).
#[derive(Clone)]
pub struct Acked {
    pub key: String,
    pub value: String,
    pub output: Vec<u8>,
    pub sent: Instant,
    pub latency: Duration,
}

/// Concurrent writers: writer `w` puts keys `c<w>-k<n>` (n = 1, 2, ...) with the value
/// `value(n)`, retrying a failed write with the same idempotency key on the next node
/// (applied at most once); only 200 answers count as acknowledged.
pub struct Writers {
    acked: Arc<Mutex<Vec<Acked>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writers {
    pub fn start(addrs: Vec<String>, count: usize, value: fn(usize) -> String) -> Writers {
        let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..count)
            .map(|writer| {
                let (addrs, acked, stop) = (addrs.clone(), acked.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut target = writer % addrs.len();
                    let mut seq = 0;
                    while !stop.load(Ordering::Relaxed) {
                        seq += 1;
                        let key = format!("c{writer}-k{seq}");
                        let value = value(seq);
                        let sent = Instant::now();
                        for _attempt in 0..8 {
                            match submit(&addrs[target], format!("put {key} {value}"), &key) {
                                Ok(reply) if reply.status == 200 => {
                                    assert!(reply.header("paxwasm-index").is_some());
                                    acked.lock().unwrap().push(Acked {
                                        key: key.clone(),
                                        value: value.clone(),
                                        output: reply.body,
                                        sent,
                                        latency: sent.elapsed(),
                                    });
                                    break;
                                }
                                _ => {
                                    target = (target + 1) % addrs.len();
                                    std::thread::sleep(Duration::from_millis(50));
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Writers {
            acked,
            stop,
            threads,
        }
    }

    /// Writes acknowledged so far.
    pub fn acks(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `more` writes beyond `since` were acknowledged.
    pub fn wait_for_acks(&self, cluster: &Cluster, what: &str, since: usize, more: usize) {
        wait_until(what, cluster, Duration::from_secs(60), || {
            (self.acks() >= since + more).then_some(())
        });
    }

    /// Stops the writers; returns every acknowledged write, in the order answered.
    pub fn stop_all(self) -> Vec<Acked> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().expect("writer thread");
        }
        let acked = self.acked.lock().unwrap().clone();
        acked
    }

    /// Stops the writers of a kv app; returns every acknowledged key and value, each
    /// of which kv answered `OK`.
    pub fn stop(self) -> BTreeMap<String, String> {
        self.stop_all()
            .into_iter()
            .map(|acked| {
                assert_eq!(acked.output, b"OK", "put {} {}", acked.key, acked.value);
                (acked.key, acked.value)
            })
            .collect()
    }
}
