//! The core task: the one place that owns the `paxos::Replica` and the applier over the
//! Wasm application, and performs the core's actions in the order it emits them.
//!
//! Data flow (see docs/notes/node.md for the figure):
//! - client requests arrive from `Node` (the `NodeApi` handle) on a bounded channel and
//!   become `Event::Propose` / `Event::Read`;
//! - peer payloads arrive from the transport, are decoded (`codec`) and become
//!   `Event::Message`; a payload that does not decode is logged and dropped;
//! - a `tokio` interval produces `Event::Tick`;
//! - `Action::Persist` is queued to the store (group commit); the loop awaits the
//!   oldest in-flight persist itself and feeds `Event::Persisted` back, so the core sees
//!   persists complete in order, as it requires;
//! - `Action::Send` is encoded and queued to the transport, `Action::Apply` runs the
//!   applier and answers the waiting requests of this node, `Action::Reply` answers reads
//!   and refusals.
//!
//! Invariant: actions are performed strictly in order. Replies that depend on durable
//! state are released by the core only after `Event::Persisted`, so nothing is
//! acknowledged before it is durable on a quorum.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::net::{InboundReceiver, Transport};
use crate::paxos::{
    Action, Applier, Ballot, Command, Event, IdempotencyKey, Message, NodeId, Origin, Outcome,
    PersistRecord, ReadMode, Replica, RequestId, Slot, Value,
};
use crate::storage::{self, Pending, Store, WriteBatch};

use super::app::{self, AppResult, WasmApp};
use super::checkpoint::{Checkpoints, Finding, StateHash};
use super::codec::{self, CheckpointReport, CommandResult, PeerInfo, WireMessage};
use super::handle::{
    CommandError, CommandOk, DeployError, DeployOk, FlipError, FlipOk, LeaderHint, MemberChange,
    MemberError, QueryError, QueryOk,
};
use super::service::{Counters, Published};
use super::transfer::TransferMessage;
use super::upgrade;

mod disk;
mod membership;
mod snapshots;

use disk::DiskChange;
pub(crate) use disk::DiskWatch;
pub(crate) use membership::cluster_view;
use membership::{MemberReply, MemberState};
pub use snapshots::SnapshotConfig;
pub(crate) use snapshots::{value_bytes, Snapshots};

