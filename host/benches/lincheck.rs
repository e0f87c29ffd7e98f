//! Linearizability checker benchmark: checks generated histories (linearizable by
//! construction, see `paxwasm::sim::linearizability::generated`) of growing
//! concurrency and prints the time per check as a ratio to a baseline without
//! any concurrency, measured in the same run.
//!
//! Run: `cargo bench -p paxwasm --bench lincheck`

use std::time::{Duration, Instant};

use paxwasm::sim::linearizability::generated::{
    generate, generate_clients, make_non_monotonic_read, make_stale_read, ClientsConfig,
    GeneratorConfig, Rng,
};
use paxwasm::sim::linearizability::{
    check_with_options, CheckOptions, CheckResult, CheckStats, Operation, SEARCH_STEPS_PER_KEY_MAX,
};

/// Histories per scenario; each is checked once per repetition.
const SEEDS: u64 = 20;
/// Repetitions per scenario; the fastest is reported, to shed scheduler noise.
const REPETITIONS: usize = 3;

struct Scenario {
    name: &'static str,
    generate: Box<dyn Fn(u64) -> Vec<Operation>>,
    /// A violation planted in every history (the result must be a violation).
    mutation: Option<Mutation>,
    options: CheckOptions,
}

type Mutation = fn(&mut [Operation], &mut Rng) -> Option<String>;

fn windows(name: &'static str, config: GeneratorConfig) -> Scenario {
    Scenario {
        name,
        generate: Box::new(move |seed| generate(seed, &config)),
        mutation: None,
        options: CheckOptions::default(),
    }
}

fn clients(name: &'static str, config: ClientsConfig, mutation: Option<Mutation>) -> Scenario {
    Scenario {
        name,
        generate: Box::new(move |seed| generate_clients(seed, &config)),
        mutation,
        options: CheckOptions::default(),
    }
}

/// Without the stale pass and the window pass: every verdict comes from the
/// search over whole keys.
fn search_alone(scenario: Scenario) -> Scenario {
    let options = CheckOptions {
        stale_pass: false,
        window_pass: false,
        ..CheckOptions::default()
    };
    renamed(scenario, "search alone", options)
}

/// Without the stale pass: the search, then windows where it runs out of budget.
fn search_and_windows(scenario: Scenario) -> Scenario {
    let options = CheckOptions {
        stale_pass: false,
        ..CheckOptions::default()
    };
    renamed(scenario, "search + windows", options)
}

fn renamed(scenario: Scenario, suffix: &str, options: CheckOptions) -> Scenario {
    let name = Box::leak(format!("{}, {suffix}", scenario.name).into_boxed_str());
    Scenario {
        name,
        options,
        ..scenario
    }
}

struct Measured {
    per_check: Duration,
    stats: CheckStats,
    /// Histories found [linearizable, violating, too complex].
    results: [u64; 3],
}

fn measure(scenario: &Scenario) -> Measured {
    let histories: Vec<Vec<Operation>> = (0..SEEDS)
        .map(|seed| {
            let mut history = (scenario.generate)(seed);
            if let Some(mutation) = scenario.mutation {
                mutation(&mut history, &mut Rng(seed)).expect("history offers the mutation");
            }
            history
        })
        .collect();
    let mut best = Duration::MAX;
    let mut stats = CheckStats::default();
    let mut results = [0; 3];
    for _ in 0..REPETITIONS {
        stats = CheckStats::default();
        results = [0; 3];
        let started = Instant::now();
        for history in &histories {
            let (result, one) = check_with_options(history, &scenario.options);
            stats.keys += one.keys;
            stats.ops_checked += one.ops_checked;
            stats.steps_total += one.steps_total;
            stats.steps_key_max = stats.steps_key_max.max(one.steps_key_max);
            let slot = match result {
                CheckResult::Linearizable => 0,
                CheckResult::Violation { .. } => 1,
                CheckResult::TooComplex { .. } => 2,
            };
            results[slot] += 1;
        }
        best = best.min(started.elapsed());
    }
    // Running out of budget is a figure to report; a wrong verdict is a bug.
    let wrong_slot = usize::from(scenario.mutation.is_none());
    assert_eq!(
        results[wrong_slot], 0,
        "{}: results {results:?}",
        scenario.name
    );
    Measured {
        per_check: best / SEEDS as u32,
        stats,
        results,
    }
}

