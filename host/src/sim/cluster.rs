//! The deterministic cluster simulator: one thread, one seeded PRNG, 3 or 5 real
//! `paxos::Replica`s, a network that delays, drops, duplicates, reorders and
//! partitions (symmetric and asymmetric), crashes that lose unpersisted state, and
//! clients running get/put/cas against the key-value machine with retries and
//! idempotency keys. Invariants are checked as the run goes; the client history is
//! checked for linearizability at the end.
//!
//! A run is a pure function of its `SimOptions`: the same seed replays the same run.
//! It never reads a clock or spawns a thread.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::kv::{decode_output, encode_input, KvMachine};
use super::linearizability::{check, CheckResult, KvInput, KvOutput, Operation};
use crate::paxos::{
    Action, Applier, Ballot, Command, Configuration, DurableState, Event, IdempotencyKey,
    MembershipChange, Message, NodeId, Origin, Outcome, Params, PersistRecord, ReadMode, Replica,
    RequestId, Slot, SplitMix64, Value,
};

/// Wall-clock milliseconds one simulated tick stands for (batch timestamps only).
pub const TICK_MS: u64 = 10;
/// Replicas outside the first configuration in a standard run, for membership
/// changes to add (3 lets a 3-voter cluster replace its whole majority).
pub const SPARE_REPLICAS: usize = 3;
/// Voter counts the random membership changes keep to.
const VOTERS_MIN: usize = 3;
const VOTERS_MAX: usize = 5;

/// Fault rates of the fault phase. Probabilities are per million, unit last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRates {
    /// Per message sent.
    pub drop_per_million: u64,
    pub duplicate_per_million: u64,
    /// Each message (and each duplicate) gets its own delay in this range, so
    /// messages are reordered whenever their delays differ.
    pub delay_ticks_min: u64,
    pub delay_ticks_max: u64,
    /// Per tick while the network is whole: a partition starts.
    pub partition_per_million: u64,
    pub partition_ticks_min: u64,
    pub partition_ticks_max: u64,
    /// Per tick: one live replica crashes (never more than a minority at a time);
    /// half of the crashes pick the leader, the other half any live replica.
    pub crash_per_million: u64,
    pub down_ticks_min: u64,
    pub down_ticks_max: u64,
    /// Time for a persist to become durable; a crash before that loses it.
    pub persist_ticks_min: u64,
    pub persist_ticks_max: u64,
    /// Per replica per tick: the replica misses this tick (its clock runs slow), so
    /// tick rates drift apart, as the lease safety margin must tolerate.
    pub tick_skip_per_million: u64,
    /// Per tick while clients reach every replica: some clients lose their links to
    /// some replicas (both ways) for a partition length. Client messages also share
    /// the drop, duplicate and delay rates above.
    pub client_partition_per_million: u64,
    /// Per tick: one replica's disk stops completing persists for a while (its
    /// promises and accepts wait in memory); when the stall ends the replica
    /// crashes half of the time, losing its whole unsynced tail. At the start of a
    /// stall the leader crashes half of the time, so a new leader is elected while
    /// the tail is unsynced.
    pub disk_stall_per_million: u64,
    pub disk_stall_ticks_min: u64,
    pub disk_stall_ticks_max: u64,
    /// Per tick, with 5 or more replicas and none down: two replicas crash at once
    /// (one of them the leader, if there is one).
    pub double_crash_per_million: u64,
    /// Each replica's wall clock is ahead of the simulation's by a fixed amount in
    /// `0..clock_offset_ms_max` (batch timestamps come from the leader's clock).
    pub clock_offset_ms_max: u64,
    /// Per tick: the simulator asks the leader for a random membership change (add
    /// a learner, promote, remove, replace a majority, remove the leader).
    pub membership_change_per_million: u64,
    /// Per tick, at most once per run: a replica crashes and loses its whole disk
    /// (log, promises, snapshots). It comes back amnesic: it catches up from the log
    /// or a snapshot but never votes again (`DurableState::amnesic`), so from then on
    /// it counts as down for the crash budget.
    pub disk_wipe_per_million: u64,
    /// Per snapshot install: the replica crashes right after it, before the log
    /// compaction that follows an install is durable (if the crash budget allows).
    pub crash_after_install_per_million: u64,
}

impl Default for FaultRates {
    fn default() -> FaultRates {
        FaultRates {
            drop_per_million: 50_000,
            duplicate_per_million: 20_000,
            delay_ticks_min: 1,
            delay_ticks_max: 4,
            partition_per_million: 15_000,
            partition_ticks_min: 10,
            partition_ticks_max: 80,
            crash_per_million: 15_000,
            down_ticks_min: 5,
            down_ticks_max: 60,
            persist_ticks_min: 0,
            persist_ticks_max: 2,
            tick_skip_per_million: 20_000,
            client_partition_per_million: 10_000,
            disk_stall_per_million: 5_000,
            disk_stall_ticks_min: 5,
            disk_stall_ticks_max: 40,
            double_crash_per_million: 4_000,
            clock_offset_ms_max: 2_000,
            membership_change_per_million: 10_000,
            disk_wipe_per_million: 1_000,
            crash_after_install_per_million: 100_000,
        }
    }
}

