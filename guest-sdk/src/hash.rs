//! A keyed hash for hash maps in a guest: SipHash-1-3 with a 128-bit key.
//!
//! A hash map is much cheaper than a `BTreeMap` in a wasm32 guest (one hash
//! and usually one key comparison per lookup instead of a search through
//! several nodes), but its two usual hashers do not fit a replicated guest:
//!
//! - std's `RandomState` draws a different key in every process, so replicas
//!   would lay out (and iterate) the same map differently: their state hashes
//!   would differ. Never use it in a guest.
//! - A fixed, public key is deterministic but lets a client choose keys that
//!   all collide ("hash flooding"): every lookup of such keys degrades to a
//!   linear scan, on every replica, slowing the whole cluster.
//!
//! So the key must be the same on every replica, yet unknown to clients in
//! advance: take it once from the host's entry seed ([`crate::entry_seed`],
//! chosen by the leader and stored in the log entry) with
//! [`HashKey::from_seed`], and keep it in the app's state (linear memory), so
//! snapshots, restores and replays keep it. Take it when the first command is
//! applied (the map is still empty), not in `App::init`: an install is no log
//! entry of its own, so `init` sees seed 0 (first module) or the previous
//! entry's seed (upgrade), values a client may know. SipHash is a keyed PRF: without
//! the key, collisions cannot be chosen. 1-3 is the variant std's own hash
//! maps use (one compression round per 8 bytes, three finalization rounds).
//!
//! ```
//! use std::collections::HashMap;
//! use paxwasm_guest::hash::{HashKey, SipBuildHasher};
//!
//! let key = HashKey::from_seed(0x1234_5678_9abc_def0);
//! let mut map: HashMap<String, u64, SipBuildHasher> = HashMap::with_hasher(key.build());
//! map.insert("apple".to_owned(), 1);
//! assert_eq!(map.get("apple"), Some(&1));
//! ```

use core::hash::{BuildHasher, Hasher};

/// Bytes the hash consumes per compression.
const BLOCK_BYTES: usize = 8;

/// A 128-bit SipHash key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HashKey {
    pub k0: u64,
    pub k1: u64,
}

impl HashKey {
    /// Expands a 64-bit seed (the entry seed the host gives) into a key with
    /// SplitMix64, so that nearby seeds give unrelated keys. The key has the
    /// seed's 64 bits of entropy, no more.
    pub fn from_seed(seed: u64) -> HashKey {
        let mut state = seed;
        let k0 = splitmix64(&mut state);
        let k1 = splitmix64(&mut state);
        HashKey { k0, k1 }
    }

    /// The [`BuildHasher`] of a map hashed with this key.
    pub fn build(self) -> SipBuildHasher {
        SipBuildHasher { key: self }
    }
}

/// One step of SplitMix64 (Steele, Lea, Flood 2014): advances `state` and
/// returns a well-mixed 64-bit value.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Builds [`SipHasher13`]s with one key: the `S` of a `HashMap<K, V, S>`.
/// Its `Default` has the all-zero key, a placeholder for an empty map that
/// gets its real key later (it is public, so never fill a map keyed with it
/// from clients' input).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SipBuildHasher {
    key: HashKey,
}

impl SipBuildHasher {
    pub fn key(&self) -> HashKey {
        self.key
    }
}

impl BuildHasher for SipBuildHasher {
    type Hasher = SipHasher13;

    #[inline]
    fn build_hasher(&self) -> SipHasher13 {
        Sip::new(self.key)
    }
}

/// SipHash-1-3, the variant for hash tables.
pub type SipHasher13 = Sip<1, 3>;

/// SipHash-c-d (Aumasson and Bernstein 2012) with `C` compression and `D`
/// finalization rounds, streaming: any split of the same bytes into `write`
/// calls gives the same hash.
#[derive(Clone, Debug)]
pub struct Sip<const C: usize, const D: usize> {
    v0: u64,
    v1: u64,
    v2: u64,
    v3: u64,
    /// Bytes written but not yet compressed (fewer than 8), little-endian.
    tail: u64,
    /// How many bytes `tail` holds.
    ntail: usize,
    /// Bytes written so far (only its low 8 bits enter the hash).
    length: usize,
}

impl<const C: usize, const D: usize> Sip<C, D> {
    pub fn new(key: HashKey) -> Self {
        Sip {
            v0: key.k0 ^ 0x736f_6d65_7073_6575,
            v1: key.k1 ^ 0x646f_7261_6e64_6f6d,
            v2: key.k0 ^ 0x6c79_6765_6e65_7261,
            v3: key.k1 ^ 0x7465_6462_7974_6573,
            tail: 0,
            ntail: 0,
            length: 0,
        }
    }

