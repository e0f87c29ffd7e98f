//! The machine against hostile or broken guests, written in WAT: every failure
//! is a canonical error, and a failed command leaves the state hash unchanged.

use paxwasm::machine::{ApplyError, EntryContext, Machine, MachineConfig, Snapshot};

/// A small config so the limits are reached quickly.
fn config() -> MachineConfig {
    MachineConfig {
        memory_bytes_max: 16 << 20,
        fuel_per_command: 2_000_000,
        fuel_per_query: 2_000_000,
        output_bytes_max: 64 << 10,
        ..MachineConfig::default()
    }
}

/// A guest whose `paxwasm_apply` body is `apply` (params `$ptr $len`, result
/// i64) and whose alloc hands out the buffer at 1024. `extra` adds module
/// fields (globals, functions, data, imports).
fn guest(extra: &str, apply: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
             {extra}
             (memory (export "memory") 1)
             (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 1024))
             (func (export "paxwasm_apply") (param $ptr i32) (param $len i32) (result i64) {apply}))"#
    ))
    .unwrap()
}

fn load(bytes: &[u8]) -> Machine {
    Machine::load(bytes, &config()).unwrap()
}

fn entry() -> EntryContext {
    EntryContext {
        time_ms: 1_700_000_000_000,
        seed: 42,
    }
}

/// Returns `(ptr << 32) | len` for a result at `ptr` of `len` bytes.
fn result(ptr: u32, len: u32) -> String {
    format!("(i64.const {})", ((ptr as u64) << 32) | len as u64)
}

#[test]
fn infinite_loop_runs_out_of_fuel_and_changes_nothing() {
    let mut machine = load(&guest(
        "",
        "(i32.store (i32.const 0) (i32.const 7)) (loop (br 0)) (unreachable)",
    ));
    let before = machine.state_hash();
    assert_eq!(machine.apply(b"x", entry()), Err(ApplyError::FuelExhausted));
    assert_eq!(machine.state_hash(), before);
    assert_eq!(ApplyError::FuelExhausted.to_string(), "fuel exhausted");
}

#[test]
fn memory_bomb_hits_the_cap_without_growing_the_host() {
    let bomb =
        "(loop (br_if 0 (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) (unreachable)";
    let mut machine = load(&guest("", bomb));
    let before = machine.state_hash();
    assert_eq!(
        machine.apply(b"x", entry()),
        Err(ApplyError::MemoryLimitExceeded)
    );
    assert_eq!(machine.state_hash(), before);
    assert_eq!(
        machine.snapshot().memory.len(),
        65536,
        "the failed growth was rolled back"
    );
    assert_eq!(
        ApplyError::MemoryLimitExceeded.to_string(),
        "memory limit exceeded"
    );
}

/// Counts in memory at 0 and in a global; `boom` traps after writing both and
/// growing memory, `wreck` after writing both without growing; anything else
/// increments and returns the count (4 bytes).
fn counting_guest() -> Vec<u8> {
    guest(
        r#"(global $hidden (mut i32) (i32.const 0))"#,
        &format!(
            r#"(i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 1)))
               (global.set $hidden (i32.add (global.get $hidden) (i32.const 1)))
               (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 98))   ;; 'b'
                 (then (drop (memory.grow (i32.const 2))) (unreachable)))
               (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 119))  ;; 'w'
                 (then (unreachable)))
               (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 103))  ;; 'g'
                 (then (drop (memory.grow (i32.const 1)))))
               (i32.store (i32.const 8) (global.get $hidden))
               {}"#,
            result(8, 4)
        ),
    )
}

fn count(out: Vec<u8>) -> u32 {
    u32::from_le_bytes(out.try_into().unwrap())
}

#[test]
fn trap_after_writing_memory_and_globals_leaves_the_state_hash_unchanged() {
    let mut machine = load(&counting_guest());
    assert_eq!(count(machine.apply(b"a", entry()).unwrap()), 1);
    assert_eq!(count(machine.apply(b"grow", entry()).unwrap()), 2);
    let before = machine.state_hash();
    let snapshot_before = machine.snapshot();
    assert_eq!(
        machine.apply(b"boom", entry()),
        Err(ApplyError::Trap("unreachable"))
    );
    assert_eq!(machine.state_hash(), before);
    assert_eq!(machine.snapshot(), snapshot_before);
    // The machine goes on from the state before the failed command.
    assert_eq!(count(machine.apply(b"a", entry()).unwrap()), 3);
}

