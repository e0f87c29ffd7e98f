//! The applier: feeds chosen values to a state machine in slot order, skipping
//! duplicate commands through the dedup table, and collects the results this replica
//! owes its own clients (commands whose `Origin` is this node).

use std::collections::BTreeSet;

use super::dedup::{DedupCheck, DedupTable};
use super::types::{Command, NodeId, Origin, RequestId, Slot, Value};

/// Context every replica sees identically for a command: from the log, never from
/// the local clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApplyContext {
    pub slot: Slot,
    pub timestamp_ms: u64,
    pub seed: u64,
}

/// A deterministic state machine (the Wasm machine in production, a key-value map in
/// the simulator).
pub trait StateMachine {
    fn apply(&mut self, payload: &[u8], context: &ApplyContext) -> Vec<u8>;

    /// Applies `payloads` in order, all from one slot, pushing one result each to
    /// `results`, exactly as `apply` one by one would. A machine may take them in one
    /// go (the Wasm machine crosses into the guest once); the applier hands it
    /// groups chosen by the log alone (see `Applier::apply`), so every replica
    /// groups alike.
    fn apply_all(
        &mut self,
        payloads: &[&[u8]],
        context: &ApplyContext,
        results: &mut Vec<Vec<u8>>,
    ) {
        for payload in payloads {
            results.push(self.apply(payload, context));
        }
    }
}

/// Why an exported applier state could not be imported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplierStateError(pub &'static str);

impl std::fmt::Display for ApplierStateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad applier state: {}", self.0)
    }
}

impl std::error::Error for ApplierStateError {}

const APPLIER_STATE_MAGIC: &[u8; 8] = b"PXAPPLY1";

/// Result given to a duplicate whose original result is no longer kept.
pub const STALE_RESULT: &[u8] = b"stale-duplicate";

#[derive(Clone, Debug)]
pub struct Applier<M> {
    pub machine: M,
    pub dedup: DedupTable,
    pub applied_index: Slot,
    node: NodeId,
    /// The state machine's clock: the largest batch stamp applied so far.
    clock_ms: u64,
    /// While set, `apply` also collects the results of commands that entered through
    /// other nodes into `remote_results` (a leader answers the followers that
    /// forwarded them). Not replicated state.
    pub collect_remote: bool,
    /// `(origin, slot, result)` collected while `collect_remote` is set; the caller
    /// drains it.
    pub remote_results: Vec<(Origin, Slot, Vec<u8>)>,
}

impl<M: StateMachine> Applier<M> {
    pub fn new(node: NodeId, machine: M) -> Applier<M> {
        Applier {
            machine,
            dedup: DedupTable::default(),
            applied_index: 0,
            node,
            clock_ms: 0,
            collect_remote: false,
            remote_results: Vec::new(),
        }
    }

    /// The applier's replicated state (applied index, state-machine clock, dedup
    /// table) for a snapshot taken right after `applied_index`. Deterministic: equal
    /// states give equal bytes.
    ///
    /// ```text
    /// "PXAPPLY1" | applied index u64 | clock ms u64 | dedup table (see DedupTable)
    /// ```
    pub fn export_state(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(APPLIER_STATE_MAGIC);
        out.extend_from_slice(&self.applied_index.to_le_bytes());
        out.extend_from_slice(&self.clock_ms.to_le_bytes());
        self.dedup.encode(&mut out);
        out
    }

    /// Replaces the replicated state with an exported one. The machine must already
    /// hold the state of the same snapshot. On error nothing changes.
    pub fn import_state(&mut self, bytes: &[u8]) -> Result<(), ApplierStateError> {
        let rest = bytes
            .strip_prefix(APPLIER_STATE_MAGIC.as_slice())
            .ok_or(ApplierStateError("wrong magic"))?;
        if rest.len() < 16 {
            return Err(ApplierStateError("truncated header"));
        }
        let applied_index = u64::from_le_bytes(rest[..8].try_into().unwrap());
        let clock_ms = u64::from_le_bytes(rest[8..16].try_into().unwrap());
        let dedup =
            DedupTable::decode(&rest[16..], self.dedup.clients_max()).map_err(ApplierStateError)?;
        self.applied_index = applied_index;
        self.clock_ms = clock_ms;
        self.dedup = dedup;
        Ok(())
    }

