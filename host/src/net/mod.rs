//! Peer transport: framed, versioned messages between replicas over TCP.
//!
//! Owns the sockets between replicas: one listener, one outbound connection per
//! peer (reconnecting with exponential backoff and jitter), a bounded queue per
//! peer and one bounded inbound channel. It carries opaque payloads (`Bytes`):
//! it never knows what a Paxos message is, which node leads, or which messages
//! matter; the node wiring encodes and decodes them (see [`Codec`]).
//!
//! Delivery is at most once and in order per connection. A payload can be lost
//! when its peer's queue is full or when a connection breaks while it is in
//! flight; `send` drops (and counts) rather than block, because Paxos
//! retransmits what it still needs and a blocked caller would stall the replica
//! on its slowest peer.
//!
//! Node identity is a number; addresses are configuration, never assumed to be
//! loopback. Frame format and handshake: see [`frame`] and docs/notes/net.md.

pub mod frame;
mod inbound;
mod metrics;
mod outbound;
mod reader;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

pub use metrics::{PeerMetrics, TransportMetrics};

use metrics::{InboundCounters, PeerCounters};

/// A replica's identity in the cluster.
pub type NodeId = u64;

/// Everything the transport needs; addresses come from the node's configuration.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    pub node_id: NodeId,
    /// Every replica of one cluster shares it; a peer with another is refused.
    pub cluster_id: u64,
    /// Where to accept peers' connections (port 0 picks a free port).
    pub listen: SocketAddr,
    /// The other replicas this node sends to. Must not contain `node_id`.
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// Largest payload of one frame, in either direction.
    pub frame_bytes_max: u32,
    /// Outbound queue limit per peer, in frames; `send` drops beyond it.
    pub queue_frames_max: usize,
    /// Outbound queue limit per peer, in payload bytes; `send` drops beyond it.
    pub queue_bytes_max: usize,
    /// Capacity of the inbound channel in frames, and the payload bytes it may
    /// hold. When either is reached, connections stop being read and TCP
    /// pushes back on the senders.
    pub inbound_frames_max: usize,
    pub inbound_bytes_max: usize,
    /// Simultaneous inbound connections; more are closed at accept.
    pub inbound_connections_max: usize,
    /// First reconnect delay; it doubles per failed attempt up to the max.
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    pub connect_timeout_ms: u64,
    /// Time a new connection has to complete the handshake.
    pub handshake_timeout_ms: u64,
    /// Queued frames are encoded into one buffer up to this size and written
    /// with one syscall, so pipelined small messages share writes.
    pub write_coalesce_bytes_max: usize,
}

impl TransportConfig {
    /// A configuration with the default limits and no peers.
    pub fn new(node_id: NodeId, cluster_id: u64, listen: SocketAddr) -> TransportConfig {
        TransportConfig {
            node_id,
            cluster_id,
            listen,
            peers: BTreeMap::new(),
            frame_bytes_max: 16 * 1024 * 1024,
            queue_frames_max: 4096,
            queue_bytes_max: 64 * 1024 * 1024,
            inbound_frames_max: 4096,
            inbound_bytes_max: 64 * 1024 * 1024,
            inbound_connections_max: 64,
            backoff_min_ms: 20,
            backoff_max_ms: 2_000,
            connect_timeout_ms: 2_000,
            handshake_timeout_ms: 2_000,
            write_coalesce_bytes_max: 256 * 1024,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.peers.contains_key(&self.node_id),
            "peers include this node's own id {}",
            self.node_id
        );
        anyhow::ensure!(self.frame_bytes_max > 0, "frame_bytes_max must be positive");
        anyhow::ensure!(
            self.queue_frames_max > 0,
            "queue_frames_max must be positive"
        );
        anyhow::ensure!(
            self.queue_bytes_max >= self.frame_bytes_max as usize,
            "queue_bytes_max ({}) must hold one frame of frame_bytes_max ({})",
            self.queue_bytes_max,
            self.frame_bytes_max
        );
        anyhow::ensure!(
            self.inbound_frames_max > 0,
            "inbound_frames_max must be positive"
        );
        anyhow::ensure!(
            self.frame_bytes_max as usize <= self.inbound_bytes_max
                && self.inbound_bytes_max <= Semaphore::MAX_PERMITS,
            "inbound_bytes_max ({}) must hold one frame of frame_bytes_max ({}) and be at most {}",
            self.inbound_bytes_max,
            self.frame_bytes_max,
            Semaphore::MAX_PERMITS
        );
        anyhow::ensure!(
            self.inbound_connections_max > 0,
            "inbound_connections_max must be positive"
        );
        anyhow::ensure!(
            0 < self.backoff_min_ms && self.backoff_min_ms <= self.backoff_max_ms,
            "need 0 < backoff_min_ms ({}) <= backoff_max_ms ({})",
            self.backoff_min_ms,
            self.backoff_max_ms
        );
        anyhow::ensure!(
            self.connect_timeout_ms > 0,
            "connect_timeout_ms must be positive"
        );
        anyhow::ensure!(
            self.handshake_timeout_ms > 0,
            "handshake_timeout_ms must be positive"
        );
        anyhow::ensure!(
            self.write_coalesce_bytes_max > 0,
            "write_coalesce_bytes_max must be positive"
        );
        Ok(())
    }
}

