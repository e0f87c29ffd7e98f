//! Example guest: the key-value store, version 2, the successor of `kv` in the
//! upgrade tests.
//!
//! The same text protocol as kv (see `examples-wasm/kv`), plus:
//! - `version K` → the number of writes to K since it was last created: `put`,
//!   `append` and a successful `cas` each count one; `del` removes the key and
//!   its count; a key without a value → `0`. Keys migrated from kv v1 start at
//!   1 (v1 kept no history).
//!
//! Queries: `get K`, `version K`. Malformed input → `ERR <reason>` and no
//! change.
//!
//! Migration: `import_state` reads kv v1's state (tag `KV1\0`) and this
//! version's own (tag `KV2\0`, see [`encode_state`]); `export_state` writes
//! `KV2\0`, which kv v1 refuses, so a downgrade fails instead of losing counts.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use paxwasm_guest::text::{err, u64_bytes, words};
use paxwasm_guest::{export_app, App, Migrate};

/// The first bytes of a state exported by kv v1.
pub const V1_STATE_TAG: &[u8; 4] = b"KV1\0";
/// The first bytes of a state exported by this version.
pub const STATE_TAG: &[u8; 4] = b"KV2\0";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: String,
    /// Writes since the key was created; at least 1.
    pub version: u64,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct KvV2 {
    /// Ordered, so that the exported state is the same on every replica.
    entries: BTreeMap<String, Entry>,
}

const OK: &[u8] = b"OK";
const NOT_FOUND: &[u8] = b"NOT_FOUND";

impl KvV2 {
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sets `key` to `value` through `write`, counting one write.
    fn write(&mut self, key: &str, value: &str, write: impl FnOnce(&mut String, &str)) {
        match self.entries.get_mut(key) {
            Some(entry) => {
                write(&mut entry.value, value);
                entry.version += 1;
            }
            None => {
                let entry = Entry {
                    value: value.to_owned(),
                    version: 1,
                };
                self.entries.insert(key.to_owned(), entry);
            }
        }
    }

    fn read(&self, words: &[&str]) -> Option<Vec<u8>> {
        Some(match *words {
            ["get", key] => match self.entries.get(key) {
                Some(entry) => entry.value.as_bytes().to_vec(),
                None => NOT_FOUND.to_vec(),
            },
            ["version", key] => u64_bytes(self.entries.get(key).map_or(0, |entry| entry.version)),
            ["get", ..] => err("usage: get K"),
            ["version", ..] => err("usage: version K"),
            _ => return None,
        })
    }
}

impl App for KvV2 {
    fn apply(&mut self, cmd: &[u8]) -> Vec<u8> {
        let words = match words::<5>(cmd) {
            Ok(words) => words,
            Err(refusal) => return refusal,
        };
        if let Some(result) = self.read(words.as_slice()) {
            return result;
        }
        match *words.as_slice() {
            ["put", key, value] => {
                self.write(key, value, |slot, value| value.clone_into(slot));
                OK.to_vec()
            }
            ["del", key] => match self.entries.remove(key) {
                Some(_) => OK.to_vec(),
                None => NOT_FOUND.to_vec(),
            },
            ["cas", key, expected, new] => match self.entries.get_mut(key) {
                None => NOT_FOUND.to_vec(),
                Some(entry) if entry.value == expected => {
                    new.clone_into(&mut entry.value);
                    entry.version += 1;
                    OK.to_vec()
                }
                Some(entry) => [b"MISMATCH ", entry.value.as_bytes()].concat(),
            },
            ["append", key, value] => {
                self.write(key, value, |list, value| {
                    list.push(',');
                    list.push_str(value);
                });
                OK.to_vec()
            }
            ["put", ..] => err("usage: put K V"),
            ["del", ..] => err("usage: del K"),
            ["cas", ..] => err("usage: cas K EXPECTED NEW"),
            ["append", ..] => err("usage: append K V"),
            _ => err("unknown command"),
        }
    }

    fn query(&self, query: &[u8]) -> Vec<u8> {
        let words = match words::<3>(query) {
            Ok(words) => words,
            Err(refusal) => return refusal,
        };
        self.read(words.as_slice())
            .unwrap_or_else(|| err("unknown query"))
    }
}

