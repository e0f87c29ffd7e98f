//! The replicated address book of membership changes (see docs/notes/members.md).
//!
//! `paxos::Configuration` names members by id only. Where a member listens travels
//! through the log too, as an address entry applied at the same slot on every replica,
//! so every replica (and every snapshot) agrees on how to reach every member:
//!
//! ```text
//! 4 | id u64 | peer str | http str        (str = u32 length + UTF-8, at most 256 bytes)
//! ```
//!
//! The book is part of the replicated state (in node snapshots, format version 3); the
//! original members are seeded from `--cluster` (with no HTTP address: they announce it
//! in their peer info). Entries are never removed: a removed member's address costs a
//! few bytes and lets it learn its removal.
//!
//! **Node ids are never reused.** The book also remembers every id that was ever a
//! member of an applied configuration (the runtime tells it at each configuration's
//! slot, `note_members`), and refuses an address entry for such an id, identically on
//! every replica. A replica that lost its data (it forgot promises and accepts it gave)
//! therefore never votes again under its id; it joins under a new id, which never
//! promised or accepted anything, so nothing it forgot can matter. An entry for an id
//! that was never a member replaces the previous one (a retried or corrected add).
//!
//! This file owns the envelope layout, the book and its encoding. It never decides a
//! membership change (the core does) and never opens a connection (the runtime points
//! the transport at the book).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use crate::paxos::NodeId;

/// Envelope kind of an address entry (the next free kind after the upgrade envelopes).
pub const ENVELOPE_ADDRESS: u8 = 4;
/// Longest peer or HTTP address accepted, in bytes.
pub const ADDRESS_BYTES_MAX: usize = 256;

/// Where one member listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    /// `ip:port` of the peer transport (a `SocketAddr`: the transport never resolves names).
    pub peer: SocketAddr,
    /// `host:port` of the HTTP API; empty when not known yet (an original member seeded
    /// from `--cluster`, which announces it in its peer info instead).
    pub http: String,
}

/// Member id → address, and the ids ever members; identical on every replica at the
/// same applied index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressBook {
    pub entries: BTreeMap<NodeId, Address>,
    /// Every id that was a member of an applied configuration: never given an address
    /// again (ids are never reused).
    pub was_member: BTreeSet<NodeId>,
}

/// Why an address entry for a former member is refused (409 at the API).
pub fn reused_id(id: NodeId) -> String {
    format!(
        "node id {id} was a member before; ids are never reused: a replica that lost its \
         data joins under a new id"
    )
}

impl AddressBook {
    /// The book at slot 0: the original members' peer addresses from `--cluster`.
    pub fn seeded(members: &BTreeMap<NodeId, SocketAddr>) -> AddressBook {
        AddressBook {
            entries: members
                .iter()
                .map(|(id, peer)| {
                    (
                        *id,
                        Address {
                            peer: *peer,
                            http: String::new(),
                        },
                    )
                })
                .collect(),
            was_member: members.keys().copied().collect(),
        }
    }

    pub fn get(&self, id: NodeId) -> Option<&Address> {
        self.entries.get(&id)
    }

    /// Records an entry; `Ok(true)` when the book changed, `Err` for a former member.
    pub fn record(&mut self, id: NodeId, address: Address) -> Result<bool, String> {
        if self.was_member.contains(&id) {
            return Err(reused_id(id));
        }
        if self.entries.get(&id) == Some(&address) {
            return Ok(false);
        }
        self.entries.insert(id, address);
        Ok(true)
    }

    /// The members of a configuration applied now: their ids are taken for good.
    pub fn note_members(&mut self, ids: impl Iterator<Item = NodeId>) {
        self.was_member.extend(ids);
    }

