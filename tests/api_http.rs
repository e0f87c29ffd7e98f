//! The HTTP API boundary over real sockets on 127.0.0.1: exact status codes, headers
//! and JSON for every route and every mapping of a `NodeApi` result, body limits, the
//! admin token, query forwarding between two servers, malformed HTTP and shutdown.
//!
//! The replica runtime is replaced by [`FakeNode`]; end-to-end tests with real replica
//! processes live with the node (tests/ of the `node` branch).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION};
use hyper::{Method, StatusCode};
use paxwasm::api::client::{Connection, Reply};
use paxwasm::api::{serve, ApiConfig};
use paxwasm::node::handle::{
    AppInfo, ClusterView, CommandError, CommandOk, CommandRequest, Consistency, DeployError,
    DeployOk, DiskView, LeaderHint, MemberChange, MemberError, MemberView, ModuleEvent, NodeApi,
    PeerView, QueryError, QueryOk, Readiness, StatusView,
};
use paxwasm::node::probe;
use paxwasm::paxos::NodeId;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Test double of the replica runtime for the HTTP mapping only — not a replica: no
/// consensus, no storage, no Wasm. A deterministic, in-memory `NodeApi` whose answer is
/// chosen by the request payload (`trap`, `noquorum`, `unknown`, …), so that every
/// success and error variant of the contract can be driven through real HTTP and the
/// calls it received can be inspected afterwards.
#[derive(Clone)]
struct FakeNode(Arc<Mutex<FakeState>>);

struct FakeState {
    id: NodeId,
    /// Whether linearizable and lease queries are served here (else `NotLeader`).
    is_leader: bool,
    leader: Option<LeaderHint>,
    next_index: u64,
    applied: Vec<Vec<u8>>,
    first_result_by_key: HashMap<String, CommandOk>,
    queries: Vec<(Vec<u8>, Consistency)>,
    app: AppInfo,
    readiness: Readiness,
    members: Vec<MemberView>,
    /// Membership changes received, in order.
    changes: Vec<MemberChange>,
    /// The command `gate` waits for it; the command `open` opens it.
    gate: Arc<tokio::sync::Notify>,
}

impl FakeNode {
    fn new(id: NodeId, is_leader: bool, leader: Option<LeaderHint>) -> Self {
        Self(Arc::new(Mutex::new(FakeState {
            id,
            is_leader,
            leader,
            next_index: 1,
            applied: Vec::new(),
            first_result_by_key: HashMap::new(),
            queries: Vec::new(),
            app: AppInfo {
                module: None,
                index: None,
                history: Vec::new(),
            },
            readiness: Readiness {
                ready: true,
                reason: None,
            },
            changes: Vec::new(),
            gate: Arc::new(tokio::sync::Notify::new()),
            members: vec![
                MemberView {
                    id: 1,
                    role: "voter".into(),
                    peer: "127.0.0.1:7101".into(),
                    http: "127.0.0.1:7001".into(),
                },
                MemberView {
                    id: 4,
                    role: "learner".into(),
                    peer: "127.0.0.1:7104".into(),
                    http: "127.0.0.1:7004".into(),
                },
            ],
        })))
    }

    fn leader(id: NodeId) -> Self {
        Self::new(id, true, None)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().unwrap()
    }
}

/// Not a digest: the double names a module by its length, which is enough to check that
/// the API relays the runtime's module id verbatim.
fn fake_module_id(bytes: &[u8]) -> String {
    format!("sha256:{:064x}", bytes.len())
}

impl NodeApi for FakeNode {
    fn submit(
        &self,
        request: CommandRequest,
    ) -> impl Future<Output = Result<CommandOk, CommandError>> + Send {
        let node = self.clone();
        async move {
            if request.payload == b"hang" {
                return std::future::pending().await;
            }
            if request.payload == b"gate" {
                let gate = node.state().gate.clone();
                gate.notified().await;
            } else if request.payload == b"open" {
                node.state().gate.notify_one();
            }
            let mut state = node.state();
            let result = match request.payload.as_slice() {
                b"trap" => {
                    state.next_index += 1;
                    Err(CommandError::Rejected {
                        index: state.next_index - 1,
                        error: "trap: unreachable".into(),
                    })
                }
                b"noquorum" => Err(CommandError::Unavailable {
                    reason: "no quorum: 1 of 3 replicas reachable".into(),
                    retry_after_ms: 1500,
                }),
                b"unknown" => Err(CommandError::Unknown {
                    reason: "the leader lost its lease before the command was chosen".into(),
                }),
                b"nomodule" => Err(CommandError::NoModule),
                b"huge" => Err(CommandError::TooLarge { limit_bytes: 4 }),
                payload => {
                    if let Some(first) = request
                        .idempotency_key
                        .as_ref()
                        .and_then(|key| state.first_result_by_key.get(key))
                    {
                        return Ok(first.clone());
                    }
                    let ok = CommandOk {
                        index: state.next_index,
                        output: [b"OK ", payload].concat(),
                    };
                    state.next_index += 1;
                    state.applied.push(payload.to_vec());
                    if let Some(key) = request.idempotency_key {
                        state.first_result_by_key.insert(key, ok.clone());
                    }
                    Ok(ok)
                }
            };
            result
        }
    }

    fn query(
        &self,
        payload: Vec<u8>,
        consistency: Consistency,
    ) -> impl Future<Output = Result<QueryOk, QueryError>> + Send {
        let node = self.clone();
        async move {
            let mut state = node.state();
            state.queries.push((payload.clone(), consistency));
            if !state.is_leader && consistency != Consistency::Stale {
                return Err(QueryError::NotLeader {
                    leader: state.leader.clone(),
                });
            }
            match payload.as_slice() {
                b"trap" => Err(QueryError::Rejected {
                    error: "fuel exhausted".into(),
                }),
                b"noquorum" => Err(QueryError::Unavailable {
                    reason: "read index round failed: no quorum".into(),
                    retry_after_ms: 200,
                }),
                b"nomodule" => Err(QueryError::NoModule),
                payload => Ok(QueryOk {
                    applied_index: state.next_index - 1,
                    output: format!("node {}: {}", state.id, String::from_utf8_lossy(payload))
                        .into_bytes(),
                }),
            }
        }
    }

    fn deploy(
        &self,
        module: Vec<u8>,
        migrate: bool,
    ) -> impl Future<Output = Result<DeployOk, DeployError>> + Send {
        let node = self.clone();
        async move {
            let mut state = node.state();
            if !module.starts_with(b"\0asm") {
                return Err(DeployError::Invalid {
                    reason: "bad magic: not a WebAssembly module".into(),
                });
            }
            let index = state.next_index;
            state.next_index += 1;
            let id = fake_module_id(&module);
            if migrate && module.ends_with(b"no-import") {
                let reason = "the new module has no import_state export".to_owned();
                state.app.history.push(ModuleEvent {
                    module: id,
                    index,
                    migrated: true,
                    failed: Some(reason.clone()),
                });
                return Err(DeployError::MigrationFailed { index, reason });
            }
            state.app.module = Some(id.clone());
            state.app.index = Some(index);
            state.app.history.push(ModuleEvent {
                module: id.clone(),
                index,
                migrated: migrate,
                failed: None,
            });
            Ok(DeployOk { module: id, index })
        }
    }

    fn app(&self) -> AppInfo {
        self.state().app.clone()
    }

    fn id(&self) -> NodeId {
        self.state().id
    }

    fn status(&self) -> StatusView {
        let state = self.state();
        StatusView {
            id: state.id,
            role: if state.is_leader {
                "leader"
            } else {
                "follower"
            }
            .into(),
            membership: "voter".into(),
            leader: state.leader.as_ref().map(|leader| leader.id),
            ballot: (3, 1),
            commit_index: state.next_index - 1,
            applied_index: state.next_index - 1,
            snapshot_index: 0,
            apply_rules: 2,
            voting: true,
            module: state.app.module.clone(),
            state_hash: state
                .app
                .module
                .as_ref()
                .map(|_| (state.next_index - 1, format!("sha256:{:064x}", 0xabc))),
            peers: vec![PeerView {
                id: 2,
                peer: "127.0.0.1:7102".into(),
                http: "127.0.0.1:7002".into(),
                connected: true,
                chosen_index: Some(7),
                apply_rules_max: Some(2),
            }],
            checkpoint: None,
            disk: Some(DiskView {
                free_bytes: 1 << 30,
                free_bytes_min: 128 << 20,
                low: false,
            }),
        }
    }

    fn cluster(&self) -> ClusterView {
        ClusterView {
            members: self.state().members.clone(),
            leader: Some(1),
            voters: vec![1],
            old_voters: None,
            learners: vec![4],
        }
    }