impl Migrate for KvV2 {
    fn export_state(&self) -> Vec<u8> {
        encode_state(&self.entries)
    }

    fn import_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.entries = decode_state(bytes)?;
        Ok(())
    }
}

export_app!(KvV2, migrate);

/// The v2 state format: [`STATE_TAG`], the entry count as u32 little-endian,
/// then per entry in ascending key order: key length (u32 LE), key bytes,
/// value length (u32 LE), value bytes, version (u64 LE). The v1 format is the
/// same without versions and with tag [`V1_STATE_TAG`].
pub fn encode_state(entries: &BTreeMap<String, Entry>) -> Vec<u8> {
    let mut out = STATE_TAG.to_vec();
    out.extend_from_slice(&len_u32(entries.len()).to_le_bytes());
    for (key, entry) in entries {
        for field in [key, &entry.value] {
            out.extend_from_slice(&len_u32(field.len()).to_le_bytes());
            out.extend_from_slice(field.as_bytes());
        }
        out.extend_from_slice(&entry.version.to_le_bytes());
    }
    out
}

/// Reads a v1 or v2 state, refusing anything their encoders would not have
/// written (unknown tag, truncation, trailing bytes, unordered or duplicate
/// keys, invalid UTF-8, a version of 0), so a bad handover aborts the upgrade.
pub fn decode_state(bytes: &[u8]) -> Result<BTreeMap<String, Entry>, String> {
    let (versioned, rest) = if let Some(rest) = bytes.strip_prefix(STATE_TAG) {
        (true, rest)
    } else if let Some(rest) = bytes.strip_prefix(V1_STATE_TAG) {
        (false, rest)
    } else {
        return Err("not a kv state (tag KV1\\0 or KV2\\0 missing)".to_owned());
    };
    let mut reader = Reader { rest };
    let count = reader.u32()?;
    let mut entries = BTreeMap::new();
    let mut last_key: Option<String> = None;
    for _ in 0..count {
        let key = reader.string()?;
        let value = reader.string()?;
        let version = if versioned { reader.u64()? } else { 1 };
        if version == 0 {
            return Err(format!("version 0 for {key:?}"));
        }
        if last_key.as_ref().is_some_and(|last| *last >= key) {
            return Err(format!("keys out of order at {key:?}"));
        }
        last_key = Some(key.clone());
        entries.insert(key, Entry { value, version });
    }
    if !reader.rest.is_empty() {
        return Err(format!("{} trailing bytes", reader.rest.len()));
    }
    Ok(entries)
}