/// Why `send` did not queue a payload. Only `QueueFull` is counted as a drop:
/// the others are the caller's view of membership or size being off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// No such peer is configured (this includes this node's own id).
    UnknownPeer(NodeId),
    /// The payload exceeds `frame_bytes_max`.
    TooLarge {
        payload_bytes: usize,
        frame_bytes_max: u32,
    },
    /// The peer's queue is at `queue_frames_max` or `queue_bytes_max`; dropped.
    QueueFull(NodeId),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::UnknownPeer(id) => write!(f, "no peer with node id {id}"),
            SendError::TooLarge {
                payload_bytes,
                frame_bytes_max,
            } => {
                write!(
                    f,
                    "payload of {payload_bytes} bytes exceeds frame_bytes_max {frame_bytes_max}"
                )
            }
            SendError::QueueFull(id) => write!(f, "queue to node {id} is full; payload dropped"),
        }
    }
}

impl std::error::Error for SendError {}

/// Turns typed messages into payloads and back. The transport itself only
/// carries `Bytes`; the node wiring picks a codec for Paxos messages and uses
/// [`Transport::send_message`] and [`Codec::decode`] on what it receives.
pub trait Codec {
    type Message;
    type Error;
    fn encode(&self, message: &Self::Message) -> Bytes;
    fn decode(&self, payload: Bytes) -> Result<Self::Message, Self::Error>;
}

/// What the inbound channel yields: the sender's node id and its payload.
pub type Inbound = (NodeId, Bytes);

/// A payload in the inbound channel with its share of `inbound_bytes_max`,
/// given back when the receiver hands the payload out.
type Delivery = (NodeId, Bytes, OwnedSemaphorePermit);

/// The sending end of the inbound channel, shared by inbound connections.
#[derive(Clone)]
struct InboundQueue {
    deliveries: mpsc::Sender<Delivery>,
    /// One permit per payload byte, `inbound_bytes_max` in all.
    budget: Arc<Semaphore>,
    bytes_max: usize,
}

/// The receiving end of the bounded inbound channel.
pub struct InboundReceiver {
    deliveries: mpsc::Receiver<Delivery>,
}

impl InboundReceiver {
    /// The next payload; `None` once the transport is gone.
    pub async fn recv(&mut self) -> Option<Inbound> {
        let (from, payload, _budget) = self.deliveries.recv().await?;
        Some((from, payload))
    }

    /// The next payload if one is waiting.
    pub fn try_recv(&mut self) -> Result<Inbound, mpsc::error::TryRecvError> {
        let (from, payload, _budget) = self.deliveries.try_recv()?;
        Ok((from, payload))
    }
}

/// The settings every connection task reads; fixed at start.
#[derive(Clone, Copy, Debug)]
struct Limits {
    node_id: NodeId,
    cluster_id: u64,
    frame_bytes_max: u32,
    queue_bytes_max: usize,
    backoff_min_ms: u64,
    backoff_max_ms: u64,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    write_coalesce_bytes_max: usize,
}

/// The sending side of one peer: its queue and the task that drains it.
struct Peer {
    queue: mpsc::Sender<Bytes>,
    addr: watch::Sender<SocketAddr>,
    counters: Arc<PeerCounters>,
    task: JoinHandle<()>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        // The task owns the connection; aborting it closes the socket and
        // frees whatever was still queued.
        self.task.abort();
    }
}