    #[inline(always)]
    fn round(&mut self) {
        self.v0 = self.v0.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(13);
        self.v1 ^= self.v0;
        self.v0 = self.v0.rotate_left(32);
        self.v2 = self.v2.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(16);
        self.v3 ^= self.v2;
        self.v0 = self.v0.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(21);
        self.v3 ^= self.v0;
        self.v2 = self.v2.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(17);
        self.v1 ^= self.v2;
        self.v2 = self.v2.rotate_left(32);
    }

    #[inline(always)]
    fn compress(&mut self, block: u64) {
        self.v3 ^= block;
        for _ in 0..C {
            self.round();
        }
        self.v0 ^= block;
    }

    /// The hash, given the uncompressed `tail` (fewer than 8 bytes,
    /// little-endian) and the message length.
    #[inline(always)]
    fn finalize(mut self, tail: u64, length: usize) -> u64 {
        self.compress(((length as u64 & 0xff) << 56) | tail);
        self.v2 ^= 0xff;
        for _ in 0..D {
            self.round();
        }
        self.v0 ^ self.v1 ^ self.v2 ^ self.v3
    }
}

/// SipHash-1-3 of `bytes` under `key` in one call: the same value as a
/// [`SipHasher13`] that was given exactly `bytes` in `write` calls, without
/// the streaming bookkeeping. For tables that hash their keys themselves
/// (e.g. hashbrown's `HashTable`), where one key is one message: no
/// terminator or length prefix is needed, distinct keys are distinct
/// messages.
#[inline]
pub fn hash_bytes(key: HashKey, bytes: &[u8]) -> u64 {
    let mut state = SipHasher13::new(key);
    let mut blocks = bytes.chunks_exact(BLOCK_BYTES);
    for block in &mut blocks {
        state.compress(u64::from_le_bytes(block.try_into().unwrap()));
    }
    state.finalize(load_partial(blocks.remainder()), bytes.len())
}

/// `bytes` (fewer than 8) as a little-endian number, read with at most three
/// loads instead of one per byte.
#[inline(always)]
fn load_partial(bytes: &[u8]) -> u64 {
    debug_assert!(bytes.len() < BLOCK_BYTES);
    let len = bytes.len();
    let mut out = 0u64;
    let mut at = 0;
    if len >= 4 {
        out = u64::from(u32::from_le_bytes(bytes[..4].try_into().unwrap()));
        at = 4;
    }
    if len - at >= 2 {
        let pair = u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap());
        out |= u64::from(pair) << (8 * at);
        at += 2;
    }
    if len > at {
        out |= u64::from(bytes[at]) << (8 * at);
    }
    out
}