/// A checkpoint keeps the primary's written pages as private copies (where
/// userfaultfd tracking works): a failed command that writes such a page again
/// must still leave exactly the checkpointed bytes, and a successful one must
/// reach the base at the next checkpoint.
#[test]
fn a_page_written_again_after_a_checkpoint_is_rolled_back_and_carried_forward() {
    let mut machine = load(&counting_guest());
    assert_eq!(count(machine.apply(b"a", entry()).unwrap()), 1);
    let first = machine.state_hash();
    let snapshot_first = machine.snapshot();
    assert_eq!(
        machine.apply(b"wreck", entry()),
        Err(ApplyError::Trap("unreachable"))
    );
    assert_eq!(machine.state_hash(), first);
    assert_eq!(machine.snapshot(), snapshot_first);
    assert_eq!(count(machine.apply(b"a", entry()).unwrap()), 2);
    let second = machine.state_hash();
    assert_ne!(second, first);
    assert_eq!(&machine.snapshot().memory[..4], &2u32.to_le_bytes());
    // Restored elsewhere, the state is the same: the base, not only the
    // primary's private copy, holds the second write.
    let mut restored = load(&counting_guest());
    restored.restore(&machine.snapshot()).unwrap();
    assert_eq!(restored.state_hash(), second);
    for expected in 3..=5 {
        assert_eq!(count(machine.apply(b"a", entry()).unwrap()), expected);
        assert!(machine.apply(b"wreck", entry()).is_err());
        machine.state_hash();
    }
    assert_eq!(&machine.snapshot().memory[..4], &5u32.to_le_bytes());
}

/// `N` (one digit) adds 1 to a counter on OS page N and returns it; `wN`
/// does the same, then traps.
fn page_writing_guest() -> Vec<u8> {
    guest(
        "",
        &format!(
            r#"(local $at i32)
               (local.set $at (i32.add (i32.const 16) (i32.mul (i32.const 4096)
                 (i32.sub (i32.load8_u (i32.add (local.get $ptr) (i32.sub (local.get $len) (i32.const 1))))
                          (i32.const 48)))))
               (i32.store (local.get $at) (i32.add (i32.load (local.get $at)) (i32.const 1)))
               (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 119))  ;; 'w'
                 (then (unreachable)))
               (i32.store (i32.const 8) (i32.load (local.get $at)))
               {}"#,
            result(8, 4)
        ),
    )
}

/// Dropping the kept private copies once they exceed `kept_copies_bytes_max`
/// changes nothing a command, a rollback or a hash sees.
#[test]
fn kept_copies_over_their_bound_are_dropped_without_changing_the_state() {
    let tight = MachineConfig {
        kept_copies_bytes_max: 2 * 4096,
        ..config()
    };
    let mut reference = load(&page_writing_guest());
    let mut machine = Machine::load(&page_writing_guest(), &tight).unwrap();
    for i in 0..60u32 {
        let page = (i * 7 % 10).to_string();
        let expected = reference.apply(page.as_bytes(), entry());
        assert_eq!(
            machine.apply(page.as_bytes(), entry()),
            expected,
            "command {i}"
        );
        let failing = format!("w{}", i * 3 % 10);
        assert!(machine.apply(failing.as_bytes(), entry()).is_err());
        if i % 4 == 0 {
            assert_eq!(
                machine.state_hash(),
                reference.state_hash(),
                "after command {i}"
            );
        }
    }
    assert_eq!(machine.snapshot(), reference.snapshot());
}

#[test]
fn rollback_replays_the_commands_since_the_last_checkpoint() {
    // No state hash between commands, so the commands before the failure are
    // only in the replay log when it happens.
    let mut reference = load(&counting_guest());
    let mut machine = load(&counting_guest());
    for command in [&b"a"[..], b"grow", b"a", b"grow", b"a"] {
        reference.apply(command, entry()).unwrap();
        machine.apply(command, entry()).unwrap();
    }
    assert_eq!(
        machine.apply(b"boom", entry()),
        Err(ApplyError::Trap("unreachable"))
    );
    assert_eq!(machine.state_hash(), reference.state_hash());
    assert_eq!(machine.apply(b"a", entry()), reference.apply(b"a", entry()));
    assert_eq!(machine.state_hash(), reference.state_hash());
}

