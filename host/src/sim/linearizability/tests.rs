//! Tests of the checker at its boundary: histories in, verdicts out.

use super::generated::{
    generate, generate_clients, make_non_monotonic_read, make_stale_read, ClientsConfig,
    GeneratorConfig, Rng,
};
use super::*;

// ---- History builders -------------------------------------------------------

fn get(key: &str) -> KvInput {
    KvInput::Get {
        key: key.to_string(),
    }
}

fn put(key: &str, value: &str) -> KvInput {
    KvInput::Put {
        key: key.to_string(),
        value: value.to_string(),
    }
}

fn cas(key: &str, expected: Option<&str>, new: &str) -> KvInput {
    KvInput::Cas {
        key: key.to_string(),
        expected: expected.map(str::to_string),
        new: new.to_string(),
    }
}

fn value(seen: Option<&str>) -> KvOutput {
    KvOutput::Value(seen.map(str::to_string))
}

fn mismatch(current: Option<&str>) -> KvOutput {
    KvOutput::Mismatch(current.map(str::to_string))
}

/// An operation whose client saw `output` at `ret`.
fn done(client: u64, input: KvInput, call: u64, ret: u64, output: KvOutput) -> Operation {
    Operation {
        client,
        input,
        call,
        ret: Some((ret, output)),
    }
}

/// An operation whose client never learned the outcome.
fn unknown(client: u64, input: KvInput, call: u64) -> Operation {
    Operation {
        client,
        input,
        call,
        ret: None,
    }
}

fn assert_linearizable(history: &[Operation]) {
    assert_eq!(
        check(history),
        CheckResult::Linearizable,
        "history: {history:#?}"
    );
    assert_eq!(
        check_by_search(history),
        CheckResult::Linearizable,
        "search alone"
    );
}

/// The search alone, without the stale-observation pass.
fn check_by_search(history: &[Operation]) -> CheckResult {
    let options = CheckOptions {
        search_steps_per_key_max: SEARCH_STEPS_PER_KEY_MAX,
        stale_pass: false,
        window_pass: false,
    };
    check_with_options(history, &options).0
}

/// Asserts a violation on `key`, found both by `check` and by the search
/// alone, and returns the detail of `check`.
fn assert_violation(history: &[Operation], key: &str) -> String {
    match check_by_search(history) {
        CheckResult::Violation { key: found, .. } => assert_eq!(found, key),
        other => panic!("search alone: expected a violation on {key:?}, got {other:?}"),
    }
    match check(history) {
        CheckResult::Violation { key: found, detail } => {
            assert_eq!(found, key, "violation on the wrong key; detail:\n{detail}");
            detail
        }
        other => panic!("expected a violation on {key:?}, got {other:?} for history {history:#?}"),
    }
}

// ---- Known linearizable and non-linearizable histories ---------------------

#[test]
fn empty_history_is_linearizable() {
    assert_linearizable(&[]);
}

#[test]
fn read_of_absent_key_then_write_then_read() {
    assert_linearizable(&[
        done(1, get("x"), 0, 1, value(None)),
        done(1, put("x", "a"), 2, 3, KvOutput::Ok),
        done(2, get("x"), 4, 5, value(Some("a"))),
    ]);
}

#[test]
fn stale_read_after_acknowledged_write_is_a_violation() {
    let history = [
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        done(1, put("x", "b"), 2, 3, KvOutput::Ok),
        done(2, get("x"), 4, 5, value(Some("a"))),
    ];
    let detail = assert_violation(&history, "x");
    assert_eq!(
        detail,
        "stale observation on key \"x\": #2 client 2: get(\"x\") -> Value(Some(\"a\")) \
         [call 4, ret 5] observes \"a\", but every write of it was overwritten before that call:\n  \
         #0 client 1: put(\"x\", \"a\") -> Ok [call 0, ret 1]\n    \
         overwritten by #1 client 1: put(\"x\", \"b\") -> Ok [call 2, ret 3]\n"
    );
    let CheckResult::Violation { detail, .. } = check_by_search(&history) else {
        panic!("the search alone finds the violation too");
    };
    assert_eq!(
        detail,
        "no linearization of the 3 operations on key \"x\" (0 with unknown outcome; \
         unknown-outcome operations that cannot matter are left out)\n\
         longest linearizable prefix: 2 operations, value after it: \"b\"\n  \
         #0 client 1: put(\"x\", \"a\") -> Ok [call 0, ret 1]\n  \
         #1 client 1: put(\"x\", \"b\") -> Ok [call 2, ret 3]\n\
         next to return, and not linearizable after that prefix: \
         #2 client 2: get(\"x\") -> Value(Some(\"a\")) [call 4, ret 5]\n\
         operations that could come next (called before that return):\n  \
         #2 client 2: get(\"x\") -> Value(Some(\"a\")) [call 4, ret 5] (output impossible from that value)\n"
    );
}

