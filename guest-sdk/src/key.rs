//! Map keys that compare fast in a wasm32 guest.
//!
//! [`Key`] is an owned string key and [`KeyStr`] a borrowed `str`, ordered
//! exactly like `String` / `str` (bytewise). Two things make them cheaper than
//! `String` keys in a `BTreeMap`:
//!
//! - A `Key` keeps its first 8 bytes inline, as a big-endian integer (the
//!   *head*, zero-padded), next to the pointer to its bytes. A B-tree search
//!   compares heads first and reads a stored key's bytes only when the heads
//!   tie, so most comparisons touch no memory outside the tree node. With a
//!   large map, where each key's bytes are a cache miss of their own, that is
//!   most of a lookup's time.
//! - Bytes are compared with [`crate::mem::compare`] instead of a call to the
//!   toolchain's byte-at-a-time `memcmp` (see `mem.rs` for the figures).
//!
//! Look keys up with [`KeyRef`] (head computed once per lookup, no
//! allocation); [`KeyStr`] also works but compares bytes at every step:
//!
//! ```
//! use std::collections::BTreeMap;
//! use paxwasm_guest::key::{Key, KeyRef, KeyStr};
//!
//! let mut map: BTreeMap<Key, u64> = BTreeMap::new();
//! map.insert(Key::from("apple"), 1);
//! assert_eq!(map.get(&KeyRef::new("apple")), Some(&1));
//! assert_eq!(map.get(KeyStr::new("apple")), Some(&1));
//! assert_eq!(map.keys().next().unwrap().as_str(), "apple");
//! ```
//!
//! Why the head order is the string order: if two heads differ, let `i` be
//! the first differing byte. Either both keys have a byte there, and it
//! decides both orders, or one key ended before `i` (padding 0 against a
//! non-zero byte), so it is a proper prefix of the other and sorts first in
//! both orders. Equal heads fall back to comparing all bytes.

use core::borrow::Borrow;
use core::cmp::Ordering;
use core::fmt;
use core::hash::{Hash, Hasher};
use core::marker::PhantomData;
use core::ops::Deref;
use core::ptr::NonNull;

use crate::mem;

/// An owned map key: a string with its head inline and a faster, identical
/// order.
///
/// Owns the `Box<str>` whose raw parts it holds. The layout is `#[repr(C)]`
/// and field for field the one of [`KeyRef`], which is how a `&Key` is
/// borrowed as a `&KeyRef` (see `Borrow<KeyRef>`).
#[repr(C)]
pub struct Key {
    head: u64,
    bytes: NonNull<u8>,
    len: usize,
}

/// A borrowed lookup key: a `&str` with its head computed once. Same layout
/// as [`Key`].
#[repr(C)]
pub struct KeyRef<'a> {
    head: u64,
    bytes: NonNull<u8>,
    len: usize,
    text: PhantomData<&'a str>,
}

// SAFETY: `Key` owns its bytes like a `Box<str>` (no sharing, no interior
// mutability), so it may move to and be shared across threads like one.
unsafe impl Send for Key {}
// SAFETY: as above: `&Key` only reads the owned bytes.
unsafe impl Sync for Key {}

/// The first 8 bytes of `bytes` as a big-endian integer, zero-padded.
#[inline(always)]
fn head_of(bytes: &[u8]) -> u64 {
    let mut head = [0u8; 8];
    let n = bytes.len().min(8);
    head[..n].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(head)
}

impl<'a> KeyRef<'a> {
    /// Views `key` as a lookup key (no copy; reads its first 8 bytes).
    #[inline(always)]
    pub fn new(key: &'a str) -> KeyRef<'a> {
        KeyRef {
            head: head_of(key.as_bytes()),
            bytes: NonNull::from(key.as_bytes()).cast(),
            len: key.len(),
            text: PhantomData,
        }
    }

    #[inline(always)]
    pub fn as_str(&self) -> &str {
        // SAFETY: `bytes`/`len` are the raw parts of a `str` that lives at
        // least as long as `self`: the `&'a str` given to `new`, or the bytes
        // of the `Key` this view was borrowed from (alive while the borrow
        // of `self` is).
        unsafe {
            core::str::from_utf8_unchecked(core::slice::from_raw_parts(
                self.bytes.as_ptr(),
                self.len,
            ))
        }
    }
}

impl Ord for KeyRef<'_> {
    #[inline(always)]
    fn cmp(&self, other: &KeyRef<'_>) -> Ordering {
        match self.head.cmp(&other.head) {
            Ordering::Equal => mem::compare(self.as_str().as_bytes(), other.as_str().as_bytes()),
            unequal => unequal,
        }
    }
}

