//! `paxwasm dev`: a local cluster of separate `paxwasm node` processes on loopback.
//!
//! Node N (1-based) serves HTTP on 127.0.0.1:(7000+N) and peers on 127.0.0.1:(7100+N),
//! keeps its data in DIR/node-N and logs to DIR/node-N.log. The admin bearer token is
//! `--token` / `PAXWASM_TOKEN`, else the one saved in DIR/admin-token (generated on the
//! first run). Running it again resumes from the same data; the kv example is deployed
//! only when no module is deployed yet.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::node::probe;

/// First HTTP port: node N listens on `HTTP_PORT_BASE + N`.
pub const HTTP_PORT_BASE: u16 = 7000;
/// First peer port: node N listens on `PEER_PORT_BASE + N`.
pub const PEER_PORT_BASE: u16 = 7100;
/// Cluster name of dev clusters.
pub const DEV_CLUSTER_ID: &str = "paxwasm-dev";
/// How long the cluster may take to elect a leader and become ready.
const READY_TIMEOUT_MS: u64 = 60_000;
/// How long children get to stop after SIGTERM before they are killed.
const STOP_GRACE_MS: u64 = 10_000;
const NODES_MAX: u16 = 9;
/// Deploy attempts while the first leader settles.
const DEPLOY_ATTEMPTS_MAX: usize = 10;

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Number of replicas (1 to 9).
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// Directory for the replicas' data and logs.
    #[arg(long, default_value = "./paxwasm-dev")]
    pub dir: PathBuf,
    /// Admin bearer token (default: DIR/admin-token, generated on first run).
    #[arg(long, env = "PAXWASM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// State-hash checkpoint every K applied entries (passed to every replica).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_entries: Option<u64>,
    /// Each replica snapshots (and compacts its log) every N applied entries.
    #[arg(long, default_value_t = super::node::DEFAULT_SNAPSHOT_ENTRIES, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_entries: u64,
}

pub fn run(args: DevArgs) -> ExitCode {
    match dev(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("paxwasm dev: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn http_addr(node: u16) -> String {
    format!("127.0.0.1:{}", HTTP_PORT_BASE + node)
}

fn peer_addr(node: u16) -> String {
    format!("127.0.0.1:{}", PEER_PORT_BASE + node)
}

fn dev(args: DevArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.nodes > NODES_MAX {
        bail!("--nodes must be between 1 and {NODES_MAX}");
    }
    fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("resolving {}", args.dir.display()))?;
    println!("paxwasm dev: building or finding the example modules ...");
    let kv = crate::examples::example_module("kv").context("building the kv example")?;
    let token_file = dir.join("admin-token");
    let token = admin_token(args.token.clone(), &token_file)?;

    let cluster: Vec<String> = (1..=args.nodes)
        .map(|n| format!("{n}={}", peer_addr(n)))
        .collect();
    let cluster = cluster.join(",");
    let exe = std::env::current_exe().context("finding the paxwasm executable")?;
    if let Some(entries) = args.checkpoint_entries {
        // The replicas inherit the environment; `paxwasm node` reads this variable for
        // `--checkpoint-entries`. No other thread runs yet, so setting it is sound.
        std::env::set_var("PAXWASM_CHECKPOINT_ENTRIES", entries.to_string());
    }
    let mut children = Vec::new();
    for n in 1..=args.nodes {
        match spawn_node(&exe, &dir, n, &cluster, &token, args.snapshot_entries) {
            Ok(child) => children.push((n, child)),
            Err(error) => {
                stop_all(&mut children);
                return Err(error);
            }
        }
    }
    let result = supervise(&args, &dir, &kv, &token, &token_file, &mut children);
    stop_all(&mut children);
    result
}

fn admin_token(given: Option<String>, file: &Path) -> anyhow::Result<String> {
    if let Some(token) = given {
        return Ok(token);
    }
    if let Ok(saved) = fs::read_to_string(file) {
        let saved = saved.trim().to_string();
        if !saved.is_empty() {
            return Ok(saved);
        }
    }
    // Not a secret against a determined local attacker, only a guard against mistakes:
    // dev clusters listen on loopback.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut rng = crate::paxos::SplitMix64::new(nanos ^ (u64::from(std::process::id()) << 20));
    let token = format!("{:016x}{:016x}", rng.next_u64(), rng.next_u64());
    fs::write(file, format!("{token}\n")).with_context(|| format!("writing {}", file.display()))?;
    Ok(token)
}

fn spawn_node(
    exe: &Path,
    dir: &Path,
    n: u16,
    cluster: &str,
    token: &str,
    snapshot_entries: u64,
) -> anyhow::Result<Child> {
    let log_path = dir.join(format!("node-{n}.log"));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let child = Command::new(exe)
        .arg("node")
        .args(["--id", &n.to_string()])
        .arg("--data")
        .arg(dir.join(format!("node-{n}")))
        .args(["--http", &http_addr(n)])
        .args(["--peer", &peer_addr(n)])
        .args(["--cluster", cluster])
        .args(["--cluster-id", DEV_CLUSTER_ID])
        .args(["--snapshot-entries", &snapshot_entries.to_string()])
        .env("PAXWASM_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting node {n}"))?;
    Ok(child)
}