#[test]
fn rollback_is_exact_with_frequent_checkpoints() {
    let config = MachineConfig {
        replay_commands_max: 2,
        ..config()
    };
    let mut reference = Machine::load(&counting_guest(), &config).unwrap();
    let mut machine = Machine::load(&counting_guest(), &config).unwrap();
    for i in 0..9 {
        let command: &[u8] = if i % 3 == 0 { b"grow" } else { b"a" };
        reference.apply(command, entry()).unwrap();
        machine.apply(command, entry()).unwrap();
        assert!(machine.apply(b"boom", entry()).is_err());
        assert_eq!(
            machine.state_hash(),
            reference.state_hash(),
            "after command {i}"
        );
    }
}

#[test]
fn unknown_imports_are_refused_by_name() {
    let env = guest(
        r#"(import "env" "now" (func (result i64)))"#,
        "(i64.const 0)",
    );
    let error = Machine::load(&env, &config()).unwrap_err().to_string();
    assert!(error.contains("`env.now`"), "{error}");
    let clock = guest(
        r#"(import "paxwasm" "clock" (func (result i64)))"#,
        "(i64.const 0)",
    );
    let error = Machine::load(&clock, &config()).unwrap_err().to_string();
    assert!(error.contains("`paxwasm.clock` is unknown"), "{error}");
    let bad_signature = guest(
        r#"(import "paxwasm" "entry_seed" (func (result i32)))"#,
        "(i64.const 0)",
    );
    let error = Machine::load(&bad_signature, &config())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("`paxwasm.entry_seed` has signature () -> (i32), expected () -> (i64)"),
        "{error}"
    );
}

#[test]
fn the_agreed_imports_see_the_entry_context() {
    let bytes = guest(
        r#"(import "paxwasm" "entry_time_ms" (func $time (result i64)))
           (import "paxwasm" "entry_seed" (func $seed (result i64)))
           (import "paxwasm" "log" (func $log (param i32 i32)))"#,
        &format!(
            "(call $log (local.get $ptr) (local.get $len)) (i64.store (i32.const 0) (call $time)) (i64.store (i32.const 8) (call $seed)) {}",
            result(0, 16)
        ),
    );
    let mut machine = load(&bytes);
    let out = machine
        .apply(
            b"hello",
            EntryContext {
                time_ms: 5,
                seed: u64::MAX,
            },
        )
        .unwrap();
    assert_eq!(out[..8], 5i64.to_le_bytes());
    assert_eq!(out[8..], u64::MAX.to_le_bytes());
}

#[test]
fn structural_refusals_name_the_reason() {
    let cases: [(&str, &str); 6] = [
        (
            r#"(module (memory 1) (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 0))
                 (func (export "paxwasm_apply") (param i32 i32) (result i64) (i64.const 0)))"#,
            "the memory must be exported as `memory`",
        ),
        (
            r#"(module (memory (export "memory") 1) (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 0)))"#,
            "required export `paxwasm_apply` is missing",
        ),
        (
            r#"(module (memory (export "memory") 1) (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 0))
                 (func (export "paxwasm_apply") (param i32 i32) (result i32) (i32.const 0)))"#,
            "export `paxwasm_apply` has signature (i32, i32) -> (i32), expected (i32, i32) -> (i64)",
        ),
        (
            r#"(module (memory (export "memory") 1 1 shared) (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 0))
                 (func (export "paxwasm_apply") (param i32 i32) (result i64) (i64.const 0)))"#,
            "invalid Wasm or a feature that is not allowed",
        ),
        (
            r#"(module (memory (export "memory") 2000) (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 0))
                 (func (export "paxwasm_apply") (param i32 i32) (result i64) (i64.const 0)))"#,
            "memory has 2000 initial pages, more than memory_initial_pages_max = 1024",
        ),
        (
            r#"(module (memory (export "memory") 1) (table 1 funcref)
                 (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 0))
                 (func (export "paxwasm_apply") (param i32 i32) (result i64) (drop (table.grow (ref.null func) (i32.const 1))) (i64.const 0)))"#,
            "instruction `table.grow` changes table or segment state",
        ),
    ];
    for (text, reason) in cases {
        let error = Machine::load(&wat::parse_str(text).unwrap(), &config())
            .unwrap_err()
            .to_string();
        assert!(error.contains(reason), "expected {reason:?} in {error:?}");
    }
    let small = MachineConfig {
        module_bytes_max: 10,
        ..config()
    };
    let error = Machine::load(&counting_guest(), &small)
        .unwrap_err()
        .to_string();
    assert!(error.contains("more than module_bytes_max = 10"), "{error}");
}

