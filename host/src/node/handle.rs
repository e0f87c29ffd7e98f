//! The contract between a replica's runtime (`node`) and its front ends (`api`, the
//! CLI). Plain types only: `api` owns HTTP and JSON, `node` owns consensus, storage and
//! the Wasm machine, and neither leaks into the other through this file.

use std::future::Future;

use crate::paxos::NodeId;

/// How a query is made consistent (`?consistency=` on `POST /v1/queries`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// Read-index round through the leader (the default).
    Linearizable,
    /// Served by the leader while its lease holds (falls back to a read-index round).
    Lease,
    /// Served from this replica's applied state, however old.
    Stale,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandRequest {
    pub payload: Vec<u8>,
    /// The `Idempotency-Key` header, verbatim: retries with the same key return the
    /// first result and are never applied twice.
    pub idempotency_key: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandOk {
    /// The log slot the command was decided in (`Paxwasm-Index`).
    pub index: u64,
    pub output: Vec<u8>,
}

/// Where to find the leader, for forwarding and for clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderHint {
    pub id: NodeId,
    /// `host:port` of the leader's HTTP API.
    pub http: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandError {
    /// The module trapped or ran out of fuel (422). `error` is canonical, e.g.
    /// `trap: unreachable`, `fuel exhausted`; the state is as before the command.
    Rejected { index: u64, error: String },
    /// No leader or no quorum now (503 with `Retry-After`).
    Unavailable { reason: String, retry_after_ms: u64 },
    /// The outcome is unknown: it may or may not be applied later (504).
    Unknown { reason: String },
    /// Larger than this node accepts (413).
    TooLarge { limit_bytes: usize },
    /// No module is deployed yet (503: deploy one first).
    NoModule,
    /// This replica's disk is nearly full: it takes no writes now (507).
    StorageLow { reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryOk {
    /// Applied index of the state the query ran against (`Paxwasm-Applied-Index`).
    pub applied_index: u64,
    pub output: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryError {
    /// This replica cannot serve this consistency; `api` forwards to the leader.
    NotLeader {
        leader: Option<LeaderHint>,
    },
    /// The query trapped or ran out of fuel (422).
    Rejected {
        error: String,
    },
    Unavailable {
        reason: String,
        retry_after_ms: u64,
    },
    NoModule,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeployOk {
    /// `sha256:<hex>` of the module bytes.
    pub module: String,
    /// The slot at which the module took effect.
    pub index: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeployError {
    /// The module failed validation (400), with the reason.
    Invalid {
        reason: String,
    },
    /// Migration trapped, ran out of fuel or lacked its hooks; the old module is kept (409).
    MigrationFailed {
        index: u64,
        reason: String,
    },
    Unavailable {
        reason: String,
        retry_after_ms: u64,
    },
    Unknown {
        reason: String,
    },
    TooLarge {
        limit_bytes: usize,
    },
    /// This replica's disk is nearly full: it takes no writes now (507).
    StorageLow {
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleEvent {
    pub module: String,
    pub index: u64,
    pub migrated: bool,
    /// `Some(reason)` for a refused upgrade (the previous module stayed).
    pub failed: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppInfo {
    pub module: Option<String>,
    pub index: Option<u64>,
    pub history: Vec<ModuleEvent>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub id: NodeId,
    pub peer: String,
    pub http: String,
    pub connected: bool,
    /// The peer's chosen index as this replica last heard it, if known.
    pub chosen_index: Option<u64>,
    /// The highest apply rules the peer said it implements, if it said.
    pub apply_rules_max: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusView {
    pub id: NodeId,
    /// `leader`, `follower`, `candidate`, `learner`, `removed`, or `joining` (started
    /// without `--cluster`, waiting to be added and to receive a snapshot).
    pub role: String,
    /// This replica in the configuration it knows chosen: `voter`, `learner` or
    /// `outside` (removed, or not added yet: it takes no part).
    pub membership: String,
    pub leader: Option<NodeId>,
    /// `(round, node id)`.
    pub ballot: (u64, NodeId),
    pub commit_index: u64,
    pub applied_index: u64,
    /// Slot of the newest durable snapshot (0: none yet).
    pub snapshot_index: u64,
    /// The apply rules in force at the applied index (`node::app::APPLY_RULES_MAX`).
    pub apply_rules: u32,
    /// False while this replica may not vote (it lost its data and rejoined).
    pub voting: bool,
    pub module: Option<String>,
    /// `(index, "sha256:<hex>")`: the machine's state hash and the applied index it was
    /// computed at.
    pub state_hash: Option<(u64, String)>,
    pub peers: Vec<PeerView>,
    /// The newest state-hash checkpoint this replica computed; `None` before the first
    /// (no module yet, or fewer applied entries than the checkpoint interval).
    pub checkpoint: Option<CheckpointView>,
    /// Free space of the data directory's filesystem (`None`: not measured, or the
    /// check is off).
    pub disk: Option<DiskView>,
}

/// `GET /v1/status` → `disk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskView {
    pub free_bytes: u64,
    /// `--disk-free-bytes-min`.
    pub free_bytes_min: u64,
    /// Below the minimum: this replica answers writes with 507 and takes no part in
    /// them until space is freed.
    pub low: bool,
}

/// A state-hash checkpoint (`GET /v1/status` → `checkpoint`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointView {
    pub index: u64,
    /// `sha256:<hex>`.
    pub hash: String,
    /// Every peer reported the same hash for `index`. False until every peer has
    /// reported (a slower peer reports later), and false when one reported another.
    pub agreed: bool,
}

/// `POST /v1/debug/flip-byte?offset=N`: a test hook that makes this replica's state
/// diverge on purpose (`paxwasm node --test-hooks`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlipOk {
    /// The applied index of the state whose byte was flipped.
    pub applied_index: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlipError {
    /// Test hooks are off (the route answers 404, as if it did not exist).
    Disabled,
    /// No module, or the offset is outside the memory (400).
    Refused { reason: String },
    /// The replica did not take the request (503).
    Unavailable { reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    pub id: NodeId,
    /// `voter`, `learner`, or `old-voter` (while joint: a voter of C(old) only, which
    /// leaves when C(new) is chosen).
    pub role: String,
    /// From the replicated address book (empty when it has no entry for the member).
    pub peer: String,
    /// From the address book, else from the member's own peer info (original members
    /// seeded from `--cluster` have no HTTP address in the book); empty when unknown.
    pub http: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterView {
    pub members: Vec<MemberView>,
    pub leader: Option<NodeId>,
    /// The voters of C(new) (the only voters when not joint).
    pub voters: Vec<NodeId>,
    /// `Some(C(old) voters)` while a voter change is in progress (joint consensus).
    pub old_voters: Option<Vec<NodeId>>,
    pub learners: Vec<NodeId>,
}

/// A membership change asked through `POST /v1/cluster/members`, `POST
/// /v1/cluster/members/{id}/promote` or `DELETE /v1/cluster/members/{id}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberChange {
    /// Record the member's addresses, then add it as a non-voting learner.
    Add {
        id: NodeId,
        peer: String,
        http: String,
    },
    /// Make a learner a voter (joint consensus).
    Promote { id: NodeId },
    /// Remove a voter or learner; `force` skips the running-quorum check.
    Remove { id: NodeId, force: bool },
    /// Make exactly `voters` the voters, in one joint-consensus change (add several,
    /// remove several, replace a majority): each must be a voter or a learner now;
    /// voters left out leave the cluster, other learners stay learners.
    SetVoters {
        voters: std::collections::BTreeSet<NodeId>,
        force: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberError {
    /// The request is malformed (400).
    Invalid { reason: String },
    /// The leader refused the change (409), with the core's precise reason.
    Refused { reason: String },
    /// This replica is not the leader; `api` forwards the request to it.
    NotLeader { leader: Option<LeaderHint> },
    /// No leader or no room now (503 with `Retry-After`).
    Unavailable { reason: String, retry_after_ms: u64 },
    /// No outcome in time: the change may or may not take effect (504).
    Unknown { reason: String },
    /// This replica's disk is nearly full: it takes no writes now (507).
    StorageLow { reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    /// Why not, for the `/readyz` body.
    pub reason: Option<String>,
}

/// What a running replica offers its front ends. Cheap to clone; every method may be
/// called concurrently from many HTTP connections.
pub trait NodeApi: Clone + Send + Sync + 'static {
    fn submit(
        &self,
        request: CommandRequest,
    ) -> impl Future<Output = Result<CommandOk, CommandError>> + Send;
    fn query(
        &self,
        payload: Vec<u8>,
        consistency: Consistency,
    ) -> impl Future<Output = Result<QueryOk, QueryError>> + Send;
    fn deploy(
        &self,
        module: Vec<u8>,
        migrate: bool,
    ) -> impl Future<Output = Result<DeployOk, DeployError>> + Send;
    /// Changes the membership and answers with the resulting cluster once the change is
    /// applied here (for a voter change: once C(new) is).
    fn change_members(
        &self,
        change: MemberChange,
    ) -> impl Future<Output = Result<ClusterView, MemberError>> + Send {
        let _ = change;
        std::future::ready(Err(MemberError::Unavailable {
            reason: "this node does not change memberships".into(),
            retry_after_ms: 1000,
        }))
    }
    fn app(&self) -> AppInfo;
    /// This node's id (reads no status, so it asks for no state hash).
    fn id(&self) -> NodeId;
    /// The status of `GET /v1/status`; reading it asks the replica to keep its state
    /// hash fresh.
    fn status(&self) -> StatusView;
    fn cluster(&self) -> ClusterView;
    fn readiness(&self) -> Readiness;
    /// Prometheus text exposition format.
    fn metrics(&self) -> String;
    /// Whether test-only routes exist on this node (`paxwasm node --test-hooks`).
    fn test_hooks_enabled(&self) -> bool {
        false
    }
    /// Flips one byte of the committed linear memory at `offset`, on this replica only.
    /// Off unless the node runs with test hooks.
    fn debug_flip_byte(
        &self,
        offset: u64,
    ) -> impl Future<Output = Result<FlipOk, FlipError>> + Send {
        let _ = offset;
        std::future::ready(Err(FlipError::Disabled))
    }
    /// Pretends the data directory's filesystem has `free_bytes` free (`None`: measure
    /// again); answers once the replica took it. Off unless the node runs with test
    /// hooks.
    fn debug_disk_free(
        &self,
        free_bytes: Option<u64>,
    ) -> impl Future<Output = Result<(), FlipError>> + Send {
        let _ = free_bytes;
        std::future::ready(Err(FlipError::Disabled))
    }
}
