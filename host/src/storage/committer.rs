//! The committer thread: group commit, background deletion below the compaction
//! watermark, and fail-stop.
//!
//! Group commit: the committer blocks for the first queued request, then takes every
//! request queued behind it (up to `group_batches_max` requests or `group_bytes_max` bytes),
//! coalesces them into one fjall batch (later writes of a key win), writes it to the
//! journal, syncs the journal once (`fdatasync`), and only then completes every waiter of
//! the group, in submission order. While it syncs, new requests pile up in the queue and
//! form the next group, so the group size adapts to the load with no timer and no added
//! latency for a lone writer.
//!
//! Coalescing is required, not only an optimisation: all items of a fjall batch share one
//! sequence number, so two writes of the same key in one batch would leave it undefined
//! which one wins.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use fjall::{Database, PersistMode};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;

use super::layout::{self, Keyspaces};
use super::{
    is_disk_full, Ballot, FaultPoint, Recovered, Request, Shared, StorageConfig, StorageError,
};

pub(super) struct Committer {
    config: StorageConfig,
    db: Database,
    keyspaces: Keyspaces,
    receiver: mpsc::Receiver<Request>,
    shared: Arc<Shared>,
    /// The latest promised ballot and chosen index taken from the queue; each new one is
    /// asserted not to be lower.
    promised: Option<Ballot>,
    chosen: Option<u64>,
    /// The compaction watermark as of the last durable group.
    log_start: u64,
    /// Entry keys below this slot are already deleted; deletion is done when it reaches
    /// `log_start`.
    delete_cursor: u64,
}

/// The writes of one group after coalescing, in key order.
#[derive(Default)]
struct Group<'a> {
    promised: Option<Ballot>,
    chosen: Option<u64>,
    accepted: BTreeMap<u64, &'a [u8]>,
    meta: BTreeMap<&'a str, &'a [u8]>,
    log_start: Option<u64>,
}

impl Committer {
    pub(super) fn new(
        config: StorageConfig,
        db: Database,
        keyspaces: Keyspaces,
        receiver: mpsc::Receiver<Request>,
        shared: Arc<Shared>,
        recovered: &Recovered,
    ) -> Committer {
        Committer {
            config,
            db,
            keyspaces,
            receiver,
            shared,
            promised: recovered.promised,
            chosen: recovered.chosen,
            log_start: recovered.log_start,
            // Keys below the watermark may survive a restart (deletion is not synced on its
            // own), so every start scans from the first slot once.
            delete_cursor: 0,
        }
    }

    pub(super) fn run(mut self) {
        loop {
            // Deletion below the watermark runs one bounded step per round, so it neither
            // starves under load nor delays a group by more than one step.
            if self.delete_cursor < self.log_start {
                if let Err(error) = self.delete_step() {
                    return self.fail_stop(&error, Vec::new());
                }
            }
            let first = if self.delete_cursor < self.log_start {
                match self.receiver.try_recv() {
                    Ok(request) => request,
                    Err(TryRecvError::Empty) => continue,
                    // The store was dropped; what is left to delete is deleted after the
                    // next open.
                    Err(TryRecvError::Disconnected) => return,
                }
            } else {
                match self.receiver.blocking_recv() {
                    Some(request) => request,
                    None => return,
                }
            };
            let requests = self.take_group(first);
            let group = self.coalesce(&requests);
            match self.commit(&group) {
                Ok(()) => {
                    self.record(&group, requests.len());
                    for request in requests {
                        // The waiter may have stopped waiting; the write is durable anyway.
                        let _ = request.done.send(Ok(()));
                    }
                }
                Err(error) => return self.fail_stop(&error, requests),
            }
        }
    }

    /// `first` plus every request queued behind it, within the group limits.
    fn take_group(&mut self, first: Request) -> Vec<Request> {
        let mut bytes = payload_bytes(&first.batch.accepted, &first.batch.meta);
        let mut requests = vec![first];
        while requests.len() < self.config.group_batches_max && bytes < self.config.group_bytes_max
        {
            match self.receiver.try_recv() {
                Ok(request) => {
                    bytes += payload_bytes(&request.batch.accepted, &request.batch.meta);
                    requests.push(request);
                }
                Err(_) => break,
            }
        }
        requests
    }

