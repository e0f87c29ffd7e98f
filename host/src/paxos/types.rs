//! Plain data of the protocol: identifiers, ballots, log values, messages, and the
//! events and actions of the sans-IO interface. No behaviour lives here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::config::Configuration;

/// A replica's identity. Stable across restarts and address changes.
pub type NodeId = u64;
/// A position in the replicated log. Slot 0 is never used: the first slot is 1, so
/// "chosen index 0" means "nothing chosen yet".
pub type Slot = u64;
/// A runtime-chosen identifier of a client request at one replica. The core only
/// carries it back in `Reply` actions and in a command's `Origin`.
pub type RequestId = u64;

/// A ballot is (round, node id), ordered by round first. Two replicas never use the
/// same ballot because the node id breaks ties.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ballot {
    pub round: u64,
    pub node: NodeId,
}

impl Ballot {
    /// The ballot every acceptor starts promised to; no leader ever uses it.
    pub const ZERO: Ballot = Ballot { round: 0, node: 0 };
}

/// Client id + per-client sequence number. A command carrying one is applied at most
/// once; duplicates get the first result back (see `paxos::dedup`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdempotencyKey {
    pub client: u64,
    pub seq: u64,
}

/// Where a command entered the cluster, so that replica (and only it) can answer the
/// client once the command is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    pub node: NodeId,
    pub request: RequestId,
}

/// One client command: opaque bytes for the state machine.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Command {
    pub payload: Vec<u8>,
    pub idempotency_key: Option<IdempotencyKey>,
    pub origin: Origin,
}

impl Command {
    /// Bytes this command counts against `batch_bytes_max`.
    pub fn size_bytes(&self) -> usize {
        self.payload.len() + COMMAND_OVERHEAD_BYTES
    }
}

/// Fixed per-command bookkeeping counted in batch sizes (key + origin, rounded up).
pub const COMMAND_OVERHEAD_BYTES: usize = 48;

/// Many commands decided in one slot, with the leader-chosen context the state
/// machine may read: every replica sees the same timestamp and seed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Batch {
    pub commands: Vec<Command>,
    /// The leader's wall clock when it formed the batch (from `Event::Tick::now_ms`),
    /// never smaller than the previous batch's timestamp the leader knew of.
    pub timestamp_ms: u64,
    /// Drawn from the leader's seeded PRNG.
    pub seed: u64,
}

/// What a slot decides. Configuration entries (joint consensus) and module upgrades
/// join this enum in later issues, which is why it is `non_exhaustive`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Value {
    /// Fills a hole found by Phase 1, or marks a new leader's first slot.
    Noop,
    /// Shared: a value is held in the log, in flight at the leader, in messages to
    /// every peer and in `Apply`, and cloning it must not copy the commands.
    Batch(Arc<Batch>),
    /// A membership change: C(old,new) while `is_joint()`, else a final C(new) (or a
    /// change of learners only). It governs every slot after its own once chosen;
    /// the leader proposes nothing past it before then (see docs/notes/reconfig.md).
    Configuration(Arc<Configuration>),
}

/// One slot of an acceptor's log.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LogEntry {
    /// The ballot the value was accepted in. For an entry learned through catch-up
    /// this is the ballot it was already accepted in, or `Ballot::ZERO` if none: a
    /// chosen entry never has its ballot lowered, since Phase 1 relies on it.
    pub ballot: Ballot,
    pub value: Value,
    /// Known to be the chosen value of this slot.
    pub chosen: bool,
}

/// How a read is made linearizable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReadMode {
    /// Served locally while the leader lease holds; falls back to `ReadIndex` when it
    /// does not.
    Lease,
    /// Confirm leadership with a quorum round, then wait until applied >= read index.
    ReadIndex,
}

/// Peer-to-peer messages. Every message from a leader or candidate carries its ballot.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Message {
    /// Asks "would you support an election now?" without disturbing anyone.
    PreVote { round: u64 },
    /// `promised` lets a candidate with a stale round pick a high enough ballot.
    PreVoteReply {
        round: u64,
        granted: bool,
        promised: Ballot,
    },
    /// Phase 1a for every slot from `first_slot` on.
    Prepare { ballot: Ballot, first_slot: Slot },
    /// Phase 1b: every entry the acceptor holds from `first_slot` on.
    Promise {
        ballot: Ballot,
        first_slot: Slot,
        entries: Vec<(Slot, LogEntry)>,
    },
    /// The sender has promised `promised`, higher than the ballot it was asked for.
    Reject { promised: Ballot },
    /// Phase 2a. `chosen_index` lets followers learn commits.
    Accept {
        ballot: Ballot,
        slot: Slot,
        value: Value,
        chosen_index: Slot,
    },
    /// Phase 2b.
    Accepted { ballot: Ballot, slot: Slot },
    /// Leader liveness, lease round `seq` and commit index.
    Heartbeat {
        ballot: Ballot,
        seq: u64,
        chosen_index: Slot,
    },
    /// `chosen_index` is the follower's own; the leader sends catch-up if it lags.
    HeartbeatAck {
        ballot: Ballot,
        seq: u64,
        chosen_index: Slot,
    },
    /// Catch-up: chosen entries the receiver lacks (bounded per message).
    Chosen {
        ballot: Ballot,
        entries: Vec<(Slot, Value)>,
        chosen_index: Slot,
    },
    /// Reply to `Chosen`: asks for the next chunk if still behind.
    Learned { ballot: Ballot, chosen_index: Slot },
    /// A proposal received by a follower, passed on to the leader.
    Forward { command: Command },
}