#[test]
fn nan_results_have_canonical_bits() {
    // 0/0 gives a negative NaN on x86 without canonicalization; a NaN operand
    // with a payload would propagate the payload.
    let apply = format!(
        r#"(f64.store (i32.const 0) (f64.div (f64.const 0) (f64.const 0)))
           (f64.store (i32.const 8) (f64.add (f64.const nan:0x4) (f64.const 1)))
           (f32.store (i32.const 16) (f32.sqrt (f32.const -1)))
           (f32.store (i32.const 20) (f32.mul (f32.const -nan:0x1) (f32.const 2)))
           {}"#,
        result(0, 24)
    );
    let mut machine = load(&guest("", &apply));
    let out = machine.apply(b"", entry()).unwrap();
    let f64_bits = |i: usize| u64::from_le_bytes(out[i..i + 8].try_into().unwrap());
    let f32_bits = |i: usize| u32::from_le_bytes(out[i..i + 4].try_into().unwrap());
    assert_eq!(f64_bits(0), 0x7ff8_0000_0000_0000);
    assert_eq!(f64_bits(8), 0x7ff8_0000_0000_0000);
    assert_eq!(f32_bits(16), 0x7fc0_0000);
    assert_eq!(f32_bits(20), 0x7fc0_0000);
}

#[test]
fn state_kept_only_in_an_unexported_global_survives_snapshot_and_restore() {
    // The start function and the data segment must not clobber restored state.
    let bytes = guest(
        r#"(global $hidden (mut i64) (i64.const 0))
           (data (i32.const 64) "initial")
           (func $start (global.set $hidden (i64.const 1000)) (i32.store (i32.const 64) (i32.const 0x74617473)))
           (start $start)"#,
        &format!(
            "(global.set $hidden (i64.add (global.get $hidden) (i64.const 1))) (i32.store8 (i32.const 64) (i32.const 88)) (i64.store (i32.const 0) (global.get $hidden)) {}",
            result(0, 8)
        ),
    );
    let mut machine = load(&bytes);
    assert_eq!(machine.apply(b"", entry()).unwrap(), 1001i64.to_le_bytes());
    assert_eq!(machine.apply(b"", entry()).unwrap(), 1002i64.to_le_bytes());
    let snapshot = machine.snapshot();
    let hash = machine.state_hash();
    let decoded = Snapshot::from_bytes(&snapshot.to_bytes()).unwrap();
    assert_eq!(decoded, snapshot);

    let mut restored = Machine::from_snapshot(&bytes, &decoded, &config()).unwrap();
    assert_eq!(restored.state_hash(), hash);
    assert_eq!(
        restored.snapshot().memory[64..71],
        *b"Xtatial",
        "neither the data segment nor the start function ran again"
    );
    assert_eq!(restored.apply(b"", entry()).unwrap(), 1003i64.to_le_bytes());
    assert_eq!(machine.apply(b"", entry()).unwrap(), 1003i64.to_le_bytes());
    assert_eq!(restored.state_hash(), machine.state_hash());
}

#[test]
fn restore_refuses_a_snapshot_of_another_module() {
    let mut machine = load(&counting_guest());
    let other = load(&guest("", "(i64.const 0)")).snapshot();
    let error = machine.restore(&other).unwrap_err().to_string();
    assert!(
        error.starts_with("snapshot is of module sha256:"),
        "{error}"
    );
}

#[test]
fn huge_output_is_an_error_and_rolls_back() {
    // Claims a 2 MiB result after writing memory; the cap is 64 KiB.
    let bytes = guest(
        "",
        &format!(
            "(i32.store (i32.const 0) (i32.const 9)) (drop (memory.grow (i32.const 32))) {}",
            result(0, 2 << 20)
        ),
    );
    let mut machine = load(&bytes);
    let before = machine.state_hash();
    assert_eq!(machine.apply(b"", entry()), Err(ApplyError::OutputTooLarge));
    assert_eq!(machine.state_hash(), before);
    // A result pointing outside memory is a trap, not a host read.
    let mut outside = load(&guest("", &result(0xffff_fff0, 64)));
    assert_eq!(
        outside.apply(b"", entry()),
        Err(ApplyError::Trap("out of bounds memory access"))
    );
}