    /// The state machine clock: the largest batch stamp applied so far.
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    /// Applies slot `slot` (must be the next one) and pushes `(request, result)` for
    /// every command that entered through this node.
    pub fn apply(&mut self, slot: Slot, value: &Value, replies: &mut Vec<(RequestId, Vec<u8>)>) {
        assert_eq!(
            slot,
            self.applied_index + 1,
            "slots must be applied in order without gaps"
        );
        self.applied_index = slot;
        let Value::Batch(batch) = value else { return };
        // Stamps can go back along the log even with honest leaders: a new leader
        // re-proposes, unchanged, values a deposed leader with a faster clock stamped,
        // after slots a slower leader stamped. The machine's clock must not go back,
        // so it is the largest stamp so far: a function of the log alone, the same on
        // every replica (and part of what a snapshot must carry).
        self.clock_ms = self.clock_ms.max(batch.timestamp_ms);
        let context = ApplyContext {
            slot,
            timestamp_ms: self.clock_ms,
            seed: batch.seed,
        };
        // The commands to apply go to the machine in groups (`apply_all`), with the
        // same outcome as one by one. The dedup records of a group are made after
        // it, in order, so the table ends the same; what must hold is that no check
        // inside a group depends on a record made earlier in it. A record touches
        // its own client's entry, and on a full table evicts the entry recorded
        // longest ago. So a group never holds two commands of one client, and a
        // command of a client the table knows joins only if the evictions the
        // group's records would make so far cannot have reached that client's entry
        // (they take from the oldest entries, skipping those the group itself
        // recorded again). A client the table does not know is new either way. The
        // grouping depends on the slot and the dedup table alone, both the same on
        // every replica. Checked against one by one in
        // `grouped_apply_gives_the_results_of_one_command_at_a_time`.
        let commands = &batch.commands;
        let mut results: Vec<Option<Vec<u8>>> = vec![None; commands.len()];
        let mut group: Vec<usize> = Vec::new();
        let mut group_clients: BTreeSet<u64> = BTreeSet::new();
        // Clients of the group the table does not know (their records add entries)
        // and that it knows (their records move entries to the newest place).
        let (mut group_new_clients, mut group_known_clients) = (0, 0);
        for (i, command) in commands.iter().enumerate() {
            let Some(key) = command.idempotency_key else {
                group.push(i);
                continue;
            };
            let known = self.dedup.knows_client(key.client);
            let evictions =
                (self.dedup.clients() + group_new_clients).saturating_sub(self.dedup.clients_max());
            let maybe_evicted = known
                && evictions > 0
                && self
                    .dedup
                    .among_oldest(key.client, evictions + group_known_clients);
            if group_clients.contains(&key.client) || maybe_evicted {
                self.apply_group(slot, &context, commands, &mut group, &mut results);
                group_clients.clear();
                (group_new_clients, group_known_clients) = (0, 0);
            }
            match self.dedup.check(key) {
                DedupCheck::New => {
                    group.push(i);
                    group_clients.insert(key.client);
                    if self.dedup.knows_client(key.client) {
                        group_known_clients += 1;
                    } else {
                        group_new_clients += 1;
                    }
                }
                DedupCheck::Duplicate(result) => results[i] = Some(result.to_vec()),
                DedupCheck::Stale => results[i] = Some(STALE_RESULT.to_vec()),
            }
        }
        self.apply_group(slot, &context, commands, &mut group, &mut results);
        for (command, result) in commands.iter().zip(results) {
            let result = result.expect("every command has a result");
            if command.origin.node == self.node {
                replies.push((command.origin.request, result));
            } else if self.collect_remote {
                self.remote_results.push((command.origin, slot, result));
            }
        }
    }

    /// Applies the commands of `group` (indices into `commands`, in order) with one
    /// `apply_all`, records each keyed result in the dedup table, puts every result
    /// in `results`, and empties `group`.
    fn apply_group(
        &mut self,
        slot: Slot,
        context: &ApplyContext,
        commands: &[Command],
        group: &mut Vec<usize>,
        results: &mut [Option<Vec<u8>>],
    ) {
        if group.is_empty() {
            return;
        }
        let payloads: Vec<&[u8]> = group.iter().map(|&i| &commands[i].payload[..]).collect();
        let mut outputs = Vec::with_capacity(group.len());
        self.machine.apply_all(&payloads, context, &mut outputs);
        assert_eq!(outputs.len(), group.len(), "one result per command");
        for (&i, output) in group.iter().zip(outputs) {
            if let Some(key) = commands[i].idempotency_key {
                self.dedup.record(key, slot, output.clone());
            }
            results[i] = Some(output);
        }
        group.clear();
    }
}
