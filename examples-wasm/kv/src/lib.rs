//! Example guest: a replicated key-value store, version 1.
//!
//! Commands (words separated by spaces; keys and values are single words):
//! - `put K V` → `OK`
//! - `get K` → the value, or `NOT_FOUND`
//! - `del K` → `OK`, or `NOT_FOUND`
//! - `cas K EXPECTED NEW` → `OK` if the value was EXPECTED (now NEW),
//!   `MISMATCH <current>` if it was not, `NOT_FOUND` if K has no value
//!   (`cas` never creates a key; `put` does)
//! - `append K V` → `OK`; the value becomes `V` if K had none, else `<old>,V`
//!
//! Queries: `get K`. Malformed input → `ERR <reason>` and no change.
//!
//! Migration: `export_state` writes the v1 state format (see [`encode_state`]),
//! which `import_state` here and kv_v2's `import_state` read.
#![forbid(unsafe_code)]

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use paxwasm_guest::key::{Key, KeyStr};
use paxwasm_guest::mem;
use paxwasm_guest::text::{err, push_err, words};
use paxwasm_guest::{export_app, App, Migrate};

/// The first bytes of an exported v1 state.
pub const STATE_TAG: &[u8; 4] = b"KV1\0";

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Kv {
    /// Ordered, so that iteration (and so the exported state) is the same on
    /// every replica. `Key` orders like `String`, with a comparison that is
    /// cheaper in a wasm32 guest (see `paxwasm_guest::key`).
    entries: BTreeMap<Key, String>,
}

const OK: &[u8] = b"OK";
const NOT_FOUND: &[u8] = b"NOT_FOUND";

impl Kv {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(KeyStr::new(key)).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The value of `key`, or `NOT_FOUND`.
    fn get_result(&self, key: &str) -> &[u8] {
        match self.entries.get(KeyStr::new(key)) {
            Some(value) => value.as_bytes(),
            None => NOT_FOUND,
        }
    }
}

impl App for Kv {
    fn apply(&mut self, cmd: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.apply_into(cmd, &mut out);
        out
    }

    /// The real `apply`: writes into the SDK's reused buffer, so a command
    /// allocates only what the map itself needs.
    fn apply_into(&mut self, cmd: &[u8], out: &mut Vec<u8>) {
        let words = match words::<5>(cmd) {
            Ok(words) => words,
            Err(refusal) => return *out = refusal,
        };
        match *words.as_slice() {
            ["put", key, value] => {
                // Reuse the value's allocation when the key exists. A short
                // key costs nothing to make, so one search finds the place
                // either way; a long one is copied only for a new entry.
                if Key::is_inline(key.len()) {
                    match self.entries.entry(Key::from(key)) {
                        Entry::Occupied(slot) => mem::assign_str(slot.into_mut(), value),
                        Entry::Vacant(slot) => {
                            slot.insert(value.to_owned());
                        }
                    }
                } else {
                    match self.entries.get_mut(KeyStr::new(key)) {
                        Some(slot) => mem::assign_str(slot, value),
                        None => {
                            self.entries.insert(Key::from(key), value.to_owned());
                        }
                    }
                }
                mem::extend(out, OK);
            }
            ["get", key] => mem::extend(out, self.get_result(key)),
            ["del", key] => match self.entries.remove(KeyStr::new(key)) {
                Some(_) => mem::extend(out, OK),
                None => mem::extend(out, NOT_FOUND),
            },
            ["cas", key, expected, new] => match self.entries.get_mut(KeyStr::new(key)) {
                None => mem::extend(out, NOT_FOUND),
                Some(current) if mem::equal(current.as_bytes(), expected.as_bytes()) => {
                    mem::assign_str(current, new);
                    mem::extend(out, OK);
                }
                Some(current) => {
                    mem::extend(out, b"MISMATCH ");
                    mem::extend(out, current.as_bytes());
                }
            },
            ["append", key, value] => {
                match self.entries.get_mut(KeyStr::new(key)) {
                    Some(list) => {
                        list.push(',');
                        list.push_str(value);
                    }
                    None => {
                        self.entries.insert(Key::from(key), value.to_owned());
                    }
                }
                mem::extend(out, OK);
            }
            ["put", ..] => push_err(out, "usage: put K V"),
            ["get", ..] => push_err(out, "usage: get K"),
            ["del", ..] => push_err(out, "usage: del K"),
            ["cas", ..] => push_err(out, "usage: cas K EXPECTED NEW"),
            ["append", ..] => push_err(out, "usage: append K V"),
            _ => push_err(out, "unknown command"),
        }
    }