#[test]
fn stale_read_overlapping_the_overwrite_is_linearizable() {
    assert_linearizable(&[
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        done(1, put("x", "b"), 2, 6, KvOutput::Ok),
        done(2, get("x"), 4, 5, value(Some("a"))),
    ]);
}

#[test]
fn lost_acknowledged_write_is_a_violation() {
    let history = [
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        done(2, get("x"), 2, 3, value(None)),
    ];
    let detail = assert_violation(&history, "x");
    assert!(
        detail.contains("#1 client 2: get(\"x\") -> Value(None) [call 2, ret 3]"),
        "{detail}"
    );
}

#[test]
fn cas_reporting_a_false_mismatch_is_a_violation() {
    let history = [
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        done(2, cas("x", Some("a"), "b"), 2, 3, mismatch(Some("a"))),
    ];
    assert_violation(&history, "x");
}

#[test]
fn cas_reporting_a_false_success_is_a_violation() {
    let history = [
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        done(2, cas("x", Some("z"), "b"), 2, 3, KvOutput::Ok),
    ];
    assert_violation(&history, "x");
}

#[test]
fn cas_mismatch_reporting_the_wrong_current_value_is_a_violation() {
    let history = [
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        done(2, cas("x", Some("z"), "b"), 2, 3, mismatch(Some("q"))),
    ];
    assert_violation(&history, "x");
}

#[test]
fn cas_chain_with_absent_expectation_is_linearizable() {
    assert_linearizable(&[
        done(1, cas("x", None, "a"), 0, 1, KvOutput::Ok),
        done(2, cas("x", None, "b"), 2, 3, mismatch(Some("a"))),
        done(2, cas("x", Some("a"), "b"), 4, 5, KvOutput::Ok),
        done(3, get("x"), 6, 7, value(Some("b"))),
    ]);
}

#[test]
fn concurrent_cas_both_succeeding_from_the_same_value_is_a_violation() {
    let history = [
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        done(2, cas("x", Some("a"), "b"), 2, 10, KvOutput::Ok),
        done(3, cas("x", Some("a"), "c"), 2, 10, KvOutput::Ok),
    ];
    assert_violation(&history, "x");
}

/// Writes `a` and `b` overlap; the two readers each see both values, in opposite
/// orders. Each write happens once, so only one of the two orders is real.
fn two_readers(second_reader_first: &str, second_reader_then: &str) -> Vec<Operation> {
    vec![
        done(1, put("x", "a"), 0, 100, KvOutput::Ok),
        done(2, put("x", "b"), 0, 100, KvOutput::Ok),
        done(3, get("x"), 10, 20, value(Some("a"))),
        done(3, get("x"), 30, 40, value(Some("b"))),
        done(4, get("x"), 10, 20, value(Some(second_reader_first))),
        done(4, get("x"), 30, 40, value(Some(second_reader_then))),
    ]
}

#[test]
fn concurrent_writes_seen_in_two_orders_is_a_violation() {
    assert_violation(&two_readers("b", "a"), "x");
}

#[test]
fn concurrent_writes_seen_in_one_order_is_linearizable() {
    assert_linearizable(&two_readers("a", "b"));
}

#[test]
fn read_of_a_value_never_written_is_a_violation() {
    let history = [
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        done(2, get("x"), 0, 3, value(Some("ghost"))),
    ];
    assert_violation(&history, "x");
}

#[test]
fn overwrite_by_successful_cas_makes_a_read_stale() {
    let history = [
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        done(1, cas("x", Some("a"), "b"), 2, 3, KvOutput::Ok),
        done(2, get("x"), 4, 5, value(Some("a"))),
    ];
    let detail = assert_violation(&history, "x");
    assert!(
        detail.contains("overwritten by #1 client 1: cas("),
        "{detail}"
    );
}

#[test]
fn cas_succeeding_on_an_overwritten_value_is_a_violation() {
    let history = [
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        done(1, put("x", "b"), 2, 3, KvOutput::Ok),
        done(2, cas("x", Some("a"), "c"), 4, 5, KvOutput::Ok),
    ];
    assert_violation(&history, "x");
}

#[test]
fn cas_on_absent_key_after_a_write_is_a_violation() {
    let history = [
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        done(2, cas("x", None, "b"), 2, 3, KvOutput::Ok),
    ];
    let detail = assert_violation(&history, "x");
    assert!(detail.contains("observes the key absent"), "{detail}");
}

