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
/// The planted bugs must be found within this many seeds.
const PLANTED_BUG_SEEDS_MAX: u64 = 200;
const PLANTED_READ_BUG_SEEDS_MAX: u64 = 400;
const OPS_PER_SEED_READ_BUG: usize = 100;
const PLANTED_PERSIST_BUG_SEEDS_MAX: u64 = 200;
/// Worker threads: the machine has 2 cores.
const THREADS: usize = 2;

/// A seed that once failed, with the setup it failed under. It stays here and must
/// pass against the real core.
struct Regression {
    seed: u64,
    replicas: usize,
    ops: usize,
    harsh: bool,
    /// What failed back then.
    failed_with: &'static str,
}

/// The first two failed against the real core once replicas' clocks were skewed
/// (`FaultRates::clock_offset_ms_max`). The others failed with a planted bug: they
/// drive a leader change with recovered values (Phase 1) or stale-read windows, so
/// the real core must keep passing them.
const REGRESSION_SEEDS: &[Regression] = &[
    Regression {
        seed: 503_340,
        replicas: 3,
        ops: 100,
        harsh: true,
        failed_with: "liveness: 1500 ticks after healing, 4 clients still wait, applied \
                      indexes [35, 40, 35, 37, 0, 40], configuration voters {1,3,4} (found \
                      by the same soak as 302280, with the core before the non-voter \
                      catch-up; its cause was not pinned down separately, since that \
                      change alters the seed's run from the start)",
    },
    Regression {
        seed: 302_280,
        replicas: 3,
        ops: 100,
        harsh: true,
        failed_with: "liveness: 1500 ticks after healing, 4 clients still wait: voters \
                      {1,2,4} were replaced by {1,3,5}; the leader, not in C(new), stepped \
                      down once C(new) was chosen, before 3 and 5 learned it, so they took \
                      themselves for learners, 1 was amnesic, and nobody campaigned \
                      (membership changes, disk wipes)",
    },
    Regression {
        seed: 84,
        replicas: 3,
        ops: 100,
        harsh: false,
        failed_with: "durable chosen prefix has a hole (replica 1 slot 23): a replica that \
                      learned its removal during its own Phase 1 still became leader, so \
                      its accepts skipped its own acceptor (membership changes)",
    },
    Regression {
        seed: 11,
        replicas: 5,
        ops: 100,
        harsh: false,
        failed_with: "panic: range start is greater than range end: the leader's probe of \
                      a removed replica built an empty catch-up range (membership changes)",
    },
    Regression {
        seed: 18,
        replicas: 3,
        ops: 100,
        harsh: false,
        failed_with: "panic: range start is greater than range end: the leader's probe of \
                      a removed replica built an empty catch-up range (membership changes)",
    },
    Regression {
        seed: 158,
        replicas: 3,
        ops: 100,
        harsh: true,
        failed_with: "replica 3 restarted with a wrong value marked chosen at slot 20 \
                      (snapshot 21, log start 12): a crash right after a snapshot install \
                      lost the compaction, and restart trusted the covered entries",
    },
    Regression {
        seed: 713,
        replicas: 5,
        ops: 100,
        harsh: true,
        failed_with: "replica 5 restarted with a wrong value marked chosen at slot 9 \
                      (snapshot 12, log start 1)",
    },
    Regression {
        seed: 0,
        replicas: 3,
        ops: 100,
        harsh: false,
        failed_with: "slot 11 stamped 2674 ms after a slot stamped 2758 ms: a new leader \
                      stamped below values it re-proposed after Phase 1",
    },
    Regression {
        seed: 86,
        replicas: 3,
        ops: 100,
        harsh: false,
        failed_with: "slot 20 stamped 5658 ms after a slot stamped 6972 ms: a value a \
                      deposed fast-clock leader stamped was recovered before a slower \
                      leader's batch (the state machine clock now takes the maximum)",
    },
    Regression {
        seed: 0,
        replicas: 3,
        ops: 60,
        harsh: false,
        failed_with: "planted phase-1 bug: two values chosen for slot 8",
    },
    Regression {
        seed: 1,
        replicas: 5,
        ops: 60,
        harsh: false,
        failed_with: "planted phase-1 bug: two values chosen for slot 21",
    },
    Regression {
        seed: 4,
        replicas: 3,
        ops: 100,
        harsh: true,
        failed_with: "planted read bug: stale read on k1",
    },
    Regression {
        seed: 12,
        replicas: 3,
        ops: 100,
        harsh: true,
        failed_with: "planted read bug: stale read on k1",
    },
    Regression {
        seed: 144,
        replicas: 3,
        ops: 100,
        harsh: false,
        failed_with: "planted read bug: stale read on k0",
    },
    Regression {
        seed: 152,
        replicas: 3,
        ops: 100,
        harsh: true,
        failed_with: "planted read bug: stale read",
    },
    Regression {
        seed: 157,
        replicas: 5,
        ops: 100,
        harsh: true,
        failed_with: "planted read bug: stale read",
    },
];