fn len_u32(len: usize) -> u32 {
    // A wasm32 guest's strings and maps are far smaller than 4 GiB.
    u32::try_from(len).expect("length fits in u32")
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, len: usize) -> Result<&[u8], String> {
        if self.rest.len() < len {
            return Err("truncated state".to_owned());
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("took 4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("took 8 bytes"),
        ))
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "state holds invalid UTF-8".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kv: &mut KvV2, cmds: &[&str]) -> Vec<String> {
        cmds.iter()
            .map(|cmd| String::from_utf8(kv.apply(cmd.as_bytes())).unwrap())
            .collect()
    }

    fn query(kv: &KvV2, q: &str) -> String {
        String::from_utf8(kv.query(q.as_bytes())).unwrap()
    }

    /// The kv v1 protocol, unchanged (the same cases as kv's own tests).
    #[test]
    fn speaks_the_kv_v1_protocol() {
        let mut kv = KvV2::default();
        assert_eq!(
            run(
                &mut kv,
                &["get a", "put a 1", "get a", "put a 2", "get a", "del a", "get a", "del a"]
            ),
            [
                "NOT_FOUND",
                "OK",
                "1",
                "OK",
                "2",
                "OK",
                "NOT_FOUND",
                "NOT_FOUND"
            ]
        );
        assert_eq!(
            run(
                &mut kv,
                &[
                    "cas a x y",
                    "put a x",
                    "cas a z y",
                    "cas a x y",
                    "get a",
                    "cas a x z"
                ]
            ),
            ["NOT_FOUND", "OK", "MISMATCH x", "OK", "y", "MISMATCH y"]
        );
        assert_eq!(
            run(
                &mut kv,
                &["append l a", "append l b", "append l c,d", "get l"]
            ),
            ["OK", "OK", "OK", "a,b,c,d"]
        );
        assert_eq!(
            run(
                &mut kv,
                &["put k", "get", "del", "cas k v", "append k", "drop k", "version"]
            ),
            [
                "ERR usage: put K V",
                "ERR usage: get K",
                "ERR usage: del K",
                "ERR usage: cas K EXPECTED NEW",
                "ERR usage: append K V",
                "ERR unknown command",
                "ERR usage: version K",
            ]
        );
        assert_eq!(query(&kv, "get l"), "a,b,c,d");
        assert_eq!(query(&kv, "put l x"), "ERR unknown query");
    }

    #[test]
    fn version_counts_writes_since_creation() {
        let mut kv = KvV2::default();
        assert_eq!(
            run(
                &mut kv,
                &[
                    "version k",
                    "put k a",
                    "version k",
                    "append k b",
                    "cas k a,b c",
                    "version k",
                    "cas k nope d",
                    "get k",
                    "version k",
                    "del k",
                    "version k",
                    "put k again",
                    "version k",
                ]
            ),
            [
                "0",
                "OK",
                "1",
                "OK",
                "OK",
                "3",
                "MISMATCH c",
                "c",
                "3",
                "OK",
                "0",
                "OK",
                "1"
            ]
        );
        assert_eq!(query(&kv, "version k"), "1");
        assert_eq!(query(&kv, "version none"), "0");
    }

    #[test]
    fn migrates_kv_v1_state_with_versions_at_one() {
        // Bytes as kv v1 exports them (its own test pins the same layout).
        let v1 = b"KV1\0\x02\0\0\0\x01\0\0\0a\x01\0\0\0\x31\x01\0\0\0b\x02\0\0\x0022";
        let mut kv = KvV2::default();
        kv.import_state(v1).unwrap();
        assert_eq!(
            run(
                &mut kv,
                &[
                    "get a",
                    "version a",
                    "get b",
                    "version b",
                    "put b 23",
                    "version b"
                ]
            ),
            ["1", "1", "22", "1", "OK", "2"]
        );
    }

    #[test]
    fn export_import_round_trips_its_own_state() {
        let mut old = KvV2::default();
        run(
            &mut old,
            &["put a 1", "put a 2", "append l x", "put z last"],
        );
        let exported = old.export_state();
        assert!(exported.starts_with(STATE_TAG));
        let mut new = KvV2::default();
        new.import_state(&exported).unwrap();
        assert_eq!(new, old);
        assert_eq!(run(&mut new, &["version a", "version l"]), ["2", "1"]);
    }

    #[test]
    fn import_refuses_what_no_encoder_would_write() {
        let mut one = BTreeMap::new();
        one.insert(
            "a".to_owned(),
            Entry {
                value: "1".to_owned(),
                version: 0,
            },
        );
        let cases: [(Vec<u8>, &str); 4] = [
            (
                b"KV3\0\0\0\0\0".to_vec(),
                "not a kv state (tag KV1\\0 or KV2\\0 missing)",
            ),
            (
                b"KV2\0\x01\0\0\0\x01\0\0\0a\x01\0\0\0\x31\x01\0\0".to_vec(),
                "truncated state",
            ),
            (b"KV1\0\0\0\0\0!".to_vec(), "1 trailing bytes"),
            (encode_state(&one), "version 0 for \"a\""),
        ];
        for (bytes, reason) in cases {
            assert_eq!(KvV2::default().import_state(&bytes), Err(reason.to_owned()));
        }
        let unordered = b"KV1\0\x02\0\0\0\x01\0\0\0b\x01\0\0\0\x31\x01\0\0\0a\x01\0\0\0\x32";
        assert_eq!(
            KvV2::default().import_state(unordered),
            Err("keys out of order at \"a\"".to_owned())
        );
    }
}
