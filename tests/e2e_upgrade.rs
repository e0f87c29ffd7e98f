//! End to end: module upgrades through the log with three real `paxwasm node` processes
//! on loopback. One cluster, in phases:
//! 1. deploy kv; clients write their own keys continuously; upgrade kv → kv_v2 with
//!    `?migrate=true` while they write; every acknowledged key reads back through v2
//!    (`get K`, and `version K` answers, which only v2 knows), and all replicas reach
//!    the same state hash at the same index;
//! 2. an upgrade whose `paxwasm_import_state` traps gets 409 with the reason; every
//!    replica keeps kv_v2 and its state, and `GET /v1/app` lists the failed attempt;
//! 3. a module written by hand in WAT (no SDK) is deployed, takes a command and answers a
//!    query;
//! 4. the same module padded with a 4 MiB custom section is deployed while clients write:
//!    command latency before and during the deploy is printed (`cargo test --test
//!    e2e_upgrade -- --nocapture`), and commands must keep completing during it.
//!
//! Other clusters: replicas that cannot compile or compile slowly, and apply rules
//! (how commands become Wasm calls) across a rolling upgrade of the binary.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use paxwasm::node::probe::{self, Response};
use support::{
    converged, get, leader, submit, wait_until, Acked, Cluster, Writers, REQUEST_TIMEOUT,
};

const NODES: usize = 3;
const CLIENTS: usize = 4;
/// Size of the custom section that pads the large module. (A data segment of this size
/// is what the brief suggested, but the machine refuses it by panicking the validating
/// node: instantiation meters data-segment initialisation with a fixed
/// `INSTANTIATION_FUEL` and treats running out as a host failure. Reported; not this
/// branch's module.)
const PADDING_BYTES: usize = 4 << 20;

/// A counter written by hand: the state is an i64 at address 0 of memory (the sum of
/// the lengths of all commands) and an i64 at address 8 (their number); `apply` and
/// `query` answer both as 16 little-endian bytes.
const COUNTER_WAT: &str = r#"
(module
  (memory (export "memory") 1)
  (func (export "paxwasm_alloc") (param $len i32) (result i32)
    (i32.const 1024))
  (func (export "paxwasm_apply") (param $ptr i32) (param $len i32) (result i64)
    (i64.store (i32.const 0)
      (i64.add (i64.load (i32.const 0)) (i64.extend_i32_u (local.get $len))))
    (i64.store (i32.const 8) (i64.add (i64.load (i32.const 8)) (i64.const 1)))
    ;; (out_ptr << 32) | out_len with out_ptr = 0 and out_len = 16
    (i64.const 16))
  (func (export "paxwasm_query") (param $ptr i32) (param $len i32) (result i64)
    (i64.const 16))
)
"#;

/// Exports the migration hook, which traps: an upgrade to it with `?migrate=true` must
/// fail on every replica the same way.
const TRAPPING_IMPORT_WAT: &str = r#"
(module
  (memory (export "memory") 1)
  (func (export "paxwasm_alloc") (param $len i32) (result i32)
    (i32.const 1024))
  (func (export "paxwasm_apply") (param $ptr i32) (param $len i32) (result i64)
    (i64.const 0))
  (func (export "paxwasm_import_state") (param $ptr i32) (param $len i32)
    unreachable)
)
"#;

/// The counter module, followed by a custom section of `padding_bytes` varied bytes
/// when that is not 0.
fn counter_module(padding_bytes: usize) -> Vec<u8> {
    let mut module = wat::parse_str(COUNTER_WAT).unwrap();
    if padding_bytes > 0 {
        let name = b"padding";
        let mut body = leb128(name.len());
        body.extend_from_slice(name);
        body.extend((0..padding_bytes).map(|i| (i * 7 + i / 251) as u8));
        module.push(0); // custom section id
        module.extend(leb128(body.len()));
        module.extend(body);
    }
    module
}

