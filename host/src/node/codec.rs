//! The binary encodings `node` owns: peer messages on the wire (inside the transport's
//! frames) and accepted log entries in the store.
//!
//! Both are explicit, versioned and little-endian, so the core's types never derive a
//! serialization format. Decoding never panics and never allocates more than the input
//! could hold: every length and count is checked against the bytes that remain, and a
//! decode error is a value the caller logs and drops.
//!
//! Wire payload: `version u8 = 1`, `kind u8` (0 = Paxos message, 1 = peer info, 2 =
//! snapshot transfer, `KIND_CHECKPOINT` = state-hash checkpoint report,
//! `KIND_RESULT` = the result of a forwarded command), body. A peer info alone may end
//! in optional fields (read when present; bytes after the last one a build knows are
//! ignored, so builds from session 10 on still read each other's); every other
//! payload with trailing bytes is refused.
//! Store value of an accepted entry: `version u8 = 1`, then a `LogEntry`.
//! Field layouts are in docs/notes/node.md.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use crate::paxos::{
    Ballot, Batch, Command, Configuration, IdempotencyKey, LogEntry, Message, NodeId, Origin, Slot,
    Value,
};

use super::snapshot::SnapshotId;
use super::transfer::TransferMessage;

/// Version byte of every wire payload this build writes and reads.
pub const WIRE_VERSION: u8 = 1;
/// Version byte of every stored log entry this build writes and reads.
pub const ENTRY_VERSION: u8 = 1;
/// Longest HTTP address a peer may announce.
pub const PEER_HTTP_BYTES_MAX: usize = 256;
/// Wire kind of a `CheckpointReport`. Kinds 2 to 7 are left free for snapshot transfer
/// (developed at the same time), so the two extensions cannot collide.
pub const KIND_CHECKPOINT: u8 = 8;
/// Wire kind of a `CommandResult`.
pub const KIND_RESULT: u8 = 9;

/// What replicas say to each other: consensus messages, plus what a replica tells its
/// peers about itself (so followers can name the leader's HTTP address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireMessage {
    Paxos(Message),
    Info(PeerInfo),
    /// Snapshot transfer (see `transfer`); never part of consensus either.
    Transfer(TransferMessage),
    Checkpoint(CheckpointReport),
    Result(CommandResult),
}

/// The result of a command that entered through the receiver and was forwarded: sent by
/// the leader once it applied the command's slot, so the receiver can answer its client
/// without waiting to learn the commit and apply the slot itself. Never part of
/// consensus: every replica computes the same result at that slot. Layout: `request
/// u64`, `slot u64`, `result` as length-prefixed bytes (an encoded `AppResult`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandResult {
    pub request: u64,
    pub slot: Slot,
    pub result: Vec<u8>,
}

/// The sender's state hash at a checkpoint index (`node::checkpoint`); never part of
/// consensus. Layout: `index u64`, `hash [u8; 32]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointReport {
    pub index: Slot,
    pub hash: [u8; 32],
}

/// Sent to every peer now and then; never part of consensus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// `host:port` of the sender's HTTP API.
    pub http: String,
    /// `ip:port` of the sender's peer transport: a node that joins without `--cluster`
    /// knows nobody, and learns from this where to answer (docs/notes/members.md).
    pub peer: String,
    pub chosen_index: Slot,
    pub applied_index: Slot,
    /// The highest apply rules the sender implements (`app::APPLY_RULES_MAX`); `None`
    /// from a build that did not say (it applies with rules 1 only). A leader raises
    /// the cluster's rules only to what every member says here.
    pub apply_rules_max: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ended inside a field.
    Truncated {
        field: &'static str,
    },
    UnknownVersion(u8),
    UnknownTag {
        field: &'static str,
        tag: u8,
    },
    /// A count or length larger than the remaining input could hold.
    BadLength {
        field: &'static str,
        length: u64,
    },
    /// Bytes left over after a complete value.
    TrailingBytes(usize),
    BadUtf8 {
        field: &'static str,
    },
    /// A snapshot chunk whose bytes do not match its CRC-32C.
    BadChecksum,
    /// Fields that decode but break an invariant of their type.
    Malformed {
        field: &'static str,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated { field } => write!(f, "input ends inside {field}"),
            DecodeError::UnknownVersion(version) => write!(f, "unknown version {version}"),
            DecodeError::UnknownTag { field, tag } => write!(f, "unknown {field} tag {tag}"),
            DecodeError::BadLength { field, length } => {
                write!(f, "{field} length {length} exceeds the input")
            }
            DecodeError::TrailingBytes(bytes) => write!(f, "{bytes} trailing bytes"),
            DecodeError::BadUtf8 { field } => write!(f, "{field} is not UTF-8"),
            DecodeError::BadChecksum => write!(f, "snapshot chunk checksum mismatch"),
            DecodeError::Malformed { field } => write!(f, "malformed {field}"),
        }
    }
}