    fn coalesce<'a>(&mut self, requests: &'a [Request]) -> Group<'a> {
        let mut group = Group::default();
        for request in requests {
            let batch = &request.batch;
            if let Some(ballot) = batch.promised {
                if let Some(previous) = self.promised {
                    assert!(
                        ballot >= previous,
                        "the promised ballot must never go backwards: {ballot:?} after {previous:?}"
                    );
                }
                self.promised = Some(ballot);
                group.promised = Some(ballot);
            }
            if let Some(chosen) = batch.chosen {
                if let Some(previous) = self.chosen {
                    assert!(
                        chosen >= previous,
                        "the chosen index must never go backwards: {chosen} after {previous}"
                    );
                }
                self.chosen = Some(chosen);
                group.chosen = Some(chosen);
            }
            for (slot, entry) in &batch.accepted {
                group.accepted.insert(*slot, entry.as_slice());
            }
            for (key, value) in &batch.meta {
                group.meta.insert(key.as_str(), value.as_slice());
            }
            if let Some(below) = batch.delete_below {
                let current = group.log_start.unwrap_or(self.log_start);
                if below > current {
                    group.log_start = Some(below);
                }
            }
        }
        group
    }

    /// Writes the group as one fjall batch and syncs the journal once.
    fn commit(&self, group: &Group) -> Result<(), fjall::Error> {
        let mut batch = self.db.batch();
        if let Some(ballot) = group.promised {
            batch.insert(
                &self.keyspaces.acceptor,
                layout::KEY_PROMISED,
                layout::encode_ballot(ballot),
            );
        }
        if let Some(chosen) = group.chosen {
            batch.insert(
                &self.keyspaces.acceptor,
                layout::KEY_CHOSEN,
                chosen.to_be_bytes(),
            );
        }
        if let Some(log_start) = group.log_start {
            batch.insert(
                &self.keyspaces.acceptor,
                layout::KEY_LOG_START,
                log_start.to_be_bytes(),
            );
        }
        for (slot, entry) in &group.accepted {
            batch.insert(&self.keyspaces.entries, layout::slot_key(*slot), *entry);
        }
        for (key, value) in &group.meta {
            batch.insert(&self.keyspaces.meta, *key, *value);
        }
        self.inject(FaultPoint::Write)?;
        batch.commit()?;
        self.inject(FaultPoint::Sync)?;
        let started = Instant::now();
        self.db.persist(PersistMode::SyncData)?;
        let sync_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.shared
            .sync_time_us
            .fetch_add(sync_us, Ordering::Relaxed);
        Ok(())
    }

    /// Counts a durable group and publishes its watermark.
    fn record(&mut self, group: &Group, requests: usize) {
        if let Some(log_start) = group.log_start {
            assert!(log_start > self.log_start, "coalesce only raises log_start");
            self.log_start = log_start;
            self.shared.log_start.store(log_start, Ordering::Release);
        }
        let writes = group.accepted.len()
            + group.meta.len()
            + usize::from(group.promised.is_some())
            + usize::from(group.chosen.is_some())
            + usize::from(group.log_start.is_some());
        let bytes = payload_bytes_coalesced(group);
        let s = &self.shared;
        s.syncs.fetch_add(1, Ordering::Relaxed);
        s.batches.fetch_add(requests as u64, Ordering::Relaxed);
        s.writes.fetch_add(writes as u64, Ordering::Relaxed);
        s.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        s.group_batches_max
            .fetch_max(requests as u64, Ordering::Relaxed);
    }

    /// Deletes up to `delete_keys_per_step_max` entry keys below the watermark. Not synced
    /// on its own: the watermark is already durable and recovery ignores everything below
    /// it, so a lost delete only means the key is deleted again after the next open.
    fn delete_step(&mut self) -> Result<(), fjall::Error> {
        let step_max = self.config.delete_keys_per_step_max;
        let mut slots = Vec::with_capacity(step_max);
        let range = layout::slot_key(self.delete_cursor)..layout::slot_key(self.log_start);
        for guard in self.keyspaces.entries.range(range).take(step_max) {
            let key = guard.key()?;
            let slot = u64::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .expect("entry keys are 8-byte slots (checked at recovery)"),
            );
            slots.push(slot);
        }
        let mut batch = self.db.batch();
        for slot in &slots {
            batch.remove(&self.keyspaces.entries, layout::slot_key(*slot));
        }
        if !slots.is_empty() {
            self.inject(FaultPoint::Write)?;
            batch.commit()?;
        }
        self.shared
            .deleted_entries
            .fetch_add(slots.len() as u64, Ordering::Relaxed);
        self.delete_cursor = match slots.last() {
            // The range ends below `log_start`, so `last + 1` cannot overflow.
            Some(last) if slots.len() == step_max => last + 1,
            _ => self.log_start,
        };
        Ok(())
    }

    fn inject(&self, point: FaultPoint) -> Result<(), fjall::Error> {
        match &self.config.fault_hook {
            Some(hook) => hook(point).map_err(fjall::Error::Io),
            None => Ok(()),
        }
    }

    /// Stops for good after a failed write or sync: logs one line, hands over to the
    /// fail-stop handler (which aborts the process in production), and if that returns,
    /// fails every waiting and later request.
    fn fail_stop(mut self, error: &fjall::Error, requests: Vec<Request>) {
        let error = classify(&self.shared, &self.config, error);
        tracing::error!(
            "storage fail-stop: {error}; stopping now, because after a failed write or sync \
             the disk may not hold what was acknowledged"
        );
        self.shared.stopped.store(true, Ordering::Release);
        self.config.fail_stop.fail_stop(&error);
        for request in requests {
            let _ = request.done.send(Err(error.clone()));
        }
        self.receiver.close();
        while let Some(request) = self.receiver.blocking_recv() {
            let _ = request.done.send(Err(StorageError::Stopped));
        }
    }
}

