//! Example guest: bank accounts with transfers that conserve money.
//!
//! Commands (words separated by spaces; amounts are unsigned 64-bit integers):
//! - `open ACCT AMOUNT` → `OK`; `ERR account exists` if ACCT is open already
//!   (its balance is unchanged); `ERR overflow` if the bank's total would pass
//!   2^64-1
//! - `transfer FROM TO AMOUNT` → `OK`, or `INSUFFICIENT` if FROM holds less
//!   than AMOUNT (nothing moves); `ERR no such account: X` for an unknown
//!   account. FROM = TO is allowed and moves nothing.
//! - `balance ACCT` → the balance, or `NOT_FOUND`
//! - `total` → the sum of all balances
//!
//! Queries: `balance ACCT`, `total`. Malformed input → `ERR <reason>` and no
//! change. Transfers never change the total: only `open` adds money.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use paxwasm_guest::text::{err, u64_bytes, words};
use paxwasm_guest::{export_app, App};

#[derive(Debug, Default)]
pub struct Bank {
    /// Ordered, so that the state is laid out the same on every replica.
    balances: BTreeMap<String, u64>,
    /// Money brought in by `open`; the sum of `balances` always equals it.
    total: u64,
}

const OK: &[u8] = b"OK";

impl Bank {
    pub fn balance(&self, account: &str) -> Option<u64> {
        self.balances.get(account).copied()
    }

    /// The sum of all balances, checked against the money ever opened.
    pub fn total(&self) -> u64 {
        let sum = self
            .balances
            .values()
            .try_fold(0u64, |sum, &balance| sum.checked_add(balance))
            .expect("balances sum to at most the total, which fits in u64");
        assert_eq!(sum, self.total, "transfers must conserve money");
        sum
    }

    fn open(&mut self, account: &str, amount: u64) -> Vec<u8> {
        if self.balances.contains_key(account) {
            return err("account exists");
        }
        let Some(total) = self.total.checked_add(amount) else {
            return err("overflow");
        };
        self.total = total;
        self.balances.insert(account.to_owned(), amount);
        OK.to_vec()
    }

    fn transfer(&mut self, from: &str, to: &str, amount: u64) -> Vec<u8> {
        for account in [from, to] {
            if !self.balances.contains_key(account) {
                return err(&format!("no such account: {account}"));
            }
        }
        let from_balance = self.balances.get_mut(from).expect("checked above");
        if *from_balance < amount {
            return b"INSUFFICIENT".to_vec();
        }
        // Debit first: when FROM = TO the credit then restores the balance.
        *from_balance -= amount;
        let to_balance = self.balances.get_mut(to).expect("checked above");
        // Cannot overflow: every balance is part of a total that fits in u64.
        *to_balance += amount;
        OK.to_vec()
    }

    fn read(&self, words: &[&str]) -> Option<Vec<u8>> {
        Some(match *words {
            ["balance", account] => match self.balance(account) {
                Some(balance) => u64_bytes(balance),
                None => b"NOT_FOUND".to_vec(),
            },
            ["total"] => u64_bytes(self.total()),
            ["balance", ..] => err("usage: balance ACCT"),
            ["total", ..] => err("usage: total"),
            _ => return None,
        })
    }
}

impl App for Bank {
    fn apply(&mut self, cmd: &[u8]) -> Vec<u8> {
        let words = match words::<5>(cmd) {
            Ok(words) => words,
            Err(refusal) => return refusal,
        };
        if let Some(result) = self.read(words.as_slice()) {
            return result;
        }
        match *words.as_slice() {
            ["open", account, amount] => match amount.parse::<u64>() {
                Ok(amount) => self.open(account, amount),
                Err(_) => err("usage: open ACCT AMOUNT"),
            },
            ["transfer", from, to, amount] => match amount.parse::<u64>() {
                Ok(amount) => self.transfer(from, to, amount),
                Err(_) => err("usage: transfer FROM TO AMOUNT"),
            },
            ["open", ..] => err("usage: open ACCT AMOUNT"),
            ["transfer", ..] => err("usage: transfer FROM TO AMOUNT"),
            _ => err("unknown command"),
        }
    }

    fn query(&self, query: &[u8]) -> Vec<u8> {
        let words = match words::<3>(query) {
            Ok(words) => words,
            Err(refusal) => return refusal,
        };
        self.read(words.as_slice())
            .unwrap_or_else(|| err("unknown query"))
    }
}