#[test]
fn deep_recursion_exhausts_the_stack_deterministically() {
    let bytes = guest(
        r#"(func $down (param i64) (result i64) (i64.add (call $down (local.get 0)) (i64.const 1)))"#,
        "(call $down (i64.const 0))",
    );
    let mut machine = load(&bytes);
    assert_eq!(
        machine.apply(b"", entry()),
        Err(ApplyError::Trap("call stack exhausted"))
    );
}

/// A guest whose query writes memory, a global and grows memory before
/// answering with the stored count.
fn query_writing_guest() -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
             (memory (export "memory") 1)
             (global $g (mut i32) (i32.const 0))
             (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 1024))
             (func (export "paxwasm_apply") (param i32 i32) (result i64)
               (global.set $g (i32.add (global.get $g) (i32.const 1)))
               (i32.store (i32.const 0) (global.get $g)) {r})
             (func (export "paxwasm_query") (param i32 i32) (result i64)
               (i32.store (i32.const 4) (global.get $g))
               (global.set $g (i32.const 99))
               (i32.store (i32.const 0) (i32.const 77))
               (drop (memory.grow (i32.const 3)))
               (i32.store (i32.const 200000) (i32.const 5))
               {q}))"#,
        r = result(0, 4),
        q = result(4, 4),
    ))
    .unwrap()
}

#[test]
fn queries_change_neither_state_nor_hash() {
    let mut machine = load(&query_writing_guest());
    machine.apply(b"", entry()).unwrap();
    machine.apply(b"", entry()).unwrap();
    let before = machine.state_hash();
    for _ in 0..3 {
        assert_eq!(count(machine.query(b"").unwrap()), 2);
        assert_eq!(machine.state_hash(), before);
    }
    assert_eq!(count(machine.apply(b"", entry()).unwrap()), 3);
    assert_eq!(count(machine.query(b"").unwrap()), 3);
    let missing = load(&counting_guest()).query(b"x");
    assert_eq!(missing, Err(ApplyError::MissingExport("paxwasm_query")));
}

/// A guest whose query writes memory and a global without growing memory, so
/// the machine reuses its reader: it answers `[memory word 0, global]` as read
/// on entry, then overwrites both.
fn query_scribbling_guest() -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
             (memory (export "memory") 1)
             (global $g (mut i32) (i32.const 0))
             (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 1024))
             (func (export "paxwasm_apply") (param i32 i32) (result i64)
               (global.set $g (i32.add (global.get $g) (i32.const 1)))
               (i32.store (i32.const 0) (i32.mul (global.get $g) (i32.const 10))) {r})
             (func (export "paxwasm_query") (param i32 i32) (result i64)
               (i32.store (i32.const 4) (i32.load (i32.const 0)))
               (i32.store (i32.const 8) (global.get $g))
               (i32.store (i32.const 0) (i32.const 77))
               (i32.store (i32.const 30000) (i32.const 78))
               (global.set $g (i32.const 99))
               {q}))"#,
        r = result(0, 4),
        q = result(4, 8),
    ))
    .unwrap()
}

fn words(out: Vec<u8>) -> (u32, u32) {
    let word = |i: usize| u32::from_le_bytes(out[i..i + 4].try_into().unwrap());
    (word(0), word(4))
}

#[test]
fn a_reused_reader_sees_each_new_committed_state_not_its_own_writes() {
    let mut machine = load(&query_scribbling_guest());
    assert_eq!(count(machine.apply(b"", entry()).unwrap()), 10);
    let committed = machine.state_hash();
    for _ in 0..3 {
        assert_eq!(words(machine.query(b"").unwrap()), (10, 1));
        assert_eq!(machine.state_hash(), committed);
    }
    // The page the queries wrote changes in the committed state: the reader
    // must read the new bytes, not its earlier private copy.
    assert_eq!(count(machine.apply(b"", entry()).unwrap()), 20);
    assert_eq!(words(machine.query(b"").unwrap()), (20, 2));
    assert_eq!(words(machine.query(b"").unwrap()), (20, 2));
    let snapshot = machine.snapshot();
    assert_eq!(snapshot.memory[..4], 20u32.to_le_bytes());
    assert_eq!(snapshot.memory[30000..30004], [0; 4]);
}