/// A running transport. Dropping it stops every task and closes every socket.
pub struct Transport {
    limits: Limits,
    queue_frames_max: usize,
    local_addr: SocketAddr,
    peers: Mutex<BTreeMap<NodeId, Peer>>,
    inbound: Arc<InboundCounters>,
    /// Kept to read the inbound queue's depth; connection tasks hold clones.
    inbound_queue: InboundQueue,
    /// `None` only after `shutdown` took it.
    listener_task: Option<JoinHandle<()>>,
    /// The runtime `start` ran on: peer tasks spawned later (by `set_peers`
    /// from any thread) run there too.
    runtime: tokio::runtime::Handle,
}

impl Transport {
    /// Binds the listener, starts a connection task per peer and returns the
    /// transport with the receiving end of its bounded inbound channel. Must be
    /// called inside a tokio runtime.
    pub async fn start(config: TransportConfig) -> anyhow::Result<(Transport, InboundReceiver)> {
        config.validate()?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding the peer listener on {}", config.listen))?;
        let local_addr = listener
            .local_addr()
            .context("reading the peer listener's address")?;
        let limits = Limits {
            node_id: config.node_id,
            cluster_id: config.cluster_id,
            frame_bytes_max: config.frame_bytes_max,
            queue_bytes_max: config.queue_bytes_max,
            backoff_min_ms: config.backoff_min_ms,
            backoff_max_ms: config.backoff_max_ms,
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
            write_coalesce_bytes_max: config.write_coalesce_bytes_max,
        };
        let (deliveries_tx, deliveries) = mpsc::channel(config.inbound_frames_max);
        let inbound_queue = InboundQueue {
            deliveries: deliveries_tx,
            budget: Arc::new(Semaphore::new(config.inbound_bytes_max)),
            bytes_max: config.inbound_bytes_max,
        };
        let inbound = Arc::new(InboundCounters::default());
        let listener_task = tokio::spawn(inbound::accept_loop(
            listener,
            limits,
            config.inbound_connections_max,
            inbound_queue.clone(),
            Arc::clone(&inbound),
        ));
        tracing::info!(node_id = config.node_id, cluster_id = config.cluster_id, %local_addr, "peer transport listening");
        let transport = Transport {
            limits,
            queue_frames_max: config.queue_frames_max,
            local_addr,
            peers: Mutex::new(BTreeMap::new()),
            inbound,
            inbound_queue,
            listener_task: Some(listener_task),
            runtime: tokio::runtime::Handle::current(),
        };
        transport.set_peers(config.peers);
        Ok((transport, InboundReceiver { deliveries }))
    }

    pub fn node_id(&self) -> NodeId {
        self.limits.node_id
    }

    /// The address the listener is bound to (with the real port when the
    /// configuration asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Queues `payload` for peer `to` without waiting. The payload is dropped
    /// (and counted) when that peer's queue is full.
    pub fn send(&self, to: NodeId, payload: Bytes) -> Result<(), SendError> {
        if payload.len() > self.limits.frame_bytes_max as usize {
            return Err(SendError::TooLarge {
                payload_bytes: payload.len(),
                frame_bytes_max: self.limits.frame_bytes_max,
            });
        }
        let peers = self.peers.lock().expect("peer table lock poisoned");
        let Some(peer) = peers.get(&to) else {
            return Err(SendError::UnknownPeer(to));
        };
        // The task ends only when its peer is removed, so a finished task here
        // means it panicked: a bug, and this replica could no longer reach `to`.
        assert!(
            !peer.task.is_finished(),
            "connection task of peer {to} died"
        );
        let payload_bytes = payload.len() as u64;
        // Reserve the bytes before queueing so the task's release always comes after.
        let queued_bytes = peer
            .counters
            .queue_bytes
            .fetch_add(payload_bytes, Ordering::Relaxed)
            + payload_bytes;
        let accepted = queued_bytes <= self.limits.queue_bytes_max as u64
            && peer.queue.try_send(payload).is_ok();
        if !accepted {
            metrics::sub(&peer.counters.queue_bytes, payload_bytes);
            metrics::add(&peer.counters.frames_dropped, 1);
            return Err(SendError::QueueFull(to));
        }
        Ok(())
    }

