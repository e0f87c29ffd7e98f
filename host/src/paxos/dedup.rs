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

    /// Whether the table holds an entry for `client`.
    pub fn knows_client(&self, client: u64) -> bool {
        self.latest.contains_key(&client)
    }

    /// Whether `client`'s entry is among the `n` recorded longest ago: the next
    /// ones a full table evicts.
    pub fn among_oldest(&self, client: u64, n: usize) -> bool {
        self.by_slot.iter().take(n).any(|&(_, c)| c == client)
    }

    pub fn clients_max(&self) -> usize {
        self.clients_max
    }

    /// Appends the table in a deterministic encoding (clients in ascending order):
    /// `count u64 | per client: client u64, seq u64, slot u64, result len u32, result`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.latest.len() as u64).to_le_bytes());
        for (client, latest) in &self.latest {
            out.extend_from_slice(&client.to_le_bytes());
            out.extend_from_slice(&latest.seq.to_le_bytes());
            out.extend_from_slice(&latest.slot.to_le_bytes());
            out.extend_from_slice(&(latest.result.len() as u32).to_le_bytes());
            out.extend_from_slice(&latest.result);
        }
    }

    /// Reads what `encode` wrote; the whole input must be consumed. A table with more
    /// clients than `clients_max` is refused (every replica must use the same limit).
    pub fn decode(mut input: &[u8], clients_max: usize) -> Result<DedupTable, &'static str> {
        fn take<'a>(input: &mut &'a [u8], n: usize) -> Result<&'a [u8], &'static str> {
            if input.len() < n {
                return Err("truncated dedup table");
            }
            let (head, tail) = input.split_at(n);
            *input = tail;
            Ok(head)
        }
        fn u64_of(input: &mut &[u8]) -> Result<u64, &'static str> {
            Ok(u64::from_le_bytes(take(input, 8)?.try_into().unwrap()))
        }
        let count = u64_of(&mut input)?;
        if count > clients_max as u64 {
            return Err("dedup table larger than the client limit");
        }
        let mut table = DedupTable::new(clients_max);
        let mut previous = None;
        for _ in 0..count {
            let client = u64_of(&mut input)?;
            if previous.is_some_and(|p| p >= client) {
                return Err("dedup clients out of order");
            }
            previous = Some(client);
            let seq = u64_of(&mut input)?;
            let slot = u64_of(&mut input)?;
            let len = u32::from_le_bytes(take(&mut input, 4)?.try_into().unwrap()) as usize;
            let result = take(&mut input, len)?.to_vec();
            table.latest.insert(client, Latest { seq, slot, result });
            table.by_slot.insert((slot, client));
        }
        if !input.is_empty() {
            return Err("trailing bytes after the dedup table");
        }
        Ok(table)
    }
}