#[test]
fn cas_reporting_a_value_never_written_is_a_violation() {
    let history = [done(
        1,
        cas("x", Some("a"), "b"),
        0,
        1,
        mismatch(Some("ghost")),
    )];
    let detail = assert_violation(&history, "x");
    assert!(detail.contains("which no operation writes"), "{detail}");
}

#[test]
fn second_unknown_writer_of_the_same_value_explains_a_late_read() {
    // "a" is written twice; the second write's outcome is unknown, so it may
    // land after the overwrite by "b".
    assert_linearizable(&[
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        unknown(2, put("x", "a"), 2),
        done(1, put("x", "b"), 3, 4, KvOutput::Ok),
        done(3, get("x"), 5, 6, value(Some("a"))),
    ]);
}

#[test]
fn overwrite_concurrent_with_the_old_write_does_not_make_a_read_stale() {
    // "b" may be linearized before "a", so reading "a" later is fine.
    assert_linearizable(&[
        done(1, put("x", "a"), 0, 3, KvOutput::Ok),
        done(2, put("x", "b"), 2, 4, KvOutput::Ok),
        done(3, get("x"), 5, 6, value(Some("a"))),
    ]);
}

// ---- Unknown outcomes ------------------------------------------------------

#[test]
fn unknown_write_may_be_observed_later() {
    assert_linearizable(&[
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        unknown(2, put("x", "b"), 2),
        done(3, get("x"), 50, 51, value(Some("b"))),
    ]);
}

#[test]
fn unknown_write_may_never_take_effect() {
    assert_linearizable(&[
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        unknown(2, put("x", "b"), 2),
        done(3, get("x"), 50, 51, value(Some("a"))),
        done(3, get("x"), 60, 61, value(Some("a"))),
    ]);
}

#[test]
fn unknown_write_once_observed_cannot_be_undone() {
    let history = [
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        unknown(2, put("x", "b"), 2),
        done(3, get("x"), 50, 51, value(Some("b"))),
        done(3, get("x"), 60, 61, value(Some("a"))),
    ];
    assert_violation(&history, "x");
}

#[test]
fn unknown_write_cannot_take_effect_before_its_call() {
    let history = [
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        done(3, get("x"), 5, 6, value(Some("b"))),
        unknown(2, put("x", "b"), 7),
    ];
    assert_violation(&history, "x");
}

#[test]
fn only_the_unknown_outcome_rule_explains_the_read() {
    // The same history with the write acknowledged before the read begins is
    // fine too; with the write's outcome unknown, the read is explained only by
    // letting the write take effect after its (unknown) return.
    let history = [
        unknown(1, put("x", "b"), 0),
        done(2, get("x"), 1000, 1001, value(Some("b"))),
        done(2, get("x"), 1002, 1003, value(Some("b"))),
    ];
    assert_linearizable(&history);
}

#[test]
fn unknown_cas_takes_effect_only_if_it_would_succeed() {
    // The unknown cas expects "z", so wherever it runs it fails and "c" is
    // never written.
    let history = [
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        unknown(2, cas("x", Some("z"), "c"), 2),
        done(3, get("x"), 10, 11, value(Some("c"))),
    ];
    assert_violation(&history, "x");
    // Expecting "a", it may run and write "c".
    let history = [
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        unknown(2, cas("x", Some("a"), "c"), 2),
        done(3, get("x"), 10, 11, value(Some("c"))),
    ];
    assert_linearizable(&history);
}

#[test]
fn unknown_writes_may_take_effect_in_either_order() {
    let history = |first: &str, then: &str| {
        vec![
            unknown(1, put("x", "a"), 0),
            unknown(2, put("x", "b"), 0),
            done(3, get("x"), 10, 11, value(Some(first))),
            done(3, get("x"), 20, 21, value(Some(then))),
        ]
    };
    assert_linearizable(&history("a", "b"));
    assert_linearizable(&history("b", "a"));
    // Each write happens at most once: two readers cannot see them in opposite
    // orders.
    let mut opposite_orders = history("a", "b");
    opposite_orders.push(done(4, get("x"), 10, 11, value(Some("b"))));
    opposite_orders.push(done(4, get("x"), 20, 21, value(Some("a"))));
    assert_violation(&opposite_orders, "x");
}

#[test]
fn unknown_read_is_ignored() {
    assert_linearizable(&[
        unknown(1, get("x"), 0),
        done(2, put("x", "a"), 1, 2, KvOutput::Ok),
        done(2, get("x"), 3, 4, value(Some("a"))),
    ]);
}

