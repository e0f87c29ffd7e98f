//! The simulator's seeds as tests: regression seeds, a broad sweep with faults, and
//! the planted-bug test that shows the checkers have teeth.

use paxwasm::paxos::Params;
use paxwasm::sim::cluster::{run_seeds, FaultRates, SeedOutcome, SimOptions};

/// Operations per seed in the default test run (the CLI default is larger).
const OPS_PER_SEED: usize = 60;
/// Seeds of the sweep; with 3 and 5 replicas alternating.
const SWEEP_SEEDS: u64 = 520;
/// Seeds run with the harsh fault profile, on top of the sweep.
const HARSH_SEEDS: u64 = 120;
/// The planted bug must be found within this many seeds.
const PLANTED_BUG_SEEDS_MAX: u64 = 200;
/// Worker threads: the machine has 2 cores.
const THREADS: usize = 2;

/// Seeds that once failed, with the replica count and ops they failed with. Each
/// stays here as a regression test.
const REGRESSION_SEEDS: &[(u64, usize, usize)] = &[];

fn assert_clean(outcomes: &[SeedOutcome], options_for: &(dyn Fn(u64) -> SimOptions + Sync)) {
    let failures: Vec<String> = outcomes
        .iter()
        .filter_map(|outcome| {
            let violation = outcome.violation.as_ref()?;
            let replay = options_for(outcome.seed).replay_command();
            Some(format!(
                "seed {}: {violation}\nreplay: {replay}",
                outcome.seed
            ))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn regression_seeds_stay_fixed() {
    for &(seed, replicas, ops) in REGRESSION_SEEDS {
        let options_for = |seed| SimOptions::for_seed(seed, Some(replicas), ops);
        assert_clean(&run_seeds(&[seed], 1, &options_for), &options_for);
    }
}

#[test]
fn sweep_of_seeds_with_faults_finds_no_violation() {
    let seeds: Vec<u64> = (0..SWEEP_SEEDS).collect();
    let options_for = |seed| SimOptions::for_seed(seed, None, OPS_PER_SEED);
    let outcomes = run_seeds(&seeds, THREADS, &options_for);
    assert_clean(&outcomes, &options_for);
    // The faults are real: every kind happened, and clients saw unknown outcomes.
    let sum = |field: fn(&SeedOutcome) -> u64| outcomes.iter().map(field).sum::<u64>();
    assert!(sum(|o| o.faults.crashes) > SWEEP_SEEDS);
    assert!(sum(|o| o.faults.partitions) > SWEEP_SEEDS);
    assert!(sum(|o| o.faults.dropped) > 0 && sum(|o| o.faults.duplicated) > 0);
    assert!(sum(|o| o.faults.unknown_outcomes) > 0);
    assert!(
        sum(|o| o.faults.max_round) > 2 * SWEEP_SEEDS,
        "leaders changed"
    );
    let committed = sum(|o| o.committed as u64);
    assert!(committed > SWEEP_SEEDS * OPS_PER_SEED as u64 * 9 / 10);
}

#[test]
fn harsh_faults_find_no_violation() {
    let seeds: Vec<u64> = (1_000_000..1_000_000 + HARSH_SEEDS).collect();
    let options_for = |seed| {
        let mut options = SimOptions::for_seed(seed, None, OPS_PER_SEED);
        options.faults = FaultRates::harsh();
        options
    };
    let outcomes = run_seeds(&seeds, THREADS, &options_for);
    assert_clean(&outcomes, &options_for);
    let crashes: u64 = outcomes.iter().map(|o| o.faults.crashes).sum();
    assert!(crashes > 5 * HARSH_SEEDS, "harsh means many crashes, got {crashes}");
}

#[test]
fn planted_bug_is_caught_within_a_bounded_number_of_seeds() {
    let options_for = |seed| {
        let mut options = SimOptions::for_seed(seed, None, OPS_PER_SEED);
        options.params = Params {
            bug_ignore_phase1_values: true,
            ..Params::default()
        };
        options
    };
    let seeds: Vec<u64> = (0..PLANTED_BUG_SEEDS_MAX).collect();
    let outcomes = run_seeds(&seeds, THREADS, &options_for);
    let caught: Vec<&SeedOutcome> = outcomes.iter().filter(|o| o.violation.is_some()).collect();
    assert!(
        !caught.is_empty(),
        "a new leader ignoring Phase 1 values went unnoticed in {PLANTED_BUG_SEEDS_MAX} seeds"
    );
    eprintln!(
        "planted bug caught by {} of {PLANTED_BUG_SEEDS_MAX} seeds, first seed {}: {}",
        caught.len(),
        caught[0].seed,
        caught[0]
            .violation
            .as_deref()
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or_default()
    );
}