/// Inputs to `Replica::handle`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    Message {
        from: NodeId,
        msg: Message,
    },
    /// One tick of logical time; `now_ms` is the runtime's wall clock, used only as
    /// the timestamp of batches this replica forms as leader.
    Tick {
        now_ms: u64,
    },
    Propose {
        request: RequestId,
        command: Command,
    },
    /// The runtime made the `Persist` with this token durable. Runtimes complete
    /// persists in the order they were issued.
    Persisted {
        token: u64,
    },
    Read {
        request: RequestId,
        mode: ReadMode,
    },
    /// The runtime has made a snapshot of the applied state at `slot` durable
    /// (`slot` <= the applied index). The core may now forget entries below it, keeping
    /// `Params::compaction_margin_entries` of them for lagging peers, and answers with
    /// `Action::Compact`.
    SnapshotSaved {
        slot: Slot,
    },
    /// The runtime has replaced the state machine (machine and applier) with a
    /// snapshot of the applied state at `slot`, and that snapshot is durable. Slots up
    /// to `slot` count as chosen and applied; no `Apply` is emitted for them. Ignored
    /// when `slot` is not above the applied index.
    SnapshotInstalled {
        slot: Slot,
        /// The configuration in force at `slot` (stored in the snapshot): the runtime
        /// takes it from `Replica::applied_configuration()` when it makes a snapshot.
        configuration: Configuration,
    },
    /// An operator asks the leader to change the membership. Answered with a `Reply`
    /// carrying `ChangeAccepted` (proposed at that slot), `ChangeRefused` or
    /// `NotLeader`.
    ChangeMembership {
        request: RequestId,
        change: MembershipChange,
        /// Skips the check that a quorum of C(new) is running.
        force: bool,
    },
}

/// The membership changes an operator can ask for. Each becomes a target C(new);
/// when its voters differ from today's, it goes through C(old,new).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MembershipChange {
    /// A non-voter that receives the log and catches up.
    AddLearner(NodeId),
    /// A learner becomes a voter.
    Promote(NodeId),
    /// A voter or learner leaves.
    Remove(NodeId),
    /// Any set change (add several, remove several, replace a majority). Every new
    /// voter must be a learner today.
    Replace {
        voters: BTreeSet<NodeId>,
        learners: BTreeSet<NodeId>,
    },
}

/// Why the leader refused a membership change.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ChangeRefusal {
    /// A configuration entry is proposed and not chosen, the configuration is joint,
    /// or this new leader has not yet finished re-proposing what Phase 1 found.
    ChangeInProgress,
    /// The change would make `node` a voter, but it is not a learner now.
    NotALearner { node: NodeId },
    /// `node` is already a voter or learner.
    AlreadyMember { node: NodeId },
    /// `node` is neither a voter nor a learner.
    NotAMember { node: NodeId },
    /// The learner is more than `limit` (`Params::learner_lag_entries_max`) chosen
    /// entries behind the leader.
    LearnerLags {
        node: NodeId,
        behind_entries: u64,
        limit: u64,
    },
    /// The learner has not answered this leader yet, so its lag is unknown.
    LearnerNotHeard { node: NodeId },
    /// Fewer than a majority of C(new)'s voters were heard from within an election
    /// timeout (the leader counts itself); `force` overrides.
    NoRunningQuorum { running: usize, voters: usize },
    /// C(new) would have no voter, or a learner that is also a voter.
    Invalid,
    /// C(new) equals the current configuration.
    NoChange,
}