fn supervise(
    args: &DevArgs,
    dir: &Path,
    kv: &Path,
    token: &str,
    token_file: &Path,
    children: &mut [(u16, Child)],
) -> anyhow::Result<()> {
    let stop = install_stop_flag()?;
    println!(
        "paxwasm dev: starting {} replicas in {} ...",
        args.nodes,
        dir.display()
    );
    wait_ready(args.nodes, dir, children, stop)?;
    let endpoint = http_addr(1);
    let app = probe::request(
        &endpoint,
        "GET",
        "/v1/app",
        &[],
        b"",
        Duration::from_secs(10),
    )
    .context("asking node 1 for the deployed module")?;
    let deployed: serde_json::Value = serde_json::from_slice(&app.body).unwrap_or_default();
    if deployed["module"].is_null() {
        let module = fs::read(kv).with_context(|| format!("reading {}", kv.display()))?;
        deploy(&endpoint, &module, token)?;
    } else {
        println!(
            "paxwasm dev: resuming; module already deployed: {}",
            deployed["module"]
        );
    }
    print_help(args.nodes, dir, kv, token_file);
    loop {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            println!("\npaxwasm dev: stopping the replicas ...");
            return Ok(());
        }
        for (n, child) in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "node {n} exited ({status}); see {}",
                    dir.join(format!("node-{n}.log")).display()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Deploys through `endpoint`. Right after the first election the leader may still
/// change, and an in-flight deploy is then answered 503/504 (outcome unknown): look
/// whether it took effect before trying again.
fn deploy(endpoint: &str, module: &[u8], token: &str) -> anyhow::Result<()> {
    let auth = format!("Bearer {token}");
    for _attempt in 0..DEPLOY_ATTEMPTS_MAX {
        let reply = probe::request(
            endpoint,
            "PUT",
            "/v1/app",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/wasm"),
            ],
            module,
            Duration::from_secs(60),
        )
        .context("deploying kv")?;
        match reply.status {
            200 => {
                println!("paxwasm dev: deployed kv: {}", reply.text().trim());
                return Ok(());
            }
            503 | 504 => {
                std::thread::sleep(Duration::from_millis(500));
                let app = probe::request(
                    endpoint,
                    "GET",
                    "/v1/app",
                    &[],
                    b"",
                    Duration::from_secs(10),
                )
                .context("asking node 1 for the deployed module")?;
                let app: serde_json::Value = serde_json::from_slice(&app.body).unwrap_or_default();
                if app["module"].is_string() {
                    println!("paxwasm dev: deployed kv: {}", app["module"]);
                    return Ok(());
                }
            }
            status => bail!("deploying kv failed: {status} {}", reply.text()),
        }
    }
    bail!("deploying kv failed {DEPLOY_ATTEMPTS_MAX} times (no stable leader?)")
}

