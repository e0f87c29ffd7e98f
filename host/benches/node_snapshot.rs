//! Benchmark of a replica's snapshot: `cargo bench -p paxwasm --bench node_snapshot`.
//!
//! For a guest with 16 MiB and with 256 MiB of linear memory, all of it written once,
//! then a few pages written between snapshots (as a running replica would), it prints:
//! - the apply-loop pause: what the core task does at a snapshot (the application's
//!   capture, i.e. the machine image, plus the applier state export), min / median /
//!   max over the rounds;
//! - the background write of the snapshot file (encode, sha256, write, fsync, rename,
//!   fsync of the folder), which runs on the snapshot worker, and the file size;
//! - the full-copy capture (`Machine::snapshot`) for comparison;
//! - baseline, measured in the same run: a plain copy of the same number of bytes
//!   (`Vec::clone` of a memory-sized buffer), the floor of any full-copy capture.

use std::time::{Duration, Instant};

use paxwasm::machine::MachineConfig;
use paxwasm::node::app::{command_envelope, install_envelope, WasmApp};
use paxwasm::node::snapshot::{SnapshotContents, SnapshotDir};
use paxwasm::paxos::{Applier, ApplyContext, StateMachine};

const MIB: u64 = 1 << 20;
/// Bytes each filling command writes.
const FILL_BYTES: u64 = 64 * 1024;
/// Snapshots measured per memory size.
const ROUNDS: usize = 7;
/// Commands applied between two snapshots, each writing one 4 KiB page.
const COMMANDS_BETWEEN_SNAPSHOTS: u64 = 100;

/// A guest with `pages` of memory whose `apply` fills `len` bytes at `offset` (two
/// little-endian u32s in the input) with the input's ninth byte.
fn guest(pages: u64) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
          (memory (export "memory") {pages})
          (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 0))
          (func (export "paxwasm_apply") (param $ptr i32) (param $len i32) (result i64)
            (memory.fill
              (i32.load (local.get $ptr))
              (i32.load8_u (i32.add (local.get $ptr) (i32.const 8)))
              (i32.load (i32.add (local.get $ptr) (i32.const 4))))
            (i64.const 0)))"#
    ))
    .expect("valid WAT")
}

fn fill(offset: u64, len: u64, byte: u8) -> Vec<u8> {
    let mut command = Vec::with_capacity(9);
    command.extend_from_slice(&(offset as u32).to_le_bytes());
    command.extend_from_slice(&(len as u32).to_le_bytes());
    command.push(byte);
    command_envelope(&command)
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let snapshots = SnapshotDir::open(dir.path()).expect("snapshot dir");
    println!(
        "{:>8} {:>12} {:>12} {:>12} {:>14} {:>14} {:>14} {:>10} {:>8}",
        "memory",
        "pause min",
        "pause p50",
        "pause max",
        "full copy p50",
        "memcpy (base)",
        "write+fsync",
        "file MiB",
        "ratio"
    );
    for memory_mib in [16u64, 256] {
        let memory_bytes = memory_mib * MIB;
        let config = MachineConfig {
            memory_bytes_max: memory_bytes.max(MachineConfig::default().memory_bytes_max),
            memory_initial_pages_max: (memory_bytes / 65536)
                .max(MachineConfig::default().memory_initial_pages_max),
            ..MachineConfig::default()
        };
        let mut applier = Applier::new(1, WasmApp::new(config));
        let context = ApplyContext {
            slot: 1,
            timestamp_ms: 0,
            seed: 0,
        };
        let installed = applier.machine.apply(
            &install_envelope(&guest(memory_bytes / 65536), false),
            &context,
        );
        assert_eq!(
            installed[0],
            3,
            "module not installed: {}",
            String::from_utf8_lossy(&installed[1..])
        );
        // Write every page once, so the image is not of untouched zero pages.
        for chunk in 0..memory_bytes / FILL_BYTES {
            applier.machine.apply(
                &fill(chunk * FILL_BYTES, FILL_BYTES, 1 + chunk as u8),
                &context,
            );
        }
        let mut pauses = Vec::new();
        let mut writes = Vec::new();
        let mut file_bytes = 0;
        let mut round = 0u64;
        for _ in 0..ROUNDS {
            for n in 0..COMMANDS_BETWEEN_SNAPSHOTS {
                round += 1;
                let offset = (round * 7919 + n * 104_729) * 4096 % memory_bytes;
                applier
                    .machine
                    .apply(&fill(offset, 4096, round as u8), &context);
            }
            // What the core task does at a snapshot (runtime/snapshots.rs).
            let started = Instant::now();
            let capture = applier.machine.capture();
            let applier_state = applier.export_state();
            pauses.push(started.elapsed());
            let contents = SnapshotContents {
                slot: round,
                configuration: paxwasm::paxos::Configuration::new([1, 2, 3]),
                addresses: Default::default(),
                applier_state,
                app: capture.meta,
                module_bytes: capture.module_bytes,
                image: capture.image,
                staged: capture.staged,
            };
            // What the snapshot worker does.
            let started = Instant::now();
            let file = snapshots.write(&contents).expect("write snapshot");
            writes.push(started.elapsed());
            file_bytes = file.id.file_bytes;
        }
        // The full-copy capture this replaced (`Machine::snapshot`), for comparison.
        let mut full = Vec::new();
        for _ in 0..3 {
            let machine = applier.machine.machine_mut().expect("module installed");
            let started = Instant::now();
            let snapshot = machine.snapshot();
            full.push(started.elapsed());
            std::hint::black_box(snapshot);
        }
        full.sort();
        // Baseline: copying a buffer of the memory's size.
        let buffer = vec![7u8; memory_bytes as usize];
        let mut copies = Vec::new();
        for _ in 0..ROUNDS {
            let started = Instant::now();
            let copy = buffer.clone();
            copies.push(started.elapsed());
            std::hint::black_box(copy);
        }
        pauses.sort();
        writes.sort();
        copies.sort();
        let pause_p50 = percentile(&pauses, 0.5);
        let copy_p50 = percentile(&copies, 0.5);
        println!(
            "{:>5}MiB {:>10}ms {:>10}ms {:>10}ms {:>12}ms {:>12}ms {:>12}ms {:>10.1} {:>7.3}x",
            memory_mib,
            ms(pauses[0]),
            ms(pause_p50),
            ms(pauses[pauses.len() - 1]),
            ms(percentile(&full, 0.5)),
            ms(copy_p50),
            ms(percentile(&writes, 0.5)),
            file_bytes as f64 / MIB as f64,
            pause_p50.as_secs_f64() / copy_p50.as_secs_f64(),
        );
    }
    println!(
        "(pause = WasmApp::capture (Machine::snapshot_image) + Applier::export_state on the \
         core task, {COMMANDS_BETWEEN_SNAPSHOTS} pages written between snapshots, the first \
         snapshot (a full copy) included in max; full copy = Machine::snapshot; ratio = \
         pause p50 / memcpy p50)"
    );
}