fn main() {
    let window = |ops, keys, spacing_ticks, window_ticks, unknown_percent| GeneratorConfig {
        ops,
        keys,
        spacing_ticks,
        window_ticks,
        unknown_percent,
    };
    let client = |clients, ops, keys, unknown_percent| ClientsConfig {
        clients,
        ops,
        keys,
        latency_ticks_max: 10,
        unknown_percent,
        timeout_ticks: 30,
    };
    let scenarios = [
        windows(
            "1000 ops, 5 keys, no overlap (baseline)",
            window(1000, 5, 10, 0, 0),
        ),
        clients(
            "5 clients, 1000 ops, 5 keys, 10% unknown",
            client(5, 1000, 5, 10),
            None,
        ),
        clients(
            "5 clients, 1000 ops, 1 key, 10% unknown",
            client(5, 1000, 1, 10),
            None,
        ),
        clients(
            "5 clients, 1 key, non-monotonic read",
            client(5, 1000, 1, 10),
            Some(make_non_monotonic_read),
        ),
        clients(
            "20 clients, 1000 ops, 1 key, 10% unknown",
            client(20, 1000, 1, 10),
            None,
        ),
        clients(
            "20 clients, 1 key, stale read",
            client(20, 1000, 1, 10),
            Some(make_stale_read),
        ),
        clients(
            "20 clients, 1 key, non-monotonic read",
            client(20, 1000, 1, 10),
            Some(make_non_monotonic_read),
        ),
        search_alone(clients(
            "5 clients, 1 key, stale read",
            client(5, 1000, 1, 10),
            Some(make_stale_read),
        )),
        search_alone(clients(
            "5 clients, 1 key, non-monotonic read",
            client(5, 1000, 1, 10),
            Some(make_non_monotonic_read),
        )),
        search_alone(clients(
            "20 clients, 1 key, stale read",
            client(20, 1000, 1, 10),
            Some(make_stale_read),
        )),
        search_alone(clients(
            "20 clients, 1 key, non-monotonic read",
            client(20, 1000, 1, 10),
            Some(make_non_monotonic_read),
        )),
        search_and_windows(clients(
            "20 clients, 1 key, stale read",
            client(20, 1000, 1, 10),
            Some(make_stale_read),
        )),
        search_and_windows(clients(
            "20 clients, 1 key, non-monotonic read",
            client(20, 1000, 1, 10),
            Some(make_non_monotonic_read),
        )),
        windows("windows 10, 1000 ops, 5 keys", window(1000, 5, 1, 10, 0)),
        windows("windows 30, 1000 ops, 5 keys", window(1000, 5, 1, 30, 0)),
        windows(
            "windows 30, 1000 ops, 5 keys, 10% unknown",
            window(1000, 5, 1, 30, 10),
        ),
        windows(
            "windows 20, 400 ops, 1 key, 10% unknown",
            window(400, 1, 1, 20, 10),
        ),
    ];
    println!(
        "lincheck bench: {SEEDS} histories per scenario, best of {REPETITIONS} runs, \
         budget {SEARCH_STEPS_PER_KEY_MAX} steps/key"
    );
    println!(
        "{:<58} {:>10} {:>9} {:>11} {:>13}  [linearizable, violation, too complex]",
        "scenario", "us/check", "ratio", "steps/check", "max steps/key"
    );
    let mut baseline_us = None;
    for scenario in &scenarios {
        let measured = measure(scenario);
        let per_check_us = measured.per_check.as_secs_f64() * 1e6;
        let baseline_us = *baseline_us.get_or_insert(per_check_us);
        println!(
            "{:<58} {:>10.0} {:>8.1}x {:>11} {:>13}  {:?}",
            scenario.name,
            per_check_us,
            per_check_us / baseline_us,
            measured.stats.steps_total / SEEDS,
            measured.stats.steps_key_max,
            measured.results,
        );
    }
}