#[test]
fn a_module_with_megabytes_of_data_segments_loads_and_runs() {
    // 4 MiB of initialised data: instantiation copies it, and that must not count
    // against any per-command budget.
    let data_bytes = 4 << 20;
    let bytes = wat::parse_str(format!(
        r#"(module
             (memory (export "memory") 80)
             (data (i32.const 65536) "{}")
             (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 1024))
             (func (export "paxwasm_apply") (param $ptr i32) (param $len i32) (result i64)
               {}))"#,
        "x".repeat(data_bytes),
        result(65536 + data_bytes as u32 - 4, 4)
    ))
    .unwrap();
    let mut machine = load(&bytes);
    assert_eq!(machine.apply(b"", entry()).unwrap(), b"xxxx");
}

/// A guest with an input descriptor (ABI.md, "Input buffer") at address 64
/// holding `descriptor` (8 bytes: buffer address, capacity; u32 LE), exported
/// as `global`. `paxwasm_alloc` counts its calls and hands out 1024. Apply
/// answers `[input address u32][alloc calls u32][first input byte]`.
fn descriptor_guest(global: &str, descriptor: [u32; 2]) -> Vec<u8> {
    let bytes: String = descriptor
        .iter()
        .flat_map(|word| word.to_le_bytes())
        .map(|b| format!("\\{b:02x}"))
        .collect();
    wat::parse_str(format!(
        r#"(module
             (memory (export "memory") 1)
             {global}
             (global $allocs (mut i32) (i32.const 0))
             (data (i32.const 64) "{bytes}")
             (func (export "paxwasm_alloc") (param i32) (result i32)
               (global.set $allocs (i32.add (global.get $allocs) (i32.const 1)))
               (i32.const 1024))
             (func (export "paxwasm_apply") (param $ptr i32) (param $len i32) (result i64)
               (i32.store (i32.const 0) (local.get $ptr))
               (i32.store (i32.const 4) (global.get $allocs))
               (i32.store8 (i32.const 8) (i32.load8_u (local.get $ptr)))
               (i64.const 9)))"#
    ))
    .unwrap()
}

const DESCRIPTOR_GLOBAL: &str = r#"(global (export "paxwasm_input_buffer") i32 (i32.const 64))"#;

/// (input address, alloc calls so far, first input byte) from an apply.
fn placed(out: Vec<u8>) -> (u32, u32, u8) {
    (
        u32::from_le_bytes(out[..4].try_into().unwrap()),
        u32::from_le_bytes(out[4..8].try_into().unwrap()),
        out[8],
    )
}

#[test]
fn an_input_that_fits_the_descriptor_skips_alloc_and_anything_else_falls_back() {
    let mut machine = load(&descriptor_guest(DESCRIPTOR_GLOBAL, [2048, 16]));
    // Fits: written at 2048, no alloc call.
    assert_eq!(
        placed(machine.apply(b"hello", entry()).unwrap()),
        (2048, 0, b'h')
    );
    assert_eq!(
        placed(machine.apply(&[b'x'; 16], entry()).unwrap()),
        (2048, 0, b'x')
    );
    // Larger than the capacity: alloc as before.
    assert_eq!(
        placed(machine.apply(&[b'y'; 17], entry()).unwrap()),
        (1024, 1, b'y')
    );
    // Queries and rollbacks replay the same choice (it is state): a failing
    // command after these leaves the hash unchanged.
    let before = machine.state_hash();
    machine.apply(&[b'z'; 70_000], entry()).unwrap_err(); // 1024 + 70000 > 64 KiB
    assert_eq!(machine.state_hash(), before);
}

#[test]
fn a_descriptor_outside_memory_is_ignored_not_trusted() {
    // The buffer it names runs past the end of memory, or wraps around.
    for descriptor in [[65_530, 16], [u32::MAX - 3, 100], [128, u32::MAX]] {
        let mut machine = load(&descriptor_guest(DESCRIPTOR_GLOBAL, descriptor));
        let out = machine.apply(b"hello-world", entry()).unwrap();
        let (ptr, allocs, first) = placed(out);
        if descriptor == [128, u32::MAX] {
            // A capacity beyond memory is harmless: the input itself fits.
            assert_eq!((ptr, allocs, first), (128, 0, b'h'));
        } else {
            assert_eq!((ptr, allocs, first), (1024, 1, b'h'), "{descriptor:?}");
        }
    }
    // The descriptor itself outside memory.
    let far = r#"(global (export "paxwasm_input_buffer") i32 (i32.const -4))"#;
    let mut machine = load(&descriptor_guest(far, [2048, 16]));
    assert_eq!(
        placed(machine.apply(b"hi", entry()).unwrap()),
        (1024, 1, b'h')
    );
}

