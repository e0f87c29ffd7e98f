//! The client dedup table. It lives with the applied state (the applier owns it and
//! it will be part of snapshots), never only at the leader: a command retried after a
//! leader change may be decided twice in the log, and every replica must skip the
//! second copy identically.

use std::collections::{BTreeMap, BTreeSet};

use super::types::{IdempotencyKey, Slot};

/// Clients remembered when no other limit is given. Beyond it the client whose
/// latest request was applied longest ago is forgotten (deterministically, as the
/// order comes from the log), and a very late retry of that client could apply again.
pub const DEDUP_CLIENTS_MAX: usize = 100_000;

/// Per client, the latest sequence number applied and its result. Clients issue one
/// request at a time with increasing sequence numbers, so one entry per client is
/// enough.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DedupTable {
    latest: BTreeMap<u64, Latest>,
    /// (slot of the client's latest applied request, client): eviction order.
    by_slot: BTreeSet<(Slot, u64)>,
    clients_max: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Latest {
    seq: u64,
    slot: Slot,
    result: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum DedupCheck<'a> {
    /// Never applied: apply it, then `record` the result.
    New,
    /// Already applied: return this result, do not apply again.
    Duplicate(&'a [u8]),
    /// Older than the client's latest applied request; its result is gone. Not applied.
    Stale,
}

impl Default for DedupTable {
    fn default() -> DedupTable {
        DedupTable::new(DEDUP_CLIENTS_MAX)
    }
}

impl DedupTable {
    pub fn new(clients_max: usize) -> DedupTable {
        assert!(clients_max >= 1);
        DedupTable {
            latest: BTreeMap::new(),
            by_slot: BTreeSet::new(),
            clients_max,
        }
    }

    pub fn check(&self, key: IdempotencyKey) -> DedupCheck<'_> {
        match self.latest.get(&key.client) {
            None => DedupCheck::New,
            Some(latest) if key.seq > latest.seq => DedupCheck::New,
            Some(latest) if key.seq == latest.seq => DedupCheck::Duplicate(&latest.result),
            Some(_) => DedupCheck::Stale,
        }
    }

    /// Records the result of a request applied at `slot`.
    pub fn record(&mut self, key: IdempotencyKey, slot: Slot, result: Vec<u8>) {
        if let Some(previous) = self.latest.get(&key.client) {
            assert!(
                key.seq > previous.seq,
                "record of an already applied request {key:?}"
            );
            self.by_slot.remove(&(previous.slot, key.client));
        }
        self.latest.insert(
            key.client,
            Latest {
                seq: key.seq,
                slot,
                result,
            },
        );
        self.by_slot.insert((slot, key.client));
        while self.latest.len() > self.clients_max {
            let (_, client) = self.by_slot.pop_first().expect("index matches the table");
            self.latest.remove(&client);
        }
        debug_assert_eq!(self.latest.len(), self.by_slot.len());
    }

    pub fn clients(&self) -> usize {
        self.latest.len()
    }
}