// ---- Time: ties and strict order -------------------------------------------

#[test]
fn return_tick_equal_to_call_tick_counts_as_overlap() {
    // The read starts on the tick the write returns: they overlap, so the read
    // may still see the old value.
    assert_linearizable(&[
        done(1, put("x", "a"), 0, 5, KvOutput::Ok),
        done(2, get("x"), 5, 8, value(None)),
    ]);
}

#[test]
fn return_tick_before_call_tick_orders_operations() {
    let history = [
        done(1, put("x", "a"), 0, 5, KvOutput::Ok),
        done(2, get("x"), 6, 8, value(None)),
    ];
    assert_violation(&history, "x");
}

#[test]
fn zero_length_operations_on_the_same_tick_overlap() {
    assert_linearizable(&[
        done(1, put("x", "a"), 3, 3, KvOutput::Ok),
        done(2, get("x"), 3, 3, value(None)),
        done(3, get("x"), 3, 3, value(Some("a"))),
    ]);
}

// ---- Partitioning, budget, malformed input ---------------------------------

#[test]
fn keys_are_independent() {
    // The same value on another key does not explain a read.
    let history = [
        done(1, put("y", "a"), 0, 1, KvOutput::Ok),
        done(1, put("x", "b"), 0, 1, KvOutput::Ok),
        done(2, get("y"), 2, 3, value(Some("a"))),
        done(2, get("x"), 2, 3, value(Some("a"))),
    ];
    let detail = assert_violation(&history, "x");
    assert!(detail.contains("on key \"x\""), "{detail}");
    let CheckResult::Violation { detail, .. } = check_by_search(&history) else {
        panic!("the search alone finds the violation too");
    };
    assert!(
        detail.starts_with("no linearization of the 2 operations on key \"x\""),
        "{detail}"
    );
}

/// `writes` sequential writes to `key`, each read back.
fn sequential_history(key: &str, writes: u64) -> Vec<Operation> {
    (0..writes)
        .flat_map(|i| {
            let value_text = format!("v{i}");
            [
                done(1, put(key, &value_text), 4 * i, 4 * i + 1, KvOutput::Ok),
                done(2, get(key), 4 * i + 2, 4 * i + 3, value(Some(&value_text))),
            ]
        })
        .collect()
}

#[test]
fn exhausted_budget_reports_too_complex() {
    let history = sequential_history("k", 10);
    assert_eq!(
        check_with_budget(&history, 5),
        CheckResult::TooComplex {
            key: "k".to_string()
        }
    );
    assert_eq!(
        check_with_budget(&history, 1_000),
        CheckResult::Linearizable
    );
}

#[test]
fn violation_wins_over_too_complex() {
    // Key "a" needs more than the budget; key "b" fails in two steps.
    let mut history = sequential_history("a", 10);
    history.push(done(3, get("b"), 0, 1, value(Some("ghost"))));
    assert!(
        matches!(check_with_budget(&history, 5), CheckResult::Violation { key, .. } if key == "b")
    );
}

#[test]
#[should_panic(expected = "history operation #1 returns at tick 3 before its call at tick 4")]
fn return_before_call_panics() {
    check(&[
        done(1, put("x", "a"), 0, 1, KvOutput::Ok),
        done(2, get("x"), 4, 3, value(None)),
    ]);
}

#[test]
#[should_panic(expected = "history operation #0 has an output of the wrong kind")]
fn output_of_the_wrong_kind_panics() {
    check(&[done(1, put("x", "a"), 0, 1, value(None))]);
}

// ---- Generated histories ---------------------------------------------------

#[test]
fn generated_histories_are_linearizable_and_stale_reads_are_caught() {
    let config = GeneratorConfig {
        ops: 40,
        keys: 3,
        spacing_ticks: 3,
        window_ticks: 12,
        unknown_percent: 15,
    };
    let mut mutated = 0;
    for seed in 0..300 {
        let mut history = generate(seed, &config);
        assert_eq!(
            check(&history),
            CheckResult::Linearizable,
            "seed {seed}: {history:#?}"
        );
        let mut rng = Rng(seed ^ 0xDEAD_BEEF);
        if let Some(key) = make_stale_read(&mut history, &mut rng) {
            mutated += 1;
            for (checker, result) in [
                ("check", check(&history)),
                ("search alone", check_by_search(&history)),
            ] {
                match result {
                    CheckResult::Violation { key: found, .. } => {
                        assert_eq!(found, key, "seed {seed}")
                    }
                    other => panic!(
                        "seed {seed}, {checker}: stale read not caught: {other:?}\n{history:#?}"
                    ),
                }
            }
        }
    }
    // The mutation must actually be exercised, or the loop proves nothing.
    assert!(
        mutated >= 250,
        "only {mutated} of 300 histories could be mutated"
    );
}

