//! Benchmark of the Wasm state machine: `cargo bench -p paxwasm --bench machine`.
//!
//! Prints, measured in the same run:
//! - apply ns/op for counter and kv through the machine (input copy + apply +
//!   output copy + fuel + rollback readiness + checkpoints), the same app
//!   logic as native Rust, and their ratio. The native side runs the very
//!   code the guest runs: the SDK's glue (`paxwasm_guest::glue::Guest`: input
//!   buffer, reused result buffer) around the app, with the input copied in
//!   and the result copied out as the machine does; the figure of the app's
//!   plain `apply` (a fresh `Vec` per command) is printed too;
//! - kv through `Machine::apply_batch` in batches of 1, 4, 16 and 64 commands
//!   (one guest call per batch, as the node applies a log entry's commands), and
//!   the paired ratio at 16;
//! - a bare wasmtime loop over the same counter module (no fuel, no machine)
//!   as the floor the machine's bookkeeping adds to;
//! - query ns/op; rollback cost; checkpoint and state hash cost at 16 MiB and
//!   256 MiB of linear memory;
//! - the pause of `snapshot_image` at 16 MiB and 256 MiB (100 pages written
//!   since the previous image, everything written, fallbacks) and the time to
//!   write an image out;
//! - what one command's boundary costs in wasmtime, both ways (`calls`): the
//!   host calling a guest export per command (what the machine does) against a
//!   guest calling a host import per command, each with the fuel reset per
//!   command (the lever of a batch-apply ABI, docs/notes/machine-cost.md).
//!
//! Arguments select sections (`counter`, `kv`, `query`, `rollback`, `hash`,
//! `snapshot`, `calls`;
//! all by default): `cargo bench -p paxwasm --bench machine -- counter`.
//! `PAXWASM_BENCH_DIVISOR=N` divides the iteration counts and runs one round,
//! for a run under `valgrind --tool=callgrind`. `PAXWASM_BENCH_GUESTS=DIR`
//! takes the example modules from `DIR/<name>.wasm` instead of building them
//! (to compare guests built from another commit against this host).
//! `PAXWASM_BENCH_BATCH=N` runs kv's batch figure for batches of N only.

use std::hint::black_box;
use std::time::{Duration, Instant};

use paxwasm::examples::example_module;
use paxwasm::machine::{BatchResults, EntryContext, Machine, MachineConfig, HASH_LEAF_BYTES};
use paxwasm_guest::App;
use sha2::{Digest, Sha256};

fn time<F: FnMut()>(iterations: u64, mut f: F) -> Duration {
    let start = Instant::now();
    for _ in 0..iterations {
        f();
    }
    start.elapsed()
}

fn ns_per(d: Duration, iterations: u64) -> f64 {
    d.as_nanos() as f64 / iterations as f64
}

/// Best of `rounds` runs, to damp noise from other processes on the host.
fn best<F: FnMut() -> f64>(rounds: u32, mut f: F) -> f64 {
    (0..rounds).map(|_| f()).fold(f64::INFINITY, f64::min)
}

/// Rounds per figure (the best one is reported) on a normal run.
const ROUNDS_DEFAULT: u32 = 5;

/// Rounds of the per-command figures (counter, kv; machine, bare and
/// native alike), each short (10–40 ms): on a machine shared with other
/// work, many short rounds make it likelier that one of them runs
/// undisturbed, which is what the best-of figure is meant to show.
const APPLY_ROUNDS: u32 = 20;

/// How a run is scaled: full figures, or a short run for a profiler.
#[derive(Clone, Copy)]
struct Scale {
    rounds: u32,
    /// Rounds of the per-command figures.
    apply_rounds: u32,
    divisor: u64,
}

impl Scale {
    fn from_env() -> Scale {
        match std::env::var("PAXWASM_BENCH_DIVISOR") {
            Ok(d) => Scale {
                rounds: 1,
                apply_rounds: 1,
                divisor: d
                    .parse()
                    .ok()
                    .filter(|&d| d > 0)
                    .expect("PAXWASM_BENCH_DIVISOR is a positive integer"),
            },
            Err(_) => Scale {
                rounds: ROUNDS_DEFAULT,
                apply_rounds: APPLY_ROUNDS,
                divisor: 1,
            },
        }
    }