impl std::error::Error for DecodeError {}

// ---- public entry points -------------------------------------------------------------

pub fn encode_wire(message: &WireMessage) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(WIRE_VERSION);
    match message {
        WireMessage::Paxos(msg) => {
            out.push(0);
            put_message(&mut out, msg);
        }
        WireMessage::Info(info) => {
            out.push(1);
            put_bytes(&mut out, info.http.as_bytes());
            put_u64(&mut out, info.chosen_index);
            put_u64(&mut out, info.applied_index);
            put_bytes(&mut out, info.peer.as_bytes());
            if let Some(rules) = info.apply_rules_max {
                out.extend_from_slice(&rules.to_le_bytes());
            }
        }
        WireMessage::Transfer(message) => {
            out.push(2);
            put_transfer(&mut out, message);
        }
        WireMessage::Checkpoint(report) => {
            out.push(KIND_CHECKPOINT);
            put_u64(&mut out, report.index);
            out.extend_from_slice(&report.hash);
        }
        WireMessage::Result(result) => {
            out.push(KIND_RESULT);
            put_u64(&mut out, result.request);
            put_u64(&mut out, result.slot);
            put_bytes(&mut out, &result.result);
        }
    }
    out
}

/// `encode_wire(&WireMessage::Paxos(msg.clone()))` without the clone.
pub fn encode_paxos(msg: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(WIRE_VERSION);
    out.push(0);
    put_message(&mut out, msg);
    out
}

pub fn decode_wire(input: &[u8]) -> Result<WireMessage, DecodeError> {
    let mut reader = Reader { input, pos: 0 };
    let version = reader.u8("version")?;
    if version != WIRE_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let message = match reader.u8("kind")? {
        0 => WireMessage::Paxos(reader.message()?),
        1 => {
            let http = reader.bytes("peer http")?;
            if http.len() > PEER_HTTP_BYTES_MAX {
                return Err(DecodeError::BadLength {
                    field: "peer http",
                    length: http.len() as u64,
                });
            }
            let http = String::from_utf8(http.to_vec())
                .map_err(|_| DecodeError::BadUtf8 { field: "peer http" })?;
            let chosen_index = reader.u64("chosen index")?;
            let applied_index = reader.u64("applied index")?;
            let peer = reader.bytes("peer address")?;
            if peer.len() > PEER_HTTP_BYTES_MAX {
                return Err(DecodeError::BadLength {
                    field: "peer address",
                    length: peer.len() as u64,
                });
            }
            let peer = String::from_utf8(peer.to_vec()).map_err(|_| DecodeError::BadUtf8 {
                field: "peer address",
            })?;
            // Optional fields end the message: each build reads the ones it knows
            // and ignores what a newer one appends, so a cluster in the middle of a
            // rolling upgrade still hears every member's info.
            let apply_rules_max = if reader.remaining() >= 4 {
                let bytes = reader.take(4, "apply rules")?;
                Some(u32::from_le_bytes(bytes.try_into().expect("took 4 bytes")))
            } else {
                None
            };
            return Ok(WireMessage::Info(PeerInfo {
                http,
                peer,
                chosen_index,
                applied_index,
                apply_rules_max,
            }));
        }
        2 => WireMessage::Transfer(reader.transfer()?),
        KIND_CHECKPOINT => WireMessage::Checkpoint(CheckpointReport {
            index: reader.u64("checkpoint index")?,
            hash: reader
                .take(32, "checkpoint hash")?
                .try_into()
                .expect("took 32 bytes"),
        }),
        KIND_RESULT => WireMessage::Result(CommandResult {
            request: reader.u64("result request")?,
            slot: reader.u64("result slot")?,
            result: reader.bytes("result")?.to_vec(),
        }),
        tag => return Err(DecodeError::UnknownTag { field: "kind", tag }),
    };
    reader.finish()?;
    Ok(message)
}

