//! `paxwasm node`: one replica process (core, store, peer transport and HTTP API).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use tokio::net::{TcpListener, TcpSocket};

use crate::api::{self, ApiConfig};
use crate::node::checkpoint::CHECKPOINT_ENTRIES_DEFAULT;
use crate::node::{self, NodeConfig};
use crate::paxos::NodeId;

/// Cluster name used when `--cluster-id` is not given.
pub const DEFAULT_CLUSTER_ID: &str = "paxwasm";

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// This replica's id (a positive integer, unique in the cluster, stable forever).
    #[arg(long)]
    pub id: NodeId,
    /// Data directory (created if missing); holds the acceptor store.
    #[arg(long)]
    pub data: PathBuf,
    /// Address of the HTTP API, e.g. 127.0.0.1:7001.
    #[arg(long)]
    pub http: SocketAddr,
    /// Address peers connect to, e.g. 127.0.0.1:7101.
    #[arg(long)]
    pub peer: SocketAddr,
    /// Every voter's peer address, this node included: `1=ADDR,2=ADDR,3=ADDR`. Without
    /// it the node waits to be added by a membership change (`POST /v1/cluster/members`
    /// on a member), then starts from a snapshot of the first member that contacts it;
    /// give it the cluster's `--cluster-id`.
    #[arg(long, value_parser = parse_cluster)]
    pub cluster: Option<Members>,
    /// Name of the cluster; a data directory or peer of another cluster is refused.
    #[arg(long, default_value = DEFAULT_CLUSTER_ID)]
    pub cluster_id: String,
    /// Bearer token required by admin routes (`PUT /v1/app`).
    #[arg(long, env = "PAXWASM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Largest command or query body in bytes (413 above).
    #[arg(long, default_value_t = 1024 * 1024)]
    pub body_bytes_max: usize,
    /// Length of one consensus tick in milliseconds (election timeout is 20–40 ticks).
    #[arg(long, default_value_t = 10)]
    pub tick_ms: u64,
    /// HTTP address announced to peers and clients, if not the listen address.
    #[arg(long)]
    pub advertise_http: Option<String>,
    /// State-hash checkpoint every K applied entries: replicas compare their hashes and
    /// one in the minority stops serving reads.
    #[arg(long, env = "PAXWASM_CHECKPOINT_ENTRIES", default_value_t = CHECKPOINT_ENTRIES_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_entries: u64,
    /// Enables test-only routes that damage this replica on purpose
    /// (`POST /v1/debug/flip-byte?offset=N`). Never use in production.
    #[arg(long)]
    pub test_hooks: bool,
    /// Test hook: a replica whose state diverged waits this long before it asks the
    /// majority for a snapshot.
    #[arg(long, default_value_t = 0, hide = true)]
    pub checkpoint_repair_delay_ms: u64,
    /// Snapshot the state (and compact the log below it) every N applied entries.
    #[arg(long, default_value_t = DEFAULT_SNAPSHOT_ENTRIES, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_entries: u64,
    /// Also snapshot once this many bytes of commands were applied since the last one.
    #[arg(long, default_value_t = DEFAULT_SNAPSHOT_LOG_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_log_bytes: u64,
    /// Throttle of snapshot transfers to peers, in bytes per second (all peers together).
    #[arg(long, default_value_t = DEFAULT_SNAPSHOT_TRANSFER_BYTES_PER_SEC, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_transfer_bytes_per_sec: u64,
    /// This member's data directory was lost: start it empty with this flag. It restores
    /// the state from its peers (snapshot transfer) but never votes again under this id,
    /// because it forgot the promises and accepts it gave. To get a voter back, remove
    /// this id and add a node started on an empty directory under a new id instead.
    #[arg(long)]
    pub rejoin: bool,
    /// A learner more than this many chosen entries behind the leader is not promoted
    /// to voter (`POST /v1/cluster/members/{id}/promote` answers 409 until it catches up).
    #[arg(long, default_value_t = crate::paxos::Params::default().learner_lag_entries_max)]
    pub learner_lag_entries_max: u64,
    /// Below this many free bytes on the data directory's filesystem, this replica stops
    /// taking part in writes (it answers commands, deploys and membership changes with
    /// 507, neither accepts nor leads) and keeps serving reads; it resumes once more
    /// than an eighth above it is free again. 0 turns the check off.
    #[arg(long, default_value_t = crate::node::config::DISK_FREE_BYTES_MIN_DEFAULT)]
    pub disk_free_bytes_min: u64,
    /// Test hook: pause this long in the middle of every snapshot write (after the
    /// temporary file is written, before it is synced and renamed).
    #[arg(long, default_value_t = 0, hide = true)]
    pub snapshot_write_pause_ms: u64,
    /// Test hook: every background compile of an uploaded module fails on this replica,
    /// which must then halt at the upgrade slot rather than skip it.
    #[arg(long, hide = true)]
    pub debug_refuse_compiles: bool,
    /// Test hook: every background compile of an uploaded module takes this many
    /// milliseconds longer on this replica.
    #[arg(long, default_value_t = 0, hide = true)]
    pub debug_compile_delay_ms: u64,
    /// Apply the log with apply rules up to this number only, as an older paxwasm
    /// would (rules say how commands become Wasm calls; 1: one call per command, 2:
    /// a run of a log entry's commands in one call). The leader raises the cluster's
    /// rules to the highest every member implements, so this holds a whole cluster
    /// back; a replica that meets higher rules in the log stops (exit 70).
    #[arg(long, default_value_t = crate::node::app::APPLY_RULES_MAX,
          value_parser = clap::value_parser!(u32).range(1..=crate::node::app::APPLY_RULES_MAX as i64))]
    pub apply_rules_max: u32,
}

