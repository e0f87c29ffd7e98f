//! The simulator's state machine: an in-memory key-value map with get, put and
//! compare-and-set, exactly the semantics the linearizability checker models
//! (`Cas` with `expected: None` means "the key is absent"). Commands and results
//! cross the core as opaque bytes; this module owns their encoding.

use std::collections::BTreeMap;

use super::linearizability::{KvInput, KvOutput};
use crate::paxos::{ApplyContext, StateMachine};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvMachine {
    pub map: BTreeMap<String, String>,
    /// The latest `ApplyContext::timestamp_ms` seen; it must never go back.
    pub clock_ms: u64,
}

impl KvMachine {
    /// The answer `input` gets on the current state, and the state change it makes.
    pub fn execute(&mut self, input: &KvInput) -> KvOutput {
        match input {
            KvInput::Get { key } => KvOutput::Value(self.map.get(key).cloned()),
            KvInput::Put { key, value } => {
                self.map.insert(key.clone(), value.clone());
                KvOutput::Ok
            }
            KvInput::Cas { key, expected, new } => {
                let current = self.map.get(key);
                if current == expected.as_ref() {
                    self.map.insert(key.clone(), new.clone());
                    KvOutput::Ok
                } else {
                    KvOutput::Mismatch(current.cloned())
                }
            }
        }
    }
}

impl StateMachine for KvMachine {
    fn apply(&mut self, payload: &[u8], context: &ApplyContext) -> Vec<u8> {
        assert!(
            context.timestamp_ms >= self.clock_ms,
            "state machine clock went back at slot {} from {} ms to {} ms",
            context.slot,
            self.clock_ms,
            context.timestamp_ms
        );
        self.clock_ms = context.timestamp_ms;
        let input = decode_input(payload);
        encode_output(&self.execute(&input))
    }
}

// Encoding: a tag byte, then each string as a u32 little-endian length and its bytes;
// an optional string is a presence byte first.

fn put_str(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(
        &u32::try_from(text.len())
            .expect("short strings")
            .to_le_bytes(),
    );
    out.extend_from_slice(text.as_bytes());
}

fn put_opt(out: &mut Vec<u8>, text: &Option<String>) {
    match text {
        None => out.push(0),
        Some(text) => {
            out.push(1);
            put_str(out, text);
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn byte(&mut self) -> u8 {
        let (first, rest) = self.bytes.split_first().expect("truncated kv encoding");
        self.bytes = rest;
        *first
    }

    fn string(&mut self) -> String {
        let (len, rest) = self.bytes.split_at(4);
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        let (text, rest) = rest.split_at(len);
        self.bytes = rest;
        String::from_utf8(text.to_vec()).expect("kv strings are utf-8")
    }

    fn optional(&mut self) -> Option<String> {
        match self.byte() {
            0 => None,
            _ => Some(self.string()),
        }
    }
}

pub fn encode_input(input: &KvInput) -> Vec<u8> {
    let mut out = Vec::new();
    match input {
        KvInput::Get { key } => {
            out.push(0);
            put_str(&mut out, key);
        }
        KvInput::Put { key, value } => {
            out.push(1);
            put_str(&mut out, key);
            put_str(&mut out, value);
        }
        KvInput::Cas { key, expected, new } => {
            out.push(2);
            put_str(&mut out, key);
            put_opt(&mut out, expected);
            put_str(&mut out, new);
        }
    }
    out
}

pub fn decode_input(bytes: &[u8]) -> KvInput {
    let mut reader = Reader { bytes };
    match reader.byte() {
        0 => KvInput::Get {
            key: reader.string(),
        },
        1 => KvInput::Put {
            key: reader.string(),
            value: reader.string(),
        },
        2 => KvInput::Cas {
            key: reader.string(),
            expected: reader.optional(),
            new: reader.string(),
        },
        tag => panic!("unknown kv input tag {tag}"),
    }
}

pub fn encode_output(output: &KvOutput) -> Vec<u8> {
    let mut out = Vec::new();
    match output {
        KvOutput::Value(value) => {
            out.push(0);
            put_opt(&mut out, value);
        }
        KvOutput::Ok => out.push(1),
        KvOutput::Mismatch(current) => {
            out.push(2);
            put_opt(&mut out, current);
        }
    }
    out
}

pub fn decode_output(bytes: &[u8]) -> KvOutput {
    let mut reader = Reader { bytes };
    match reader.byte() {
        0 => KvOutput::Value(reader.optional()),
        1 => KvOutput::Ok,
        2 => KvOutput::Mismatch(reader.optional()),
        tag => panic!("unknown kv output tag {tag}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_with_expected_none_means_absent_and_encodings_round_trip() {
        let mut kv = KvMachine::default();
        let cas = KvInput::Cas {
            key: "k".into(),
            expected: None,
            new: "a".into(),
        };
        assert_eq!(decode_input(&encode_input(&cas)), cas);
        assert_eq!(kv.execute(&cas), KvOutput::Ok);
        assert_eq!(kv.execute(&cas), KvOutput::Mismatch(Some("a".into())));
        let get = KvInput::Get { key: "k".into() };
        let output = kv.execute(&get);
        assert_eq!(output, KvOutput::Value(Some("a".into())));
        assert_eq!(decode_output(&encode_output(&output)), output);
    }
}
