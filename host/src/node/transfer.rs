//! Snapshot transfer between replicas, as a sans-IO state machine: it decides which
//! messages to send and which chunks to read or write; the runtime does the reading,
//! writing and sending, and feeds back messages and the time.
//!
//! The receiver drives it. A transfer starts with an `Offer` (the sender's newest
//! snapshot, named by slot + sha256 + length), either because the sender's core asked for
//! it (`Action::SendSnapshot`) or because the receiver sent a `Request`. The receiver
//! answers with `Fetch { offset }`: "I hold every byte below `offset`". The sender keeps at
//! most `window_chunks` chunks in flight beyond the last acknowledged offset and sends no
//! faster than `bytes_per_sec` (a token bucket shared by all its outgoing transfers), so
//! snapshot chunks never crowd Paxos messages out of the peer queues.
//!
//! Loss and resumption: the transport drops at most the frames of a broken connection and
//! never reorders, so a chunk that does not start at the receiver's offset means the ones
//! before it were lost: the receiver asks again from its offset (`resend`). A receiver that
//! heard nothing for `retry_ms` asks again too, which also resumes a transfer after a
//! reconnect or a restart of either side (the receiver keeps its partial file; a sender
//! with no session serves a fetch for a snapshot it still has on disk). A sender whose
//! snapshot is gone answers `Gone`, and the receiver starts over with a newer one.
//! At most one outgoing transfer per peer, and one incoming transfer at a time.

use std::collections::BTreeMap;

use crate::paxos::{NodeId, Slot};

use super::snapshot::SnapshotId;

/// Limits of snapshot transfer. `TransferConfig::default()` is what a node runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferConfig {
    /// Largest chunk of file bytes in one message.
    pub chunk_bytes: u64,
    /// Chunks a sender may have in flight beyond the receiver's acknowledged offset.
    pub window_chunks: u64,
    /// Throttle of all outgoing transfers of one replica together.
    pub bytes_per_sec: u64,
    /// A receiver that heard nothing for this long asks again; a sender re-offers.
    pub retry_ms: u64,
    /// A transfer with no progress for this long is abandoned (the partial file stays).
    pub idle_ms: u64,
    /// Largest snapshot file a receiver accepts.
    pub file_bytes_max: u64,
}

impl Default for TransferConfig {
    fn default() -> TransferConfig {
        TransferConfig {
            chunk_bytes: 256 * 1024,
            window_chunks: 4,
            bytes_per_sec: 64 * 1024 * 1024,
            retry_ms: 500,
            idle_ms: 15_000,
            file_bytes_max: 16 * 1024 * 1024 * 1024,
        }
    }
}

/// Transfer messages between replicas (wire kind 2, see `codec`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransferMessage {
    /// "Offer me your newest snapshot at or above `slot_min`."
    Request { slot_min: Slot },
    /// "My newest snapshot is this one."
    Offer { id: SnapshotId },
    /// "I hold bytes `[0, offset)` of `id`; go on from `offset`." With `resend`, the
    /// sender goes back to `offset` (chunks after it were lost).
    Fetch {
        id: SnapshotId,
        offset: u64,
        resend: bool,
    },
    /// Bytes `[offset, offset + data.len())` of `id`.
    Chunk {
        id: SnapshotId,
        offset: u64,
        data: Vec<u8>,
    },
    /// The sender no longer has `id`.
    Gone { id: SnapshotId },
}

/// A chunk the runtime must read from `id`'s file at the sender and send to `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkRead {
    pub to: NodeId,
    pub id: SnapshotId,
    pub offset: u64,
    pub len: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Outgoing {
    id: SnapshotId,
    /// The receiver holds every byte below this.
    acked: u64,
    /// The next byte to send.
    next: u64,
    last_heard_ms: u64,
    last_offer_ms: u64,
    /// No chunk is sent before the receiver's first fetch says where to start.
    fetched: bool,
}

/// The sending side: at most one outgoing transfer per peer.
#[derive(Debug)]
pub struct Senders {
    config: TransferConfig,
    sessions: BTreeMap<NodeId, Outgoing>,
    /// Token bucket in bytes; may go negative by up to one chunk.
    tokens: i64,
    refilled_ms: u64,
    pub chunks_sent: u64,
    pub bytes_sent: u64,
    pub transfers_completed: u64,
}