pub fn encode_entry(entry: &LogEntry) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(ENTRY_VERSION);
    put_entry(&mut out, entry);
    out
}

pub fn decode_entry(input: &[u8]) -> Result<LogEntry, DecodeError> {
    let mut reader = Reader { input, pos: 0 };
    let version = reader.u8("version")?;
    if version != ENTRY_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let entry = reader.entry()?;
    reader.finish()?;
    Ok(entry)
}

// ---- encoding ------------------------------------------------------------------------

fn put_u8(out: &mut Vec<u8>, value: u8) {
    out.push(value);
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    let len = u32::try_from(len).expect("encoded lengths fit in u32 (frames are smaller)");
    out.extend_from_slice(&len.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

fn put_bool(out: &mut Vec<u8>, value: bool) {
    put_u8(out, u8::from(value));
}

fn put_ballot(out: &mut Vec<u8>, ballot: Ballot) {
    put_u64(out, ballot.round);
    put_u64(out, ballot.node);
}

fn put_command(out: &mut Vec<u8>, command: &Command) {
    put_bytes(out, &command.payload);
    match command.idempotency_key {
        None => put_u8(out, 0),
        Some(key) => {
            put_u8(out, 1);
            put_u64(out, key.client);
            put_u64(out, key.seq);
        }
    }
    put_u64(out, command.origin.node);
    put_u64(out, command.origin.request);
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Noop => put_u8(out, 0),
        Value::Batch(batch) => {
            put_u8(out, 1);
            put_u64(out, batch.timestamp_ms);
            put_u64(out, batch.seed);
            put_len(out, batch.commands.len());
            for command in &batch.commands {
                put_command(out, command);
            }
        }
        Value::Configuration(config) => {
            put_u8(out, 2);
            put_node_set(out, &config.voters);
            match &config.old_voters {
                None => put_u8(out, 0),
                Some(old) => {
                    put_u8(out, 1);
                    put_node_set(out, old);
                }
            }
            put_node_set(out, &config.learners);
        }
        // `Value` is non_exhaustive for later issues; a variant this codec does not
        // know is a build that forgot to extend it.
        #[allow(unreachable_patterns)]
        other => panic!("codec does not know value {other:?}"),
    }
}

fn put_node_set(out: &mut Vec<u8>, nodes: &BTreeSet<NodeId>) {
    put_len(out, nodes.len());
    for node in nodes {
        put_u64(out, *node);
    }
}

fn put_entry(out: &mut Vec<u8>, entry: &LogEntry) {
    put_ballot(out, entry.ballot);
    put_value(out, &entry.value);
    put_bool(out, entry.chosen);
}

fn put_snapshot_id(out: &mut Vec<u8>, id: &SnapshotId) {
    put_u64(out, id.slot);
    out.extend_from_slice(&id.sha256);
    put_u64(out, id.file_bytes);
}

fn put_transfer(out: &mut Vec<u8>, message: &TransferMessage) {
    match message {
        TransferMessage::Request { slot_min } => {
            put_u8(out, 0);
            put_u64(out, *slot_min);
        }
        TransferMessage::Offer { id } => {
            put_u8(out, 1);
            put_snapshot_id(out, id);
        }
        TransferMessage::Fetch { id, offset, resend } => {
            put_u8(out, 2);
            put_snapshot_id(out, id);
            put_u64(out, *offset);
            put_bool(out, *resend);
        }
        TransferMessage::Chunk { id, offset, data } => {
            put_u8(out, 3);
            put_snapshot_id(out, id);
            put_u64(out, *offset);
            out.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
            put_bytes(out, data);
        }
        TransferMessage::Gone { id } => {
            put_u8(out, 4);
            put_snapshot_id(out, id);
        }
    }
}

/// `encode_wire(&WireMessage::Transfer(Chunk { .. }))` straight from a borrowed buffer.
pub fn encode_chunk(id: &SnapshotId, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 72);
    out.push(WIRE_VERSION);
    out.push(2);
    put_u8(&mut out, 3);
    put_snapshot_id(&mut out, id);
    put_u64(&mut out, offset);
    out.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    put_bytes(&mut out, data);
    out
}