/// `--snapshot-entries` default.
pub const DEFAULT_SNAPSHOT_ENTRIES: u64 = 10_000;
/// `--snapshot-log-bytes` default: 64 MiB.
pub const DEFAULT_SNAPSHOT_LOG_BYTES: u64 = 64 * 1024 * 1024;
/// `--snapshot-transfer-bytes-per-sec` default: 64 MiB/s.
pub const DEFAULT_SNAPSHOT_TRANSFER_BYTES_PER_SEC: u64 = 64 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct Members(pub BTreeMap<NodeId, SocketAddr>);

fn parse_cluster(text: &str) -> Result<Members, String> {
    let mut members = BTreeMap::new();
    for part in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}` is not ID=ADDR"))?;
        let id: NodeId = id
            .trim()
            .parse()
            .map_err(|_| format!("`{id}` is not a node id"))?;
        if id == 0 {
            return Err("node id 0 is reserved".into());
        }
        let addr: SocketAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{addr}` is not a socket address (HOST:PORT)"))?;
        if members.insert(id, addr).is_some() {
            return Err(format!("node id {id} is listed twice"));
        }
    }
    if members.is_empty() {
        return Err("the cluster lists no members".into());
    }
    Ok(Members(members))
}

/// Accept queue of the HTTP listener. `TcpListener::bind` asks for 128: when more
/// clients connect at once (256 bench clients), the kernel drops the overflow's SYNs
/// and those clients retry only after the 1 s SYN timeout. The kernel caps it at
/// `net.core.somaxconn`.
const HTTP_LISTEN_BACKLOG: u32 = 4096;

fn bind_http(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind` does: a restarted node may rebind while old connections
    // linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(HTTP_LISTEN_BACKLOG)
}

pub fn run(args: NodeArgs) -> ExitCode {
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("paxwasm-node")
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("paxwasm node: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("paxwasm node: {error:#}");
            eprintln!("paxwasm node: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: NodeArgs) -> anyhow::Result<()> {
    if args.id == 0 {
        bail!("--id must be positive");
    }
    let members = args.cluster.map(|m| m.0).unwrap_or_default();
    if let Some(listed) = members.get(&args.id) {
        if *listed != args.peer {
            tracing::warn!(
                listed = %listed,
                peer = %args.peer,
                "--cluster lists another peer address for this node than --peer"
            );
        }
    }
    let http_advertise = args
        .advertise_http
        .clone()
        .unwrap_or_else(|| args.http.to_string());
    let mut config = NodeConfig::new(
        args.id,
        args.cluster_id.clone(),
        args.data.clone(),
        http_advertise,
        args.peer,
        members,
    );
    config.tick_ms = args.tick_ms.max(1);
    config.command_bytes_max = args.body_bytes_max;
    config.checkpoint.interval_entries = args.checkpoint_entries;
    config.test_hooks = args.test_hooks;
    config.checkpoint_repair_delay_ms = args.checkpoint_repair_delay_ms;
    if args.test_hooks {
        tracing::warn!(
            "test hooks are on: POST /v1/debug/flip-byte can corrupt this replica, \
             POST /v1/debug/disk-free fakes a full disk"
        );
    }
    config.snapshot.entries = args.snapshot_entries;
    config.snapshot.log_bytes = args.snapshot_log_bytes;
    config.snapshot.transfer.bytes_per_sec = args.snapshot_transfer_bytes_per_sec;
    config.snapshot.write_pause_ms = args.snapshot_write_pause_ms;
    config.rejoin = args.rejoin;
    config.params.learner_lag_entries_max = args.learner_lag_entries_max;
    config.debug_refuse_compiles = args.debug_refuse_compiles;
    config.debug_compile_delay_ms = args.debug_compile_delay_ms;
    config.apply_rules_max = args.apply_rules_max;
    config.disk_free_bytes_min = args.disk_free_bytes_min;
    let listener =
        bind_http(args.http).with_context(|| format!("binding the HTTP API on {}", args.http))?;
    let (node, running) = node::start(config).await?;
    let api_config = ApiConfig {
        body_bytes_max: args.body_bytes_max,
        admin_token: args.token.clone(),
        ..ApiConfig::default()
    };
    tracing::info!(
        node = args.id,
        http = %args.http,
        peer = %args.peer,
        admin_token = args.token.is_some(),
        "paxwasm node serving"
    );
    api::serve(listener, node, api_config, shutdown_signal()).await?;
    tracing::info!(node = args.id, "shutting down");
    running.stop().await;
    Ok(())
}

/// Logs to stderr at `info` (or `PAXWASM_LOG=debug|warn|…`), once per process.
pub fn init_logging() {
    let level = std::env::var("PAXWASM_LOG")
        .ok()
        .and_then(|level| level.parse().ok())
        .unwrap_or(tracing::Level::INFO);
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_ansi(false)
        .try_init();
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the node");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_lists_parse_and_refuse_mistakes() {
        let members = parse_cluster("1=127.0.0.1:7101,2=127.0.0.1:7102")
            .unwrap()
            .0;
        assert_eq!(members.len(), 2);
        assert_eq!(members[&2], "127.0.0.1:7102".parse().unwrap());
        assert!(parse_cluster("1=127.0.0.1:7101,1=127.0.0.1:7102").is_err());
        assert!(parse_cluster("x=127.0.0.1:7101").is_err());
        assert!(parse_cluster("1=nowhere").is_err());
        assert!(parse_cluster("0=127.0.0.1:1").is_err());
        assert!(parse_cluster("").is_err());
    }
}
