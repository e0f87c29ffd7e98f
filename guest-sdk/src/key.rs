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
//!
//! A key of up to [`INLINE_BYTES`] bytes is kept inside the `Key` itself, so
//! inside the map's node, not behind a pointer: a search compares it without
//! a load from elsewhere in memory (with a map of 200 000 keys, that load was
//! a cache miss per comparison), and making one allocates nothing, so
//! `BTreeMap::entry(Key::from(k))` is one search where `get_mut` then
//! `insert` is two (see [`Key::is_inline`]).

use core::borrow::Borrow;
use core::cmp::Ordering;
use core::fmt;
use core::hash::{Hash, Hasher};
use core::ops::Deref;

use crate::mem;

/// The longest key kept inline: with its length, a `Key` is 16 bytes in a
/// wasm32 guest (a `String` is 12), 24 natively (as a `String`).
pub const INLINE_BYTES: usize = 12;

/// An owned map key: a `String` with a faster, identical order.
///
/// `len <= INLINE_BYTES`: the key is `data.inline[..len]`. Longer: it is the
/// `len` bytes at `data.heap`, a `Box<[u8]>` this `Key` owns. Either way the
/// bytes are UTF-8 (every constructor takes them from a `str` or `String`). The length
/// alone says which, so [`Key::as_str`] picks the pointer without a branch
/// on a tag (a search calls it for every key it compares). The fields are
/// private and `len` never changes once a key is made: every `unsafe` block
/// here relies on that.
pub struct Key {
    len: usize,
    data: Data,
}

#[repr(C)]
union Data {
    inline: [u8; INLINE_BYTES],
    heap: *mut u8,
}

// SAFETY: a `Key` owns its bytes exactly as a `Box<str>` does (nothing else
// points to a heap key's bytes), so it may move or be shared across threads.
unsafe impl Send for Key {}
unsafe impl Sync for Key {}

// The size the constant's comment promises, where it matters.
#[cfg(target_arch = "wasm32")]
const _: () = assert!(core::mem::size_of::<Key>() == 16);

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

