//! One Multi-Paxos replica as a pure state machine: acceptor, learner and (when
//! elected) leader in one value. `handle` takes an event and pushes the actions the
//! runtime must perform, in order.
//!
//! Orderings the core encodes (and the runtime must keep):
//! - A `Promise` or `Accepted` reply is released only after `Event::Persisted` for the
//!   `Persist` that made its state durable. Persists complete in issue order, so a
//!   released reply also covers everything persisted before it.
//! - `Apply` actions come exactly once per slot, in slot order; a `Reply` with
//!   `ReadReady` means "serve now", after the `Apply` actions before it.
//! - Messages to itself never leave the core: they go through an internal queue,
//!   drained before `handle` returns, so the leader's own acceptor follows the same
//!   persist-before-reply path as every other.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use super::config::{Configuration, Membership};
use super::params::Params;
use super::rng::SplitMix64;
use super::types::{
    Action, Ballot, Batch, ChangeRefusal, Command, DurableState, Event, LogEntry, MembershipChange,
    Message, NodeId, Origin, Outcome, PersistRecord, ReadMode, RequestId, Slot, Value,
};

/// A reply held back until the persist with the given token completes.
#[derive(Clone, Debug, Hash)]
enum Deferred {
    /// Entries are gathered when the promise is released, so it reports everything
    /// accepted up to then.
    Promise {
        to: NodeId,
        ballot: Ballot,
        first_slot: Slot,
    },
    Accepted {
        to: NodeId,
        ballot: Ballot,
        slot: Slot,
    },
}

#[derive(Clone, Debug, Hash)]
enum Role {
    Follower,
    /// Asking for pre-votes for `round`; no one's state changes until a quorum agrees.
    PreCandidate {
        round: u64,
        grants: BTreeSet<NodeId>,
    },
    /// Phase 1 in flight.
    Candidate(Box<CandidateState>),
    Leader(Box<LeaderState>),
}

#[derive(Clone, Debug, Hash)]
struct CandidateState {
    ballot: Ballot,
    first_slot: Slot,
    promised_by: BTreeSet<NodeId>,
    /// Per slot, the value Phase 1 must adopt: a chosen one, else the highest ballot's.
    adopted: BTreeMap<Slot, LogEntry>,
    /// The configuration of the chosen prefix when Phase 1 started: it governs
    /// `first_slot` and on up to the first configuration entry after it.
    base: Configuration,
    /// Every configuration carried by an entry some promise reported from
    /// `first_slot` on. Any of them may govern recovered slots (it may have been
    /// chosen), so each must promise too before this candidate leads.
    revealed: Vec<Configuration>,
}

#[derive(Clone, Debug, Hash)]
struct InFlight {
    value: Value,
    acked: BTreeSet<NodeId>,
    proposed_tick: u64,
}

#[derive(Clone, Debug, Hash)]
struct ReadWait {
    request: RequestId,
    read_index: Slot,
    /// The first heartbeat round sent after the read arrived; a quorum ack of it (or a
    /// later one) confirms leadership for this read.
    seq_needed: u64,
}

#[derive(Clone, Debug, Hash)]
struct LeaderState {
    ballot: Ballot,
    next_slot: Slot,
    in_flight: BTreeMap<Slot, InFlight>,
    queued: VecDeque<Command>,
    /// The no-op this leader proposed right after Phase 1. Reads wait until it is
    /// applied: then every slot chosen before this leader is applied too.
    ready_slot: Slot,
    heartbeat_seq: u64,
    heartbeat_elapsed_ticks: u64,
    /// Tick at which each recent heartbeat round was sent.
    round_sent_tick: BTreeMap<u64, u64>,
    /// Latest round each peer acknowledged.
    acked_seq: BTreeMap<NodeId, u64>,
    /// Latest round a quorum acknowledged, and when it was sent.
    quorum_seq: u64,
    quorum_sent_tick: Option<u64>,
    /// Tick of the latest quorum evidence (or of election); for stepping down.
    contact_tick: u64,
    reads: Vec<ReadWait>,
    round_wanted: bool,
    /// Per peer: catch-up sent through this slot, at this tick.
    catchup: BTreeMap<NodeId, (Slot, u64)>,
    /// Slots Phase 1 recovered (re-proposed in this ballot), then the `ready_slot`
    /// no-op, waiting to be proposed in order: a configuration entry among them
    /// stalls the rest until it is chosen.
    backlog: VecDeque<(Slot, Value)>,
    /// Slot of the latest configuration entry this leader proposed (0: none). No
    /// slot after it is proposed until the chosen index reaches it.
    config_pending: Slot,
    /// Only heartbeat rounds from this one on count for the lease: it is raised when
    /// the configuration changes, so a lease always rests on a quorum of the
    /// configuration governing now.
    lease_floor_seq: u64,
    /// Per peer: its chosen index and the tick it was last heard from (for the
    /// learner-lag and running-quorum checks of membership changes).
    peers: BTreeMap<NodeId, PeerSeen>,
    /// Nodes a configuration change removed, with the slot of that change: they still
    /// get heartbeats (hence catch-up) until they report that slot chosen, so they
    /// learn they were removed and stop campaigning.
    departing: BTreeMap<NodeId, Slot>,
}

#[derive(Clone, Copy, Debug, Hash)]
struct PeerSeen {
    chosen_index: Slot,
    heard_tick: u64,
}

/// What `Replica::status` reports, for tests, the simulator and the status API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Status {
    pub id: NodeId,
    pub promised: Ballot,
    pub chosen_index: Slot,
    pub applied_index: Slot,
    /// `Some(ballot)` while this replica leads.
    pub leading: Option<Ballot>,
    pub leader_hint: Option<NodeId>,
    /// This replica in the configuration of its chosen prefix. `Outside` means
    /// removed (or not added yet): it never campaigns.
    pub membership: Membership,
    /// First slot still in the log: everything below is covered by a snapshot.
    pub log_start: Slot,
    /// Slot of the newest snapshot this replica saved or installed (0: none).
    pub snapshot_slot: Slot,
    /// Lost its durable state: learns, never votes (`DurableState::amnesic`).
    pub amnesic: bool,
}

#[derive(Clone, Debug, Hash)]
pub struct Replica {
    id: NodeId,
    config: Configuration,
    params: Params,
    rng: SplitMix64,

    // Acceptor and learner state. `promised` may run ahead of the durable promise; the
    // replies that depend on it wait for the persist.
    promised: Ballot,
    log: BTreeMap<Slot, LogEntry>,
    chosen_index: Slot,
    applied_index: Slot,
    /// The configuration in force at `applied_index` (what a snapshot taken now must
    /// store); `config` may be ahead of it.
    applied_config: Configuration,
    /// First slot still in the log. Every slot below is chosen, applied and covered
    /// by a durable snapshot; compaction and snapshot installs raise it.
    log_start: Slot,
    /// Newest durable snapshot of the applied state (0: none).
    snapshot_slot: Slot,
    /// See `DurableState::amnesic`.
    amnesic: bool,
    /// A compaction `restart` decided on, emitted with the first event's actions.
    compact_pending: Option<Slot>,

    next_token: u64,
    deferred: VecDeque<(u64, Deferred)>,
    inbox: VecDeque<(NodeId, Message)>,

    tick: u64,
    now_ms: u64,
    last_timestamp_ms: u64,
    heard_elapsed_ticks: u64,
    election_elapsed_ticks: u64,
    election_timeout_ticks: u64,
    max_round_seen: u64,
    leader_hint: Option<NodeId>,
    role: Role,
}

impl Replica {
    /// A replica with empty durable state.
    pub fn new(id: NodeId, config: Configuration, params: Params, seed: u64) -> Replica {
        Replica::restart(id, config, params, seed, DurableState::default())
    }