    fn iterations(self, n: u64) -> u64 {
        (n / self.divisor).max(1)
    }
}

fn main() {
    let sections: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| sections.is_empty() || sections.iter().any(|s| s == name);
    let scale = Scale::from_env();
    let config = MachineConfig::default();
    println!(
        "config: fuel_per_command={} replay_commands_max={} memory_bytes_max={}",
        config.fuel_per_command, config.replay_commands_max, config.memory_bytes_max
    );
    if wanted("counter") {
        bench_counter(&config, scale);
    }
    if wanted("kv") {
        bench_kv(&config, scale);
    }
    if wanted("query") {
        bench_query(&config, scale);
    }
    if wanted("rollback") {
        bench_rollback();
    }
    if wanted("hash") {
        for mib in [16usize, 256] {
            bench_hash(mib);
        }
    }
    if wanted("snapshot") {
        for mib in [16usize, 256] {
            bench_snapshot(mib, scale);
        }
    }
    if wanted("calls") {
        bench_call_directions(scale);
    }
}

/// A command boundary both ways, fuel metering on and the budget reset per
/// command as the machine does: the host calls a trivial export once per
/// command (`set_fuel`, call, `get_fuel`), against one guest call that calls
/// a trivial host import once per command (the import reads the fuel used and
/// resets the budget). The difference is what a batch-apply ABI (one guest
/// call per log entry, an import between commands) would save per command.
fn bench_call_directions(scale: Scale) {
    use wasmtime::{Caller, Config, Engine, Linker, Module, Store};
    const BUDGET: u64 = 1_000_000;
    let engine = Engine::new(Config::new().consume_fuel(true)).unwrap();
    let module = Module::new(
        &engine,
        wat::parse_str(
            r#"(module
              (import "paxwasm" "command_done" (func $done (param i32 i32) (result i64)))
              (memory (export "memory") 1)
              (func (export "apply") (param i32 i32) (result i64)
                (i64.extend_i32_u (i32.add (local.get 0) (local.get 1))))
              (func (export "apply_many") (param $n i32) (result i64)
                (local $acc i64)
                (block $end (loop $next
                  (br_if $end (i32.eqz (local.get $n)))
                  (local.set $acc (i64.add (local.get $acc)
                    (call $done (local.get $n) (i32.const 3))))
                  (local.set $n (i32.sub (local.get $n) (i32.const 1)))
                  (br $next)))
                (local.get $acc)))"#,
        )
        .unwrap(),
    )
    .unwrap();
    let mut linker = Linker::new(&engine);
    linker
        .func_wrap(
            "paxwasm",
            "command_done",
            |mut caller: Caller<'_, u64>, ptr: i32, len: i32| -> i64 {
                *caller.data_mut() += BUDGET - caller.get_fuel().unwrap();
                caller.set_fuel(BUDGET).unwrap();
                i64::from(ptr) + i64::from(len)
            },
        )
        .unwrap();
    let mut store = Store::new(&engine, 0u64);
    store.set_fuel(BUDGET).unwrap();
    let instance = linker.instantiate(&mut store, &module).unwrap();
    let apply = instance
        .get_typed_func::<(i32, i32), i64>(&mut store, "apply")
        .unwrap();
    let apply_many = instance
        .get_typed_func::<i32, i64>(&mut store, "apply_many")
        .unwrap();
    let n = scale.iterations(1_000_000);
    let host_to_guest = best(scale.apply_rounds, || {
        let mut i = 0i32;
        ns_per(
            time(n, || {
                store.set_fuel(BUDGET).unwrap();
                black_box(apply.call(&mut store, (i, 3)).unwrap());
                *store.data_mut() += BUDGET - store.get_fuel().unwrap();
                i = i.wrapping_add(1);
            }),
            n,
        )
    });
    let guest_to_host = best(scale.apply_rounds, || {
        let started = Instant::now();
        store.set_fuel(BUDGET).unwrap();
        black_box(apply_many.call(&mut store, n as i32).unwrap());
        ns_per(started.elapsed(), n)
    });
    println!("command boundary (fuel on, budget reset per command): host calls a guest export {host_to_guest:.1} ns/command, guest calls a host import {guest_to_host:.1} ns/command");
}

