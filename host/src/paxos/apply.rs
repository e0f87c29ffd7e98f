//! The applier: feeds chosen values to a state machine in slot order, skipping
//! duplicate commands through the dedup table, and collects the results this replica
//! owes its own clients (commands whose `Origin` is this node).

use super::dedup::{DedupCheck, DedupTable};
use super::types::{NodeId, RequestId, Slot, Value};

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
}

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
}

impl<M: StateMachine> Applier<M> {
    pub fn new(node: NodeId, machine: M) -> Applier<M> {
        Applier {
            machine,
            dedup: DedupTable::default(),
            applied_index: 0,
            node,
            clock_ms: 0,
        }
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
        for command in &batch.commands {
            let result = match command.idempotency_key {
                None => self.machine.apply(&command.payload, &context),
                Some(key) => match self.dedup.check(key) {
                    DedupCheck::Duplicate(result) => result.to_vec(),
                    DedupCheck::Stale => STALE_RESULT.to_vec(),
                    DedupCheck::New => {
                        let result = self.machine.apply(&command.payload, &context);
                        self.dedup.record(key, slot, result.clone());
                        result
                    }
                },
            };
            if command.origin.node == self.node {
                replies.push((command.origin.request, result));
            }
        }
    }
}