/// What the `Node` handle asks of the core task.
pub(crate) enum Request {
    Command {
        payload: Vec<u8>,
        key: Option<IdempotencyKey>,
        reply: oneshot::Sender<Result<CommandOk, CommandError>>,
        /// When the API handed it over: the core's share of a command's latency is
        /// measured from here (`paxwasm_command_core_us_total`).
        received: Instant,
    },
    Deploy {
        payload: Vec<u8>,
        reply: oneshot::Sender<Result<DeployOk, DeployError>>,
    },
    /// One module chunk of a deploy; answered with the staged byte count.
    Stage {
        payload: Vec<u8>,
        reply: oneshot::Sender<Result<u64, DeployError>>,
    },
    /// `mode: None` is a stale read, served from the local applied state.
    Query {
        payload: Vec<u8>,
        mode: Option<ReadMode>,
        reply: oneshot::Sender<Result<QueryOk, QueryError>>,
    },
    /// A membership change (`POST`/`DELETE /v1/cluster/members...`).
    Member {
        change: MemberChange,
        reply: MemberReply,
    },
    /// Test hook (`--test-hooks`): flip a byte of the committed memory.
    DebugFlipByte {
        offset: u64,
        reply: oneshot::Sender<Result<FlipOk, FlipError>>,
    },
    /// Test hook (`--test-hooks`): pretend the data directory's filesystem has this
    /// many bytes free (`None`: measure again). Answered once the core took it.
    DebugDiskFree {
        free_bytes: Option<u64>,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// How often a diverged replica asks the majority again for a snapshot while the
/// previous request has not repaired it.
const REPAIR_RETRY_MS: u64 = 5_000;
/// Largest command result a leader sends to the follower that forwarded the command;
/// larger ones wait for the follower's own apply.
const FORWARDED_RESULT_BYTES_MAX: usize = 64 << 10;

enum Waiter {
    /// The reply, and when the API handed the command over.
    Command(oneshot::Sender<Result<CommandOk, CommandError>>, Instant),
    Deploy(oneshot::Sender<Result<DeployOk, DeployError>>),
    Stage(oneshot::Sender<Result<u64, DeployError>>),
    Query {
        payload: Vec<u8>,
        reply: oneshot::Sender<Result<QueryOk, QueryError>>,
    },
    /// The address entry of a member being added; the change follows once it applies.
    Address {
        id: NodeId,
        reply: MemberReply,
    },
    /// A `ChangeMembership` waiting for the core's answer.
    Change(MemberReply),
}

impl Waiter {
    fn is_closed(&self) -> bool {
        match self {
            Waiter::Command(reply, _) => reply.is_closed(),
            Waiter::Deploy(reply) => reply.is_closed(),
            Waiter::Stage(reply) => reply.is_closed(),
            Waiter::Query { reply, .. } => reply.is_closed(),
            Waiter::Address { reply, .. } | Waiter::Change(reply) => reply.is_closed(),
        }
    }
}

/// What the core knows about one peer beyond consensus.
#[derive(Clone, Debug, Default)]
pub(crate) struct PeerSeen {
    pub http: Option<String>,
    pub chosen_index: Option<Slot>,
    pub applied_index: Option<Slot>,
    /// The highest apply rules the peer says it implements (`None`: not said).
    pub apply_rules_max: Option<u32>,
    /// Tick count (`TickClock::delivered`) of the peer's last info.
    pub info_at_tick: u64,
}

pub(crate) struct Core {
    pub id: NodeId,
    pub replica: Replica,
    pub applier: Applier<WasmApp>,
    pub store: Arc<Store>,
    pub transport: Arc<Transport>,
    pub http_advertise: String,
    /// Where this node's transport listens: announced in peer info when the address
    /// book has no entry for this node (a joining node learns its peers from it).
    pub peer_listen: std::net::SocketAddr,
    pub requests: mpsc::Receiver<Request>,
    pub inbound: InboundReceiver,
    pub published: Arc<Mutex<Published>>,
    pub counters: Arc<Counters>,
    pub shutdown: watch::Receiver<bool>,
    pub tick_ms: u64,
    pub retry_after_ms: u64,
    pub requests_pending_max: usize,
    pub peer_info_interval_ms: u64,
    pub state_hash_interval_ms: u64,
    pub state_hash_idle_interval_ms: u64,
    pub events_per_turn_max: usize,
    /// First request id of this incarnation; see `first_request_id`.
    pub next_request: RequestId,
    /// State-hash checkpoints: this replica's and its peers' (`checkpoint.rs`).
    pub checkpoints: Checkpoints,
    /// How long a diverged replica waits before it asks for a snapshot (0 in
    /// production; tests hold the diverged state to observe it).
    pub checkpoint_repair_delay_ms: u64,
    /// Where the store lives: its filesystem's free space is watched (`disk.rs`).
    pub data_dir: std::path::PathBuf,
    pub disk_free_bytes_min: u64,
    pub disk_check_interval_ms: u64,
}

struct Loop {
    core: Core,
    /// Persists handed to the store and not yet durable, oldest first. The store
    /// completes them in this order, and the core learns each token from here directly
    /// (no task in between: one wake-up fewer on every persist's path).
    persists_in_flight: VecDeque<(u64, Pending)>,
    /// A persist failed (only a test store returns instead of aborting): nothing after
    /// it may be reported durable.
    persist_failed: bool,
    /// A persist that only moves the chosen index, held back to ride with the next
    /// persist (see `persist`): its token and the chosen index, and the tick it was
    /// held at.
    chosen_held: Option<HeldChosen>,
    waiters: HashMap<RequestId, Waiter>,
    actions: Vec<Action>,
    replies: Vec<(RequestId, Vec<u8>)>,
    peers: BTreeMap<NodeId, PeerSeen>,
    leader_seen: Option<NodeId>,
    hashed_index: Option<Slot>,
    /// Tick count of the last status hash.
    hashed_at_tick: u64,
    app_version_published: u64,
    clock: TickClock,
    /// When this replica, diverged, last asked the majority for a snapshot.
    repair_requested: Option<Instant>,
    /// When this replica found it diverged.
    diverged_since: Option<Instant>,
    findings: Vec<Finding>,
    snap: Snapshots,
    members: MemberState,
    disk: DiskWatch,
    /// Applies (and the read replies after them) waiting for this replica's compile
    /// of a module whose upgrade slot came up first, in action order
    /// (`release_held`); and what they wait for.
    held: VecDeque<Held>,
    held_for: Option<HeldFor>,
    /// The apply rules this replica, leading, last proposed and the tick it did.
    apply_rules_proposed: Option<(u32, u64)>,
}

/// The compile the held actions wait for.
struct HeldFor {
    sha256: [u8; 32],
    slot: Slot,
    since: Instant,
    logged: Instant,
}

/// A replica whose applying has waited this long for a compile stops leading and
/// campaigning (its outgoing `PreVote`, `Prepare`, `Accept` and `Heartbeat` are
/// dropped, `runtime/disk.rs`), so that a replica that can apply and answer reads
/// leads instead. Shorter holds keep their leader.
const HELD_STEP_ASIDE_AFTER: Duration = Duration::from_secs(1);
/// How often a hold that goes on is logged again.
const HELD_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// An action held back behind an upgrade slot whose compile is still running.
enum Held {
    Apply(Slot, Value),
    Reply(RequestId, Outcome),
}

/// A chosen-index-only persist not yet handed to the store.
#[derive(Clone, Copy, Debug)]
struct HeldChosen {
    token: u64,
    chosen_index: Slot,
    since_tick: u64,
}

/// Logical ticks derived from the monotonic clock. The core's leases are counted in
/// ticks, so ticks must never fall behind real time: after a stall of the process,
/// every missed tick is delivered before any request or message is handled, or a
/// leader could serve a lease read on a lease that has already run out.
struct TickClock {
    started: Instant,
    tick: Duration,
    delivered: u64,
}

impl TickClock {
    fn new(tick_ms: u64) -> TickClock {
        TickClock {
            started: Instant::now(),
            tick: Duration::from_millis(tick_ms),
            delivered: 0,
        }
    }

    /// Ticks that real time says are due and were not yet delivered.
    fn due(&self) -> u64 {
        let elapsed = self.started.elapsed().as_nanos() / self.tick.as_nanos();
        u64::try_from(elapsed)
            .expect("tick count fits in u64")
            .saturating_sub(self.delivered)
    }
}

/// A request id no earlier incarnation of this node used with high probability: commands
/// proposed before a crash may still be applied after the restart, and their `Origin`
/// must not match a new request's id.
pub(crate) fn first_request_id(id: NodeId) -> RequestId {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut rng = crate::paxos::SplitMix64::new(nanos ^ (u64::from(std::process::id()) << 32) ^ id);
    // Leave room below u64::MAX so the counter never wraps within a lifetime.
    rng.next_u64() >> 2
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs the core until shutdown is signalled. Returns after every persist handed to the
/// store completed.
pub(crate) async fn run(core: Core, snap: Snapshots) {
    let tick_ms = core.tick_ms;
    let mut state = Loop {
        persists_in_flight: VecDeque::new(),
        persist_failed: false,
        chosen_held: None,
        waiters: HashMap::new(),
        actions: Vec::new(),
        replies: Vec::new(),
        peers: BTreeMap::new(),
        leader_seen: None,
        hashed_index: None,
        hashed_at_tick: 0,
        clock: TickClock::new(tick_ms),
        app_version_published: u64::MAX,
        repair_requested: None,
        diverged_since: None,
        findings: Vec::new(),
        members: MemberState::default(),
        disk: DiskWatch::new(core.disk_free_bytes_min),
        held: VecDeque::new(),
        held_for: None,
        apply_rules_proposed: None,
        core,
        snap,
    };
    state.check_disk();
    state.on_configuration_replaced();
    state.main().await;
    state.flush_held_chosen().await;
    // Every persist handed to the store completes before the core is gone.
    for (_, pending) in std::mem::take(&mut state.persists_in_flight) {
        let _ = pending.await;
    }
}

/// The oldest in-flight persist's token and outcome; never ready while there is none.
async fn oldest_persist(
    in_flight: &mut VecDeque<(u64, Pending)>,
) -> (u64, Result<(), storage::StorageError>) {
    match in_flight.front_mut() {
        Some((token, pending)) => (*token, pending.await),
        None => std::future::pending().await,
    }
}

impl Loop {
    async fn main(&mut self) {
        // The interval only wakes the loop; how many ticks are due comes from the
        // monotonic clock (`TickClock`), so a late or skipped wake-up loses no tick.
        let mut ticker = tokio::time::interval(Duration::from_millis(self.core.tick_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.core.shutdown.clone();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                (token, outcome) = oldest_persist(&mut self.persists_in_flight) => {
                    self.persists_in_flight.pop_front();
                    self.on_persist_outcome(token, outcome);
                }
                Some(done) = self.snap.done.recv() => {
                    self.deliver_due_ticks();
                    self.on_snapshot_done(done);
                }
                Some((from, payload)) = self.core.inbound.recv() => {
                    self.deliver_due_ticks();
                    self.on_inbound(from, &payload);
                }
                Some(request) = self.core.requests.recv() => {
                    self.deliver_due_ticks();
                    self.on_request(request);
                }
                _ = ticker.tick() => {}
            }
            self.deliver_due_ticks();
            self.drain_ready();
            self.perform().await;
            if self
                .chosen_held
                .is_some_and(|held| held.since_tick < self.clock.delivered)
            {
                // Nothing else was persisted for a tick: write it on its own.
                self.flush_held_chosen().await;
            }
            self.maybe_snapshot();
            self.publish();
        }
    }

    /// Feeds the core every tick real time says is due (see `TickClock`), with the
    /// periodic chores that ride on ticks.
    fn deliver_due_ticks(&mut self) {
        let info_every_ticks = (self.core.peer_info_interval_ms / self.core.tick_ms).max(1);
        let hash_every_ticks = (self.core.state_hash_interval_ms / self.core.tick_ms).max(1);
        let hash_idle_ticks = (self.core.state_hash_idle_interval_ms / self.core.tick_ms).max(1);
        let disk_every_ticks = (self.core.disk_check_interval_ms / self.core.tick_ms).max(1);
        for _ in 0..self.clock.due() {
            self.clock.delivered += 1;
            let ticks = self.clock.delivered;
            self.step(Event::Tick { now_ms: now_ms() });
            if ticks.is_multiple_of(info_every_ticks) {
                self.send_peer_info();
                // Also here: a replica alone in its configuration hears no info.
                self.maybe_raise_apply_rules();
                self.waiters.retain(|_, waiter| !waiter.is_closed());
                self.prune_departing(None);
            }
            if ticks.is_multiple_of(hash_every_ticks) {
                let wanted = std::mem::take(
                    &mut self
                        .core
                        .published
                        .lock()
                        .expect("published state lock poisoned")
                        .state_hash_wanted,
                );
                if wanted || ticks - self.hashed_at_tick >= hash_idle_ticks {
                    self.hashed_at_tick = ticks;
                    self.refresh_state_hash();
                }
            }
            if ticks.is_multiple_of(disk_every_ticks) {
                self.check_disk();
            }
            self.transfer_tick();
        }
    }

    /// Measures the free space of the data directory's filesystem (`disk.rs`).
    fn check_disk(&mut self) {
        if self.disk.free_bytes_min == 0 {
            return;
        }
        let measured = match disk::free_bytes(&self.core.data_dir) {
            Ok(free) => {
                self.disk.measure_failing = false;
                Some(free)
            }
            Err(error) => {
                if !std::mem::replace(&mut self.disk.measure_failing, true) {
                    tracing::warn!(%error, dir = %self.core.data_dir.display(), low = self.disk.low,
                        "cannot measure the free disk space; keeping the last verdict until it works again");
                }
                None
            }
        };
        match self.disk.observe(measured) {
            Some(DiskChange::BecameLow) => tracing::error!(
                free_bytes = self.disk.free_bytes,
                free_bytes_min = self.disk.free_bytes_min,
                dir = %self.core.data_dir.display(),
                "the disk is nearly full: this replica refuses commands (507), neither accepts nor leads, \
                 and keeps serving reads until space is freed"
            ),
            Some(DiskChange::Recovered) => tracing::info!(
                free_bytes = self.disk.free_bytes,
                dir = %self.core.data_dir.display(),
                "disk space is back: this replica takes part in writes again"
            ),
            None => {}
        }
    }

    fn drop_for_disk(&self) {
        self.core
            .counters
            .add(&self.core.counters.disk_low_dropped, 1);
    }

    /// Takes whatever else is already waiting, so a burst shares one pass of actions
    /// (and the store can group its persists).
    fn drain_ready(&mut self) {
        for _ in 0..self.core.events_per_turn_max {
            let mut progressed = false;
            if let Some((token, pending)) = self.persists_in_flight.front_mut() {
                if let Some(outcome) = pending.try_outcome() {
                    let token = *token;
                    self.persists_in_flight.pop_front();
                    self.on_persist_outcome(token, outcome);
                    progressed = true;
                }
            }
            if let Ok((from, payload)) = self.core.inbound.try_recv() {
                self.deliver_due_ticks();
                self.on_inbound(from, &payload);
                progressed = true;
            }
            if let Ok(request) = self.core.requests.try_recv() {
                self.deliver_due_ticks();
                self.on_request(request);
                progressed = true;
            }
            if !progressed {
                return;
            }
        }
    }

    /// A failed write is fail-stop inside the store (the process aborts); if a test
    /// store returned instead, stop reporting: nothing after it may be treated as
    /// durable.
    fn on_persist_outcome(&mut self, token: u64, outcome: Result<(), storage::StorageError>) {
        if self.persist_failed {
            return;
        }
        match outcome {
            Ok(()) => self.step(Event::Persisted { token }),
            Err(error) => {
                tracing::error!(%error, token, "persist failed; the replica stops acknowledging");
                self.persist_failed = true;
                self.persists_in_flight.clear();
            }
        }
    }

    fn step(&mut self, event: Event) {
        self.core.replica.handle(event, &mut self.actions);
    }

    fn on_inbound(&mut self, from: NodeId, payload: &[u8]) {
        match codec::decode_wire(payload) {
            Ok(WireMessage::Paxos(msg)) => {
                if self.disk.drops_inbound(&msg) {
                    self.drop_for_disk();
                    return;
                }
                self.step(Event::Message { from, msg })
            }
            Ok(WireMessage::Info(info)) => {
                self.on_peer_chosen_index(from, info.chosen_index);
                let seen = self.peers.entry(from).or_default();
                seen.http = Some(info.http);
                seen.chosen_index = Some(info.chosen_index);
                seen.applied_index = Some(info.applied_index);
                seen.apply_rules_max = info.apply_rules_max;
                seen.info_at_tick = self.clock.delivered;
                self.maybe_raise_apply_rules();
            }
            Ok(WireMessage::Checkpoint(report)) => {
                let configuration = self.core.replica.configuration();
                self.core.checkpoints.set_configuration(configuration);
                let mut findings = std::mem::take(&mut self.findings);
                self.core.checkpoints.record_peer(
                    from,
                    report.index,
                    StateHash(report.hash),
                    &mut findings,
                );
                self.report_findings(&mut findings);
                self.findings = findings;
            }
            Ok(WireMessage::Transfer(message)) => {
                let no_room = match &message {
                    TransferMessage::Offer { id } => !self.disk.room_for(id.file_bytes),
                    _ => false,
                };
                if no_room || self.disk.drops_transfer(&message) {
                    self.drop_for_disk();
                    return;
                }
                self.on_transfer(from, message)
            }
            Ok(WireMessage::Result(result)) => self.on_command_result(from, result),
            Err(error) => {
                self.core.counters.add(&self.core.counters.decode_errors, 1);
                tracing::warn!(from, %error, bytes = payload.len(), "dropping a peer payload that does not decode");
            }
        }
    }

    /// A peer applied the slot of a command this replica forwarded: answer the client
    /// now. The slot is chosen (only chosen slots are applied) and its result is the
    /// same on every replica; applying it here later finds no waiter.
    fn on_command_result(&mut self, from: NodeId, message: CommandResult) {
        // Only the leader this replica follows answers for it (a replica that lost
        // leadership fails its forwarded requests through the core anyway).
        if self.leader_seen != Some(from)
            || !matches!(
                self.waiters.get(&message.request),
                Some(Waiter::Command(..))
            )
        {
            return;
        }
        match AppResult::decode_command_result(&message.result) {
            Some(result) => {
                let counters = &self.core.counters;
                counters.add(&counters.results_from_peers, 1);
                self.complete(message.request, message.slot, result);
            }
            None => {
                self.core.counters.add(&self.core.counters.decode_errors, 1);
                tracing::warn!(
                    from,
                    request = message.request,
                    "dropping a command result that no command produces"
                );
            }
        }
    }

    fn new_request_id(&mut self) -> RequestId {
        let id = self.core.next_request;
        self.core.next_request += 1;
        id
    }

    fn on_request(&mut self, request: Request) {
        // A test hook that only changes what the replica believes of its disk: taken
        // whatever the state of the replica, like a real change of free space.
        let request = match request {
            Request::DebugDiskFree { free_bytes, reply } => {
                let _ = reply.send(self.debug_disk_free(free_bytes));
                return;
            }
            request => request,
        };
        // A diverged replica's state is wrong: it answers nothing from it, neither
        // reads nor the results of commands it would propose.
        if let Some(divergence) = self.core.checkpoints.diverged() {
            if !matches!(request, Request::DebugFlipByte { .. }) {
                let reason = divergence.to_string();
                self.refuse(request, reason);
                return;
            }
        }
        if self.waiters.len() >= self.core.requests_pending_max {
            let reason = format!(
                "{} requests are waiting at this replica",
                self.waiters.len()
            );
            self.refuse(request, reason);
            return;
        }
        let request_id = self.new_request_id();
        let origin = Origin {
            node: self.core.id,
            request: request_id,
        };
        match request {
            Request::Command {
                payload,
                key,
                reply,
                received,
            } => {
                self.waiters
                    .insert(request_id, Waiter::Command(reply, received));
                let command = Command {
                    payload,
                    idempotency_key: key,
                    origin,
                };
                self.step(Event::Propose {
                    request: request_id,
                    command,
                });
            }
            Request::Deploy { payload, reply } => {
                self.waiters.insert(request_id, Waiter::Deploy(reply));
                self.propose_module_entry(request_id, payload, origin);
            }
            Request::Stage { payload, reply } => {
                self.waiters.insert(request_id, Waiter::Stage(reply));
                self.propose_module_entry(request_id, payload, origin);
            }
            Request::Query {
                payload,
                mode: None,
                reply,
            } => {
                let result = self.run_query(&payload);
                let _ = reply.send(result);
            }
            Request::Query {
                payload,
                mode: Some(mode),
                reply,
            } => {
                self.waiters
                    .insert(request_id, Waiter::Query { payload, reply });
                self.step(Event::Read {
                    request: request_id,
                    mode,
                });
            }
            Request::Member { change, reply } => {
                self.on_member_request(request_id, origin, change, reply);
            }
            Request::DebugFlipByte { offset, reply } => {
                let _ = reply.send(self.debug_flip_byte(offset));
            }
            Request::DebugDiskFree { reply, .. } => {
                let _ = reply.send(Err("handled above".into()));
            }
        }
    }

    fn debug_disk_free(&mut self, free_bytes: Option<u64>) -> Result<(), String> {
        if self.disk.free_bytes_min == 0 {
            return Err("the disk check is off (--disk-free-bytes-min 0)".into());
        }
        tracing::warn!(
            ?free_bytes,
            "test hook: pretending this many bytes are free on the data disk"
        );
        self.disk.pretend_free_bytes = free_bytes;
        self.check_disk();
        self.publish();
        Ok(())
    }

    /// Module chunks and upgrades carry no idempotency key: a retried chunk is a
    /// duplicate the staging area recognises, a retried upgrade fails as not staged.
    fn propose_module_entry(&mut self, request: RequestId, payload: Vec<u8>, origin: Origin) {
        let command = Command {
            payload,
            idempotency_key: None,
            origin,
        };
        self.step(Event::Propose { request, command });
    }

    fn refuse(&self, request: Request, reason: String) {
        let retry_after_ms = self.core.retry_after_ms;
        match request {
            Request::Command { reply, .. } => {
                let _ = reply.send(Err(CommandError::Unavailable {
                    reason,
                    retry_after_ms,
                }));
            }
            Request::Deploy { reply, .. } => {
                let _ = reply.send(Err(DeployError::Unavailable {
                    reason,
                    retry_after_ms,
                }));
            }
            Request::Stage { reply, .. } => {
                let _ = reply.send(Err(DeployError::Unavailable {
                    reason,
                    retry_after_ms,
                }));
            }
            Request::Query { reply, .. } => {
                let _ = reply.send(Err(QueryError::Unavailable {
                    reason,
                    retry_after_ms,
                }));
            }
            Request::Member { reply, .. } => {
                let _ = reply.send(Err(MemberError::Unavailable {
                    reason,
                    retry_after_ms,
                }));
            }
            Request::DebugFlipByte { reply, .. } => {
                let _ = reply.send(Err(FlipError::Unavailable { reason }));
            }
            Request::DebugDiskFree { reply, .. } => {
                let _ = reply.send(Err(reason));
            }
        }
    }

    fn debug_flip_byte(&mut self, offset: u64) -> Result<FlipOk, FlipError> {
        self.core
            .applier
            .machine
            .debug_flip_byte(offset)
            .map_err(|reason| FlipError::Refused { reason })?;
        let applied_index = self.core.applier.applied_index;
        tracing::warn!(
            offset,
            applied_index,
            "test hook: flipped a byte of the machine's memory; this replica now diverges"
        );
        Ok(FlipOk { applied_index })
    }

    fn run_query(&mut self, payload: &[u8]) -> Result<QueryOk, QueryError> {
        let applied_index = self.core.applier.applied_index;
        match self.core.applier.machine.query(payload) {
            None => Err(QueryError::NoModule),
            Some(Ok(output)) => Ok(QueryOk {
                applied_index,
                output,
            }),
            Some(Err(error)) => Err(QueryError::Rejected { error }),
        }
    }

    async fn perform(&mut self) {
        self.release_held();
        let mut actions = std::mem::take(&mut self.actions);
        while !actions.is_empty() {
            for action in actions.drain(..) {
                match action {
                    Action::Persist { token, record } => self.persist(token, record).await,
                    Action::Send { to, msg } => self.send(to, &msg),
                    Action::Apply { slot, value } => self.apply_or_hold(slot, value),
                    // A read served now must see every apply the core emitted before
                    // it; other replies (refusals, membership) depend on no state.
                    Action::Reply {
                        request,
                        outcome: Outcome::ReadReady,
                    } if !self.held.is_empty() => {
                        self.held
                            .push_back(Held::Reply(request, Outcome::ReadReady));
                    }
                    Action::Reply { request, outcome } => self.reply(request, outcome),
                    Action::SendSnapshot { to, slot } => self.send_snapshot(to, slot),
                    Action::Compact { below } => self.compact(below).await,
                }
            }
            // A step taken while performing (a membership change proposed once its
            // address entry applied, `runtime/membership.rs`) queued actions after
            // these: they are performed next, in order, never dropped.
            std::mem::swap(&mut actions, &mut self.actions);
        }
        // Both are empty now; keep an allocation for the next turn.
        self.actions = actions;
    }

    /// Deletes the log below `below`. The snapshot covering it is already durable, so
    /// this write needs no completion: losing it in a crash only leaves old entries.
    async fn compact(&mut self, below: Slot) {
        let batch = WriteBatch {
            promised: None,
            accepted: Vec::new(),
            chosen: None,
            meta: Vec::new(),
            delete_below: Some(below),
        };
        if let Err(error) = self.core.store.submit(batch).await {
            tracing::error!(%error, "the store refused a write; stopping");
            std::process::abort();
        }
    }

    /// Hands a persist to the store (group commit) and its completion to the waiter.
    ///
    /// A persist that only moves the chosen index is held back and merged into the
    /// next persist (or written alone a tick later): on its own it would cost a sync
    /// that every later accept waits behind, although no reply depends on it. This
    /// changes nothing the core relies on: its completion is reported only once the
    /// write that carries it is durable, under the later token (completions cover every
    /// earlier token, `Replica::on_persisted`); the chosen index still reaches the disk
    /// in the same atomic batch as, or after, the entries it covers; and a crash before
    /// that is the crash before a sync the core already survives (a lower durable
    /// chosen index is learned again from the leader).
    async fn persist(&mut self, token: u64, record: PersistRecord) {
        if let (None, true, Some(chosen_index)) = (
            record.promised,
            record.entries.is_empty(),
            record.chosen_index,
        ) {
            let held = self.chosen_held.get_or_insert(HeldChosen {
                token,
                chosen_index,
                since_tick: self.clock.delivered,
            });
            held.token = token;
            held.chosen_index = held.chosen_index.max(chosen_index);
            return;
        }
        let held = self.chosen_held.take();
        let chosen = match (record.chosen_index, held) {
            (Some(own), Some(held)) => Some(own.max(held.chosen_index)),
            (own, held) => own.or(held.map(|held| held.chosen_index)),
        };
        let entries = record.entries.len() as u64;
        let batch = WriteBatch {
            promised: record.promised.map(|b| storage::Ballot {
                round: b.round,
                node: b.node,
            }),
            accepted: record
                .entries
                .iter()
                .map(|(slot, entry)| (*slot, codec::encode_entry(entry)))
                .collect(),
            chosen,
            meta: Vec::new(),
            delete_below: None,
        };
        let counters = &self.core.counters;
        counters.add(&counters.persists, 1);
        counters.add(&counters.persist_entries, entries);
        self.submit_persist(token, batch).await;
    }

    /// Writes a held chosen index on its own (idle replica, or shutdown).
    async fn flush_held_chosen(&mut self) {
        let Some(held) = self.chosen_held.take() else {
            return;
        };
        let batch = WriteBatch {
            promised: None,
            accepted: Vec::new(),
            chosen: Some(held.chosen_index),
            meta: Vec::new(),
            delete_below: None,
        };
        let counters = &self.core.counters;
        counters.add(&counters.persists, 1);
        self.submit_persist(held.token, batch).await;
    }

    async fn submit_persist(&mut self, token: u64, batch: WriteBatch) {
        match self.core.store.submit(batch).await {
            Ok(pending) => {
                if !self.persist_failed {
                    self.persists_in_flight.push_back((token, pending));
                }
            }
            Err(error) => {
                // The store is fail-stop: it only returns after a failure when a test
                // asked it to. Continuing would acknowledge what is not durable.
                tracing::error!(%error, "the store refused a write; stopping");
                std::process::abort();
            }
        }
    }

    fn send(&mut self, to: NodeId, msg: &Message) {
        if self.disk.drops_outbound(msg) {
            self.drop_for_disk();
            return;
        }
        if disk::leads_or_campaigns(msg) && self.held_too_long() {
            return;
        }
        let payload = codec::encode_paxos(msg);
        if let Err(error) = self.core.transport.send(to, Bytes::from(payload)) {
            tracing::debug!(to, %error, "peer message not queued");
        }
    }

    /// Applies `value`, unless it must wait: behind earlier held actions, or because it
    /// is an upgrade slot whose module this replica is still compiling. A compile can
    /// take seconds; waiting for it here would stop the core task (no heartbeats, no
    /// accepts: a leader would lose its followers). Only the state machine waits: the
    /// core goes on, and persists and messages are performed as before. Read replies
    /// are held too, behind the applies their read index needs.
    fn apply_or_hold(&mut self, slot: Slot, value: Value) {
        if self.held.is_empty() {
            match self.core.applier.machine.waits_for_compile(&value) {
                None => return self.apply(slot, &value),
                Some(sha256) => self.hold_for(sha256, slot),
            }
        }
        self.held.push_back(Held::Apply(slot, value));
    }

    fn hold_for(&mut self, sha256: [u8; 32], slot: Slot) {
        tracing::info!(
            slot,
            module = %upgrade::module_name(&sha256),
            "the upgrade slot waits for this replica's compile of the module; \
             applying pauses, consensus goes on"
        );
        let now = Instant::now();
        self.held_for = Some(HeldFor {
            sha256,
            slot,
            since: now,
            logged: now,
        });
    }

    /// Performs held actions in order until an upgrade slot whose compile still runs.
    fn release_held(&mut self) {
        while let Some(front) = self.held.front() {
            if let Held::Apply(slot, value) = front {
                if let Some(sha256) = self.core.applier.machine.waits_for_compile(value) {
                    let slot = *slot;
                    match &mut self.held_for {
                        Some(held) if held.sha256 == sha256 && held.slot == slot => {
                            if held.logged.elapsed() >= HELD_LOG_INTERVAL {
                                held.logged = Instant::now();
                                tracing::warn!(
                                    slot,
                                    module = %upgrade::module_name(&sha256),
                                    held_ms = held.since.elapsed().as_millis() as u64,
                                    held = self.held.len(),
                                    "applying still waits for this replica's compile of the module"
                                );
                            }
                        }
                        _ => self.hold_for(sha256, slot),
                    }
                    return;
                }
                if let Some(held) = self.held_for.take() {
                    tracing::info!(
                        module = %upgrade::module_name(&held.sha256),
                        held_ms = held.since.elapsed().as_millis() as u64,
                        held = self.held.len(),
                        "compile done: applying the held slots"
                    );
                }
            }
            match self.held.pop_front().expect("front exists") {
                Held::Apply(slot, value) => self.apply(slot, &value),
                Held::Reply(request, outcome) => self.reply(request, outcome),
            }
        }
        self.held_for = None;
    }

    /// Whether applying has waited so long for a compile that this replica should let
    /// another lead (`HELD_STEP_ASIDE_AFTER`).
    fn held_too_long(&self) -> bool {
        self.held_for
            .as_ref()
            .is_some_and(|held| held.since.elapsed() >= HELD_STEP_ASIDE_AFTER)
    }

    /// A snapshot at `slot` replaced the state: the held applies it covers are done.
    fn drop_held_through(&mut self, slot: Slot) {
        self.held
            .retain(|held| !matches!(held, Held::Apply(held_slot, _) if *held_slot <= slot));
        if !self.held.iter().any(|held| matches!(held, Held::Apply(..))) {
            self.held_for = None;
        }
    }

    fn apply(&mut self, slot: Slot, value: &Value) {
        let started = Instant::now();
        self.snap.log_bytes_since += value_bytes(value);
        // A leader answers the followers whose commands it applies: they would
        // otherwise wait to learn the commit (the next accept or heartbeat) and apply
        // the slot themselves before answering their clients. Not while its own state
        // has diverged from the majority's: its results would be wrong.
        self.core.applier.collect_remote =
            self.core.replica.is_leading() && self.core.checkpoints.diverged().is_none();
        let batches_before = self.core.applier.machine.batch_stats();
        self.core.applier.apply(slot, value, &mut self.replies);
        let elapsed_us = started.elapsed().as_micros() as u64;
        let counters = &self.core.counters;
        let batches = self.core.applier.machine.batch_stats();
        counters.add(
            &counters.apply_batch_calls,
            batches.calls - batches_before.calls,
        );
        counters.add(
            &counters.apply_batch_commands,
            batches.commands - batches_before.commands,
        );
        counters.add(
            &counters.apply_batch_fallbacks,
            batches.fallbacks - batches_before.fallbacks,
        );
        counters.add(&counters.slots_applied, 1);
        if let Value::Batch(batch) = value {
            counters.add(&counters.commands_applied, batch.commands.len() as u64);
            counters.add(&counters.apply_us, elapsed_us);
        }
        let mut replies = std::mem::take(&mut self.replies);
        for (request, result) in replies.drain(..) {
            self.complete(request, slot, AppResult::decode(&result));
        }
        self.replies = replies;
        for (origin, slot, result) in self.core.applier.remote_results.drain(..) {
            if result.len() > FORWARDED_RESULT_BYTES_MAX {
                // Big results would crowd consensus traffic out of the peer's queue;
                // the follower answers once it applied the slot itself.
                continue;
            }
            let message = WireMessage::Result(CommandResult {
                request: origin.request,
                slot,
                result,
            });
            let payload = Bytes::from(codec::encode_wire(&message));
            if let Err(error) = self.core.transport.send(origin.node, payload) {
                tracing::debug!(to = origin.node, %error, "command result not queued");
            }
        }
        if self.core.checkpoints.is_checkpoint(slot) {
            self.take_checkpoint(slot);
        }
        self.after_apply_membership(slot, value);
    }

    /// Hashes the state at `slot` (a checkpoint index), compares it with what peers
    /// reported and tells them.
    fn take_checkpoint(&mut self, slot: Slot) {
        // Before the first module there is no state to compare.
        let started = Instant::now();
        let Some(hash) = self.core.applier.machine.state_hash_bytes() else {
            return;
        };
        let counters = &self.core.counters;
        counters.add(&counters.checkpoints, 1);
        counters.add(
            &counters.checkpoint_hash_us,
            started.elapsed().as_micros() as u64,
        );
        let configuration = self.core.replica.configuration();
        self.core.checkpoints.set_configuration(configuration);
        let mut findings = std::mem::take(&mut self.findings);
        self.core
            .checkpoints
            .record_local(slot, StateHash(hash), &mut findings);
        self.report_findings(&mut findings);
        self.findings = findings;
        self.send_checkpoint(CheckpointReport { index: slot, hash });
    }

    fn send_checkpoint(&mut self, report: CheckpointReport) {
        let payload = Bytes::from(codec::encode_wire(&WireMessage::Checkpoint(report)));
        for peer in self.core.transport.peers().keys() {
            let _ = self.core.transport.send(*peer, payload.clone());
        }
    }

    /// The loud part of a checkpoint mismatch: error lines and the metric.
    fn report_findings(&mut self, findings: &mut Vec<Finding>) {
        for finding in findings.drain(..) {
            match finding {
                Finding::Mismatch {
                    index,
                    peer,
                    local,
                    theirs,
                } => {
                    let counters = &self.core.counters;
                    counters.add(&counters.checkpoint_mismatches, 1);
                    tracing::error!(
                        node = self.core.id,
                        index,
                        %local,
                        peer,
                        peer_hash = %theirs,
                        "CHECKPOINT MISMATCH: a peer's state hash differs from this replica's"
                    );
                }
                Finding::Diverged(divergence) => {
                    tracing::error!(
                        node = self.core.id,
                        index = divergence.index,
                        local = %divergence.local,
                        majority = %divergence.majority,
                        majority_nodes = ?divergence.majority_nodes,
                        "STATE DIVERGED: this replica is in the minority at a checkpoint; it refuses reads until it reinstalls a snapshot from the majority"
                    );
                    self.repair_requested = None;
                    self.diverged_since = Some(Instant::now());
                    self.request_repair();
                }
                Finding::Recovered { index } => {
                    tracing::warn!(
                        node = self.core.id,
                        index,
                        "this replica's state hash agrees with a quorum again; it serves reads"
                    );
                }
            }
        }
    }

    /// Asks a replica of the majority for its newest snapshot, `repair_delay_ms` after
    /// the divergence was found, then at most every `REPAIR_RETRY_MS` while this replica
    /// stays diverged.
    fn request_repair(&mut self) {
        let Some(divergence) = self.core.checkpoints.diverged() else {
            return;
        };
        let delay = Duration::from_millis(self.core.checkpoint_repair_delay_ms);
        if self.diverged_since.is_some_and(|at| at.elapsed() < delay) {
            return;
        }
        if self
            .repair_requested
            .is_some_and(|at| at.elapsed() < Duration::from_millis(REPAIR_RETRY_MS))
        {
            return;
        }
        let from = *divergence
            .majority_nodes
            .first()
            .expect("a majority holds at least one other voter");
        self.repair_requested = Some(Instant::now());
        tracing::warn!(
            node = self.core.id,
            from,
            diverged_at = divergence.index,
            "repairing the diverged state: asking a majority replica for its newest snapshot"
        );
        // Installed even though this replica is not behind (a forced install); then
        // `on_state_replaced` ends the divergence.
        self.request_snapshot(from);
    }

    /// The machine was replaced by an installed snapshot (plus, for a forced install,
    /// the log after it applied again): hashes computed before are of another state.
    pub(super) fn on_state_replaced(&mut self) {
        // The address book and the applied configuration came with the snapshot.
        self.on_configuration_replaced();
        if let Some(divergence) = self.core.checkpoints.on_snapshot_installed() {
            self.repair_requested = None;
            tracing::warn!(
                node = self.core.id,
                diverged_at = divergence.index,
                applied = self.core.applier.applied_index,
                "a snapshot from the majority is installed; the replica serves again"
            );
        }
        let applied = self.core.applier.applied_index;
        if self.core.checkpoints.is_checkpoint(applied) {
            self.take_checkpoint(applied);
        }
    }

    fn complete(&mut self, request: RequestId, slot: Slot, result: AppResult) {
        let Some(waiter) = self.waiters.remove(&request) else {
            return;
        };
        match waiter {
            Waiter::Command(reply, received) => {
                let counters = &self.core.counters;
                counters.add(&counters.commands_answered, 1);
                counters.add(
                    &counters.command_core_us,
                    received.elapsed().as_micros() as u64,
                );
                let answer = match result {
                    AppResult::Output(output) => Ok(CommandOk {
                        index: slot,
                        output,
                    }),
                    AppResult::Rejected(error) => {
                        Err(CommandError::Rejected { index: slot, error })
                    }
                    AppResult::NoModule => Err(CommandError::NoModule),
                    AppResult::StaleDuplicate => Err(CommandError::Rejected {
                        index: slot,
                        error: "stale duplicate: this idempotency key's result is no longer kept"
                            .into(),
                    }),
                    AppResult::Installed { .. }
                    | AppResult::InstallFailed { .. }
                    | AppResult::Staged { .. }
                    | AppResult::AddressRecorded
                    | AppResult::ApplyRules { .. } => {
                        panic!("a command envelope produced a module, address or rules result")
                    }
                };
                let _ = reply.send(answer);
            }
            Waiter::Deploy(reply) => {
                let answer = match result {
                    AppResult::Installed { module } => Ok(DeployOk {
                        module,
                        index: slot,
                    }),
                    AppResult::InstallFailed { reason } => Err(DeployError::MigrationFailed {
                        index: slot,
                        reason,
                    }),
                    other => panic!("a module install produced {other:?}"),
                };
                let _ = reply.send(answer);
            }
            Waiter::Stage(reply) => {
                let answer = match result {
                    AppResult::Staged { staged_bytes } => Ok(staged_bytes),
                    // Another upload replaced the staging area (or the chunk is out of
                    // place): the deploy can be tried again.
                    AppResult::Rejected(reason) => Err(DeployError::Unavailable {
                        reason,
                        retry_after_ms: self.core.retry_after_ms,
                    }),
                    other => panic!("a module chunk produced {other:?}"),
                };
                let _ = reply.send(answer);
            }
            Waiter::Address { id, reply } => match result {
                AppResult::AddressRecorded => self.on_address_recorded(id, reply),
                // A former member's id (ids are never reused), refused at apply.
                AppResult::Rejected(reason) => {
                    let _ = reply.send(Err(MemberError::Refused { reason }));
                }
                other => panic!("an address entry produced {other:?}"),
            },
            Waiter::Change(_) => panic!("a membership change answered by an applied command"),
            Waiter::Query { .. } => {
                panic!("query request {request} answered by an applied command")
            }
        }
    }

    fn leader_hint(&self, leader: Option<NodeId>) -> Option<LeaderHint> {
        let id = leader?;
        let http = self.peers.get(&id)?.http.clone()?;
        Some(LeaderHint { id, http })
    }

    fn reply(&mut self, request: RequestId, outcome: Outcome) {
        let Some(waiter) = self.waiters.remove(&request) else {
            return;
        };
        let retry_after_ms = self.core.retry_after_ms;
        match (waiter, outcome) {
            (Waiter::Query { payload, reply }, Outcome::ReadReady) => {
                let result = self.run_query(&payload);
                let _ = reply.send(result);
            }
            (Waiter::Query { reply, .. }, Outcome::NotLeader { leader_hint }) => {
                let answer = match self.leader_hint(leader_hint) {
                    Some(leader) => QueryError::NotLeader {
                        leader: Some(leader),
                    },
                    None => QueryError::Unavailable {
                        reason: "no leader is known".into(),
                        retry_after_ms,
                    },
                };
                let _ = reply.send(Err(answer));
            }
            (Waiter::Query { reply, .. }, Outcome::Busy) => {
                let _ = reply.send(Err(QueryError::Unavailable {
                    reason: "the leader has too many reads waiting".into(),
                    retry_after_ms,
                }));
            }
            (Waiter::Query { .. }, Outcome::ChangeAccepted { .. } | Outcome::ChangeRefused(_)) => {
                panic!("a query answered with a membership outcome")
            }
            (Waiter::Change(reply), outcome) => self.on_change_outcome(reply, outcome),
            (Waiter::Address { reply, .. }, outcome) => {
                let _ = reply.send(Err(MemberError::Unavailable {
                    reason: refusal(&outcome),
                    retry_after_ms,
                }));
            }
            (Waiter::Command(reply, _), outcome) => {
                let _ = reply.send(Err(CommandError::Unavailable {
                    reason: refusal(&outcome),
                    retry_after_ms,
                }));
            }
            (Waiter::Deploy(reply), outcome) => {
                let _ = reply.send(Err(DeployError::Unavailable {
                    reason: refusal(&outcome),
                    retry_after_ms,
                }));
            }
            (Waiter::Stage(reply), outcome) => {
                let _ = reply.send(Err(DeployError::Unavailable {
                    reason: refusal(&outcome),
                    retry_after_ms,
                }));
            }
        }
    }

    /// After a leader change, a command forwarded to (or proposed by) the old leader
    /// may never be decided, or be decided much later: answer its client now with
    /// `Unknown`, so it retries promptly (with the same Idempotency-Key, never twice).
    fn fail_in_flight(&mut self) {
        let in_flight: Vec<RequestId> = self
            .waiters
            .iter()
            .filter(|(_, waiter)| !matches!(waiter, Waiter::Query { .. }))
            .map(|(request, _)| *request)
            .collect();
        for request in in_flight {
            let reason = "the leader changed while this was in flight; it may or may not be \
                          applied (retry with the same Idempotency-Key)"
                .to_string();
            match self.waiters.remove(&request) {
                Some(Waiter::Command(reply, _)) => {
                    let _ = reply.send(Err(CommandError::Unknown { reason }));
                }
                Some(Waiter::Deploy(reply)) => {
                    let _ = reply.send(Err(DeployError::Unknown { reason }));
                }
                Some(Waiter::Stage(reply)) => {
                    let _ = reply.send(Err(DeployError::Unknown { reason }));
                }
                Some(waiter @ (Waiter::Address { .. } | Waiter::Change(_))) => {
                    // No Idempotency-Key here: the API points to GET /v1/cluster.
                    let reason = "the leader changed while the change was in flight".into();
                    Loop::fail_member_waiter(waiter, reason);
                }
                _ => unreachable!("only commands and deploys were selected"),
            }
        }
    }

    pub(super) fn send_peer_info(&mut self) {
        let status = self.core.replica.status();
        let peer = match self.core.applier.machine.addresses().get(self.core.id) {
            Some(address) => address.peer.to_string(),
            None => self.core.peer_listen.to_string(),
        };
        let info = WireMessage::Info(PeerInfo {
            peer,
            http: self.core.http_advertise.clone(),
            chosen_index: status.chosen_index,
            applied_index: self.core.applier.applied_index,
            apply_rules_max: Some(self.core.applier.machine.compiler().apply_rules_max()),
        });
        let payload = Bytes::from(codec::encode_wire(&info));
        for peer in self.core.transport.peers().keys() {
            let _ = self.core.transport.send(*peer, payload.clone());
        }
        // Reports are best effort: repeating the newest lets a peer that missed it (or
        // restarted) still confirm it.
        if let Some(newest) = self.core.checkpoints.newest() {
            self.send_checkpoint(CheckpointReport {
                index: newest.index,
                hash: newest.hash.0,
            });
        }
        self.request_repair();
    }

    /// Leading, proposes the highest apply rules every member implements (by its
    /// recent peer info) when they are above the rules in force. Rules only rise, and
    /// only to what every member of the configuration can apply, so no replica of a
    /// rolling upgrade meets rules it does not know; a member that never said (an
    /// older build), or not in the last two info rounds (it may be restarting as
    /// another build), keeps the rules where they are.
    fn maybe_raise_apply_rules(&mut self) {
        if self.core.replica.status().leading.is_none() {
            return;
        }
        let info_ticks = (self.core.peer_info_interval_ms / self.core.tick_ms).max(1);
        let now = self.clock.delivered;
        let mut rules = self.core.applier.machine.compiler().apply_rules_max();
        for member in self.core.replica.configuration().members() {
            if member == self.core.id {
                continue;
            }
            let recent = self
                .peers
                .get(&member)
                .filter(|seen| now.saturating_sub(seen.info_at_tick) <= 2 * info_ticks);
            match recent.and_then(|seen| seen.apply_rules_max) {
                Some(peer_max) => rules = rules.min(peer_max),
                None => return,
            }
        }
        if rules <= self.core.applier.machine.apply_rules() {
            return;
        }
        // Once per few peer-info rounds: the entry takes a round trip to apply.
        let retry_ticks = 4 * info_ticks;
        if self
            .apply_rules_proposed
            .is_some_and(|(proposed, at)| proposed == rules && now < at + retry_ticks)
        {
            return;
        }
        self.apply_rules_proposed = Some((rules, now));
        tracing::info!(
            rules,
            in_force = self.core.applier.machine.apply_rules(),
            "every member implements newer apply rules; proposing them"
        );
        let request = self.new_request_id();
        let command = Command {
            payload: app::apply_rules_envelope(rules),
            idempotency_key: None,
            origin: Origin {
                node: self.core.id,
                request,
            },
        };
        self.step(Event::Propose { request, command });
    }

    fn refresh_state_hash(&mut self) {
        let applied = self.core.applier.applied_index;
        if self.hashed_index == Some(applied) {
            return;
        }
        let Some(hash) = self.core.applier.machine.state_hash() else {
            return;
        };
        self.hashed_index = Some(applied);
        self.core
            .published
            .lock()
            .expect("published state lock poisoned")
            .state_hash = Some((applied, hash));
    }

    fn publish(&mut self) {
        let status = self.core.replica.status();
        let leader = match status.leading {
            Some(_) => Some(self.core.id),
            None => status.leader_hint,
        };
        if leader != self.leader_seen {
            if leader.is_some() {
                self.core
                    .counters
                    .add(&self.core.counters.leader_changes, 1);
            }
            tracing::info!(node = self.core.id, leader = ?leader, "leader changed");
            // Learning the first leader strands nothing: without one, proposals are
            // refused at once, never forwarded.
            let stranded = self.leader_seen.is_some();
            self.leader_seen = leader;
            if stranded {
                self.fail_in_flight();
            }
        }
        let mut published = self
            .core
            .published
            .lock()
            .expect("published state lock poisoned");
        published.role = if status.leading.is_some() {
            "leader"
        } else {
            "follower"
        };
        self.publish_membership(&mut published);
        published.leader = leader;
        published.ballot = status.leading.unwrap_or(status.promised);
        published.commit_index = status.chosen_index;
        published.applied_index = self.core.applier.applied_index;
        published.snapshot_index = self.snap.newest().map_or(0, |file| file.id.slot);
        published.apply_rules = self.core.applier.machine.apply_rules();
        published.requests_pending = self.waiters.len();
        published.dedup_clients = self.core.applier.dedup.clients();
        published.peers.clone_from(&self.peers);
        published.checkpoint = self.core.checkpoints.newest();
        published.disk = self.disk.clone();
        published.applies_held = self.held.len();
        published.applying_held = self
            .held_for
            .as_ref()
            .map(|held| (held.sha256, held.slot, held.since));
        published.diverged = self.core.checkpoints.diverged().map(ToString::to_string);
        let app = &self.core.applier.machine;
        if app.version != self.app_version_published {
            published.module = app.current().cloned();
            published.history = app.history().to_vec();
            self.app_version_published = app.version;
        }
    }
}

fn refusal(outcome: &Outcome) -> String {
    match outcome {
        Outcome::NotLeader { .. } => "no leader is known; retry shortly".into(),
        Outcome::Busy => "the leader's proposal queue is full".into(),
        Outcome::ReadReady => panic!("a command answered ReadReady"),
        Outcome::ChangeAccepted { .. } | Outcome::ChangeRefused(_) => {
            panic!("a command answered with a membership outcome")
        }
    }
}

/// Folds what the store recovered, and the slot of the snapshot the state machine was
/// restored from (0: none), into the core's durable state.
pub(crate) fn durable_state(
    recovered: &storage::Recovered,
    snapshot_slot: Slot,
) -> anyhow::Result<crate::paxos::DurableState> {
    let mut durable = crate::paxos::DurableState {
        promised: recovered
            .promised
            .map(|b| Ballot {
                round: b.round,
                node: b.node,
            })
            .unwrap_or(Ballot::ZERO),
        chosen_index: recovered.chosen.unwrap_or(0),
        snapshot_slot,
        log_start: recovered.log_start.max(1),
        ..Default::default()
    };
    anyhow::ensure!(
        durable.log_start <= snapshot_slot + 1,
        "the store was compacted to slot {} but the newest valid snapshot is at slot \
         {snapshot_slot}: slots {}..{} are in neither",
        durable.log_start,
        snapshot_slot + 1,
        durable.log_start
    );
    for (slot, bytes) in &recovered.accepted {
        let entry = codec::decode_entry(bytes)
            .map_err(|error| anyhow::anyhow!("stored entry of slot {slot} is corrupt: {error}"))?;
        durable.log.insert(*slot, entry);
    }
    for slot in snapshot_slot + 1..=durable.chosen_index {
        anyhow::ensure!(
            durable.log.contains_key(&slot),
            "the store's chosen index is {} but slot {slot} is missing",
            durable.chosen_index
        );
    }
    Ok(durable)
}
