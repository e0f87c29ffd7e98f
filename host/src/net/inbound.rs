//! The accepting side: the listener and one task per inbound connection.
//!
//! An inbound connection only ever carries frames towards this node (replies go
//! back over this node's own outbound connection to that peer). Each connection
//! must open with a hello of our cluster and protocol version; after that every
//! frame is a message and goes to the bounded inbound channel. When that channel
//! is full the task waits, stops reading the socket, and TCP flow control pushes
//! back on the sender, whose queue then fills and drops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::frame::{encode_frame, FrameKind, Hello, HELLO_BYTES, PROTOCOL_VERSION};
use super::metrics::{add, InboundCounters};
use super::reader::{FrameReader, ReadError};
use super::{InboundQueue, Limits};

/// Pause after a failed `accept` (such as running out of file descriptors), so
/// the loop does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE_MS: u64 = 100;

pub(super) async fn accept_loop(
    listener: TcpListener,
    limits: Limits,
    inbound_connections_max: usize,
    queue: InboundQueue,
    counters: Arc<InboundCounters>,
) {
    let slots = Arc::new(Semaphore::new(inbound_connections_max));
    // Dropping the set (when this task is aborted) aborts every connection task.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        add(&counters.connections_refused, 1);
                        tracing::warn!(%remote, inbound_connections_max, "refused peer connection: too many inbound connections");
                        continue;
                    };
                    add(&counters.connections_accepted, 1);
                    let connection = Connection { remote, limits, queue: queue.clone(), counters: Arc::clone(&counters) };
                    connections.spawn(connection.serve(stream, slot));
                }
                Err(error) => {
                    tracing::warn!(%error, "accepting a peer connection failed");
                    tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_PAUSE_MS)).await;
                }
            },
            Some(finished) = connections.join_next(), if !connections.is_empty() => {
                if let Err(error) = finished {
                    if error.is_panic() {
                        // A bug, not bad input (bad input ends a connection with a
                        // log line). Crash: a replica with a half-dead transport
                        // would look alive but stop hearing its peers.
                        tracing::error!("peer connection task panicked; aborting");
                        std::process::abort();
                    }
                }
            }
        }
    }
}

struct Connection {
    remote: SocketAddr,
    limits: Limits,
    queue: InboundQueue,
    counters: Arc<InboundCounters>,
}

impl Connection {
    async fn serve(self, stream: TcpStream, _slot: OwnedSemaphorePermit) {
        let remote = self.remote;
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%remote, %error, "could not set TCP_NODELAY");
        }
        let (read_half, mut write_half) = stream.into_split();
        let mut reader = FrameReader::new(read_half, HELLO_BYTES as u32);
        let peer = match tokio::time::timeout(
            self.limits.handshake_timeout,
            self.handshake(&mut reader),
        )
        .await
        {
            Ok(Ok(hello)) => hello.node_id,
            Ok(Err(reason)) => {
                add(&self.counters.connections_refused, 1);
                tracing::warn!(%remote, "refused peer connection: {reason}");
                return;
            }
            Err(_) => {
                add(&self.counters.connections_refused, 1);
                tracing::warn!(%remote, handshake_timeout = ?self.limits.handshake_timeout, "refused peer connection: no hello in time");
                return;
            }
        };
        let mut reply = BytesMut::new();
        let hello = Hello {
            cluster_id: self.limits.cluster_id,
            node_id: self.limits.node_id,
        };
        encode_frame(
            &mut reply,
            PROTOCOL_VERSION,
            FrameKind::Hello,
            &hello.encode(),
        );
        let answered =
            tokio::time::timeout(self.limits.handshake_timeout, write_half.write_all(&reply)).await;
        if !matches!(answered, Ok(Ok(()))) {
            tracing::info!(%remote, peer, "peer connection lost during the handshake");
            return;
        }
        tracing::info!(%remote, peer, "inbound peer connection established");
        reader.set_frame_bytes_max(self.limits.frame_bytes_max);
        // `write_half` stays alive until the end: dropping it would half-close
        // the socket, which the peer takes for a lost connection.
        self.receive(peer, reader).await;
        drop(write_half);
    }

    async fn handshake(
        &self,
        reader: &mut FrameReader<tokio::net::tcp::OwnedReadHalf>,
    ) -> Result<Hello, String> {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return Err("closed before its hello".to_string()),
            Err(error) => return Err(error.to_string()),
        };
        if frame.kind != FrameKind::Hello {
            return Err(format!("first frame is {:?}, not a hello", frame.kind));
        }
        let Some(hello) = Hello::decode(&frame.payload) else {
            return Err(format!("hello of {} bytes", frame.payload.len()));
        };
        if hello.cluster_id != self.limits.cluster_id {
            return Err(format!(
                "node {} is in cluster {}, this node is in cluster {}",
                hello.node_id, hello.cluster_id, self.limits.cluster_id
            ));
        }
        if hello.node_id == self.limits.node_id {
            return Err(format!("peer claims this node's own id {}", hello.node_id));
        }
        Ok(hello)
    }

    async fn receive(&self, peer: u64, mut reader: FrameReader<tokio::net::tcp::OwnedReadHalf>) {
        let remote = self.remote;
        loop {
            let frame = match reader.next().await {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    tracing::info!(%remote, peer, "inbound peer connection closed by the peer");
                    return;
                }
                Err(ReadError::Io(error)) => {
                    tracing::info!(%remote, peer, %error, "inbound peer connection lost");
                    return;
                }
                Err(error) => {
                    add(&self.counters.connections_invalid, 1);
                    tracing::warn!(%remote, peer, "closed peer connection: {error}");
                    return;
                }
            };
            if frame.kind != FrameKind::Message {
                add(&self.counters.connections_invalid, 1);
                tracing::warn!(%remote, peer, "closed peer connection: {:?} frame after the handshake", frame.kind);
                return;
            }
            add(&self.counters.frames_received, 1);
            add(
                &self.counters.bytes_received,
                (super::frame::HEADER_BYTES + frame.payload.len()) as u64,
            );
            let payload_bytes =
                u32::try_from(frame.payload.len()).expect("payload within frame_bytes_max");
            // Waiting here, for budget or for room in the channel, is the backpressure.
            let Ok(budget) = Arc::clone(&self.queue.budget)
                .acquire_many_owned(payload_bytes)
                .await
            else {
                unreachable!("the inbound budget semaphore is never closed");
            };
            if self
                .queue
                .deliveries
                .send((peer, frame.payload, budget))
                .await
                .is_err()
            {
                // The receiver is gone: the node is shutting down.
                return;
            }
        }
    }
}