/// The example module `name`: built from this workspace, or taken from
/// `$PAXWASM_BENCH_GUESTS`.
fn example_bytes(name: &str) -> Vec<u8> {
    let path = match std::env::var_os("PAXWASM_BENCH_GUESTS") {
        Some(dir) => std::path::Path::new(&dir).join(format!("{name}.wasm")),
        None => example_module(name).unwrap(),
    };
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn bench_counter(config: &MachineConfig, scale: Scale) {
    let bytes = example_bytes("counter");
    let mut machine = Machine::load(&bytes, config).unwrap();
    let n = scale.iterations(250_000);
    let mut out = Vec::with_capacity(64);
    let wasm = best(scale.apply_rounds, || {
        ns_per(
            time(n, || {
                out.clear();
                machine
                    .apply_into(b"add 1", EntryContext::default(), &mut out)
                    .unwrap();
            }),
            n,
        )
    });
    let commands = [b"add 1".to_vec()];
    let native = native_glue::<counter::Counter>(&commands, n, scale.apply_rounds);
    let native_plain = native_plain::<counter::Counter>(&commands, n, scale.apply_rounds);
    let bare = bare_wasmtime(&bytes, &commands, n, false, scale.apply_rounds);
    let bare_fuel = bare_wasmtime(&bytes, &commands, n, true, scale.apply_rounds);
    println!("counter apply: machine {wasm:.0} ns/op ({:.2} M/s), bare wasmtime loop alloc+apply {bare:.0} ns/op (with fuel {bare_fuel:.0} ns/op), native (same glue, copies in and out) {native:.0} ns/op, native/wasm speed ratio {:.2}; native plain apply() {native_plain:.0} ns/op",
        1e3 / wasm, native / wasm);
}

/// The guest's code run natively, as the machine runs it in Wasm: the SDK's
/// glue around the app (input buffer from `alloc`, result in the reused
/// buffer), the command copied in and the result copied out to a reused
/// `Vec`. Commands are taken round robin.
#[inline(never)]
fn native_glue<A: App>(commands: &[Vec<u8>], n: u64, rounds: u32) -> f64 {
    let mut native = NativeGlue::<A>::new();
    best(rounds, || native.round(commands, n))
}

/// The state of [`native_glue`], so that its rounds can alternate with the
/// machine's ([`bench_kv`]'s paired rounds).
struct NativeGlue<A: App> {
    guest: paxwasm_guest::glue::Guest<A>,
    out: Vec<u8>,
}

impl<A: App> NativeGlue<A> {
    fn new() -> NativeGlue<A> {
        NativeGlue {
            guest: paxwasm_guest::glue::Guest::<A>::new(),
            out: Vec::with_capacity(256),
        }
    }

    /// ns per command over `n` commands, round robin from the first.
    #[inline(never)]
    fn round(&mut self, commands: &[Vec<u8>], n: u64) -> f64 {
        let mut i = 0;
        let (guest, out) = (&mut self.guest, &mut self.out);
        ns_per(
            time(n, || {
                let command = black_box(&commands[i % commands.len()]);
                let buffer = guest.alloc(command.len());
                buffer.copy_from_slice(command);
                let addr = buffer.as_ptr() as usize;
                let result = guest.apply(addr, command.len());
                out.clear();
                out.extend_from_slice(result);
                black_box(&*out);
                i += 1;
            }),
            n,
        )
    }
}

/// ns per command of the machine over `n` commands, round robin from the first.
#[inline(never)]
fn machine_round(machine: &mut Machine, commands: &[Vec<u8>], n: u64, out: &mut Vec<u8>) -> f64 {
    let mut i = 0;
    ns_per(
        time(n, || {
            out.clear();
            machine
                .apply_into(&commands[i % commands.len()], EntryContext::default(), out)
                .unwrap();
            i += 1;
        }),
        n,
    )
}

/// The machine's and the native glue's rounds alternated, so that both meet the same
/// neighbours on a shared host: the median of the per-pair speed ratios (native ns /
/// machine ns), and the lowest and highest.
fn paired_ratio<A: App>(
    machine: &mut Machine,
    commands: &[Vec<u8>],
    n: u64,
    rounds: u32,
) -> (f64, f64, f64) {
    let mut native = NativeGlue::<A>::new();
    let mut out = Vec::with_capacity(256);
    let mut ratios: Vec<f64> = (0..rounds.max(1))
        .map(|_| {
            let wasm = machine_round(machine, commands, n, &mut out);
            native.round(commands, n) / wasm
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    (
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1],
    )
}

/// The app's plain `apply` natively (a fresh result `Vec` per command, no
/// copies): the baseline of earlier runs, kept for comparison.
#[inline(never)]
fn native_plain<A: App>(commands: &[Vec<u8>], n: u64, rounds: u32) -> f64 {
    let mut app = A::default();
    best(rounds, || {
        let mut i = 0;
        ns_per(
            time(n, || {
                drop(black_box(
                    app.apply(black_box(&commands[i % commands.len()])),
                ));
                i += 1;
            }),
            n,
        )
    })
}

/// The floor: the same module on a default wasmtime engine (no host memory,
/// no replay log, no input descriptor): alloc + write + apply + read of each
/// command, round robin; with `fuel`, fuel metering on and the budget reset
/// per command as the machine does. (For kv, the difference of the two is
/// what fuel metering costs the guest's code.)
#[inline(never)]
fn bare_wasmtime(bytes: &[u8], commands: &[Vec<u8>], n: u64, fuel: bool, rounds: u32) -> f64 {
    use wasmtime::{Config, Engine, Linker, Module, Store};
    let engine = Engine::new(Config::new().consume_fuel(fuel)).unwrap();
    let module = Module::new(&engine, bytes).unwrap();
    let mut linker = Linker::new(&engine);
    linker
        .func_wrap("paxwasm", "log", |_: i32, _: i32| {})
        .unwrap();
    linker
        .func_wrap("paxwasm", "entry_time_ms", || 0i64)
        .unwrap();
    linker.func_wrap("paxwasm", "entry_seed", || 0i64).unwrap();
    linker
        .func_wrap("paxwasm", "command_done", |_: i32, _: i32| 0i32)
        .unwrap();
    let mut store = Store::new(&engine, ());
    if fuel {
        store.set_fuel(u64::MAX).unwrap();
    }
    let instance = linker.instantiate(&mut store, &module).unwrap();
    let memory = instance.get_memory(&mut store, "memory").unwrap();
    let alloc = instance
        .get_typed_func::<i32, i32>(&mut store, "paxwasm_alloc")
        .unwrap();
    let apply = instance
        .get_typed_func::<(i32, i32), i64>(&mut store, "paxwasm_apply")
        .unwrap();
    let mut out = Vec::with_capacity(256);
    best(rounds, || {
        let mut i = 0;
        ns_per(
            time(n, || {
                if fuel {
                    store.set_fuel(50_000_000).unwrap();
                }
                let input = &commands[i % commands.len()];
                let ptr = alloc.call(&mut store, input.len() as i32).unwrap() as usize;
                memory.data_mut(&mut store)[ptr..ptr + input.len()].copy_from_slice(input);
                let packed = apply
                    .call(&mut store, (ptr as i32, input.len() as i32))
                    .unwrap() as u64;
                let (p, l) = ((packed >> 32) as usize, (packed as u32) as usize);
                out.clear();
                out.extend_from_slice(&memory.data(&store)[p..p + l]);
                i += 1;
            }),
            n,
        )
    })
}

fn kv_commands(keys: usize) -> Vec<Vec<u8>> {
    // A mix of writes and reads over `keys` keys: put, get, append, cas.
    let mut commands = Vec::new();
    for i in 0..keys {
        commands.push(format!("put key{i:05} value-{i}").into_bytes());
        commands.push(format!("get key{:05}", (i * 7) % keys).into_bytes());
        commands.push(format!("cas key{i:05} value-{i} value-{}", i + 1).into_bytes());
        commands.push(format!("get key{:05}", (i * 13) % keys).into_bytes());
    }
    commands
}

fn bench_kv(config: &MachineConfig, scale: Scale) {
    let bytes = example_bytes("kv");
    let commands = kv_commands(1000);
    let n = scale.iterations(commands.len() as u64);
    let mut machine = Machine::load(&bytes, config).unwrap();
    let mut out = Vec::with_capacity(256);
    let wasm = best(scale.apply_rounds, || {
        machine_round(&mut machine, &commands, n * 10, &mut out)
    });
    let native = native_glue::<kv::Kv>(&commands, n * 10, scale.apply_rounds);
    let (median, lowest, highest) =
        paired_ratio::<kv::Kv>(&mut machine, &commands, n * 10, 2 * scale.apply_rounds);
    let native_plain = native_plain::<kv::Kv>(&commands, n * 10, scale.apply_rounds);
    let bare = bare_wasmtime(&bytes, &commands, n * 10, false, scale.apply_rounds);
    let bare_fuel = bare_wasmtime(&bytes, &commands, n * 10, true, scale.apply_rounds);
    println!("kv apply (1000 keys, put/get/cas/get): machine {wasm:.0} ns/op ({:.2} M/s), native (same glue, copies in and out) {native:.0} ns/op, native/wasm speed ratio {:.2}; native plain apply() {native_plain:.0} ns/op; bare wasmtime loop alloc+apply {bare:.0} ns/op (with fuel {bare_fuel:.0} ns/op)",
        1e3 / wasm, native / wasm);
    println!("kv paired rounds (machine and native alternated, {} pairs): native/wasm speed ratio median {median:.3}, lowest {lowest:.3}, highest {highest:.3}",
        2 * scale.apply_rounds.max(1));
    // The node applies the commands of one log entry with one `apply_batch`;
    // under load an entry holds tens of commands.
    let refs: Vec<&[u8]> = commands.iter().map(Vec::as_slice).collect();
    let mut results = BatchResults::default();
    // `PAXWASM_BENCH_BATCH=N` measures batches of N only (for callgrind).
    let sizes = match std::env::var("PAXWASM_BENCH_BATCH") {
        Ok(size) => vec![size.parse().expect("PAXWASM_BENCH_BATCH is a batch size")],
        Err(_) => vec![1, 4, 16, 64],
    };
    for size in sizes {
        let batched = best(scale.apply_rounds, || {
            machine_batch_round(&mut machine, &refs, size, n * 10, &mut results)
        });
        println!("kv apply in batches of {size} (Machine::apply_batch): machine {batched:.0} ns/command, native/wasm speed ratio {:.2} (native above)",
            native / batched);
    }
    // Paired as above: batches of 16 against the native glue, alternated.
    let mut native_glue = NativeGlue::<kv::Kv>::new();
    let mut ratios: Vec<f64> = (0..2 * scale.apply_rounds.max(1))
        .map(|_| {
            let batched = machine_batch_round(&mut machine, &refs, 16, n * 10, &mut results);
            native_glue.round(&commands, n * 10) / batched
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    println!("kv paired rounds, batches of 16 ({} pairs): native/wasm speed ratio median {:.3}, lowest {:.3}, highest {:.3}",
        ratios.len(), ratios[ratios.len() / 2], ratios[0], ratios[ratios.len() - 1]);
}

/// ns per command of `apply_batch` over groups of `size` consecutive commands,
/// round robin, `n` commands in all.
#[inline(never)]
fn machine_batch_round(
    machine: &mut Machine,
    commands: &[&[u8]],
    size: usize,
    n: u64,
    results: &mut BatchResults,
) -> f64 {
    let batches = (n as usize).div_ceil(size);
    let groups: Vec<&[&[u8]]> = commands.chunks(size).collect();
    let started = Instant::now();
    for i in 0..batches {
        machine.apply_batch(groups[i % groups.len()], EntryContext::default(), results);
        black_box(&*results);
    }
    ns_per(started.elapsed(), (batches * size) as u64)
}

fn bench_query(config: &MachineConfig, scale: Scale) {
    let bytes = example_bytes("counter");
    let mut machine = Machine::load(&bytes, config).unwrap();
    let n = scale.iterations(10_000);
    let only = best(scale.rounds, || {
        ns_per(
            time(n, || drop(black_box(machine.query(b"get").unwrap()))),
            n,
        )
    });
    let mixed = best(scale.rounds, || {
        ns_per(
            time(n, || {
                machine.apply(b"add 1", EntryContext::default()).unwrap();
                drop(black_box(machine.query(b"get").unwrap()));
            }),
            n,
        )
    });
    // The machine has applied commands now, so the base's heap already holds
    // what a query allocates (a fresh install has an empty heap, and every
    // query from it grows memory).
    let warm = best(scale.rounds, || {
        ns_per(
            time(n, || drop(black_box(machine.query(b"get").unwrap()))),
            n,
        )
    });
    println!("counter query: {only:.0} ns/op back to back on a fresh install; {warm:.0} ns/op back to back after applies; apply+query pair {mixed:.0} ns (each query after an apply takes a checkpoint)");
}

/// A WAT guest that can dirty pages, trap, and hold a given memory size.
fn paging_guest(pages: u32) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
             (memory (export "memory") {pages})
             (global $n (mut i32) (i32.const 0))
             (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 0))
             ;; input: u32 count, u32 stride: writes `count` words `stride` bytes apart; count 0xffffffff traps
             (func (export "paxwasm_apply") (param $p i32) (param $l i32) (result i64) (local $i i32) (local $c i32) (local $s i32)
               (local.set $c (i32.load (local.get $p)))
               (local.set $s (i32.load offset=4 (local.get $p)))
               (if (i32.eq (local.get $c) (i32.const -1)) (then (i32.store (i32.const 64) (i32.const 1)) (unreachable)))
               (global.set $n (i32.add (global.get $n) (i32.const 1)))
               (block $done (loop $next
                 (br_if $done (i32.ge_u (local.get $i) (local.get $c)))
                 (i32.store (i32.add (i32.const 4096) (i32.mul (local.get $i) (local.get $s))) (global.get $n))
                 (local.set $i (i32.add (local.get $i) (i32.const 1)))
                 (br $next)))
               (i64.const 0)))"#
    ))
    .unwrap()
}