    /// Chosen by the change: id 7 is refused (409), id 8 has no leader (503), id 9 times
    /// out (504); a follower answers `NotLeader` with its hint.
    fn change_members(
        &self,
        change: MemberChange,
    ) -> impl Future<Output = Result<ClusterView, MemberError>> + Send {
        let node = self.clone();
        async move {
            let (is_leader, leader) = {
                let mut state = node.state();
                state.changes.push(change.clone());
                (state.is_leader, state.leader.clone())
            };
            if !is_leader {
                return Err(MemberError::NotLeader { leader });
            }
            let id = match &change {
                MemberChange::Add { id, .. }
                | MemberChange::Promote { id }
                | MemberChange::Remove { id, .. } => *id,
                MemberChange::SetVoters { voters, .. } => voters
                    .iter()
                    .copied()
                    .max()
                    .expect("the route refuses an empty set"),
            };
            match id {
                7 => Err(MemberError::Refused {
                    reason: "learner 7 lags the leader by 900 entries".into(),
                }),
                8 => Err(MemberError::Unavailable {
                    reason: "no leader is known".into(),
                    retry_after_ms: 2000,
                }),
                9 => Err(MemberError::Unknown {
                    reason: "no outcome".into(),
                }),
                _ => Ok(node.cluster()),
            }
        }
    }

    fn readiness(&self) -> Readiness {
        self.state().readiness.clone()
    }

    fn metrics(&self) -> String {
        "# TYPE paxwasm_commits_total counter\npaxwasm_commits_total 42\n".into()
    }
}

/// A running API server on an ephemeral port.
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn start(node: FakeNode, config: ApiConfig) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, node, config, async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

fn config() -> ApiConfig {
    ApiConfig {
        body_bytes_max: 64,
        module_bytes_max: 256,
        admin_token: Some("s3cret".into()),
        ..ApiConfig::default()
    }
}

async fn call(
    server: &Server,
    method: Method,
    path: &str,
    headers: &[(&'static str, &str)],
    body: &[u8],
) -> Reply {
    let mut connection = Connection::new(&server.endpoint(), 1 << 20).unwrap();
    let headers: Vec<(HeaderName, HeaderValue)> = headers
        .iter()
        .map(|(name, value)| {
            (
                HeaderName::from_static(name),
                HeaderValue::from_str(value).unwrap(),
            )
        })
        .collect();
    connection
        .request(method, path, &headers, Bytes::copy_from_slice(body))
        .await
        .unwrap()
}

fn json_of(reply: &Reply) -> Value {
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert!(reply.body.ends_with(b"\n"));
    assert_eq!(
        reply.body.iter().filter(|byte| **byte == b'\n').count(),
        1,
        "one line"
    );
    serde_json::from_slice(&reply.body).unwrap()
}

/// Asserts the API's one error shape: the status and `{"error": message}`.
fn assert_error(reply: &Reply, status: StatusCode, message: &str) {
    assert_eq!(reply.status, status, "{:?}", reply.body);
    assert_eq!(json_of(reply), json!({ "error": message }));
}

/// Sends raw bytes and returns everything the server wrote until it closed or went
/// quiet.
async fn raw(server: &Server, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn commands_map_every_outcome() {
    let node = FakeNode::leader(1);
    let server = Server::start(node.clone(), config()).await;

    let reply = call(&server, Method::POST, "/v1/commands", &[], b"put a 1").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, Bytes::from_static(b"OK put a 1"));
    assert_eq!(reply.header("paxwasm-index"), Some("1"));
    assert_eq!(
        reply.header("content-type"),
        Some("application/octet-stream")
    );

    let reply = call(&server, Method::POST, "/v1/commands", &[], b"trap").await;
    assert_error(
        &reply,
        StatusCode::UNPROCESSABLE_ENTITY,
        "trap: unreachable",
    );
    assert_eq!(reply.header("paxwasm-index"), Some("2"));

    let reply = call(&server, Method::POST, "/v1/commands", &[], b"noquorum").await;
    assert_error(
        &reply,
        StatusCode::SERVICE_UNAVAILABLE,
        "no quorum: 1 of 3 replicas reachable",
    );
    assert_eq!(reply.header("retry-after"), Some("2"), "1500 ms rounds up");

    let reply = call(&server, Method::POST, "/v1/commands", &[], b"unknown").await;
    assert_error(
        &reply,
        StatusCode::GATEWAY_TIMEOUT,
        "outcome unknown: the command may or may not be applied (the leader lost its lease before the command was chosen); retry with the same Idempotency-Key",
    );

    let reply = call(&server, Method::POST, "/v1/commands", &[], b"nomodule").await;
    assert_error(
        &reply,
        StatusCode::SERVICE_UNAVAILABLE,
        "no module is deployed yet: deploy one with PUT /v1/app",
    );
    assert_eq!(reply.header("retry-after"), Some("1"));

    let reply = call(&server, Method::POST, "/v1/commands", &[], b"huge").await;
    assert_error(
        &reply,
        StatusCode::PAYLOAD_TOO_LARGE,
        "the request body is larger than the node accepts (4 bytes)",
    );

    assert_eq!(node.state().applied, vec![b"put a 1".to_vec()]);
    server.stop().await;
}

#[tokio::test]
async fn commands_refuse_malformed_and_oversized_requests() {
    let node = FakeNode::leader(1);
    let server = Server::start(node.clone(), config()).await;

    let reply = call(&server, Method::POST, "/v1/commands", &[], b"").await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "the command body is empty");

    let reply = call(&server, Method::POST, "/v1/commands", &[], &[b'x'; 65]).await;
    assert_error(
        &reply,
        StatusCode::PAYLOAD_TOO_LARGE,
        "the request body is larger than body_bytes_max (64 bytes)",
    );
    let reply = call(&server, Method::POST, "/v1/commands", &[], &[b'x'; 64]).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "exactly the limit is accepted"
    );

    let reply = call(
        &server,
        Method::POST,
        "/v1/commands",
        &[("idempotency-key", "")],
        b"put a 1",
    )
    .await;
    assert_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "Idempotency-Key must be 1 to 256 bytes long",
    );
    let reply = call(
        &server,
        Method::POST,
        "/v1/commands",
        &[("idempotency-key", "has space")],
        b"put a 1",
    )
    .await;
    assert_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "Idempotency-Key must be visible ASCII without spaces",
    );
    let reply = call(&server, Method::POST, "/v1/commands?x=1", &[], b"put a 1").await;
    assert_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "unknown query parameter \"x\"; this route takes none",
    );

    // A chunked body with no Content-Length is cut off at the limit too.
    let chunk = "x".repeat(40);
    let answer = raw(
        &server,
        format!(
            "POST /v1/commands HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n28\r\n{chunk}\r\n28\r\n{chunk}\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "{answer}"
    );
    assert!(answer
        .ends_with("{\"error\":\"the request body is larger than body_bytes_max (64 bytes)\"}\n"));

    assert_eq!(node.state().applied, vec![vec![b'x'; 64]]);
    server.stop().await;
}

/// A client that sends a body too large for the route and goes on sending it while the
/// 413 comes back must be able to send all of it and read the 413: the server closes
/// with a lingering close, not a reset that fails the client's writes.
#[tokio::test]
async fn a_client_still_sending_an_oversized_body_reads_the_413() {
    let server = Server::start(FakeNode::leader(1), config()).await;
    const BODY_BYTES: usize = 4 << 20;
    for (what, head) in [
        (
            "a command (hyper answers an oversized one)",
            format!("POST /v1/commands HTTP/1.1\r\nhost: t\r\ncontent-length: {BODY_BYTES}\r\n\r\n"),
        ),
        (
            "a module after a pipelined command",
            format!(
                "{}PUT /v1/app HTTP/1.1\r\nhost: t\r\nauthorization: Bearer s3cret\r\ncontent-length: {BODY_BYTES}\r\n\r\n",
                command_request("put a 1")
            ),
        ),
    ] {
        let stream = TcpStream::connect(server.addr).await.unwrap();
        let (mut reader, mut writer) = stream.into_split();
        writer.write_all(head.as_bytes()).await.unwrap();
        let sending = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 << 10];
            for _ in 0..BODY_BYTES / chunk.len() {
                writer.write_all(&chunk).await?;
            }
            writer.shutdown().await
        });
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("{what}: the server closes"))
            .unwrap_or_else(|error| panic!("{what}: reading the answer failed: {error}"));
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.contains("HTTP/1.1 413 Payload Too Large\r\n"),
            "{what}: {answer}"
        );
        tokio::time::timeout(Duration::from_secs(5), sending)
            .await
            .unwrap_or_else(|_| panic!("{what}: the body is taken"))
            .unwrap()
            .unwrap_or_else(|error| panic!("{what}: sending the body failed: {error}"));
    }
    server.stop().await;
}

