//! The kv example's apply cost on a large state, as a loaded cluster sees it:
//! `paxwasm bench` writes `put k<client>-<n> <value>` commands of 128 bytes over
//! 256 clients × 1000 keys, and the replica checkpoints every few thousand
//! commands (state hash every 200 ms, `replay_commands_max`). With 256 000 keys
//! the map is tens of MiB, so a lookup's memory accesses are cache misses and
//! pages written after a checkpoint fault again; neither shows in the
//! `machine` benchmark's 1000-key mix.
//!
//! Prints ns per command for the machine and for the same app natively (same
//! SDK glue, input and output copied), measured side by side in one run: for
//! the fill (every command a new key, as `paxwasm bench` sends them) and for
//! random overwrites of the filled state.
//!
//! `cargo bench -p paxwasm --bench kv_state`; `PAXWASM_BENCH_GUESTS=DIR` takes
//! `DIR/kv.wasm` instead of building it (to compare guests of two commits);
//! `PAXWASM_BENCH_KV_KEYS=N` sets the key count (default 256 000).

use std::hint::black_box;
use std::time::Instant;

use paxwasm::examples::example_module;
use paxwasm::machine::{EntryContext, Machine, MachineConfig};

/// Commands per status hash: 200 ms of `state_hash_interval_ms` at ~10 000 cmd/s.
const CHECKPOINT_EVERY_COMMANDS: usize = 2_000;
const COMMAND_BYTES: usize = 128;
const CLIENTS: u64 = 256;
const MEASURED_COMMANDS: usize = 200_000;
const ROUNDS: usize = 3;

/// `paxwasm bench`'s command (`cli::bench::command`): client `client`'s `n`-th
/// write, padded to `COMMAND_BYTES`.
fn command(client: u64, n: u64) -> Vec<u8> {
    let mut command = format!("put k{client}-{n} ").into_bytes();
    let value_bytes = COMMAND_BYTES.saturating_sub(command.len()).max(1);
    command.resize(command.len() + value_bytes, b'a' + (n % 26) as u8);
    command
}

/// SplitMix64: a fixed, seeded order of overwrites (the same every run).
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn main() {
    let keys: u64 = std::env::var("PAXWASM_BENCH_KV_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256_000);
    let per_client = keys.div_ceil(CLIENTS);
    let path = match std::env::var_os("PAXWASM_BENCH_GUESTS") {
        Some(dir) => std::path::Path::new(&dir).join("kv.wasm"),
        None => example_module("kv").unwrap(),
    };
    let bytes = std::fs::read(&path).unwrap();
    let fill: Vec<Vec<u8>> = (0..per_client)
        .flat_map(|n| (0..CLIENTS).map(move |c| command(c, n)))
        .collect();
    let mut state = 7;
    let overwrites: Vec<Vec<u8>> = (0..MEASURED_COMMANDS)
        .map(|_| {
            let r = next(&mut state);
            command(r % CLIENTS, (r >> 32) % per_client)
        })
        .collect();

    let mut config = MachineConfig::default();
    if let Some(commands) = std::env::var("PAXWASM_BENCH_REPLAY_COMMANDS_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.replay_commands_max = commands;
    }
    // The fill is what `paxwasm bench` itself sends: every command a new key.
    let started = Instant::now();
    let mut machine = Machine::load(&bytes, &config).unwrap();
    let mut out = Vec::with_capacity(64);
    for command in &fill {
        out.clear();
        machine
            .apply_into(command, EntryContext::default(), &mut out)
            .unwrap();
    }
    let machine_fill = started.elapsed().as_nanos() as f64 / fill.len() as f64;
    machine.state_hash();
    let started = Instant::now();
    let mut guest = paxwasm_guest::glue::Guest::<kv::Kv>::new();
    for command in &fill {
        let buffer = guest.alloc(command.len());
        buffer.copy_from_slice(command);
        let addr = buffer.as_ptr() as usize;
        black_box(guest.apply(addr, command.len()));
    }
    let native_fill = started.elapsed().as_nanos() as f64 / fill.len() as f64;
    println!(
        "kv_state: {} keys, {} MiB of linear memory, {MEASURED_COMMANDS} random overwrites of {COMMAND_BYTES} bytes, replay_commands_max {}",
        fill.len(),
        machine.memory_bytes() >> 20,
        config.replay_commands_max
    );
    println!(
        "fill (each command a new key): machine {machine_fill:.0} ns/command (load included), native {native_fill:.0} ns/command; native/machine {:.2}",
        native_fill / machine_fill
    );
    for round in 1..=ROUNDS {
        // With the status hash every 200 ms (what a replica did while its status
        // was read, and always before), then with only the machine's own
        // checkpoints (every `replay_commands_max` commands, no hash).
        let mut machine_ns = [0.0; 2];
        for (mode, hash_every) in [CHECKPOINT_EVERY_COMMANDS, usize::MAX]
            .into_iter()
            .enumerate()
        {
            let started = Instant::now();
            for (i, command) in overwrites.iter().enumerate() {
                out.clear();
                machine
                    .apply_into(command, EntryContext::default(), &mut out)
                    .unwrap();
                if i % hash_every == hash_every - 1 {
                    machine.state_hash();
                }
            }
            machine_ns[mode] = started.elapsed().as_nanos() as f64 / MEASURED_COMMANDS as f64;
        }
        let started = Instant::now();
        for command in &overwrites {
            let command = black_box(command);
            let buffer = guest.alloc(command.len());
            buffer.copy_from_slice(command);
            let addr = buffer.as_ptr() as usize;
            out.clear();
            out.extend_from_slice(guest.apply(addr, command.len()));
            black_box(&out);
        }
        let native = started.elapsed().as_nanos() as f64 / MEASURED_COMMANDS as f64;
        let [hashed, unhashed] = machine_ns;
        println!(
            "round {round}: machine {hashed:.0} ns/command with a state hash every {CHECKPOINT_EVERY_COMMANDS} commands, {unhashed:.0} ns/command without; native {native:.0} ns/command; native/machine {:.2} / {:.2}",
            native / hashed,
            native / unhashed
        );
    }
}
