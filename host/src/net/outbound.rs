//! The sending side: one task per peer owns that peer's queue and its one
//! outbound connection, dials with exponential backoff and jitter, and drains
//! the queue into coalesced writes.

use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::frame::{encode_frame, FrameKind, Hello, HEADER_BYTES, HELLO_BYTES, PROTOCOL_VERSION};
use super::metrics::{add, sub, PeerCounters};
use super::reader::FrameReader;
use super::{Limits, NodeId};

/// Why a connection stopped being used.
enum End {
    /// The peer was removed: the task ends.
    Removed,
    /// The peer's address changed: dial the new one at once.
    Moved,
    /// The connection failed: dial again after a backoff.
    Failed(anyhow::Error),
}

pub(super) async fn run_peer(
    peer: NodeId,
    limits: Limits,
    mut queue: mpsc::Receiver<Bytes>,
    mut addr: watch::Receiver<SocketAddr>,
    counters: Arc<PeerCounters>,
) {
    // Jitter only spreads reconnect storms; it needs no reproducibility, so the
    // OS-seeded hasher is a fine source (this is the runtime shell, not the core).
    let seed = RandomState::new().hash_one((limits.node_id, peer));
    let mut backoff = Backoff::new(limits.backoff_min_ms, limits.backoff_max_ms, seed);
    loop {
        let target = *addr.borrow_and_update();
        let dialed = tokio::select! {
            biased;
            changed = addr.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            dialed = dial(peer, target, &limits) => dialed,
        };
        let end = match dialed {
            Ok(stream) => {
                add(&counters.connects, 1);
                counters.connected.store(true, Ordering::Relaxed);
                tracing::info!(peer, addr = %target, "outbound peer connection established");
                let connected_at = Instant::now();
                let end = pump(stream, &mut queue, &mut addr, &limits, &counters).await;
                counters.connected.store(false, Ordering::Relaxed);
                // Only a connection that lasted counts as recovery: a peer that
                // accepts and drops at once keeps backing off (and logging less).
                if connected_at.elapsed() >= Duration::from_millis(limits.backoff_max_ms) {
                    backoff.reset();
                }
                end
            }
            Err(error) => {
                add(&counters.connect_failures, 1);
                End::Failed(error)
            }
        };
        match end {
            End::Removed => return,
            End::Moved => continue,
            End::Failed(error) => {
                let delay = backoff.next_delay();
                // The first failure after a working connection is news; repeated
                // failures of a peer that stays down are not.
                if backoff.attempts() == 1 {
                    tracing::warn!(peer, addr = %target, retry_in = ?delay, "peer connection failed: {error:#}");
                } else {
                    tracing::debug!(peer, addr = %target, retry_in = ?delay, "peer connection failed: {error:#}");
                }
                tokio::select! {
                    changed = addr.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Connects, sends our hello and checks the peer's answer: it must be the node
/// we meant, in our cluster, speaking our version.
async fn dial(peer: NodeId, target: SocketAddr, limits: &Limits) -> anyhow::Result<TcpStream> {
    let mut stream = tokio::time::timeout(limits.connect_timeout, TcpStream::connect(target))
        .await
        .map_err(|_| anyhow!("no connection within {:?}", limits.connect_timeout))?
        .context("connect")?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    let answer = tokio::time::timeout(limits.handshake_timeout, async {
        let mut hello = BytesMut::new();
        let ours = Hello {
            cluster_id: limits.cluster_id,
            node_id: limits.node_id,
        };
        encode_frame(
            &mut hello,
            PROTOCOL_VERSION,
            FrameKind::Hello,
            &ours.encode(),
        );
        stream.write_all(&hello).await.context("sending hello")?;
        let mut reader = FrameReader::new(&mut stream, HELLO_BYTES as u32);
        let frame = reader
            .next()
            .await
            .map_err(|error| anyhow!("reading the peer's hello: {error}"))?
            .ok_or_else(|| {
                anyhow!("peer closed the connection during the handshake (see its log for why)")
            })?;
        if reader.buffered_bytes() != 0 {
            bail!("peer sent data after its hello");
        }
        anyhow::Ok(frame)
    })
    .await
    .map_err(|_| anyhow!("no hello within {:?}", limits.handshake_timeout))??;
    let hello = (answer.kind == FrameKind::Hello)
        .then(|| Hello::decode(&answer.payload))
        .flatten()
        .ok_or_else(|| {
            anyhow!(
                "peer answered with a {:?} frame of {} bytes, not a hello",
                answer.kind,
                answer.payload.len()
            )
        })?;
    if hello.cluster_id != limits.cluster_id || hello.node_id != peer {
        bail!(
            "{target} is node {} of cluster {}, expected node {peer} of cluster {}",
            hello.node_id,
            hello.cluster_id,
            limits.cluster_id
        );
    }
    Ok(stream)
}

/// Drains the queue into the connection until it fails, the address changes
/// or the peer is removed. Each wake-up encodes every queued payload (up to
/// `write_coalesce_bytes_max`) into one buffer and writes it at once.
async fn pump(
    stream: TcpStream,
    queue: &mut mpsc::Receiver<Bytes>,
    addr: &mut watch::Receiver<SocketAddr>,
    limits: &Limits,
    counters: &PeerCounters,
) -> End {
    let (mut read_half, mut write_half) = stream.into_split();
    let mut out = BytesMut::new();
    // The peer never writes after its hello, so a readable socket means it
    // closed or broke the connection; watching for that notices a dead peer
    // before the next payload is lost to it.
    let mut probe = [0u8; 1];
    loop {
        let first = tokio::select! {
            biased;
            changed = addr.changed() => return if changed.is_ok() { End::Moved } else { End::Removed },
            read = read_half.read(&mut probe) => {
                return End::Failed(match read {
                    Ok(0) => anyhow!("peer closed the connection"),
                    Ok(_) => anyhow!("peer sent data after its hello"),
                    Err(error) => anyhow::Error::new(error).context("connection lost"),
                });
            }
            payload = queue.recv() => match payload {
                Some(payload) => payload,
                None => return End::Removed,
            },
        };
        let mut frames = 0u64;
        let mut payload_bytes = 0u64;
        let mut next = Some(first);
        while let Some(payload) = next.take() {
            encode_frame(&mut out, PROTOCOL_VERSION, FrameKind::Message, &payload);
            frames += 1;
            payload_bytes += payload.len() as u64;
            if out.len() < limits.write_coalesce_bytes_max {
                next = queue.try_recv().ok();
            }
        }
        sub(&counters.queue_bytes, payload_bytes);
        debug_assert_eq!(
            out.len() as u64,
            payload_bytes + frames * HEADER_BYTES as u64
        );
        let written = tokio::select! {
            biased;
            changed = addr.changed() => Err(if changed.is_ok() { End::Moved } else { End::Removed }),
            written = write_half.write_all(&out) => written.map_err(|error| End::Failed(anyhow::Error::new(error).context("writing"))),
        };
        if let Err(end) = written {
            add(&counters.frames_dropped, frames);
            return end;
        }
        add(&counters.frames_sent, frames);
        add(&counters.bytes_sent, out.len() as u64);
        add(&counters.writes, 1);
        out.clear();
        // One huge frame must not pin a huge buffer for the life of the connection.
        if out.capacity() > 2 * limits.write_coalesce_bytes_max {
            out = BytesMut::new();
        }
    }
}

/// Exponential backoff with jitter: the n-th consecutive failure waits a
/// uniformly drawn time in [ceiling/2, ceiling], ceiling = min(max, min * 2^n).
pub(super) struct Backoff {
    min_ms: u64,
    max_ms: u64,
    attempts: u32,
    rng: u64,
}

impl Backoff {
    pub fn new(min_ms: u64, max_ms: u64, seed: u64) -> Backoff {
        assert!(
            0 < min_ms && min_ms <= max_ms,
            "backoff bounds {min_ms}..{max_ms}"
        );
        Backoff {
            min_ms,
            max_ms,
            attempts: 0,
            rng: seed,
        }
    }

    pub fn reset(&mut self) {
        self.attempts = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    pub fn next_delay(&mut self) -> Duration {
        let doublings = self.attempts.min(63);
        let ceiling_ms = self
            .min_ms
            .checked_shl(doublings)
            .filter(|c| *c >> doublings == self.min_ms)
            .unwrap_or(u64::MAX)
            .min(self.max_ms);
        self.attempts = self.attempts.saturating_add(1);
        let floor_ms = ceiling_ms / 2;
        let delay_ms = floor_ms + self.next_random() % (ceiling_ms - floor_ms + 1);
        Duration::from_millis(delay_ms)
    }

    /// splitmix64: small, fast and good enough to spread retries.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_max() {
        let mut backoff = Backoff::new(10, 1_000, 42);
        let mut delays = Vec::new();
        for attempt in 0..12u32 {
            let ceiling = (10u64 << attempt).min(1_000);
            let delay = backoff.next_delay().as_millis() as u64;
            assert!(
                ceiling / 2 <= delay && delay <= ceiling,
                "attempt {attempt}: {delay} ms outside [{}, {ceiling}]",
                ceiling / 2
            );
            delays.push(delay);
        }
        assert_eq!(backoff.attempts(), 12);
        // Capped: the last attempts are all within [500, 1000].
        assert!(
            delays[8..].iter().all(|d| (500..=1_000).contains(d)),
            "{delays:?}"
        );
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(10));
    }

    #[test]
    fn backoff_survives_many_failures() {
        let mut backoff = Backoff::new(1, u64::MAX, 7);
        for _ in 0..200 {
            backoff.next_delay();
        }
        assert_eq!(backoff.attempts(), 200);
    }

    #[test]
    fn jitter_differs_between_seeds() {
        let draws = |seed| {
            let mut backoff = Backoff::new(1_000, 1_000, seed);
            (0..8).map(|_| backoff.next_delay()).collect::<Vec<_>>()
        };
        assert_ne!(draws(1), draws(2));
    }
}
