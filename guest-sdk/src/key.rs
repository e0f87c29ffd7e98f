//! Map keys that compare fast in a wasm32 guest.
//!
//! [`Key`] is a `String` and [`KeyStr`] a `str`, ordered exactly like them
//! (bytewise), but compared with [`crate::mem::compare`] instead of a call to
//! the toolchain's byte-at-a-time `memcmp` (see `mem.rs` for the figures). Use
//! `BTreeMap<Key, V>` and look keys up by `&KeyStr` without allocating:
//!
//! ```
//! use std::collections::BTreeMap;
//! use paxwasm_guest::key::{Key, KeyStr};
//!
//! let mut map: BTreeMap<Key, u64> = BTreeMap::new();
//! map.insert(Key::from("apple"), 1);
//! assert_eq!(map.get(KeyStr::new("apple")), Some(&1));
//! assert_eq!(map.keys().next().unwrap().as_str(), "apple");
//! ```

use core::borrow::Borrow;
use core::cmp::Ordering;
use core::fmt;
use core::ops::Deref;

use crate::mem;

/// An owned map key: a `String` with a faster, identical order.
#[derive(Clone, Default, Hash, PartialEq, Eq)]
pub struct Key(String);

/// A borrowed map key: a `str` with a faster, identical order.
#[derive(Hash, PartialEq, Eq)]
#[repr(transparent)]
pub struct KeyStr(str);

impl KeyStr {
    /// Views `key` as a [`KeyStr`] (no copy).
    #[inline(always)]
    pub fn new(key: &str) -> &KeyStr {
        // SAFETY: `KeyStr` is `#[repr(transparent)]` over `str`, so both
        // pointers have the same layout and metadata (the length), and the
        // returned reference borrows `key` for the same lifetime.
        unsafe { &*(key as *const str as *const KeyStr) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Key {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl From<String> for Key {
    fn from(key: String) -> Key {
        Key(key)
    }
}

impl From<&str> for Key {
    fn from(key: &str) -> Key {
        Key(key.to_owned())
    }
}

impl Deref for Key {
    type Target = KeyStr;

    #[inline(always)]
    fn deref(&self) -> &KeyStr {
        KeyStr::new(&self.0)
    }
}

impl Deref for KeyStr {
    type Target = str;

    #[inline(always)]
    fn deref(&self) -> &str {
        &self.0
    }
}

/// The contract of `Borrow`: `Key` and `KeyStr` order (and hash, and compare
/// equal) the same way, so a map of `Key`s is searched by `&KeyStr`.
impl Borrow<KeyStr> for Key {
    #[inline(always)]
    fn borrow(&self) -> &KeyStr {
        KeyStr::new(&self.0)
    }
}

impl Ord for KeyStr {
    #[inline(always)]
    fn cmp(&self, other: &KeyStr) -> Ordering {
        mem::compare(self.0.as_bytes(), other.0.as_bytes())
    }
}

impl PartialOrd for KeyStr {
    #[inline(always)]
    fn partial_cmp(&self, other: &KeyStr) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    #[inline(always)]
    fn cmp(&self, other: &Key) -> Ordering {
        mem::compare(self.0.as_bytes(), other.0.as_bytes())
    }
}

impl PartialOrd for Key {
    #[inline(always)]
    fn partial_cmp(&self, other: &Key) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Debug for KeyStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::{Key, KeyStr};
    use std::collections::BTreeMap;

    #[test]
    fn orders_exactly_like_strings() {
        let words = [
            "",
            "a",
            "a\0",
            "ab",
            "abc",
            "abcdefgh",
            "abcdefgh\0",
            "abcdefghi",
            "abcdefgi",
            "b",
            "key00001",
            "key00010",
            "key0001",
            "é",
            "z",
            "\u{7f}",
            "\u{80}",
        ];
        for a in words {
            for b in words {
                assert_eq!(Key::from(a).cmp(&Key::from(b)), a.cmp(b), "{a:?} {b:?}");
                assert_eq!(KeyStr::new(a).cmp(KeyStr::new(b)), a.cmp(b), "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn a_map_of_keys_iterates_and_finds_like_a_map_of_strings() {
        let mut keys: BTreeMap<Key, usize> = BTreeMap::new();
        let mut strings: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..500usize {
            let key = format!("k{}", (i * 7919) % 1000);
            keys.insert(Key::from(key.as_str()), i);
            strings.insert(key, i);
        }
        let from_keys: Vec<(&str, usize)> = keys.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let from_strings: Vec<(&str, usize)> =
            strings.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(from_keys, from_strings);
        for probe in ["k0", "k1", "k999", "k1000", "", "k"] {
            assert_eq!(keys.get(KeyStr::new(probe)), strings.get(probe), "{probe}");
        }
    }
}