#[test]
fn generated_reads_of_values_never_written_are_caught() {
    let config = GeneratorConfig {
        ops: 40,
        keys: 3,
        spacing_ticks: 3,
        window_ticks: 12,
        unknown_percent: 15,
    };
    for seed in 0..100 {
        let mut history = generate(seed, &config);
        let mut rng = Rng(seed);
        let reads: Vec<usize> = (0..history.len())
            .filter(|&i| {
                matches!(
                    (&history[i].input, &history[i].ret),
                    (KvInput::Get { .. }, Some(_))
                )
            })
            .collect();
        let Some(&read) = reads.get(rng.below(reads.len().max(1) as u64) as usize) else {
            continue;
        };
        history[read]
            .ret
            .as_mut()
            .expect("chose a completed read")
            .1 = value(Some("never-written"));
        let key = history[read].input.key().to_string();
        assert_violation(&history, &key);
    }
}

#[test]
fn two_hundred_concurrent_operations_on_five_keys_complete() {
    // One linearization point per tick and windows of up to 30 ticks each side:
    // dozens of operations in flight at any time.
    let config = GeneratorConfig {
        ops: 200,
        keys: 5,
        spacing_ticks: 1,
        window_ticks: 30,
        unknown_percent: 10,
    };
    for seed in 0..5 {
        let mut history = generate(seed, &config);
        assert_eq!(check(&history), CheckResult::Linearizable, "seed {seed}");
        let mut rng = Rng(seed);
        let key =
            make_stale_read(&mut history, &mut rng).expect("200 operations offer a stale read");
        assert!(
            matches!(check(&history), CheckResult::Violation { key: found, .. } if found == key),
            "seed {seed}"
        );
    }
}

#[test]
fn generated_client_histories_are_linearizable_and_stale_reads_are_caught() {
    let config = ClientsConfig {
        clients: 5,
        ops: 200,
        keys: 3,
        latency_ticks_max: 8,
        unknown_percent: 10,
        timeout_ticks: 20,
    };
    for seed in 0..100 {
        let mut history = generate_clients(seed, &config);
        assert_eq!(check(&history), CheckResult::Linearizable, "seed {seed}");
        let key = make_stale_read(&mut history, &mut Rng(seed))
            .expect("200 operations offer a stale read");
        assert!(
            matches!(check(&history), CheckResult::Violation { key: found, .. } if found == key),
            "seed {seed}"
        );
    }
}

#[test]
fn memo_key_is_canonical() {
    let mut bits = Bitset::new(200);
    for bit in 0..130 {
        bits.set(bit);
    }
    bits.set(150);
    assert_eq!(
        bits.memo_key(7),
        MemoKey {
            full_words: 2,
            rest: vec![0b11 | 1 << 22].into(),
            value: 7
        }
    );
    bits.clear(150);
    bits.set(129);
    assert_eq!(
        bits.memo_key(7),
        MemoKey {
            full_words: 2,
            rest: vec![0b11].into(),
            value: 7
        }
    );
    for bit in 130..192 {
        bits.set(bit);
    }
    assert_eq!(
        bits.memo_key(7),
        MemoKey {
            full_words: 3,
            rest: vec![].into(),
            value: 7
        }
    );
    assert_eq!(
        Bitset::new(200).memo_key(0),
        MemoKey {
            full_words: 0,
            rest: vec![].into(),
            value: 0
        }
    );
}

/// Same verdict kind, ignoring details.
fn verdict(result: &CheckResult) -> (&'static str, Option<&str>) {
    match result {
        CheckResult::Linearizable => ("linearizable", None),
        CheckResult::Violation { key, .. } => ("violation", Some(key)),
        CheckResult::TooComplex { key } => ("too complex", Some(key)),
    }
}