impl Senders {
    pub fn new(config: TransferConfig, now_ms: u64) -> Senders {
        assert!(config.chunk_bytes > 0 && config.window_chunks > 0 && config.bytes_per_sec > 0);
        Senders {
            config,
            sessions: BTreeMap::new(),
            tokens: 0,
            refilled_ms: now_ms,
            chunks_sent: 0,
            bytes_sent: 0,
            transfers_completed: 0,
        }
    }

    /// Ends the transfer to `peer` (its snapshot file is gone).
    pub fn cancel(&mut self, peer: NodeId) {
        self.sessions.remove(&peer);
    }

    pub fn is_sending_to(&self, peer: NodeId) -> bool {
        self.sessions.contains_key(&peer)
    }

    pub fn active(&self) -> usize {
        self.sessions.len()
    }

    /// Starts sending `newest` to `to` unless a transfer to `to` already runs (the core
    /// repeats `SendSnapshot` on every heartbeat ack). Returns the offer to send. A
    /// running transfer whose receiver has been silent for `retry_ms` is offered again
    /// (at most once per `retry_ms`): the receiver may have restarted and forgotten it.
    pub fn offer(
        &mut self,
        to: NodeId,
        newest: SnapshotId,
        now_ms: u64,
    ) -> Option<TransferMessage> {
        if let Some(session) = self.sessions.get_mut(&to) {
            let silent = now_ms.saturating_sub(session.last_heard_ms) >= self.config.retry_ms;
            let offered = now_ms.saturating_sub(session.last_offer_ms) >= self.config.retry_ms;
            if !(silent && offered) {
                return None;
            }
            if session.id == newest {
                session.last_offer_ms = now_ms;
                return Some(TransferMessage::Offer { id: session.id });
            }
            // A stalled transfer of an older snapshot (which may be pruned by now):
            // start over with the newest.
            self.sessions.remove(&to);
        }
        self.sessions.insert(
            to,
            Outgoing {
                id: newest,
                acked: 0,
                next: 0,
                last_heard_ms: now_ms,
                last_offer_ms: now_ms,
                fetched: false,
            },
        );
        Some(TransferMessage::Offer { id: newest })
    }

    /// A peer's fetch. `available` is the snapshot file with that id if this replica
    /// still has it (the runtime looks it up), so a transfer resumes even after this side
    /// lost its session. Returns `Gone` when it cannot be served.
    pub fn on_fetch(
        &mut self,
        from: NodeId,
        id: SnapshotId,
        offset: u64,
        resend: bool,
        available: bool,
        now_ms: u64,
    ) -> Option<TransferMessage> {
        if offset > id.file_bytes {
            // Not something an honest receiver sends; drop the session.
            self.sessions.remove(&from);
            return Some(TransferMessage::Gone { id });
        }
        match self.sessions.get_mut(&from) {
            Some(session) if session.id == id => {
                session.last_heard_ms = now_ms;
                session.acked = session.acked.max(offset);
                if resend || !session.fetched || session.next < session.acked {
                    session.fetched = true;
                    session.next = offset;
                    session.acked = offset;
                }
            }
            _ if available => {
                // A new session, or one for another snapshot than the receiver now wants:
                // serve what it asks for (it is on disk).
                self.sessions.insert(
                    from,
                    Outgoing {
                        id,
                        acked: offset,
                        next: offset,
                        last_heard_ms: now_ms,
                        last_offer_ms: now_ms,
                        fetched: true,
                    },
                );
            }
            _ => return Some(TransferMessage::Gone { id }),
        }
        let session = &self.sessions[&from];
        if session.acked >= id.file_bytes {
            self.sessions.remove(&from);
            self.transfers_completed += 1;
        }
        None
    }