impl PartialOrd for KeyRef<'_> {
    #[inline(always)]
    fn partial_cmp(&self, other: &KeyRef<'_>) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for KeyRef<'_> {
    #[inline(always)]
    fn eq(&self, other: &KeyRef<'_>) -> bool {
        self.head == other.head && mem::equal(self.as_str().as_bytes(), other.as_str().as_bytes())
    }
}

impl Eq for KeyRef<'_> {}

impl Hash for KeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl fmt::Debug for KeyRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// The contract of `Borrow`: `Key` and `KeyRef` order, compare equal and hash
/// the same way (both by their bytes), so a map of `Key`s is searched by
/// `&KeyRef`.
impl<'a> Borrow<KeyRef<'a>> for Key {
    #[inline(always)]
    fn borrow(&self) -> &KeyRef<'a> {
        // SAFETY: `Key` and `KeyRef` are `#[repr(C)]` with the same fields
        // in the same order (`u64`, `NonNull<u8>`, `usize`; the trailing
        // `PhantomData` has size 0 and alignment 1), so the reference points
        // to a valid `KeyRef`. Its bytes belong to `self` and are only read
        // through `&self`-bound borrows (`KeyRef::as_str` ties its result
        // to the `&KeyRef`, i.e. to this borrow of `self`), whatever `'a`
        // the caller names; `KeyRef` exposes no way to copy its parts out.
        unsafe { &*(self as *const Key).cast::<KeyRef<'a>>() }
    }
}

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
    /// This key as a lookup key (same bytes, same head).
    #[inline(always)]
    pub fn as_key_ref(&self) -> &KeyRef<'_> {
        self.borrow()
    }

    #[inline(always)]
    pub fn as_str(&self) -> &str {
        self.as_key_ref().as_str()
    }

    pub fn into_string(self) -> String {
        let key = core::mem::ManuallyDrop::new(self);
        let bytes = core::ptr::slice_from_raw_parts_mut(key.bytes.as_ptr(), key.len);
        // SAFETY: the raw parts of the `Box<str>` this key owns (see `From`);
        // `ManuallyDrop` keeps `Drop` from releasing them a second time.
        unsafe { Box::from_raw(bytes as *mut str) }.into_string()
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        let bytes = core::ptr::slice_from_raw_parts_mut(self.bytes.as_ptr(), self.len);
        // SAFETY: `bytes`/`len` came from `Box::into_raw` of a `Box<str>` in
        // `From<Box<str>>` and are released only here, once.
        drop(unsafe { Box::from_raw(bytes as *mut str) });
    }
}

impl From<Box<str>> for Key {
    fn from(key: Box<str>) -> Key {
        let head = head_of(key.as_bytes());
        let len = key.len();
        let raw = Box::into_raw(key);
        Key {
            head,
            // SAFETY: `Box::into_raw` never returns null.
            bytes: unsafe { NonNull::new_unchecked(raw.cast::<u8>()) },
            len,
        }
    }
}

impl From<String> for Key {
    fn from(key: String) -> Key {
        Key::from(key.into_boxed_str())
    }
}

impl From<&str> for Key {
    fn from(key: &str) -> Key {
        Key::from(Box::<str>::from(key))
    }
}

impl Default for Key {
    fn default() -> Key {
        Key::from("")
    }
}

impl Clone for Key {
    fn clone(&self) -> Key {
        Key::from(self.as_str())
    }
}

impl PartialEq for Key {
    #[inline(always)]
    fn eq(&self, other: &Key) -> bool {
        self.as_key_ref() == other.as_key_ref()
    }
}

impl Eq for Key {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl Deref for Key {
    type Target = KeyStr;

    #[inline(always)]
    fn deref(&self) -> &KeyStr {
        KeyStr::new(self.as_str())
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
        KeyStr::new(self.as_str())
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
        self.as_key_ref().cmp(other.as_key_ref())
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
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Debug for KeyStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::{Key, KeyRef, KeyStr};
    use std::borrow::Borrow;
    use std::collections::BTreeMap;

    #[test]
    fn orders_exactly_like_strings() {
        let words = [
            "",
            "a",
            "a\0",
            "ab",
            "abc",
            "abcdefg",
            "abcdefg\0",
            "abcdefg\0\0",
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
                assert_eq!(KeyRef::new(a).cmp(&KeyRef::new(b)), a.cmp(b), "{a:?} {b:?}");
                let stored = Key::from(a);
                let borrowed: &KeyRef = stored.borrow();
                assert_eq!(borrowed.cmp(&KeyRef::new(b)), a.cmp(b), "{a:?} {b:?}");
                assert_eq!(Key::from(a) == Key::from(b), a == b, "{a:?} {b:?}");
                assert_eq!(KeyRef::new(a) == KeyRef::new(b), a == b, "{a:?} {b:?}");
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
            assert_eq!(keys.get(&KeyRef::new(probe)), strings.get(probe), "{probe}");
        }
        // Keys longer than the head, sharing it: found by their bytes.
        let mut long: BTreeMap<Key, usize> = BTreeMap::new();
        for i in 0..300usize {
            long.insert(Key::from(format!("customer-{i:05}")), i);
        }
        for i in 0..300usize {
            let key = format!("customer-{i:05}");
            assert_eq!(long.get(&KeyRef::new(&key)), Some(&i));
            assert_eq!(long.remove(&KeyRef::new(&key)), Some(i));
        }
        assert!(long.is_empty());
    }
}
