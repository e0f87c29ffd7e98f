//! Getting a snapshot from a peer before the core starts: for a replica whose store was
//! compacted past every valid local snapshot (the newest one was corrupt, say), the
//! state below the store's `log_start` exists only in a peer's snapshot.
//!
//! It also serves a node that joins a cluster (started without `--cluster`): it knows no
//! peer, so it waits for one to contact it; every member sends peer info (which carries
//! the sender's peer address) to the members of its configuration, so once the joining
//! node is a learner they all do, and it asks them for a snapshot.
//!
//! It runs the receiving side of the transfer protocol (`transfer::Receiver`) over the
//! transport on its own, asking the peers in turn for their newest snapshot, until one
//! arrives whole, checks out (sha256) and covers `slot_min`; it is then the newest
//! snapshot in the folder and `start` restores from it. Paxos messages that arrive
//! meanwhile are dropped: the peers retransmit what this replica needs once its core
//! runs. A replica whose store is merely empty does not come here: its core learns from
//! the leader that it is behind the compacted log, and the leader sends a snapshot.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::net::{InboundReceiver, Transport};
use crate::paxos::{NodeId, Slot};

use super::codec::{self, WireMessage};
use super::config::NodeConfig;
use super::snapshot::{self, SnapshotDir};
use super::transfer::{ChunkVerdict, Incoming, Receiver, TransferMessage};

/// How long one peer gets to make an offer before the next one is asked.
const PEER_ANSWER_MS: u64 = 2_000;
/// How often the receiver's retries are polled while no message arrives.
const POLL_MS: u64 = 20;

/// Fetches a snapshot at or above `slot_min` from one of `peers`, or from any peer whose
/// peer info arrives meanwhile, and makes it the newest snapshot in `dir`. Retries until
/// it succeeds; a failure to verify or restore one snapshot moves on to the next offer.
pub(crate) async fn fetch_snapshot(
    config: &NodeConfig,
    transport: &Transport,
    inbound: &mut InboundReceiver,
    dir: &SnapshotDir,
    mut slot_min: Slot,
    mut peers: Vec<NodeId>,
) -> anyhow::Result<()> {
    if peers.is_empty() {
        tracing::info!(
            node = config.id,
            "no peer known: waiting for a member to contact this node"
        );
    }
    let started = Instant::now();
    let now_ms = || started.elapsed().as_millis() as u64;
    let send = |to: NodeId, message: &TransferMessage| {
        let payload = codec::encode_wire(&WireMessage::Transfer(message.clone()));
        let _ = transport.send(to, Bytes::from(payload));
    };
    let mut receiver = Receiver::new(config.snapshot.transfer.clone());
    let mut next_peer = 0;
    let mut asked_ms = 0;
    loop {
        let now = now_ms();
        let waiting = matches!(receiver.state, Incoming::Requested { .. });
        let ask = receiver.is_idle() || (waiting && now.saturating_sub(asked_ms) >= PEER_ANSWER_MS);
        if ask && !peers.is_empty() {
            let peer = peers[next_peer % peers.len()];
            next_peer += 1;
            asked_ms = now;
            tracing::info!(peer, slot_min, "asking a peer for its newest snapshot");
            if receiver.request(peer, now).is_some() {
                send(peer, &TransferMessage::Request { slot_min });
            }
        }
        if let Some((to, message)) = receiver.poll(now) {
            let message = match message {
                TransferMessage::Request { .. } => TransferMessage::Request { slot_min },
                other => other,
            };
            send(to, &message);
        }
        let Ok(Some((from, payload))) =
            tokio::time::timeout(Duration::from_millis(POLL_MS), inbound.recv()).await
        else {
            continue;
        };
        let message = match codec::decode_wire(&payload) {
            Ok(WireMessage::Transfer(message)) => message,
            Ok(WireMessage::Info(info)) => {
                if learn_peer(transport, &mut peers, from, &info.peer) {
                    // It contacted this node because it applied the configuration that
                    // added it: only a snapshot at least that recent carries that
                    // configuration and the addresses of its members (an older one would
                    // leave this node outside, unable to answer the leader). A member
                    // without one takes one when asked.
                    slot_min = slot_min.max(info.applied_index);
                }
                continue;
            }
            _ => continue,
        };
        let now = now_ms();
        match message {
            TransferMessage::Offer { id } => {
                if !peers.contains(&from) {
                    // A joining node takes a snapshot only from a peer whose peer info
                    // told it which configuration to expect (`slot_min` above): an offer
                    // that overtook that info may predate this node's addition.
                    continue;
                }
                if id.slot < slot_min {
                    tracing::warn!(
                        from,
                        ?id,
                        slot_min,
                        "the peer's snapshot does not cover the compacted log"
                    );
                    continue;
                }
                let partial_len = snapshot::partial_len(&dir.partial_path(&id));
                if let Some(fetch) = receiver.on_offer(from, id, 0, partial_len, now) {
                    let _ = dir.remove_partials_except(Some(&id));
                    tracing::info!(
                        from,
                        ?id,
                        resume_from = partial_len.min(id.file_bytes),
                        "receiving a snapshot"
                    );
                    send(from, &fetch);
                }
            }
            TransferMessage::Chunk { id, offset, data } => {
                let len = data.len() as u64;
                match receiver.on_chunk(from, id, offset, len, now) {
                    ChunkVerdict::Ignore => {}
                    ChunkVerdict::Refetch(fetch) => send(from, &fetch),
                    ChunkVerdict::Write => {
                        snapshot::write_partial_at(&dir.partial_path(&id), &data, offset)?;
                        let (ack, complete) = receiver.written(len, now);
                        send(from, &ack);
                        if !complete {
                            continue;
                        }
                        let check = dir.clone();
                        let checked = tokio::task::spawn_blocking(move || {
                            check.verify_partial(&id)?;
                            check.adopt_partial(&id)
                        })
                        .await
                        .expect("snapshot verification task panicked");
                        match checked {
                            Ok(file) => {
                                tracing::info!(from, ?id, path = %file.path.display(), "snapshot from a peer is durable");
                                return Ok(());
                            }
                            Err(error) => {
                                tracing::error!(from, %error, "a snapshot from a peer did not check out; asking again");
                                let _ = std::fs::remove_file(dir.partial_path(&id));
                                receiver.installed(false);
                            }
                        }
                    }
                }
            }
            TransferMessage::Gone { id } => {
                if receiver.on_gone(from, id, now).is_some() {
                    send(from, &TransferMessage::Request { slot_min });
                }
            }
            TransferMessage::Request { .. } | TransferMessage::Fetch { .. } => {}
        }
    }
}

/// A member told this node where it listens: answer it there, and ask it too. True
/// when the peer is new.
fn learn_peer(transport: &Transport, peers: &mut Vec<NodeId>, from: NodeId, addr: &str) -> bool {
    if peers.contains(&from) || from == transport.node_id() {
        return false;
    }
    match addr.parse() {
        Ok(addr) => {
            tracing::info!(peer = from, %addr, "a member contacted this node");
            transport.update_peer(from, addr);
            peers.push(from);
            true
        }
        Err(_) => {
            tracing::warn!(peer = from, addr, "a peer announced an unusable address");
            false
        }
    }
}