    /// Chunks due now (throttle and windows permitting), and offers to repeat for
    /// sessions that heard nothing yet. Sessions idle for `idle_ms` are dropped.
    pub fn poll(
        &mut self,
        now_ms: u64,
        chunks: &mut Vec<ChunkRead>,
    ) -> Vec<(NodeId, TransferMessage)> {
        let config = &self.config;
        let elapsed_ms = now_ms.saturating_sub(self.refilled_ms);
        self.refilled_ms = now_ms;
        // Burst: 50 ms of the rate, at least one chunk.
        let burst = (config.bytes_per_sec / 20).max(config.chunk_bytes) as i64;
        let refill = config.bytes_per_sec.saturating_mul(elapsed_ms) / 1000;
        self.tokens = (self.tokens + refill as i64).min(burst);
        let idle_ms = config.idle_ms;
        self.sessions
            .retain(|_, session| now_ms.saturating_sub(session.last_heard_ms) < idle_ms);
        let mut messages = Vec::new();
        let window_bytes = config.window_chunks * config.chunk_bytes;
        // Round robin over peers, one chunk each per round, so transfers share the rate.
        loop {
            let mut progressed = false;
            for (to, session) in self.sessions.iter_mut() {
                if self.tokens <= 0 {
                    break;
                }
                let id = session.id;
                if !session.fetched
                    || session.next >= id.file_bytes
                    || session.next >= session.acked + window_bytes
                {
                    continue;
                }
                let len = config.chunk_bytes.min(id.file_bytes - session.next);
                chunks.push(ChunkRead {
                    to: *to,
                    id,
                    offset: session.next,
                    len,
                });
                session.next += len;
                self.tokens -= len as i64;
                self.chunks_sent += 1;
                self.bytes_sent += len;
                progressed = true;
            }
            if !progressed || self.tokens <= 0 {
                break;
            }
        }
        for (to, session) in self.sessions.iter_mut() {
            if !session.fetched && now_ms.saturating_sub(session.last_offer_ms) >= config.retry_ms {
                session.last_offer_ms = now_ms;
                messages.push((*to, TransferMessage::Offer { id: session.id }));
            }
        }
        messages
    }
}

/// What the receiving side is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    Idle,
    /// This replica asked `from` for its newest snapshot and installs it even if it is
    /// not ahead (divergence repair or a compacted log without a local snapshot).
    Requested {
        from: NodeId,
        last_sent_ms: u64,
        since_ms: u64,
    },
    Receiving {
        from: NodeId,
        id: SnapshotId,
        received: u64,
        forced: bool,
        last_progress_ms: u64,
        last_fetch_ms: u64,
    },
    /// Complete; being verified and installed off the core task.
    Installing {
        id: SnapshotId,
        from: NodeId,
        forced: bool,
    },
}

/// What the runtime must do with an arrived chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkVerdict {
    /// Write it at its offset, then call `Receiver::written`.
    Write,
    /// Not for the current transfer, or a repeat: drop it.
    Ignore,
    /// Chunks before it were lost: send this and drop the chunk.
    Refetch(TransferMessage),
}

/// The receiving side: one incoming transfer at a time.
#[derive(Debug)]
pub struct Receiver {
    config: TransferConfig,
    pub state: Incoming,
    pub transfers_completed: u64,
    pub bytes_received: u64,
}

impl Receiver {
    pub fn new(config: TransferConfig) -> Receiver {
        Receiver {
            config,
            state: Incoming::Idle,
            transfers_completed: 0,
            bytes_received: 0,
        }
    }

    pub fn is_idle(&self) -> bool {
        self.state == Incoming::Idle
    }

    /// Asks `from` for its newest snapshot, to be installed even if this replica is not
    /// behind. Replaces a transfer in progress unless it is already being installed.
    pub fn request(&mut self, from: NodeId, now_ms: u64) -> Option<TransferMessage> {
        if matches!(self.state, Incoming::Installing { .. }) {
            return None;
        }
        self.state = Incoming::Requested {
            from,
            last_sent_ms: now_ms,
            since_ms: now_ms,
        };
        Some(TransferMessage::Request { slot_min: 0 })
    }

    /// An offer from `from`. `applied_index` is this replica's; `partial_len` is how many
    /// bytes of that snapshot's partial file are already on disk (resumption). Returns the
    /// fetch to send, if the offer is taken.
    pub fn on_offer(
        &mut self,
        from: NodeId,
        id: SnapshotId,
        applied_index: Slot,
        partial_len: u64,
        now_ms: u64,
    ) -> Option<TransferMessage> {
        if id.file_bytes > self.config.file_bytes_max || id.file_bytes == 0 {
            tracing::warn!(
                from,
                ?id,
                "refusing a snapshot offer larger than file_bytes_max"
            );
            return None;
        }
        let forced = match &self.state {
            Incoming::Idle => false,
            Incoming::Requested { from: asked, .. } if *asked == from => true,
            Incoming::Requested { .. } => false,
            Incoming::Receiving {
                id: current,
                forced,
                from: current_from,
                received,
                ..
            } => {
                if *current == id {
                    // The sender (re)started; go on from where we are.
                    let received = *received;
                    return self.fetch_again(from, received, now_ms);
                }
                // Switch only to a newer snapshot, or away from a stalled sender.
                let stalled = matches!(self.state, Incoming::Receiving { last_progress_ms, .. }
                    if now_ms.saturating_sub(last_progress_ms) >= self.config.idle_ms);
                if id.slot <= current.slot && !stalled {
                    return None;
                }
                *forced && *current_from == from
            }
            Incoming::Installing { .. } => return None,
        };
        if id.slot <= applied_index && !forced {
            return None;
        }
        let received = partial_len.min(id.file_bytes);
        self.state = Incoming::Receiving {
            from,
            id,
            received,
            forced,
            last_progress_ms: now_ms,
            last_fetch_ms: now_ms,
        };
        Some(TransferMessage::Fetch {
            id,
            offset: received,
            resend: true,
        })
    }

