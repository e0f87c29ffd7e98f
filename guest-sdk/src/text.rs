//! Small helpers for text protocols like the examples' (ABI.md "Examples"),
//! cheap enough for the apply path: no formatting machinery, no allocation
//! beyond the output itself.

/// `"00" "01" .. "99"`: two decimal digits per table entry, so formatting
/// takes one division per two digits.
const DIGIT_PAIRS: &[u8; 200] = b"\
0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// Decimal digits of `u64::MAX`.
const U64_DIGITS_MAX: usize = 20;

/// Powers of ten, `POW10[k] = 10^k`, for counting digits.
const POW10: [u64; U64_DIGITS_MAX] = {
    let mut table = [1u64; U64_DIGITS_MAX];
    let mut k = 1;
    while k < U64_DIGITS_MAX {
        table[k] = table[k - 1] * 10;
        k += 1;
    }
    table
};

/// Number of decimal digits of `value` (1 for 0): from the bit length
/// (`1233 / 4096` ≈ log10 2) and one table lookup, no division. `value | 1`
/// counts 0 as 1 and changes no other count (powers of ten above 1 are even).
#[inline]
fn decimal_digits(value: u64) -> usize {
    let value = value | 1;
    let bits = 64 - value.leading_zeros() as usize;
    let guess = (bits * 1233) >> 12;
    guess + 1 - usize::from(value < POW10[guess])
}

/// `n / 100` as a multiplication and a shift: wasm32 code gets a real
/// division instruction for `/ 100` otherwise. `2^37 / 100` rounded up is
/// exact for every u32 (the rounding error, 28 / 2^37 per unit of `n`, stays
/// below 1 / 100 for `n < 2^32`).
#[inline(always)]
fn div100(n: u32) -> u32 {
    ((u64::from(n) * 1_374_389_535) >> 37) as u32
}