/// A full disk gets its own error (and log line): it is the one failure an operator can
/// fix by freeing space. fjall does not always say so: when a background flush hits ENOSPC
/// it poisons the database, and the committer's next write or sync only sees
/// `Poisoned`. So a failure on a filesystem with less than `disk_full_free_bytes_max` free
/// counts as a full disk too, and every message says how much was free.
fn classify(shared: &Shared, config: &StorageConfig, error: &fjall::Error) -> StorageError {
    let free_bytes = rustix::fs::statvfs(&shared.dir)
        .ok()
        .map(|stat| stat.f_bavail.saturating_mul(stat.f_frsize));
    let reason = match free_bytes {
        Some(free) => format!("{error} ({free} bytes free on that filesystem)"),
        None => error.to_string(),
    };
    let nearly_full = free_bytes.is_some_and(|free| free < config.disk_full_free_bytes_max);
    if is_disk_full(error) || nearly_full {
        StorageError::DiskFull {
            dir: shared.dir.clone(),
            reason,
        }
    } else {
        StorageError::WriteFailed {
            dir: shared.dir.clone(),
            reason,
        }
    }
}

fn payload_bytes(accepted: &[(u64, Vec<u8>)], meta: &[(String, Vec<u8>)]) -> usize {
    let accepted: usize = accepted.iter().map(|(_, entry)| 8 + entry.len()).sum();
    let meta: usize = meta
        .iter()
        .map(|(key, value)| key.len() + value.len())
        .sum();
    accepted + meta
}

fn payload_bytes_coalesced(group: &Group) -> usize {
    let accepted: usize = group.accepted.values().map(|entry| 8 + entry.len()).sum();
    let meta: usize = group.meta.iter().map(|(k, v)| k.len() + v.len()).sum();
    accepted + meta
}
