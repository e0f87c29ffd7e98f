//! Peer transport figures on loopback, 128-byte payloads:
//! `cargo bench -p paxwasm --bench net_transport`.
//!
//! Prints one-way throughput, pipelined round trips, and single round-trip
//! latency, each beside a baseline measured in the same run: plain tokio TCP
//! with the same 128-byte messages and no framing, queues or checksums.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use paxwasm::net::{InboundReceiver, SendError, Transport, TransportConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

const PAYLOAD_BYTES: usize = 128;
const ONE_WAY_MESSAGES: u64 = 2_000_000;
const PIPELINE_WINDOW: u64 = 64;
const PIPELINED_ROUND_TRIPS: u64 = 500_000;
const ROUND_TRIPS: usize = 20_000;
const CLUSTER: u64 = 1;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!("peer transport on loopback, {PAYLOAD_BYTES}-byte payloads, 2 tokio workers");
        one_way().await;
        pipelined().await;
        latency().await;
    });
}

async fn pair() -> ((Transport, InboundReceiver), (Transport, InboundReceiver)) {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let b = Transport::start(TransportConfig::new(2, CLUSTER, any))
        .await
        .unwrap();
    let a = Transport::start(TransportConfig {
        peers: BTreeMap::from([(2, b.0.local_addr())]),
        ..TransportConfig::new(1, CLUSTER, any)
    })
    .await
    .unwrap();
    b.0.update_peer(1, a.0.local_addr());
    (a, b)
}

/// Sends, pausing while the queue is full: a benchmark wants every message
/// through, where a replica would let Paxos retransmit instead. The pause is
/// short against the time the transport needs to drain a full queue.
async fn send_all(transport: &Transport, to: u64, payload: &Bytes) -> u64 {
    let mut full = 0;
    loop {
        match transport.send(to, payload.clone()) {
            Ok(()) => return full,
            Err(SendError::QueueFull(_)) => {
                full += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(other) => panic!("{other}"),
        }
    }
}

async fn one_way() {
    let ((a, _a_in), (_b, mut b_in)) = pair().await;
    let payload = Bytes::from(vec![7u8; PAYLOAD_BYTES]);
    let started = Instant::now();
    let receiving = tokio::spawn(async move {
        for _ in 0..ONE_WAY_MESSAGES {
            b_in.recv().await.unwrap();
        }
    });
    let mut queue_full = 0;
    for _ in 0..ONE_WAY_MESSAGES {
        queue_full += send_all(&a, 2, &payload).await;
    }
    receiving.await.unwrap();
    let elapsed = started.elapsed();
    let peer = &a.metrics().peers[&2];
    let baseline = raw_one_way().await;
    let rate = ONE_WAY_MESSAGES as f64 / elapsed.as_secs_f64();
    println!(
        "one way:   {:>10.0} msg/s ({:.0} MB/s of payload), {:.1} frames per write, queue full {queue_full} times; raw TCP {:>10.0} msg/s; ratio {:.2}",
        rate,
        rate * PAYLOAD_BYTES as f64 / 1e6,
        peer.frames_sent as f64 / peer.writes as f64,
        baseline,
        rate / baseline
    );
}

async fn pipelined() {
    let ((a, mut a_in), (b, mut b_in)) = pair().await;
    let echo = tokio::spawn(async move {
        while let Some((from, payload)) = b_in.recv().await {
            send_all(&b, from, &payload).await;
        }
    });
    let payload = Bytes::from(vec![7u8; PAYLOAD_BYTES]);
    let started = Instant::now();
    for _ in 0..PIPELINE_WINDOW {
        send_all(&a, 2, &payload).await;
    }
    for done in 1..=PIPELINED_ROUND_TRIPS {
        a_in.recv().await.unwrap();
        if done + PIPELINE_WINDOW <= PIPELINED_ROUND_TRIPS {
            send_all(&a, 2, &payload).await;
        }
    }
    let rate = PIPELINED_ROUND_TRIPS as f64 / started.elapsed().as_secs_f64();
    echo.abort();
    let baseline = raw_pipelined().await;
    println!(
        "pipelined: {:>10.0} round trips/s with {PIPELINE_WINDOW} in flight; raw TCP (one write per message) {:>10.0}/s; ratio {:.2}",
        rate,
        baseline,
        rate / baseline
    );
}

async fn latency() {
    let ((a, mut a_in), (b, mut b_in)) = pair().await;
    let echo = tokio::spawn(async move {
        while let Some((from, payload)) = b_in.recv().await {
            b.send(from, payload).unwrap();
        }
    });
    let payload = Bytes::from(vec![7u8; PAYLOAD_BYTES]);
    // Warm up: connections dialed, caches and branch predictors settled.
    for _ in 0..1_000 {
        a.send(2, payload.clone()).unwrap();
        a_in.recv().await.unwrap();
    }
    let mut samples = Vec::with_capacity(ROUND_TRIPS);
    for _ in 0..ROUND_TRIPS {
        let started = Instant::now();
        a.send(2, payload.clone()).unwrap();
        a_in.recv().await.unwrap();
        samples.push(started.elapsed());
    }
    echo.abort();
    let baseline = raw_latency().await;
    let (p50, p99, p999) = percentiles(&mut samples);
    let (raw50, raw99, raw999) = percentiles(&mut baseline.clone());
    println!(
        "round trip: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us; raw TCP p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us; p50 ratio {:.2}",
        micros(p50),
        micros(p99),
        micros(p999),
        micros(raw50),
        micros(raw99),
        micros(raw999),
        micros(p50) / micros(raw50)
    );
}

fn percentiles(samples: &mut [Duration]) -> (Duration, Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.50), at(0.99), at(0.999))
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