impl FaultRates {
    /// Many more faults, longer persists and more reordering; still within the
    /// timings the core is configured for (a round trip stays below the election
    /// timeout), so the liveness phase can still demand progress.
    pub fn harsh() -> FaultRates {
        FaultRates {
            drop_per_million: 150_000,
            duplicate_per_million: 100_000,
            delay_ticks_min: 1,
            delay_ticks_max: 6,
            partition_per_million: 30_000,
            partition_ticks_min: 5,
            partition_ticks_max: 120,
            crash_per_million: 30_000,
            down_ticks_min: 1,
            down_ticks_max: 80,
            persist_ticks_min: 0,
            persist_ticks_max: 8,
            tick_skip_per_million: 50_000,
            client_partition_per_million: 20_000,
            disk_stall_per_million: 10_000,
            disk_stall_ticks_min: 5,
            disk_stall_ticks_max: 60,
            double_crash_per_million: 8_000,
            clock_offset_ms_max: 5_000,
            membership_change_per_million: 20_000,
            disk_wipe_per_million: 2_000,
            crash_after_install_per_million: 200_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimOptions {
    pub seed: u64,
    /// Voters of the first configuration (ids 1..=replicas).
    pub replicas: usize,
    /// Further replicas that start outside the configuration (ids after the voters),
    /// for membership changes to add.
    pub spare_replicas: usize,
    /// Client operations per run, over all clients.
    pub ops: usize,
    pub clients: usize,
    pub keys: usize,
    pub faults: FaultRates,
    pub params: Params,
    /// The fault phase ends after this many ticks or once 3/4 of `ops` were issued.
    pub fault_phase_ticks_max: u64,
    /// After healing, every client operation must complete (and all replicas agree
    /// on the applied index) with no stretch of this many ticks without an operation
    /// completing.
    pub liveness_ticks_max: u64,
    pub client_timeout_ticks: u64,
    /// During the fault phase a client gives up after this many attempts (the
    /// outcome stays unknown); after healing it retries until done.
    pub client_attempts_max: u32,
    /// A client waits up to this many ticks between operations.
    pub client_think_ticks_max: u64,
    /// Each replica snapshots its applied state every this many applied slots (0:
    /// never); writing a snapshot takes up to `snapshot_write_ticks_max` ticks, and a
    /// crash before it is durable loses it. Durable snapshots let the core compact
    /// its log, so lagging replicas catch up by snapshot transfer.
    pub snapshot_every_slots: u64,
    pub snapshot_write_ticks_max: u64,
}

impl SimOptions {
    /// The standard run for `seed`: 3 replicas on even seeds, 5 on odd ones.
    pub fn for_seed(seed: u64, replicas: Option<usize>, ops: usize) -> SimOptions {
        SimOptions {
            seed,
            replicas: replicas.unwrap_or(if seed.is_multiple_of(2) { 3 } else { 5 }),
            spare_replicas: SPARE_REPLICAS,
            ops,
            clients: 4,
            keys: 3,
            faults: FaultRates::default(),
            params: Params::default(),
            fault_phase_ticks_max: 2_000,
            liveness_ticks_max: 1_500,
            client_timeout_ticks: 60,
            client_attempts_max: 3,
            client_think_ticks_max: 30,
            // Derived from the seed so that the replay command needs no new flag,
            // and varied so that compaction lands at many different points.
            snapshot_every_slots: 3 + seed % 11,
            snapshot_write_ticks_max: 1 + seed % 7,
        }
        .with_compaction_margin(seed % 5)
    }

    fn with_compaction_margin(mut self, entries: u64) -> SimOptions {
        self.params.compaction_margin_entries = entries;
        self
    }

    /// The one-line command that replays this run.
    pub fn replay_command(&self) -> String {
        let mut command = format!(
            "cargo run --release -p paxwasm -- sim --seeds 1 --seed {} --replicas {} --ops {}",
            self.seed, self.replicas, self.ops
        );
        let mut faults = self.faults.clone();
        if faults.disk_wipe_per_million == 0 {
            command.push_str(" --no-disk-wipes");
            faults.disk_wipe_per_million = FaultRates::harsh().disk_wipe_per_million;
        }
        if faults == FaultRates::harsh() {
            command.push_str(" --faults harsh");
        }
        if self.params.bug_ignore_phase1_values {
            command.push_str(" --planted-bug");
        }
        if self.params.bug_reads_before_ready {
            command.push_str(" --planted-read-bug");
        }
        if self.params.bug_accepted_before_persist {
            command.push_str(" --planted-persist-bug");
        }
        if self.params.bug_phase1_ignores_revealed_configurations {
            command.push_str(" --planted-config-bug");
        }
        if self.params.bug_promise_over_compacted_slots {
            command.push_str(" --planted-compaction-bug");
        }
        if self.params.bug_amnesic_replica_votes {
            command.push_str(" --planted-amnesia-bug");
        }
        command
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedOutcome {
    pub seed: u64,
    pub replicas: usize,
    /// Operations issued and operations acknowledged to clients.
    pub ops: usize,
    pub committed: usize,
    /// The first invariant, liveness or linearizability violation, if any.
    pub violation: Option<String>,
    /// The linearizability search gave up (counts as no verdict, not a violation).
    pub too_complex: bool,
    pub ticks: u64,
    pub faults: FaultCounts,
}

/// What the fault phase actually did, to show the faults are real.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub dropped: u64,
    pub duplicated: u64,
    pub partitions: u64,
    pub crashes: u64,
    /// Highest ballot round any replica promised: a rough count of elections.
    pub max_round: u64,
    /// Client operations whose outcome stayed unknown (the client gave up).
    pub unknown_outcomes: u64,
    /// Times some clients were cut off from some replicas.
    pub client_partitions: u64,
    /// Disk stalls, and those that ended in a crash losing the unsynced tail.
    pub disk_stalls: u64,
    pub stall_crashes: u64,
    /// Two replicas crashed in the same tick.
    pub double_crashes: u64,
    /// Membership changes the leader accepted (proposed) and refused.
    pub changes_accepted: u64,
    pub changes_refused: u64,
    /// Configuration entries chosen (C(old,new), C(new) and learner changes).
    pub configurations_chosen: u64,
    /// Snapshots made durable, snapshot transfers sent, and snapshots installed by
    /// a receiver (a transfer lost to a drop or a crash is never installed).
    pub snapshots_saved: u64,
    pub snapshots_sent: u64,
    pub snapshots_installed: u64,
    /// Replicas that lost their disk and came back amnesic.
    pub disk_wipes: u64,
}

/// Runs one seed. A panic inside the core or the simulator (a broken assertion) is
/// reported as a violation of this seed, not a crash of the caller.
pub fn run_seed(options: &SimOptions) -> SeedOutcome {
    let result = catch_unwind(AssertUnwindSafe(|| Sim::new(options.clone()).run()));
    match result {
        Ok(outcome) => outcome,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                .unwrap_or_else(|| "non-string panic".to_string());
            SeedOutcome {
                seed: options.seed,
                replicas: options.replicas,
                ops: 0,
                committed: 0,
                violation: Some(format!("panic: {message}")),
                too_complex: false,
                ticks: 0,
                faults: FaultCounts::default(),
            }
        }
    }
}

/// A snapshot of a replica's applied state: what a real replica writes to disk and
/// ships to lagging peers (the applier's export carries the dedup table and clock).
#[derive(Clone)]
struct SimSnapshot {
    slot: Slot,
    machine: KvMachine,
    applier_state: Vec<u8>,
    /// The configuration in force at `slot`.
    configuration: Configuration,
}

impl SimSnapshot {
    fn of(applier: &Applier<KvMachine>, configuration: &Configuration) -> SimSnapshot {
        SimSnapshot {
            slot: applier.applied_index,
            machine: applier.machine.clone(),
            applier_state: applier.export_state(),
            configuration: configuration.clone(),
        }
    }

    /// Rebuilds the applier exactly as it was when the snapshot was taken.
    fn restore(&self, id: NodeId) -> Applier<KvMachine> {
        let mut applier = Applier::new(id, self.machine.clone());
        applier
            .import_state(&self.applier_state)
            .expect("a snapshot's own export imports");
        assert_eq!(applier.applied_index, self.slot);
        applier
    }
}

/// A durable write of one replica, completing in order with the others.
enum DiskWrite {
    Persist {
        token: u64,
        record: PersistRecord,
    },
    /// Log deletion below a durable snapshot (ordered after earlier persists, as
    /// the store applies batches in submission order).
    Compact {
        below: Slot,
    },
    /// A snapshot this replica took; `SnapshotSaved` follows when it is durable.
    SaveSnapshot(SimSnapshot),
    /// A snapshot received from a peer; `SnapshotInstalled` follows when durable.
    InstallSnapshot(SimSnapshot),
}

struct Node {
    replica: Option<Replica>,
    applier: Applier<KvMachine>,
    /// The configuration in force at the applier's slot, followed from the applied
    /// stream (`Apply` of configuration entries) as a runtime would; snapshots
    /// store it.
    applied_config: Configuration,
    durable: DurableState,
    /// Newest durable snapshots, oldest first (at most two are kept).
    snapshots: Vec<SimSnapshot>,
    /// Outstanding disk writes, completing in order: (done tick, write).
    persists: VecDeque<(u64, DiskWrite)>,
    /// Peers this replica is shipping a snapshot to (one transfer per peer).
    sending_snapshot_to: BTreeSet<NodeId>,
    restart_at: u64,
    restarts: u64,
    /// In-memory promise seen at the last check; must never decrease while up.
    last_promised: Ballot,
    /// No persist completes before this tick (a stalled disk).
    disk_stalled_until: u64,
    /// A stall is in progress; it is resolved (resume or crash) when it ends.
    disk_stalled: bool,
    /// How far this replica's wall clock runs ahead of the simulation's.
    clock_offset_ms: u64,
}

/// What travels between clients and replicas, through the simulated network.
#[derive(Clone)]
enum ClientMessage {
    /// A client's request arriving at replica `to`.
    Request { to: NodeId, event: Event },
    /// A replica's answer travelling back to the client of `request`.
    Response {
        request: RequestId,
        response: Response,
    },
}

#[derive(Clone)]
enum Response {
    /// The state machine's result for a command, decoded when it reaches the
    /// client still waiting for it (a stale retry's `STALE_RESULT` never does).
    Applied(Vec<u8>),
    /// A read served by the replica when it answered.
    Output(KvOutput),
    NotLeader {
        leader_hint: Option<NodeId>,
    },
    Busy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Read(ReadMode),
    /// Through the log (writes, and some gets).
    Log,
}

struct PendingOp {
    history_index: usize,
    path: Path,
    payload: Vec<u8>,
    key: IdempotencyKey,
    attempts: u32,
    /// Current attempt's request id, when it is outstanding.
    request: Option<RequestId>,
    deadline: u64,
    retry_at: u64,
}

struct Client {
    id: u64,
    seq: u64,
    target: NodeId,
    op: Option<PendingOp>,
    /// The next operation is issued no earlier than this tick.
    next_issue: u64,
}

struct Sim {
    options: SimOptions,
    rng: SplitMix64,
    tick: u64,
    config: Configuration,
    nodes: Vec<Node>,
    network: BTreeMap<(u64, u64), (NodeId, NodeId, Message)>,
    /// Snapshot transfers in flight, keyed like `network`: (from, to, snapshot).
    snapshot_network: BTreeMap<(u64, u64), (NodeId, NodeId, SimSnapshot)>,
    network_seq: u64,
    blocked: BTreeSet<(NodeId, NodeId)>,
    partition_until: u64,
    /// Client messages in flight, keyed like `network`.
    client_network: BTreeMap<(u64, u64), (usize, ClientMessage)>,
    /// (client index, replica) pairs that cannot reach each other, both ways.
    client_blocked: BTreeSet<(usize, NodeId)>,
    client_partition_until: u64,
    faults_on: bool,
    clients: Vec<Client>,
    history: Vec<Operation>,
    requests: HashMap<RequestId, (usize, usize)>,
    next_request: RequestId,
    issued: usize,
    committed: usize,
    /// Ground truth: per (slot, ballot), the value and the replicas that durably
    /// accepted it. A quorum of the configuration governing the slot makes it chosen.
    accepted: BTreeMap<(Slot, Ballot), (Value, BTreeSet<NodeId>)>,
    /// `governing[s - 1]` is the configuration governing slot s, known for every slot
    /// up to one past the applied prefix: the latest configuration entry before s
    /// (the core's stall rule), or the first configuration.
    governing: Vec<Configuration>,
    chosen: BTreeMap<Slot, Value>,
    /// What replicas applied, slot by slot; every replica must apply the same.
    applied: Vec<Value>,
    acknowledged_writes: Vec<IdempotencyKey>,
    violation: Option<String>,
    counts: FaultCounts,
    scratch: Vec<Action>,
    replies: Vec<(RequestId, Vec<u8>)>,
}

impl Sim {
    fn new(options: SimOptions) -> Sim {
        assert!(options.replicas >= 1);
        let voters: Vec<NodeId> = (1..=options.replicas as NodeId).collect();
        let config = Configuration::new(voters.iter().copied());
        let ids: Vec<NodeId> =
            (1..=(options.replicas + options.spare_replicas) as NodeId).collect();
        let mut rng = SplitMix64::new(options.seed ^ 0x5EED_0F5A_u64);
        let mut nodes: Vec<Node> = ids
            .iter()
            .map(|&id| Node {
                applied_config: config.clone(),
                replica: Some(Replica::new(
                    id,
                    config.clone(),
                    options.params.clone(),
                    options.seed,
                )),
                applier: Applier::new(id, KvMachine::default()),
                durable: DurableState::default(),
                snapshots: Vec::new(),
                persists: VecDeque::new(),
                sending_snapshot_to: BTreeSet::new(),
                restart_at: 0,
                restarts: 0,
                last_promised: Ballot::ZERO,
                disk_stalled_until: 0,
                disk_stalled: false,
                clock_offset_ms: 0,
            })
            .collect();
        for node in &mut nodes {
            node.clock_offset_ms = rng.range(0, options.faults.clock_offset_ms_max + 1);
        }
        let clients = (0..options.clients as u64)
            .map(|id| Client {
                id: id + 1,
                seq: 0,
                target: rng.range(1, ids.len() as u64 + 1),
                op: None,
                next_issue: 0,
            })
            .collect();
        Sim {
            options,
            rng,
            tick: 0,
            governing: vec![config.clone()],
            config,
            nodes,
            network: BTreeMap::new(),
            snapshot_network: BTreeMap::new(),
            network_seq: 0,
            blocked: BTreeSet::new(),
            partition_until: 0,
            client_network: BTreeMap::new(),
            client_blocked: BTreeSet::new(),
            client_partition_until: 0,
            faults_on: true,
            clients,
            history: Vec::new(),
            requests: HashMap::new(),
            next_request: 1,
            issued: 0,
            committed: 0,
            accepted: BTreeMap::new(),
            chosen: BTreeMap::new(),
            applied: Vec::new(),
            acknowledged_writes: Vec::new(),
            violation: None,
            counts: FaultCounts::default(),
            scratch: Vec::new(),
            replies: Vec::new(),
        }
    }

    fn fail(&mut self, message: String) {
        if self.violation.is_none() {
            self.violation = Some(format!("tick {}: {message}", self.tick));
        }
    }

    fn run(mut self) -> SeedOutcome {
        let fault_ops = self.options.ops * 3 / 4;
        while self.tick < self.options.fault_phase_ticks_max && self.issued < fault_ops {
            self.step(fault_ops);
            if self.violation.is_some() {
                return self.outcome(false);
            }
        }
        self.heal();
        let mut deadline = self.tick + self.options.liveness_ticks_max;
        let mut committed_seen = self.committed;
        loop {
            if self.committed != committed_seen {
                // Operations keep completing: the window counts from the latest one, so
                // a run with more operations than one window can carry (`--ops` 400:
                // four clients that think up to 30 ticks between operations) is judged
                // on progress, and a stall still fails after one window.
                committed_seen = self.committed;
                deadline = self.tick + self.options.liveness_ticks_max;
            }
            let done =
                self.issued == self.options.ops && self.clients.iter().all(|c| c.op.is_none());
            // Every member of the latest configuration applied the same prefix, and a
            // change left half-done by the fault phase was completed.
            let converged = {
                let config = self.governing.last().expect("never empty");
                let applied: BTreeSet<Slot> = config
                    .members()
                    .map(|id| self.nodes[(id - 1) as usize].applier.applied_index)
                    .collect();
                applied.len() == 1 && !config.is_joint()
            };
            if done && converged {
                break;
            }
            if self.tick >= deadline {
                let pending = self.clients.iter().filter(|c| c.op.is_some()).count();
                let applied: Vec<Slot> = self
                    .nodes
                    .iter()
                    .map(|node| node.applier.applied_index)
                    .collect();
                let config = self.governing.last().expect("never empty");
                // What each replica's core believes, so a stuck run can be read
                // without replaying it under a debugger.
                let statuses: Vec<String> = self
                    .nodes
                    .iter()
                    .enumerate()
                    .map(|(index, node)| match &node.replica {
                        Some(replica) => format!("\n  {:?}", replica.status()),
                        None => format!("\n  replica {} is down", index + 1),
                    })
                    .collect();
                self.fail(format!(
                    "liveness: {} ticks after healing or the last completed operation, {pending} clients still wait and applied indexes are {applied:?} (configuration {config:?}); replicas:{}",
                    self.options.liveness_ticks_max,
                    statuses.concat()
                ));
                return self.outcome(false);
            }
            self.step(self.options.ops);
            if self.violation.is_some() {
                return self.outcome(false);
            }
        }
        self.check_acknowledged_writes();
        let mut too_complex = false;
        if self.violation.is_none() {
            match check(&self.history) {
                CheckResult::Linearizable => {}
                CheckResult::Violation { key, detail } => {
                    self.fail(format!("not linearizable on key {key:?}:\n{detail}"));
                }
                CheckResult::TooComplex { .. } => too_complex = true,
            }
        }
        self.outcome(too_complex)
    }

    fn outcome(&self, too_complex: bool) -> SeedOutcome {
        SeedOutcome {
            seed: self.options.seed,
            replicas: self.options.replicas,
            ops: self.issued,
            committed: self.committed,
            violation: self.violation.clone(),
            too_complex,
            ticks: self.tick,
            faults: FaultCounts {
                max_round: self
                    .nodes
                    .iter()
                    .map(|node| node.durable.promised.round)
                    .max()
                    .unwrap_or(0),
                unknown_outcomes: self.history.iter().filter(|op| op.ret.is_none()).count() as u64,
                ..self.counts
            },
        }
    }

    /// One tick: faults, message deliveries, persist completions, replica ticks,
    /// clients, then the per-step invariants.
    fn step(&mut self, issue_limit: usize) {
        self.tick += 1;
        if self.faults_on {
            self.inject_faults();
        }
        self.restart_due();
        while let Some(entry) = self.network.first_entry() {
            if entry.key().0 > self.tick {
                break;
            }
            let (from, to, msg) = entry.remove();
            self.step_replica(to, Event::Message { from, msg });
        }
        while let Some(entry) = self.snapshot_network.first_entry() {
            if entry.key().0 > self.tick {
                break;
            }
            let (from, to, snapshot) = entry.remove();
            self.deliver_snapshot(from, to, snapshot);
        }
        while let Some(entry) = self.client_network.first_entry() {
            if entry.key().0 > self.tick {
                break;
            }
            let (client, msg) = entry.remove();
            self.deliver_client_message(client, msg);
        }
        for index in 0..self.nodes.len() {
            if self.tick < self.nodes[index].disk_stalled_until {
                continue;
            }
            while self.nodes[index]
                .persists
                .front()
                .is_some_and(|(done, _)| *done <= self.tick)
            {
                let (_, write) = self.nodes[index].persists.pop_front().expect("checked");
                self.complete_write(index, write);
            }
        }
        for id in 1..=self.nodes.len() as NodeId {
            if self.faults_on && self.rng.chance(self.options.faults.tick_skip_per_million) {
                continue;
            }
            let now_ms = self.tick * TICK_MS + self.nodes[(id - 1) as usize].clock_offset_ms;
            self.step_replica(id, Event::Tick { now_ms });
        }
        self.run_clients(issue_limit);
        self.check_promises();
    }

    fn heal(&mut self) {
        self.faults_on = false;
        self.blocked.clear();
        self.client_blocked.clear();
        for node in &mut self.nodes {
            node.disk_stalled_until = 0;
            node.disk_stalled = false;
            if node.replica.is_none() {
                node.restart_at = self.tick;
            }
        }
    }

    // ---- faults ----------------------------------------------------------------------

    fn inject_faults(&mut self) {
        let faults = self.options.faults.clone();
        let n = self.nodes.len() as u64;
        if !self.blocked.is_empty() && self.tick >= self.partition_until {
            self.blocked.clear();
        }
        if self.blocked.is_empty() && n > 1 && self.rng.chance(faults.partition_per_million) {
            match self.rng.range(0, 3) {
                0 => {
                    // Symmetric split into two random sides.
                    let side: Vec<bool> = (0..n).map(|_| self.rng.chance(500_000)).collect();
                    for a in 0..n {
                        for b in 0..n {
                            if side[a as usize] != side[b as usize] {
                                self.blocked.insert((a + 1, b + 1));
                            }
                        }
                    }
                }
                1 => {
                    // One replica isolated both ways.
                    let lonely = self.rng.range(1, n + 1);
                    for other in (1..=n).filter(|other| *other != lonely) {
                        self.blocked.insert((lonely, other));
                        self.blocked.insert((other, lonely));
                    }
                }
                _ => {
                    // Asymmetric: some links fail in one direction only.
                    for _ in 0..self.rng.range(1, n + 1) {
                        let from = self.rng.range(1, n + 1);
                        let to = self.rng.range(1, n + 1);
                        if from != to {
                            self.blocked.insert((from, to));
                        }
                    }
                }
            }
            self.counts.partitions += 1;
            self.partition_until = self.tick
                + self
                    .rng
                    .range(faults.partition_ticks_min, faults.partition_ticks_max + 1);
        }
        if self.client_blocked.is_empty() && self.rng.chance(faults.client_partition_per_million) {
            // Some clients lose some replicas: a client may still reach a replica
            // that cannot answer it, or only replicas that are not the leader.
            for client in 0..self.clients.len() {
                if !self.rng.chance(500_000) {
                    continue;
                }
                for replica in 1..=n {
                    if self.rng.chance(500_000) {
                        self.client_blocked.insert((client, replica));
                    }
                }
            }
            self.counts.client_partitions += 1;
            self.client_partition_until = self.tick
                + self
                    .rng
                    .range(faults.partition_ticks_min, faults.partition_ticks_max + 1);
        } else if !self.client_blocked.is_empty() && self.tick >= self.client_partition_until {
            self.client_blocked.clear();
        }
        self.resolve_disk_stalls();
        if self.rng.chance(faults.disk_stall_per_million) {
            self.stall_disk();
        }
        if self.down() == 0
            && self.options.replicas >= 5
            && self.rng.chance(faults.double_crash_per_million)
        {
            self.counts.double_crashes += 1;
            self.crash_one(true);
            self.crash_one(false);
        }
        // The budget is checked before drawing, so that without spare replicas and
        // membership changes a seed draws exactly what it drew before they existed.
        if self.crash_budget_left()
            && self.counts.disk_wipes == 0
            && self.rng.chance(faults.disk_wipe_per_million)
        {
            self.wipe_one();
        }
        if self.crash_budget_left() && self.rng.chance(faults.crash_per_million) {
            let leader_first = self.rng.chance(500_000);
            self.crash_one(leader_first);
        }
        if faults.membership_change_per_million > 0
            && self.rng.chance(faults.membership_change_per_million)
        {
            self.change_membership();
        }
    }

    /// Asks the leader (if any) for a random membership change, as an operator would.
    /// Most requests are sensible, so changes do happen; refusals are counted.
    fn change_membership(&mut self) {
        let Some(leader_index) = self.leader_index() else {
            return;
        };
        let leader = leader_index as NodeId + 1;
        let config = self.nodes[leader_index]
            .replica
            .as_ref()
            .expect("the leader is up")
            .configuration()
            .clone();
        let all: Vec<NodeId> = (1..=self.nodes.len() as NodeId).collect();
        let outside: Vec<NodeId> = all
            .iter()
            .copied()
            .filter(|id| !config.is_member(*id))
            .collect();
        let learners: Vec<NodeId> = config.learners.iter().copied().collect();
        let voters: Vec<NodeId> = config.voters.iter().copied().collect();
        let change = match self.rng.range(0, 6) {
            0 if !outside.is_empty() => MembershipChange::AddLearner(self.pick(&outside)),
            1 if !learners.is_empty() && voters.len() < VOTERS_MAX => {
                MembershipChange::Promote(self.pick(&learners))
            }
            2 if voters.len() > VOTERS_MIN => MembershipChange::Remove(self.pick(&voters)),
            2 if !learners.is_empty() => MembershipChange::Remove(self.pick(&learners)),
            3 => {
                // Replace a majority: keep a minority of today's voters and take the
                // rest from the learners; some removed voters stay as learners.
                let size = voters.len();
                let keep = (size - 1) / 2;
                if learners.len() < size - keep {
                    match outside.is_empty() {
                        true => return,
                        false => MembershipChange::AddLearner(self.pick(&outside)),
                    }
                } else {
                    let mut new_voters = BTreeSet::new();
                    let mut old = voters.clone();
                    for _ in 0..keep {
                        let index = self.rng.range(0, old.len() as u64) as usize;
                        new_voters.insert(old.swap_remove(index));
                    }
                    let mut candidates = learners.clone();
                    while new_voters.len() < size {
                        let index = self.rng.range(0, candidates.len() as u64) as usize;
                        new_voters.insert(candidates.swap_remove(index));
                    }
                    let mut new_learners: BTreeSet<NodeId> = candidates.into_iter().collect();
                    for id in old {
                        if self.rng.chance(500_000) {
                            new_learners.insert(id);
                        }
                    }
                    MembershipChange::Replace {
                        voters: new_voters,
                        learners: new_learners,
                    }
                }
            }
            4 | 5 => {
                // Remove the leader (replacing it by a learner when at the minimum).
                if voters.len() > VOTERS_MIN {
                    MembershipChange::Remove(leader)
                } else if !learners.is_empty() {
                    let mut new_voters: BTreeSet<NodeId> = config.voters.clone();
                    new_voters.remove(&leader);
                    let promoted = self.pick(&learners);
                    new_voters.insert(promoted);
                    let mut new_learners = config.learners.clone();
                    new_learners.remove(&promoted);
                    MembershipChange::Replace {
                        voters: new_voters,
                        learners: new_learners,
                    }
                } else if !outside.is_empty() {
                    MembershipChange::AddLearner(self.pick(&outside))
                } else {
                    return;
                }
            }
            _ => return,
        };
        let force = self.rng.chance(100_000);
        let request = self.next_request;
        self.next_request += 1;
        self.step_replica(
            leader,
            Event::ChangeMembership {
                request,
                change,
                force,
            },
        );
    }

    fn pick(&mut self, ids: &[NodeId]) -> NodeId {
        ids[self.rng.range(0, ids.len() as u64) as usize]
    }

    /// Every configuration that may govern a slot not yet applied: the one after the
    /// applied prefix and each one a replica durably accepted beyond it.
    fn active_configurations(&self) -> Vec<Configuration> {
        let mut configs = vec![self.governing.last().expect("never empty").clone()];
        let next = self.governing.len() as Slot;
        for ((_, _), (value, _)) in self.accepted.range((next, Ballot::ZERO)..) {
            if let Value::Configuration(config) = value {
                if !configs.contains(config) {
                    configs.push(Configuration::clone(config));
                }
            }
        }
        configs
    }

    /// Some live replica may crash (see `may_crash`).
    fn crash_budget_left(&self) -> bool {
        (0..self.nodes.len())
            .any(|index| self.nodes[index].replica.is_some() && self.may_crash(index))
    }

    /// A crash of `victim` leaves a quorum of every active configuration up (crashes
    /// of replicas outside them are always allowed), so the fault phase keeps making
    /// progress now and then.
    fn may_crash(&self, victim: usize) -> bool {
        // An amnesic replica (lost its disk) never votes: it counts as down.
        let up = |id: NodeId| {
            let index = (id - 1) as usize;
            let node = &self.nodes[index];
            index != victim && node.replica.is_some() && !node.durable.amnesic
        };
        self.active_configurations()
            .iter()
            .all(|config| config.is_quorum(up))
    }

    /// Replicas that cannot vote: crashed, or amnesic after a disk wipe.
    fn down(&self) -> usize {
        self.nodes
            .iter()
            .filter(|node| node.replica.is_none() || node.durable.amnesic)
            .count()
    }

    /// A random live replica crashes and loses its disk: it restarts amnesic.
    fn wipe_one(&mut self) {
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].replica.is_some())
            .collect();
        if live.is_empty() {
            return;
        }
        let victim = live[self.rng.range(0, live.len() as u64) as usize];
        if !self.may_crash(victim) {
            return;
        }
        self.crash(victim);
        self.counts.disk_wipes += 1;
        let node = &mut self.nodes[victim];
        node.durable = DurableState {
            amnesic: true,
            ..DurableState::default()
        };
        node.snapshots.clear();
        node.last_promised = Ballot::ZERO;
    }

    fn leader_index(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|i| {
            self.nodes[*i]
                .replica
                .as_ref()
                .is_some_and(|r| r.status().leading.is_some())
        })
    }

