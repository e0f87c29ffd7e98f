use super::*;
use crate::paxos::SplitMix64;

fn ballot(round: u64, node: u64) -> Ballot {
    Ballot { round, node }
}

fn batch() -> Value {
    Value::Batch(std::sync::Arc::new(Batch {
        commands: vec![
            Command {
                payload: b"put a 1".to_vec(),
                idempotency_key: Some(IdempotencyKey { client: 7, seq: 9 }),
                origin: Origin {
                    node: 2,
                    request: 41,
                },
            },
            Command {
                payload: vec![0, 255, 3],
                idempotency_key: None,
                origin: Origin {
                    node: 3,
                    request: u64::MAX,
                },
            },
        ],
        timestamp_ms: 1_700_000_000_000,
        seed: 0xDEAD_BEEF,
    }))
}

fn entry(chosen: bool) -> LogEntry {
    LogEntry {
        ballot: ballot(4, 1),
        value: batch(),
        chosen,
    }
}

/// One of every message, with non-trivial field values.
fn every_message() -> Vec<WireMessage> {
    let msgs = vec![
        Message::PreVote { round: 3 },
        Message::PreVoteReply {
            round: 3,
            granted: true,
            promised: ballot(2, 3),
        },
        Message::Prepare {
            ballot: ballot(5, 2),
            first_slot: 17,
        },
        Message::Promise {
            ballot: ballot(5, 2),
            first_slot: 17,
            entries: vec![
                (17, entry(true)),
                (
                    18,
                    LogEntry {
                        ballot: ballot(1, 1),
                        value: Value::Noop,
                        chosen: false,
                    },
                ),
            ],
        },
        Message::Reject {
            promised: ballot(9, 3),
        },
        Message::Accept {
            ballot: ballot(5, 2),
            slot: 19,
            value: batch(),
            chosen_index: 18,
        },
        Message::Accepted {
            ballot: ballot(5, 2),
            slot: 19,
        },
        Message::Heartbeat {
            ballot: ballot(5, 2),
            seq: 100,
            chosen_index: 19,
        },
        Message::HeartbeatAck {
            ballot: ballot(5, 2),
            seq: 100,
            chosen_index: 12,
        },
        Message::Chosen {
            ballot: ballot(5, 2),
            entries: vec![(13, Value::Noop), (14, batch())],
            chosen_index: 19,
        },
        Message::Learned {
            ballot: ballot(5, 2),
            chosen_index: 14,
        },
        Message::Forward {
            command: Command {
                payload: vec![1; 300],
                idempotency_key: None,
                origin: Origin {
                    node: 3,
                    request: 5,
                },
            },
        },
    ];
    let mut all: Vec<WireMessage> = msgs.into_iter().map(WireMessage::Paxos).collect();
    all.push(WireMessage::Info(PeerInfo {
        http: "127.0.0.1:7001".into(),
        peer: "127.0.0.1:7101".into(),
        chosen_index: 44,
        applied_index: 43,
        apply_rules_max: Some(2),
    }));
    all.push(WireMessage::Checkpoint(checkpoint_report()));
    all.push(WireMessage::Result(CommandResult {
        request: 77,
        slot: 912,
        result: b"\x00OK".to_vec(),
    }));
    let id = crate::node::snapshot::SnapshotId {
        slot: 900,
        sha256: [0x5A; 32],
        file_bytes: 1 << 33,
    };
    for transfer in [
        TransferMessage::Request { slot_min: 12 },
        TransferMessage::Offer { id },
        TransferMessage::Fetch {
            id,
            offset: 262_144,
            resend: true,
        },
        TransferMessage::Chunk {
            id,
            offset: 524_288,
            data: (0..=255).collect(),
        },
        TransferMessage::Gone { id },
    ] {
        all.push(WireMessage::Transfer(transfer));
    }
    all
}

fn checkpoint_report() -> CheckpointReport {
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = 0xA0 ^ i as u8;
    }
    CheckpointReport { index: 4000, hash }
}