impl Drop for Key {
    fn drop(&mut self) {
        if !Key::is_inline(self.len) {
            // SAFETY: a long key, and `drop` runs once, with no use of `self` after.
            drop(unsafe { self.take_boxed() });
        }
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
    /// Whether a key of `len` bytes is kept inline (and so is made without
    /// allocating).
    #[inline(always)]
    pub fn is_inline(len: usize) -> bool {
        len <= INLINE_BYTES
    }

    #[inline(always)]
    pub fn as_str(&self) -> &str {
        let at: *const u8 = if Key::is_inline(self.len) {
            // SAFETY (field read): every inline key initializes all of `inline`.
            unsafe { self.data.inline.as_ptr() }
        } else {
            // SAFETY (field read): a longer key wrote `heap`.
            unsafe { self.data.heap }
        };
        // SAFETY: `at` points to the key's `len` bytes, which are UTF-8 and
        // live (inline in `self`, or owned by `self`) while `self` is borrowed.
        unsafe { core::str::from_utf8_unchecked(core::slice::from_raw_parts(at, self.len)) }
    }

    pub fn into_string(self) -> String {
        if Key::is_inline(self.len) {
            return self.as_str().to_owned();
        }
        // SAFETY: `ManuallyDrop` keeps `Drop` from taking the box again.
        unsafe { core::mem::ManuallyDrop::new(self).take_boxed() }.into_string()
    }

    /// A long key made from its boxed bytes.
    fn from_boxed(key: Box<str>) -> Key {
        debug_assert!(!Key::is_inline(key.len()));
        Key {
            len: key.len(),
            data: Data {
                heap: Box::into_raw(key).cast::<u8>(),
            },
        }
    }

    /// The box a long key owns.
    ///
    /// # Safety
    /// `self` is longer than `INLINE_BYTES`, and the box is taken at most once
    /// (then `self` is never used or dropped again).
    unsafe fn take_boxed(&self) -> Box<str> {
        // SAFETY: a long key's `heap` and `len` are those of the `Box<str>`
        // `from_boxed` took apart; the caller takes it once.
        unsafe {
            Box::from_raw(core::ptr::slice_from_raw_parts_mut(self.data.heap, self.len) as *mut str)
        }
    }
}

impl From<String> for Key {
    /// Keeps a long key's buffer (no copy when it has no spare capacity).
    fn from(key: String) -> Key {
        if Key::is_inline(key.len()) {
            return Key::from(key.as_str());
        }
        Key::from_boxed(key.into_boxed_str())
    }
}

impl From<&str> for Key {
    #[inline]
    fn from(key: &str) -> Key {
        if !Key::is_inline(key.len()) {
            return Key::from_boxed(Box::from(key));
        }
        let mut inline = [0; INLINE_BYTES];
        mem::copy_short(&mut inline, key.as_bytes());
        Key {
            len: key.len(),
            data: Data { inline },
        }
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

impl PartialEq for Key {
    #[inline(always)]
    fn eq(&self, other: &Key) -> bool {
        mem::equal(self.as_str().as_bytes(), other.as_str().as_bytes())
    }
}

impl Eq for Key {}

/// As `KeyStr` (and so `str`) hashes: the `Borrow` contract.
impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        KeyStr::new(self.as_str()).hash(state)
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
        mem::compare(self.as_str().as_bytes(), other.as_str().as_bytes())
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
    use super::{Key, KeyStr};
    use core::cmp::Ordering;
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
    fn keys_of_every_length_around_the_inline_limit_behave_like_strings() {
        use std::collections::hash_map::DefaultHasher;
        use std::hash::{Hash, Hasher};
        let hash = |value: &dyn Fn(&mut DefaultHasher)| {
            let mut hasher = DefaultHasher::new();
            value(&mut hasher);
            hasher.finish()
        };
        let strings: Vec<String> = (0..=2 * super::INLINE_BYTES + 2)
            .flat_map(|len| {
                let base: String = "abcdefghijklmnopqrstuvwxyz0123".chars().take(len).collect();
                // The last char swapped for a two-byte one (one byte longer).
                let mut other = base.clone();
                if other.pop().is_some() {
                    other.push('é');
                }
                [base, other]
            })
            .collect();
        for a in &strings {
            let key = Key::from(a.as_str());
            assert_eq!(key.as_str(), a);
            assert_eq!(Key::from(a.clone()).as_str(), a);
            assert_eq!(key.clone().into_string(), *a);
            assert_eq!(format!("{key:?}"), format!("{a:?}"));
            assert_eq!(
                hash(&|h| key.hash(h)),
                hash(&|h| a.as_str().hash(h)),
                "{a:?}"
            );
            assert_eq!(
                hash(&|h| KeyStr::new(a).hash(h)),
                hash(&|h| a.as_str().hash(h))
            );
            for b in &strings {
                let other = Key::from(b.as_str());
                assert_eq!(key.cmp(&other), a.cmp(b), "{a:?} {b:?}");
                assert_eq!(key == other, a == b, "{a:?} {b:?}");
            }
        }
        assert_eq!(Key::default().as_str(), "");
        assert!(Key::is_inline(super::INLINE_BYTES));
        assert!(!Key::is_inline(super::INLINE_BYTES + 1));
    }

    #[test]
    fn keys_differing_in_one_byte_order_and_compare_like_strings() {
        // Every length up to past the inline limit, a difference at every
        // position, with bytes from the ends of the ASCII range and a NUL (the
        // inline bytes after a key are zero, and must never take part).
        for len in 1..=2 * super::INLINE_BYTES {
            for at in 0..len {
                for (low, high) in [('\0', 'a'), ('a', 'b'), ('b', '\u{7f}')] {
                    let with = |c: char| -> String {
                        (0..len).map(|i| if i == at { c } else { 'k' }).collect()
                    };
                    let (a, b) = (with(low), with(high));
                    let (ka, kb) = (Key::from(a.as_str()), Key::from(b.as_str()));
                    assert_eq!(ka.cmp(&kb), a.cmp(&b), "{a:?} {b:?}");
                    assert_eq!(kb.cmp(&ka), b.cmp(&a), "{a:?} {b:?}");
                    assert!(ka != kb && ka == Key::from(a.clone()), "{a:?}");
                }
            }
        }
        for (short, long) in [
            ("abcdefghijk", "abcdefghijk\0"),
            ("abcdefghijkl", "abcdefghijkl\0"),
        ] {
            assert_eq!(Key::from(short).cmp(&Key::from(long)), Ordering::Less);
            assert!(Key::from(short) != Key::from(long));
        }
    }

    #[test]
    fn keys_move_swap_clone_and_convert_without_losing_bytes() {
        let long = "a key of more than twelve bytes".to_owned();
        let mut a = Key::from("short");
        let mut b = Key::from(long.clone());
        core::mem::swap(&mut a, &mut b);
        assert_eq!((a.as_str(), b.as_str()), (long.as_str(), "short"));
        let c = a.clone();
        drop(a);
        assert_eq!(c.as_str(), long);
        let old = core::mem::replace(&mut b, Key::from(long.as_str()));
        assert_eq!(
            (old.into_string(), b.into_string()),
            ("short".to_owned(), long.clone())
        );
        assert_eq!(Key::from(long.clone()).into_string(), long);
        #[cfg(target_pointer_width = "64")]
        assert_eq!(core::mem::size_of::<Key>(), core::mem::size_of::<String>());
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
