//! The peer transport over real sockets on 127.0.0.1 (port 0 everywhere).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use paxwasm::net::frame::{
    encode_frame, FrameDecoder, FrameKind, Hello, HEADER_BYTES, HELLO_BYTES, MAGIC,
    PROTOCOL_VERSION,
};
use paxwasm::net::{
    Codec, Inbound, InboundReceiver, NodeId, SendError, Transport, TransportConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLUSTER: u64 = 0x5eed;
/// Upper bound for anything the tests wait on; a healthy run needs milliseconds.
const WAIT: Duration = Duration::from_secs(10);

fn config(node_id: NodeId) -> TransportConfig {
    TransportConfig {
        backoff_min_ms: 5,
        backoff_max_ms: 100,
        ..TransportConfig::new(node_id, CLUSTER, "127.0.0.1:0".parse().unwrap())
    }
}

async fn start(config: TransportConfig) -> (Transport, InboundReceiver) {
    // Shows the transport's log lines in failing tests (and with --nocapture).
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_ansi(false)
        .try_init();
    Transport::start(config).await.expect("transport starts")
}

/// Starts transports 1..=n, then points each at all the others.
async fn cluster(n: u64) -> Vec<(Transport, InboundReceiver)> {
    let mut nodes = Vec::new();
    for id in 1..=n {
        nodes.push(start(config(id)).await);
    }
    let addrs: BTreeMap<NodeId, SocketAddr> = nodes
        .iter()
        .map(|(t, _)| (t.node_id(), t.local_addr()))
        .collect();
    for (transport, _) in &nodes {
        let mut others = addrs.clone();
        others.remove(&transport.node_id());
        transport.set_peers(others);
    }
    nodes
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn recv(inbound: &mut InboundReceiver) -> Inbound {
    within("a message", inbound.recv())
        .await
        .expect("inbound channel open")
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

fn numbered(n: u64, payload_bytes: usize) -> Bytes {
    let mut payload = BytesMut::with_capacity(payload_bytes);
    payload.put_u64(n);
    payload.resize(payload_bytes, 0xa5);
    payload.freeze()
}

fn number_of(payload: &[u8]) -> u64 {
    u64::from_be_bytes(payload[..8].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_transports_exchange_messages_in_every_direction() {
    let mut nodes = cluster(3).await;
    for (transport, _) in &nodes {
        for to in 1..=3 {
            if to != transport.node_id() {
                let payload = format!("{} to {to}", transport.node_id());
                transport.send(to, Bytes::from(payload)).unwrap();
            }
        }
    }
    for (transport, inbound) in &mut nodes {
        let me = transport.node_id();
        let mut got = vec![recv(inbound).await, recv(inbound).await];
        got.sort();
        let expected: Vec<Inbound> = (1..=3)
            .filter(|from| *from != me)
            .map(|from| (from, Bytes::from(format!("{from} to {me}"))))
            .collect();
        assert_eq!(got, expected, "node {me}");
    }
    for (transport, _) in &nodes {
        // A frame counts as sent once its write returns, which may be after it arrived.
        eventually("the sent counters", || {
            transport.metrics().frames_sent() == 2
        })
        .await;
        let metrics = transport.metrics();
        assert_eq!(metrics.frames_received, 2);
        assert_eq!(metrics.frames_sent(), 2);
        assert_eq!(metrics.frames_dropped(), 0);
        assert_eq!(metrics.peers.len(), 2);
        assert!(metrics
            .peers
            .values()
            .all(|p| p.connected && p.connects == 1 && p.reconnects() == 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_on_one_connection_arrive_in_order() {
    const COUNT: u64 = 20_000;
    let (receiver, mut inbound) = start(config(2)).await;
    let (sender, _) = start(TransportConfig {
        queue_frames_max: COUNT as usize,
        peers: BTreeMap::from([(2, receiver.local_addr())]),
        ..config(1)
    })
    .await;
    for n in 0..COUNT {
        sender.send(2, numbered(n, 128)).unwrap();
    }
    for n in 0..COUNT {
        let (from, payload) = recv(&mut inbound).await;
        assert_eq!((from, number_of(&payload), payload.len()), (1, n, 128));
    }
    eventually("the sent counter", || {
        sender.metrics().peers[&2].frames_sent == COUNT
    })
    .await;
    let sent = &sender.metrics().peers[&2];
    assert_eq!(
        (
            sent.frames_sent,
            sent.frames_dropped,
            sent.queue_frames,
            sent.queue_bytes
        ),
        (COUNT, 0, 0, 0)
    );
    assert_eq!(sent.bytes_sent, COUNT * (HEADER_BYTES as u64 + 128));
    assert_eq!(receiver.metrics().bytes_received, sent.bytes_sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_reconnected_and_gets_what_was_queued_meanwhile() {
    let (receiver, mut inbound) = start(config(2)).await;
    let receiver_addr = receiver.local_addr();
    let (sender, _) = start(TransportConfig {
        peers: BTreeMap::from([(2, receiver_addr)]),
        ..config(1)
    })
    .await;
    sender.send(2, Bytes::from_static(b"before")).unwrap();
    assert_eq!(recv(&mut inbound).await, (1, Bytes::from_static(b"before")));

    receiver.shutdown().await;
    drop(inbound);
    eventually("the sender to notice the peer is gone", || {
        !sender.metrics().peers[&2].connected
    })
    .await;
    sender.send(2, Bytes::from_static(b"while down")).unwrap();
    assert_eq!(sender.metrics().peers[&2].queue_frames, 1);
    eventually("a failed dial", || {
        sender.metrics().peers[&2].connect_failures >= 1
    })
    .await;

    let (_restarted, mut inbound) = start(TransportConfig {
        listen: receiver_addr,
        ..config(2)
    })
    .await;
    assert_eq!(
        recv(&mut inbound).await,
        (1, Bytes::from_static(b"while down"))
    );
    sender.send(2, Bytes::from_static(b"after")).unwrap();
    assert_eq!(recv(&mut inbound).await, (1, Bytes::from_static(b"after")));
    eventually("the sent counter", || {
        sender.metrics().peers[&2].frames_sent == 3
    })
    .await;
    let peer = &sender.metrics().peers[&2];
    assert_eq!(
        (
            peer.connects,
            peer.reconnects(),
            peer.frames_sent,
            peer.frames_dropped
        ),
        (2, 1, 3, 0)
    );
}

/// A raw TCP client that speaks (or breaks) the protocol by hand.
struct RawPeer {
    stream: TcpStream,
}

impl RawPeer {
    async fn connect(addr: SocketAddr) -> RawPeer {
        RawPeer {
            stream: TcpStream::connect(addr).await.unwrap(),
        }
    }

    async fn send_hello(&mut self, version: u16, hello: Hello) {
        let mut bytes = BytesMut::new();
        encode_frame(&mut bytes, version, FrameKind::Hello, &hello.encode());
        self.stream.write_all(&bytes).await.unwrap();
    }

    /// Sends a good hello and reads the transport's answer.
    async fn handshake(addr: SocketAddr, node_id: NodeId) -> RawPeer {
        let mut peer = RawPeer::connect(addr).await;
        peer.send_hello(
            PROTOCOL_VERSION,
            Hello {
                cluster_id: CLUSTER,
                node_id,
            },
        )
        .await;
        let mut answer = BytesMut::zeroed(HEADER_BYTES + HELLO_BYTES);
        within("the hello answer", peer.stream.read_exact(&mut answer))
            .await
            .unwrap();
        let frame = FrameDecoder::new(64).decode(&mut answer).unwrap().unwrap();
        assert_eq!(frame.kind, FrameKind::Hello);
        assert_eq!(Hello::decode(&frame.payload).unwrap().cluster_id, CLUSTER);
        peer
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Waits for the transport to close the connection, with nothing more sent.
    async fn assert_closed(mut self, case: &str) {
        let mut rest = Vec::new();
        match within(case, self.stream.read_to_end(&mut rest)).await {
            Ok(_) => assert!(rest.is_empty(), "{case}: got {rest:?} before the close"),
            // Closing with our bytes still unread makes the kernel send a reset.
            Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{case}"),
        }
    }
}

fn message_frame(payload: &[u8]) -> BytesMut {
    let mut bytes = BytesMut::new();
    encode_frame(&mut bytes, PROTOCOL_VERSION, FrameKind::Message, payload);
    bytes
}

/// A case name, the hello to send (version and contents) if any, then raw bytes.
type HandshakeCase<'a> = (&'a str, Option<(u16, Hello)>, &'a [u8]);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_are_refused_and_the_transport_keeps_working() {
    let (transport, mut inbound) = start(config(2)).await;
    let addr = transport.local_addr();
    let hello = |cluster_id, node_id| Hello {
        cluster_id,
        node_id,
    };
    let cases: [HandshakeCase; 6] = [
        (
            "http instead of frames",
            None,
            b"GET /v1/status HTTP/1.1\r\n\r\n",
        ),
        ("message before hello", None, &message_frame(b"hi")),
        (
            "another cluster id",
            Some((PROTOCOL_VERSION, hello(CLUSTER + 1, 7))),
            b"",
        ),
        (
            "another protocol version",
            Some((PROTOCOL_VERSION + 1, hello(CLUSTER, 7))),
            b"",
        ),
        (
            "this node's own id",
            Some((PROTOCOL_VERSION, hello(CLUSTER, 2))),
            b"",
        ),
        ("hello of the wrong size", None, &{
            let mut bytes = BytesMut::new();
            encode_frame(
                &mut bytes,
                PROTOCOL_VERSION,
                FrameKind::Hello,
                &[0u8; HELLO_BYTES + 1],
            );
            bytes
        }),
    ];
    for (case, hello, raw) in cases {
        let mut peer = RawPeer::connect(addr).await;
        if let Some((version, hello)) = hello {
            peer.send_hello(version, hello).await;
        }
        peer.send_raw(raw).await;
        peer.assert_closed(case).await;
    }
    // A connection that never says hello is closed after handshake_timeout_ms.
    let (quick, _) = start(TransportConfig {
        handshake_timeout_ms: 50,
        ..config(3)
    })
    .await;
    RawPeer::connect(quick.local_addr())
        .await
        .assert_closed("silent peer")
        .await;
    assert_eq!(quick.metrics().connections_refused, 1);

    let metrics = transport.metrics();
    assert_eq!(
        (
            metrics.connections_accepted,
            metrics.connections_refused,
            metrics.connections_invalid
        ),
        (6, 6, 0)
    );
    assert_good_peer_still_delivers(&transport, &mut inbound).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_after_the_handshake_close_only_that_connection() {
    let (transport, mut inbound) = start(TransportConfig {
        frame_bytes_max: 1024,
        ..config(2)
    })
    .await;
    let addr = transport.local_addr();
    let corrupt = {
        let mut bytes = message_frame(b"checksummed payload");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        bytes
    };
    let oversized = {
        // Claims 4 GiB - 1 and sends nothing more: refused on the header alone.
        let mut bytes = BytesMut::new();
        bytes.put_slice(&MAGIC);
        bytes.put_u16(PROTOCOL_VERSION);
        bytes.put_u16(2);
        bytes.put_u32(u32::MAX);
        bytes.put_u32(0);
        bytes
    };
    let just_over_the_limit = message_frame(&[1u8; 1025]);
    let unknown_kind = {
        let mut bytes = message_frame(b"x");
        bytes[7] = 9;
        bytes
    };
    let second_hello = {
        let mut bytes = BytesMut::new();
        encode_frame(
            &mut bytes,
            PROTOCOL_VERSION,
            FrameKind::Hello,
            &Hello {
                cluster_id: CLUSTER,
                node_id: 7,
            }
            .encode(),
        );
        bytes
    };
    let truncated = message_frame(b"cut short")[..HEADER_BYTES + 3].to_vec();
    let cases: [(&str, &[u8]); 6] = [
        ("bad checksum", &corrupt),
        ("oversized length", &oversized),
        ("one byte over frame_bytes_max", &just_over_the_limit),
        ("unknown kind", &unknown_kind),
        ("second hello", &second_hello),
        ("garbage", b"\x00\x01\x02\x03 definitely not a frame"),
    ];
    for (n, (case, bad)) in cases.into_iter().enumerate() {
        let mut peer = RawPeer::handshake(addr, 7).await;
        // A good frame first: it is delivered, the bad one after it is not.
        let good = format!("good before {case}");
        peer.send_raw(&message_frame(good.as_bytes())).await;
        peer.send_raw(bad).await;
        peer.assert_closed(case).await;
        assert_eq!(recv(&mut inbound).await, (7, Bytes::from(good)), "case {n}");
    }
    // A peer that closes inside a frame.
    let mut peer = RawPeer::handshake(addr, 7).await;
    peer.send_raw(&truncated).await;
    drop(peer);

    eventually("the truncated frame to be counted", || {
        transport.metrics().connections_invalid == 7
    })
    .await;
    let metrics = transport.metrics();
    assert_eq!(
        (
            metrics.connections_accepted,
            metrics.connections_refused,
            metrics.frames_received
        ),
        (7, 0, 6)
    );
    assert!(
        inbound.try_recv().is_err(),
        "nothing from a bad frame reached the channel"
    );
    assert_good_peer_still_delivers(&transport, &mut inbound).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_connections_beyond_the_limit_are_closed_at_accept() {
    let (transport, mut inbound) = start(TransportConfig {
        inbound_connections_max: 1,
        ..config(2)
    })
    .await;
    let addr = transport.local_addr();
    let mut first = RawPeer::handshake(addr, 7).await;
    RawPeer::connect(addr)
        .await
        .assert_closed("second connection")
        .await;
    first.send_raw(&message_frame(b"first still works")).await;
    assert_eq!(
        recv(&mut inbound).await,
        (7, Bytes::from_static(b"first still works"))
    );
    drop(first);
    // The slot is free again once the first connection's task has ended.
    eventually("a free slot", || {
        transport.metrics().connections_accepted == 1
    })
    .await;
    let metrics = transport.metrics();
    assert_eq!(
        (metrics.connections_accepted, metrics.connections_refused),
        (1, 1)
    );
    within("the slot to be free", async {
        loop {
            let mut peer = RawPeer::connect(addr).await;
            peer.send_hello(
                PROTOCOL_VERSION,
                Hello {
                    cluster_id: CLUSTER,
                    node_id: 8,
                },
            )
            .await;
            let mut answer = [0u8; HEADER_BYTES + HELLO_BYTES];
            if peer.stream.read_exact(&mut answer).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

async fn assert_good_peer_still_delivers(transport: &Transport, inbound: &mut InboundReceiver) {
    let (good, _) = start(TransportConfig {
        peers: BTreeMap::from([(transport.node_id(), transport.local_addr())]),
        ..config(9)
    })
    .await;
    good.send(transport.node_id(), Bytes::from_static(b"still here"))
        .unwrap();
    assert_eq!(recv(inbound).await, (9, Bytes::from_static(b"still here")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dialer_refuses_a_peer_of_another_cluster_or_the_wrong_node() {
    let (other_cluster, _) = start(TransportConfig {
        cluster_id: CLUSTER + 1,
        ..config(2)
    })
    .await;
    let (wrong_node, _) = start(config(3)).await;
    // Node 1 believes node 2 is at the other cluster's address, and node 4 at node 3's.
    let (dialer, _) = start(TransportConfig {
        peers: BTreeMap::from([
            (2, other_cluster.local_addr()),
            (4, wrong_node.local_addr()),
        ]),
        ..config(1)
    })
    .await;
    dialer.send(2, Bytes::from_static(b"never")).unwrap();
    dialer.send(4, Bytes::from_static(b"never")).unwrap();
    eventually("repeated refusals", || {
        dialer
            .metrics()
            .peers
            .values()
            .all(|p| p.connect_failures >= 3)
    })
    .await;
    let metrics = dialer.metrics();
    for peer in metrics.peers.values() {
        assert_eq!(
            (
                peer.connects,
                peer.connected,
                peer.frames_sent,
                peer.queue_frames
            ),
            (0, false, 0, 1),
            "{peer:?}"
        );
    }
    assert!(other_cluster.metrics().connections_refused >= 3);
    assert_eq!(other_cluster.metrics().frames_received, 0);
    assert_eq!(wrong_node.metrics().frames_received, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_bounds_the_queue_and_counts_drops() {
    /// Enough to fill any loopback socket buffers many times over (200 MB).
    const ATTEMPTS_MAX: u64 = 200_000;
    const STALLED_ROUNDS: u64 = 20;
    const PAYLOAD_BYTES: usize = 1024;
    const QUEUE_FRAMES_MAX: usize = 64;
    const QUEUE_BYTES_MAX: usize = 48 * 1024;
    const INBOUND_FRAMES_MAX: usize = 16;
    // The byte budget binds first: 8 payloads of 1 KiB.
    const INBOUND_BYTES_MAX: usize = 8 * PAYLOAD_BYTES;
    let (receiver, mut inbound) = start(TransportConfig {
        frame_bytes_max: PAYLOAD_BYTES as u32,
        inbound_frames_max: INBOUND_FRAMES_MAX,
        inbound_bytes_max: INBOUND_BYTES_MAX,
        ..config(2)
    })
    .await;
    let (sender, _) = start(TransportConfig {
        queue_frames_max: QUEUE_FRAMES_MAX,
        queue_bytes_max: QUEUE_BYTES_MAX,
        frame_bytes_max: PAYLOAD_BYTES as u32,
        peers: BTreeMap::from([(2, receiver.local_addr())]),
        ..config(1)
    })
    .await;
    eventually("the connection", || sender.metrics().peers[&2].connected).await;

    // Offer payloads in rounds of 64 with a pause between, a pace the writer
    // keeps up with, until the path to the consumer is full: the sent counter
    // stops moving for STALLED_ROUNDS rounds while payloads keep being offered.
    let mut attempts = 0u64;
    let mut refused = 0u64;
    let mut stalled_rounds = 0;
    let mut sent_before = 0;
    while stalled_rounds < STALLED_ROUNDS {
        assert!(
            attempts < ATTEMPTS_MAX,
            "the path never filled: {:?}",
            sender.metrics()
        );
        for _ in 0..64 {
            match sender.send(2, numbered(attempts, PAYLOAD_BYTES)) {
                Ok(()) => {}
                Err(SendError::QueueFull(2)) => refused += 1,
                Err(other) => panic!("unexpected {other}"),
            }
            attempts += 1;
        }
        let peer = &sender.metrics().peers[&2];
        assert!(peer.queue_frames <= QUEUE_FRAMES_MAX as u64, "{peer:?}");
        assert!(peer.queue_bytes <= QUEUE_BYTES_MAX as u64, "{peer:?}");
        let held = receiver.metrics();
        assert!(held.inbound_queue_bytes <= INBOUND_BYTES_MAX as u64);
        assert!(held.inbound_queue_frames <= INBOUND_FRAMES_MAX as u64);
        stalled_rounds = if peer.frames_sent == sent_before {
            stalled_rounds + 1
        } else {
            0
        };
        sent_before = peer.frames_sent;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let peer = &sender.metrics().peers[&2];
    // Every round while stalled dropped what the full queue could not take.
    assert!(
        refused >= STALLED_ROUNDS * 16,
        "only {refused} of {attempts} dropped"
    );
    assert_eq!(peer.frames_dropped, refused, "every drop is counted once");
    // The rest wait in the queue or in the write that the stalled peer blocks.
    let accepted = attempts - refused;
    assert!(
        peer.frames_sent < accepted,
        "accepted frames still wait while the consumer sleeps: {peer:?}"
    );

    eventually("the inbound budget to fill", || {
        let held = receiver.metrics();
        (held.inbound_queue_frames, held.inbound_queue_bytes) == (8, INBOUND_BYTES_MAX as u64)
    })
    .await;

    // Now the consumer catches up: everything accepted arrives, in order, with
    // gaps exactly where drops were counted.
    let mut last = None;
    for _ in 0..accepted {
        let (from, payload) = recv(&mut inbound).await;
        let n = number_of(&payload);
        assert!(
            from == 1 && last.is_none_or(|last| n > last),
            "{n} after {last:?}"
        );
        last = Some(n);
    }
    eventually("the sent counter", || {
        sender.metrics().peers[&2].frames_sent == accepted
    })
    .await;
    assert!(
        inbound.try_recv().is_err(),
        "nothing beyond what was accepted"
    );
    let peer = &sender.metrics().peers[&2];
    assert_eq!(
        (peer.frames_dropped, peer.queue_frames, peer.queue_bytes),
        (refused, 0, 0)
    );
    let held = receiver.metrics();
    assert_eq!(
        (
            held.frames_received,
            held.inbound_queue_frames,
            held.inbound_queue_bytes
        ),
        (accepted, 0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_move_and_remove_peers() {
    let (first, mut first_inbound) = start(config(2)).await;
    let (second, mut second_inbound) = start(config(2)).await;
    let (sender, _) = start(TransportConfig {
        peers: BTreeMap::from([(2, first.local_addr())]),
        ..config(1)
    })
    .await;
    sender
        .send(2, Bytes::from_static(b"to the first address"))
        .unwrap();
    assert_eq!(
        recv(&mut first_inbound).await.1,
        Bytes::from_static(b"to the first address")
    );

    // Node 2 moves to another host; the same address again changes nothing.
    sender.update_peer(2, second.local_addr());
    sender.update_peer(2, second.local_addr());
    // Membership changes may come from a thread outside the runtime.
    std::thread::scope(|scope| {
        scope.spawn(|| sender.update_peer(3, first.local_addr()));
    });
    assert_eq!(sender.peers().len(), 2);
    sender.remove_peer(3);
    sender
        .send(2, Bytes::from_static(b"to the second address"))
        .unwrap();
    assert_eq!(
        recv(&mut second_inbound).await.1,
        Bytes::from_static(b"to the second address")
    );
    assert_eq!(sender.peers(), BTreeMap::from([(2, second.local_addr())]));
    assert_eq!(sender.metrics().peers[&2].connects, 2);

    sender.set_peers(BTreeMap::new());
    assert_eq!(
        sender.send(2, Bytes::from_static(b"gone")),
        Err(SendError::UnknownPeer(2))
    );
    assert!(sender.metrics().peers.is_empty());
    assert!(!sender.remove_peer(2));
}

/// A typed codec as the node wiring will plug in: here, u64 counters.
struct Counter;

impl Codec for Counter {
    type Message = u64;
    type Error = String;
    fn encode(&self, message: &u64) -> Bytes {
        Bytes::copy_from_slice(&message.to_be_bytes())
    }
    fn decode(&self, payload: Bytes) -> Result<u64, String> {
        let bytes: [u8; 8] = payload[..]
            .try_into()
            .map_err(|_| format!("{} bytes", payload.len()))?;
        Ok(u64::from_be_bytes(bytes))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_messages_travel_through_a_codec() {
    let mut nodes = cluster(2).await;
    nodes[0].0.send_message(&Counter, 2, &42).unwrap();
    let (from, payload) = recv(&mut nodes[1].1).await;
    assert_eq!((from, Counter.decode(payload)), (1, Ok(42)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_refuses_what_it_cannot_carry() {
    let (transport, _) = start(TransportConfig {
        frame_bytes_max: 8,
        ..config(1)
    })
    .await;
    transport.update_peer(2, "127.0.0.1:9".parse().unwrap());
    assert_eq!(
        transport.send(1, Bytes::new()),
        Err(SendError::UnknownPeer(1))
    );
    assert_eq!(
        transport.send(3, Bytes::new()),
        Err(SendError::UnknownPeer(3))
    );
    assert_eq!(
        transport.send(2, Bytes::from_static(b"nine byte")),
        Err(SendError::TooLarge {
            payload_bytes: 9,
            frame_bytes_max: 8
        })
    );
    assert_eq!(transport.send(2, Bytes::from_static(b"eight by")), Ok(()));
    assert_eq!(transport.metrics().frames_dropped(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_is_an_error() {
    let bad = [
        TransportConfig {
            backoff_min_ms: 200,
            backoff_max_ms: 100,
            ..config(1)
        },
        TransportConfig {
            queue_frames_max: 0,
            ..config(1)
        },
        TransportConfig {
            inbound_bytes_max: 1024,
            ..config(1)
        },
        TransportConfig {
            queue_bytes_max: 10,
            frame_bytes_max: 11,
            ..config(1)
        },
        TransportConfig {
            peers: BTreeMap::from([(1, "127.0.0.1:1".parse().unwrap())]),
            ..config(1)
        },
    ];
    for config in bad {
        assert!(
            Transport::start(config.clone()).await.is_err(),
            "{config:?}"
        );
    }
}