fn assert_clean(outcomes: &[SeedOutcome], options_for: &(dyn Fn(u64) -> SimOptions + Sync)) {
    // A history the linearizability search could not decide is no verdict, and a
    // test that passes without a verdict proves nothing: it fails too.
    let failures: Vec<String> = outcomes
        .iter()
        .filter_map(|outcome| {
            let verdict = match (&outcome.violation, outcome.too_complex) {
                (Some(violation), _) => violation.clone(),
                (None, true) => "too complex for the linearizability search (no verdict)".into(),
                (None, false) => return None,
            };
            let replay = options_for(outcome.seed).replay_command();
            Some(format!(
                "seed {}: {verdict}\nreplay: {replay}",
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
    for regression in REGRESSION_SEEDS {
        let options_for = |seed| {
            let mut options = SimOptions::for_seed(seed, Some(regression.replicas), regression.ops);
            if regression.harsh {
                options.faults = FaultRates::harsh();
            }
            options
        };
        let outcome = run_seeds(&[regression.seed], 1, &options_for).remove(0);
        assert!(
            !outcome.too_complex,
            "regression seed {} has no linearizability verdict (too complex)\nreplay: {}",
            regression.seed,
            options_for(regression.seed).replay_command()
        );
        assert!(
            outcome.violation.is_none(),
            "regression seed {} (once failed with: {}) fails again: {}\nreplay: {}",
            regression.seed,
            regression.failed_with,
            outcome.violation.as_deref().unwrap_or_default(),
            options_for(regression.seed).replay_command()
        );
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
    assert!(sum(|o| o.faults.client_partitions) > SWEEP_SEEDS / 4);
    assert!(
        sum(|o| o.faults.stall_crashes) > 0,
        "a disk stall ended in a crash"
    );
    assert!(
        sum(|o| o.faults.double_crashes) > 0,
        "two replicas crashed at once"
    );
    // Membership changes happened and completed, interleaved with the faults.
    assert!(sum(|o| o.faults.changes_accepted) > SWEEP_SEEDS);
    assert!(sum(|o| o.faults.changes_refused) > 0);
    assert!(sum(|o| o.faults.configurations_chosen) > SWEEP_SEEDS);
    // Clients cut off from replicas give up more often than before client messages
    // went through the network (about 84 % acknowledged then, 94 % before).
    let committed = sum(|o| o.committed as u64);
    assert!(committed > SWEEP_SEEDS * OPS_PER_SEED as u64 * 3 / 4);
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
    assert!(
        crashes > 5 * HARSH_SEEDS,
        "harsh means many crashes, got {crashes}"
    );
}

/// More operations than one liveness window can carry (four clients, up to 30 ticks of
/// thought between operations): the run is judged on progress, not on finishing them
/// all within 1 500 ticks of healing. Before session 12 every such seed failed with
/// "liveness: 1500 ticks after healing, 1 clients still wait" (`paxwasm sim --ops 400`:
/// 20 000 of 20 000 seeds).
#[test]
fn a_run_longer_than_one_liveness_window_passes_on_progress() {
    let seeds: Vec<u64> = (91_000_000..91_000_012).collect();
    let options_for = |seed| SimOptions::for_seed(seed, None, 400);
    let outcomes = run_seeds(&seeds, THREADS, &options_for);
    assert_clean(&outcomes, &options_for);
    assert!(
        outcomes.iter().all(|o| o.committed > 300),
        "the runs went long"
    );
}

/// Runs seeds from 0 in chunks until one reports a violation; returns it.
fn first_violation(
    seeds_max: u64,
    options_for: &(dyn Fn(u64) -> SimOptions + Sync),
) -> Option<SeedOutcome> {
    let chunk = 2 * THREADS as u64;
    let mut first = 0;
    while first < seeds_max {
        let seeds: Vec<u64> = (first..(first + chunk).min(seeds_max)).collect();
        let outcomes = run_seeds(&seeds, THREADS, options_for);
        if let Some(caught) = outcomes.into_iter().find(|o| o.violation.is_some()) {
            return Some(caught);
        }
        first += chunk;
    }
    None
}

fn report(name: &str, caught: &SeedOutcome, options_for: &(dyn Fn(u64) -> SimOptions + Sync)) {
    let violation = caught.violation.as_deref().unwrap_or_default();
    eprintln!(
        "{name} caught at seed {}: {}\nreplay: {}",
        caught.seed,
        violation.lines().next().unwrap_or_default(),
        options_for(caught.seed).replay_command()
    );
}

#[test]
fn planted_phase1_bug_is_caught_within_a_bounded_number_of_seeds() {
    let options_for = |seed| {
        let mut options = SimOptions::for_seed(seed, None, OPS_PER_SEED);
        options.params = Params {
            bug_ignore_phase1_values: true,
            ..Params::default()
        };
        options
    };
    let caught = first_violation(PLANTED_BUG_SEEDS_MAX, &options_for)
        .expect("a new leader ignoring Phase 1 values went unnoticed");
    report("planted phase-1 bug", &caught, &options_for);
}

#[test]
fn planted_read_bug_is_caught_within_a_bounded_number_of_seeds() {
    // Stale reads need a new leader whose heartbeat acks outrun its first accepts,
    // which slow persists in the harsh profile make common.
    let options_for = |seed| {
        let mut options = SimOptions::for_seed(seed, None, OPS_PER_SEED_READ_BUG);
        options.faults = FaultRates::harsh();
        // A wiped replica stops voting and takes the crash budget with it, which
        // makes the leader changes this bug needs rarer.
        options.faults.disk_wipe_per_million = 0;
        options.params = Params {
            bug_reads_before_ready: true,
            ..Params::default()
        };
        options
    };
    let caught = first_violation(PLANTED_READ_BUG_SEEDS_MAX, &options_for)
        .expect("a new leader serving reads before it is ready went unnoticed");
    assert!(caught
        .violation
        .as_deref()
        .unwrap_or_default()
        .contains("not linearizable"));
    report("planted read bug", &caught, &options_for);
}

#[test]
fn a_seed_replays_identically() {
    for seed in [3, 8] {
        let options = SimOptions::for_seed(seed, None, OPS_PER_SEED);
        let first = paxwasm::sim::cluster::run_seed(&options);
        let second = paxwasm::sim::cluster::run_seed(&options);
        assert_eq!(first, second);
        assert!(
            first.faults.crashes + first.faults.partitions > 0,
            "seed {seed} had faults"
        );
    }
}

#[test]
fn planted_persist_bug_is_caught_within_a_bounded_number_of_seeds() {
    // An accept acknowledged before its entry is durable only matters when the
    // acceptor crashes in between and the leader counted it: disk stalls that end in
    // a crash make that window long (17 of 400 harsh seeds catch it, 5 of 400 with
    // disk stalls turned off).
    let options_for = |seed| {
        let mut options = SimOptions::for_seed(seed, None, OPS_PER_SEED_READ_BUG);
        options.faults = FaultRates::harsh();
        options.params = Params {
            bug_accepted_before_persist: true,
            ..Params::default()
        };
        // Membership changes dilute this bug (they change which crashes are allowed):
        // this test is about persists alone.
        options.faults.membership_change_per_million = 0;
        options.spare_replicas = 0;
        options
    };
    let caught = first_violation(PLANTED_PERSIST_BUG_SEEDS_MAX, &options_for)
        .expect("an accept acknowledged before it was persisted went unnoticed");
    report("planted persist bug", &caught, &options_for);
}

#[test]
fn planted_compaction_bug_is_caught_within_a_bounded_number_of_seeds() {
    // Snapshots and compaction are on in every standard seed (interval and margin
    // vary with the seed); a promise that silently skips compacted slots lets a
    // lagging candidate overwrite chosen values with no-ops.
    let options_for = |seed| {
        let mut options = SimOptions::for_seed(seed, None, OPS_PER_SEED);
        options.params.bug_promise_over_compacted_slots = true;
        options
    };
    let caught = first_violation(PLANTED_BUG_SEEDS_MAX, &options_for)
        .expect("a promise over compacted slots went unnoticed");
    report("planted compaction bug", &caught, &options_for);
}

#[test]
fn planted_amnesia_bug_is_caught_within_a_bounded_number_of_seeds() {
    // A replica that lost its disk forgot the promises and accepts it gave; if it
    // votes again, a value a quorum once accepted can be overwritten.
    let options_for = |seed| {
        let mut options = SimOptions::for_seed(seed, None, OPS_PER_SEED);
        options.faults = FaultRates::harsh();
        options.params.bug_amnesic_replica_votes = true;
        // Membership changes dilute this bug (the wiped replica is often removed or
        // not among the quorums that matter): this test is about amnesia alone.
        options.faults.membership_change_per_million = 0;
        options.spare_replicas = 0;
        options
    };
    let caught = first_violation(PLANTED_PERSIST_BUG_SEEDS_MAX, &options_for)
        .expect("a wiped replica voting again went unnoticed");
    report("planted amnesia bug", &caught, &options_for);
}