#[tokio::test]
async fn idempotency_key_returns_the_first_result() {
    let node = FakeNode::leader(1);
    let server = Server::start(node.clone(), config()).await;
    let key = [("idempotency-key", "order-17")];
    let first = call(&server, Method::POST, "/v1/commands", &key, b"put a 1").await;
    let again = call(&server, Method::POST, "/v1/commands", &key, b"put a 1").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(first.header("paxwasm-index"), Some("1"));
    assert_eq!(again.header("paxwasm-index"), Some("1"));
    assert_eq!(again.body, first.body);
    assert_eq!(node.state().applied.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_command_with_no_answer_is_504_after_the_request_timeout() {
    let node = FakeNode::leader(1);
    let config = ApiConfig {
        request_timeout_ms: 100,
        ..config()
    };
    let server = Server::start(node, config).await;
    let reply = call(&server, Method::POST, "/v1/commands", &[], b"hang").await;
    assert_error(
        &reply,
        StatusCode::GATEWAY_TIMEOUT,
        "outcome unknown: the command may or may not be applied (no answer within request_timeout_ms (100 ms)); retry with the same Idempotency-Key",
    );
    server.stop().await;
}

#[tokio::test]
async fn queries_map_consistency_and_outcomes() {
    let node = FakeNode::leader(1);
    let server = Server::start(node.clone(), config()).await;
    call(&server, Method::POST, "/v1/commands", &[], b"put a 1").await;

    let reply = call(&server, Method::POST, "/v1/queries", &[], b"get a").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, Bytes::from_static(b"node 1: get a"));
    assert_eq!(reply.header("paxwasm-applied-index"), Some("1"));
    for (query, consistency) in [
        ("?consistency=linearizable", Consistency::Linearizable),
        ("?consistency=lease", Consistency::Lease),
        ("?consistency=stale", Consistency::Stale),
    ] {
        let path = format!("/v1/queries{query}");
        let reply = call(&server, Method::POST, &path, &[], b"get a").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(node.state().queries.last().unwrap().1, consistency);
    }
    assert_eq!(node.state().queries[0].1, Consistency::Linearizable);

    let reply = call(
        &server,
        Method::POST,
        "/v1/queries?consistency=eventual",
        &[],
        b"get a",
    )
    .await;
    assert_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "consistency must be linearizable, lease or stale, not \"eventual\"",
    );
    let reply = call(
        &server,
        Method::POST,
        "/v1/queries?consistency=lease&consistency=stale",
        &[],
        b"get a",
    )
    .await;
    assert_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "query parameter \"consistency\" is given more than once",
    );
    let reply = call(&server, Method::POST, "/v1/queries?fast=1", &[], b"get a").await;
    assert_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "unknown query parameter \"fast\"; this route takes only \"consistency\"",
    );

    let reply = call(&server, Method::POST, "/v1/queries", &[], b"trap").await;
    assert_error(&reply, StatusCode::UNPROCESSABLE_ENTITY, "fuel exhausted");
    let reply = call(&server, Method::POST, "/v1/queries", &[], b"noquorum").await;
    assert_error(
        &reply,
        StatusCode::SERVICE_UNAVAILABLE,
        "read index round failed: no quorum",
    );
    assert_eq!(reply.header("retry-after"), Some("1"));
    let reply = call(&server, Method::POST, "/v1/queries", &[], b"nomodule").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.header("retry-after"), Some("1"));
    let reply = call(&server, Method::POST, "/v1/queries", &[], &[b'x'; 65]).await;
    assert_error(
        &reply,
        StatusCode::PAYLOAD_TOO_LARGE,
        "the request body is larger than body_bytes_max (64 bytes)",
    );
    server.stop().await;
}

/// A leader (node 1) and a follower (node 2) that knows it, each behind its own server.
async fn leader_and_follower() -> (FakeNode, Server, Server) {
    let leader_node = FakeNode::leader(1);
    let leader = Server::start(leader_node.clone(), config()).await;
    let hint = LeaderHint {
        id: 1,
        http: leader.addr.to_string(),
    };
    let follower = Server::start(FakeNode::new(2, false, Some(hint)), config()).await;
    (leader_node, leader, follower)
}

#[tokio::test]
async fn a_follower_forwards_linearizable_queries_to_the_leader_once() {
    let (leader_node, leader, follower) = leader_and_follower().await;
    call(&leader, Method::POST, "/v1/commands", &[], b"put a 1").await;

    for path in ["/v1/queries", "/v1/queries?consistency=lease"] {
        let reply = call(&follower, Method::POST, path, &[], b"get a").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, Bytes::from_static(b"node 1: get a"));
        assert_eq!(reply.header("paxwasm-applied-index"), Some("1"));
        assert_eq!(reply.header("paxwasm-forwarded-to"), Some("1"));
        assert_eq!(
            reply.header("content-type"),
            Some("application/octet-stream")
        );
    }
    assert_eq!(
        leader_node.state().queries,
        vec![
            (b"get a".to_vec(), Consistency::Linearizable),
            (b"get a".to_vec(), Consistency::Lease),
        ]
    );

    // The leader's errors are relayed as they are.
    let reply = call(&follower, Method::POST, "/v1/queries", &[], b"trap").await;
    assert_error(&reply, StatusCode::UNPROCESSABLE_ENTITY, "fuel exhausted");

    // Stale queries are served where they arrive.
    let reply = call(
        &follower,
        Method::POST,
        "/v1/queries?consistency=stale",
        &[],
        b"get a",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, Bytes::from_static(b"node 2: get a"));
    assert_eq!(reply.header("paxwasm-forwarded-to"), None);

    // Loop guard: a request that was already forwarded is never forwarded again.
    let reply = call(
        &follower,
        Method::POST,
        "/v1/queries",
        &[("paxwasm-forwarded-by", "3")],
        b"get a",
    )
    .await;
    assert_error(
        &reply,
        StatusCode::SERVICE_UNAVAILABLE,
        "this replica is not the leader and the query was already forwarded once (by node 3); retry",
    );
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(leader_node.state().queries.len(), 3);

    // Two followers that each name the other as leader: one hop, then 503.
    let loop_a = FakeNode::new(5, false, None);
    let server_a = Server::start(loop_a.clone(), config()).await;
    let loop_b = FakeNode::new(
        6,
        false,
        Some(LeaderHint {
            id: 5,
            http: server_a.addr.to_string(),
        }),
    );
    let server_b = Server::start(loop_b, config()).await;
    loop_a.state().leader = Some(LeaderHint {
        id: 6,
        http: server_b.addr.to_string(),
    });
    let reply = call(&server_b, Method::POST, "/v1/queries", &[], b"get a").await;
    assert_error(
        &reply,
        StatusCode::SERVICE_UNAVAILABLE,
        "this replica is not the leader and the query was already forwarded once (by node 6); retry",
    );
    assert_eq!(reply.header("paxwasm-forwarded-to"), Some("5"));

    leader.stop().await;
    follower.stop().await;
    server_a.stop().await;
    server_b.stop().await;
}

#[tokio::test]
async fn a_follower_without_a_reachable_leader_answers_503() {
    let no_leader = Server::start(FakeNode::new(2, false, None), config()).await;
    let reply = call(&no_leader, Method::POST, "/v1/queries", &[], b"get a").await;
    assert_error(
        &reply,
        StatusCode::SERVICE_UNAVAILABLE,
        "this replica is not the leader and knows no leader; retry",
    );
    assert_eq!(reply.header("retry-after"), Some("1"));

    // A leader hint pointing at a closed port.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let hint = LeaderHint {
        id: 1,
        http: closed_addr.to_string(),
    };
    let unreachable = Server::start(FakeNode::new(2, false, Some(hint)), config()).await;
    let reply = call(&unreachable, Method::POST, "/v1/queries", &[], b"get a").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.header("retry-after"), Some("1"));
    let message = reply.error_message();
    assert!(
        message.starts_with(&format!(
            "cannot forward the query to the leader (node 1 at {closed_addr}): cannot connect:"
        )),
        "{message}"
    );
    no_leader.stop().await;
    unreachable.stop().await;
}