    fn fetch_again(&mut self, from: NodeId, received: u64, now_ms: u64) -> Option<TransferMessage> {
        let Incoming::Receiving {
            id,
            from: current_from,
            last_fetch_ms,
            ..
        } = &mut self.state
        else {
            return None;
        };
        *current_from = from;
        *last_fetch_ms = now_ms;
        Some(TransferMessage::Fetch {
            id: *id,
            offset: received,
            resend: true,
        })
    }

    pub fn on_chunk(
        &mut self,
        from: NodeId,
        id: SnapshotId,
        offset: u64,
        len: u64,
        now_ms: u64,
    ) -> ChunkVerdict {
        let Incoming::Receiving {
            from: current_from,
            id: current,
            received,
            last_fetch_ms,
            ..
        } = &mut self.state
        else {
            return ChunkVerdict::Ignore;
        };
        if *current != id || *current_from != from {
            return ChunkVerdict::Ignore;
        }
        if offset < *received
            || len == 0
            || offset
                .checked_add(len)
                .is_none_or(|end| end > id.file_bytes)
        {
            // A chunk sent again after a resend; we already hold it.
            return ChunkVerdict::Ignore;
        }
        if offset > *received {
            // Each gap asks at most once per retry interval: the chunks after a lost one
            // all arrive with gaps, and one resend covers them.
            if now_ms.saturating_sub(*last_fetch_ms) < self.config.retry_ms {
                return ChunkVerdict::Ignore;
            }
            *last_fetch_ms = now_ms;
            return ChunkVerdict::Refetch(TransferMessage::Fetch {
                id,
                offset: *received,
                resend: true,
            });
        }
        ChunkVerdict::Write
    }

    /// The chunk of `len` bytes accepted by `on_chunk` is on disk. Returns the
    /// acknowledgement to send, and whether the file is now complete.
    pub fn written(&mut self, len: u64, now_ms: u64) -> (TransferMessage, bool) {
        let Incoming::Receiving {
            from,
            id,
            received,
            forced,
            last_progress_ms,
            last_fetch_ms,
        } = &mut self.state
        else {
            panic!("written() without a transfer in progress");
        };
        *received += len;
        self.bytes_received += len;
        *last_progress_ms = now_ms;
        *last_fetch_ms = now_ms;
        let ack = TransferMessage::Fetch {
            id: *id,
            offset: *received,
            resend: false,
        };
        let complete = *received == id.file_bytes;
        if complete {
            self.state = Incoming::Installing {
                id: *id,
                from: *from,
                forced: *forced,
            };
        }
        (ack, complete)
    }

    /// The sender no longer has `id`: start over (a forced request asks again).
    pub fn on_gone(
        &mut self,
        from: NodeId,
        id: SnapshotId,
        now_ms: u64,
    ) -> Option<TransferMessage> {
        match &self.state {
            Incoming::Receiving {
                id: current,
                from: current_from,
                forced,
                ..
            } if *current == id && *current_from == from => {
                if *forced {
                    return self.request(from, now_ms);
                }
                self.state = Incoming::Idle;
                None
            }
            _ => None,
        }
    }

    /// Installation finished (installed or failed); accept offers again.
    pub fn installed(&mut self, ok: bool) {
        if ok {
            self.transfers_completed += 1;
        }
        self.state = Incoming::Idle;
    }