#[test]
fn stale_pass_and_search_agree_on_randomly_corrupted_reads() {
    // Each history gets a few reads (and cas reports) replaced by a random value
    // that was written at some point, or absence: some of these are
    // violations, some are not. The stale pass is a shortcut; it must never
    // change the verdict.
    let config = ClientsConfig {
        clients: 4,
        ops: 60,
        keys: 2,
        latency_ticks_max: 6,
        unknown_percent: 15,
        timeout_ticks: 15,
    };
    let mut violations = 0;
    for seed in 0..300 {
        let mut history = generate_clients(seed, &config);
        let mut rng = Rng(seed);
        for _ in 0..1 + rng.below(3) {
            let target = rng.below(history.len() as u64) as usize;
            let replacement = match rng.below(4) {
                0 => None,
                _ => Some(format!("v{}", rng.below(history.len() as u64))),
            };
            if let Some((_, output)) = &mut history[target].ret {
                match output {
                    KvOutput::Value(seen) | KvOutput::Mismatch(seen) => *seen = replacement,
                    KvOutput::Ok => {}
                }
            }
        }
        let with_pass = check(&history);
        assert_eq!(
            verdict(&with_pass),
            verdict(&check_by_search(&history)),
            "seed {seed}: {history:#?}"
        );
        violations += usize::from(matches!(with_pass, CheckResult::Violation { .. }));
    }
    // Both kinds of verdict must occur, or the comparison proves little.
    assert!(
        (50..=250).contains(&violations),
        "{violations} violations of 300"
    );
}

#[test]
fn generated_non_monotonic_reads_are_caught_by_the_search() {
    // These violations have no single definite overwrite between the old write
    // and the read, so the stale pass may miss them and the search must prove them.
    let config = ClientsConfig {
        clients: 5,
        ops: 200,
        keys: 2,
        latency_ticks_max: 8,
        unknown_percent: 10,
        timeout_ticks: 20,
    };
    let mut mutated = 0;
    for seed in 0..100 {
        let mut history = generate_clients(seed, &config);
        let Some(key) = make_non_monotonic_read(&mut history, &mut Rng(seed)) else {
            continue;
        };
        mutated += 1;
        for (checker, result) in [
            ("check", check(&history)),
            ("search alone", check_by_search(&history)),
        ] {
            match result {
                CheckResult::Violation { key: found, .. } => assert_eq!(found, key, "seed {seed}"),
                other => panic!("seed {seed}, {checker}: not caught: {other:?}"),
            }
        }
    }
    assert!(
        mutated >= 90,
        "only {mutated} of 100 histories could be mutated"
    );
}

#[test]
fn long_prefix_and_many_candidates_are_shortened_in_the_report() {
    // 60 sequential operations, then 25 concurrent reads of a value never
    // written: the search's report shows the last 40 prefix operations and 20
    // of the 25 candidates.
    let mut history = sequential_history("k", 30);
    for client in 0..25 {
        history.push(done(10 + client, get("k"), 200, 300, value(Some("ghost"))));
    }
    let CheckResult::Violation { detail, .. } = check_by_search(&history) else {
        panic!("a read of a value never written is a violation");
    };
    let lines: Vec<&str> = detail.lines().collect();
    assert_eq!(
        lines[1],
        "longest linearizable prefix: 60 operations, value after it: \"v29\""
    );
    assert_eq!(lines[2], "  ... 20 earlier operations");
    assert_eq!(
        lines[3],
        "  #20 client 1: put(\"k\", \"v10\") -> Ok [call 40, ret 41]"
    );
    assert_eq!(
        lines[42],
        "  #59 client 2: get(\"k\") -> Value(Some(\"v29\")) [call 118, ret 119]"
    );
    assert!(lines[43].starts_with("next to return, and not linearizable after that prefix: #60 "));
    assert_eq!(
        lines[44],
        "operations that could come next (called before that return):"
    );
    assert!(
        lines[45].ends_with("(output impossible from that value)"),
        "{}",
        lines[45]
    );
    assert_eq!(lines[65], "  ... 5 more");
    assert_eq!(lines.len(), 66);
}

#[test]
fn results_display_as_one_line_headers() {
    assert_eq!(CheckResult::Linearizable.to_string(), "linearizable");
    let violation = CheckResult::Violation {
        key: "x".to_string(),
        detail: "why\n".to_string(),
    };
    assert_eq!(
        violation.to_string(),
        "not linearizable on key \"x\":\nwhy\n"
    );
    let too_complex = CheckResult::TooComplex {
        key: "x".to_string(),
    };
    assert_eq!(
        too_complex.to_string(),
        "undecided on key \"x\": the linearizability search ran out of budget"
    );
}

// ---- Reference: brute force over every order, for tiny histories ----------