export_app!(Bank);

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bank: &mut Bank, cmds: &[&str]) -> Vec<String> {
        cmds.iter()
            .map(|cmd| String::from_utf8(bank.apply(cmd.as_bytes())).unwrap())
            .collect()
    }

    fn query(bank: &Bank, q: &str) -> String {
        String::from_utf8(bank.query(q.as_bytes())).unwrap()
    }

    #[test]
    fn open_transfer_balance_total() {
        let mut bank = Bank::default();
        assert_eq!(
            run(
                &mut bank,
                &[
                    "open alice 100",
                    "open bob 5",
                    "transfer alice bob 30",
                    "balance alice",
                    "balance bob",
                    "total"
                ]
            ),
            ["OK", "OK", "OK", "70", "35", "105"]
        );
        assert_eq!(query(&bank, "balance bob"), "35");
        assert_eq!(query(&bank, "balance carol"), "NOT_FOUND");
        assert_eq!(query(&bank, "total"), "105");
    }

    #[test]
    fn insufficient_funds_move_nothing() {
        let mut bank = Bank::default();
        run(&mut bank, &["open a 10", "open b 0"]);
        assert_eq!(
            run(
                &mut bank,
                &["transfer a b 11", "transfer b a 1", "transfer a b 10"]
            ),
            ["INSUFFICIENT", "INSUFFICIENT", "OK"]
        );
        assert_eq!((bank.balance("a"), bank.balance("b")), (Some(0), Some(10)));
    }

    #[test]
    fn transfer_to_self_and_zero_amounts_move_nothing() {
        let mut bank = Bank::default();
        run(&mut bank, &["open a 10", "open b 1"]);
        assert_eq!(
            run(
                &mut bank,
                &["transfer a a 10", "transfer a a 11", "transfer a b 0"]
            ),
            ["OK", "INSUFFICIENT", "OK"]
        );
        assert_eq!((bank.balance("a"), bank.balance("b")), (Some(10), Some(1)));
    }

    #[test]
    fn duplicate_open_and_unknown_accounts_are_refused() {
        let mut bank = Bank::default();
        run(&mut bank, &["open a 10"]);
        assert_eq!(
            run(
                &mut bank,
                &["open a 99", "transfer a x 1", "transfer x a 1", "balance x"]
            ),
            [
                "ERR account exists",
                "ERR no such account: x",
                "ERR no such account: x",
                "NOT_FOUND"
            ]
        );
        assert_eq!(bank.balance("a"), Some(10));
        assert_eq!(bank.total(), 10);
    }

    #[test]
    fn the_total_cannot_overflow() {
        let mut bank = Bank::default();
        assert_eq!(
            run(
                &mut bank,
                &["open a 18446744073709551615", "open b 1", "open c 0"]
            ),
            ["OK", "ERR overflow", "OK"]
        );
        assert_eq!(
            run(&mut bank, &["transfer a c 18446744073709551615", "total"]),
            ["OK", "18446744073709551615"]
        );
        assert_eq!(bank.balance("b"), None);
    }

    #[test]
    fn malformed_commands_are_refused() {
        let mut bank = Bank::default();
        assert_eq!(
            run(
                &mut bank,
                &[
                    "open a",
                    "open a -1",
                    "open a 1.5",
                    "transfer a b",
                    "transfer a b x",
                    "balance",
                    "total x",
                    "close a",
                    ""
                ]
            ),
            [
                "ERR usage: open ACCT AMOUNT",
                "ERR usage: open ACCT AMOUNT",
                "ERR usage: open ACCT AMOUNT",
                "ERR usage: transfer FROM TO AMOUNT",
                "ERR usage: transfer FROM TO AMOUNT",
                "ERR usage: balance ACCT",
                "ERR usage: total",
                "ERR unknown command",
                "ERR unknown command",
            ]
        );
        assert_eq!(query(&bank, "open a 1"), "ERR unknown query");
        assert_eq!(bank.total(), 0);
    }

    /// Many transfers between a few accounts, chosen by a fixed-seed
    /// generator: whatever succeeds or fails, the total stays what was opened.
    #[test]
    fn transfers_conserve_the_total() {
        let mut bank = Bank::default();
        let accounts = ["a", "b", "c", "d"];
        for (i, account) in accounts.iter().enumerate() {
            bank.apply(format!("open {account} {}", (i + 1) * 1000).as_bytes());
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            // xorshift64: deterministic, good enough to pick test cases.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut insufficient = 0;
        for _ in 0..10_000 {
            let from = accounts[(next() % 4) as usize];
            let to = accounts[(next() % 4) as usize];
            let amount = next() % 3000;
            match bank
                .apply(format!("transfer {from} {to} {amount}").as_bytes())
                .as_slice()
            {
                b"OK" => {}
                b"INSUFFICIENT" => insufficient += 1,
                other => panic!("unexpected {:?}", String::from_utf8_lossy(other)),
            }
            assert_eq!(bank.total(), 10_000);
        }
        // Both outcomes were exercised.
        assert!(insufficient > 0 && insufficient < 10_000, "{insufficient}");
    }
}