#[test]
fn a_descriptor_export_of_the_wrong_kind_is_refused() {
    for global in [
        r#"(global (export "paxwasm_input_buffer") (mut i32) (i32.const 64))"#,
        r#"(global (export "paxwasm_input_buffer") i64 (i64.const 64))"#,
    ] {
        let error = Machine::load(&descriptor_guest(global, [2048, 16]), &config()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "module refused: export `paxwasm_input_buffer` must be an immutable i32 global (the address of the input descriptor)"
        );
    }
    let function = wat::parse_str(
        r#"(module
             (memory (export "memory") 1)
             (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 0))
             (func (export "paxwasm_apply") (param i32 i32) (result i64) (i64.const 0))
             (func (export "paxwasm_input_buffer")))"#,
    )
    .unwrap();
    assert!(Machine::load(&function, &config())
        .unwrap_err()
        .to_string()
        .contains("`paxwasm_input_buffer` must be an immutable i32 global"));
}

/// A guest that takes batches (`paxwasm_apply_batch`, ABI.md "Batches") and
/// misbehaves on request. Each command echoes itself and counts successful
/// commands in the word at 0. A command starting with `t` traps, `l` loops, `y`
/// calls `command_done` from `paxwasm_apply` (outside a batch); in a batch, `x`
/// calls `command_done` twice and `r` returns before finishing.
fn batch_guest() -> Vec<u8> {
    wat::parse_str(
        r#"(module
             (import "paxwasm" "command_done" (func $done (param i32 i32) (result i32)))
             (memory (export "memory") 1)
             (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 1024))
             (func $apply_one (param $p i32) (param $n i32)
               (local $c i32)
               (local.set $c (i32.load8_u (local.get $p)))
               (if (i32.eq (local.get $c) (i32.const 116)) (then unreachable))
               (if (i32.eq (local.get $c) (i32.const 108)) (then (loop $spin (br $spin))))
               (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 1))))
             (func (export "paxwasm_apply") (param $p i32) (param $n i32) (result i64)
               (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 121))
                 (then (drop (call $done (local.get $p) (local.get $n)))))
               (call $apply_one (local.get $p) (local.get $n))
               (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32))
                       (i64.extend_i32_u (local.get $n))))
             (func (export "paxwasm_apply_batch") (param $p i32) (param $len i32)
               (local $end i32) (local $n i32) (local $cmd i32) (local $c i32)
               (local.set $end (i32.add (local.get $p) (local.get $len)))
               (block $out (loop $next
                 (br_if $out (i32.ge_u (local.get $p) (local.get $end)))
                 (local.set $n (i32.load (local.get $p)))
                 (local.set $cmd (i32.add (local.get $p) (i32.const 4)))
                 (local.set $c (i32.load8_u (local.get $cmd)))
                 (br_if $out (i32.eq (local.get $c) (i32.const 114)))
                 (call $apply_one (local.get $cmd) (local.get $n))
                 (if (i32.eq (local.get $c) (i32.const 120))
                   (then (drop (call $done (local.get $cmd) (local.get $n)))))
                 (br_if $out (call $done (local.get $cmd) (local.get $n)))
                 (local.set $p (i32.add (local.get $cmd) (local.get $n)))
                 (br $next))))
             (func (export "paxwasm_query") (param i32 i32) (result i64)
               (i64.const 4)))"#,
    )
    .unwrap()
}

/// Every result of one `apply_batch`, outputs as text.
fn batch(machine: &mut Machine, commands: &[&str]) -> Vec<Result<String, ApplyError>> {
    let commands: Vec<&[u8]> = commands.iter().map(|c| c.as_bytes()).collect();
    let mut results = paxwasm::machine::BatchResults::default();
    machine.apply_batch(&commands, entry(), &mut results);
    assert_eq!(results.len(), commands.len());
    (0..results.len())
        .map(|i| {
            results
                .get(i)
                .map(|out| String::from_utf8_lossy(out).into_owned())
        })
        .collect()
}

