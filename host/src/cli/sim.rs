//! `paxwasm sim`: runs the deterministic cluster simulator over many seeds and
//! prints one summary line. Each failing seed prints its replay command.

use std::process::ExitCode;

use clap::Args;

use crate::sim::cluster::{run_seeds, FaultCounts, FaultRates, SimOptions};

/// Client operations per seed when `--ops` is not given.
pub const OPS_PER_SEED_DEFAULT: usize = 100;

#[derive(Debug, Args)]
pub struct SimArgs {
    /// Number of seeds to run.
    #[arg(long, default_value_t = 100)]
    pub seeds: u64,
    /// First seed; seeds S, S+1, ... S+N-1 are run.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replicas per cluster (3 or 5); by default even seeds use 3 and odd seeds 5.
    #[arg(long, value_parser = parse_replicas)]
    pub replicas: Option<usize>,
    /// Client operations per seed.
    #[arg(long, default_value_t = OPS_PER_SEED_DEFAULT)]
    pub ops: usize,
    /// Worker threads (each seed is single-threaded); default: available cores.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Fault profile: `default` or `harsh` (more drops, crashes, partitions, slower
    /// persists).
    #[arg(long, default_value = "default", value_parser = ["default", "harsh"])]
    pub faults: String,
    /// Plant the known protocol bug (a new leader ignores Phase 1 values); for
    /// replaying the planted-bug test's seeds.
    #[arg(long, hide = true)]
    pub planted_bug: bool,
    /// Plant the read-path bug (a new leader serves reads before its first entry is
    /// applied); for replaying the read planted-bug test's seeds.
    #[arg(long, hide = true)]
    pub planted_read_bug: bool,
    /// Plant the persist bug (an accept is acknowledged before it is persisted); for
    /// replaying the persist planted-bug test's seeds.
    #[arg(long, hide = true)]
    pub planted_persist_bug: bool,
    /// Plant the configuration bug (Phase 1 ignores configurations that promises
    /// reveal); for replaying the configuration planted-bug test's seeds.
    #[arg(long, hide = true)]
    pub planted_config_bug: bool,
    /// Plant the compaction bug (an acceptor promises over slots it compacted away);
    /// for replaying the compaction planted-bug test's seeds.
    #[arg(long, hide = true)]
    pub planted_compaction_bug: bool,
    /// Turn off the disk-wipe fault (a replica losing its whole disk).
    #[arg(long)]
    pub no_disk_wipes: bool,
    /// Plant the amnesia bug (a replica that lost its disk votes again).
    #[arg(long, hide = true)]
    pub planted_amnesia_bug: bool,
}

fn parse_replicas(text: &str) -> Result<usize, String> {
    match text {
        "3" => Ok(3),
        "5" => Ok(5),
        _ => Err(format!("replicas must be 3 or 5, not {text:?}")),
    }
}

pub fn run(args: SimArgs) -> ExitCode {
    let seeds: Vec<u64> = (args.seed..args.seed + args.seeds).collect();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let options_for = |seed| {
        let mut options = SimOptions::for_seed(seed, args.replicas, args.ops);
        if args.faults == "harsh" {
            options.faults = FaultRates::harsh();
        }
        options.params.bug_ignore_phase1_values = args.planted_bug;
        options.params.bug_reads_before_ready = args.planted_read_bug;
        options.params.bug_accepted_before_persist = args.planted_persist_bug;
        options.params.bug_phase1_ignores_revealed_configurations = args.planted_config_bug;
        options.params.bug_promise_over_compacted_slots = args.planted_compaction_bug;
        options.params.bug_amnesic_replica_votes = args.planted_amnesia_bug;
        if args.no_disk_wipes {
            options.faults.disk_wipe_per_million = 0;
        }
        options
    };
    let outcomes = run_seeds(&seeds, threads, &options_for);
    let mut committed = 0;
    let mut violations = 0;
    let mut too_complex = 0;
    let mut faults = FaultCounts::default();
    for outcome in &outcomes {
        faults.dropped += outcome.faults.dropped;
        faults.duplicated += outcome.faults.duplicated;
        faults.partitions += outcome.faults.partitions;
        faults.crashes += outcome.faults.crashes;
        faults.max_round += outcome.faults.max_round;
        faults.unknown_outcomes += outcome.faults.unknown_outcomes;
        faults.client_partitions += outcome.faults.client_partitions;
        faults.disk_stalls += outcome.faults.disk_stalls;
        faults.stall_crashes += outcome.faults.stall_crashes;
        faults.double_crashes += outcome.faults.double_crashes;
        faults.changes_accepted += outcome.faults.changes_accepted;
        faults.changes_refused += outcome.faults.changes_refused;
        faults.configurations_chosen += outcome.faults.configurations_chosen;
        faults.snapshots_saved += outcome.faults.snapshots_saved;
        faults.snapshots_sent += outcome.faults.snapshots_sent;
        faults.snapshots_installed += outcome.faults.snapshots_installed;
        faults.disk_wipes += outcome.faults.disk_wipes;
        committed += outcome.committed;
        if outcome.too_complex {
            // No verdict is not a pass: say so with the replay line, like a failure.
            too_complex += 1;
            let replay = options_for(outcome.seed).replay_command();
            eprintln!(
                "seed {} TOO COMPLEX: the linearizability search gave up (no verdict)",
                outcome.seed
            );
            eprintln!("replay: {replay}");
        }
        if let Some(violation) = &outcome.violation {
            violations += 1;
            let replay = options_for(outcome.seed).replay_command();
            eprintln!("seed {} FAILED: {violation}", outcome.seed);
            eprintln!("replay: {replay}");
        }
    }
    eprintln!(
        "sim: faults over all seeds: {} dropped, {} duplicated, {} partitions, {} crashes, {} ballot rounds, {} unknown outcomes",
        faults.dropped, faults.duplicated, faults.partitions, faults.crashes, faults.max_round, faults.unknown_outcomes
    );
    eprintln!(
        "sim: client partitions {}, disk stalls {} ({} ended in a crash), double crashes {}",
        faults.client_partitions, faults.disk_stalls, faults.stall_crashes, faults.double_crashes
    );
    eprintln!(
        "sim: membership changes {} accepted, {} refused, {} configuration entries chosen",
        faults.changes_accepted, faults.changes_refused, faults.configurations_chosen
    );
    eprintln!(
        "sim: snapshots saved={} sent={} installed={}; disk wipes (replica back amnesic)={}",
        faults.snapshots_saved,
        faults.snapshots_sent,
        faults.snapshots_installed,
        faults.disk_wipes
    );
    eprintln!("sim: too_complex={too_complex} (seeds without a linearizability verdict)");
    println!(
        "sim: seeds={} ops={} committed={committed} violations={violations}",
        args.seeds, args.ops
    );
    if violations > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