fn put_message(out: &mut Vec<u8>, msg: &Message) {
    match msg {
        Message::PreVote { round } => {
            put_u8(out, 0);
            put_u64(out, *round);
        }
        Message::PreVoteReply {
            round,
            granted,
            promised,
        } => {
            put_u8(out, 1);
            put_u64(out, *round);
            put_bool(out, *granted);
            put_ballot(out, *promised);
        }
        Message::Prepare { ballot, first_slot } => {
            put_u8(out, 2);
            put_ballot(out, *ballot);
            put_u64(out, *first_slot);
        }
        Message::Promise {
            ballot,
            first_slot,
            entries,
        } => {
            put_u8(out, 3);
            put_ballot(out, *ballot);
            put_u64(out, *first_slot);
            put_len(out, entries.len());
            for (slot, entry) in entries {
                put_u64(out, *slot);
                put_entry(out, entry);
            }
        }
        Message::Reject { promised } => {
            put_u8(out, 4);
            put_ballot(out, *promised);
        }
        Message::Accept {
            ballot,
            slot,
            value,
            chosen_index,
        } => {
            put_u8(out, 5);
            put_ballot(out, *ballot);
            put_u64(out, *slot);
            put_value(out, value);
            put_u64(out, *chosen_index);
        }
        Message::Accepted { ballot, slot } => {
            put_u8(out, 6);
            put_ballot(out, *ballot);
            put_u64(out, *slot);
        }
        Message::Heartbeat {
            ballot,
            seq,
            chosen_index,
        } => {
            put_u8(out, 7);
            put_ballot(out, *ballot);
            put_u64(out, *seq);
            put_u64(out, *chosen_index);
        }
        Message::HeartbeatAck {
            ballot,
            seq,
            chosen_index,
        } => {
            put_u8(out, 8);
            put_ballot(out, *ballot);
            put_u64(out, *seq);
            put_u64(out, *chosen_index);
        }
        Message::Chosen {
            ballot,
            entries,
            chosen_index,
        } => {
            put_u8(out, 9);
            put_ballot(out, *ballot);
            put_len(out, entries.len());
            for (slot, value) in entries {
                put_u64(out, *slot);
                put_value(out, value);
            }
            put_u64(out, *chosen_index);
        }
        Message::Learned {
            ballot,
            chosen_index,
        } => {
            put_u8(out, 10);
            put_ballot(out, *ballot);
            put_u64(out, *chosen_index);
        }
        Message::Forward { command } => {
            put_u8(out, 11);
            put_command(out, command);
        }
    }
}

// ---- decoding ------------------------------------------------------------------------

/// Smallest encodings, used to reject counts the remaining input cannot hold before
/// allocating for them.
const COMMAND_BYTES_MIN: usize = 4 + 1 + 16;
const VALUE_BYTES_MIN: usize = 1;
const ENTRY_BYTES_MIN: usize = 16 + VALUE_BYTES_MIN + 1;

struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.input.len() - self.pos
    }

    fn take(&mut self, count: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if count > self.remaining() {
            return Err(DecodeError::Truncated { field });
        }
        let bytes = &self.input[self.pos..self.pos + count];
        self.pos += count;
        Ok(bytes)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let bytes = self.take(8, field)?;
        Ok(u64::from_le_bytes(bytes.try_into().expect("took 8 bytes")))
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(DecodeError::UnknownTag { field, tag }),
        }
    }

    /// A count of items each at least `item_bytes_min` long.
    fn count(&mut self, field: &'static str, item_bytes_min: usize) -> Result<usize, DecodeError> {
        let bytes = self.take(4, field)?;
        let count = u32::from_le_bytes(bytes.try_into().expect("took 4 bytes")) as usize;
        if count.saturating_mul(item_bytes_min) > self.remaining() {
            return Err(DecodeError::BadLength {
                field,
                length: count as u64,
            });
        }
        Ok(count)
    }

    fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.count(field, 1)?;
        self.take(len, field)
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes(extra)),
        }
    }

    fn ballot(&mut self) -> Result<Ballot, DecodeError> {
        Ok(Ballot {
            round: self.u64("ballot round")?,
            node: self.u64("ballot node")?,
        })
    }

    fn command(&mut self) -> Result<Command, DecodeError> {
        let payload = self.bytes("command payload")?.to_vec();
        let idempotency_key = match self.u8("idempotency key")? {
            0 => None,
            1 => Some(IdempotencyKey {
                client: self.u64("idempotency client")?,
                seq: self.u64("idempotency seq")?,
            }),
            tag => {
                return Err(DecodeError::UnknownTag {
                    field: "idempotency key",
                    tag,
                })
            }
        };
        let origin = Origin {
            node: self.u64("origin node")?,
            request: self.u64("origin request")?,
        };
        Ok(Command {
            payload,
            idempotency_key,
            origin,
        })
    }

    fn value(&mut self) -> Result<Value, DecodeError> {
        match self.u8("value")? {
            0 => Ok(Value::Noop),
            1 => {
                let timestamp_ms = self.u64("batch timestamp")?;
                let seed = self.u64("batch seed")?;
                let count = self.count("batch commands", COMMAND_BYTES_MIN)?;
                let mut commands = Vec::with_capacity(count);
                for _ in 0..count {
                    commands.push(self.command()?);
                }
                Ok(Value::Batch(Arc::new(Batch {
                    commands,
                    timestamp_ms,
                    seed,
                })))
            }
            2 => {
                let voters = self.node_set("configuration voters")?;
                let old_voters = match self.u8("configuration joint")? {
                    0 => None,
                    1 => Some(self.node_set("configuration old voters")?),
                    tag => {
                        return Err(DecodeError::UnknownTag {
                            field: "configuration joint",
                            tag,
                        })
                    }
                };
                let learners = self.node_set("configuration learners")?;
                let config = Configuration {
                    voters,
                    old_voters,
                    learners,
                };
                // Only well-formed configurations are ever encoded; anything else is
                // corrupt input, refused rather than trusted.
                let well_formed = !config.voters.is_empty()
                    && config.old_voters.as_ref().is_none_or(|old| !old.is_empty())
                    && config.learners.is_disjoint(&config.voters);
                if !well_formed {
                    return Err(DecodeError::Malformed {
                        field: "configuration",
                    });
                }
                Ok(Value::Configuration(Arc::new(config)))
            }
            tag => Err(DecodeError::UnknownTag {
                field: "value",
                tag,
            }),
        }
    }

    fn node_set(&mut self, field: &'static str) -> Result<BTreeSet<NodeId>, DecodeError> {
        let count = self.count(field, 8)?;
        let mut nodes = BTreeSet::new();
        for _ in 0..count {
            nodes.insert(self.u64(field)?);
        }
        Ok(nodes)
    }

    fn entry(&mut self) -> Result<LogEntry, DecodeError> {
        Ok(LogEntry {
            ballot: self.ballot()?,
            value: self.value()?,
            chosen: self.bool("chosen")?,
        })
    }

    fn snapshot_id(&mut self) -> Result<SnapshotId, DecodeError> {
        Ok(SnapshotId {
            slot: self.u64("snapshot slot")?,
            sha256: self
                .take(32, "snapshot sha256")?
                .try_into()
                .expect("took 32 bytes"),
            file_bytes: self.u64("snapshot bytes")?,
        })
    }

    fn transfer(&mut self) -> Result<TransferMessage, DecodeError> {
        Ok(match self.u8("transfer message")? {
            0 => TransferMessage::Request {
                slot_min: self.u64("slot min")?,
            },
            1 => TransferMessage::Offer {
                id: self.snapshot_id()?,
            },
            2 => TransferMessage::Fetch {
                id: self.snapshot_id()?,
                offset: self.u64("offset")?,
                resend: self.bool("resend")?,
            },
            3 => {
                let id = self.snapshot_id()?;
                let offset = self.u64("offset")?;
                let crc = self.take(4, "chunk checksum")?;
                let crc = u32::from_le_bytes(crc.try_into().expect("took 4 bytes"));
                let data = self.bytes("chunk")?;
                if crc32c::crc32c(data) != crc {
                    return Err(DecodeError::BadChecksum);
                }
                TransferMessage::Chunk {
                    id,
                    offset,
                    data: data.to_vec(),
                }
            }
            4 => TransferMessage::Gone {
                id: self.snapshot_id()?,
            },
            tag => {
                return Err(DecodeError::UnknownTag {
                    field: "transfer message",
                    tag,
                })
            }
        })
    }

    fn message(&mut self) -> Result<Message, DecodeError> {
        let message = match self.u8("message")? {
            0 => Message::PreVote {
                round: self.u64("round")?,
            },
            1 => Message::PreVoteReply {
                round: self.u64("round")?,
                granted: self.bool("granted")?,
                promised: self.ballot()?,
            },
            2 => Message::Prepare {
                ballot: self.ballot()?,
                first_slot: self.u64("first slot")?,
            },
            3 => {
                let ballot = self.ballot()?;
                let first_slot = self.u64("first slot")?;
                let count = self.count("promise entries", 8 + ENTRY_BYTES_MIN)?;
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    entries.push((self.u64("slot")?, self.entry()?));
                }
                Message::Promise {
                    ballot,
                    first_slot,
                    entries,
                }
            }
            4 => Message::Reject {
                promised: self.ballot()?,
            },
            5 => Message::Accept {
                ballot: self.ballot()?,
                slot: self.u64("slot")?,
                value: self.value()?,
                chosen_index: self.u64("chosen index")?,
            },
            6 => Message::Accepted {
                ballot: self.ballot()?,
                slot: self.u64("slot")?,
            },
            7 => Message::Heartbeat {
                ballot: self.ballot()?,
                seq: self.u64("seq")?,
                chosen_index: self.u64("chosen index")?,
            },
            8 => Message::HeartbeatAck {
                ballot: self.ballot()?,
                seq: self.u64("seq")?,
                chosen_index: self.u64("chosen index")?,
            },
            9 => {
                let ballot = self.ballot()?;
                let count = self.count("chosen entries", 8 + VALUE_BYTES_MIN)?;
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    entries.push((self.u64("slot")?, self.value()?));
                }
                Message::Chosen {
                    ballot,
                    entries,
                    chosen_index: self.u64("chosen index")?,
                }
            }
            10 => Message::Learned {
                ballot: self.ballot()?,
                chosen_index: self.u64("chosen index")?,
            },
            11 => Message::Forward {
                command: self.command()?,
            },
            tag => {
                return Err(DecodeError::UnknownTag {
                    field: "message",
                    tag,
                })
            }
        };
        Ok(message)
    }
}

#[cfg(test)]
mod tests;