/// The same commands through `apply_into` one by one.
fn one_by_one(machine: &mut Machine, commands: &[&str]) -> Vec<Result<String, ApplyError>> {
    commands
        .iter()
        .map(|c| {
            let mut out = Vec::new();
            machine
                .apply_into(c.as_bytes(), entry(), &mut out)
                .map(|()| String::from_utf8_lossy(&out).into_owned())
        })
        .collect()
}

fn successes(machine: &mut Machine) -> u32 {
    count(machine.query(b"").unwrap())
}

#[test]
fn a_batch_applies_every_command_in_one_call_deterministically() {
    let (mut first, mut second) = (load(&batch_guest()), load(&batch_guest()));
    for machine in [&mut first, &mut second] {
        let results = batch(machine, &["a", "bb", "ccc"]);
        assert_eq!(results, [Ok("a".into()), Ok("bb".into()), Ok("ccc".into())]);
        assert_eq!(successes(machine), 3);
    }
    assert_eq!(first.state_hash(), second.state_hash());
    // One command is not worth a batch call: it takes the per-command path.
    let mut single = load(&batch_guest());
    batch(&mut single, &["a"]);
    let mut plain = load(&batch_guest());
    one_by_one(&mut plain, &["a"]);
    assert_eq!(single.state_hash(), plain.state_hash());
}

#[test]
fn a_failing_command_sends_the_whole_batch_down_the_per_command_path() {
    // Each of these fails the batch call: a trap, a loop out of fuel, a second
    // `command_done` after the last command, an early return. Then the batch
    // is rolled back and applied one by one, so results and state are exactly
    // those of the per-command path.
    for commands in [
        &["a", "t", "b"][..],
        &["a", "l", "b"],
        &["a", "b", "x"],
        &["a", "r", "b"],
    ] {
        let mut batched = load(&batch_guest());
        let mut plain = load(&batch_guest());
        batch(&mut batched, &["warm", "up"]);
        one_by_one(&mut plain, &["warm", "up"]);
        let (before_batched, before_plain) = (batched.state_hash(), plain.state_hash());
        let results = batch(&mut batched, commands);
        assert_eq!(results, one_by_one(&mut plain, commands), "{commands:?}");
        assert_eq!(successes(&mut batched) - 2, successes(&mut plain) - 2);
        // The batch before is kept; what the failed call did is not.
        let mut replayed = load(&batch_guest());
        batch(&mut replayed, &["warm", "up"]);
        assert_eq!(replayed.state_hash(), before_batched);
        one_by_one(&mut replayed, commands);
        assert_eq!(replayed.state_hash(), batched.state_hash(), "{commands:?}");
        assert_ne!(before_plain, plain.state_hash());
    }
    let mut machine = load(&batch_guest());
    let results = batch(&mut machine, &["a", "t", "l"]);
    assert_eq!(
        results,
        [
            Ok("a".into()),
            Err(ApplyError::Trap("unreachable")),
            Err(ApplyError::FuelExhausted)
        ]
    );
}

#[test]
fn a_rollback_replays_a_batch_with_the_call_it_came_from() {
    let mut machine = load(&batch_guest());
    let mut reference = load(&batch_guest());
    for m in [&mut machine, &mut reference] {
        batch(m, &["a", "bb"]);
        batch(m, &["ccc", "dddd", "e"]);
    }
    // A failed command rolls back to the last checkpoint and replays the two
    // batches since; the state must come back bit for bit.
    assert_eq!(
        machine.apply(b"trap", entry()),
        Err(ApplyError::Trap("unreachable"))
    );
    assert_eq!(machine.state_hash(), reference.state_hash());
    assert_eq!(successes(&mut machine), 5);
}

#[test]
fn command_done_outside_a_batch_is_a_trap() {
    let mut machine = load(&batch_guest());
    let before = machine.state_hash();
    assert_eq!(
        machine.apply(b"y", entry()),
        Err(ApplyError::Trap("command_done outside a batch"))
    );
    assert_eq!(machine.state_hash(), before);
}

#[test]
fn a_batch_export_without_the_command_done_import_is_refused() {
    let bytes = guest(
        r#"(func (export "paxwasm_apply_batch") (param i32 i32))"#,
        &result(1024, 0),
    );
    let error = Machine::load(&bytes, &config()).err().unwrap().to_string();
    assert!(
        error.contains("paxwasm_apply_batch") && error.contains("paxwasm.command_done"),
        "{error}"
    );
}
