//! The client dedup table. It lives with the applied state (the applier owns it and
//! it will be part of snapshots), never only at the leader: a command retried after a
//! leader change may be decided twice in the log, and every replica must skip the
//! second copy identically.

use std::collections::BTreeMap;

use super::types::IdempotencyKey;

/// Per client, the latest sequence number applied and its result. Clients issue one
/// request at a time with increasing sequence numbers, so one entry per client is
/// enough.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DedupTable {
    latest: BTreeMap<u64, (u64, Vec<u8>)>,
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

impl DedupTable {
    pub fn check(&self, key: IdempotencyKey) -> DedupCheck<'_> {
        match self.latest.get(&key.client) {
            None => DedupCheck::New,
            Some((seq, _)) if key.seq > *seq => DedupCheck::New,
            Some((seq, result)) if key.seq == *seq => DedupCheck::Duplicate(result),
            Some(_) => DedupCheck::Stale,
        }
    }

    pub fn record(&mut self, key: IdempotencyKey, result: Vec<u8>) {
        if let Some((seq, _)) = self.latest.get(&key.client) {
            assert!(
                key.seq > *seq,
                "record of an already applied request {key:?}"
            );
        }
        self.latest.insert(key.client, (key.seq, result));
    }

    pub fn clients(&self) -> usize {
        self.latest.len()
    }
}
