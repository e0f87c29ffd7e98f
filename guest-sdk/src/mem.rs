//! Word-at-a-time byte comparison for wasm32 guests.
//!
//! Rust compares byte strings (`str`, `[u8]`, `String` keys of a `BTreeMap`)
//! by calling `memcmp`. On `wasm32-unknown-unknown` that comes from the
//! toolchain's compiler-builtins and compares one byte per loop iteration:
//! measured in the kv example (1000 keys), that loop was 57 % of the guest's
//! machine instructions per command. [`compare`] skips equal 8-byte words
//! with one unaligned 64-bit load per side and finds the first differing byte
//! from the XOR's trailing zeros (wasm is little-endian, so the lowest
//! differing byte is the first one in memory); inlined into the caller it
//! also saves the call. [`crate::key::Key`] orders map keys with it.
//!
//! [`extend`] and [`assign_str`] copy short byte strings the same way: on
//! wasm32 a copy of variable length is a `memory.copy`, which wasmtime runs as
//! a call into the host (≈ 35 machine instructions before the first byte
//! moves), while keys, values and results of a few bytes fit in two
//! overlapping word stores.
//!
//! (Replacing the `memcmp` symbol itself would help every comparison, but a
//! `#[no_mangle]` function of a dependency becomes an export of the guest
//! module, which the ABI's export list does not allow for.)

use core::cmp::Ordering;

/// Bytes compared per step of the word loop.
const WORD_BYTES: usize = 8;
/// Bytes per step for strings of 4..8 bytes.
const HALF_WORD_BYTES: usize = 4;

/// Longest copy [`extend`] does with word stores (two overlapping words).
const SHORT_COPY_BYTES_MAX: usize = 2 * WORD_BYTES;

/// Appends `bytes` to `out`, as `out.extend_from_slice(bytes)`, but copies up
/// to 16 bytes with word stores instead of a `memory.copy` (see the module
/// comment): 8..=16 bytes as two overlapping 8-byte words, 4..8 as two
/// overlapping 4-byte words, fewer one by one. Longer strings take
/// `extend_from_slice`.
#[inline(always)]
pub fn extend(out: &mut Vec<u8>, bytes: &[u8]) {
    let n = bytes.len();
    if n > SHORT_COPY_BYTES_MAX {
        out.extend_from_slice(bytes);
        return;
    }
    out.reserve(n);
    let start = out.len();
    // SAFETY: `reserve(n)` left room for the `n <= 16` bytes that
    // `copy_short_to` writes at the end of `out`, after which they are
    // initialized and `set_len` may cover them.
    unsafe {
        copy_short_to(out.as_mut_ptr().wrapping_add(start), bytes);
        out.set_len(start + n);
    }
}

/// Copies `src` to the start of `dst`, as `dst[..src.len()].copy_from_slice(src)`,
/// with word stores instead of a `memory.copy` (see the module comment). `src` is
/// at most 16 bytes and fits in `dst`.
#[inline(always)]
pub(crate) fn copy_short(dst: &mut [u8], src: &[u8]) {
    assert!(src.len() <= SHORT_COPY_BYTES_MAX && src.len() <= dst.len());
    // SAFETY: checked just above.
    unsafe { copy_short_to(dst.as_mut_ptr(), src) }
}

/// Writes `bytes` (at most 16) to `at`: 8..=16 bytes as two overlapping 8-byte
/// words, 4..8 as two overlapping 4-byte words, fewer one by one.
///
/// # Safety
/// `bytes.len() <= 16`, and `at` is valid for writes of `bytes.len()` bytes.
#[inline(always)]
unsafe fn copy_short_to(at: *mut u8, bytes: &[u8]) {
    let n = bytes.len();
    debug_assert!(n <= SHORT_COPY_BYTES_MAX);
    // SAFETY: each branch writes exactly `[0, n)` at `at` (the helper's
    // contract holds: its word size is at most `n`, and `n` at most twice it).
    unsafe {
        if n >= WORD_BYTES {
            copy_overlapping::<WORD_BYTES>(at, bytes);
        } else if n >= HALF_WORD_BYTES {
            copy_overlapping::<HALF_WORD_BYTES>(at, bytes);
        } else {
            for (i, &byte) in bytes.iter().enumerate() {
                at.add(i).write(byte);
            }
        }
    }
}