#[test]
fn checkpoint_reports_round_trip_with_their_exact_layout() {
    let report = checkpoint_report();
    let bytes = encode_wire(&WireMessage::Checkpoint(report));
    let mut expected = vec![WIRE_VERSION, KIND_CHECKPOINT];
    expected.extend_from_slice(&4000u64.to_le_bytes());
    expected.extend_from_slice(&report.hash);
    assert_eq!(bytes, expected);
    assert_eq!(decode_wire(&bytes), Ok(WireMessage::Checkpoint(report)));
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(decode_wire(&longer), Err(DecodeError::TrailingBytes(1)));
    assert_eq!(
        decode_wire(&bytes[..bytes.len() - 1]),
        Err(DecodeError::Truncated {
            field: "checkpoint hash"
        })
    );
}

#[test]
fn command_results_round_trip_with_their_exact_layout() {
    let result = CommandResult {
        request: 9,
        slot: 1 << 40,
        result: b"\x00value".to_vec(),
    };
    let bytes = encode_wire(&WireMessage::Result(result.clone()));
    let mut expected = vec![WIRE_VERSION, KIND_RESULT];
    expected.extend_from_slice(&9u64.to_le_bytes());
    expected.extend_from_slice(&(1u64 << 40).to_le_bytes());
    expected.extend_from_slice(&6u32.to_le_bytes());
    expected.extend_from_slice(b"\x00value");
    assert_eq!(bytes, expected);
    assert_eq!(decode_wire(&bytes), Ok(WireMessage::Result(result)));
    assert!(decode_wire(&bytes[..bytes.len() - 1]).is_err());
}

#[test]
fn chunks_carry_a_checksum_of_their_bytes() {
    let id = crate::node::snapshot::SnapshotId {
        slot: 3,
        sha256: [1; 32],
        file_bytes: 10,
    };
    let bytes = encode_chunk(&id, 4, b"abcdef");
    assert_eq!(
        decode_wire(&bytes),
        Ok(WireMessage::Transfer(TransferMessage::Chunk {
            id,
            offset: 4,
            data: b"abcdef".to_vec()
        }))
    );
    // The last data byte changed: the frame CRC would not catch a bug in our own
    // buffers, the chunk checksum does.
    let mut bad = bytes.clone();
    *bad.last_mut().unwrap() ^= 1;
    assert_eq!(decode_wire(&bad), Err(DecodeError::BadChecksum));
}

#[test]
fn every_message_round_trips() {
    for message in every_message() {
        let bytes = encode_wire(&message);
        assert_eq!(bytes[0], WIRE_VERSION);
        if let WireMessage::Paxos(msg) = &message {
            assert_eq!(encode_paxos(msg), bytes);
        }
        assert_eq!(decode_wire(&bytes), Ok(message));
    }
}

#[test]
fn entries_round_trip() {
    for chosen in [false, true] {
        let bytes = encode_entry(&entry(chosen));
        assert_eq!(decode_entry(&bytes), Ok(entry(chosen)));
    }
}

#[test]
fn every_truncation_is_an_error() {
    for message in every_message() {
        let bytes = encode_wire(&message);
        // A peer info's optional fields end it: a prefix without them is an older
        // layout (see `peer_info_reads_older_and_newer_layouts`).
        let optional_bytes = match &message {
            WireMessage::Info(_) => 4,
            _ => 0,
        };
        for len in 0..bytes.len() - optional_bytes {
            assert!(
                decode_wire(&bytes[..len]).is_err(),
                "prefix {len} of {message:?} decoded"
            );
        }
    }
    let bytes = encode_entry(&entry(true));
    for len in 0..bytes.len() {
        assert!(decode_entry(&bytes[..len]).is_err());
    }
}

