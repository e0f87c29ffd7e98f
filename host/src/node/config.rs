//! Settings of one replica process. Every limit is a named field, unit last.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::checkpoint::CheckpointConfig;
use crate::machine::MachineConfig;
use crate::paxos::{NodeId, Params};
use crate::storage::StorageConfig;

pub use super::runtime::SnapshotConfig;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    /// Names the cluster; the store refuses a data directory of another cluster and the
    /// transport refuses peers of another (it sees a 64-bit hash of it).
    pub cluster_id: String,
    pub data_dir: PathBuf,
    /// `host:port` of this node's HTTP API as peers and clients should dial it.
    pub http_advertise: String,
    pub peer_listen: SocketAddr,
    /// Voters and their peer addresses, this node included. Empty: the node waits to
    /// be added by a membership change and serves only status.
    pub members: BTreeMap<NodeId, SocketAddr>,
    /// Length of one core tick. With the core's default `Params` (election timeout
    /// 20–40 ticks, heartbeat every 2), 10 ms gives a 200–400 ms election timeout.
    pub tick_ms: u64,
    pub params: Params,
    pub machine: MachineConfig,
    pub storage: StorageConfig,
    /// Largest application command or query accepted (413 above).
    pub command_bytes_max: usize,
    /// A command or deploy with no outcome after this long is answered `Unknown`
    /// (504); a query is answered `Unavailable`.
    pub request_timeout_ms: u64,
    /// Requests waiting for the core task; beyond, `Unavailable` (backpressure).
    pub requests_queued_max: usize,
    /// Requests the core holds waiting for an outcome; beyond, `Unavailable`.
    pub requests_pending_max: usize,
    /// How often a replica tells its peers its HTTP address and indexes.
    pub peer_info_interval_ms: u64,
    /// How often the state hash is recomputed while `/v1/status` is being read
    /// (only when the applied index moved).
    pub state_hash_interval_ms: u64,
    /// ... and while nobody reads it. Hashing follows the pages written since the
    /// last hash; under load with writes spread over a large state that is most
    /// of the written pages each time, so an unread status hash is refreshed
    /// rarely.
    pub state_hash_idle_interval_ms: u64,
    /// `Retry-After` given with `Unavailable`.
    pub retry_after_ms: u64,
    /// Largest peer frame; must hold the largest module install.
    pub frame_bytes_max: u32,
    /// Events the core handles before it performs their actions, per loop turn:
    /// bounds latency while letting bursts share one pass.
    pub events_per_turn_max: usize,
    /// State-hash checkpoints: every how many applied entries, and how many are kept.
    pub checkpoint: CheckpointConfig,
    /// Enables test-only routes that damage this replica on purpose
    /// (`POST /v1/debug/flip-byte`). Never on in production.
    pub test_hooks: bool,
    /// How long a replica that found its state diverged waits before it asks the
    /// majority for a snapshot (a test hook: keeps the alarm observable).
    pub checkpoint_repair_delay_ms: u64,
    /// When to snapshot and compact, and how snapshots are transferred.
    pub snapshot: SnapshotConfig,
    /// `--rejoin`: the data directory is empty because this member's data was lost. The
    /// store is marked amnesic (durably, before anything else) and the replica learns
    /// but never votes (`DurableState::amnesic`).
    pub rejoin: bool,
    /// Below this many free bytes on the data directory's filesystem the replica takes
    /// no part in writes and answers commands with 507 (`runtime/disk.rs`); 0: never.
    pub disk_free_bytes_min: u64,
    /// How often the free space is measured.
    pub disk_check_interval_ms: u64,
    /// Test hook: every background compile of a staged module fails, so this replica
    /// halts at the next upgrade slot (see `node/upgrade.rs`).
    #[doc(hidden)]
    pub debug_refuse_compiles: bool,
    /// Test hook: every background compile of a staged module takes this much longer,
    /// so this replica reaches the upgrade slot before its compile is done.
    pub debug_compile_delay_ms: u64,
    /// The highest apply rules this replica takes part in (`node::app::APPLY_RULES_MAX`
    /// by default; lower plays an older build, for rolling-upgrade tests).
    pub apply_rules_max: u32,
}

/// `NodeConfig::disk_free_bytes_min` (`--disk-free-bytes-min`) default: 128 MiB, twice
/// the free space below which a failed write counts as a full disk
/// (`StorageConfig::disk_full_free_bytes_max`), so a replica steps out of writes well
/// before its store could fail.
pub const DISK_FREE_BYTES_MIN_DEFAULT: u64 = 128 * 1024 * 1024;

impl NodeConfig {
    /// The defaults of a production replica, for the given identity and addresses.
    pub fn new(
        id: NodeId,
        cluster_id: String,
        data_dir: PathBuf,
        http_advertise: String,
        peer_listen: SocketAddr,
        members: BTreeMap<NodeId, SocketAddr>,
    ) -> NodeConfig {
        // The core's default window (8 slots): a larger one lets every arriving
        // command take a slot of its own, which costs a persist per command on every
        // replica (measured: 2.2 commands per slot with 32).
        let params = Params::default();
        NodeConfig {
            id,
            cluster_id,
            data_dir,
            http_advertise,
            peer_listen,
            members,
            tick_ms: 10,
            params,
            machine: MachineConfig::default(),
            storage: StorageConfig::default(),
            command_bytes_max: 1024 * 1024,
            request_timeout_ms: 10_000,
            requests_queued_max: 16_384,
            requests_pending_max: 65_536,
            peer_info_interval_ms: 500,
            state_hash_interval_ms: 200,
            state_hash_idle_interval_ms: 5_000,
            retry_after_ms: 500,
            frame_bytes_max: 64 * 1024 * 1024,
            events_per_turn_max: 1024,
            checkpoint: CheckpointConfig::default(),
            test_hooks: false,
            checkpoint_repair_delay_ms: 0,
            snapshot: SnapshotConfig::default(),
            rejoin: false,
            debug_refuse_compiles: false,
            debug_compile_delay_ms: 0,
            apply_rules_max: crate::node::app::APPLY_RULES_MAX,
            disk_free_bytes_min: DISK_FREE_BYTES_MIN_DEFAULT,
            disk_check_interval_ms: 1_000,
        }
    }

    /// The transport's 64-bit cluster id: FNV-1a of the cluster name (stable across
    /// builds and platforms, unlike `std`'s hasher).
    pub fn cluster_hash(&self) -> u64 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.cluster_id.as_bytes() {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash
    }
}