/// Copies `bytes` to `at` as two unaligned `W`-byte stores, the first word
/// and the last one (overlapping unless `bytes.len() == 2 * W`).
///
/// # Safety
/// `W <= bytes.len() <= 2 * W`, and `at` is valid for writes of
/// `bytes.len()` bytes.
#[inline(always)]
unsafe fn copy_overlapping<const W: usize>(at: *mut u8, bytes: &[u8]) {
    let n = bytes.len();
    debug_assert!(W <= n && n <= 2 * W);
    let head: [u8; W] = bytes[..W].try_into().unwrap();
    let tail: [u8; W] = bytes[n - W..].try_into().unwrap();
    // SAFETY: `[0, W)` and `[n - W, n)` lie inside the `n` writable bytes
    // (the caller's contract); unaligned stores need no alignment.
    unsafe {
        at.cast::<[u8; W]>().write_unaligned(head);
        at.add(n - W).cast::<[u8; W]>().write_unaligned(tail);
    }
}

/// Makes `slot` equal to `value`, as `value.clone_into(slot)`, reusing its
/// allocation; a short value is copied by [`extend`]. (`clone_into` copies
/// twice, the part that overwrites and the part that extends, each a
/// `memory.copy` on wasm32.)
#[inline(always)]
pub fn assign_str(slot: &mut String, value: &str) {
    // SAFETY: the vector is emptied, then gets all of `value`'s bytes, which
    // are UTF-8 since `value` is a `str`; nothing reads it in between.
    let bytes = unsafe { slot.as_mut_vec() };
    bytes.clear();
    extend(bytes, value.as_bytes());
}

/// The lexicographic order of two byte strings, as `a.cmp(b)` (a proper
/// prefix sorts first).
#[inline(always)]
pub fn compare(a: &[u8], b: &[u8]) -> Ordering {
    // The common case of map keys: the first 8 bytes already differ. Only
    // the byte at the lowest differing position decides, so compare just it
    // (masked in place, no shifts back).
    if a.len() >= WORD_BYTES && b.len() >= WORD_BYTES {
        let x = u64::from_le_bytes(a[..WORD_BYTES].try_into().unwrap());
        let y = u64::from_le_bytes(b[..WORD_BYTES].try_into().unwrap());
        if x != y {
            return word_order(x, y);
        }
        // Keys of up to 16 bytes: the last word of the common prefix
        // overlaps the first, equal one, so its first difference is the
        // prefix's; with none, the shorter key sorts first.
        let n = a.len().min(b.len());
        if n <= 2 * WORD_BYTES {
            let x = u64::from_le_bytes(a[n - WORD_BYTES..n].try_into().unwrap());
            let y = u64::from_le_bytes(b[n - WORD_BYTES..n].try_into().unwrap());
            if x != y {
                return word_order(x, y);
            }
            return a.len().cmp(&b.len());
        }
    }
    compare_rest(a, b)
}

/// The order of two different little-endian words as byte strings: that of
/// their lowest differing bytes. A branch, not `cmp`'s -1/0/1 value: a search
/// loop that inlines [`compare`] then branches once (measured cheaper in the
/// wasm32 guest).
#[inline(always)]
fn word_order(x: u64, y: u64) -> Ordering {
    debug_assert_ne!(x, y);
    let byte = 0xffu64 << ((x ^ y).trailing_zeros() & !7);
    if x & byte < y & byte {
        Ordering::Less
    } else {
        Ordering::Greater
    }
}

/// [`compare`] past its word tests: strings shorter than 8 bytes, or longer
/// than 16 with equal first words.
/// Out of line, so that a search loop that inlines [`compare`] keeps only
/// the first-word test in its body: fewer values live across the loop, which
/// spares a wasm32 guest's compiled code register spills on every step.
#[inline(never)]
fn compare_rest(a: &[u8], b: &[u8]) -> Ordering {
    let n = a.len().min(b.len());
    compare_prefix(&a[..n], &b[..n])
        .cmp(&0)
        .then(a.len().cmp(&b.len()))
}

/// Whether two byte strings are equal, as `a == b`.
#[inline(always)]
pub fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && compare_prefix(a, b) == 0
}