#[test]
fn peer_info_reads_older_and_newer_layouts() {
    let info = PeerInfo {
        http: "10.0.0.1:7001".into(),
        peer: "10.0.0.1:7101".into(),
        chosen_index: 9,
        applied_index: 8,
        apply_rules_max: Some(2),
    };
    let bytes = encode_wire(&WireMessage::Info(info.clone()));
    assert_eq!(bytes[bytes.len() - 4..], 2u32.to_le_bytes());
    // A build from before the apply rules: no field, read as `None`.
    let older = &bytes[..bytes.len() - 4];
    let Ok(WireMessage::Info(read)) = decode_wire(older) else {
        panic!("an older info must decode");
    };
    assert_eq!(read.apply_rules_max, None);
    assert_eq!((read.chosen_index, read.applied_index), (9, 8));
    // A newer build's fields after the ones this build knows are ignored.
    let mut newer = bytes.clone();
    newer.extend_from_slice(b"later fields");
    assert_eq!(decode_wire(&newer), Ok(WireMessage::Info(info)));
    // A cut inside a field this build knows is still an error.
    assert!(decode_wire(&older[..older.len() - 1]).is_err());
}

#[test]
fn trailing_bytes_unknown_versions_and_tags_are_errors() {
    let mut bytes = encode_wire(&WireMessage::Paxos(Message::PreVote { round: 1 }));
    bytes.push(0);
    assert_eq!(decode_wire(&bytes), Err(DecodeError::TrailingBytes(1)));
    assert_eq!(decode_wire(&[2, 0]), Err(DecodeError::UnknownVersion(2)));
    assert_eq!(
        decode_wire(&[1, 7]),
        Err(DecodeError::UnknownTag {
            field: "kind",
            tag: 7
        })
    );
    assert_eq!(
        decode_wire(&[1, 0, 200]),
        Err(DecodeError::UnknownTag {
            field: "message",
            tag: 200
        })
    );
    assert_eq!(decode_entry(&[9]), Err(DecodeError::UnknownVersion(9)));
}

#[test]
fn huge_counts_are_refused_before_allocating() {
    // A Chosen message claiming 4 billion entries in a 30-byte payload.
    let mut bytes = vec![WIRE_VERSION, 0, 9];
    bytes.extend_from_slice(&[0; 16]);
    bytes.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        decode_wire(&bytes),
        Err(DecodeError::BadLength {
            field: "chosen entries",
            length: u32::MAX as u64
        })
    );
}

#[test]
fn garbage_and_bit_flips_never_panic() {
    let mut rng = SplitMix64::new(42);
    for _ in 0..20_000 {
        let len = rng.range(0, 200) as usize;
        let garbage: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let _ = decode_wire(&garbage);
        let _ = decode_entry(&garbage);
    }
    for message in every_message() {
        let bytes = encode_wire(&message);
        for _ in 0..500 {
            let mut flipped = bytes.clone();
            let at = rng.range(0, flipped.len() as u64) as usize;
            flipped[at] ^= 1 << rng.range(0, 8);
            let _ = decode_wire(&flipped);
        }
    }
}

fn configuration_values() -> Vec<Value> {
    let old = Configuration::with_learners([1, 2, 3], [4, 5]);
    let target = Configuration::with_learners([3, 4, 5], [1]);
    vec![
        Value::Configuration(std::sync::Arc::new(old.clone())),
        Value::Configuration(std::sync::Arc::new(old.joint_to(&target))),
        Value::Configuration(std::sync::Arc::new(target)),
    ]
}

#[test]
fn configuration_entries_round_trip_in_entries_and_messages() {
    for value in configuration_values() {
        let stored = LogEntry {
            ballot: ballot(9, 4),
            value: value.clone(),
            chosen: false,
        };
        assert_eq!(decode_entry(&encode_entry(&stored)).unwrap(), stored);
        let msg = Message::Accept {
            ballot: ballot(9, 4),
            slot: 31,
            value,
            chosen_index: 30,
        };
        let wire = WireMessage::Paxos(msg);
        assert_eq!(decode_wire(&encode_wire(&wire)).unwrap(), wire);
    }
}

#[test]
fn malformed_configuration_is_refused() {
    // A configuration with no voter: tag 2, zero voters, not joint, zero learners.
    let mut bytes = vec![ENTRY_VERSION];
    put_ballot(&mut bytes, ballot(1, 1));
    bytes.extend_from_slice(&[2]);
    put_len(&mut bytes, 0);
    bytes.push(0);
    put_len(&mut bytes, 0);
    bytes.push(0);
    assert_eq!(
        decode_entry(&bytes),
        Err(DecodeError::Malformed {
            field: "configuration"
        })
    );
}