#[tokio::test]
async fn membership_routes_check_token_path_and_json_and_map_outcomes() {
    let node = FakeNode::leader(1);
    let server = Server::start(node.clone(), config()).await;
    let add = br#"{"id":5,"peer":"127.0.0.1:7105","http":"127.0.0.1:7005"}"#;
    let reply = call(&server, Method::POST, "/v1/cluster/members", &[], add).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = call(&server, Method::DELETE, "/v1/cluster/members/5", &[], b"").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(node.state().changes.is_empty());

    let token = [("authorization", "Bearer s3cret")];
    let reply = call(&server, Method::POST, "/v1/cluster/members", &token, add).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(json_of(&reply)["learners"], json!([4]));
    for (body, message) in [
        (
            &b"{"[..],
            "malformed JSON: EOF while parsing an object at line 1 column 1",
        ),
        (b"[1]", "malformed JSON: expected an object"),
        (
            br#"{"id":-1,"peer":"a","http":"b"}"#,
            "malformed JSON: \"id\" must be an unsigned integer",
        ),
        (
            br#"{"id":5,"http":"b"}"#,
            "malformed JSON: \"peer\" must be a string",
        ),
        (
            br#"{"id":5,"peer":"a","http":"b","x":1}"#,
            "malformed JSON: unknown field \"x\"",
        ),
    ] {
        let reply = call(&server, Method::POST, "/v1/cluster/members", &token, body).await;
        assert_error(
            &reply,
            StatusCode::BAD_REQUEST,
            &format!(
                "{message}; expected {{\"id\":4,\"peer\":\"IP:PORT\",\"http\":\"HOST:PORT\"}}"
            ),
        );
    }
    let reply = call(
        &server,
        Method::POST,
        "/v1/cluster/members/4/promote",
        &token,
        b"",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = call(
        &server,
        Method::DELETE,
        "/v1/cluster/members/3?force=true",
        &token,
        b"",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = call(
        &server,
        Method::POST,
        "/v1/cluster/members/7/promote",
        &token,
        b"",
    )
    .await;
    assert_error(
        &reply,
        StatusCode::CONFLICT,
        "learner 7 lags the leader by 900 entries",
    );
    let reply = call(
        &server,
        Method::DELETE,
        "/v1/cluster/members/8",
        &token,
        b"",
    )
    .await;
    assert_error(
        &reply,
        StatusCode::SERVICE_UNAVAILABLE,
        "no leader is known",
    );
    assert_eq!(reply.header("retry-after"), Some("2"));
    let reply = call(
        &server,
        Method::DELETE,
        "/v1/cluster/members/9",
        &token,
        b"",
    )
    .await;
    // No Idempotency-Key for membership changes: the 504 points to the cluster view.
    assert_error(
        &reply,
        StatusCode::GATEWAY_TIMEOUT,
        "outcome unknown: the membership change may or may not take effect (no outcome); GET /v1/cluster shows the members now: retry the change only if it is not there",
    );
    let reply = call(
        &server,
        Method::DELETE,
        "/v1/cluster/members/x",
        &token,
        b"",
    )
    .await;
    assert_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "the member id must be an unsigned integer, not \"x\"",
    );
    let reply = call(
        &server,
        Method::DELETE,
        "/v1/cluster/members/3?force=yes",
        &token,
        b"",
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let reply = call(&server, Method::GET, "/v1/cluster/members/3", &[], b"").await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.header("allow"), Some("DELETE"));
    let reply = call(
        &server,
        Method::POST,
        "/v1/cluster/members/3/promote/x",
        &token,
        b"",
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(
        node.state().changes,
        vec![
            MemberChange::Add {
                id: 5,
                peer: "127.0.0.1:7105".into(),
                http: "127.0.0.1:7005".into(),
            },
            MemberChange::Promote { id: 4 },
            MemberChange::Remove { id: 3, force: true },
            MemberChange::Promote { id: 7 },
            MemberChange::Remove {
                id: 8,
                force: false
            },
            MemberChange::Remove {
                id: 9,
                force: false
            },
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn set_voters_takes_a_set_of_ids_and_force() {
    let node = FakeNode::leader(1);
    let server = Server::start(node.clone(), config()).await;
    let token = [("authorization", "Bearer s3cret")];
    let reply = call(&server, Method::PUT, "/v1/cluster/voters", &[], b"{}").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let body = br#"{"voters":[4,5,6]}"#;
    let reply = call(&server, Method::PUT, "/v1/cluster/voters", &token, body).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(json_of(&reply)["voters"], json!([1]));
    let reply = call(
        &server,
        Method::PUT,
        "/v1/cluster/voters?force=true",
        &token,
        br#"{"voters":[2,7]}"#,
    )
    .await;
    assert_error(
        &reply,
        StatusCode::CONFLICT,
        "learner 7 lags the leader by 900 entries",
    );
    for (body, reason) in [
        (&br#"{"voters":[]}"#[..], "the voters must not be empty"),
        (
            br#"{"voters":[0,1]}"#,
            "node id 0 is reserved; ids start at 1",
        ),
        (br#"{"voters":[2,2]}"#, "node 2 is listed twice"),
        (
            br#"{"voters":"1,2"}"#,
            "malformed JSON: \"voters\" must be an array of node ids",
        ),
        (
            br#"{"voters":[1],"x":1}"#,
            "malformed JSON: unknown field \"x\"",
        ),
    ] {
        let reply = call(&server, Method::PUT, "/v1/cluster/voters", &token, body).await;
        assert_error(
            &reply,
            StatusCode::BAD_REQUEST,
            &format!("{reason}; expected {{\"voters\":[4,5,6]}}"),
        );
    }
    let reply = call(&server, Method::POST, "/v1/cluster/voters", &token, body).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.header("allow"), Some("PUT"));
    assert_eq!(
        node.state().changes,
        vec![
            MemberChange::SetVoters {
                voters: [4, 5, 6].into_iter().collect(),
                force: false
            },
            MemberChange::SetVoters {
                voters: [2, 7].into_iter().collect(),
                force: true
            },
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn a_follower_forwards_membership_changes_to_the_leader_with_the_token() {
    let (leader_node, leader, follower) = leader_and_follower().await;
    let token = [("authorization", "Bearer s3cret")];
    let reply = call(
        &follower,
        Method::POST,
        "/v1/cluster/members/4/promote",
        &token,
        b"",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("paxwasm-forwarded-to"), Some("1"));
    assert_eq!(json_of(&reply)["voters"], json!([1]));
    let reply = call(
        &follower,
        Method::POST,
        "/v1/cluster/members/7/promote",
        &token,
        b"",
    )
    .await;
    assert_error(
        &reply,
        StatusCode::CONFLICT,
        "learner 7 lags the leader by 900 entries",
    );
    assert_eq!(
        leader_node.state().changes,
        vec![
            MemberChange::Promote { id: 4 },
            MemberChange::Promote { id: 7 }
        ]
    );
    follower.stop().await;
    leader.stop().await;
}

#[tokio::test]
async fn deploy_requires_the_admin_token_and_maps_outcomes() {
    let node = FakeNode::leader(1);
    let server = Server::start(node.clone(), config()).await;
    let module = b"\0asm\x01\0\0\0";

    let reply = call(&server, Method::PUT, "/v1/app", &[], module).await;
    assert_error(
        &reply,
        StatusCode::UNAUTHORIZED,
        "this admin route requires the header Authorization: Bearer <token>",
    );
    assert_eq!(
        reply.header("www-authenticate"),
        Some("Bearer realm=\"paxwasm\"")
    );
    let reply = call(
        &server,
        Method::PUT,
        "/v1/app",
        &[("authorization", "Basic czNjcmV0")],
        module,
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = call(
        &server,
        Method::PUT,
        "/v1/app",
        &[("authorization", "Bearer wrong")],
        module,
    )
    .await;
    assert_error(&reply, StatusCode::FORBIDDEN, "the bearer token is wrong");
    assert!(node.state().app.history.is_empty());

    let reply = call(
        &server,
        Method::PUT,
        "/v1/app",
        &[("authorization", "bearer S3CRET")],
        module,
    )
    .await;
    assert_error(&reply, StatusCode::FORBIDDEN, "the bearer token is wrong");
    assert!(node.state().app.history.is_empty());

    let token = [("authorization", "Bearer s3cret")];
    let reply = call(&server, Method::PUT, "/v1/app", &token, module).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        json_of(&reply),
        json!({ "module": fake_module_id(module), "index": 1 })
    );

    let reply = call(&server, Method::PUT, "/v1/app", &token, b"not wasm").await;
    assert_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "invalid module: bad magic: not a WebAssembly module",
    );

    let failing = b"\0asm\x01\0\0\0no-import";
    let reply = call(
        &server,
        Method::PUT,
        "/v1/app?migrate=true",
        &token,
        failing,
    )
    .await;
    assert_error(
        &reply,
        StatusCode::CONFLICT,
        "migration failed at index 2, the previous module is kept: the new module has no import_state export",
    );
    assert_eq!(reply.header("paxwasm-index"), Some("2"));

    let reply = call(&server, Method::PUT, "/v1/app?migrate=yes", &token, module).await;
    assert_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "migrate must be true or false, not \"yes\"",
    );
    let reply = call(&server, Method::PUT, "/v1/app?migrate", &token, module).await;
    assert_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "query parameter \"migrate\" has no value (expected name=value)",
    );
    let reply = call(&server, Method::PUT, "/v1/app", &token, &[0u8; 257]).await;
    assert_error(
        &reply,
        StatusCode::PAYLOAD_TOO_LARGE,
        "the request body is larger than module_bytes_max (256 bytes)",
    );

    let reply = call(&server, Method::PUT, "/v1/app?migrate=true", &token, module).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        json_of(&reply),
        json!({ "module": fake_module_id(module), "index": 3 })
    );

    let reply = call(&server, Method::GET, "/v1/app", &[], b"").await;
    assert_eq!(reply.status, StatusCode::OK);
    let id = fake_module_id(module);
    assert_eq!(
        json_of(&reply),
        json!({
            "module": id,
            "index": 3,
            "history": [
                { "module": id, "index": 1, "migrated": false, "failed": null },
                { "module": fake_module_id(failing), "index": 2, "migrated": true,
                  "failed": "the new module has no import_state export" },
                { "module": id, "index": 3, "migrated": true, "failed": null },
            ],
        })
    );
    server.stop().await;
}

#[tokio::test]
async fn without_a_token_configured_deploy_is_open() {
    let config = ApiConfig {
        admin_token: None,
        ..config()
    };
    let server = Server::start(FakeNode::leader(1), config).await;
    let reply = call(&server, Method::PUT, "/v1/app", &[], b"\0asm\x01\0\0\0").await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = call(&server, Method::GET, "/v1/app", &[], b"").await;
    assert_eq!(json_of(&reply)["index"], json!(1));
    server.stop().await;
}

#[tokio::test]
async fn status_cluster_and_probes() {
    let node = FakeNode::leader(1);
    let server = Server::start(node.clone(), config()).await;

    let reply = call(&server, Method::GET, "/v1/status", &[], b"").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        json_of(&reply),
        json!({
            "id": 1, "role": "leader", "membership": "voter", "leader": null,
            "ballot": { "round": 3, "node": 1 },
            "commit_index": 0, "applied_index": 0,
            "snapshot_index": 0, "apply_rules": 2, "voting": true,
            "module": null, "state_hash": null,
            "peers": [{ "id": 2, "peer": "127.0.0.1:7102", "http": "127.0.0.1:7002",
                        "connected": true, "chosen_index": 7, "apply_rules_max": 2 }],
            "checkpoint": null,
            "disk": { "free_bytes": 1u64 << 30, "free_bytes_min": 128u64 << 20, "low": false },
        })
    );
    let token = [("authorization", "Bearer s3cret")];
    call(&server, Method::PUT, "/v1/app", &token, b"\0asm").await;
    let reply = call(&server, Method::GET, "/v1/status", &[], b"").await;
    let status = json_of(&reply);
    assert_eq!(status["module"], json!(fake_module_id(b"\0asm")));
    assert_eq!(
        status["state_hash"],
        json!({ "index": 1, "hash": format!("sha256:{:064x}", 0xabc) })
    );

    let reply = call(&server, Method::GET, "/v1/cluster", &[], b"").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        json_of(&reply),
        json!({
            "members": [
                { "id": 1, "role": "voter", "peer": "127.0.0.1:7101", "http": "127.0.0.1:7001" },
                { "id": 4, "role": "learner", "peer": "127.0.0.1:7104", "http": "127.0.0.1:7004" },
            ],
            "leader": 1,
            "voters": [1],
            "old_voters": null,
            "learners": [4],
            "joint": false,
        })
    );

    let reply = call(&server, Method::GET, "/livez", &[], b"").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, Bytes::from_static(b"ok\n"));
    let reply = call(&server, Method::GET, "/readyz", &[], b"").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, Bytes::from_static(b"ready\n"));
    node.state().readiness = Readiness {
        ready: false,
        reason: Some("no leader known".into()),
    };
    let reply = call(&server, Method::GET, "/readyz", &[], b"").await;
    assert_error(
        &reply,
        StatusCode::SERVICE_UNAVAILABLE,
        "not ready: no leader known",
    );
    server.stop().await;
}

#[tokio::test]
async fn metrics_join_node_metrics_and_http_counters() {
    let server = Server::start(FakeNode::leader(1), config()).await;
    call(&server, Method::POST, "/v1/commands", &[], b"put a 1").await;
    call(&server, Method::POST, "/v1/commands", &[], b"trap").await;
    call(&server, Method::GET, "/nowhere", &[], b"").await;
    let reply = call(&server, Method::GET, "/metrics", &[], b"").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for expected in [
        "paxwasm_commits_total 42",
        "paxwasm_http_requests_total{route=\"/v1/commands\",method=\"POST\",code=\"200\"} 1",
        "paxwasm_http_requests_total{route=\"/v1/commands\",method=\"POST\",code=\"422\"} 1",
        "paxwasm_http_requests_total{route=\"unmatched\",method=\"GET\",code=\"404\"} 1",
        "paxwasm_http_request_duration_seconds_bucket{route=\"/v1/commands\",le=\"+Inf\"} 2",
        "paxwasm_http_request_duration_seconds_count{route=\"/v1/commands\"} 2",
    ] {
        assert!(lines.contains(&expected), "missing {expected:?} in\n{text}");
    }
    assert!(
        !text.contains("route=\"/nowhere\""),
        "raw paths never become labels"
    );
    server.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods() {
    let server = Server::start(FakeNode::leader(1), config()).await;
    let reply = call(&server, Method::GET, "/v2/commands", &[], b"").await;
    assert_error(&reply, StatusCode::NOT_FOUND, "no route for /v2/commands");

    for (method, path, allow) in [
        (Method::GET, "/v1/commands", "POST"),
        (Method::PUT, "/v1/queries", "POST"),
        (Method::DELETE, "/v1/app", "GET, PUT"),
        (Method::POST, "/v1/status", "GET"),
        (Method::POST, "/v1/cluster", "GET"),
        (Method::POST, "/livez", "GET"),
        (Method::DELETE, "/readyz", "GET"),
        (Method::PUT, "/metrics", "GET"),
    ] {
        let reply = call(&server, method.clone(), path, &[], b"").await;
        assert_error(
            &reply,
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("method {method} is not allowed on {path}; allowed: {allow}"),
        );
        assert_eq!(reply.header("allow"), Some(allow));
    }
    for path in [
        "/v1/app",
        "/v1/status",
        "/v1/cluster",
        "/livez",
        "/readyz",
        "/metrics",
    ] {
        let reply = call(&server, Method::GET, &format!("{path}?verbose=1"), &[], b"").await;
        assert_error(
            &reply,
            StatusCode::BAD_REQUEST,
            "unknown query parameter \"verbose\"; this route takes none",
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn malformed_http_never_stops_the_server() {
    let node = FakeNode::leader(1);
    let server = Server::start(node, config()).await;

    let answer = raw(&server, b"this is not HTTP\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer:?}"
    );
    let answer = raw(
        &server,
        b"POST /v1/commands HTTP/1.1\r\nhost: t\r\ncontent-length: banana\r\n\r\n",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer:?}"
    );
    // A body shorter than announced, then the client goes away.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/commands HTTP/1.1\r\nhost: t\r\ncontent-length: 50\r\n\r\nput")
        .await
        .unwrap();
    drop(stream);
    // Invalid bytes in a header value and a bearer token that is not ASCII.
    let answer = raw(
        &server,
        b"PUT /v1/app HTTP/1.1\r\nhost: t\r\nauthorization: Bearer \xff\xfe\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 401 Unauthorized\r\n"),
        "{answer:?}"
    );

    let reply = call(&server, Method::POST, "/v1/commands", &[], b"put a 1").await;
    assert_eq!(reply.status, StatusCode::OK, "still serving");
    server.stop().await;
}

#[tokio::test]
async fn keep_alive_serves_many_requests_on_one_connection() {
    let server = Server::start(FakeNode::leader(1), config()).await;
    let mut connection = Connection::new(&server.endpoint(), 1 << 20).unwrap();
    let token = [(AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"))];
    for n in 1..=50u64 {
        let reply = connection
            .request(
                Method::POST,
                "/v1/commands",
                &[],
                Bytes::from(format!("put k{n} v")),
            )
            .await
            .unwrap();
        assert_eq!(reply.header("paxwasm-index"), Some(n.to_string().as_str()));
    }
    let reply = connection
        .request(Method::PUT, "/v1/app", &token, Bytes::from_static(b"\0asm"))
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    server.stop().await;
}

/// Runs the `paxwasm` binary with `args` (and `stdin`), returning exit code, stdout and
/// stderr.
async fn paxwasm(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> (i32, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_paxwasm"));
    command
        .args(args)
        .env_remove("PAXWASM_ENDPOINT")
        .env_remove("PAXWASM_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let stdin = stdin.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &stdin).unwrap();
        let output = child.wait_with_output().unwrap();
        (
            output.status.code().unwrap(),
            String::from_utf8(output.stdout).unwrap(),
            String::from_utf8(output.stderr).unwrap(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn cli_submit_query_and_deploy() {
    let node = FakeNode::leader(1);
    let server = Server::start(node.clone(), config()).await;
    let endpoint = server.endpoint();
    let at = ["--endpoint", endpoint.as_str()];

    let (code, out, err) =
        paxwasm(&[&["submit", "put a 1", "-v"][..], &at].concat(), &[], b"").await;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (0, "OK put a 1\n", "index 1\n")
    );
    let (code, out, _) = paxwasm(&[&["submit"][..], &at].concat(), &[], b"put b 2").await;
    assert_eq!(
        (code, out.as_str()),
        (0, "OK put b 2\n"),
        "command from stdin"
    );
    let (code, out, err) =
        paxwasm(&["submit", "trap"], &[("PAXWASM_ENDPOINT", &endpoint)], b"").await;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (
            1,
            "",
            "error: 422 Unprocessable Entity: trap: unreachable\n"
        )
    );
    let key = ["--idempotency-key", "k1"];
    let first = paxwasm(&[&["submit", "put c 3"][..], &key, &at].concat(), &[], b"").await;
    let again = paxwasm(
        &[&["submit", "put c 3", "-v"][..], &key, &at].concat(),
        &[],
        b"",
    )
    .await;
    assert_eq!((first.0, again.0, again.2.as_str()), (0, 0, "index 4\n"));

    let (code, out, err) = paxwasm(
        &[&["query", "get a", "--consistency", "stale", "-v"][..], &at].concat(),
        &[],
        b"",
    )
    .await;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (0, "node 1: get a\n", "applied index 4\n")
    );
    assert_eq!(node.state().queries.last().unwrap().1, Consistency::Stale);

    let dir = std::env::temp_dir().join(format!("paxwasm-api-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let module = dir.join("app.wasm");
    std::fs::write(&module, b"\0asm\x01\0\0\0").unwrap();
    let module = module.to_str().unwrap();
    let (code, _, err) = paxwasm(&[&["deploy", module][..], &at].concat(), &[], b"").await;
    assert_eq!(
        (code, err.as_str()),
        (1, "error: 401 Unauthorized: this admin route requires the header Authorization: Bearer <token>\n")
    );
    let (code, out, _) = paxwasm(
        &[&["deploy", module, "--migrate"][..], &at].concat(),
        &[("PAXWASM_TOKEN", "s3cret")],
        b"",
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        json!({ "module": fake_module_id(b"\0asm\x01\0\0\0"), "index": 5 })
    );
    assert!(node.state().app.history[0].migrated);
    let (code, _, err) = paxwasm(&["deploy", "/nonexistent/app.wasm"], &[], b"").await;
    assert_eq!(code, 1);
    assert!(
        err.starts_with("error: cannot read /nonexistent/app.wasm: "),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    server.stop().await;
}

#[tokio::test]
async fn cli_members_lists_adds_promotes_and_removes() {
    let node = FakeNode::leader(1);
    let server = Server::start(node.clone(), config()).await;
    let endpoint = server.endpoint();
    let at = ["--endpoint", endpoint.as_str()];
    let token = [("PAXWASM_TOKEN", "s3cret")];

    let (code, out, _) = paxwasm(&[&["members", "list"][..], &at].concat(), &[], b"").await;
    assert_eq!(code, 0);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec![
            "ID     ROLE       PEER                   HTTP                  ",
            "1*     voter      127.0.0.1:7101         127.0.0.1:7001        ",
            "4      learner    127.0.0.1:7104         127.0.0.1:7004        ",
            "voters {1} learners {4} (* leader)",
        ]
    );
    let add = [
        "members",
        "add",
        "5",
        "--peer",
        "127.0.0.1:7105",
        "--http",
        "h:5",
    ];
    let (code, _, err) = paxwasm(&[&add[..], &at].concat(), &[], b"").await;
    assert_eq!(code, 1);
    assert!(err.starts_with("error: 401 Unauthorized"), "{err}");
    let (code, out, _) = paxwasm(&[&add[..], &at, &["--json"]].concat(), &token, b"").await;
    assert_eq!(code, 0);
    let view: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(view["joint"], json!(false));
    let (code, _, err) = paxwasm(
        &[&["members", "promote", "7"][..], &at].concat(),
        &token,
        b"",
    )
    .await;
    assert_eq!(
        (code, err.as_str()),
        (
            1,
            "error: 409 Conflict: learner 7 lags the leader by 900 entries\n"
        )
    );
    let (code, _, _) = paxwasm(
        &[&["members", "remove", "3", "--force"][..], &at].concat(),
        &token,
        b"",
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(
        node.state().changes,
        vec![
            MemberChange::Add {
                id: 5,
                peer: "127.0.0.1:7105".into(),
                http: "h:5".into(),
            },
            MemberChange::Promote { id: 7 },
            MemberChange::Remove { id: 3, force: true },
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn cli_status_all_reads_every_member() {
    let first = FakeNode::leader(1);
    let server = Server::start(first.clone(), config()).await;
    let second = FakeNode::new(2, false, None);
    let second_server = Server::start(second.clone(), config()).await;
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let member = |id, http: String| MemberView {
        id,
        role: "voter".into(),
        peer: format!("127.0.0.1:{}", 7100 + id),
        http,
    };
    first.state().members = vec![
        member(1, server.addr.to_string()),
        member(2, second_server.addr.to_string()),
        member(3, closed_addr.clone()),
    ];
    let endpoint = server.endpoint();
    let at = ["--endpoint", endpoint.as_str()];

    let (code, out, _) = paxwasm(&[&["status", "--all"][..], &at].concat(), &[], b"").await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 7, "{out}");
    let row = |line: &str| -> Vec<String> {
        line.split('|').map(|cell| cell.trim().to_owned()).collect()
    };
    assert_eq!(
        row(lines[1])[1..11],
        [
            "ENDPOINT",
            "ID",
            "ROLE",
            "LEADER",
            "BALLOT",
            "COMMIT INDEX",
            "APPLIED INDEX",
            "MODULE",
            "STATE HASH",
            "ERRORS"
        ]
    );
    assert_eq!(
        row(lines[3])[1..11],
        [
            endpoint.as_str(),
            "1",
            "leader",
            "-",
            "3.1",
            "0",
            "0",
            "-",
            "-",
            ""
        ]
    );
    assert_eq!(row(lines[4])[2..4], ["2", "follower"]);
    let unreachable = row(lines[5]);
    assert_eq!(unreachable[1], format!("http://{closed_addr}"));
    assert!(unreachable[10].starts_with("cannot connect"), "{out}");

    let (code, out, _) = paxwasm(
        &[&["status", "--all", "--json"][..], &at].concat(),
        &[],
        b"",
    )
    .await;
    assert_eq!(code, 0);
    let rows: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 3);
    assert_eq!(rows[0]["status"]["role"], json!("leader"));
    assert_eq!(rows[1]["status"]["id"], json!(2));
    assert_eq!(rows[2]["status"], Value::Null);
    assert!(rows[2]["error"]
        .as_str()
        .unwrap()
        .starts_with("cannot connect"));

    let (code, out, _) = paxwasm(&[&["status", "--json"][..], &at].concat(), &[], b"").await;
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["id"], json!(1));
    server.stop().await;
    second_server.stop().await;
}

#[tokio::test]
async fn cli_bench_sends_kv_puts_of_the_requested_size() {
    // One connection per client, then six clients pipelined over two connections.
    for (clients, connections, shared) in [
        (3, None, ""),
        (6, Some(2), " over 2 connections (pipelined)"),
    ] {
        let node = FakeNode::leader(1);
        let server = Server::start(node.clone(), config()).await;
        let endpoint = server.endpoint();
        let clients_arg = clients.to_string();
        let mut args = vec!["bench", "--clients", &clients_arg];
        let connections_arg = connections.map(|n: u32| n.to_string());
        if let Some(connections) = &connections_arg {
            args.extend(["--connections", connections]);
        }
        args.extend(["--duration", "1", "--size", "48", "--endpoint", &endpoint]);
        let (code, out, err) = paxwasm(&args, &[], b"").await;
        assert_eq!(code, 0, "{out}{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            format!("bench: {clients} clients{shared}, 1 s, 48-byte commands against {endpoint}")
        );
        assert!(
            lines[1].starts_with("requests    ") && lines[1].contains(" ok, 0 errors in "),
            "{out}"
        );
        assert!(lines[2].starts_with("throughput  "), "{out}");
        assert!(lines[3].starts_with("latency     p50 "), "{out}");
        assert_eq!(lines[4], "errors      none");
        assert!(err.contains("ok"), "a progress line each second: {err}");
        let applied = node.state().applied.clone();
        assert!(!applied.is_empty());
        assert!(applied
            .iter()
            .all(|command| command.len() == 48 && command.starts_with(b"put k")));
        for client in 0..clients {
            let first = format!("put k{client}-0 ");
            assert!(
                applied
                    .iter()
                    .any(|command| command.starts_with(first.as_bytes())),
                "client {client}"
            );
        }
        server.stop().await;
    }
}

/// A plain command request as a client pipelines it.
fn command_request(payload: &str) -> String {
    format!(
        "POST /v1/commands HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n{payload}",
        payload.len()
    )
}

/// Reads `count` responses (each with a `content-length`) from `stream`, in order, and
/// whatever was read after them.
async fn read_responses(
    stream: &mut (impl AsyncRead + Unpin),
    count: usize,
) -> (Vec<probe::Response>, Vec<u8>) {
    let mut buffer = Vec::new();
    let mut responses = Vec::new();
    while responses.len() < count {
        if let Some((response, used)) = probe::parse_next(&buffer).unwrap() {
            responses.push(response);
            buffer.drain(..used);
            continue;
        }
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .expect("the next response within 5 s")
            .unwrap();
        assert!(read > 0, "closed after {} responses", responses.len());
        buffer.extend_from_slice(&chunk[..read]);
    }
    (responses, buffer)
}

#[tokio::test]
async fn pipelined_commands_are_submitted_at_once_and_answered_in_request_order() {
    let node = FakeNode::leader(1);
    let server = Server::start(node.clone(), config()).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // `gate` is answered only after `open`, which comes after it on the same connection:
    // served one request at a time, this connection would never answer.
    let pipeline = [
        command_request("gate"),
        command_request("open"),
        command_request("put k v"),
    ]
    .concat();
    stream.write_all(pipeline.as_bytes()).await.unwrap();
    let (responses, rest) = read_responses(&mut stream, 3).await;
    assert!(rest.is_empty());
    let bodies: Vec<String> = responses.iter().map(probe::Response::text).collect();
    assert_eq!(bodies, ["OK gate", "OK open", "OK put k v"]);
    assert!(responses.iter().all(|response| response.status == 200));
    // `open` was submitted while `gate` waited, so it was decided first.
    let index = |n: usize| {
        let index = responses[n].header("paxwasm-index").unwrap();
        index.parse::<u64>().unwrap()
    };
    assert!(index(1) < index(0), "{responses:?}");
    // The connection stays open for more.
    stream
        .write_all(command_request("put k w").as_bytes())
        .await
        .unwrap();
    assert_eq!(
        read_responses(&mut stream, 1).await.0[0].text(),
        "OK put k w"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_pipeline_goes_to_hyper_at_its_first_other_request_and_answers_stay_in_order() {
    let server = Server::start(FakeNode::leader(1), config()).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // A command served concurrently, a route that is not a command, then a command hyper
    // serves (the connection is hyper's now), an oversized one and a malformed request.
    let pipeline = [
        command_request("put a 1"),
        "GET /livez HTTP/1.1\r\nhost: t\r\n\r\n".to_owned(),
        command_request("put b 2"),
        command_request(&"x".repeat(65)),
        "NOT HTTP\r\n\r\n".to_owned(),
    ]
    .concat();
    stream.write_all(pipeline.as_bytes()).await.unwrap();
    let (responses, mut rest) = read_responses(&mut stream, 4).await;
    let summary: Vec<(u16, String)> = responses
        .iter()
        .map(|response| (response.status, response.text()))
        .collect();
    assert_eq!(
        summary,
        [
            (200, "OK put a 1".to_owned()),
            (200, "ok\n".to_owned()),
            (200, "OK put b 2".to_owned()),
            (
                413,
                "{\"error\":\"the request body is larger than body_bytes_max (64 bytes)\"}\n"
                    .to_owned()
            ),
        ]
    );
    // The malformed request gets hyper's refusal and the connection closes.
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("closed after the malformed request")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{rest}"
    );
    // The command answered here and the one hyper answered carry the same headers.
    let names = |n: usize| {
        let mut names: Vec<&str> = responses[n]
            .headers
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        names.sort_unstable();
        names
    };
    assert_eq!(names(0), names(2));
    assert_eq!(
        names(0),
        ["content-length", "content-type", "date", "paxwasm-index"]
    );
    assert_eq!(
        responses[0].header("content-type"),
        responses[2].header("content-type")
    );
    let reply = call(&server, Method::GET, "/livez", &[], b"").await;
    assert_eq!(reply.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_answers_the_pipelined_commands_already_read() {
    let node = FakeNode::leader(1);
    let server = Server::start(node.clone(), config()).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(command_request("gate").as_bytes())
        .await
        .unwrap();
    // Wait until the command is in, then stop the server while it waits.
    tokio::time::timeout(Duration::from_secs(5), async {
        while Arc::strong_count(&node.state().gate) == 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the gated command arrives");
    let stopped = tokio::spawn(server.stop());
    tokio::time::sleep(Duration::from_millis(50)).await;
    node.state().gate.notify_one();
    let (responses, mut rest) = read_responses(&mut stream, 1).await;
    assert_eq!(responses[0].text(), "OK gate");
    assert_eq!(responses[0].header("connection"), Some("close"));
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("the connection closes after its answers")
        .unwrap();
    assert!(rest.is_empty());
    stopped.await.unwrap();
}

#[tokio::test]
async fn shutdown_keeps_the_last_answers_when_more_requests_were_sent() {
    let node = FakeNode::leader(1);
    let server = Server::start(node.clone(), config()).await;
    // A small receive buffer, so that answers wait in the server's send queue.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    let mut stream = socket.connect(server.addr).await.unwrap();
    let pipeline = [
        command_request("gate"),
        command_request(&"x".repeat(60)).repeat(59),
    ]
    .concat();
    stream.write_all(pipeline.as_bytes()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while Arc::strong_count(&node.state().gate) == 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the gated command arrives");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stopped = tokio::spawn(server.stop());
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Requests the stopping server will not read. Closing a socket with unread input
    // makes the kernel reset the connection and drop what it has not sent yet.
    let more = command_request("put late 1").repeat(20);
    stream.write_all(more.as_bytes()).await.unwrap();
    node.state().gate.notify_one();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (responses, _) = read_responses(&mut stream, 60).await;
    assert_eq!(responses[0].text(), "OK gate");
    assert!(responses.iter().all(|response| response.status == 200));
    stopped.await.unwrap();
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let config = ApiConfig {
        header_read_timeout_ms: 200,
        ..config()
    };
    let server = Server::start(FakeNode::leader(1), config).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/commands HTTP/1.1\r\nhost: t\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    assert!(closed.is_ok(), "the server closes the connection");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{answer:?}"
    );
    let reply = call(&server, Method::GET, "/livez", &[], b"").await;
    assert_eq!(reply.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_header_read_timeout() {
    let config = ApiConfig {
        header_read_timeout_ms: 300,
        ..config()
    };
    let server = Server::start(FakeNode::leader(1), config).await;
    // One that never sends a byte, and one that goes quiet after a command: both hold
    // a connection slot, so both are closed (as hyper closes idle keep-alive ones).
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut quiet = TcpStream::connect(server.addr).await.unwrap();
    quiet
        .write_all(command_request("put k v").as_bytes())
        .await
        .unwrap();
    let (responses, _) = read_responses(&mut quiet, 1).await;
    assert_eq!(responses[0].text(), "OK put k v");
    for stream in [&mut silent, &mut quiet] {
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "closed after the header read timeout");
        assert!(rest.is_empty(), "{rest:?}");
    }
    server.stop().await;
}

/// Sends `requests` over and over on one connection, far more answers than the socket
/// buffers hold, and reads none of them: the server must close the connection once its
/// writes made no progress for `request_timeout_ms`, and go on serving others.
async fn assert_a_client_that_never_reads_is_disconnected(requests: String) {
    let config = ApiConfig {
        request_timeout_ms: 300,
        ..config()
    };
    let server = Server::start(FakeNode::leader(1), config).await;
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let sending = tokio::spawn(async move {
        for _ in 0..2_000 {
            if writer.write_all(requests.as_bytes()).await.is_err() {
                break;
            }
        }
        // Keep the connection open from this side.
        std::future::pending::<()>().await;
        drop(writer);
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Once the server gave up on it, the connection ends after what was buffered (a
    // server still waiting to write would go on answering once this reads, and close
    // only after header_read_timeout, 10 s).
    let mut answers = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        let mut chunk = vec![0u8; 1 << 16];
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(read) => answers.extend_from_slice(&chunk[..read]),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection is closed by the server");
    // (Closed with requests unread, the server's end resets, which may drop answers.)
    assert!(answers.is_empty() || answers.starts_with(b"HTTP/1.1 200 OK\r\n"));
    sending.abort();
    let reply = call(&server, Method::GET, "/livez", &[], b"").await;
    assert_eq!(reply.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_pipelines_and_never_reads_is_disconnected() {
    assert_a_client_that_never_reads_is_disconnected(command_request(&"x".repeat(64)).repeat(50))
        .await;
}

/// The same through hyper (requests other than commands).
#[tokio::test]
async fn a_client_that_never_reads_answers_from_hyper_is_disconnected() {
    assert_a_client_that_never_reads_is_disconnected(
        "GET /v1/status HTTP/1.1\r\nhost: t\r\n\r\n".repeat(100),
    )
    .await;
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_answered_408_and_the_connection_closed() {
    let config = ApiConfig {
        body_read_timeout_ms: 300,
        ..config()
    };
    let server = Server::start(FakeNode::leader(1), config).await;
    // A partial body after a pipelined command (the pipelined path) and after a request
    // hyper serves (a query), and a partial module upload (hyper, admin route).
    let stalled_command =
        "POST /v1/commands HTTP/1.1\r\nhost: t\r\ncontent-length: 50\r\n\r\nput k";
    let stalled_query = "POST /v1/queries HTTP/1.1\r\nhost: t\r\ncontent-length: 50\r\n\r\nget k";
    let stalled_upload = "PUT /v1/app HTTP/1.1\r\nhost: t\r\nauthorization: Bearer s3cret\r\ncontent-length: 200\r\n\r\n\0asm";
    let cases = [
        (
            format!("{}{stalled_command}", command_request("put a 1")),
            200,
        ),
        (
            format!("GET /livez HTTP/1.1\r\nhost: t\r\n\r\n{stalled_query}"),
            200,
        ),
        (stalled_upload.to_owned(), 0),
    ];
    for (sent, first_status) in cases {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(sent.as_bytes()).await.unwrap();
        let count = if first_status == 0 { 1 } else { 2 };
        let started = std::time::Instant::now();
        let (responses, rest) = read_responses(&mut stream, count).await;
        if first_status != 0 {
            assert_eq!(responses[0].status, first_status, "{sent:?}");
        }
        let timed_out = responses.last().unwrap();
        assert_eq!(timed_out.status, 408, "{sent:?}: {:?}", timed_out.text());
        assert!(
            timed_out.text().contains("body_read_timeout_ms (300 ms)"),
            "{:?}",
            timed_out.text()
        );
        assert_eq!(timed_out.header("connection"), Some("close"), "{sent:?}");
        assert!(started.elapsed() >= Duration::from_millis(300), "{sent:?}");
        assert!(rest.is_empty(), "{rest:?}");
        let mut after = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut after)).await;
        assert!(
            closed.is_ok() && after.is_empty(),
            "{sent:?}: closed after the 408"
        );
    }
    let reply = call(&server, Method::GET, "/livez", &[], b"").await;
    assert_eq!(reply.status, StatusCode::OK);
    server.stop().await;
}

/// The body timeout counts the client's time only: while a full pipeline is not read,
/// more of a body waits in the socket, and the body gets a fresh window once the server
/// reads again (the body here is shorter than `body_progress_bytes_min`, so it must
/// end within one window).
#[tokio::test]
async fn a_body_the_server_did_not_read_for_a_while_is_not_timed_out() {
    let config = ApiConfig {
        body_read_timeout_ms: 300,
        pipeline_depth_max: 1,
        ..config()
    };
    let node = FakeNode::leader(1);
    let server = Server::start(node.clone(), config).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // `gate` fills the pipeline; the next command's head and part of its body come
    // with it, more of the body 100 ms later (unread: the pipeline is full).
    let second = command_request("put k 0123456789");
    let (head_and_part, rest) = second.split_at(second.len() - 8);
    let (more, last) = rest.split_at(4);
    stream
        .write_all(format!("{}{head_and_part}", command_request("gate")).as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.write_all(more.as_bytes()).await.unwrap();
    // The server reads nothing more until `gate` is answered, well after the window
    // the body started in; the body ends 150 ms into the window that follows.
    tokio::time::sleep(Duration::from_millis(700)).await;
    node.state().gate.notify_one();
    let (responses, _) = read_responses(&mut stream, 1).await;
    assert_eq!(responses[0].text(), "OK gate");
    tokio::time::sleep(Duration::from_millis(150)).await;
    stream.write_all(last.as_bytes()).await.unwrap();
    let (responses, _) = read_responses(&mut stream, 1).await;
    assert_eq!(responses[0].status, 200, "{:?}", responses[0].text());
    assert_eq!(responses[0].text(), "OK put k 0123456789");
    server.stop().await;
}

/// Pipelined bodies get a window each: the read that ends one body and starts the next
/// restarts the window, however few bytes it brought. (The first command is `gate`, so
/// no answer is written meanwhile, which would restart the window too.)
#[tokio::test]
async fn each_pipelined_body_gets_a_window_of_its_own() {
    let config = ApiConfig {
        body_read_timeout_ms: 400,
        ..config()
    };
    let node = FakeNode::leader(1);
    let server = Server::start(node.clone(), config).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let first = command_request("gate");
    let second = command_request("put b 0123456789");
    let (first_part, first_rest) = first.split_at(first.len() - 2);
    let (second_part, second_rest) = second.split_at(second.len() - 4);
    stream.write_all(first_part.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    stream
        .write_all(format!("{first_rest}{second_part}").as_bytes())
        .await
        .unwrap();
    // 500 ms after the first body's window began, 250 ms into the second's.
    tokio::time::sleep(Duration::from_millis(250)).await;
    stream.write_all(second_rest.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    node.state().gate.notify_one();
    let (responses, _) = read_responses(&mut stream, 2).await;
    let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200], "{:?}", responses[1].text());
    server.stop().await;
}

/// A body must bring `body_progress_bytes_min` bytes (or its end) in every
/// `body_read_timeout_ms`: 4 bytes every 100 ms do (12 bytes in 300 ms restart a
/// 600 ms window), and the body is read to the end after the first window; 1 byte
/// every 100 ms does not (6 bytes in a window), on either path, although bytes keep
/// coming.
#[tokio::test]
async fn a_slow_body_is_read_to_the_end_and_a_trickle_is_answered_408() {
    let config = ApiConfig {
        body_read_timeout_ms: 600,
        body_progress_bytes_min: 12,
        ..config()
    };
    let server = Server::start(FakeNode::leader(1), config).await;
    let body = "put slow 0123456789abcdefghijk";
    let heads = [
        format!("POST /v1/commands HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n", body.len()),
        format!("GET /livez HTTP/1.1\r\nhost: t\r\n\r\nPOST /v1/queries HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n", body.len()),
    ];
    for (piece_bytes, status) in [(4, 200), (1, 408)] {
        for head in &heads {
            let stream = TcpStream::connect(server.addr).await.unwrap();
            let (mut reader, mut writer) = stream.into_split();
            writer.write_all(head.as_bytes()).await.unwrap();
            let sending = tokio::spawn(async move {
                for piece in body.as_bytes().chunks(piece_bytes) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    // After a 408 the server has closed: the rest is refused.
                    if writer.write_all(piece).await.is_err() {
                        break;
                    }
                }
                writer
            });
            let count = if head.starts_with("GET") { 2 } else { 1 };
            let (responses, _) = read_responses(&mut reader, count).await;
            let last = responses.last().unwrap();
            assert_eq!(
                last.status,
                status,
                "{piece_bytes}-byte pieces, {head:?}: {:?}",
                last.text()
            );
            drop(sending.await.unwrap());
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn connections_above_connections_max_wait_for_a_free_slot() {
    let config = ApiConfig {
        connections_max: 1,
        ..config()
    };
    let server = Server::start(FakeNode::leader(1), config).await;
    let mut first = Connection::new(&server.endpoint(), 1 << 20).unwrap();
    let reply = first
        .request(Method::GET, "/livez", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);

    let endpoint = server.endpoint();
    let second = tokio::spawn(async move {
        let mut second = Connection::new(&endpoint, 1 << 20).unwrap();
        second
            .request(Method::GET, "/livez", &[], Bytes::new())
            .await
            .unwrap()
            .status
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "served only after the first closes");
    drop(first);
    let status = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("served once the slot is free")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn the_flip_byte_test_hook_does_not_exist_without_test_hooks() {
    let server = Server::start(FakeNode::leader(1), config()).await;
    for (method, path) in [
        (Method::POST, "/v1/debug/flip-byte?offset=0"),
        (Method::POST, "/v1/debug/flip-byte"),
        (Method::GET, "/v1/debug/flip-byte"),
    ] {
        let reply = call(&server, method, path, &[], b"").await;
        assert_error(
            &reply,
            StatusCode::NOT_FOUND,
            "no route for /v1/debug/flip-byte",
        );
    }
    server.stop().await;
}