/// `memcmp` over the first `min(a.len(), b.len())` bytes: negative, zero or
/// positive as `a` sorts before, equal to or after `b` there (the
/// difference of the first differing bytes, like the C function).
///
/// Every length takes whole-word loads: 8 bytes per step, and the last word
/// overlapping the one before (its bytes before the overlap are known equal,
/// so its first difference is the first one); 4..8 bytes as two overlapping
/// 4-byte words; only 1..3 bytes go one at a time.
#[inline(always)]
fn compare_prefix(a: &[u8], b: &[u8]) -> i32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    if n >= WORD_BYTES {
        let mut i = 0;
        loop {
            let x = u64::from_le_bytes(a[i..i + WORD_BYTES].try_into().unwrap());
            let y = u64::from_le_bytes(b[i..i + WORD_BYTES].try_into().unwrap());
            if x != y {
                return first_difference(x, y);
            }
            i += WORD_BYTES;
            if i >= n {
                return 0;
            }
            // The last step overlaps the previous one.
            i = i.min(n - WORD_BYTES);
        }
    }
    if n >= HALF_WORD_BYTES {
        for i in [0, n - HALF_WORD_BYTES] {
            let x = u32::from_le_bytes(a[i..i + HALF_WORD_BYTES].try_into().unwrap());
            let y = u32::from_le_bytes(b[i..i + HALF_WORD_BYTES].try_into().unwrap());
            if x != y {
                return first_difference(u64::from(x), u64::from(y));
            }
        }
        return 0;
    }
    for i in 0..n {
        if a[i] != b[i] {
            return i32::from(a[i]) - i32::from(b[i]);
        }
    }
    0
}

/// The difference of the lowest differing bytes of `x != y`, which are the
/// first differing bytes in memory order (little-endian loads).
#[inline(always)]
fn first_difference(x: u64, y: u64) -> i32 {
    let shift = (x ^ y).trailing_zeros() & !7;
    ((x >> shift) & 0xff) as i32 - ((y >> shift) & 0xff) as i32
}

#[cfg(test)]
mod tests {
    use super::{assign_str, compare, compare_prefix, copy_short, equal, extend};

    #[test]
    fn copy_short_copies_every_length_exactly() {
        for len in 0..=16usize {
            let src: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
            let mut dst = [0xeeu8; 20];
            copy_short(&mut dst, &src);
            assert_eq!(&dst[..len], &src[..], "len {len}");
            assert!(dst[len..].iter().all(|&b| b == 0xee), "len {len}");
        }
    }

    #[test]
    fn extend_and_assign_copy_every_length_exactly() {
        for prefix in 0..3usize {
            for len in 0..=40usize {
                let bytes: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
                let mut out: Vec<u8> = (0..prefix as u8).collect();
                let mut expected = out.clone();
                expected.extend_from_slice(&bytes);
                extend(&mut out, &bytes);
                assert_eq!(out, expected, "prefix {prefix}, len {len}");
                // A full buffer (no spare room) takes the same path.
                let mut tight = Vec::with_capacity(prefix);
                tight.extend_from_slice(&expected[..prefix]);
                extend(&mut tight, &bytes);
                assert_eq!(tight, expected, "tight, prefix {prefix}, len {len}");
            }
        }
        let text = "añb€c🦀defghijklmnopq";
        for end in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
            for old in ["", "x", "longer old value!", "ünïcödé"] {
                let mut slot = old.to_string();
                assign_str(&mut slot, &text[..end]);
                assert_eq!(slot, &text[..end]);
            }
        }
    }

    fn check(a: &[u8], b: &[u8]) {
        assert_eq!(compare(a, b), a.cmp(b), "{a:?} vs {b:?}");
        assert_eq!(equal(a, b), a == b, "{a:?} vs {b:?}");
        let n = a.len().min(b.len());
        let got = compare_prefix(a, b);
        assert_eq!(
            got.cmp(&0),
            a[..n].cmp(&b[..n]),
            "{a:?} vs {b:?} gave {got}"
        );
        if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
            assert_eq!(got, a[i] as i32 - b[i] as i32, "{a:?} vs {b:?}");
        } else {
            assert_eq!(got, 0);
        }
    }

    #[test]
    fn agrees_with_byte_order_at_every_position_and_length() {
        for len in 0..=40usize {
            let base: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37)).collect();
            check(&base, &base);
            for at in 0..len {
                for delta in [1u8, 0x7f, 0x80, 0xff] {
                    let mut other = base.clone();
                    other[at] = other[at].wrapping_add(delta);
                    check(&base, &other);
                    check(&other, &base);
                    // A later difference must not override an earlier one.
                    if at + 1 < len {
                        other[len - 1] = other[len - 1].wrapping_sub(delta);
                        check(&base, &other);
                        check(&other, &base);
                    }
                }
            }
        }
    }

    #[test]
    fn pseudo_random_pairs_agree() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let a: Vec<u8> = (0..next() % 24).map(|_| (next() % 3) as u8).collect();
            let b: Vec<u8> = (0..next() % 24).map(|_| (next() % 3) as u8).collect();
            check(&a, &b);
            // Prefixes of each other, of every length.
            check(&a, &a[..a.len() / 2]);
            check(&a[..a.len() / 3], &a);
        }
    }
}
