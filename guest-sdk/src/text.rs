//! Small helpers for text protocols like the examples' (ABI.md "Examples"),
//! cheap enough for the apply path: no formatting machinery, no allocation
//! beyond the output itself.

/// Appends the decimal form of `value`.
pub fn push_u64(out: &mut Vec<u8>, mut value: u64) {
    // u64::MAX has 20 digits.
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// Appends the decimal form of `value`, with a leading `-` when negative.
pub fn push_i64(out: &mut Vec<u8>, value: i64) {
    if value < 0 {
        out.push(b'-');
    }
    push_u64(out, value.unsigned_abs());
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
    let text = std::str::from_utf8(cmd).map_err(|_| err("not UTF-8"))?;
    let mut words = Words {
        words: [""; N],
        len: 0,
    };
    for word in text.split_ascii_whitespace() {
        if words.len == N {
            return Err(err("too many words"));
        }
        words.words[words.len] = word;
        words.len += 1;
    }
    Ok(words)
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