impl<const C: usize, const D: usize> Hasher for Sip<C, D> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        self.length = self.length.wrapping_add(bytes.len());
        let mut rest = bytes;
        if self.ntail != 0 {
            let needed = BLOCK_BYTES - self.ntail;
            let fill = needed.min(rest.len());
            self.tail |= load_partial(&rest[..fill]) << (8 * self.ntail);
            if fill < needed {
                self.ntail += fill;
                return;
            }
            self.compress(self.tail);
            rest = &rest[fill..];
        }
        let mut blocks = rest.chunks_exact(BLOCK_BYTES);
        for block in &mut blocks {
            self.compress(u64::from_le_bytes(block.try_into().unwrap()));
        }
        let left = blocks.remainder();
        self.tail = load_partial(left);
        self.ntail = left.len();
    }

    /// `str` keys end with one (`0xff`, see `Hash for str`): skips the
    /// general path's slicing.
    #[inline]
    fn write_u8(&mut self, byte: u8) {
        self.length = self.length.wrapping_add(1);
        self.tail |= u64::from(byte) << (8 * self.ntail);
        self.ntail += 1;
        if self.ntail == BLOCK_BYTES {
            self.compress(self.tail);
            self.tail = 0;
            self.ntail = 0;
        }
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.clone().finalize(self.tail, self.length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes 0, 1, 2, … as in the SipHash paper's test vectors.
    fn counting(len: usize) -> Vec<u8> {
        (0..len).map(|i| i as u8).collect()
    }

    const PAPER_KEY: HashKey = HashKey {
        k0: 0x0706_0504_0302_0100,
        k1: 0x0f0e_0d0c_0b0a_0908,
    };

    fn hash<const C: usize, const D: usize>(key: HashKey, bytes: &[u8]) -> u64 {
        let mut hasher = Sip::<C, D>::new(key);
        hasher.write(bytes);
        hasher.finish()
    }

    #[test]
    fn siphash_2_4_matches_the_paper() {
        // Appendix A of the paper: key 00..0f, message 00..0e.
        assert_eq!(
            hash::<2, 4>(PAPER_KEY, &counting(15)),
            0xa129_ca61_49be_45e5
        );
        // The first vectors of the reference implementation's vectors.h
        // (64-bit output, read little-endian).
        let expected: [[u8; 8]; 3] = [
            [0x31, 0x0e, 0x0e, 0xdd, 0x47, 0xdb, 0x6f, 0x72],
            [0xfd, 0x67, 0xdc, 0x93, 0xc5, 0x39, 0xf8, 0x74],
            [0x5a, 0x4f, 0xa9, 0xd9, 0x09, 0x80, 0x6c, 0x0d],
        ];
        for (len, bytes) in expected.iter().enumerate() {
            assert_eq!(
                hash::<2, 4>(PAPER_KEY, &counting(len)),
                u64::from_le_bytes(*bytes),
                "{len}"
            );
        }
    }

    #[test]
    #[allow(deprecated)]
    fn siphash_2_4_matches_std() {
        // std's `SipHasher` is SipHash-2-4 with the given key.
        let keys = [PAPER_KEY, HashKey::from_seed(7), HashKey::default()];
        for key in keys {
            for len in 0..70 {
                let bytes = counting(len);
                let mut std_hasher = std::hash::SipHasher::new_with_keys(key.k0, key.k1);
                std_hasher.write(&bytes);
                assert_eq!(hash::<2, 4>(key, &bytes), std_hasher.finish(), "{len}");
            }
        }
    }

    #[test]
    fn siphash_1_3_matches_std_default_hasher() {
        // std's `DefaultHasher::new()` is SipHash-1-3 with the zero key (its
        // docs leave the algorithm open; this is what it has always been).
        for len in 0..70 {
            let bytes = counting(len);
            let mut std_hasher = std::hash::DefaultHasher::new();
            std_hasher.write(&bytes);
            assert_eq!(
                hash::<1, 3>(HashKey::default(), &bytes),
                std_hasher.finish(),
                "{len}"
            );
        }
    }

    #[test]
    fn any_split_into_writes_gives_the_same_hash() {
        let key = HashKey::from_seed(42);
        let bytes = counting(40);
        for len in 0..bytes.len() {
            let whole = hash::<1, 3>(key, &bytes[..len]);
            for cut in 0..=len {
                for cut2 in cut..=len {
                    let mut hasher = SipHasher13::new(key);
                    hasher.write(&bytes[..cut]);
                    hasher.write(&bytes[cut..cut2]);
                    for &byte in &bytes[cut2..len] {
                        hasher.write_u8(byte);
                    }
                    assert_eq!(hasher.finish(), whole, "{len} {cut} {cut2}");
                }
            }
        }
    }

    #[test]
    fn hash_bytes_is_siphash_1_3_of_the_bytes() {
        for key in [HashKey::default(), HashKey::from_seed(9), PAPER_KEY] {
            for len in 0..70 {
                let bytes = counting(len);
                assert_eq!(hash_bytes(key, &bytes), hash::<1, 3>(key, &bytes), "{len}");
            }
        }
    }

    #[test]
    fn the_key_changes_every_hash() {
        let a = HashKey::from_seed(1);
        let b = HashKey::from_seed(2);
        assert_ne!(a, b);
        assert_ne!(a.k0, a.k1);
        for len in 0..20 {
            let bytes = counting(len);
            assert_ne!(hash::<1, 3>(a, &bytes), hash::<1, 3>(b, &bytes), "{len}");
        }
        assert_eq!(HashKey::from_seed(1), a, "deterministic");
        assert_eq!(a.build().build_hasher().finish(), hash::<1, 3>(a, b""));
    }

    #[test]
    fn load_partial_reads_little_endian() {
        for len in 0..8 {
            let bytes = counting(len + 1)[1..].to_vec();
            let mut padded = [0u8; 8];
            padded[..len].copy_from_slice(&bytes);
            assert_eq!(load_partial(&bytes), u64::from_le_bytes(padded), "{len}");
        }
    }
}