    /// `count u32 | (id u64 | peer str | http str)* | count u32 | id u64*` (entries, then
    /// the ids ever members), the snapshot section.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let count = u32::try_from(self.entries.len()).expect("address count fits u32");
        out.extend_from_slice(&count.to_le_bytes());
        for (id, address) in &self.entries {
            put_entry(out, *id, &address.peer.to_string(), &address.http);
        }
        let count = u32::try_from(self.was_member.len()).expect("member count fits u32");
        out.extend_from_slice(&count.to_le_bytes());
        for id in &self.was_member {
            out.extend_from_slice(&id.to_le_bytes());
        }
    }

    /// Decodes `encode`'s bytes from the front of `input`; returns the rest.
    pub fn decode(input: &[u8]) -> Result<(AddressBook, &[u8]), String> {
        let (count, mut rest) = take_u32(input, "address count")?;
        // Each entry takes at least 8 + 4 + 4 bytes.
        if (count as usize).saturating_mul(16) > rest.len() {
            return Err("address count exceeds the input".into());
        }
        let mut book = AddressBook::default();
        for _ in 0..count {
            let (id, address, after) = take_entry(rest)?;
            if book.entries.insert(id, address).is_some() {
                return Err(format!("address of node {id} listed twice"));
            }
            rest = after;
        }
        let (count, mut rest) = take_u32(rest, "member count")?;
        if (count as usize).saturating_mul(8) > rest.len() {
            return Err("member count exceeds the input".into());
        }
        for _ in 0..count {
            let (id, after) = take_u64(rest, "former member")?;
            if !book.was_member.insert(id) {
                return Err(format!("member {id} listed twice"));
            }
            rest = after;
        }
        Ok((book, rest))
    }
}

/// Checks the addresses of a new member the way `apply` will, so a bad request is a
/// 400 and never enters the log.
pub fn check_address(peer: &str, http: &str) -> Result<Address, String> {
    if peer.len() > ADDRESS_BYTES_MAX || http.len() > ADDRESS_BYTES_MAX {
        return Err(format!(
            "addresses are limited to {ADDRESS_BYTES_MAX} bytes"
        ));
    }
    let peer: SocketAddr = peer.parse().map_err(|_| {
        format!("peer must be an ip:port socket address (names are not resolved), not {peer:?}")
    })?;
    let has_port = http
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !has_port || http.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("http must be a host:port address, not {http:?}"));
    }
    Ok(Address {
        peer,
        http: http.to_string(),
    })
}

pub fn address_envelope(id: NodeId, address: &Address) -> Vec<u8> {
    let mut out = vec![ENVELOPE_ADDRESS];
    put_entry(&mut out, id, &address.peer.to_string(), &address.http);
    out
}

/// The entry of an address envelope's body (after the kind byte), checked like
/// `check_address` (deterministic: every replica refuses the same bodies).
pub fn decode_address(body: &[u8]) -> Result<(NodeId, Address), String> {
    let (id, address, rest) = take_entry(body)?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the address entry", rest.len()));
    }
    Ok((id, address))
}

fn put_entry(out: &mut Vec<u8>, id: NodeId, peer: &str, http: &str) {
    out.extend_from_slice(&id.to_le_bytes());
    for text in [peer, http] {
        let len = u32::try_from(text.len()).expect("addresses are bounded");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(text.as_bytes());
    }
}

fn take_entry(input: &[u8]) -> Result<(NodeId, Address, &[u8]), String> {
    let (id, rest) = take_u64(input, "member id")?;
    let (peer, rest) = take_str(rest, "peer address")?;
    let (http, rest) = take_str(rest, "http address")?;
    let address = if http.is_empty() {
        // Seeded originals have no HTTP address in the book.
        Address {
            peer: peer
                .parse()
                .map_err(|_| format!("peer address {peer:?} is not ip:port"))?,
            http: String::new(),
        }
    } else {
        check_address(peer, http)?
    };
    Ok((id, address, rest))
}

fn take_u32<'a>(input: &'a [u8], field: &str) -> Result<(u32, &'a [u8]), String> {
    if input.len() < 4 {
        return Err(format!("input ends inside {field}"));
    }
    let (head, rest) = input.split_at(4);
    Ok((u32::from_le_bytes(head.try_into().expect("4 bytes")), rest))
}

