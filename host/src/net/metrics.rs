//! Counters of the transport, shared between its tasks and read by `/metrics`.
//!
//! Counters only ever grow; gauges (`queue_frames`, `queue_bytes`, `connected`)
//! are current values. Relaxed atomics are enough: each value is read on its
//! own, never as part of an invariant across counters.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::NodeId;

/// Outbound counters of one peer, owned by its connection task and `send`.
#[derive(Debug, Default)]
pub(crate) struct PeerCounters {
    pub frames_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub writes: AtomicU64,
    pub frames_dropped: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub queue_bytes: AtomicU64,
    pub connected: AtomicBool,
}

/// Inbound counters, shared by all accepted connections.
#[derive(Debug, Default)]
pub(crate) struct InboundCounters {
    pub frames_received: AtomicU64,
    pub bytes_received: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub connections_invalid: AtomicU64,
}

pub(crate) fn add(counter: &AtomicU64, amount: u64) {
    counter.fetch_add(amount, Ordering::Relaxed);
}

pub(crate) fn sub(counter: &AtomicU64, amount: u64) {
    let before = counter.fetch_sub(amount, Ordering::Relaxed);
    assert!(before >= amount, "gauge underflow: {before} - {amount}");
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// A snapshot of one peer's outbound side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerMetrics {
    pub addr: SocketAddr,
    /// A connection is up and its handshake passed.
    pub connected: bool,
    /// Frames written to the socket (bytes include headers).
    pub frames_sent: u64,
    pub bytes_sent: u64,
    /// Write calls that carried those frames: frames_sent / writes is how well
    /// pipelined messages are coalesced.
    pub writes: u64,
    /// Payloads given to `send` that never reached the socket: the queue was
    /// full, or the connection failed while they were being written.
    pub frames_dropped: u64,
    /// Connections that passed the handshake; every one after the first is a
    /// reconnect.
    pub connects: u64,
    /// Connection attempts that failed (refused, timed out, bad handshake).
    pub connect_failures: u64,
    /// Current depth of the outbound queue.
    pub queue_frames: u64,
    pub queue_bytes: u64,
}

impl PeerMetrics {
    pub fn reconnects(&self) -> u64 {
        self.connects.saturating_sub(1)
    }
}

/// A snapshot of the whole transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportMetrics {
    /// Message frames read from inbound connections (bytes include headers).
    pub frames_received: u64,
    pub bytes_received: u64,
    pub connections_accepted: u64,
    /// Inbound connections closed at the handshake: other cluster, other
    /// protocol version, our own node id, no hello in time.
    pub connections_refused: u64,
    /// Inbound connections closed after the handshake for a malformed,
    /// oversized or corrupt frame.
    pub connections_invalid: u64,
    /// Current depth of the inbound channel (received, not yet taken).
    pub inbound_queue_frames: u64,
    pub inbound_queue_bytes: u64,
    pub peers: BTreeMap<NodeId, PeerMetrics>,
}

impl TransportMetrics {
    pub fn frames_sent(&self) -> u64 {
        self.peers.values().map(|p| p.frames_sent).sum()
    }

    pub fn frames_dropped(&self) -> u64 {
        self.peers.values().map(|p| p.frames_dropped).sum()
    }

    pub fn reconnects(&self) -> u64 {
        self.peers.values().map(PeerMetrics::reconnects).sum()
    }

    pub fn queue_frames(&self) -> u64 {
        self.peers.values().map(|p| p.queue_frames).sum()
    }
}

impl PeerCounters {
    pub(crate) fn snapshot(&self, addr: SocketAddr, queue_frames: u64) -> PeerMetrics {
        PeerMetrics {
            addr,
            connected: self.connected.load(Ordering::Relaxed),
            frames_sent: get(&self.frames_sent),
            bytes_sent: get(&self.bytes_sent),
            writes: get(&self.writes),
            frames_dropped: get(&self.frames_dropped),
            connects: get(&self.connects),
            connect_failures: get(&self.connect_failures),
            queue_frames,
            queue_bytes: get(&self.queue_bytes),
        }
    }
}

impl InboundCounters {
    pub(crate) fn snapshot(
        &self,
        peers: BTreeMap<NodeId, PeerMetrics>,
        inbound_queue_frames: u64,
        inbound_queue_bytes: u64,
    ) -> TransportMetrics {
        TransportMetrics {
            frames_received: get(&self.frames_received),
            bytes_received: get(&self.bytes_received),
            connections_accepted: get(&self.connections_accepted),
            connections_refused: get(&self.connections_refused),
            connections_invalid: get(&self.connections_invalid),
            inbound_queue_frames,
            inbound_queue_bytes,
            peers,
        }
    }
}