/// Linearizable by definition: some subset of the unknown-outcome operations
/// plus every completed one, in some order that respects real time (`a` before
/// `b` whenever `a` returns strictly before `b` is called), produces every
/// completed output on a map that starts empty.
fn brute_force_linearizable(history: &[Operation]) -> bool {
    let unknown: Vec<usize> = (0..history.len())
        .filter(|&i| history[i].ret.is_none())
        .collect();
    let completed: Vec<usize> = (0..history.len())
        .filter(|&i| history[i].ret.is_some())
        .collect();
    (0..1u32 << unknown.len()).any(|subset| {
        let mut chosen = completed.clone();
        chosen.extend(
            (0..unknown.len())
                .filter(|bit| subset & (1 << bit) != 0)
                .map(|bit| unknown[bit]),
        );
        some_order_works(history, &mut chosen, 0)
    })
}

/// Heap-free permutation search: tries every order of `ops[fixed..]`.
fn some_order_works(history: &[Operation], ops: &mut [usize], fixed: usize) -> bool {
    if fixed == ops.len() {
        return order_works(history, ops);
    }
    for i in fixed..ops.len() {
        ops.swap(fixed, i);
        if some_order_works(history, ops, fixed + 1) {
            return true;
        }
        ops.swap(fixed, i);
    }
    false
}

fn order_works(history: &[Operation], order: &[usize]) -> bool {
    for (position, &a) in order.iter().enumerate() {
        for &b in &order[position + 1..] {
            // b comes after a, so b must not have returned before a was called.
            if matches!(history[b].ret, Some((ret_tick, _)) if ret_tick < history[a].call) {
                return false;
            }
        }
    }
    let mut map: BTreeMap<&str, &str> = BTreeMap::new();
    for &index in order {
        let operation = &history[index];
        let current = map.get(operation.input.key()).copied();
        let (output, written) = match &operation.input {
            KvInput::Get { .. } => (KvOutput::Value(current.map(str::to_string)), None),
            KvInput::Put { value, .. } => (KvOutput::Ok, Some(value.as_str())),
            KvInput::Cas { expected, new, .. } if expected.as_deref() == current => {
                (KvOutput::Ok, Some(new.as_str()))
            }
            KvInput::Cas { .. } => (KvOutput::Mismatch(current.map(str::to_string)), None),
        };
        if matches!(&operation.ret, Some((_, seen)) if *seen != output) {
            return false;
        }
        if let Some(written) = written {
            map.insert(operation.input.key(), written);
        }
    }
    true
}

/// A tiny random history: few ticks (so ties are common), three values (so
/// values repeat), outputs from a real run or plain random, unknown outcomes.
fn tiny_random_history(rng: &mut Rng) -> Vec<Operation> {
    let ops = 1 + rng.below(6);
    let keys = 1 + rng.below(2);
    let real_outputs = rng.percent(60);
    let pick_value = |rng: &mut Rng| ["a", "b", "c"][rng.below(3) as usize].to_string();
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    let mut history = Vec::new();
    for client in 0..ops {
        let key = format!("k{}", rng.below(keys));
        let input = match rng.below(3) {
            0 => KvInput::Get { key: key.clone() },
            1 => KvInput::Put {
                key: key.clone(),
                value: pick_value(rng),
            },
            _ => KvInput::Cas {
                key: key.clone(),
                expected: (!rng.percent(30)).then(|| pick_value(rng)),
                new: pick_value(rng),
            },
        };
        // With real outputs, operations run in creation order at strictly
        // increasing points; windows stretch around them.
        let point = 2 * client + 2;
        let call = point - rng.below(3).min(point);
        let ret = point + rng.below(3);
        let current = map.get(&key).cloned();
        let real = match &input {
            KvInput::Get { .. } => KvOutput::Value(current),
            KvInput::Put { value, .. } => {
                map.insert(key.clone(), value.clone());
                KvOutput::Ok
            }
            KvInput::Cas { expected, new, .. } if *expected == current => {
                map.insert(key.clone(), new.clone());
                KvOutput::Ok
            }
            KvInput::Cas { .. } => KvOutput::Mismatch(current),
        };
        let output = match (&input, real_outputs) {
            (_, true) => real,
            (KvInput::Get { .. }, false) => {
                KvOutput::Value((!rng.percent(25)).then(|| pick_value(rng)))
            }
            (KvInput::Put { .. }, false) => KvOutput::Ok,
            (KvInput::Cas { .. }, false) if rng.percent(50) => KvOutput::Ok,
            (KvInput::Cas { .. }, false) => {
                KvOutput::Mismatch((!rng.percent(25)).then(|| pick_value(rng)))
            }
        };
        let (call, ret) = if real_outputs {
            (call, ret)
        } else {
            let call = rng.below(8);
            (call, call + rng.below(4))
        };
        let ret = (!rng.percent(20)).then_some((ret, output));
        history.push(Operation {
            client,
            input,
            call,
            ret,
        });
    }
    history
}

