//! Tunable limits and timings of the core. Every limit is here, unit last.

/// Ticks a follower keeps refusing to support another candidate after hearing from
/// the leader, minus the leader's lease: covers tick-rate drift between replicas.
pub const LEASE_SAFETY_MARGIN_TICKS: u64 = 4;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Params {
    /// A leader sends a heartbeat round (and retransmits unacknowledged accepts)
    /// every this many ticks.
    pub heartbeat_ticks: u64,
    /// Election timeouts are drawn from `election_ticks_min..election_ticks_max`. A
    /// replica that heard from a leader within `election_ticks_min` neither starts nor
    /// supports an election.
    pub election_ticks_min: u64,
    pub election_ticks_max: u64,
    /// A leader serves lease reads until this many ticks after SENDING the latest
    /// heartbeat round a quorum acknowledged. Must be at most
    /// `election_ticks_min - LEASE_SAFETY_MARGIN_TICKS`.
    pub lease_ticks: u64,
    /// Upper bound on the client bytes in one slot (a single larger command still
    /// gets a slot of its own).
    pub batch_bytes_max: usize,
    /// Slots a leader may have proposed but not yet seen chosen.
    pub slots_in_flight_max: u64,
    /// Group commit at the leader: it proposes no new batch while this many open slots
    /// still wait for its own accept to be durable, unless a full batch is queued.
    /// Commands arriving meanwhile go out together once that persist completes: a
    /// slot proposed earlier would wait behind the same sync at the leader anyway, and
    /// every slot costs a persist and messages on every replica. 2 (not 1) keeps the
    /// next batch queued at the store while one syncs, so a slow leader disk does not
    /// also idle the followers. `u64::MAX`: off.
    pub slots_unpersisted_max: u64,
    /// Client proposals a leader queues while the window is full; beyond, `Busy`.
    pub proposals_queued_max: usize,
    /// Reads waiting for a read-index round or for apply; beyond, `Busy`.
    pub reads_pending_max: usize,
    /// Catch-up: entries and bytes of client data per `Chosen` message.
    pub catchup_entries_max: usize,
    pub catchup_bytes_max: usize,
    /// A learner more than this many chosen entries behind the leader is not made a
    /// voter: it would stall quorums while it catches up.
    pub learner_lag_entries_max: u64,
    /// Entries kept below a saved snapshot so that a peer lagging by fewer still
    /// catches up from the log instead of by snapshot transfer.
    pub compaction_margin_entries: u64,
    /// An acceptor promises only when the entries its promise carries (every one from
    /// the candidate's first slot on) hold at most this many bytes of command payload. A
    /// runtime sets it to its peer frame limit: a larger promise could never be sent,
    /// so making it would only raise this acceptor's ballot (deposing the leader it
    /// follows) and copy the log for nothing. Such a far-behind candidate is refused
    /// as if the promise were lost; one within reach gets elected and catches the
    /// other up. `usize::MAX`: no bound.
    pub promise_bytes_max: usize,
    /// PLANTED BUG, for the simulator's teeth test only: a new leader ignores the
    /// values acceptors report in Phase 1 and fills every slot with a no-op.
    #[doc(hidden)]
    pub bug_ignore_phase1_values: bool,
    /// PLANTED BUG, for the simulator's teeth test only: a new leader serves reads
    /// before its own first entry is chosen and applied, so it may miss slots chosen
    /// by earlier leaders.
    #[doc(hidden)]
    pub bug_reads_before_ready: bool,
    /// PLANTED BUG, for the simulator's teeth test only: an acceptor acknowledges an
    /// accept (one that does not raise its promise) before the entry is persisted,
    /// so a crash can lose a value the leader counted towards a quorum.
    #[doc(hidden)]
    pub bug_accepted_before_persist: bool,
    /// PLANTED BUG, for the simulator's teeth test only: a candidate counts only
    /// quorums of the configuration of its chosen prefix, ignoring configurations
    /// that promises reveal beyond it.
    #[doc(hidden)]
    pub bug_phase1_ignores_revealed_configurations: bool,
    /// PLANTED BUG, for the simulator's teeth test only: an acceptor promises a
    /// candidate that needs slots it has compacted away, so the promise cannot
    /// report them and the candidate may fill chosen slots with no-ops.
    #[doc(hidden)]
    pub bug_promise_over_compacted_slots: bool,
    /// PLANTED BUG, for the simulator's teeth test only: a replica that lost its
    /// disk votes again as if nothing happened.
    #[doc(hidden)]
    pub bug_amnesic_replica_votes: bool,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            heartbeat_ticks: 2,
            election_ticks_min: 20,
            election_ticks_max: 40,
            lease_ticks: 14,
            batch_bytes_max: 64 * 1024,
            slots_in_flight_max: 8,
            slots_unpersisted_max: 2,
            proposals_queued_max: 4096,
            reads_pending_max: 4096,
            catchup_entries_max: 64,
            catchup_bytes_max: 256 * 1024,
            learner_lag_entries_max: 256,
            bug_ignore_phase1_values: false,
            bug_reads_before_ready: false,
            bug_accepted_before_persist: false,
            compaction_margin_entries: 1000,
            promise_bytes_max: usize::MAX,
            bug_phase1_ignores_revealed_configurations: false,
            bug_promise_over_compacted_slots: false,
            bug_amnesic_replica_votes: false,
        }
    }
}

impl Params {
    /// Panics on inconsistent timings: they are programmer errors, and a lease that
    /// outlives a follower's election timeout would break linearizable reads.
    pub fn validate(&self) {
        assert!(self.heartbeat_ticks >= 1);
        assert!(self.election_ticks_min > 2 * self.heartbeat_ticks);
        assert!(self.election_ticks_max > self.election_ticks_min);
        assert!(self.lease_ticks + LEASE_SAFETY_MARGIN_TICKS <= self.election_ticks_min);
        assert!(self.slots_in_flight_max >= 1);
        assert!(self.slots_unpersisted_max >= 1);
        assert!(self.batch_bytes_max >= 1);
        assert!(self.catchup_entries_max >= 1);
    }
}