    fn query(&self, query: &[u8]) -> Vec<u8> {
        let words = match words::<3>(query) {
            Ok(words) => words,
            Err(refusal) => return refusal,
        };
        match *words.as_slice() {
            ["get", key] => self.get_result(key).to_vec(),
            ["get", ..] => err("usage: get K"),
            _ => err("unknown query"),
        }
    }
}

impl Migrate for Kv {
    fn export_state(&self) -> Vec<u8> {
        encode_state(self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    fn import_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.entries = decode_state(bytes)?
            .into_iter()
            .map(|(key, value)| (Key::from(key), value))
            .collect();
        Ok(())
    }
}

export_app!(Kv, migrate);

/// The v1 state format: [`STATE_TAG`], the entry count as u32 little-endian,
/// then per entry in ascending key order: key length (u32 LE), key bytes,
/// value length (u32 LE), value bytes. Keys and values are UTF-8.
pub fn encode_state<'a>(entries: impl ExactSizeIterator<Item = (&'a str, &'a str)>) -> Vec<u8> {
    let mut out = STATE_TAG.to_vec();
    out.extend_from_slice(&len_u32(entries.len()).to_le_bytes());
    for (key, value) in entries {
        for field in [key, value] {
            out.extend_from_slice(&len_u32(field.len()).to_le_bytes());
            out.extend_from_slice(field.as_bytes());
        }
    }
    out
}