fn write_cmd(count: u32, stride: u32) -> [u8; 8] {
    let mut cmd = [0u8; 8];
    cmd[..4].copy_from_slice(&count.to_le_bytes());
    cmd[4..].copy_from_slice(&stride.to_le_bytes());
    cmd
}

fn bench_rollback() {
    let config = MachineConfig {
        memory_bytes_max: 32 << 20,
        ..MachineConfig::default()
    };
    let mut machine = Machine::load(&paging_guest(256), &config).unwrap(); // 16 MiB
    for since_checkpoint in [0u64, 100, 1000] {
        let rounds = 20;
        let mut total = Duration::ZERO;
        for _ in 0..rounds {
            machine.state_hash(); // checkpoint
            for _ in 0..since_checkpoint {
                machine
                    .apply(&write_cmd(1, 0), EntryContext::default())
                    .unwrap();
            }
            let start = Instant::now();
            machine
                .apply(&write_cmd(u32::MAX, 0), EntryContext::default())
                .unwrap_err();
            total += start.elapsed();
        }
        println!(
            "rollback (16 MiB memory, failing command after {since_checkpoint} commands since the checkpoint): {:.1} us",
            total.as_secs_f64() * 1e6 / rounds as f64
        );
    }
}

fn bench_hash(mib: usize) {
    let pages = (mib << 20) / 65536;
    let config = MachineConfig {
        memory_bytes_max: (mib as u64) << 20,
        memory_initial_pages_max: pages as u64,
        ..MachineConfig::default()
    };
    let mut machine = Machine::load(&paging_guest(pages as u32), &config).unwrap();
    // Touch every page once so memory is populated (what a full state looks like).
    machine
        .apply(
            &write_cmd((pages * 16 - 2) as u32, 4096),
            EntryContext::default(),
        )
        .unwrap();
    let start = Instant::now();
    machine.state_hash();
    let full = start.elapsed();
    let start = Instant::now();
    machine.state_hash();
    let clean = start.elapsed();
    // 100 pages written, spread over memory.
    let stride = ((mib << 20) / 100 - 64) as u32 & !3;
    let mut dirty = Duration::MAX;
    for _ in 0..5 {
        machine
            .apply(&write_cmd(100, stride), EntryContext::default())
            .unwrap();
        let start = Instant::now();
        machine.state_hash();
        dirty = dirty.min(start.elapsed());
    }
    let start = Instant::now();
    let snapshot = machine.snapshot();
    let snap = start.elapsed();
    drop(snapshot);
    // For scale: SHA-256 alone over the same bytes, in leaf-sized pieces as
    // the hash tree takes them (sha2 uses SHA-NI when the CPU has it), and a
    // plain copy; the full state hash adds the checkpoint's pwrite of every
    // written page into the memfd and the page faults.
    let buffer = vec![1u8; mib << 20];
    let start = Instant::now();
    for leaf in buffer.chunks(HASH_LEAF_BYTES) {
        black_box(Sha256::digest(leaf));
    }
    let sha = start.elapsed();
    let start = Instant::now();
    black_box(buffer.clone());
    let copy = start.elapsed();
    println!(
        "state hash at {mib} MiB: full (every page) {:.1} ms; nothing written {:.3} ms; 100 pages written {:.3} ms; snapshot copy {:.1} ms; for scale: sha256 of {mib} MiB in 4 KiB leaves {:.1} ms ({:.0} MB/s), memcpy {:.1} ms",
        full.as_secs_f64() * 1e3,
        clean.as_secs_f64() * 1e3,
        dirty.as_secs_f64() * 1e3,
        snap.as_secs_f64() * 1e3,
        sha.as_secs_f64() * 1e3,
        (mib << 20) as f64 / sha.as_secs_f64() / 1e6,
        copy.as_secs_f64() * 1e3
    );
}