    /// Encodes `message` with `codec` and sends it; see [`Transport::send`].
    pub fn send_message<C: Codec>(
        &self,
        codec: &C,
        to: NodeId,
        message: &C::Message,
    ) -> Result<(), SendError> {
        self.send(to, codec.encode(message))
    }

    /// Replaces the peer set: peers not in `peers` are disconnected and their
    /// queues freed, new ones are connected, moved ones redial their new address.
    /// Panics if `peers` contains this node's own id: membership is the
    /// caller's to get right.
    pub fn set_peers(&self, peers: BTreeMap<NodeId, SocketAddr>) {
        assert!(
            !peers.contains_key(&self.limits.node_id),
            "peers include this node's own id {}",
            self.limits.node_id
        );
        let mut table = self.peers.lock().expect("peer table lock poisoned");
        table.retain(|id, _| peers.contains_key(id));
        for (id, addr) in peers {
            self.upsert_peer(&mut table, id, addr);
        }
    }

    /// Adds peer `id` at `addr`, or points an existing peer at a new address
    /// (its queue is kept and flushed to the new address). Panics on this node's own id.
    pub fn update_peer(&self, id: NodeId, addr: SocketAddr) {
        assert_ne!(id, self.limits.node_id, "a node is not its own peer");
        let mut table = self.peers.lock().expect("peer table lock poisoned");
        self.upsert_peer(&mut table, id, addr);
    }

    /// Disconnects peer `id` and frees its queue. Returns whether it existed.
    pub fn remove_peer(&self, id: NodeId) -> bool {
        self.peers
            .lock()
            .expect("peer table lock poisoned")
            .remove(&id)
            .is_some()
    }

    fn upsert_peer(&self, table: &mut BTreeMap<NodeId, Peer>, id: NodeId, addr: SocketAddr) {
        if let Some(peer) = table.get(&id) {
            // send_if_modified: an unchanged address must not break a working connection.
            peer.addr.send_if_modified(|current| {
                let moved = *current != addr;
                *current = addr;
                moved
            });
            return;
        }
        let (queue_tx, queue_rx) = mpsc::channel(self.queue_frames_max);
        let (addr_tx, addr_rx) = watch::channel(addr);
        let counters = Arc::new(PeerCounters::default());
        let task = self.runtime.spawn(outbound::run_peer(
            id,
            self.limits,
            queue_rx,
            addr_rx,
            Arc::clone(&counters),
        ));
        table.insert(
            id,
            Peer {
                queue: queue_tx,
                addr: addr_tx,
                counters,
                task,
            },
        );
    }

    /// The peers this transport sends to, with their addresses.
    pub fn peers(&self) -> BTreeMap<NodeId, SocketAddr> {
        let table = self.peers.lock().expect("peer table lock poisoned");
        table
            .iter()
            .map(|(id, peer)| (*id, *peer.addr.borrow()))
            .collect()
    }

    /// A snapshot of every counter, for `/metrics` and `/v1/status`.
    pub fn metrics(&self) -> TransportMetrics {
        let table = self.peers.lock().expect("peer table lock poisoned");
        let peers = table
            .iter()
            .map(|(id, peer)| {
                let queue_frames = (peer.queue.max_capacity() - peer.queue.capacity()) as u64;
                (
                    *id,
                    peer.counters.snapshot(*peer.addr.borrow(), queue_frames),
                )
            })
            .collect();
        let inbound_queue_frames =
            self.inbound_queue.deliveries.max_capacity() - self.inbound_queue.deliveries.capacity();
        let inbound_queue_bytes =
            self.inbound_queue.bytes_max - self.inbound_queue.budget.available_permits();
        self.inbound.snapshot(
            peers,
            inbound_queue_frames as u64,
            inbound_queue_bytes as u64,
        )
    }

    /// Stops every task and waits until the listener's socket is closed, so the
    /// address can be bound again at once (a restart on the same port).
    pub async fn shutdown(mut self) {
        self.peers
            .get_mut()
            .expect("peer table lock poisoned")
            .clear();
        let listener_task = self
            .listener_task
            .take()
            .expect("listener task is taken only here");
        listener_task.abort();
        // The task was aborted on purpose: its JoinError says only that.
        let _ = listener_task.await;
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        if let Some(listener_task) = &self.listener_task {
            listener_task.abort();
        }
    }
}
