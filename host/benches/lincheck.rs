//! Linearizability checker benchmark: checks generated histories (linearizable by
//! construction, see `paxwasm::sim::linearizability::generated`) of growing
//! concurrency and prints the time per check as a ratio to a baseline without
//! any concurrency measured in the same run.
//!
//! Run: `cargo bench -p paxwasm --bench lincheck`

use std::time::{Duration, Instant};

use paxwasm::sim::linearizability::generated::{generate, make_stale_read, GeneratorConfig, Rng};
use paxwasm::sim::linearizability::{
    check_with_stats, CheckResult, CheckStats, Operation, SEARCH_STEPS_PER_KEY_MAX,
};

/// Histories per scenario; each is checked once per repetition.
const SEEDS: u64 = 20;
/// Repetitions per scenario; the fastest is reported, to shed scheduler noise.
const REPETITIONS: usize = 5;

struct Scenario {
    name: &'static str,
    config: GeneratorConfig,
    /// Plant a stale read in every history (the result must be a violation).
    stale_read: bool,
}

struct Measured {
    per_check: Duration,
    stats: CheckStats,
    results: [usize; 3],
}

fn measure(scenario: &Scenario) -> Measured {
    let histories: Vec<Vec<Operation>> = (0..SEEDS)
        .map(|seed| {
            let mut history = generate(seed, &scenario.config);
            if scenario.stale_read {
                make_stale_read(&mut history, &mut Rng(seed)).expect("history offers a stale read");
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
            let (result, one) = check_with_stats(history, SEARCH_STEPS_PER_KEY_MAX);
            stats.keys += one.keys;
            stats.ops_searched += one.ops_searched;
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
    let wrong_slot = usize::from(!scenario.stale_read);
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
    let scenario = |name, ops, keys, spacing_ticks, window_ticks, unknown_percent, stale_read| {
        let config = GeneratorConfig {
            ops,
            keys,
            spacing_ticks,
            window_ticks,
            unknown_percent,
        };
        Scenario {
            name,
            config,
            stale_read,
        }
    };
    let scenarios = [
        scenario(
            "sequential 1000 ops / 5 keys (baseline)",
            1000,
            5,
            10,
            0,
            0,
            false,
        ),
        scenario(
            "overlap 1000 ops / 5 keys, window 10",
            1000,
            5,
            1,
            10,
            0,
            false,
        ),
        scenario(
            "overlap 1000 ops / 5 keys, window 30",
            1000,
            5,
            1,
            30,
            0,
            false,
        ),
        scenario(
            "overlap + 10% unknown, window 30",
            1000,
            5,
            1,
            30,
            10,
            false,
        ),
        scenario(
            "overlap + 30% unknown, window 10",
            1000,
            5,
            1,
            10,
            30,
            false,
        ),
        scenario(
            "hot key 400 ops / 1 key, window 20",
            400,
            1,
            1,
            20,
            10,
            false,
        ),
        scenario("stale read planted, window 30", 1000, 5, 1, 30, 10, true),
    ];
    let mut baseline = None;
    println!("lincheck bench: {SEEDS} histories per scenario, best of {REPETITIONS} runs");
    for scenario in &scenarios {
        let measured = measure(scenario);
        let per_check_us = measured.per_check.as_secs_f64() * 1e6;
        let baseline_us = *baseline.get_or_insert(per_check_us);
        println!(
            "{:<42} {:>10.0} us/check  x{:<7.1} steps/check {:>9}  max steps/key {:>8}  [linearizable, violation, too complex] {:?}",
            scenario.name,
            per_check_us,
            per_check_us / baseline_us,
            measured.stats.steps_total / SEEDS,
            measured.stats.steps_key_max,
            measured.results,
        );
    }
}