    /// Retries and give-ups due at `now_ms`: returns `(to, message)` to send.
    pub fn poll(&mut self, now_ms: u64) -> Option<(NodeId, TransferMessage)> {
        let config = &self.config;
        match &mut self.state {
            Incoming::Requested {
                from,
                last_sent_ms,
                since_ms,
            } => {
                if now_ms.saturating_sub(*since_ms) >= config.idle_ms {
                    tracing::warn!(
                        from = *from,
                        "no snapshot offer came; giving up the request"
                    );
                    self.state = Incoming::Idle;
                    return None;
                }
                if now_ms.saturating_sub(*last_sent_ms) >= config.retry_ms {
                    *last_sent_ms = now_ms;
                    return Some((*from, TransferMessage::Request { slot_min: 0 }));
                }
                None
            }
            Incoming::Receiving {
                from,
                id,
                received,
                last_progress_ms,
                last_fetch_ms,
                ..
            } => {
                if now_ms.saturating_sub(*last_progress_ms) >= config.idle_ms {
                    tracing::warn!(from = *from, ?id, received = *received, "snapshot transfer stalled; abandoning it (the partial file stays for a resume)");
                    self.state = Incoming::Idle;
                    return None;
                }
                if now_ms.saturating_sub(*last_fetch_ms) >= config.retry_ms {
                    *last_fetch_ms = now_ms;
                    return Some((
                        *from,
                        TransferMessage::Fetch {
                            id: *id,
                            offset: *received,
                            resend: true,
                        },
                    ));
                }
                None
            }
            Incoming::Idle | Incoming::Installing { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(slot: Slot, file_bytes: u64) -> SnapshotId {
        SnapshotId {
            slot,
            sha256: [slot as u8; 32],
            file_bytes,
        }
    }

    fn config() -> TransferConfig {
        TransferConfig {
            chunk_bytes: 100,
            window_chunks: 3,
            bytes_per_sec: 100_000, // 100 bytes per ms
            retry_ms: 50,
            idle_ms: 1000,
            file_bytes_max: 1 << 20,
        }
    }

    /// Moves messages between one sender (node 1) and one receiver (node 2) until quiet,
    /// dropping the chunks whose offsets are in `lose`. Returns the bytes the receiver
    /// wrote, in order, as (offset, len).
    fn run(
        senders: &mut Senders,
        receiver: &mut Receiver,
        snapshot: SnapshotId,
        lose: &mut Vec<u64>,
        start_ms: u64,
    ) -> (Vec<(u64, u64)>, u64) {
        let mut writes = Vec::new();
        let mut now = start_ms;
        let mut to_receiver: Vec<TransferMessage> = Vec::new();
        let mut to_sender: Vec<TransferMessage> = Vec::new();
        for _ in 0..10_000 {
            now += 1;
            let mut reads = Vec::new();
            for (to, message) in senders.poll(now, &mut reads) {
                assert_eq!(to, 2);
                to_receiver.push(message);
            }
            for read in reads {
                assert_eq!(read.id, snapshot);
                if let Some(position) = lose.iter().position(|o| *o == read.offset) {
                    lose.remove(position);
                    continue;
                }
                to_receiver.push(TransferMessage::Chunk {
                    id: read.id,
                    offset: read.offset,
                    data: vec![0; read.len as usize],
                });
            }
            if let Some((to, message)) = receiver.poll(now) {
                assert_eq!(to, 1);
                to_sender.push(message);
            }
            for message in std::mem::take(&mut to_receiver) {
                match message {
                    TransferMessage::Offer { id } => {
                        let written: u64 = writes.iter().map(|(_, l)| l).sum();
                        if let Some(reply) = receiver.on_offer(1, id, 0, written, now) {
                            to_sender.push(reply);
                        }
                    }
                    TransferMessage::Chunk { id, offset, data } => {
                        match receiver.on_chunk(1, id, offset, data.len() as u64, now) {
                            ChunkVerdict::Write => {
                                writes.push((offset, data.len() as u64));
                                let (ack, complete) = receiver.written(data.len() as u64, now);
                                to_sender.push(ack);
                                if complete {
                                    return (writes, now);
                                }
                            }
                            ChunkVerdict::Ignore => {}
                            ChunkVerdict::Refetch(fetch) => to_sender.push(fetch),
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            for message in std::mem::take(&mut to_sender) {
                match message {
                    TransferMessage::Fetch { id, offset, resend } => {
                        if let Some(reply) = senders.on_fetch(2, id, offset, resend, true, now) {
                            to_receiver.push(reply);
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        panic!("transfer did not complete; receiver {:?}", receiver.state);
    }

    fn assert_contiguous(writes: &[(u64, u64)], total: u64) {
        let mut expected = 0;
        for (offset, len) in writes {
            assert_eq!(*offset, expected);
            expected += len;
        }
        assert_eq!(expected, total);
    }

    #[test]
    fn a_transfer_moves_every_byte_once_in_order_within_the_window() {
        let snapshot = id(40, 1050);
        let mut senders = Senders::new(config(), 0);
        let mut receiver = Receiver::new(config());
        let offer = senders.offer(2, snapshot, 0).unwrap();
        assert_eq!(offer, TransferMessage::Offer { id: snapshot });
        // A repeat of SendSnapshot while the transfer runs changes nothing...
        assert_eq!(senders.offer(2, id(41, 10), 0), None);
        // ... unless the receiver has been silent for retry_ms: then the same offer again.
        assert_eq!(
            senders.offer(2, snapshot, 50),
            Some(TransferMessage::Offer { id: snapshot })
        );
        assert_eq!(senders.offer(2, snapshot, 60), None);
        // A silent receiver of an older snapshot is offered the newest one instead.
        let mut stale = Senders::new(config(), 0);
        stale.offer(2, snapshot, 0);
        assert_eq!(
            stale.offer(2, id(41, 10), 10),
            None,
            "not silent for long yet"
        );
        assert_eq!(
            stale.offer(2, id(41, 10), 100),
            Some(TransferMessage::Offer { id: id(41, 10) })
        );
        let reply = receiver.on_offer(1, snapshot, 3, 0, 0).unwrap();
        assert_eq!(
            reply,
            TransferMessage::Fetch {
                id: snapshot,
                offset: 0,
                resend: true
            }
        );
        assert_eq!(senders.on_fetch(2, snapshot, 0, true, true, 0), None);
        let (writes, _) = run(&mut senders, &mut receiver, snapshot, &mut Vec::new(), 0);
        assert_contiguous(&writes, 1050);
        assert_eq!(writes.len(), 11, "10 full chunks and one of 50 bytes");
        assert!(matches!(receiver.state, Incoming::Installing { id, .. } if id == snapshot));
        // The last ack ends the session.
        senders.on_fetch(2, snapshot, 1050, false, true, 100);
        assert!(!senders.is_sending_to(2));
        assert_eq!(senders.transfers_completed, 1);
    }

    #[test]
    fn the_window_and_the_rate_bound_what_is_in_flight() {
        let snapshot = id(40, 100_000);
        let mut senders = Senders::new(config(), 0);
        senders.offer(2, snapshot, 0);
        senders.on_fetch(2, snapshot, 0, true, true, 0);
        // 10 ms at 100 bytes/ms: 1000 bytes of tokens, but the window is 3 chunks.
        let mut reads = Vec::new();
        senders.poll(10, &mut reads);
        assert_eq!(reads.len(), 3);
        reads.clear();
        senders.poll(20, &mut reads);
        assert!(reads.is_empty(), "nothing acknowledged, nothing more sent");
        senders.on_fetch(2, snapshot, 300, false, true, 20);
        let mut throttled = config();
        throttled.bytes_per_sec = 10_000; // 10 bytes per ms
        let mut slow = Senders::new(throttled, 0);
        slow.offer(2, snapshot, 0);
        slow.on_fetch(2, snapshot, 0, true, true, 0);
        let mut reads = Vec::new();
        let mut sent = 0;
        for now in 1..=1000 {
            slow.poll(now, &mut reads);
            for read in reads.drain(..) {
                sent += read.len;
                slow.on_fetch(2, snapshot, read.offset + read.len, false, true, now);
            }
        }
        // 10 bytes/ms for one second, plus at most one chunk of burst.
        assert!((9_900..=10_100).contains(&sent), "sent {sent}");
    }

    #[test]
    fn lost_chunks_are_asked_for_again_and_the_file_still_arrives_whole() {
        let snapshot = id(40, 2000);
        let mut senders = Senders::new(config(), 0);
        let mut receiver = Receiver::new(config());
        senders.offer(2, snapshot, 0);
        receiver.on_offer(1, snapshot, 0, 0, 0);
        senders.on_fetch(2, snapshot, 0, true, true, 0);
        // The first chunk, one in the middle and the last are lost once each.
        let mut lose = vec![0, 700, 1900];
        let (writes, _) = run(&mut senders, &mut receiver, snapshot, &mut lose, 0);
        assert!(lose.is_empty());
        assert_contiguous(&writes, 2000);
    }

    #[test]
    fn a_transfer_resumes_from_the_partial_file_after_either_side_restarts() {
        let snapshot = id(40, 1000);
        // The receiver restarted holding 600 bytes; the sender restarted with no session.
        let mut senders = Senders::new(config(), 0);
        let mut receiver = Receiver::new(config());
        let fetch = receiver.on_offer(1, snapshot, 0, 600, 0).unwrap();
        assert_eq!(
            fetch,
            TransferMessage::Fetch {
                id: snapshot,
                offset: 600,
                resend: true
            }
        );
        // No session, but the file is on disk: served from 600.
        assert_eq!(senders.on_fetch(2, snapshot, 600, true, true, 0), None);
        let mut reads = Vec::new();
        senders.poll(10, &mut reads);
        assert_eq!(reads[0].offset, 600);
        // No session and the file is gone: Gone, and the receiver starts over.
        let mut other = Senders::new(config(), 0);
        assert_eq!(
            other.on_fetch(2, snapshot, 600, true, false, 0),
            Some(TransferMessage::Gone { id: snapshot })
        );
        assert_eq!(receiver.on_gone(1, snapshot, 0), None);
        assert!(receiver.is_idle());
    }

    #[test]
    fn the_receiver_takes_only_newer_snapshots_unless_it_asked() {
        let mut receiver = Receiver::new(config());
        // Not ahead of what is applied: refused.
        assert_eq!(receiver.on_offer(1, id(10, 100), 10, 0, 0), None);
        assert!(receiver.on_offer(1, id(20, 100), 10, 0, 0).is_some());
        // While receiving 20: an older or equal-slot offer is refused, a newer one wins.
        assert_eq!(receiver.on_offer(3, id(15, 100), 10, 0, 1), None);
        assert!(receiver.on_offer(3, id(30, 100), 10, 0, 1).is_some());
        assert!(matches!(receiver.state, Incoming::Receiving { from: 3, id, .. } if id.slot == 30));
        // A chunk from the old sender is ignored.
        assert_eq!(
            receiver.on_chunk(1, id(20, 100), 0, 100, 2),
            ChunkVerdict::Ignore
        );

        // A request makes the answer installable even when not ahead.
        let mut receiver = Receiver::new(config());
        assert_eq!(
            receiver.request(2, 0),
            Some(TransferMessage::Request { slot_min: 0 })
        );
        // An offer from someone else is not the answer.
        assert_eq!(receiver.on_offer(3, id(5, 100), 10, 0, 1), None);
        assert!(receiver.on_offer(2, id(5, 100), 10, 0, 1).is_some());
        assert!(matches!(
            receiver.state,
            Incoming::Receiving { forced: true, .. }
        ));
        // Too large: refused.
        let mut receiver = Receiver::new(config());
        assert_eq!(receiver.on_offer(1, id(50, 2 << 20), 0, 0, 0), None);
    }

    #[test]
    fn retries_repeat_requests_and_fetches_then_give_up() {
        let mut receiver = Receiver::new(config());
        receiver.request(2, 0);
        assert_eq!(receiver.poll(10), None);
        assert_eq!(
            receiver.poll(50),
            Some((2, TransferMessage::Request { slot_min: 0 }))
        );
        assert_eq!(receiver.poll(1000), None);
        assert!(receiver.is_idle(), "gave up after idle_ms");

        receiver.on_offer(1, id(9, 500), 0, 0, 2000);
        assert_eq!(
            receiver.poll(2050),
            Some((
                1,
                TransferMessage::Fetch {
                    id: id(9, 500),
                    offset: 0,
                    resend: true
                }
            ))
        );
        assert_eq!(receiver.poll(3000), None);
        assert!(receiver.is_idle());

        // A sender whose offer was never answered repeats it, and drops the session
        // once the receiver has been silent for idle_ms.
        let mut senders = Senders::new(config(), 0);
        senders.offer(2, id(9, 500), 0);
        let mut reads = Vec::new();
        assert!(senders.poll(10, &mut reads).is_empty());
        assert_eq!(
            senders.poll(60, &mut reads),
            vec![(2, TransferMessage::Offer { id: id(9, 500) })]
        );
        senders.poll(1000, &mut reads);
        assert!(!senders.is_sending_to(2));
        assert!(reads.is_empty());
    }
}