/// Two connected sockets with TCP_NODELAY, like the transport's.
async fn raw_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    (client, server)
}

/// Plain TCP: the sender writes 128-byte messages in batches of 512 (what the
/// transport's coalescing achieves at best), the receiver reads them all.
async fn raw_one_way() -> f64 {
    const BATCH: usize = 512;
    let (mut client, mut server) = raw_pair().await;
    let total_bytes = ONE_WAY_MESSAGES as usize * PAYLOAD_BYTES;
    let started = Instant::now();
    let receiving = tokio::spawn(async move {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut received = 0;
        while received < total_bytes {
            received += server.read(&mut buffer).await.unwrap();
        }
    });
    let batch = vec![7u8; PAYLOAD_BYTES * BATCH];
    let mut sent = 0;
    while sent < total_bytes {
        let n = batch.len().min(total_bytes - sent);
        client.write_all(&batch[..n]).await.unwrap();
        sent += n;
    }
    receiving.await.unwrap();
    ONE_WAY_MESSAGES as f64 / started.elapsed().as_secs_f64()
}

async fn raw_echo(mut server: TcpStream) {
    let mut message = [0u8; PAYLOAD_BYTES];
    while server.read_exact(&mut message).await.is_ok() {
        if server.write_all(&message).await.is_err() {
            return;
        }
    }
}

/// Plain TCP with the same window of requests in flight, one write per message.
async fn raw_pipelined() -> f64 {
    let (client, server) = raw_pair().await;
    let echo = tokio::spawn(raw_echo(server));
    let (mut reader, mut writer) = client.into_split();
    let window = Arc::new(Semaphore::new(PIPELINE_WINDOW as usize));
    let started = Instant::now();
    let writing = tokio::spawn({
        let window = Arc::clone(&window);
        async move {
            let message = [7u8; PAYLOAD_BYTES];
            for _ in 0..PIPELINED_ROUND_TRIPS {
                window.acquire().await.unwrap().forget();
                writer.write_all(&message).await.unwrap();
            }
            writer
        }
    });
    let mut message = [0u8; PAYLOAD_BYTES];
    for _ in 0..PIPELINED_ROUND_TRIPS {
        reader.read_exact(&mut message).await.unwrap();
        window.add_permits(1);
    }
    let rate = PIPELINED_ROUND_TRIPS as f64 / started.elapsed().as_secs_f64();
    drop(writing.await.unwrap());
    echo.abort();
    rate
}

async fn raw_latency() -> Vec<Duration> {
    let (mut client, server) = raw_pair().await;
    let echo = tokio::spawn(raw_echo(server));
    let mut message = [7u8; PAYLOAD_BYTES];
    for _ in 0..1_000 {
        client.write_all(&message).await.unwrap();
        client.read_exact(&mut message).await.unwrap();
    }
    let mut samples = Vec::with_capacity(ROUND_TRIPS);
    for _ in 0..ROUND_TRIPS {
        let started = Instant::now();
        client.write_all(&message).await.unwrap();
        client.read_exact(&mut message).await.unwrap();
        samples.push(started.elapsed());
    }
    echo.abort();
    samples
}
