//! The machine running the example guests (examples-wasm/*): their text
//! protocols end to end, snapshot → restore round trips, and upgrades with
//! and without migration.

use paxwasm::cli::exec::exec_lines;
use paxwasm::examples::{example_module, example_names};
use paxwasm::machine::{
    ApplyError, EntryContext, Machine, MachineConfig, Migration, Snapshot, UpgradeError,
};

fn module(name: &str) -> Vec<u8> {
    std::fs::read(example_module(name).unwrap()).unwrap()
}

fn load(name: &str) -> Machine {
    Machine::load(&module(name), &MachineConfig::default()).unwrap()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Runs commands then queries like `paxwasm exec`, returning the result lines
/// without the final state line.
fn run(machine: &mut Machine, commands: &[&str], queries: &[&str]) -> Vec<String> {
    let mut lines = exec_lines(machine, &strings(commands), &strings(queries));
    let state = lines.pop().unwrap();
    assert!(
        state.starts_with("state sha256:") && state.len() == "state sha256:".len() + 64,
        "{state}"
    );
    lines
}

fn apply(machine: &mut Machine, command: &str) -> String {
    String::from_utf8(
        machine
            .apply(command.as_bytes(), EntryContext::default())
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn counter_protocol() {
    let mut machine = load("counter");
    let lines = run(&mut machine, &["add 5", "add -2", "get", "add x"], &["get"]);
    assert_eq!(lines, ["5", "3", "3", "ERR usage: add N", "3"]);
}

#[test]
fn kv_protocol() {
    let mut machine = load("kv");
    let lines = run(
        &mut machine,
        &[
            "put a 1",
            "get a",
            "get b",
            "cas a 1 2",
            "cas a 1 3",
            "append l x",
            "append l y",
            "get l",
            "del a",
            "del a",
        ],
        &["get l", "get a"],
    );
    assert_eq!(
        lines,
        [
            "OK",
            "1",
            "NOT_FOUND",
            "OK",
            "MISMATCH 2",
            "OK",
            "OK",
            "x,y",
            "OK",
            "NOT_FOUND",
            "x,y",
            "NOT_FOUND"
        ]
    );
}

#[test]
fn bank_protocol_keeps_the_total() {
    let mut machine = load("bank");
    let lines = run(
        &mut machine,
        &[
            "open alice 100",
            "open bob 5",
            "transfer alice bob 30",
            "transfer bob alice 50",
        ],
        &["balance alice", "balance bob", "total"],
    );
    assert_eq!(lines, ["OK", "OK", "OK", "INSUFFICIENT", "70", "35", "105"]);
}

#[test]
fn snapshot_restore_round_trip_preserves_the_hash_for_every_example() {
    let commands: &[&str] = &[
        "add 7",
        "put k v",
        "open a 10",
        "append k w",
        "transfer a a 1",
        "version k",
    ];
    for name in example_names() {
        let mut machine = load(name);
        for command in commands {
            machine
                .apply(
                    command.as_bytes(),
                    EntryContext {
                        time_ms: 3,
                        seed: 4,
                    },
                )
                .unwrap();
        }
        let hash = machine.state_hash();
        let bytes = machine.snapshot().to_bytes();
        let snapshot = Snapshot::from_bytes(&bytes).unwrap();
        let mut restored =
            Machine::from_snapshot(&module(name), &snapshot, &MachineConfig::default()).unwrap();
        assert_eq!(restored.state_hash(), hash, "{name}");
        // Both go on identically.
        for command in commands {
            assert_eq!(
                restored.apply(command.as_bytes(), EntryContext::default()),
                machine.apply(command.as_bytes(), EntryContext::default()),
                "{name}: {command}"
            );
        }
        assert_eq!(restored.state_hash(), machine.state_hash(), "{name}");
    }
}

#[test]
fn identical_inputs_give_identical_hashes_and_differing_inputs_do_not() {
    let mut a = load("kv");
    let mut b = load("kv");
    assert_eq!(a.state_hash(), b.state_hash());
    apply(&mut a, "put x 1");
    assert_ne!(a.state_hash(), b.state_hash());
    apply(&mut b, "put x 1");
    assert_eq!(a.state_hash(), b.state_hash());
}

#[test]
fn upgrade_kv_to_kv_v2_migrates_the_state() {
    let mut machine = load("kv");
    apply(&mut machine, "put a 1");
    apply(&mut machine, "append l x");
    machine
        .upgrade(&module("kv_v2"), Migration::Migrate)
        .unwrap();
    assert_eq!(
        machine.module_id().to_string(),
        load("kv_v2").module_id().to_string()
    );
    assert_eq!(apply(&mut machine, "get a"), "1");
    assert_eq!(apply(&mut machine, "get l"), "x");
    assert_eq!(apply(&mut machine, "version a"), "1");
    apply(&mut machine, "put a 2");
    assert_eq!(apply(&mut machine, "version a"), "2");
}

#[test]
fn failed_migration_keeps_the_old_module_and_state() {
    let mut machine = load("kv");
    apply(&mut machine, "put a 1");
    let id = machine.module_id();
    let hash = machine.state_hash();
    // counter has no paxwasm_import_state.
    let error = machine
        .upgrade(&module("counter"), Migration::Migrate)
        .unwrap_err();
    assert!(
        matches!(
            error,
            UpgradeError::Import(ApplyError::MissingExport("paxwasm_import_state"))
        ),
        "{error}"
    );
    // bank has no paxwasm_export_state.
    let mut bank = load("bank");
    let bank_hash = bank.state_hash();
    let error = bank
        .upgrade(&module("kv_v2"), Migration::Migrate)
        .unwrap_err();
    assert!(
        matches!(
            error,
            UpgradeError::Export(ApplyError::MissingExport("paxwasm_export_state"))
        ),
        "{error}"
    );
    assert_eq!(bank.state_hash(), bank_hash);
    // A refused module.
    assert!(matches!(
        machine.upgrade(b"not wasm", Migration::Migrate),
        Err(UpgradeError::Refused(_))
    ));
    assert_eq!(machine.module_id(), id);
    assert_eq!(machine.state_hash(), hash);
    assert_eq!(apply(&mut machine, "get a"), "1");
}

#[test]
fn upgrade_without_migration_starts_fresh() {
    let mut machine = load("kv");
    apply(&mut machine, "put a 1");
    machine
        .upgrade(&module("kv_v2"), Migration::StartFresh)
        .unwrap();
    assert_eq!(machine.state_hash(), load("kv_v2").state_hash());
    assert_eq!(apply(&mut machine, "get a"), "NOT_FOUND");
}

#[test]
fn a_failed_command_between_successful_ones_is_invisible() {
    // The counter refuses overflow without trapping; an out-of-fuel command
    // is produced by a tiny budget instead.
    let tight = MachineConfig {
        fuel_per_command: 50,
        ..MachineConfig::default()
    };
    let mut machine = Machine::load(&module("counter"), &tight).unwrap();
    let before = machine.state_hash();
    assert_eq!(
        machine.apply(b"add 1", EntryContext::default()),
        Err(ApplyError::FuelExhausted)
    );
    assert_eq!(machine.state_hash(), before);
}

#[test]
fn a_trapping_or_looping_state_import_keeps_the_old_module_and_state() {
    let mut machine = load("kv");
    apply(&mut machine, "put a 1");
    let (id, hash) = (machine.module_id(), machine.state_hash());
    for (body, expected) in [
        ("(unreachable)", ApplyError::Trap("unreachable")),
        ("(loop (br 0))", ApplyError::FuelExhausted),
    ] {
        let successor = wat::parse_str(format!(
            r#"(module (memory (export "memory") 1)
                 (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 0))
                 (func (export "paxwasm_apply") (param i32 i32) (result i64) (i64.const 0))
                 (func (export "paxwasm_import_state") (param i32 i32) (i32.store (i32.const 0) (i32.const 1)) {body}))"#
        ))
        .unwrap();
        let error = machine.upgrade(&successor, Migration::Migrate).unwrap_err();
        assert!(
            matches!(&error, UpgradeError::Import(e) if *e == expected),
            "{error}"
        );
        assert_eq!(machine.module_id(), id);
        assert_eq!(machine.state_hash(), hash);
    }
    assert_eq!(apply(&mut machine, "get a"), "1");
}

/// kv's commands in batches of 1 to 9 (`Machine::apply_batch`, one guest call per
/// batch) and the same commands one by one: the same result for every command
/// and the same answer to every query; two machines fed the same batches reach the
/// same state hash.
#[test]
fn batches_give_the_results_of_the_per_command_path() {
    let mut commands = Vec::new();
    let mut seed = 7u64;
    let mut next = |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    for i in 0..600 {
        let key = format!("key{}", next(40));
        commands.push(match next(7) {
            0 => format!("get {key}"),
            1 => format!("del {key}"),
            2 => format!("cas {key} v{} w{i}", next(600)),
            3 => format!("append {key} a{i}"),
            4 => "bogus command".to_string(),
            _ => format!("put {key} v{i}"),
        });
    }
    let (mut batched, mut again, mut plain) = (load("kv"), load("kv"), load("kv"));
    let mut results = paxwasm::machine::BatchResults::default();
    let mut rest = &commands[..];
    while !rest.is_empty() {
        let take = (1 + next(9) as usize).min(rest.len());
        let (group, after) = rest.split_at(take);
        let group: Vec<&[u8]> = group.iter().map(|c| c.as_bytes()).collect();
        again.apply_batch(&group, EntryContext::default(), &mut results);
        batched.apply_batch(&group, EntryContext::default(), &mut results);
        for (i, command) in group.iter().enumerate() {
            let mut out = Vec::new();
            let expected = plain
                .apply_into(command, EntryContext::default(), &mut out)
                .map(|()| out);
            assert_eq!(
                results.get(i).map(<[u8]>::to_vec),
                expected,
                "{}",
                String::from_utf8_lossy(command)
            );
        }
        rest = after;
    }
    for k in 0..40 {
        let query = format!("get key{k}");
        assert_eq!(
            batched.query(query.as_bytes()),
            plain.query(query.as_bytes()),
            "{query}"
        );
    }
    assert_eq!(batched.state_hash(), again.state_hash());
    // The batches of two or more commands took the batch call, none fell back.
    let stats = batched.batch_stats();
    assert!(stats.calls > 50, "{stats:?}");
    assert_eq!(stats.fallbacks, 0);
}