/// Appends the decimal form of `value`.
///
/// Written for wasm32 guests, where it runs on every command of the
/// examples: two digits per division, 32-bit divisions (which compile to a
/// multiplication) below 2^32, and one fixed-size copy into `out` (a
/// variable-length copy would be a `memory.copy`, a call into the host).
pub fn push_u64(out: &mut Vec<u8>, value: u64) {
    let len = decimal_digits(value);
    let mut digits = [0u8; U64_DIGITS_MAX];
    let mut end = len;
    let mut rest = value;
    // At most two rounds: u64::MAX / 10^8 / 10^8 < 2^32.
    while rest > u64::from(u32::MAX) {
        let mut low = (rest % 100_000_000) as u32;
        rest /= 100_000_000;
        for _ in 0..4 {
            end -= 2;
            let quotient = div100(low);
            let pair = (low - quotient * 100) as usize * 2;
            low = quotient;
            digits[end..end + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
        }
    }
    let mut rest = rest as u32;
    while rest >= 100 {
        end -= 2;
        let quotient = div100(rest);
        let pair = (rest - quotient * 100) as usize * 2;
        rest = quotient;
        digits[end..end + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    }
    if rest >= 10 {
        let pair = rest as usize * 2;
        digits[..2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    } else {
        digits[0] = b'0' + rest as u8;
    }
    let start = out.len();
    out.extend_from_slice(&digits);
    out.truncate(start + len);
}

/// Appends the decimal form of `value`, with a leading `-` when negative.
#[inline]
pub fn push_i64(out: &mut Vec<u8>, value: i64) {
    if value < 0 {
        out.push(b'-');
    }
    push_u64(out, value.unsigned_abs());
}

/// Reads a decimal `u64` exactly as `u64::from_str` does (an optional `+`,
/// then one or more ASCII digits, no overflow), without the UTF-8 check and
/// the generic parser: the examples' fast paths read numbers with it.
#[inline]
pub fn parse_u64(text: &[u8]) -> Option<u64> {
    match text {
        [b'+', digits @ ..] => parse_digits(digits),
        digits => parse_digits(digits),
    }
}

/// Reads a decimal `i64` exactly as `i64::from_str` does (an optional `+` or
/// `-`, then one or more ASCII digits, within range).
#[inline]
pub fn parse_i64(text: &[u8]) -> Option<i64> {
    match text {
        [b'-', digits @ ..] => {
            let magnitude = parse_digits(digits)?;
            // -(2^63) is i64::MIN; anything larger does not fit.
            (magnitude <= i64::MIN.unsigned_abs()).then(|| 0i64.wrapping_sub_unsigned(magnitude))
        }
        [b'+', digits @ ..] => i64::try_from(parse_digits(digits)?).ok(),
        digits => i64::try_from(parse_digits(digits)?).ok(),
    }
}

/// Decimal digits that cannot overflow a u64 (10^19 - 1 < 2^64).
const U64_DIGITS_SAFE: usize = 19;

/// One or more ASCII digits as a u64, `None` on anything else or overflow.
#[inline]
fn parse_digits(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > U64_DIGITS_SAFE {
        return parse_digits_checked(digits);
    }
    let mut value: u64 = 0;
    for &byte in digits {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        value = value * 10 + u64::from(digit);
    }
    Some(value)
}

/// [`parse_digits`] for the rare inputs that may overflow (long runs of
/// leading zeros included): out of line, so the common path needs no
/// 128-bit multiplication and no stack frame.
#[cold]
#[inline(never)]
fn parse_digits_checked(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    let mut value: u64 = 0;
    for &byte in digits {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(digit))?;
    }
    Some(value)
}

/// The decimal form of `value` as a fresh result buffer.
pub fn u64_bytes(value: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    push_u64(&mut out, value);
    out
}

/// The decimal form of `value` as a fresh result buffer.
pub fn i64_bytes(value: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    push_i64(&mut out, value);
    out
}

/// `ERR <reason>`, the examples' result for a malformed command.
pub fn err(reason: &str) -> Vec<u8> {
    [b"ERR ", reason.as_bytes()].concat()
}

/// Appends `ERR <reason>`, as [`err`] without allocating a new buffer.
pub fn push_err(out: &mut Vec<u8>, reason: &str) {
    out.extend_from_slice(b"ERR ");
    out.extend_from_slice(reason.as_bytes());
}

/// Up to `N` space-separated words of a command, borrowed from it, so that a
/// command can be matched as a slice pattern without allocating:
/// `match words.as_slice() { ["add", n] => ..., _ => ... }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Words<'a, const N: usize> {
    words: [&'a str; N],
    len: usize,
}

impl<'a, const N: usize> Words<'a, N> {
    pub fn as_slice(&self) -> &[&'a str] {
        &self.words[..self.len]
    }
}

/// Splits `cmd` into words separated by ASCII whitespace (runs of spaces, a
/// trailing newline and so on are all one separator). The error is a ready
/// `ERR` result: `ERR not UTF-8` or `ERR too many words` (more than `N`).
/// Choose `N` one larger than the longest command so that a command with one
/// word too many still reaches the caller's usage message.
pub fn words<const N: usize>(cmd: &[u8]) -> Result<Words<'_, N>, Vec<u8>> {
    let text = utf8(cmd).ok_or_else(|| err("not UTF-8"))?;
    let bytes = text.as_bytes();
    let mut list = [""; N];
    // A local count (not the field of the result): in a wasm32 guest the
    // result lives in linear memory, the local in a register.
    let mut count = 0;
    // `split_ascii_whitespace` by hand: its iterator adapters cost several
    // times this loop in a wasm32 guest.
    let mut i = 0;
    loop {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == bytes.len() {
            return Ok(Words {
                words: list,
                len: count,
            });
        }
        let start = i;
        i = skip_word_bytes(bytes, i);
        while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if count == N {
            return Err(err("too many words"));
        }
        debug_assert!(start < i && i <= bytes.len());
        debug_assert!(text.is_char_boundary(start) && text.is_char_boundary(i));
        // SAFETY: `start < i <= text.len()` (the loops above only advance
        // within `bytes`), and both are char boundaries: `start` is the
        // first byte after ASCII whitespace (or 0) and `i` is at ASCII
        // whitespace (or the end), and an ASCII byte always starts a char.
        // (`&text[start..i]` would check both again, per word.)
        list[count] = unsafe { text.get_unchecked(start..i) };
        count += 1;
    }
}

/// Bytes checked per step of the ASCII test.
const ASCII_WORD_BYTES: usize = 8;
/// ... and for inputs of 4..8 bytes, as two overlapping halves.
const ASCII_HALF_WORD_BYTES: usize = 4;

/// Each byte of a u64 set to 1; times `b`, each byte set to `b`.
const EACH_BYTE: u64 = 0x0101_0101_0101_0101;
/// The high bit of each byte of a u64.
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
/// The smallest byte that is no ASCII whitespace and no control character:
/// every whitespace byte (`\t \n \x0c \r` and space) is below it.
const ABOVE_WHITESPACE: u64 = 0x21;

/// From `i`, inside a word, the position of the first byte that may be
/// whitespace (a byte below 0x21), found 8 bytes per step; stops early at
/// the last 8 bytes, which the caller's byte loop finishes. A byte loop costs
/// a wasm32 guest a fuel check and several branches per byte, which a word
/// step spreads over eight.
#[inline(always)]
fn skip_word_bytes(bytes: &[u8], mut i: usize) -> usize {
    while i + ASCII_WORD_BYTES <= bytes.len() {
        let word = u64::from_le_bytes(bytes[i..i + ASCII_WORD_BYTES].try_into().unwrap());
        // The high bit of a byte below 0x21 (and with no borrow from below:
        // a borrow only comes from such a byte, so the lowest flagged byte is
        // exact, and no flag means no such byte). Bytes of 0x80 and above
        // (UTF-8 sequences) are never flagged, never whitespace.
        let low = word.wrapping_sub(EACH_BYTE * ABOVE_WHITESPACE) & !word & HIGH_BITS;
        if low != 0 {
            return i + (low.trailing_zeros() / 8) as usize;
        }
        i += ASCII_WORD_BYTES;
    }
    i
}

/// `cmd` as UTF-8: all-ASCII input (the examples' protocols) is recognised
/// 8 bytes per step; anything else goes through `str::from_utf8`.
#[inline]
fn utf8(cmd: &[u8]) -> Option<&str> {
    let n = cmd.len();
    let mut high_bits = 0u64;
    if n >= ASCII_WORD_BYTES {
        let mut chunks = cmd.chunks_exact(ASCII_WORD_BYTES);
        for chunk in &mut chunks {
            high_bits |= u64::from_le_bytes(chunk.try_into().unwrap());
        }
        // The last 8 bytes, overlapping the chunks, cover the remainder in
        // one step instead of a byte loop.
        high_bits |= u64::from_le_bytes(cmd[n - ASCII_WORD_BYTES..].try_into().unwrap());
    } else if n >= ASCII_HALF_WORD_BYTES {
        let head = u32::from_le_bytes(cmd[..ASCII_HALF_WORD_BYTES].try_into().unwrap());
        let tail = u32::from_le_bytes(cmd[n - ASCII_HALF_WORD_BYTES..].try_into().unwrap());
        high_bits = u64::from(head | tail);
    } else {
        for &byte in cmd {
            high_bits |= u64::from(byte);
        }
    }
    if high_bits & HIGH_BITS == 0 {
        // SAFETY: every byte is below 0x80, i.e. ASCII, which is valid UTF-8.
        Some(unsafe { core::str::from_utf8_unchecked(cmd) })
    } else {
        core::str::from_utf8(cmd).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_on_any_ascii_whitespace() {
        let split = words::<4>(b"  put\tk   v\n").unwrap();
        assert_eq!(split.as_slice(), ["put", "k", "v"]);
        assert_eq!(words::<4>(b"").unwrap().as_slice(), [] as [&str; 0]);
    }

    #[test]
    fn words_split_like_split_ascii_whitespace() {
        let samples = [
            "",
            " ",
            "a",
            " a",
            "a ",
            "a  b",
            "\ta\nb\x0cc\rd e",
            "put k v",
            "put  k\u{a0}v",
            "é ü",
            "cas key00001 value-1 value-2",
            "x\x0by",
            "a\u{2003}b",
            "12345678 9",
            "abcdefghijklmnopqrstuvwxyz 0123456789abcdef\tx",
            "abcdefgh\x01ijklmnop\x1fq r",
            "ééééééé ü\u{2003}üüüüüüüü\u{a0}x y",
            "put key00123 value-123",
            "12345678",
            "1234567 ",
            "        12345678        ",
        ];
        for sample in samples {
            let expected: Vec<&str> = sample.split_ascii_whitespace().collect();
            let got = words::<8>(sample.as_bytes()).unwrap();
            assert_eq!(got.as_slice(), expected.as_slice(), "{sample:?}");
        }
        // Every byte value at every position of a word, around the 8-byte
        // steps.
        for at in 0..20 {
            for byte in 0..=0x7fu8 {
                let mut sample = vec![b'a'; 20];
                sample[at] = byte;
                let sample = String::from_utf8(sample).unwrap();
                let expected: Vec<&str> = sample.split_ascii_whitespace().collect();
                let got = words::<8>(sample.as_bytes()).unwrap();
                assert_eq!(got.as_slice(), expected.as_slice(), "{sample:?}");
            }
        }
        // A non-ASCII byte at every position of every short length: UTF-8
        // or not, exactly as `str::from_utf8` decides.
        for len in 1..20 {
            for at in 0..len {
                for byte in [0x80u8, 0xc3, 0xff] {
                    let mut sample = vec![b'a'; len];
                    sample[at] = byte;
                    assert_eq!(
                        words::<8>(&sample).is_ok(),
                        std::str::from_utf8(&sample).is_ok()
                    );
                    if at + 1 < len {
                        sample[at + 1] = 0xa9;
                        assert_eq!(
                            words::<8>(&sample).is_ok(),
                            std::str::from_utf8(&sample).is_ok(),
                            "{sample:?}"
                        );
                    }
                }
            }
        }
        // Invalid UTF-8 after 8 ASCII bytes, and in the tail.
        assert_eq!(words::<4>(b"abcdefgh\xc3(").unwrap_err(), b"ERR not UTF-8");
        assert_eq!(words::<4>(b"ab\x80").unwrap_err(), b"ERR not UTF-8");
    }

    #[test]
    fn words_refuse_bad_utf8_and_too_many_words() {
        assert_eq!(words::<4>(b"put \xff v").unwrap_err(), b"ERR not UTF-8");
        assert_eq!(words::<2>(b"a b c").unwrap_err(), b"ERR too many words");
        assert_eq!(words::<3>(b"a b c").unwrap().as_slice(), ["a", "b", "c"]);
    }

    #[test]
    fn integers_format_like_display() {
        for value in [0, 1, 9, 10, 99, 100, 12_345, u64::MAX / 10, u64::MAX] {
            assert_eq!(u64_bytes(value), value.to_string().into_bytes());
        }
        for value in [0, -1, 1, -10, 42, i64::MIN, i64::MAX, i64::MIN + 1] {
            assert_eq!(i64_bytes(value), value.to_string().into_bytes());
        }
    }

    #[test]
    fn div100_is_exact() {
        let mut state = 0x9e37_79b9u32;
        for n in (0..1_000_000u32).chain(u32::MAX - 1_000_000..=u32::MAX) {
            assert_eq!(div100(n), n / 100, "{n}");
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            assert_eq!(div100(state), state / 100, "{state}");
        }
    }

    #[test]
    fn digit_counts_are_exact_at_every_power_of_ten() {
        for (k, &p) in POW10.iter().enumerate() {
            assert_eq!(decimal_digits(p), k + 1, "{p}");
            if p > 1 {
                assert_eq!(decimal_digits(p - 1), k, "{}", p - 1);
            }
        }
        assert_eq!(decimal_digits(0), 1);
        assert_eq!(decimal_digits(u64::MAX), 20);
    }

    #[test]
    fn integers_format_like_display_around_every_power_of_ten() {
        let mut values = vec![0u64, u64::MAX, u64::from(u32::MAX), u64::from(u32::MAX) + 1];
        for p in POW10 {
            for delta in [-2i64, -1, 0, 1, 2] {
                values.push(p.wrapping_add_signed(delta));
                values.push((p / 3).saturating_mul(7).wrapping_add_signed(delta));
            }
        }
        for value in values {
            assert_eq!(u64_bytes(value), value.to_string().into_bytes(), "{value}");
            let signed = value as i64;
            assert_eq!(
                i64_bytes(signed),
                signed.to_string().into_bytes(),
                "{signed}"
            );
        }
    }

    /// The parsers must accept and refuse exactly what `from_str` does: the
    /// examples' fast paths rely on it for identical results.
    #[test]
    fn parsers_agree_with_from_str() {
        let mut inputs: Vec<String> = [
            "",
            "+",
            "-",
            "0",
            "-0",
            "+0",
            "00",
            "007",
            "1",
            "+1",
            "-1",
            "++1",
            "+-1",
            "-+1",
            "--1",
            " 1",
            "1 ",
            "1a",
            "a1",
            "12x3",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "-9223372036854775809",
            "18446744073709551615",
            "18446744073709551616",
            "+18446744073709551615",
            "99999999999999999999",
            "0000000000000000000000001",
            "-0000000000000000000000001",
            "١",
            "1\u{0}",
            "/",
            ":",
            "1/",
            "1:",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..5_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let digits = (state % 22) as usize;
            let mut text = match state >> 60 {
                0 => "-".to_string(),
                1 => "+".to_string(),
                _ => String::new(),
            };
            for i in 0..digits {
                text.push(char::from(b'0' + ((state >> (i * 2 % 56)) % 10) as u8));
            }
            inputs.push(text);
        }
        for text in inputs {
            assert_eq!(
                parse_u64(text.as_bytes()),
                text.parse::<u64>().ok(),
                "u64 {text:?}"
            );
            assert_eq!(
                parse_i64(text.as_bytes()),
                text.parse::<i64>().ok(),
                "i64 {text:?}"
            );
        }
    }

    #[test]
    fn push_appends_after_existing_bytes() {
        let mut out = b"MISMATCH ".to_vec();
        push_i64(&mut out, -7);
        assert_eq!(out, b"MISMATCH -7");
    }

    #[test]
    fn err_prefixes_the_reason() {
        assert_eq!(err("usage: add N"), b"ERR usage: add N");
        let mut out = b"kept ".to_vec();
        push_err(&mut out, "overflow");
        assert_eq!(out, b"kept ERR overflow");
    }
}