fn leb128(mut value: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

fn start(dir: &Path) -> Cluster {
    start_with(dir, |_| &[])
}

/// Starts the nodes, node `i` with the extra arguments `extra(i)`.
fn start_with(dir: &Path, extra: impl Fn(usize) -> &'static [&'static str]) -> Cluster {
    let mut cluster = Cluster::new(dir, NODES, NODES, "e2e-upgrade", &[]);
    for i in 0..NODES {
        cluster.spawn(i, extra(i));
    }
    cluster
}

fn json(reply: &Response) -> serde_json::Value {
    serde_json::from_slice(&reply.body).unwrap()
}

fn module_id(module: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let hex: String = Sha256::digest(module)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

fn put_app(cluster: &Cluster, addr: &str, module: &[u8], migrate: bool) -> Response {
    let path = if migrate {
        "/v1/app?migrate=true"
    } else {
        "/v1/app"
    };
    probe::request(addr, "PUT", path, &[], module, Duration::from_secs(60))
        .unwrap_or_else(|error| panic!("PUT {path} to {addr}: {error}\n{}", cluster.log_tail()))
}

/// What a deploy came to: the status (200 or 409), the slot, and the module id (200) or
/// the reason (409).
struct Deployed {
    status: u16,
    index: u64,
    text: String,
}

/// `PUT /v1/app`. An answer without an outcome (503/504: e.g. the leader changed while
/// the deploy was in flight, which the load and a replica's compile wait can cause on
/// this shared machine) is resolved from `GET /v1/app` once the replicas caught up:
/// the module became current, or its attempt is recorded as failed; otherwise the PUT
/// is repeated (its chunks are duplicates, harmless).
fn deploy(cluster: &Cluster, addr: &str, module: &[u8], migrate: bool) -> Deployed {
    let id = module_id(module);
    for _attempt in 0..5 {
        let reply = put_app(cluster, addr, module, migrate);
        match reply.status {
            200 => {
                let body = json(&reply);
                return Deployed {
                    status: 200,
                    index: body["index"].as_u64().unwrap(),
                    text: body["module"].as_str().unwrap().to_string(),
                };
            }
            409 => {
                return Deployed {
                    status: 409,
                    index: reply.header("paxwasm-index").unwrap().parse().unwrap(),
                    text: json(&reply)["error"].as_str().unwrap().to_string(),
                }
            }
            503 | 504 => println!(
                "deploy of {id}: {} {}; resolving it from GET /v1/app",
                reply.status,
                reply.text()
            ),
            other => panic!("deploy of {id}: {other} {}", reply.text()),
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            let Some(app) = get(addr, "/v1/app").filter(|r| r.status == 200) else {
                continue;
            };
            let app = json(&app);
            let history = app["history"].as_array().unwrap();
            if let Some(event) = history.iter().rev().find(|e| e["module"] == id) {
                let index = event["index"].as_u64().unwrap();
                return match event["failed"].as_str() {
                    None => Deployed {
                        status: 200,
                        index,
                        text: id,
                    },
                    Some(reason) => Deployed {
                        status: 409,
                        index,
                        text: reason.to_string(),
                    },
                };
            }
        }
    }
    panic!("{id} could not be deployed\n{}", cluster.log_tail());
}

/// Waits up to 30 s for node `i`'s process to exit (a halt); its exit status.
fn wait_for_exit(cluster: &mut Cluster, i: usize) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let child = cluster.nodes[i].child.as_mut().unwrap();
        if let Some(status) = child.try_wait().unwrap() {
            cluster.nodes[i].child = None;
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "node {} did not halt\n{}",
            cluster.nodes[i].id,
            cluster.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn query(addr: &str, query: &[u8]) -> Response {
    probe::request(addr, "POST", "/v1/queries", &[], query, REQUEST_TIMEOUT).unwrap()
}

/// `(count, p50, p99, max)` latency in ms of the writes sent within `[from, to)`.
fn latency(acked: &[Acked], from: Instant, to: Instant) -> (usize, f64, f64, f64) {
    let mut ms: Vec<f64> = acked
        .iter()
        .filter(|a| a.sent >= from && a.sent < to)
        .map(|a| a.latency.as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    if ms.is_empty() {
        return (0, 0.0, 0.0, 0.0);
    }
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    (ms.len(), at(0.5), at(0.99), *ms.last().unwrap())
}

#[test]
fn upgrades_travel_through_the_log_under_load() {
    let started = Instant::now();
    let kv = std::fs::read(paxwasm::examples::example_module("kv").expect("build kv")).unwrap();
    let kv_v2 =
        std::fs::read(paxwasm::examples::example_module("kv_v2").expect("build kv_v2")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = start(dir.path());
    let addrs = cluster.addrs();
    let first = wait_until("a leader", &cluster, Duration::from_secs(30), || {
        leader(&cluster)
    });
    let entry = &addrs[(first + 1) % NODES];

    // 1. kv, then kv → kv_v2 with migration while clients write.
    let deployed = deploy(&cluster, entry, &kv, false);
    assert_eq!((deployed.status, deployed.text), (200, module_id(&kv)));
    let writers = Writers::start(addrs.clone(), CLIENTS, |seq| format!("v{seq}"));
    writers.wait_for_acks(&cluster, "client writes", 0, 200);
    let deployed = deploy(&cluster, entry, &kv_v2, true);
    assert_eq!((deployed.status, &deployed.text), (200, &module_id(&kv_v2)));
    let upgrade_index = deployed.index;
    let acked_at_upgrade = writers.acks();
    writers.wait_for_acks(&cluster, "client writes", acked_at_upgrade, 200);
    let keys = writers.stop();
    for (key, value) in &keys {
        let addr = &addrs[key.len() % NODES];
        let reply = query(addr, format!("get {key}").as_bytes());
        assert_eq!(reply.status, 200, "{key}: {}", reply.text());
        assert_eq!(reply.text(), *value, "{key}");
        let reply = query(addr, format!("version {key}").as_bytes());
        assert_eq!(reply.text(), "1", "{key} was written once");
    }
    let (index, hash) = wait_until("convergence", &cluster, Duration::from_secs(30), || {
        converged(&cluster)
    });
    println!(
        "kv → kv_v2 at slot {upgrade_index} under load: {} acknowledged keys read back \
         through v2; all replicas at index {index}, state {hash}",
        keys.len()
    );
    for (i, addr) in addrs.iter().enumerate() {
        let app = json(&get(addr, "/v1/app").unwrap());
        assert_eq!(app["module"], module_id(&kv_v2), "node {}", i + 1);
        assert_eq!(app["index"], upgrade_index, "node {}", i + 1);
    }

    // 2. A migration that traps: 409 with the reason, kv_v2 stays everywhere.
    let trapping = wat::parse_str(TRAPPING_IMPORT_WAT).unwrap();
    let deployed = deploy(&cluster, &addrs[first], &trapping, true);
    assert_eq!(deployed.status, 409, "{}", deployed.text);
    let reason = deployed.text;
    assert!(reason.contains("trap: unreachable"), "{reason}");
    let failed_index = deployed.index;
    wait_until("convergence", &cluster, Duration::from_secs(30), || {
        converged(&cluster).filter(|(index, _)| *index >= failed_index)
    });
    for (i, addr) in addrs.iter().enumerate() {
        let app = json(&get(addr, "/v1/app").unwrap());
        assert_eq!(app["module"], module_id(&kv_v2), "node {}", i + 1);
        let last = app["history"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["module"], module_id(&trapping));
        assert_eq!(last["index"], failed_index);
        assert_eq!(last["migrated"], true);
        assert!(
            last["failed"].as_str().unwrap().contains("unreachable"),
            "{last}"
        );
    }
    let (key, value) = keys.iter().next().unwrap();
    assert_eq!(
        query(&addrs[0], format!("get {key}").as_bytes()).text(),
        *value
    );
    let reply = submit(&addrs[1], b"put after-trap yes", "after-trap").unwrap();
    assert_eq!((reply.status, reply.text()), (200, "OK".to_string()));
    assert_eq!(query(&addrs[2], b"version after-trap").text(), "1");
    println!("a trapping migration at slot {failed_index}: 409 \"{reason}\"");

    // 3. A hand-written WAT module as the app.
    let counter = counter_module(0);
    let deployed = deploy(&cluster, entry, &counter, false);
    assert_eq!((deployed.status, deployed.text), (200, module_id(&counter)));
    let reply = submit(entry, b"hello", "wat-1").unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let counted = |sum: u64, count: u64| [sum.to_le_bytes(), count.to_le_bytes()].concat();
    assert_eq!(reply.body, counted(5, 1));
    assert_eq!(query(&addrs[first], b"").body, counted(5, 1));

    // 4. A 4 MiB module deployed while clients write.
    let large = counter_module(PADDING_BYTES);
    let writers = Writers::start(addrs.clone(), CLIENTS, |seq| format!("v{seq}"));
    writers.wait_for_acks(&cluster, "client writes", 0, 100);
    let before = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let deploy_started = Instant::now();
    let deployed = deploy(&cluster, entry, &large, false);
    let deploy_ended = Instant::now();
    assert_eq!((deployed.status, deployed.text), (200, module_id(&large)));
    let large_index = deployed.index;
    std::thread::sleep(Duration::from_millis(500));
    // The app is the counter now: its outputs are not kv's `OK`.
    let acked = writers.stop_all();
    let (n_before, p50_before, p99_before, max_before) = latency(&acked, before, deploy_started);
    let (n_during, p50_during, p99_during, max_during) =
        latency(&acked, deploy_started, deploy_ended);
    println!(
        "{} byte module deployed in {} ms (switch at slot {large_index}); \
         writes in the second before: {n_before}, p50 {p50_before:.1} ms, p99 \
         {p99_before:.1} ms, max {max_before:.1} ms; writes during the deploy: \
         {n_during}, p50 {p50_during:.1} ms, p99 {p99_during:.1} ms, max {max_during:.1} ms",
        large.len(),
        (deploy_ended - deploy_started).as_millis()
    );
    assert!(
        n_during > 0,
        "no write completed during the deploy of a large module"
    );
    let (index, hash) = wait_until("convergence", &cluster, Duration::from_secs(30), || {
        converged(&cluster).filter(|(index, _)| *index >= large_index)
    });
    for (i, addr) in addrs.iter().enumerate() {
        let app = json(&get(addr, "/v1/app").unwrap());
        assert_eq!(app["module"], module_id(&large), "node {}", i + 1);
        assert!(
            cluster
                .log_of(i)
                .contains("module compiled in the background"),
            "node {}",
            i + 1
        );
    }
    // How long each replica's core waited at each upgrade slot for its own compile.
    for i in 0..NODES {
        let waits: Vec<String> = cluster
            .log_of(i)
            .lines()
            .filter(|line| line.contains("upgrade entry applied"))
            .filter_map(|line| {
                let field = |name: &str| {
                    let start = line.find(&format!("{name}="))? + name.len() + 1;
                    line[start..].split(' ').next().map(str::to_string)
                };
                Some(format!(
                    "slot {}: {} us",
                    field("slot")?,
                    field("compile_wait_us")?
                ))
            })
            .collect();
        println!("node {} compile waits at upgrade slots: {waits:?}", i + 1);
    }
    println!(
        "all replicas at index {index}, state {hash}; test took {} s",
        started.elapsed().as_secs()
    );
}

/// A replica that cannot compile a chosen module (made so by a hidden test hook: its
/// background compiles fail) halts at the upgrade slot with a clear line and a non-zero
/// exit status, rather than skipping the entry; the other two go on.
#[test]
fn a_replica_that_cannot_compile_a_chosen_module_halts() {
    let kv = std::fs::read(paxwasm::examples::example_module("kv").expect("build kv")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = start_with(dir.path(), |i| {
        if i == 2 {
            &["--debug-refuse-compiles"]
        } else {
            &[]
        }
    });
    let addrs = cluster.addrs();
    wait_until("a leader", &cluster, Duration::from_secs(30), || {
        leader(&cluster)
    });
    let deployed = deploy(&cluster, &addrs[0], &kv, false);
    assert_eq!((deployed.status, &deployed.text), (200, &module_id(&kv)));
    let status = wait_for_exit(&mut cluster, 2);
    assert_eq!(status.code(), Some(70), "{}", cluster.log_tail());
    let log = cluster.log_of(2);
    let line = format!(
        "paxwasm: HALT: module {}, chosen at slot {}, does not compile on this replica: \
         compilation refused by the test hook --debug-refuse-compiles",
        module_id(&kv),
        deployed.index
    );
    assert!(log.contains(&line), "{log}");
    // The other two still form a quorum with the module installed. If the halted
    // replica led, the first attempt can time out (504) or find no leader (503)
    // while the others elect one: retry with the same key, as a client would.
    let deadline = Instant::now() + Duration::from_secs(30);
    let reply = loop {
        let reply = submit(&addrs[0], b"put a 1", "after-halt").unwrap();
        if !matches!(reply.status, 503 | 504) || Instant::now() > deadline {
            break reply;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!((reply.status, reply.text()), (200, "OK".to_string()));
    assert_eq!(query(&addrs[1], b"get a").text(), "1");
}

/// A replica that reaches the upgrade slot before its own compile of the module is done
/// pauses applying only: its core task goes on (it keeps learning commits), and it
/// applies the held slots, in order, once the compile ends. Before, the core task waited
/// for the compile and stopped everything. A follower's hold costs nobody their leader;
/// a leader held for over a second steps aside for one that can apply.
#[test]
fn a_slow_compile_pauses_applying_but_not_consensus() {
    const DELAY_MS: u64 = 3_000;
    let kv = std::fs::read(paxwasm::examples::example_module("kv").expect("build kv")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = start_with(dir.path(), |i| {
        if i == 2 {
            &["--debug-compile-delay-ms", "3000"]
        } else {
            &[]
        }
    });
    let addrs = cluster.addrs();
    let leader_before = wait_until("a leader", &cluster, Duration::from_secs(30), || {
        support::leader_id(&cluster)
    });
    let changes_before: Vec<u64> = addrs
        .iter()
        .map(|addr| support::metric(addr, "paxwasm_leader_changes_total").unwrap())
        .collect();
    // Through node 1: its deploy waits for its own compile, not node 3's.
    let deployed = deploy(&cluster, &addrs[0], &kv, false);
    assert_eq!((deployed.status, &deployed.text), (200, &module_id(&kv)));
    let upgrade_slot = deployed.index;
    let started = Instant::now();

    // While node 3 compiles, the others commit more; node 3 learns those commits
    // without applying past the upgrade slot.
    let mut held_seen = false;
    let mut n = 0;
    while started.elapsed() < Duration::from_millis(DELAY_MS / 2) {
        // A held leader steps aside after a second: a command caught in that election
        // is retried with its key, as a client would.
        wait_until("a put", &cluster, Duration::from_secs(30), || {
            let reply = submit(&addrs[0], format!("put k{n} v{n}"), &format!("k{n}")).ok()?;
            (reply.status == 200).then_some(())
        });
        n += 1;
        let status = support::status(&addrs[2]).unwrap();
        let (applied, commit) = (
            status["applied_index"].as_u64().unwrap(),
            status["commit_index"].as_u64().unwrap(),
        );
        if applied < upgrade_slot && commit >= upgrade_slot + 5 {
            held_seen = true;
            let readyz = get(&addrs[2], "/readyz").unwrap();
            assert_eq!(readyz.status, 503);
            assert!(
                readyz
                    .text()
                    .contains("applying waits for this replica's compile of module"),
                "{}",
                readyz.text()
            );
        }
    }
    assert!(
        held_seen,
        "node 3 never showed commits past the held upgrade slot {upgrade_slot}\n{}",
        cluster.log_tail()
    );
    let (index, _) = wait_until("converged", &cluster, Duration::from_secs(30), || {
        converged(&cluster)
    });
    assert!(index >= upgrade_slot + n as u64, "{index}");
    assert_eq!(query(&addrs[2], b"get k0").text(), "v0");
    let log = cluster.log_of(2);
    assert!(
        log.contains("the upgrade slot waits for this replica's compile of the module")
            && log.contains("compile done: applying the held slots"),
        "{log}"
    );
    let slow = cluster.nodes[2].id;
    println!("the slow replica led: {}", leader_before == slow);
    if leader_before == slow {
        // It stepped aside while held: the others saw another leader.
        assert!(
            support::metric(&addrs[0], "paxwasm_leader_changes_total").unwrap() > changes_before[0],
            "{}",
            cluster.log_tail()
        );
        let log = cluster.log_of(0);
        assert!(
            log.lines().any(|line| line.contains("leader changed")
                && !line.contains(&format!("leader=Some({slow})"))),
            "{log}"
        );
    }
    // (A held follower costs its leader nothing, with or without the hold: that case
    // is covered by the commits it learned while held, above.)
}

/// A rolling upgrade of the paxwasm binary. How a replica turns a log entry's commands
/// into Wasm calls shows in the state (batch calls leave other bytes in memory than
/// one call per command), so it is replicated as apply rules, and the leader raises
/// them only to what every member says it implements. Node 3 plays an older build
/// (`--apply-rules-max 1`): under load the cluster keeps rules 1, no replica makes a
/// batch call, and all reach the same state hash. Node 3 restarted as the new build:
/// the rules rise to 2 at one slot on every replica, runs of commands go in batch
/// calls, every acknowledged write reads back and the hashes agree. Node 3 started as
/// the older build again finds rules 2 in its newest snapshot and halts (exit 70),
/// keeping the file, rather than apply differently from its peers.
#[test]
fn apply_rules_rise_only_when_every_member_implements_them() {
    let kv = std::fs::read(paxwasm::examples::example_module("kv").expect("build kv")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    const OLDER_BUILD: &[&str] = &["--apply-rules-max", "1", "--snapshot-entries", "50"];
    const THIS_BUILD: &[&str] = &["--snapshot-entries", "50"];
    let mut cluster = start_with(
        dir.path(),
        |i| if i == 2 { OLDER_BUILD } else { THIS_BUILD },
    );
    let addrs = cluster.addrs();
    support::deploy_through_leader(&cluster, &kv);
    let rules_everywhere = |cluster: &Cluster, rules: u64| {
        cluster.nodes.iter().all(|node| {
            support::status(&node.http).is_some_and(|s| s["apply_rules"].as_u64() == Some(rules))
        })
    };
    let batch_calls = |addr: &str| support::metric(addr, "paxwasm_apply_batch_calls_total");

    let writers = Writers::start(addrs.clone(), 8, |seq| format!("v{seq}"));
    writers.wait_for_acks(&cluster, "writes under rules 1", 0, 300);
    // The leader has heard node 3's peer info (every 500 ms) several times by now.
    wait_until(
        "node 3's rules heard by node 1",
        &cluster,
        Duration::from_secs(10),
        || {
            let status = support::status(&addrs[0])?;
            let peers = status["peers"].as_array()?.clone();
            let node_3 = peers.iter().find(|p| p["id"].as_u64() == Some(3))?;
            (node_3["apply_rules_max"].as_u64() == Some(1)).then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(rules_everywhere(&cluster, 1), "{}", cluster.log_tail());
    for addr in &addrs {
        assert_eq!(
            batch_calls(addr),
            Some(0),
            "{addr} made a batch call under rules 1"
        );
    }

    // The upgrade of node 3 to this build.
    cluster.kill(2);
    cluster.spawn(2, THIS_BUILD);
    wait_until(
        "apply rules 2 on every replica",
        &cluster,
        Duration::from_secs(30),
        || rules_everywhere(&cluster, 2).then_some(()),
    );
    let raised_by = support::status(&addrs[2]).unwrap()["applied_index"]
        .as_u64()
        .unwrap();
    let since = writers.acks();
    writers.wait_for_acks(&cluster, "writes under rules 2", since, 300);
    wait_until(
        "a snapshot of node 3 under rules 2",
        &cluster,
        Duration::from_secs(30),
        || {
            let snapshot = support::status(&addrs[2])?["snapshot_index"].as_u64()?;
            (snapshot > raised_by).then_some(())
        },
    );
    let acknowledged = writers.stop();
    let (index, _) = support::wait_converged(&cluster);
    for addr in &addrs {
        assert!(
            batch_calls(addr).unwrap() > 0,
            "{addr} made no batch call under rules 2\n{}",
            cluster.log_tail()
        );
    }
    // Every replica applied everything chosen (converged): a stale read is complete.
    for (key, value) in &acknowledged {
        let reply = support::query_stale(&addrs[1], format!("get {key}").as_bytes());
        assert_eq!((reply.status, reply.text()), (200, value.clone()), "{key}");
    }
    for log in [cluster.log_of(0), cluster.log_of(1), cluster.log_of(2)] {
        assert_eq!(log.matches("apply rules raised").count(), 1, "{log}");
    }

    // Back to the older build: it cannot restore its newest snapshot.
    let snapshots_before = std::fs::read_dir(cluster.data_dir(2).join("snapshots"))
        .unwrap()
        .count();
    cluster.kill(2);
    cluster.spawn(2, OLDER_BUILD);
    let status = wait_for_exit(&mut cluster, 2);
    assert_eq!(status.code(), Some(70), "{}", cluster.log_tail());
    let log = cluster.log_of(2);
    assert!(
        log.contains("paxwasm: HALT: the snapshot of slot")
            && log.contains("puts apply rules 2 in force; this host implements rules 1 to 1"),
        "{log}"
    );
    // Kept for the newer build: nothing was set aside as corrupt.
    let snapshots = std::fs::read_dir(cluster.data_dir(2).join("snapshots"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect::<Vec<_>>();
    assert_eq!(snapshots.len(), snapshots_before, "{snapshots:?}");
    assert!(
        snapshots.iter().all(|name| !name.contains("corrupt")),
        "{snapshots:?}"
    );
    assert!(index > 0);
}

/// A learner of an older build added after the cluster raised its apply rules joins
/// from a snapshot taken under rules it does not implement: it halts (exit 70) with
/// the reason instead of following the log differently. (The leader never raises
/// past a member; a learner added later is the case its check cannot prevent.)
#[test]
fn a_learner_of_an_older_build_added_after_the_raise_halts() {
    let kv = std::fs::read(paxwasm::examples::example_module("kv").expect("build kv")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::new(dir.path(), NODES + 1, NODES, "e2e-upgrade", &[]);
    for i in 0..NODES {
        cluster.spawn(i, &["--snapshot-entries", "20"]);
    }
    let addrs: Vec<String> = cluster.addrs()[..NODES].to_vec();
    support::deploy_through_leader(&cluster, &kv);
    wait_until(
        "apply rules 2 on the members",
        &cluster,
        Duration::from_secs(30),
        || {
            addrs
                .iter()
                .all(|addr| {
                    support::status(addr).is_some_and(|s| s["apply_rules"].as_u64() == Some(2))
                })
                .then_some(())
        },
    );
    let writers = Writers::start(addrs.clone(), 4, |seq| format!("v{seq}"));
    writers.wait_for_acks(&cluster, "writes under rules 2", 0, 100);

    let learner = NODES;
    cluster.spawn_with(
        learner,
        None,
        &["--apply-rules-max", "1", "--snapshot-entries", "20"],
    );
    let body = serde_json::json!({
        "id": cluster.nodes[learner].id,
        "peer": cluster.nodes[learner].peer,
        "http": cluster.nodes[learner].http,
    })
    .to_string();
    let mut attempt = 0;
    wait_until(
        "the learner added",
        &cluster,
        Duration::from_secs(30),
        || {
            attempt += 1;
            let reply = probe::request(
                &addrs[attempt % NODES],
                "POST",
                "/v1/cluster/members",
                &[],
                body.as_bytes(),
                REQUEST_TIMEOUT,
            )
            .ok()?;
            (reply.status == 200).then_some(())
        },
    );
    // The writers go on, so a snapshot newer than the addition is taken for it.
    let status = wait_for_exit(&mut cluster, learner);
    writers.stop();
    assert_eq!(status.code(), Some(70), "{}", cluster.log_tail());
    let log = cluster.log_of(learner);
    assert!(
        log.contains("paxwasm: HALT: the snapshot of slot")
            && log.contains("puts apply rules 2 in force; this host implements rules 1 to 1"),
        "{log}"
    );
}
