//! Cost of the HTTP layer alone: `paxwasm::api::serve` in front of a node that answers
//! every command at once, driven by closed-loop keep-alive clients over loopback, beside
//! a baseline measured in the same run: a raw TCP ping-pong of the same payload size.
//!
//! `cargo bench -p paxwasm --bench api_http` (release). The figures bound what the API
//! adds to a command's latency and how many commands per second it can carry on this
//! machine; consensus, fsync and Wasm are not in them.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;
use paxwasm::api::client::Connection;
use paxwasm::api::{serve, ApiConfig};
use paxwasm::node::handle::{
    AppInfo, ClusterView, CommandError, CommandOk, CommandRequest, Consistency, DeployError,
    DeployOk, NodeApi, QueryError, QueryOk, Readiness, StatusView,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const RUN: Duration = Duration::from_secs(3);
const COMMAND_BYTES: usize = 128;
const OUTPUT: &[u8] = b"OK";

/// Answers every command at once with `OK` and the next index: no consensus, no
/// storage, no Wasm — only what is needed to measure the HTTP layer in isolation.
#[derive(Clone, Default)]
struct InstantNode {
    index: Arc<AtomicU64>,
}

impl NodeApi for InstantNode {
    fn submit(
        &self,
        _request: CommandRequest,
    ) -> impl Future<Output = Result<CommandOk, CommandError>> + Send {
        let index = self.index.fetch_add(1, Ordering::Relaxed) + 1;
        std::future::ready(Ok(CommandOk {
            index,
            output: OUTPUT.to_vec(),
        }))
    }
    fn query(
        &self,
        _payload: Vec<u8>,
        _consistency: Consistency,
    ) -> impl Future<Output = Result<QueryOk, QueryError>> + Send {
        std::future::ready(Err(QueryError::NoModule))
    }
    fn deploy(
        &self,
        _module: Vec<u8>,
        _migrate: bool,
    ) -> impl Future<Output = Result<DeployOk, DeployError>> + Send {
        std::future::ready(Err(DeployError::Invalid {
            reason: "not in this benchmark".into(),
        }))
    }
    fn app(&self) -> AppInfo {
        AppInfo {
            module: None,
            index: None,
            history: Vec::new(),
        }
    }
    fn id(&self) -> u64 {
        1
    }
    fn status(&self) -> StatusView {
        StatusView {
            id: 1,
            role: "leader".into(),
            membership: "voter".into(),
            leader: Some(1),
            ballot: (1, 1),
            commit_index: 0,
            applied_index: 0,
            snapshot_index: 0,
            apply_rules: 2,
            voting: true,
            module: None,
            state_hash: None,
            peers: Vec::new(),
            checkpoint: None,
            disk: None,
        }
    }
    fn cluster(&self) -> ClusterView {
        ClusterView {
            members: Vec::new(),
            leader: Some(1),
            voters: vec![1],
            old_voters: None,
            learners: Vec::new(),
        }
    }
    fn readiness(&self) -> Readiness {
        Readiness {
            ready: true,
            reason: None,
        }
    }
    fn metrics(&self) -> String {
        String::new()
    }
}

struct Figures {
    per_second: f64,
    p50_us: u32,
    p99_us: u32,
}

fn figures(mut latencies_us: Vec<u32>, elapsed: Duration) -> Figures {
    latencies_us.sort_unstable();
    let at = |q: f64| {
        latencies_us[((q * latencies_us.len() as f64) as usize).min(latencies_us.len() - 1)]
    };
    Figures {
        per_second: latencies_us.len() as f64 / elapsed.as_secs_f64(),
        p50_us: at(0.50),
        p99_us: at(0.99),
    }
}

async fn http_load(endpoint: &str, clients: usize) -> Figures {
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let mut connection = Connection::new(endpoint, 1 << 20).unwrap();
            tokio::spawn(async move {
                let mut latencies_us = Vec::new();
                let body = Bytes::from(paxwasm::cli::bench::command(
                    client as u32,
                    0,
                    COMMAND_BYTES,
                ));
                while started.elapsed() < RUN {
                    let sent = Instant::now();
                    let reply = connection
                        .request(Method::POST, "/v1/commands", &[], body.clone())
                        .await
                        .unwrap();
                    assert_eq!(reply.body.as_ref(), OUTPUT);
                    latencies_us.push(sent.elapsed().as_micros() as u32);
                }
                latencies_us
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    figures(all, started.elapsed())
}

/// The baseline: each client writes `COMMAND_BYTES` and reads back `OUTPUT.len()` bytes
/// over its own TCP connection to an echo-like server.
async fn tcp_load(clients: usize) -> Figures {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let mut request = [0u8; COMMAND_BYTES];
                while stream.read_exact(&mut request).await.is_ok() {
                    if stream.write_all(OUTPUT).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                stream.set_nodelay(true).unwrap();
                let mut latencies_us = Vec::new();
                let request = [b'x'; COMMAND_BYTES];
                let mut reply = [0u8; OUTPUT.len()];
                while started.elapsed() < RUN {
                    let sent = Instant::now();
                    stream.write_all(&request).await.unwrap();
                    stream.read_exact(&mut reply).await.unwrap();
                    latencies_us.push(sent.elapsed().as_micros() as u32);
                }
                latencies_us
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    figures(all, started.elapsed())
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(serve(
            listener,
            InstantNode::default(),
            ApiConfig::default(),
            std::future::pending(),
        ));
        println!(
            "api_http: {COMMAND_BYTES}-byte commands, {} s per row, clients and server in one process",
            RUN.as_secs()
        );
        println!(
            "{:<8} {:>12} {:>8} {:>8} {:>12} {:>8} {:>8} {:>9}",
            "clients", "http req/s", "p50 us", "p99 us", "tcp rt/s", "p50 us", "p99 us", "http/tcp"
        );
        for clients in [1, 16, 256] {
            let http = http_load(&endpoint, clients).await;
            let tcp = tcp_load(clients).await;
            println!(
                "{clients:<8} {:>12.0} {:>8} {:>8} {:>12.0} {:>8} {:>8} {:>9.2}",
                http.per_second,
                http.p50_us,
                http.p99_us,
                tcp.per_second,
                tcp.p50_us,
                tcp.p99_us,
                http.per_second / tcp.per_second
            );
        }
    });
}