/// The precise text operators see (HTTP 409 bodies, CLI errors).
impl std::fmt::Display for ChangeRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChangeRefusal::ChangeInProgress => write!(
                f,
                "a membership change is in progress (a configuration entry is not chosen yet, \
                 the configuration is joint, or a new leader is still re-proposing); retry"
            ),
            ChangeRefusal::NotALearner { node } => write!(
                f,
                "node {node} is not a learner: only a learner can become a voter (add it first)"
            ),
            ChangeRefusal::AlreadyMember { node } => {
                write!(f, "node {node} is already a voter or learner")
            }
            ChangeRefusal::NotAMember { node } => {
                write!(f, "node {node} is neither a voter nor a learner")
            }
            ChangeRefusal::LearnerNotHeard { node } => write!(
                f,
                "learner {node} has not reported to the leader yet, so how far it lags is \
                 unknown (not running, unreachable, or still fetching its snapshot); retry \
                 once it has caught up"
            ),
            ChangeRefusal::LearnerLags {
                node,
                behind_entries,
                limit,
            } => write!(
                f,
                "learner {node} lags the leader by {behind_entries} entries (more than \
                 {limit}); retry once it has caught up"
            ),
            ChangeRefusal::NoRunningQuorum { running, voters } => write!(
                f,
                "only {running} of the {voters} voters of the new configuration are running \
                 (heard from within an election timeout), not a majority; a removal can be forced \
                 (DELETE ...?force=true, `paxwasm members remove --force`)"
            ),
            ChangeRefusal::Invalid => write!(
                f,
                "the new configuration would have no voter, or a node both voter and learner"
            ),
            ChangeRefusal::NoChange => write!(f, "the configuration already is what was asked"),
        }
    }
}

/// Durable changes: apply in order. `entries` replace whole slots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PersistRecord {
    pub promised: Option<Ballot>,
    pub entries: Vec<(Slot, LogEntry)>,
    pub chosen_index: Option<Slot>,
}

/// What a replica restarts from: everything ever persisted, folded together, plus
/// the newest snapshot the runtime restored its state machine from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DurableState {
    pub promised: Ballot,
    pub log: BTreeMap<Slot, LogEntry>,
    pub chosen_index: Slot,
    /// Slot of the snapshot the state machine was restored from (0: none, the state
    /// machine starts empty). Slots up to it are chosen and applied.
    pub snapshot_slot: Slot,
    /// First slot the store still holds (0 or 1: nothing was compacted). Everything
    /// below was compacted away and is covered by the snapshot.
    pub log_start: Slot,
    /// This replica lost its durable state (a wiped data directory) after it had
    /// taken part. It forgot promises and accepts it gave, and Paxos counts on
    /// acceptors never forgetting, so it must never vote again under this identity:
    /// it learns the log and snapshots, but never promises, acknowledges an accept,
    /// grants a pre-vote or campaigns. Only a membership change can give it a vote.
    pub amnesic: bool,
}

impl DurableState {
    /// Folds one completed persist into the durable state.
    pub fn apply(&mut self, record: &PersistRecord) {
        if let Some(promised) = record.promised {
            assert!(
                promised >= self.promised,
                "durable promise must never decrease"
            );
            self.promised = promised;
        }
        for (slot, entry) in &record.entries {
            self.log.insert(*slot, entry.clone());
        }
        if let Some(chosen_index) = record.chosen_index {
            self.chosen_index = self.chosen_index.max(chosen_index);
        }
    }
}

/// Answers to client requests that the core itself decides. Results of applied
/// commands are produced by the applier (`paxos::apply`), not by the core.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The read is linearizable if served from the state machine right now (all
    /// `Apply` actions before this one have been performed).
    ReadReady,
    /// This replica cannot serve it; `leader_hint` is the leader it believes in.
    NotLeader {
        leader_hint: Option<NodeId>,
    },
    /// A limit was reached (queued proposals or pending reads); retry later.
    Busy,
    /// A membership change was proposed at `slot` (its `Apply` tells when it takes
    /// effect; C(new) follows C(old,new) by itself).
    ChangeAccepted {
        slot: Slot,
    },
    ChangeRefused(ChangeRefusal),
}

/// Outputs of `Replica::handle`, to be performed in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Make `record` durable, then feed back `Event::Persisted { token }`.
    Persist {
        token: u64,
        record: PersistRecord,
    },
    Send {
        to: NodeId,
        msg: Message,
    },
    /// Apply the chosen value of `slot`; emitted exactly once per slot, in slot order.
    Apply {
        slot: Slot,
        value: Value,
    },
    Reply {
        request: RequestId,
        outcome: Outcome,
    },
    /// `to` needs slots from `slot` on, and this replica compacted some of them away:
    /// ship `to` the newest durable snapshot (it covers at least `slot - 1`). Emitted
    /// again on every heartbeat acknowledgement while `to` lags; the runtime keeps at
    /// most one transfer per peer.
    SendSnapshot {
        to: NodeId,
        slot: Slot,
    },
    /// Delete the store's log entries below `below`. Only emitted after a snapshot
    /// covering them was reported durable (`SnapshotSaved` or `SnapshotInstalled`).
    Compact {
        below: Slot,
    },
}