/// Reads the v1 state format, refusing anything that `encode_state` would not
/// have written (wrong tag, truncation, trailing bytes, unordered or duplicate
/// keys, invalid UTF-8), so a bad handover aborts the upgrade.
pub fn decode_state(bytes: &[u8]) -> Result<Vec<(String, String)>, String> {
    let rest = bytes
        .strip_prefix(STATE_TAG)
        .ok_or("not a kv v1 state (tag KV1\\0 missing)")?;
    let mut reader = Reader { rest };
    let count = reader.u32()?;
    let mut entries: Vec<(String, String)> = Vec::new();
    for _ in 0..count {
        let key = reader.string()?;
        let value = reader.string()?;
        if let Some((last, _)) = entries.last() {
            if *last >= key {
                return Err(format!("keys out of order at {key:?}"));
            }
        }
        entries.push((key, value));
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
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("took 4 bytes")))
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

    fn run(kv: &mut Kv, cmds: &[&str]) -> Vec<String> {
        cmds.iter()
            .map(|cmd| String::from_utf8(kv.apply(cmd.as_bytes())).unwrap())
            .collect()
    }

    fn query(kv: &Kv, q: &str) -> String {
        String::from_utf8(kv.query(q.as_bytes())).unwrap()
    }

    #[test]
    fn keys_around_the_inline_limit_and_long_ones_behave_alike() {
        // 12 bytes are kept inline in the map, 13 and 40 are not (paxwasm_guest::key).
        for key in ["k".repeat(12), "k".repeat(13), "k".repeat(40)] {
            let mut kv = Kv::default();
            let cmds: Vec<String> = [
                "get K",
                "put K 1",
                "put K 2",
                "get K",
                "cas K 1 3",
                "cas K 2 3",
                "append K 4",
                "get K",
                "del K",
                "get K",
                "append K 5",
                "get K",
            ]
            .iter()
            .map(|cmd| cmd.replace('K', &key))
            .collect();
            let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
            assert_eq!(
                run(&mut kv, &cmds),
                [
                    "NOT_FOUND",
                    "OK",
                    "OK",
                    "2",
                    "MISMATCH 2",
                    "OK",
                    "OK",
                    "3,4",
                    "OK",
                    "NOT_FOUND",
                    "OK",
                    "5"
                ],
                "key of {} bytes",
                key.len()
            );
            run(&mut kv, &[&format!("put {key}x 6")]);
            let exported = kv.export_state();
            assert_eq!(
                decode_state(&exported).unwrap(),
                [
                    (key.clone(), "5".to_owned()),
                    (format!("{key}x"), "6".to_owned())
                ]
            );
            let mut imported = Kv::default();
            imported.import_state(&exported).unwrap();
            assert_eq!(imported, kv);
        }
    }

    #[test]
    fn put_get_del() {
        let mut kv = Kv::default();
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
        assert!(kv.is_empty());
    }

    #[test]
    fn cas_compares_then_swaps() {
        let mut kv = Kv::default();
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
    }

    #[test]
    fn append_builds_a_comma_separated_list() {
        let mut kv = Kv::default();
        assert_eq!(
            run(
                &mut kv,
                &["append l a", "append l b", "append l c,d", "get l"]
            ),
            ["OK", "OK", "OK", "a,b,c,d"]
        );
    }

    #[test]
    fn queries_read_without_writing() {
        let mut kv = Kv::default();
        run(&mut kv, &["put k v"]);
        assert_eq!(query(&kv, "get k"), "v");
        assert_eq!(query(&kv, "get nope"), "NOT_FOUND");
        assert_eq!(query(&kv, "put k w"), "ERR unknown query");
        assert_eq!(query(&kv, "get"), "ERR usage: get K");
        assert_eq!(kv.get("k"), Some("v"));
    }

    #[test]
    fn malformed_commands_are_refused_and_change_nothing() {
        let mut kv = Kv::default();
        run(&mut kv, &["put k v"]);
        assert_eq!(
            run(
                &mut kv,
                &[
                    "put k",
                    "put k v w",
                    "get",
                    "del",
                    "cas k v",
                    "cas k v w x",
                    "append k",
                    "drop k",
                    "",
                    "PUT k v"
                ]
            ),
            [
                "ERR usage: put K V",
                "ERR usage: put K V",
                "ERR usage: get K",
                "ERR usage: del K",
                "ERR usage: cas K EXPECTED NEW",
                "ERR usage: cas K EXPECTED NEW",
                "ERR usage: append K V",
                "ERR unknown command",
                "ERR unknown command",
                "ERR unknown command",
            ]
        );
        assert_eq!(kv.apply(b"put k \xff"), b"ERR not UTF-8");
        assert_eq!(kv.apply(b"put a b c d e f"), b"ERR too many words");
        assert_eq!(
            kv.entries,
            BTreeMap::from([(Key::from("k"), "v".to_owned())])
        );
    }

    #[test]
    fn exported_state_has_the_documented_bytes() {
        let mut kv = Kv::default();
        assert_eq!(kv.export_state(), b"KV1\0\0\0\0\0");
        run(&mut kv, &["put b 22", "put a 1"]);
        assert_eq!(
            kv.export_state(),
            b"KV1\0\x02\0\0\0\x01\0\0\0a\x01\0\0\0\x31\x01\0\0\0b\x02\0\0\x0022"
        );
    }

    #[test]
    fn export_import_round_trips() {
        let mut old = Kv::default();
        run(
            &mut old,
            &["put a 1", "append l x", "append l y", "put z last"],
        );
        let mut new = Kv::default();
        new.import_state(&old.export_state()).unwrap();
        assert_eq!(new, old);
        assert_eq!(run(&mut new, &["get l"]), ["x,y"]);
    }

    #[test]
    fn import_refuses_what_export_would_not_write() {
        let mut kv = Kv::default();
        let good = encode_state([("a", "1"), ("b", "2")].into_iter());
        kv.import_state(&good).unwrap();
        let cases: [(&[u8], &str); 5] = [
            (b"KV2\0\0\0\0\0", "not a kv v1 state (tag KV1\\0 missing)"),
            (&good[..good.len() - 1], "truncated state"),
            (&[&good[..], b"x"].concat(), "1 trailing bytes"),
            (
                &encode_state([("b", "2"), ("a", "1")].into_iter()),
                "keys out of order at \"a\"",
            ),
            (
                b"KV1\0\x01\0\0\0\x01\0\0\0\xff\0\0\0\0",
                "state holds invalid UTF-8",
            ),
        ];
        for (bytes, reason) in cases {
            assert_eq!(Kv::default().import_state(bytes), Err(reason.to_owned()));
        }
        let dup = encode_state([("a", "1"), ("a", "2")].into_iter());
        assert_eq!(
            Kv::default().import_state(&dup),
            Err("keys out of order at \"a\"".to_owned())
        );
    }
}