    /// Crashes the leader (when `leader` and there is one) or a random live replica,
    /// if that leaves a quorum of every active configuration up.
    fn crash_one(&mut self, leader: bool) {
        if !self.crash_budget_left() {
            return;
        }
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].replica.is_some())
            .collect();
        let victim = match self.leader_index() {
            Some(index) if leader => index,
            _ if live.is_empty() => return,
            _ => live[self.rng.range(0, live.len() as u64) as usize],
        };
        if self.may_crash(victim) {
            self.crash(victim);
        }
    }

    /// The replica loses its memory and every persist not yet completed.
    fn crash(&mut self, victim: usize) {
        let faults = &self.options.faults;
        let down_ticks = self
            .rng
            .range(faults.down_ticks_min, faults.down_ticks_max + 1);
        self.counts.crashes += 1;
        let node = &mut self.nodes[victim];
        node.replica = None;
        node.persists.clear();
        node.sending_snapshot_to.clear();
        node.disk_stalled = false;
        node.disk_stalled_until = 0;
        node.restart_at = self.tick + down_ticks;
    }

    /// Stops a random live replica's disk; half of the time the leader crashes too,
    /// so an election runs while that replica's promises and accepts are unsynced.
    fn stall_disk(&mut self) {
        let candidates: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].replica.is_some() && !self.nodes[*i].disk_stalled)
            .collect();
        if candidates.is_empty() {
            return;
        }
        let index = candidates[self.rng.range(0, candidates.len() as u64) as usize];
        let faults = &self.options.faults;
        let stall_ticks = self
            .rng
            .range(faults.disk_stall_ticks_min, faults.disk_stall_ticks_max + 1);
        self.counts.disk_stalls += 1;
        self.nodes[index].disk_stalled = true;
        self.nodes[index].disk_stalled_until = self.tick + stall_ticks;
        if self.rng.chance(500_000) && self.leader_index().is_some_and(|l| l != index) {
            self.crash_one(true);
        }
    }

    /// A stall that ends crashes its replica half of the time (before any of the
    /// stalled persists completes: the whole unsynced tail is lost).
    fn resolve_disk_stalls(&mut self) {
        for index in 0..self.nodes.len() {
            let node = &self.nodes[index];
            if !node.disk_stalled || self.tick < node.disk_stalled_until {
                continue;
            }
            self.nodes[index].disk_stalled = false;
            if self.rng.chance(500_000) && self.may_crash(index) {
                self.counts.stall_crashes += 1;
                self.crash(index);
            }
        }
    }

    fn restart_due(&mut self) {
        for index in 0..self.nodes.len() {
            let node = &mut self.nodes[index];
            if node.replica.is_some() || node.restart_at > self.tick {
                continue;
            }
            node.restarts += 1;
            let id = index as NodeId + 1;
            let seed = self.options.seed ^ node.restarts.wrapping_mul(0x9E37_79B9);
            // Like a real replica: restore the newest durable snapshot, then replay.
            (node.applier, node.applied_config) = match node.snapshots.last() {
                Some(snapshot) => (snapshot.restore(id), snapshot.configuration.clone()),
                None => (Applier::new(id, KvMachine::default()), self.config.clone()),
            };
            node.durable.snapshot_slot = node.applier.applied_index;
            let replica = Replica::restart(
                id,
                node.applied_config.clone(),
                self.options.params.clone(),
                seed,
                node.durable.clone(),
            );
            node.last_promised = replica.status().promised;
            node.replica = Some(replica);
            self.check_restarted_log(index);
        }
    }

    // ---- replicas --------------------------------------------------------------------

    fn step_replica(&mut self, id: NodeId, event: Event) {
        let index = (id - 1) as usize;
        let Some(replica) = self.nodes[index].replica.as_mut() else {
            return;
        };
        let mut actions = std::mem::take(&mut self.scratch);
        replica.handle(event, &mut actions);
        for action in actions.drain(..) {
            self.perform(id, action);
        }
        self.scratch = actions;
    }

    fn perform(&mut self, id: NodeId, action: Action) {
        let index = (id - 1) as usize;
        match action {
            Action::Persist { token, record } => {
                let faults = &self.options.faults;
                let delay = self
                    .rng
                    .range(faults.persist_ticks_min, faults.persist_ticks_max + 1);
                self.queue_write(index, delay, DiskWrite::Persist { token, record });
            }
            Action::Compact { below } => self.queue_write(index, 0, DiskWrite::Compact { below }),
            Action::Send { to, msg } => {
                if let Message::Promise { ballot, .. } | Message::Accepted { ballot, .. } = &msg {
                    let durable = self.nodes[index].durable.promised;
                    if durable < *ballot {
                        self.fail(format!("replica {id} replied in {ballot:?} before persisting it (durable {durable:?})"));
                    }
                }
                self.transmit(id, to, msg);
            }
            Action::Apply { slot, value } => {
                self.check_applied(id, slot, &value);
                let mut replies = std::mem::take(&mut self.replies);
                self.nodes[index].applier.apply(slot, &value, &mut replies);
                if let Value::Configuration(config) = &value {
                    self.nodes[index].applied_config = Configuration::clone(config);
                }
                if let Some(replica) = &self.nodes[index].replica {
                    // The applied stream and the core agree on the configuration
                    // once the core has applied this far too.
                    if replica.status().applied_index == slot
                        && replica.applied_configuration() != &self.nodes[index].applied_config
                    {
                        self.fail(format!(
                            "replica {id} reports another applied configuration at slot {slot}"
                        ));
                    }
                }
                for (request, result) in replies.drain(..) {
                    self.respond(id, request, Response::Applied(result));
                }
                self.replies = replies;
                self.maybe_snapshot(index);
            }
            Action::Reply { request, outcome } => self.on_reply(id, request, outcome),
            Action::SendSnapshot { to, slot } => self.send_snapshot(id, to, slot),
        }
    }

    fn queue_write(&mut self, index: usize, delay: u64, write: DiskWrite) {
        let last = self.nodes[index]
            .persists
            .back()
            .map_or(0, |(done, _)| *done);
        let done = last.max(self.tick + delay);
        self.nodes[index].persists.push_back((done, write));
    }

    fn complete_write(&mut self, index: usize, write: DiskWrite) {
        let id = index as NodeId + 1;
        match write {
            DiskWrite::Persist { token, record } => {
                self.record_durable(id, &record);
                self.nodes[index].durable.apply(&record);
                self.step_replica(id, Event::Persisted { token });
            }
            DiskWrite::Compact { below } => {
                let snapshot_slot = self.nodes[index].durable.snapshot_slot;
                if snapshot_slot + 1 < below {
                    self.fail(format!(
                        "replica {id} compacted below {below} with its newest snapshot at {snapshot_slot}"
                    ));
                }
                let durable = &mut self.nodes[index].durable;
                durable.log = durable.log.split_off(&below);
                durable.log_start = durable.log_start.max(below);
            }
            DiskWrite::SaveSnapshot(snapshot) => {
                let slot = snapshot.slot;
                self.keep_snapshot(index, snapshot);
                self.counts.snapshots_saved += 1;
                self.step_replica(id, Event::SnapshotSaved { slot });
            }
            DiskWrite::InstallSnapshot(snapshot) => {
                // Applied past it meanwhile (caught up from the log): nothing to do.
                if snapshot.slot <= self.nodes[index].applier.applied_index {
                    return;
                }
                let slot = snapshot.slot;
                let configuration = snapshot.configuration.clone();
                self.nodes[index].applier = snapshot.restore(id);
                self.nodes[index].applied_config = configuration.clone();
                self.check_state(id, &self.nodes[index].applier.clone(), "installed snapshot");
                self.keep_snapshot(index, snapshot);
                self.counts.snapshots_installed += 1;
                self.step_replica(
                    id,
                    Event::SnapshotInstalled {
                        slot,
                        configuration,
                    },
                );
                if self.faults_on
                    && self.crash_budget_left()
                    && self.may_crash(index)
                    && self
                        .rng
                        .chance(self.options.faults.crash_after_install_per_million)
                {
                    self.crash(index);
                }
            }
        }
    }

    /// Compares a replica's whole applied state (machine, dedup table, clock) with
    /// the state obtained by replaying the values every replica applied, from scratch.
    fn check_state(&mut self, id: NodeId, applier: &Applier<KvMachine>, what: &str) {
        let slot = applier.applied_index;
        if slot as usize > self.applied.len() {
            self.fail(format!(
                "replica {id} has a {what} at slot {slot}, past every applied slot"
            ));
            return;
        }
        let mut expected = Applier::new(0, KvMachine::default());
        let mut replies = Vec::new();
        for (position, value) in self.applied[..slot as usize].iter().enumerate() {
            expected.apply(position as Slot + 1, value, &mut replies);
        }
        if expected.machine != applier.machine || expected.export_state() != applier.export_state()
        {
            self.fail(format!(
                "replica {id}: {what} at slot {slot} differs from replaying the applied log"
            ));
        }
    }

    /// Makes `snapshot` the newest durable one (unless a newer one is kept already).
    fn keep_snapshot(&mut self, index: usize, snapshot: SimSnapshot) {
        let node = &mut self.nodes[index];
        if node
            .snapshots
            .last()
            .is_some_and(|newest| newest.slot >= snapshot.slot)
        {
            return;
        }
        node.durable.snapshot_slot = snapshot.slot;
        node.snapshots.push(snapshot);
        if node.snapshots.len() > 2 {
            node.snapshots.remove(0);
        }
    }

    /// Every `snapshot_every_slots` applied slots, the replica writes a snapshot.
    fn maybe_snapshot(&mut self, index: usize) {
        let every = self.options.snapshot_every_slots;
        let applied = self.nodes[index].applier.applied_index;
        if every == 0 || !applied.is_multiple_of(every) {
            return;
        }
        let snapshot = SimSnapshot::of(
            &self.nodes[index].applier,
            &self.nodes[index].applied_config,
        );
        self.check_state(
            index as NodeId + 1,
            &self.nodes[index].applier.clone(),
            "snapshot",
        );
        let delay = self.rng.range(0, self.options.snapshot_write_ticks_max + 1);
        self.queue_write(index, delay, DiskWrite::SaveSnapshot(snapshot));
    }

    /// Ships the newest durable snapshot through the network: it can be delayed or
    /// lost (a dropped connection), and it arrives whole or not at all.
    fn send_snapshot(&mut self, from: NodeId, to: NodeId, slot: Slot) {
        let index = (from - 1) as usize;
        let Some(snapshot) = self.nodes[index].snapshots.last().cloned() else {
            self.fail(format!(
                "replica {from} asked to send a snapshot to {to} from slot {slot} but has none"
            ));
            return;
        };
        if snapshot.slot + 1 < slot {
            self.fail(format!(
                "replica {from} has compacted below {slot} but its newest snapshot is at {}",
                snapshot.slot
            ));
            return;
        }
        if !self.nodes[index].sending_snapshot_to.insert(to) {
            return;
        }
        self.counts.snapshots_sent += 1;
        if self.faults_on
            && (self.blocked.contains(&(from, to))
                || self.rng.chance(self.options.faults.drop_per_million))
        {
            // Lost on the way; the sender may try again later.
            self.nodes[index].sending_snapshot_to.remove(&to);
            return;
        }
        // A snapshot is large: it takes longer than a message.
        let faults = &self.options.faults;
        let delay = self
            .rng
            .range(faults.delay_ticks_min, 4 * faults.delay_ticks_max + 1);
        self.network_seq += 1;
        self.snapshot_network
            .insert((self.tick + delay, self.network_seq), (from, to, snapshot));
    }

    fn deliver_snapshot(&mut self, from: NodeId, to: NodeId, snapshot: SimSnapshot) {
        self.nodes[(from - 1) as usize]
            .sending_snapshot_to
            .remove(&to);
        let index = (to - 1) as usize;
        if self.nodes[index].replica.is_none()
            || snapshot.slot <= self.nodes[index].applier.applied_index
        {
            return;
        }
        let delay = self.rng.range(0, self.options.snapshot_write_ticks_max + 1);
        self.queue_write(index, delay, DiskWrite::InstallSnapshot(snapshot));
    }

    fn transmit(&mut self, from: NodeId, to: NodeId, msg: Message) {
        if self.faults_on {
            if self.blocked.contains(&(from, to))
                || self.rng.chance(self.options.faults.drop_per_million)
            {
                self.counts.dropped += 1;
                return;
            }
            if self.rng.chance(self.options.faults.duplicate_per_million) {
                self.counts.duplicated += 1;
                self.enqueue(from, to, msg.clone());
            }
        }
        self.enqueue(from, to, msg);
    }

    fn enqueue(&mut self, from: NodeId, to: NodeId, msg: Message) {
        let faults = &self.options.faults;
        let at = self.tick
            + self
                .rng
                .range(faults.delay_ticks_min, faults.delay_ticks_max + 1);
        self.network_seq += 1;
        self.network.insert((at, self.network_seq), (from, to, msg));
    }

    // ---- invariants ------------------------------------------------------------------

    /// Ground truth of "chosen": a quorum durably accepted the same (slot, ballot).
    /// At most one value may ever be chosen per slot.
    /// Every entry a restarted replica trusts as chosen holds the value applied (or
    /// known chosen) at that slot.
    fn check_restarted_log(&mut self, index: usize) {
        let Some(replica) = &self.nodes[index].replica else {
            return;
        };
        let status = replica.status();
        let mut wrong = None;
        for slot in status.log_start..=status.chosen_index {
            let Some(entry) = replica.entry(slot) else {
                continue;
            };
            if !entry.chosen {
                continue;
            }
            let truth = self
                .applied
                .get((slot - 1) as usize)
                .or_else(|| self.chosen.get(&slot));
            if truth.is_some_and(|truth| *truth != entry.value) {
                wrong = Some(slot);
                break;
            }
        }
        if let Some(slot) = wrong {
            self.fail(format!(
                "replica {} restarted with a wrong value marked chosen at slot {slot} (snapshot {}, log start {})",
                index + 1,
                status.snapshot_slot,
                status.log_start
            ));
        }
    }

    fn record_durable(&mut self, id: NodeId, record: &PersistRecord) {
        if self.nodes[(id - 1) as usize].durable.amnesic
            && !self.options.params.bug_amnesic_replica_votes
        {
            // Stored to learn from, never acknowledged: not a vote.
            return;
        }
        for (slot, entry) in &record.entries {
            if entry.chosen {
                continue;
            }
            let (value, acceptors) = self
                .accepted
                .entry((*slot, entry.ballot))
                .or_insert_with(|| (entry.value.clone(), BTreeSet::new()));
            if *value != entry.value {
                let message = format!(
                    "two values accepted in slot {slot} ballot {:?}",
                    entry.ballot
                );
                self.fail(message);
                return;
            }
            acceptors.insert(id);
            self.judge_chosen(*slot, entry.ballot);
        }
    }

    /// Marks (slot, ballot) chosen if a quorum of the configuration governing the
    /// slot durably accepted it. Waits (returns) while that configuration is not
    /// known yet: it is judged again once the slot before it is applied.
    fn judge_chosen(&mut self, slot: Slot, ballot: Ballot) {
        let Some(config) = self.governing.get((slot - 1) as usize) else {
            return;
        };
        let (value, acceptors) = &self.accepted[&(slot, ballot)];
        if !config.is_quorum(|node| acceptors.contains(&node)) {
            return;
        }
        let value = value.clone();
        match self.chosen.get(&slot) {
            Some(chosen) if *chosen != value => {
                self.fail(format!("two different values chosen for slot {slot}"));
            }
            Some(_) => {}
            None => {
                self.chosen.insert(slot, value);
            }
        }
    }

    /// Every replica applies the same value at every slot, and it is the value a
    /// quorum chose (when the simulator saw it chosen).
    fn check_applied(&mut self, id: NodeId, slot: Slot, value: &Value) {
        let position = (slot - 1) as usize;
        if position < self.applied.len() {
            if self.applied[position] != *value {
                self.fail(format!(
                    "replica {id} applied a different value at slot {slot}"
                ));
            }
        } else if position == self.applied.len() {
            self.applied.push(value.clone());
            // The configuration governing the next slot is now known: judge it.
            let next = match value {
                Value::Configuration(config) => {
                    self.counts.configurations_chosen += 1;
                    Configuration::clone(config)
                }
                _ => self.governing.last().expect("never empty").clone(),
            };
            self.governing.push(next);
            let ballots: Vec<Ballot> = self
                .accepted
                .range((slot + 1, Ballot::ZERO)..(slot + 2, Ballot::ZERO))
                .map(|((_, ballot), _)| *ballot)
                .collect();
            for ballot in ballots {
                self.judge_chosen(slot + 1, ballot);
            }
        } else {
            self.fail(format!(
                "replica {id} applied slot {slot} past the known prefix"
            ));
        }
        if let Some(chosen) = self.chosen.get(&slot) {
            if chosen != value {
                self.fail(format!(
                    "replica {id} applied at slot {slot} a value that was not chosen there"
                ));
            }
        }
    }

    fn check_promises(&mut self) {
        for index in 0..self.nodes.len() {
            let node = &mut self.nodes[index];
            let Some(replica) = &node.replica else {
                continue;
            };
            let promised = replica.status().promised;
            if promised < node.last_promised {
                let message = format!(
                    "replica {} promise went back from {:?} to {promised:?}",
                    index + 1,
                    node.last_promised
                );
                self.fail(message);
                return;
            }
            node.last_promised = promised;
        }
    }

    /// No acknowledged write is lost: each one is in the applied (= chosen) log.
    fn check_acknowledged_writes(&mut self) {
        let mut in_log = BTreeSet::new();
        for value in &self.applied {
            if let Value::Batch(batch) = value {
                in_log.extend(
                    batch
                        .commands
                        .iter()
                        .filter_map(|command| command.idempotency_key),
                );
            }
        }
        let lost: Vec<IdempotencyKey> = self
            .acknowledged_writes
            .iter()
            .filter(|key| !in_log.contains(key))
            .copied()
            .collect();
        if let Some(key) = lost.first() {
            self.fail(format!(
                "acknowledged write {key:?} is not in the chosen log ({} lost)",
                lost.len()
            ));
        }
    }

    // ---- clients ---------------------------------------------------------------------

    fn run_clients(&mut self, issue_limit: usize) {
        for index in 0..self.clients.len() {
            let idle =
                self.clients[index].op.is_none() && self.tick >= self.clients[index].next_issue;
            if idle && self.issued < issue_limit {
                self.issue(index);
            }
            let Some(op) = &self.clients[index].op else {
                continue;
            };
            if op.request.is_some() && self.tick >= op.deadline {
                let attempts = op.attempts;
                if self.faults_on && attempts >= self.options.client_attempts_max {
                    self.clients[index].op = None;
                    self.think(index);
                    continue;
                }
                // Timed out: try another replica.
                let n = self.nodes.len() as u64;
                self.clients[index].target = self.rng.range(1, n + 1);
                self.send_attempt(index);
            } else if op.request.is_none() && self.tick >= op.retry_at {
                self.send_attempt(index);
            }
        }
    }

    fn issue(&mut self, index: usize) {
        let key = format!("k{}", self.rng.range(0, self.options.keys as u64));
        let client = &mut self.clients[index];
        client.seq += 1;
        let mine = format!("c{}-{}", client.id, client.seq);
        let (input, path) = match self.rng.range(0, 10) {
            0 => (KvInput::Get { key }, Path::Read(ReadMode::Lease)),
            1 => (KvInput::Get { key }, Path::Read(ReadMode::ReadIndex)),
            2 => (KvInput::Get { key }, Path::Log),
            3..=6 => (KvInput::Put { key, value: mine }, Path::Log),
            _ => {
                // Compare against a value some client may have written, or absence.
                let expected = match self.rng.range(0, 3) {
                    0 => None,
                    _ => {
                        let writer = self.rng.range(1, self.options.clients as u64 + 1);
                        let seq = self.rng.range(1, client.seq + 1);
                        Some(format!("c{writer}-{seq}"))
                    }
                };
                (
                    KvInput::Cas {
                        key,
                        expected,
                        new: mine,
                    },
                    Path::Log,
                )
            }
        };
        let key = IdempotencyKey {
            client: client.id,
            seq: client.seq,
        };
        self.history.push(Operation {
            client: client.id,
            input: input.clone(),
            call: self.tick,
            ret: None,
        });
        client.op = Some(PendingOp {
            history_index: self.history.len() - 1,
            path,
            payload: encode_input(&input),
            key,
            attempts: 0,
            request: None,
            deadline: 0,
            retry_at: self.tick,
        });
        self.issued += 1;
        self.send_attempt(index);
    }

    fn send_attempt(&mut self, index: usize) {
        let request = self.next_request;
        self.next_request += 1;
        let deadline = self.tick + self.options.client_timeout_ticks;
        let client = &mut self.clients[index];
        let target = client.target;
        let op = client.op.as_mut().expect("attempt without an operation");
        op.attempts += 1;
        op.request = Some(request);
        op.deadline = deadline;
        self.requests.insert(request, (index, op.history_index));
        let event = match op.path {
            Path::Read(mode) => Event::Read { request, mode },
            Path::Log => {
                let origin = Origin {
                    node: target,
                    request,
                };
                let command = Command {
                    payload: op.payload.clone(),
                    idempotency_key: Some(op.key),
                    origin,
                };
                Event::Propose { request, command }
            }
        };
        self.send_client_message(index, target, ClientMessage::Request { to: target, event });
    }

    /// Client <-> replica traffic shares the network's faults: delay, reordering,
    /// drops, duplicates, and its own partitions (`client_blocked`).
    fn send_client_message(&mut self, client: usize, replica: NodeId, msg: ClientMessage) {
        let faults = &self.options.faults;
        let mut copies = 1;
        if self.faults_on {
            if self.client_blocked.contains(&(client, replica))
                || self.rng.chance(faults.drop_per_million)
            {
                self.counts.dropped += 1;
                return;
            }
            if self.rng.chance(faults.duplicate_per_million) {
                self.counts.duplicated += 1;
                copies = 2;
            }
        }
        for _ in 0..copies {
            let faults = &self.options.faults;
            let at = self.tick
                + self
                    .rng
                    .range(faults.delay_ticks_min, faults.delay_ticks_max + 1);
            self.network_seq += 1;
            self.client_network
                .insert((at, self.network_seq), (client, msg.clone()));
        }
    }

    fn deliver_client_message(&mut self, client: usize, msg: ClientMessage) {
        match msg {
            ClientMessage::Request { to, event } => self.step_replica(to, event),
            ClientMessage::Response { request, response } => {
                let Some(index) = self.client_for(request) else {
                    return;
                };
                debug_assert_eq!(index, client);
                self.on_response(index, response);
            }
        }
    }

    /// Replica `from` answers `request`; the answer travels back to its client.
    fn respond(&mut self, from: NodeId, request: RequestId, response: Response) {
        let Some(&(client, _)) = self.requests.get(&request) else {
            return;
        };
        let msg = ClientMessage::Response { request, response };
        self.send_client_message(client, from, msg);
    }

    /// The current operation of the client behind `request`, if the request is still
    /// about it.
    fn client_for(&self, request: RequestId) -> Option<usize> {
        let (index, history_index) = *self.requests.get(&request)?;
        let op = self.clients[index].op.as_ref()?;
        (op.history_index == history_index).then_some(index)
    }

    fn complete(&mut self, index: usize, output: KvOutput) {
        let op = self.clients[index]
            .op
            .take()
            .expect("completing a pending operation");
        let writes = !matches!(self.history[op.history_index].input, KvInput::Get { .. });
        if writes {
            self.acknowledged_writes.push(op.key);
        }
        self.history[op.history_index].ret = Some((self.tick, output));
        self.committed += 1;
        self.think(index);
    }

    fn think(&mut self, index: usize) {
        let think_ticks = self.rng.range(0, self.options.client_think_ticks_max + 1);
        self.clients[index].next_issue = self.tick + think_ticks;
    }

    /// A replica's answer to a request: a read is served from its state machine now,
    /// and the answer travels back to the client.
    fn on_reply(&mut self, id: NodeId, request: RequestId, outcome: Outcome) {
        match outcome {
            Outcome::ChangeAccepted { .. } => self.counts.changes_accepted += 1,
            Outcome::ChangeRefused(_) => self.counts.changes_refused += 1,
            _ => {}
        }
        let Some(&(_, history_index)) = self.requests.get(&request) else {
            return;
        };
        let response = match outcome {
            Outcome::ReadReady => {
                let KvInput::Get { key } = &self.history[history_index].input else {
                    unreachable!("only gets are served as reads")
                };
                let current = self.nodes[(id - 1) as usize]
                    .applier
                    .machine
                    .map
                    .get(key)
                    .cloned();
                Response::Output(KvOutput::Value(current))
            }
            Outcome::NotLeader { leader_hint } => Response::NotLeader { leader_hint },
            Outcome::Busy => Response::Busy,
            Outcome::ChangeAccepted { .. } | Outcome::ChangeRefused(_) => {
                unreachable!("only the simulator's operator asks for membership changes")
            }
        };
        self.respond(id, request, response);
    }

    fn on_response(&mut self, index: usize, response: Response) {
        match response {
            Response::Applied(result) => self.complete(index, decode_output(&result)),
            Response::Output(output) => self.complete(index, output),
            Response::NotLeader { leader_hint } => {
                let n = self.nodes.len() as u64;
                let client = &mut self.clients[index];
                client.target = leader_hint.unwrap_or_else(|| self.rng.range(1, n + 1));
                let op = client.op.as_mut().expect("client_for checked");
                op.request = None;
                op.retry_at = self.tick + 1;
            }
            Response::Busy => {
                let op = self.clients[index].op.as_mut().expect("client_for checked");
                op.request = None;
                op.retry_at = self.tick + 5;
            }
        }
    }
}

/// Runs every seed in `seeds` on `threads` threads (each seed is still one
/// deterministic single-threaded run) and returns the outcomes in seed order.
pub fn run_seeds(
    seeds: &[u64],
    threads: usize,
    options_for: &(dyn Fn(u64) -> SimOptions + Sync),
) -> Vec<SeedOutcome> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::with_capacity(seeds.len()));
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| loop {
                let position = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&seed) = seeds.get(position) else {
                    break;
                };
                let outcome = run_seed(&options_for(seed));
                results
                    .lock()
                    .expect("no panics while holding the lock")
                    .push((position, outcome));
            });
        }
    });
    let mut results = results.into_inner().expect("threads joined");
    results.sort_by_key(|(position, _)| *position);
    results.into_iter().map(|(_, outcome)| outcome).collect()
}