#[test]
fn verdicts_match_brute_force_on_tiny_random_histories() {
    let mut rng = Rng(7);
    let mut linearizable = 0;
    for case in 0..3000 {
        let history = tiny_random_history(&mut rng);
        let expected = brute_force_linearizable(&history);
        linearizable += usize::from(expected);
        for (checker, result) in [
            ("check", check(&history)),
            ("search alone", check_by_search(&history)),
        ] {
            let found = match result {
                CheckResult::Linearizable => true,
                CheckResult::Violation { .. } => false,
                CheckResult::TooComplex { .. } => panic!("case {case}: tiny history too complex"),
            };
            assert_eq!(found, expected, "case {case}, {checker}: {history:#?}");
        }
    }
    // Both verdicts must be well represented.
    assert!(
        (600..=2400).contains(&linearizable),
        "{linearizable} of 3000 linearizable"
    );
}

// ---- Windows -----------------------------------------------------------------

#[test]
fn window_violations_are_violations_of_the_whole_history() {
    // Every window of tiny random histories: a window without a linearization
    // must come from a history without one (the converse need not hold).
    let mut rng = Rng(11);
    let mut window_violations = 0;
    for case in 0..600 {
        let history = tiny_random_history(&mut rng);
        let linearizable = brute_force_linearizable(&history);
        let mut indices_by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (index, operation) in history.iter().enumerate() {
            indices_by_key
                .entry(operation.input.key())
                .or_default()
                .push(index);
        }
        for (key, indices) in indices_by_key {
            let observed = observed_values(&history, &indices);
            let indices = operations_that_matter(&history, indices, &observed);
            for start_tick in 0..=14 {
                for end_tick in start_tick..=14 {
                    let (found, _) = window::search_window(
                        &history,
                        key,
                        &indices,
                        start_tick,
                        end_tick,
                        window::WINDOW_SEARCH_STEPS_MAX,
                    );
                    if let Some(detail) = found {
                        window_violations += 1;
                        assert!(
                            !linearizable,
                            "case {case}, window {start_tick}..={end_tick}: {detail}\n{history:#?}"
                        );
                    }
                }
            }
        }
    }
    assert!(
        window_violations > 1000,
        "only {window_violations} window violations"
    );
}

/// Two readers see concurrent writes in opposite orders after `writes`
/// sequential writes and reads: a violation the stale pass does not see.
fn long_history_with_opposite_orders(writes: u64) -> Vec<Operation> {
    let mut history = sequential_history("x", writes);
    let t = 4 * writes + 10;
    history.extend([
        done(5, put("x", "a"), t, t + 100, KvOutput::Ok),
        done(6, put("x", "b"), t, t + 100, KvOutput::Ok),
        done(7, get("x"), t + 10, t + 20, value(Some("a"))),
        done(7, get("x"), t + 30, t + 40, value(Some("b"))),
        done(8, get("x"), t + 10, t + 20, value(Some("b"))),
        done(8, get("x"), t + 30, t + 40, value(Some("a"))),
    ]);
    history
}

#[test]
fn a_window_proves_a_violation_the_whole_search_has_no_budget_for() {
    let history = long_history_with_opposite_orders(40);
    // 100 steps reach the violation but cannot exhaust what comes before it
    // (141 steps do).
    let budget = |window_pass| CheckOptions {
        search_steps_per_key_max: 100,
        stale_pass: true,
        window_pass,
    };
    assert_eq!(
        check_with_options(&history, &budget(false)).0,
        CheckResult::TooComplex {
            key: "x".to_string()
        }
    );
    let CheckResult::Violation { key, detail } = check_with_options(&history, &budget(true)).0
    else {
        panic!("a window proves the violation");
    };
    assert_eq!(key, "x");
    let lines: Vec<&str> = detail.lines().collect();
    assert_eq!(
        lines[0],
        "no linearization of the 9 operations on key \"x\" in the window of ticks 154..=210, so \
         none of the whole history (2 with unknown outcome here: operations running across the \
         window's edges count as unknown; the value at its start is left free)"
    );
    // Operations keep their index in the full history and show as recorded.
    assert_eq!(
        lines[5],
        "  #80 client 5: put(\"x\", \"a\") -> Ok [call 170, ret 270] \
         (across the window's edge: outcome unknown)"
    );
    assert_eq!(
        lines[10],
        "next to return, and not linearizable after that prefix: \
         #85 client 8: get(\"x\") -> Value(Some(\"a\")) [call 200, ret 210]"
    );
    assert_violation(&history, "x");
}