fn wait_ready(
    nodes: u16,
    dir: &Path,
    children: &mut [(u16, Child)],
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(READY_TIMEOUT_MS);
    let mut ready = vec![false; nodes as usize];
    let mut why_not = vec![String::new(); nodes as usize];
    while ready.iter().any(|r| !r) {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            bail!("interrupted before the cluster was ready");
        }
        if Instant::now() > deadline {
            let reasons: Vec<String> = why_not
                .iter()
                .enumerate()
                .filter(|(i, _)| !ready[*i])
                .map(|(i, why)| format!("node {}: {why}", i + 1))
                .collect();
            bail!(
                "the cluster was not ready within {} s ({}); see the logs in {}",
                READY_TIMEOUT_MS / 1000,
                reasons.join("; "),
                dir.display()
            );
        }
        for (n, child) in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "node {n} exited ({status}) while starting; see {}",
                    dir.join(format!("node-{n}.log")).display()
                );
            }
            let answer = probe::request(
                &http_addr(*n),
                "GET",
                "/readyz",
                &[],
                b"",
                Duration::from_secs(2),
            );
            // A replica a membership change removed never becomes ready; the others
            // serve without it.
            ready[*n as usize - 1] = matches!(&answer, Ok(reply) if reply.status == 200
                || reply.text().contains(crate::node::REMOVED_READINESS));
            why_not[*n as usize - 1] = match answer {
                Ok(reply) => reply.text().trim().to_string(),
                Err(error) => error.to_string(),
            };
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn print_help(nodes: u16, dir: &Path, kv: &Path, token_file: &Path) {
    let http: Vec<String> = (1..=nodes).map(http_addr).collect();
    // The CLI lines name this very binary: after `cargo run` it is not on PATH.
    let exe = std::env::current_exe()
        .map(|path| path.display().to_string())
        .unwrap_or_else(|_| "paxwasm".to_string());
    println!();
    println!("Paxwasm dev cluster is up: {nodes} replicas.");
    for n in 1..=nodes {
        println!(
            "  node {n}: http://{}  peer {}  data {}  log {}",
            http_addr(n),
            peer_addr(n),
            dir.join(format!("node-{n}")).display(),
            dir.join(format!("node-{n}.log")).display()
        );
    }
    println!();
    println!("Try it (kv: put K V | get K | del K):");
    println!(
        "  curl -s -X POST http://{}/v1/commands --data-binary 'put greeting hello'",
        http[0]
    );
    println!("  curl -s -X POST 'http://{}/v1/queries?consistency=linearizable' --data-binary 'get greeting'", http[http.len().min(2) - 1]);
    println!("  curl -s http://{}/v1/status", http[0]);
    println!("  {exe} submit 'put color blue'");
    println!("  {exe} query 'get color'");
    println!("  {exe} status --all");
    println!();
    println!(
        "Admin routes need the bearer token (set with --token or PAXWASM_TOKEN; saved in {}):",
        token_file.display()
    );
    println!(
        "  curl -s -X PUT http://{}/v1/app -H \"Authorization: Bearer $(cat {})\" --data-binary @{}",
        http[0],
        token_file.display(),
        kv.display()
    );
    println!(
        "  PAXWASM_TOKEN=$(cat {}) {exe} deploy {}",
        token_file.display(),
        kv.display()
    );
    println!();
    println!("Ctrl-C stops all replicas; running `paxwasm dev` again resumes from the same data.");
}

/// A flag set by SIGINT or SIGTERM.
fn install_stop_flag() -> anyhow::Result<&'static std::sync::atomic::AtomicBool> {
    use std::sync::atomic::AtomicBool;
    static STOP: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_signal(_: libc::c_int) {
        STOP.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_signal` only stores to an atomic, which is async-signal-safe, and
        // the handler is a plain `extern "C" fn` that lives for the whole program.
        let previous = unsafe {
            libc::signal(
                signal,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
        if previous == libc::SIG_ERR {
            bail!("cannot install a handler for signal {signal}");
        }
    }
    Ok(&STOP)
}

/// SIGTERM to every child still running, then wait; kill what does not stop in time.
fn stop_all(children: &mut [(u16, Child)]) {
    for (_, child) in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            let pid = child.id() as libc::pid_t;
            // SAFETY: `kill` has no memory effects; `pid` is our own child, not yet
            // reaped (try_wait said it is running), so the id cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + Duration::from_millis(STOP_GRACE_MS);
    for (n, child) in children.iter_mut() {
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    eprintln!("paxwasm dev: node {n} did not stop in time; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    println!("paxwasm dev: all replicas stopped.");
}