/// CPU time this thread has used: unlike wall time, it does not count the
/// time the neighbours' builds kept this thread off the CPU.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Wall and thread-CPU samples of one figure.
#[derive(Default)]
struct Samples {
    wall: Vec<Duration>,
    cpu: Vec<Duration>,
}

impl Samples {
    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let (wall, cpu) = (Instant::now(), thread_cpu());
        let result = f();
        self.cpu.push(thread_cpu() - cpu);
        self.wall.push(wall.elapsed());
        result
    }

    /// `wall min/median/max | cpu min/median/max` in milliseconds.
    fn summary(&mut self) -> String {
        format!(
            "wall {} | thread cpu {}",
            spread_ms(&mut self.wall),
            spread_ms(&mut self.cpu)
        )
    }
}

/// Minimum, median and maximum of `samples`, in milliseconds.
fn spread_ms(samples: &mut [Duration]) -> String {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "{:.3} / {:.3} / {:.3}",
        ms(samples[0]),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() - 1])
    )
}

/// The pause `snapshot_image` costs the apply loop, and the time to write the
/// image out, at `mib` MiB of linear memory with every page populated (and
/// mapped in the primary instance's page table, as a guest that reads all of
/// its memory leaves it).
fn bench_snapshot(mib: usize, scale: Scale) {
    let pages = (mib << 20) / 65536;
    let config = MachineConfig {
        memory_bytes_max: (mib as u64) << 20,
        memory_initial_pages_max: pages as u64,
        ..MachineConfig::default()
    };
    let mut machine = Machine::load(&paging_guest(pages as u32), &config).unwrap();
    // One word in every 4 KiB page: memory fully populated.
    let everything = write_cmd((pages * 16 - 2) as u32, 4096);
    // 100 pages written, spread over memory.
    let hundred = write_cmd(100, ((mib << 20) / 100 - 64) as u32 & !3);
    machine.apply(&everything, EntryContext::default()).unwrap();
    let mut first = Samples::default();
    drop(first.time(|| machine.snapshot_image()));
    let rounds = if scale.divisor > 1 { 3 } else { 30 };
    // Each sample: one command (plus `between`), then the timed image,
    // dropped again at once unless the caller holds other images.
    let timed = |machine: &mut Machine, command: &[u8], rounds: usize, between: bool| {
        let mut samples = Samples::default();
        for _ in 0..rounds {
            machine.apply(command, EntryContext::default()).unwrap();
            if between {
                // A checkpoint of its own (the apply loop takes one every
                // `replay_commands_max` commands anyway), so the image
                // only copies into the shadow.
                machine.state_hash();
            }
            let image = samples.time(|| machine.snapshot_image());
            black_box(image.encoded_len());
        }
        samples.summary()
    };
    let pause_100 = timed(&mut machine, &hundred, rounds, false);
    // One word written (plus the input buffer, same page): the checkpoint is
    // then about the page-table scan alone.
    let pause_1 = timed(&mut machine, &write_cmd(1, 0), rounds, false);
    let pause_100_committed = timed(&mut machine, &hundred, rounds, true);
    let pause_none = {
        let mut samples = Samples::default();
        for _ in 0..rounds {
            drop(samples.time(|| machine.snapshot_image()));
        }
        samples.summary()
    };
    let pause_all = timed(&mut machine, &everything, rounds.min(5), false);
    // An earlier image still held (being written elsewhere): the second
    // shadow is brought up to date instead (created by a full copy first,
    // outside the samples).
    let held = machine.snapshot_image();
    drop(machine.snapshot_image());
    let pause_100_held = timed(&mut machine, &hundred, rounds, false);
    // Both shadows held: a one-off full copy.
    let held_too = machine.snapshot_image();
    let pause_full_fallback = timed(&mut machine, &hundred, rounds.min(5), false);
    drop((held, held_too));

    let image = machine.snapshot_image();
    let len = image.encoded_len();
    let mut sink = Samples::default();
    for _ in 0..rounds.min(5) {
        sink.time(|| image.write_to(&mut std::io::sink()).unwrap());
    }
    let path = std::env::temp_dir().join(format!("paxwasm-bench-image-{}", std::process::id()));
    let mut file = Samples::default();
    for _ in 0..rounds.min(3) {
        file.time(|| {
            let mut out = std::fs::File::create(&path).unwrap();
            image.write_to(&mut out).unwrap();
            out.sync_all().unwrap();
        });
    }
    std::fs::remove_file(&path).unwrap();
    let mut old_way = Samples::default();
    let full_snapshot = old_way.time(|| machine.snapshot().to_bytes());
    assert_eq!(full_snapshot.len() as u64, len);
    drop(full_snapshot);
    let mbps = |d: &[Duration]| len as f64 / d.iter().min().unwrap().as_secs_f64() / 1e6;
    let (sink_mbps, file_mbps) = (mbps(&sink.wall), mbps(&file.wall));
    println!("snapshot image at {mib} MiB (every page populated); ms as min / median / max:");
    println!("  pause, 100 pages written since the previous image:     {pause_100}");
    println!("  pause, the same 100 pages already checkpointed:        {pause_100_committed}");
    println!("  pause, 1 page written since (about the scan alone):    {pause_1}");
    println!("  pause, nothing written since:                          {pause_none}");
    println!("  pause, every page written since:                       {pause_all}");
    println!("  pause, 100 pages, an earlier image still held:         {pause_100_held}");
    println!("  pause, 100 pages, both shadows held (full copy):       {pause_full_fallback}");
    println!(
        "  pause, first image after load (full copy):             {}",
        first.summary()
    );
    println!(
        "  write_to io::sink: {} ({sink_mbps:.0} MB/s best wall)",
        sink.summary()
    );
    println!(
        "  write_to a file in {} + fsync: {} ({file_mbps:.0} MB/s best wall)",
        std::env::temp_dir().display(),
        file.summary()
    );
    println!(
        "  for scale, snapshot().to_bytes() (the old full copy, twice): {}",
        old_way.summary()
    );
}