    /// A replica rebuilt from what it persisted. Unpersisted state is gone. The state
    /// machine was restored from the snapshot at `durable.snapshot_slot` (or is empty),
    /// and every chosen slot after it is applied again. It refuses to support other
    /// candidates for `election_ticks_min` after starting, as it cannot know whether it
    /// acknowledged a leader lease just before crashing.
    pub fn restart(
        id: NodeId,
        config: Configuration,
        params: Params,
        seed: u64,
        durable: DurableState,
    ) -> Replica {
        params.validate();
        let mut log = durable.log;
        // `config` is the configuration in force at the snapshot (or the first one):
        // configuration entries chosen after it are applied on top, in slot order.
        let mut config = config;
        let applied_config = config.clone();
        let snapshot_slot = durable.snapshot_slot;
        let amnesic = durable.amnesic && !params.bug_amnesic_replica_votes;
        let mut log_start = durable.log_start.max(1);
        assert!(
            log_start <= snapshot_slot + 1,
            "log compacted to {log_start} beyond the snapshot at {snapshot_slot}"
        );
        let mut compact_pending = None;
        if durable.chosen_index < snapshot_slot {
            // The snapshot was installed from a peer and the compaction that follows
            // an install was lost: the entries it covers may be accepted values that
            // lost, never known chosen here. Only the durable chosen index vouches for
            // entries, so drop them all and finish that compaction.
            log_start = snapshot_slot + 1;
            compact_pending = Some(log_start);
        }
        // Entries the store kept below the snapshot (the compaction margin) are at or
        // below the durable chosen index: chosen, and they serve lagging peers.
        let chosen_index = durable.chosen_index.max(snapshot_slot);
        log.retain(|slot, _| *slot >= log_start);
        for (_, entry) in log.range_mut(..=snapshot_slot) {
            entry.chosen = true;
        }
        for slot in snapshot_slot + 1..=durable.chosen_index {
            let Some(entry) = log.get_mut(&slot) else {
                panic!(
                    "durable chosen prefix has a hole: replica {id} slot {slot} (chosen index {})",
                    durable.chosen_index
                );
            };
            entry.chosen = true;
            if let Value::Configuration(chosen) = &entry.value {
                config = Configuration::clone(chosen);
            }
        }
        let mut rng = SplitMix64::new(seed ^ id.wrapping_mul(0x2545_F491_4F6C_DD1D));
        let election_timeout_ticks =
            rng.range(params.election_ticks_min, params.election_ticks_max);
        Replica {
            id,
            applied_config: applied_config.clone(),
            config,
            params,
            rng,
            promised: durable.promised,
            max_round_seen: durable.promised.round,
            log,
            chosen_index,
            applied_index: snapshot_slot,
            log_start,
            snapshot_slot,
            amnesic,
            compact_pending,
            next_token: 1,
            deferred: VecDeque::new(),
            inbox: VecDeque::new(),
            tick: 0,
            now_ms: 0,
            last_timestamp_ms: 0,
            heard_elapsed_ticks: 0,
            election_elapsed_ticks: 0,
            election_timeout_ticks,
            leader_hint: None,
            role: Role::Follower,
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Whether this replica leads now (`status().leading.is_some()`, without building
    /// the whole status).
    pub fn is_leading(&self) -> bool {
        matches!(self.role, Role::Leader(_))
    }

    pub fn status(&self) -> Status {
        Status {
            id: self.id,
            promised: self.promised,
            chosen_index: self.chosen_index,
            applied_index: self.applied_index,
            leading: match &self.role {
                Role::Leader(leader) => Some(leader.ballot),
                _ => None,
            },
            leader_hint: self.leader_hint,
            membership: self.config.membership(self.id),
            log_start: self.log_start,
            snapshot_slot: self.snapshot_slot,
            amnesic: self.amnesic,
        }
    }

    /// The configuration in force after the chosen prefix: it governs the next slot
    /// (stored in snapshots).
    pub fn configuration(&self) -> &Configuration {
        &self.config
    }

    /// The configuration in force at the applied index: the one a snapshot of the
    /// applied state must store, and what `Apply` of configuration entries reports.
    pub fn applied_configuration(&self) -> &Configuration {
        &self.applied_config
    }

    /// The log entry this replica holds for `slot`, if any.
    pub fn entry(&self, slot: Slot) -> Option<&LogEntry> {
        self.log.get(&slot)
    }

    /// True while this replica leads and its lease allows local reads.
    pub fn lease_valid(&self) -> bool {
        match &self.role {
            Role::Leader(leader) => self.leader_lease_valid(leader),
            _ => false,
        }
    }

    /// Convenience wrapper around `handle` for tests and simple runtimes.
    pub fn step(&mut self, event: Event) -> Vec<Action> {
        let mut actions = Vec::new();
        self.handle(event, &mut actions);
        actions
    }

    /// Processes one event and pushes the resulting actions onto `actions`.
    pub fn handle(&mut self, event: Event, actions: &mut Vec<Action>) {
        if let Some(below) = self.compact_pending.take() {
            actions.push(Action::Compact { below });
        }
        match event {
            Event::Message { from, msg } => self.on_message(from, msg, actions),
            Event::Tick { now_ms } => self.on_tick(now_ms, actions),
            Event::Propose { request, command } => self.on_propose(request, command, actions),
            Event::Persisted { token } => self.on_persisted(token, actions),
            Event::Read { request, mode } => self.on_read(request, mode, actions),
            Event::ChangeMembership {
                request,
                change,
                force,
            } => {
                let outcome = self.change_membership(change, force, actions);
                actions.push(Action::Reply { request, outcome });
            }
            Event::SnapshotSaved { slot } => self.on_snapshot_saved(slot, actions),
            Event::SnapshotInstalled {
                slot,
                configuration,
            } => self.on_snapshot_installed(slot, configuration, actions),
        }
        while let Some((from, msg)) = self.inbox.pop_front() {
            self.on_message(from, msg, actions);
        }
        self.apply_chosen(actions);
        self.serve_reads(actions);
    }

    // ---- plumbing -------------------------------------------------------------------

    fn send(&mut self, to: NodeId, msg: Message, actions: &mut Vec<Action>) {
        if to == self.id {
            self.inbox.push_back((to, msg));
        } else {
            actions.push(Action::Send { to, msg });
        }
    }

    fn broadcast(&mut self, msg: &Message, actions: &mut Vec<Action>) {
        let members: Vec<NodeId> = self.config.members().collect();
        for to in members {
            self.send(to, msg.clone(), actions);
        }
    }

    fn persist(&mut self, record: PersistRecord, actions: &mut Vec<Action>) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        actions.push(Action::Persist { token, record });
        token
    }

    fn on_persisted(&mut self, token: u64, actions: &mut Vec<Action>) {
        assert!(
            token < self.next_token,
            "persisted token {token} was never issued"
        );
        while self
            .deferred
            .front()
            .is_some_and(|(waiting, _)| *waiting <= token)
        {
            let (_, deferred) = self.deferred.pop_front().expect("front checked above");
            match deferred {
                Deferred::Promise { to, first_slot, .. }
                    if first_slot < self.log_start
                        && !self.params.bug_promise_over_compacted_slots =>
                {
                    // Compacted while the promise was being persisted: it could no
                    // longer report every slot the candidate asked for.
                    if to != self.id {
                        actions.push(Action::SendSnapshot {
                            to,
                            slot: first_slot,
                        });
                    } else if matches!(self.role, Role::Candidate(_)) {
                        // Our own Phase 1 started below what we now hold and can never
                        // count our promise: give it up, a later one starts higher.
                        self.become_follower(actions);
                    }
                }
                Deferred::Promise {
                    to,
                    ballot,
                    first_slot,
                } => {
                    let entries: Vec<(Slot, LogEntry)> = self
                        .log
                        .range(first_slot..)
                        .map(|(slot, entry)| (*slot, entry.clone()))
                        .collect();
                    self.send(
                        to,
                        Message::Promise {
                            ballot,
                            first_slot,
                            entries,
                        },
                        actions,
                    );
                }
                Deferred::Accepted { to, ballot, slot } => {
                    self.send(to, Message::Accepted { ballot, slot }, actions);
                }
            }
        }
    }

    fn observe(&mut self, ballot: Ballot) {
        self.max_round_seen = self.max_round_seen.max(ballot.round);
    }

    fn reset_election_timer(&mut self) {
        self.election_elapsed_ticks = 0;
        self.election_timeout_ticks = self.rng.range(
            self.params.election_ticks_min,
            self.params.election_ticks_max,
        );
    }

    /// A leader was heard from in a ballot at least our promise.
    fn heard_leader(&mut self, leader: NodeId) {
        self.leader_hint = Some(leader);
        self.heard_elapsed_ticks = 0;
        self.reset_election_timer();
    }

    /// Stops leading or campaigning. Queued (never proposed) commands and waiting
    /// reads are answered "not leader"; proposed slots stay in acceptors' logs and
    /// may still be chosen, so their clients learn the outcome by retrying.
    fn become_follower(&mut self, actions: &mut Vec<Action>) {
        let role = std::mem::replace(&mut self.role, Role::Follower);
        if let Role::Leader(leader) = role {
            let hint = self.leader_hint.filter(|node| *node != self.id);
            for command in leader.queued {
                let outcome = Outcome::NotLeader { leader_hint: hint };
                actions.push(Action::Reply {
                    request: command.origin.request,
                    outcome,
                });
            }
            for read in leader.reads {
                let outcome = Outcome::NotLeader { leader_hint: hint };
                actions.push(Action::Reply {
                    request: read.request,
                    outcome,
                });
            }
            if self.leader_hint == Some(self.id) {
                self.leader_hint = None;
            }
            self.heard_elapsed_ticks = 0;
        }
        self.reset_election_timer();
    }

    fn own_ballot(&self) -> Option<Ballot> {
        match &self.role {
            Role::Leader(leader) => Some(leader.ballot),
            Role::Candidate(candidate) => Some(candidate.ballot),
            _ => None,
        }
    }

    /// A message in `ballot` from someone else: a leader or candidate with a lower
    /// ballot gives up.
    fn yield_to(&mut self, ballot: Ballot, actions: &mut Vec<Action>) {
        if self.own_ballot().is_some_and(|own| own < ballot) {
            self.become_follower(actions);
        } else if matches!(self.role, Role::PreCandidate { .. }) && ballot >= self.promised {
            self.role = Role::Follower;
        }
    }

    // ---- time and elections ----------------------------------------------------------

    fn on_tick(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        self.tick += 1;
        self.now_ms = self.now_ms.max(now_ms);
        if let Role::Leader(leader) = &mut self.role {
            leader.heartbeat_elapsed_ticks += 1;
            let lost_quorum =
                self.tick.saturating_sub(leader.contact_tick) >= self.params.election_ticks_min;
            if lost_quorum {
                self.become_follower(actions);
                return;
            }
            if leader.heartbeat_elapsed_ticks >= self.params.heartbeat_ticks || leader.round_wanted
            {
                self.heartbeat_round(actions);
            }
            return;
        }
        self.heard_elapsed_ticks += 1;
        self.election_elapsed_ticks += 1;
        if self.election_elapsed_ticks >= self.election_timeout_ticks {
            self.start_pre_vote(actions);
        } else if self.tick.is_multiple_of(self.params.heartbeat_ticks) {
            self.retransmit_prepare(actions);
        }
    }

    fn start_pre_vote(&mut self, actions: &mut Vec<Action>) {
        self.reset_election_timer();
        if self.amnesic {
            return;
        }
        if !self.config.is_voter(self.id) {
            self.ask_what_was_chosen(actions);
            return;
        }
        let round = self.max_round_seen.max(self.promised.round) + 1;
        self.role = Role::PreCandidate {
            round,
            grants: BTreeSet::new(),
        };
        self.broadcast(&Message::PreVote { round }, actions);
    }

    fn on_pre_vote(&mut self, from: NodeId, round: u64, actions: &mut Vec<Action>) {
        self.probe_outsider(from, actions);
        // Stable leadership: while a leader is live (or we lead), nobody gets support.
        let granted = !matches!(self.role, Role::Leader(_))
            && !self.amnesic
            && (from == self.id || self.heard_elapsed_ticks >= self.params.election_ticks_min);
        let promised = self.promised;
        self.send(
            from,
            Message::PreVoteReply {
                round,
                granted,
                promised,
            },
            actions,
        );
    }

    fn on_pre_vote_reply(
        &mut self,
        from: NodeId,
        round: u64,
        granted: bool,
        promised: Ballot,
        actions: &mut Vec<Action>,
    ) {
        self.observe(promised);
        let Role::PreCandidate {
            round: current,
            grants,
        } = &mut self.role
        else {
            return;
        };
        if *current != round || !granted {
            return;
        }
        grants.insert(from);
        let grants = grants.clone();
        if self.config.is_quorum(|node| grants.contains(&node)) {
            self.start_phase1(actions);
        }
    }

    fn start_phase1(&mut self, actions: &mut Vec<Action>) {
        let round = self.max_round_seen.max(self.promised.round) + 1;
        let ballot = Ballot {
            round,
            node: self.id,
        };
        self.max_round_seen = round;
        let first_slot = self.chosen_index + 1;
        self.role = Role::Candidate(Box::new(CandidateState {
            ballot,
            first_slot,
            promised_by: BTreeSet::new(),
            adopted: BTreeMap::new(),
            base: self.config.clone(),
            revealed: Vec::new(),
        }));
        self.broadcast(&Message::Prepare { ballot, first_slot }, actions);
    }

    /// A replica that may not campaign (a learner, or outside its configuration) and
    /// heard no leader for an election timeout asks one member, at random, what was
    /// chosen after its chosen index; a member that knows more answers with catch-up
    /// (`answer_what_was_chosen`). One member per timeout keeps a removed replica that
    /// still runs from drawing a stream from every member.
    ///
    /// Without this a new configuration can lose every voter able to elect: a leader
    /// that is not a voter of C(new) steps down the moment C(new) is chosen, and the
    /// new voters, which learn configurations only from their chosen prefix, may
    /// still take themselves for learners (the departing leader stepped down or
    /// crashed before catching them up). Only the old voters, now learners, know C(new)
    /// is chosen, and nobody campaigns again. Asking changes no promise and casts no
    /// vote: it only delivers values some replica already knows chosen.
    fn ask_what_was_chosen(&mut self, actions: &mut Vec<Action>) {
        let members: Vec<NodeId> = self
            .config
            .members()
            .filter(|node| *node != self.id)
            .collect();
        if members.is_empty() {
            return;
        }
        let to = members[self.rng.range(0, members.len() as u64) as usize];
        // In the ballot this replica follows: a leader of that ballot takes the
        // question into its own catch-up stream for this peer.
        let probe = Message::Learned {
            ballot: self.promised,
            chosen_index: self.chosen_index,
        };
        self.send(to, probe, actions);
    }

    fn retransmit_prepare(&mut self, actions: &mut Vec<Action>) {
        let Role::Candidate(candidate) = &self.role else {
            return;
        };
        let (ballot, first_slot) = (candidate.ballot, candidate.first_slot);
        let missing: Vec<NodeId> = self
            .phase1_members(candidate)
            .into_iter()
            .filter(|node| !candidate.promised_by.contains(node))
            .collect();
        for to in missing {
            self.send(to, Message::Prepare { ballot, first_slot }, actions);
        }
    }

    // ---- acceptor --------------------------------------------------------------------

    fn on_message(&mut self, from: NodeId, msg: Message, actions: &mut Vec<Action>) {
        match msg {
            Message::PreVote { round } => self.on_pre_vote(from, round, actions),
            Message::PreVoteReply {
                round,
                granted,
                promised,
            } => self.on_pre_vote_reply(from, round, granted, promised, actions),
            Message::Prepare { ballot, first_slot } => {
                self.on_prepare(from, ballot, first_slot, actions)
            }
            Message::Promise {
                ballot,
                first_slot,
                entries,
            } => self.on_promise(from, ballot, first_slot, entries, actions),
            Message::Reject { promised } => {
                self.observe(promised);
                if self.counts_in_my_quorums(from) {
                    self.yield_to(promised, actions);
                } else {
                    // A node outside our configurations (removed, with a stale view
                    // and a higher promise) cannot depose us; tell it what was chosen.
                    self.probe_outsider(from, actions);
                }
            }
            Message::Accept {
                ballot,
                slot,
                value,
                chosen_index,
            } => self.on_accept(from, ballot, slot, value, chosen_index, actions),
            Message::Accepted { ballot, slot } => self.on_accepted(from, ballot, slot, actions),
            Message::Heartbeat {
                ballot,
                seq,
                chosen_index,
            } => self.on_heartbeat(from, ballot, seq, chosen_index, actions),
            Message::HeartbeatAck {
                ballot,
                seq,
                chosen_index,
            } => self.on_heartbeat_ack(from, ballot, seq, chosen_index, actions),
            Message::Chosen {
                ballot,
                entries,
                chosen_index,
            } => self.on_chosen(from, ballot, entries, chosen_index, actions),
            Message::Learned {
                ballot,
                chosen_index,
            } => self.on_learned(from, ballot, chosen_index, actions),
            Message::Forward { command } => self.on_forward(command, actions),
        }
    }

    /// Whether a promise from `first_slot` on carries at most
    /// `Params::promise_bytes_max` bytes of command payloads. Payloads alone are less
    /// than any encoding of the promise, so a promise refused here could not have been
    /// sent in a frame of that size.
    fn promise_fits(&self, first_slot: Slot) -> bool {
        let max = self.params.promise_bytes_max;
        let mut bytes = 0usize;
        self.log.range(first_slot..).all(|(_, entry)| {
            if let Value::Batch(batch) = &entry.value {
                for command in &batch.commands {
                    bytes = bytes.saturating_add(command.payload.len());
                }
            }
            bytes <= max
        })
    }

    fn on_prepare(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        first_slot: Slot,
        actions: &mut Vec<Action>,
    ) {
        self.observe(ballot);
        let leader_live = matches!(self.role, Role::Leader(_))
            || (self.heard_elapsed_ticks < self.params.election_ticks_min
                && self.leader_hint != Some(from));
        if self.amnesic {
            // It may have promised a higher ballot before it lost its state.
            return;
        }
        if from != self.id && leader_live {
            // Stable leadership and lease safety: while we (may) have acknowledged a
            // live leader's lease, no other candidate gets our promise.
            self.probe_outsider(from, actions);
            return;
        }
        if ballot < self.promised {
            let promised = self.promised;
            self.send(from, Message::Reject { promised }, actions);
            return;
        }
        if first_slot < self.log_start && !self.params.bug_promise_over_compacted_slots {
            // Slots in first_slot..log_start are chosen but compacted away here, so a
            // promise could not report them and the candidate might fill them with
            // no-ops. It gets no promise, and a snapshot to catch up from instead.
            actions.push(Action::SendSnapshot {
                to: from,
                slot: first_slot,
            });
            return;
        }
        if !self.promise_fits(first_slot) {
            // It could not be sent (see `Params::promise_bytes_max`): the candidate
            // sees what it would see anyway, a promise that never arrives, but our
            // ballot and the leader we follow stay.
            return;
        }
        self.promised = ballot;
        if from != self.id {
            self.yield_to(ballot, actions);
            self.reset_election_timer();
        }
        let token = self.persist(
            PersistRecord {
                promised: Some(ballot),
                ..Default::default()
            },
            actions,
        );
        self.deferred.push_back((
            token,
            Deferred::Promise {
                to: from,
                ballot,
                first_slot,
            },
        ));
    }

    fn on_accept(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        slot: Slot,
        value: Value,
        leader_chosen_index: Slot,
        actions: &mut Vec<Action>,
    ) {
        self.observe(ballot);
        if ballot < self.promised {
            let promised = self.promised;
            self.send(from, Message::Reject { promised }, actions);
            return;
        }
        let promise_raised = ballot > self.promised;
        self.promised = ballot;
        if from != self.id {
            self.yield_to(ballot, actions);
            self.heard_leader(from);
        }
        let mut record = PersistRecord {
            promised: promise_raised.then_some(ballot),
            ..Default::default()
        };
        let chosen_here = self.log.get(&slot).is_some_and(|entry| entry.chosen);
        if !chosen_here && slot >= self.log_start {
            // A chosen entry is never overwritten: any later ballot proposes the same
            // value, and its chosen flag is what Phase 1 trusts most.
            let entry = LogEntry {
                ballot,
                value,
                chosen: false,
            };
            record.entries.push((slot, entry.clone()));
            self.log.insert(slot, entry);
        }
        let token = self.persist(record, actions);
        // The planted bug skips only the entry's persist, not the promise's (no reply
        // is waiting for an earlier persist): the simulator checks promises directly,
        // and this bug must be found through its consequences.
        let promise_durable = !promise_raised && self.deferred.is_empty();
        if self.amnesic {
            // Stored to learn commits from, never acknowledged: it cannot count
            // towards a quorum, as it may have promised a higher ballot once.
        } else if self.params.bug_accepted_before_persist && promise_durable {
            self.send(from, Message::Accepted { ballot, slot }, actions);
        } else {
            self.deferred.push_back((
                token,
                Deferred::Accepted {
                    to: from,
                    ballot,
                    slot,
                },
            ));
        }
        self.learn_chosen(ballot, leader_chosen_index, actions);
    }

    /// Commit learning: slot s <= the leader's chosen index is chosen here only if the
    /// value held for s is known to be the chosen one: accepted in the leader's current
    /// ballot (a leader proposes one value per slot per ballot, and it is the chosen
    /// value) or already marked chosen. Anything else waits for catch-up.
    fn learn_chosen(
        &mut self,
        ballot: Ballot,
        leader_chosen_index: Slot,
        actions: &mut Vec<Action>,
    ) {
        let mut slot = self.chosen_index + 1;
        while slot <= leader_chosen_index {
            match self.log.get_mut(&slot) {
                Some(entry) if entry.chosen || entry.ballot == ballot => entry.chosen = true,
                _ => break,
            }
            slot += 1;
        }
        self.advance_chosen_index(actions);
    }

    /// Moves the chosen index over every contiguous chosen slot and persists it. A
    /// configuration entry it passes governs every slot after its own from now on.
    fn advance_chosen_index(&mut self, actions: &mut Vec<Action>) {
        let before = self.chosen_index;
        while let Some(entry) = self
            .log
            .get(&(self.chosen_index + 1))
            .filter(|entry| entry.chosen)
        {
            self.chosen_index += 1;
            if let Value::Configuration(config) = &entry.value {
                let config = Configuration::clone(config);
                self.configuration_chosen(self.chosen_index, config, actions);
            }
        }
        if self.chosen_index > before {
            let record = PersistRecord {
                chosen_index: Some(self.chosen_index),
                ..Default::default()
            };
            self.persist(record, actions);
        }
    }

    fn apply_chosen(&mut self, actions: &mut Vec<Action>) {
        while self.applied_index < self.chosen_index {
            let slot = self.applied_index + 1;
            let entry = self
                .log
                .get(&slot)
                .expect("chosen slot missing from the log");
            assert!(
                entry.chosen,
                "applying slot {slot} that is not known chosen"
            );
            match &entry.value {
                Value::Batch(batch) => {
                    self.last_timestamp_ms = self.last_timestamp_ms.max(batch.timestamp_ms);
                }
                Value::Configuration(config) => {
                    self.applied_config = Configuration::clone(config);
                }
                Value::Noop => {}
            }
            actions.push(Action::Apply {
                slot,
                value: entry.value.clone(),
            });
            self.applied_index = slot;
        }
    }

    fn on_heartbeat(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        seq: u64,
        leader_chosen_index: Slot,
        actions: &mut Vec<Action>,
    ) {
        self.observe(ballot);
        if ballot < self.promised {
            let promised = self.promised;
            self.send(from, Message::Reject { promised }, actions);
            return;
        }
        self.yield_to(ballot, actions);
        self.heard_leader(from);
        self.learn_chosen(ballot, leader_chosen_index, actions);
        let chosen_index = self.chosen_index;
        if self.amnesic {
            // An acknowledgement counts towards the leader's lease and read-index
            // rounds, a vote of sorts; `Learned` only drives catch-up.
            self.send(
                from,
                Message::Learned {
                    ballot,
                    chosen_index,
                },
                actions,
            );
            return;
        }
        self.send(
            from,
            Message::HeartbeatAck {
                ballot,
                seq,
                chosen_index,
            },
            actions,
        );
    }

    fn on_chosen(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        entries: Vec<(Slot, Value)>,
        leader_chosen_index: Slot,
        actions: &mut Vec<Action>,
    ) {
        // Chosen values are final whoever delivers them, so a stale sender is fine.
        let mut record = PersistRecord::default();
        for (slot, value) in entries {
            if slot <= self.chosen_index || slot > leader_chosen_index {
                continue;
            }
            let ballot_held = match self.log.get(&slot) {
                Some(entry) if entry.chosen => continue,
                Some(entry) => entry.ballot,
                None => Ballot::ZERO,
            };
            let entry = LogEntry {
                ballot: ballot_held,
                value,
                chosen: true,
            };
            record.entries.push((slot, entry.clone()));
            self.log.insert(slot, entry);
        }
        if !record.entries.is_empty() {
            self.persist(record, actions);
        }
        self.advance_chosen_index(actions);
        let chosen_index = self.chosen_index;
        self.send(
            from,
            Message::Learned {
                ballot,
                chosen_index,
            },
            actions,
        );
    }

    // ---- snapshots and compaction -----------------------------------------------------

    fn on_snapshot_saved(&mut self, slot: Slot, actions: &mut Vec<Action>) {
        assert!(
            slot <= self.applied_index,
            "snapshot at {slot} is ahead of the applied index {}",
            self.applied_index
        );
        self.snapshot_slot = self.snapshot_slot.max(slot);
        let below = slot.saturating_sub(self.params.compaction_margin_entries) + 1;
        self.compact_below(below, actions);
    }

    fn on_snapshot_installed(
        &mut self,
        slot: Slot,
        configuration: Configuration,
        actions: &mut Vec<Action>,
    ) {
        if slot <= self.applied_index {
            return;
        }
        // Every slot up to `slot` is chosen (the snapshot is of an applied state), so
        // whatever this replica holds for them is either the chosen value or an
        // accepted one that lost: both are dropped.
        if self.own_ballot().is_some() {
            // Its proposals or Phase 1 start from a slot the snapshot now covers
            // (often the snapshot answers one of its own refused Prepares). Leading
            // on would mean rebuilding that state; stepping down is simpler and safe,
            // and a later election starts from the snapshot.
            self.become_follower(actions);
        }
        self.snapshot_slot = slot;
        self.applied_index = slot;
        self.applied_config = configuration.clone();
        if self.chosen_index < slot {
            // The configuration entries up to `slot` are skipped: the snapshot's
            // configuration is the one in force after them.
            self.chosen_index = slot;
            self.configuration_chosen(slot, configuration, actions);
        }
        self.compact_below(slot + 1, actions);
        self.advance_chosen_index(actions);
    }

    fn compact_below(&mut self, below: Slot, actions: &mut Vec<Action>) {
        if below <= self.log_start {
            return;
        }
        debug_assert!(below <= self.applied_index + 1);
        self.log = self.log.split_off(&below);
        self.log_start = below;
        actions.push(Action::Compact { below });
    }

    // ---- leader ----------------------------------------------------------------------

    fn on_promise(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        first_slot: Slot,
        entries: Vec<(Slot, LogEntry)>,
        actions: &mut Vec<Action>,
    ) {
        let Role::Candidate(candidate) = &mut self.role else {
            return;
        };
        if candidate.ballot != ballot || candidate.first_slot != first_slot {
            return;
        }
        candidate.promised_by.insert(from);
        let mut newly_revealed = Vec::new();
        for (slot, entry) in entries {
            if slot < first_slot {
                continue;
            }
            if let Value::Configuration(config) = &entry.value {
                if !candidate.revealed.contains(config) {
                    candidate.revealed.push(Configuration::clone(config));
                    newly_revealed.push(Configuration::clone(config));
                }
            }
            let adopt = match candidate.adopted.get(&slot) {
                None => true,
                Some(held) => !held.chosen && (entry.chosen || entry.ballot > held.ballot),
            };
            if adopt {
                candidate.adopted.insert(slot, entry);
            }
        }
        // Ask the members of a newly revealed configuration at once (retransmission
        // covers losses).
        for config in newly_revealed {
            let Role::Candidate(candidate) = &self.role else {
                unreachable!("still a candidate")
            };
            let missing: Vec<NodeId> = config
                .members()
                .filter(|node| !candidate.promised_by.contains(node))
                .collect();
            for to in missing {
                self.send(to, Message::Prepare { ballot, first_slot }, actions);
            }
        }
        let Role::Candidate(candidate) = &self.role else {
            return;
        };
        let promised_by = &candidate.promised_by;
        let promised = |node| promised_by.contains(&node);
        // Every configuration that may govern a slot from `first_slot` on: the one of
        // the chosen prefix at the start, the current one (catch-up may have moved
        // it), and every one an acceptor reported.
        let quorums = self.config.is_quorum(promised)
            && candidate.base.is_quorum(promised)
            && (self.params.bug_phase1_ignores_revealed_configurations
                || candidate
                    .revealed
                    .iter()
                    .all(|config| config.is_quorum(promised)));
        if quorums {
            self.become_leader(actions);
        }
    }

    /// Who a candidate asks for promises: members of every configuration its Phase 1
    /// needs a quorum of.
    fn phase1_members(&self, candidate: &CandidateState) -> BTreeSet<NodeId> {
        let mut members: BTreeSet<NodeId> = self.config.members().collect();
        members.extend(candidate.base.members());
        for config in &candidate.revealed {
            members.extend(config.members());
        }
        members
    }

    /// True when `node` is a member of a configuration whose quorums this replica
    /// counts now (as leader or candidate, or as a follower of its own config).
    fn counts_in_my_quorums(&self, node: NodeId) -> bool {
        match &self.role {
            Role::Candidate(candidate) => self.phase1_members(candidate).contains(&node),
            _ => self.config.is_member(node),
        }
    }

    /// A leader hearing from a node outside its configuration (a removed node that
    /// still campaigns) starts a catch-up stream to it: an empty `Chosen` makes it
    /// answer `Learned` with its chosen index, and catch-up follows until it has
    /// learned the entry that removed it.
    fn probe_outsider(&mut self, node: NodeId, actions: &mut Vec<Action>) {
        if node == self.id || self.config.is_member(node) {
            return;
        }
        if let Role::Leader(leader) = &self.role {
            let msg = Message::Chosen {
                ballot: leader.ballot,
                entries: Vec::new(),
                chosen_index: self.chosen_index,
            };
            self.send(node, msg, actions);
        }
    }

    /// A configuration entry at `slot` is now in the chosen prefix: it governs every
    /// slot after `slot`. A leader's lease restarts on quorums of it, the nodes it
    /// removed are told, and a leader that is no longer a voter steps down.
    fn configuration_chosen(
        &mut self,
        slot: Slot,
        config: Configuration,
        actions: &mut Vec<Action>,
    ) {
        let previous = std::mem::replace(&mut self.config, config);
        let voter = self.config.is_voter(self.id);
        let Role::Leader(leader) = &mut self.role else {
            if !voter && !matches!(self.role, Role::Follower) {
                // A campaign of a replica that is no longer a voter stops: it must
                // never lead (it is not among its own acceptors any more).
                self.become_follower(actions);
            }
            return;
        };
        leader.lease_floor_seq = leader.heartbeat_seq + 1;
        leader.quorum_sent_tick = None;
        leader.round_wanted = true;
        for node in previous.members() {
            if !self.config.is_member(node) && node != self.id {
                leader.departing.insert(node, slot);
            }
        }
        if !voter {
            // Hand over: this leader is not in C(new). Voters time out and elect one
            // of themselves.
            self.become_follower(actions);
        }
    }

    /// An operator's membership change, checked and (when accepted) proposed now.
    fn change_membership(
        &mut self,
        change: MembershipChange,
        force: bool,
        actions: &mut Vec<Action>,
    ) -> Outcome {
        let refused = |refusal| Outcome::ChangeRefused(refusal);
        let Role::Leader(leader) = &self.role else {
            return Outcome::NotLeader {
                leader_hint: self.leader_hint,
            };
        };
        let current = &self.config;
        if current.is_joint()
            || leader.config_pending > self.chosen_index
            || !leader.backlog.is_empty()
        {
            return refused(ChangeRefusal::ChangeInProgress);
        }
        let mut target = current.clone();
        match change {
            MembershipChange::AddLearner(node) => {
                if current.is_member(node) {
                    return refused(ChangeRefusal::AlreadyMember { node });
                }
                target.learners.insert(node);
            }
            MembershipChange::Promote(node) => {
                if !target.learners.remove(&node) {
                    return refused(ChangeRefusal::NotALearner { node });
                }
                target.voters.insert(node);
            }
            MembershipChange::Remove(node) => {
                if !current.is_member(node) {
                    return refused(ChangeRefusal::NotAMember { node });
                }
                target.voters.remove(&node);
                target.learners.remove(&node);
            }
            MembershipChange::Replace { voters, learners } => {
                target.voters = voters;
                target.learners = learners;
            }
        }
        if target.voters.is_empty() || !target.voters.is_disjoint(&target.learners) {
            return refused(ChangeRefusal::Invalid);
        }
        if target == *current {
            return refused(ChangeRefusal::NoChange);
        }
        for &node in target.voters.difference(&current.voters) {
            if !current.learners.contains(&node) {
                return refused(ChangeRefusal::NotALearner { node });
            }
            // A learner never heard from may not even hold its first snapshot yet: as a
            // voter it could then not acknowledge anything (and a node that lost its data
            // would find itself a voter in its first snapshot instead of a learner).
            let Some(known) = leader.peers.get(&node).map(|peer| peer.chosen_index) else {
                return refused(ChangeRefusal::LearnerNotHeard { node });
            };
            let behind_entries = self.chosen_index.saturating_sub(known);
            let limit = self.params.learner_lag_entries_max;
            if behind_entries > limit {
                return refused(ChangeRefusal::LearnerLags {
                    node,
                    behind_entries,
                    limit,
                });
            }
        }
        if !force {
            let running = target
                .voters
                .iter()
                .filter(|&&node| {
                    node == self.id
                        || leader.peers.get(&node).is_some_and(|peer| {
                            self.tick < peer.heard_tick + self.params.election_ticks_min
                        })
                })
                .count();
            let voters = target.voters.len();
            if running * 2 <= voters {
                return refused(ChangeRefusal::NoRunningQuorum { running, voters });
            }
        }
        // Learners do not count in quorums, so a change of learners alone is safe in
        // one step; a change of voters goes through C(old,new).
        let value = if target.voters == current.voters {
            target
        } else {
            current.joint_to(&target)
        };
        let Role::Leader(leader) = &mut self.role else {
            unreachable!("checked above")
        };
        let slot = leader.next_slot;
        leader.next_slot += 1;
        leader.config_pending = slot;
        self.propose_slot(slot, Value::Configuration(Arc::new(value)), actions);
        Outcome::ChangeAccepted { slot }
    }

    /// Phase 1 done: re-propose every adopted value in this ballot, fill holes with
    /// no-ops, then propose one more no-op that marks when this leader may serve reads.
    fn become_leader(&mut self, actions: &mut Vec<Action>) {
        let Role::Candidate(candidate) = std::mem::replace(&mut self.role, Role::Follower) else {
            unreachable!("become_leader outside Phase 1")
        };
        // A leader is always a voter of its own configuration, so its own accepts go
        // through its acceptor (and are persisted) like everyone else's.
        assert!(self.config.is_voter(self.id), "a non-voter won Phase 1");
        let CandidateState {
            ballot,
            first_slot,
            adopted,
            ..
        } = *candidate;
        let last_adopted = adopted.keys().next_back().copied().unwrap_or(0);
        let ready_slot = last_adopted.max(first_slot - 1).max(self.chosen_index) + 1;
        self.role = Role::Leader(Box::new(LeaderState {
            ballot,
            next_slot: ready_slot + 1,
            in_flight: BTreeMap::new(),
            queued: VecDeque::new(),
            ready_slot,
            heartbeat_seq: 0,
            heartbeat_elapsed_ticks: 0,
            round_sent_tick: BTreeMap::new(),
            acked_seq: BTreeMap::new(),
            quorum_seq: 0,
            quorum_sent_tick: None,
            contact_tick: self.tick,
            reads: Vec::new(),
            round_wanted: false,
            catchup: BTreeMap::new(),
            backlog: VecDeque::new(),
            config_pending: 0,
            lease_floor_seq: 0,
            peers: BTreeMap::new(),
            departing: BTreeMap::new(),
        }));
        self.leader_hint = Some(self.id);
        let mut adopted = adopted;
        let mut backlog = VecDeque::new();
        for slot in first_slot..ready_slot {
            // A slot this replica already knows chosen (catch-up may have arrived
            // during Phase 1) keeps its value; Phase 1 would report the same one.
            let known = self
                .log
                .get(&slot)
                .filter(|entry| entry.chosen)
                .map(|entry| entry.value.clone());
            let value = match (known, adopted.remove(&slot)) {
                _ if self.params.bug_ignore_phase1_values => Value::Noop,
                (Some(value), _) => value,
                (None, Some(entry)) => entry.value,
                (None, None) => Value::Noop,
            };
            backlog.push_back((slot, value));
        }
        backlog.push_back((ready_slot, Value::Noop));
        let Role::Leader(leader) = &mut self.role else {
            unreachable!("just became leader")
        };
        leader.backlog = backlog;
        self.propose_queued(actions);
        self.heartbeat_round(actions);
    }

    fn propose_slot(&mut self, slot: Slot, value: Value, actions: &mut Vec<Action>) {
        // Values re-proposed after Phase 1 precede every batch this leader forms, so
        // their stamps bound later ones: the state machine never sees time go back,
        // even when an earlier leader's clock ran ahead of ours.
        if let Value::Batch(batch) = &value {
            self.last_timestamp_ms = self.last_timestamp_ms.max(batch.timestamp_ms);
        }
        let chosen_index = self.chosen_index;
        let Role::Leader(leader) = &mut self.role else {
            unreachable!("only a leader proposes")
        };
        let ballot = leader.ballot;
        let proposed_tick = self.tick;
        let in_flight = InFlight {
            value: value.clone(),
            acked: BTreeSet::new(),
            proposed_tick,
        };
        leader.in_flight.insert(slot, in_flight);
        self.broadcast(
            &Message::Accept {
                ballot,
                slot,
                value,
                chosen_index,
            },
            actions,
        );
    }

    fn on_accepted(&mut self, from: NodeId, ballot: Ballot, slot: Slot, actions: &mut Vec<Action>) {
        let Role::Leader(leader) = &mut self.role else {
            return;
        };
        if leader.ballot != ballot {
            return;
        }
        if let Some(peer) = leader.peers.get_mut(&from) {
            peer.heard_tick = self.tick;
        }
        let Some(in_flight) = leader.in_flight.get_mut(&slot) else {
            return;
        };
        in_flight.acked.insert(from);
        let acked = &in_flight.acked;
        if !self.config.is_quorum(|node| acked.contains(&node)) {
            if from == self.id {
                // Our own accept is durable: batches held for it may go out.
                self.propose_queued(actions);
            }
            return;
        }
        let in_flight = leader.in_flight.remove(&slot).expect("present above");
        leader.contact_tick = self.tick;
        if slot < self.log_start {
            // Chosen through catch-up and compacted meanwhile: nothing to record.
            self.propose_queued(actions);
            return;
        }
        // The leader's own accept may still be unpersisted or even not yet received, so
        // the log entry is written from what was proposed.
        let held_ballot = self
            .log
            .get(&slot)
            .map_or(Ballot::ZERO, |entry| entry.ballot);
        self.log.insert(
            slot,
            LogEntry {
                ballot: held_ballot,
                value: in_flight.value,
                chosen: true,
            },
        );
        self.advance_chosen_index(actions);
        self.propose_queued(actions);
    }

    fn on_propose(&mut self, request: RequestId, mut command: Command, actions: &mut Vec<Action>) {
        command.origin = Origin {
            node: self.id,
            request,
        };
        match &mut self.role {
            Role::Leader(leader) => {
                if leader.queued.len() >= self.params.proposals_queued_max {
                    actions.push(Action::Reply {
                        request,
                        outcome: Outcome::Busy,
                    });
                    return;
                }
                leader.queued.push_back(command);
                self.propose_queued(actions);
            }
            _ => match self.leader_hint {
                Some(leader) if leader != self.id => {
                    self.send(leader, Message::Forward { command }, actions);
                }
                _ => {
                    let outcome = Outcome::NotLeader { leader_hint: None };
                    actions.push(Action::Reply { request, outcome });
                }
            },
        }
    }

    fn on_forward(&mut self, command: Command, actions: &mut Vec<Action>) {
        // Only a leader takes forwarded commands; anyone else drops them (no second
        // hop, so no loops). The origin's client times out and retries.
        let Role::Leader(leader) = &mut self.role else {
            return;
        };
        if leader.queued.len() < self.params.proposals_queued_max {
            leader.queued.push_back(command);
            self.propose_queued(actions);
        }
    }

    /// Proposes, in slot order: what Phase 1 recovered, then C(new) when C(old,new)
    /// governs, then batches of queued commands filling the pipelining window. Nothing
    /// is proposed past a configuration entry until it is chosen (the stall rule).
    fn propose_queued(&mut self, actions: &mut Vec<Action>) {
        loop {
            let chosen_index = self.chosen_index;
            let Role::Leader(leader) = &mut self.role else {
                return;
            };
            if leader.config_pending > chosen_index {
                return;
            }
            if let Some((slot, value)) = leader.backlog.pop_front() {
                if matches!(value, Value::Configuration(_)) {
                    leader.config_pending = slot;
                }
                self.propose_slot(slot, value, actions);
                continue;
            }
            if self.config.is_joint() {
                // C(old,new) is chosen and governs: complete the change.
                let slot = leader.next_slot;
                leader.next_slot += 1;
                leader.config_pending = slot;
                let value = Value::Configuration(Arc::new(self.config.final_config()));
                self.propose_slot(slot, value, actions);
                continue;
            }
            let slots_open = leader.next_slot - 1 - self.chosen_index.min(leader.next_slot - 1);
            if leader.queued.is_empty() || slots_open >= self.params.slots_in_flight_max {
                return;
            }
            let id = self.id;
            let unpersisted = leader
                .in_flight
                .values()
                .filter(|in_flight| !in_flight.acked.contains(&id))
                .count() as u64;
            if unpersisted >= self.params.slots_unpersisted_max
                && !queue_fills_batch(&leader.queued, self.params.batch_bytes_max)
            {
                return;
            }
            let mut commands = Vec::new();
            let mut bytes = 0;
            while let Some(command) = leader.queued.front() {
                let size = command.size_bytes();
                if !commands.is_empty() && bytes + size > self.params.batch_bytes_max {
                    break;
                }
                bytes += size;
                commands.push(leader.queued.pop_front().expect("front checked above"));
            }
            let slot = leader.next_slot;
            leader.next_slot += 1;
            let timestamp_ms = self.now_ms.max(self.last_timestamp_ms);
            self.last_timestamp_ms = timestamp_ms;
            let seed = self.rng.next_u64();
            self.propose_slot(
                slot,
                Value::Batch(Arc::new(Batch {
                    commands,
                    timestamp_ms,
                    seed,
                })),
                actions,
            );
        }
    }

    /// One heartbeat round: commit index to followers, lease evidence back, and a
    /// retransmission of every accept a peer has not acknowledged.
    fn heartbeat_round(&mut self, actions: &mut Vec<Action>) {
        let chosen_index = self.chosen_index;
        let tick = self.tick;
        let id = self.id;
        let Role::Leader(leader) = &mut self.role else {
            return;
        };
        leader.heartbeat_seq += 1;
        leader.heartbeat_elapsed_ticks = 0;
        leader.round_wanted = false;
        leader.round_sent_tick.insert(leader.heartbeat_seq, tick);
        leader.acked_seq.insert(id, leader.heartbeat_seq);
        let (ballot, seq) = (leader.ballot, leader.heartbeat_seq);
        let mut sends = Vec::new();
        for &to in leader.departing.keys() {
            sends.push((
                to,
                Message::Heartbeat {
                    ballot,
                    seq,
                    chosen_index,
                },
            ));
        }
        for to in self.config.members().filter(|node| *node != id) {
            sends.push((
                to,
                Message::Heartbeat {
                    ballot,
                    seq,
                    chosen_index,
                },
            ));
            for (slot, in_flight) in &leader.in_flight {
                let due = tick >= in_flight.proposed_tick + self.params.heartbeat_ticks;
                if due && !in_flight.acked.contains(&to) {
                    let value = in_flight.value.clone();
                    sends.push((
                        to,
                        Message::Accept {
                            ballot,
                            slot: *slot,
                            value,
                            chosen_index,
                        },
                    ));
                }
            }
        }
        // Our own accept is delivered in-process; it is only missing while its persist
        // is outstanding, so it is not resent.
        for (to, msg) in sends {
            self.send(to, msg, actions);
        }
        self.update_lease();
    }

    fn on_heartbeat_ack(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        seq: u64,
        follower_chosen_index: Slot,
        actions: &mut Vec<Action>,
    ) {
        let Role::Leader(leader) = &mut self.role else {
            return;
        };
        if leader.ballot != ballot {
            return;
        }
        let acked = leader.acked_seq.entry(from).or_insert(0);
        *acked = (*acked).max(seq);
        leader.peers.insert(
            from,
            PeerSeen {
                chosen_index: follower_chosen_index,
                heard_tick: self.tick,
            },
        );
        if leader
            .departing
            .get(&from)
            .is_some_and(|slot| follower_chosen_index >= *slot)
        {
            leader.departing.remove(&from);
        }
        self.update_lease();
        if follower_chosen_index >= self.chosen_index {
            return;
        }
        // Start (or restart a stalled) catch-up stream; `Learned` replies drive it on.
        let retry_ticks = self.params.election_ticks_min / 2;
        let Role::Leader(leader) = &self.role else {
            return;
        };
        let stalled = match leader.catchup.get(&from) {
            None => true,
            Some((through, sent_tick)) => {
                follower_chosen_index >= *through || self.tick >= sent_tick + retry_ticks
            }
        };
        if stalled {
            self.send_catchup(from, follower_chosen_index + 1, actions);
        }
    }

    fn on_learned(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        follower_chosen_index: Slot,
        actions: &mut Vec<Action>,
    ) {
        let tick = self.tick;
        let Role::Leader(leader) = &mut self.role else {
            self.answer_what_was_chosen(from, ballot, follower_chosen_index, actions);
            return;
        };
        if leader.ballot != ballot {
            self.answer_what_was_chosen(from, ballot, follower_chosen_index, actions);
            return;
        }
        // Our own stream, or a question from a replica that follows our ballot: it is
        // running, and this is its chosen index.
        leader.peers.insert(
            from,
            PeerSeen {
                chosen_index: follower_chosen_index,
                heard_tick: tick,
            },
        );
        if follower_chosen_index < self.chosen_index {
            self.send_catchup(from, follower_chosen_index + 1, actions);
        }
    }

    /// A `Learned` outside this replica's own catch-up stream: a replica that may not
    /// campaign asking what was chosen (`ask_what_was_chosen`), or the reply to a chunk
    /// this answer sent. Any replica answers from its chosen prefix, which is final
    /// whoever delivers it (`on_chosen` trusts any sender), so no rule of the protocol
    /// depends on who serves it.
    fn answer_what_was_chosen(
        &mut self,
        to: NodeId,
        ballot: Ballot,
        peer_chosen_index: Slot,
        actions: &mut Vec<Action>,
    ) {
        if peer_chosen_index < self.chosen_index {
            self.send_chosen(to, ballot, peer_chosen_index + 1, actions);
        }
    }

    fn send_catchup(&mut self, to: NodeId, from_slot: Slot, actions: &mut Vec<Action>) {
        let (tick, ballot) = match &self.role {
            Role::Leader(leader) => (self.tick, leader.ballot),
            _ => return,
        };
        if let Some(through) = self.send_chosen(to, ballot, from_slot, actions) {
            let Role::Leader(leader) = &mut self.role else {
                unreachable!("checked above")
            };
            leader.catchup.insert(to, (through, tick));
        }
    }

    /// Sends `to` one chunk of the chosen entries from `from_slot` on, or asks the
    /// runtime for a snapshot transfer when they were compacted away. Returns the last
    /// slot of the chunk (`from_slot` for an empty one), or `None` for a snapshot.
    fn send_chosen(
        &mut self,
        to: NodeId,
        ballot: Ballot,
        from_slot: Slot,
        actions: &mut Vec<Action>,
    ) -> Option<Slot> {
        if from_slot < self.log_start {
            actions.push(Action::SendSnapshot {
                to,
                slot: from_slot,
            });
            return None;
        }
        let mut entries = Vec::new();
        let mut bytes = 0;
        for (slot, entry) in self.log.range(from_slot..=self.chosen_index) {
            let size = value_bytes(&entry.value);
            let full = entries.len() >= self.params.catchup_entries_max
                || (!entries.is_empty() && bytes + size > self.params.catchup_bytes_max);
            if full {
                break;
            }
            bytes += size;
            entries.push((*slot, entry.value.clone()));
        }
        let through = entries.last().map_or(from_slot, |(slot, _)| *slot);
        let chosen_index = self.chosen_index;
        self.send(
            to,
            Message::Chosen {
                ballot,
                entries,
                chosen_index,
            },
            actions,
        );
        Some(through)
    }

    /// Recomputes the latest heartbeat round a quorum acknowledged.
    fn update_lease(&mut self) {
        let Role::Leader(leader) = &mut self.role else {
            return;
        };
        let mut candidates: Vec<u64> = leader.acked_seq.values().copied().collect();
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        let acked_seq = &leader.acked_seq;
        let floor = leader.lease_floor_seq;
        let best = candidates
            .into_iter()
            .filter(|&seq| seq >= floor)
            .find(|&seq| {
                self.config
                    .is_quorum(|node| acked_seq.get(&node).is_some_and(|acked| *acked >= seq))
            });
        let Some(seq) = best else { return };
        if seq <= leader.quorum_seq {
            return;
        }
        let sent_tick = *leader.round_sent_tick.get(&seq).expect("round was sent");
        leader.quorum_seq = seq;
        leader.quorum_sent_tick = Some(sent_tick);
        leader.contact_tick = leader.contact_tick.max(sent_tick);
        leader.round_sent_tick = leader.round_sent_tick.split_off(&seq);
    }

    fn leader_lease_valid(&self, leader: &LeaderState) -> bool {
        let ready = self.params.bug_reads_before_ready || self.applied_index >= leader.ready_slot;
        let within = leader
            .quorum_sent_tick
            .is_some_and(|sent| self.tick < sent + self.params.lease_ticks);
        ready && within
    }

    // ---- reads -----------------------------------------------------------------------

    fn on_read(&mut self, request: RequestId, mode: ReadMode, actions: &mut Vec<Action>) {
        let hint = self.leader_hint;
        let Role::Leader(leader) = &self.role else {
            actions.push(Action::Reply {
                request,
                outcome: Outcome::NotLeader { leader_hint: hint },
            });
            return;
        };
        if mode == ReadMode::Lease && self.leader_lease_valid(leader) {
            actions.push(Action::Reply {
                request,
                outcome: Outcome::ReadReady,
            });
            return;
        }
        let read_index = match self.params.bug_reads_before_ready {
            true => self.chosen_index,
            false => self.chosen_index.max(leader.ready_slot),
        };
        let Role::Leader(leader) = &mut self.role else {
            unreachable!()
        };
        if leader.reads.len() >= self.params.reads_pending_max {
            actions.push(Action::Reply {
                request,
                outcome: Outcome::Busy,
            });
            return;
        }
        // The confirming round must be sent after the read arrived: the next one.
        let seq_needed = leader.heartbeat_seq + 1;
        leader.reads.push(ReadWait {
            request,
            read_index,
            seq_needed,
        });
        leader.round_wanted = true;
    }

    fn serve_reads(&mut self, actions: &mut Vec<Action>) {
        let applied_index = self.applied_index;
        let Role::Leader(leader) = &mut self.role else {
            return;
        };
        let quorum_seq = leader.quorum_seq;
        leader.reads.retain(|read| {
            let ready = read.seq_needed <= quorum_seq && read.read_index <= applied_index;
            if ready {
                actions.push(Action::Reply {
                    request: read.request,
                    outcome: Outcome::ReadReady,
                });
            }
            !ready
        });
    }
}

/// Whether the queued commands fill one batch (`batch_bytes_max`).
fn queue_fills_batch(queued: &VecDeque<Command>, batch_bytes_max: usize) -> bool {
    let mut bytes = 0;
    queued.iter().any(|command| {
        bytes += command.size_bytes();
        bytes >= batch_bytes_max
    })
}

/// Client bytes of a value, for catch-up message bounds.
fn value_bytes(value: &Value) -> usize {
    match value {
        Value::Batch(batch) => batch.commands.iter().map(Command::size_bytes).sum(),
        Value::Noop => 0,
        Value::Configuration(config) => std::mem::size_of::<NodeId>() * config.members().count(),
    }
}
