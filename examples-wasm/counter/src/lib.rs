//! Example guest: a replicated signed 64-bit counter.
//!
//! Commands: `add N` → the new value; `get` → the value.
//! Queries: `get` → the value.
//! Malformed input → `ERR <reason>` and no change (guest-sdk/ABI.md, "Examples").
#![forbid(unsafe_code)]

use paxwasm_guest::text::{err, i64_bytes, parse_i64, push_err, push_i64, words};
use paxwasm_guest::{export_app, App};

#[derive(Debug, Default)]
pub struct Counter {
    value: i64,
}

impl Counter {
    pub fn value(&self) -> i64 {
        self.value
    }
}

impl App for Counter {
    fn apply(&mut self, cmd: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.apply_into(cmd, &mut out);
        out
    }

    /// The real `apply`: writes into the SDK's reused buffer, so a command
    /// allocates nothing.
    fn apply_into(&mut self, cmd: &[u8], out: &mut Vec<u8>) {
        // Fast path for the common exact form `add N`; anything else (extra
        // spaces, errors) takes the general path below, with the same result.
        if let Some(n) = cmd.strip_prefix(b"add ").and_then(parse_i64) {
            if let Some(value) = self.value.checked_add(n) {
                self.value = value;
                return push_i64(out, value);
            }
        }
        let words = match words::<3>(cmd) {
            Ok(words) => words,
            Err(refusal) => return *out = refusal,
        };
        match words.as_slice() {
            ["add", n] => {
                let Ok(n) = n.parse::<i64>() else {
                    return push_err(out, "usage: add N");
                };
                let Some(value) = self.value.checked_add(n) else {
                    return push_err(out, "overflow");
                };
                self.value = value;
                push_i64(out, value);
            }
            ["get"] => push_i64(out, self.value),
            ["add", ..] => push_err(out, "usage: add N"),
            ["get", ..] => push_err(out, "usage: get"),
            _ => push_err(out, "unknown command"),
        }
    }

    fn query(&self, query: &[u8]) -> Vec<u8> {
        let words = match words::<2>(query) {
            Ok(words) => words,
            Err(refusal) => return refusal,
        };
        match words.as_slice() {
            ["get"] => i64_bytes(self.value),
            ["get", ..] => err("usage: get"),
            _ => err("unknown query"),
        }
    }
}

export_app!(Counter);

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies each command in order and returns the results as text.
    fn run(counter: &mut Counter, cmds: &[&str]) -> Vec<String> {
        cmds.iter()
            .map(|cmd| String::from_utf8(counter.apply(cmd.as_bytes())).unwrap())
            .collect()
    }

    fn query(counter: &Counter, q: &str) -> String {
        String::from_utf8(counter.query(q.as_bytes())).unwrap()
    }

    #[test]
    fn add_returns_the_new_value_and_get_reads_it() {
        let mut counter = Counter::default();
        assert_eq!(query(&counter, "get"), "0");
        assert_eq!(
            run(&mut counter, &["add 5", "add -7", "add +3", "get"]),
            ["5", "-2", "1", "1"]
        );
        assert_eq!(query(&counter, "get"), "1");
    }

    #[test]
    fn malformed_commands_are_refused_and_change_nothing() {
        let mut counter = Counter::default();
        run(&mut counter, &["add 10"]);
        let results = run(
            &mut counter,
            &[
                "add", "add x", "add 1 2", "add 1.5", "get 1", "sub 1", "", "ADD 1",
            ],
        );
        assert_eq!(
            results,
            [
                "ERR usage: add N",
                "ERR usage: add N",
                "ERR usage: add N",
                "ERR usage: add N",
                "ERR usage: get",
                "ERR unknown command",
                "ERR unknown command",
                "ERR unknown command",
            ]
        );
        assert_eq!(counter.apply(b"add \xff"), b"ERR not UTF-8");
        assert_eq!(counter.apply(b"add 1 2 3"), b"ERR too many words");
        assert_eq!(counter.value(), 10);
    }

    #[test]
    fn overflow_is_refused_and_changes_nothing() {
        let mut counter = Counter::default();
        assert_eq!(
            run(&mut counter, &["add 9223372036854775807", "add 1"]),
            ["9223372036854775807", "ERR overflow"]
        );
        assert_eq!(run(&mut counter, &["add -9223372036854775808"]), ["-1"]);
        assert_eq!(counter.value(), -1);
    }

    #[test]
    fn queries_are_read_only_and_strict() {
        let counter = Counter::default();
        assert_eq!(query(&counter, "add 1"), "ERR unknown query");
        assert_eq!(query(&counter, "get x"), "ERR usage: get");
        assert_eq!(query(&counter, "get\n"), "0");
    }
}