fn take_u64<'a>(input: &'a [u8], field: &str) -> Result<(u64, &'a [u8]), String> {
    if input.len() < 8 {
        return Err(format!("input ends inside {field}"));
    }
    let (head, rest) = input.split_at(8);
    Ok((u64::from_le_bytes(head.try_into().expect("8 bytes")), rest))
}

fn take_str<'a>(input: &'a [u8], field: &str) -> Result<(&'a str, &'a [u8]), String> {
    let (len, rest) = take_u32(input, field)?;
    let len = len as usize;
    if len > ADDRESS_BYTES_MAX || len > rest.len() {
        return Err(format!("{field} of {len} bytes is too long"));
    }
    let (text, rest) = rest.split_at(len);
    let text = std::str::from_utf8(text).map_err(|_| format!("{field} is not UTF-8"))?;
    Ok((text, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(peer: &str, http: &str) -> Address {
        check_address(peer, http).unwrap()
    }

    #[test]
    fn an_address_entry_round_trips_and_every_truncation_is_refused() {
        let entry = address("127.0.0.1:7104", "127.0.0.1:7004");
        let envelope = address_envelope(4, &entry);
        assert_eq!(envelope[0], ENVELOPE_ADDRESS);
        assert_eq!(decode_address(&envelope[1..]), Ok((4, entry)));
        for len in 0..envelope.len() - 1 {
            assert!(decode_address(&envelope[1..=len]).is_err(), "prefix {len}");
        }
        let mut longer = envelope.clone();
        longer.push(0);
        assert_eq!(
            decode_address(&longer[1..]).unwrap_err(),
            "1 bytes after the address entry"
        );
    }

    #[test]
    fn addresses_are_checked() {
        assert!(check_address("localhost:7104", "x:1")
            .unwrap_err()
            .starts_with("peer must be an ip:port"));
        assert_eq!(
            check_address("127.0.0.1:1", "").unwrap_err(),
            "http must be a host:port address, not \"\""
        );
        assert!(check_address("127.0.0.1:1", "a b").is_err());
        assert!(check_address("127.0.0.1:1", "abc").is_err());
        assert!(check_address("127.0.0.1:1", ":7004").is_err());
        assert!(check_address("127.0.0.1:1", "host:http").is_err());
        assert!(check_address("127.0.0.1:1", &"h".repeat(ADDRESS_BYTES_MAX + 1)).is_err());
        assert!(check_address("[::1]:7104", "localhost:7004").is_ok());
    }

    #[test]
    fn the_book_round_trips_with_seeded_and_recorded_entries() {
        let seeds: BTreeMap<NodeId, SocketAddr> = [
            (1, "127.0.0.1:7101".parse().unwrap()),
            (2, "127.0.0.1:7102".parse().unwrap()),
        ]
        .into();
        let mut book = AddressBook::seeded(&seeds);
        assert_eq!(
            book.record(4, address("127.0.0.1:7104", "127.0.0.1:7004")),
            Ok(true)
        );
        assert_eq!(
            book.record(4, address("127.0.0.1:7104", "127.0.0.1:7004")),
            Ok(false)
        );
        // Not a member yet: a corrected address replaces the entry.
        assert_eq!(
            book.record(4, address("127.0.0.1:7204", "127.0.0.1:7004")),
            Ok(true)
        );
        book.note_members([2, 4].into_iter());
        for id in [1, 2, 4] {
            assert_eq!(
                book.record(id, address("127.0.0.1:7304", "127.0.0.1:7004")),
                Err(reused_id(id)),
                "id {id} was a member"
            );
        }
        assert_eq!(
            reused_id(4),
            "node id 4 was a member before; ids are never reused: a replica that lost its \
             data joins under a new id"
        );
        let mut bytes = Vec::new();
        book.encode(&mut bytes);
        bytes.push(9);
        let (decoded, rest) = AddressBook::decode(&bytes).unwrap();
        assert_eq!(decoded, book);
        assert_eq!(rest, [9]);
        assert_eq!(decoded.get(1).unwrap().http, "");
        for len in 0..bytes.len() - 1 {
            assert!(AddressBook::decode(&bytes[..len]).is_err(), "prefix {len}");
        }
    }
}
