//! Low-pause snapshot images and streaming restore: an image is exactly the
//! state at the call whatever the machine does afterwards, a streamed restore
//! gives back the same state, and bad input leaves the machine unchanged.

use std::io::{self, Read};

use paxwasm::machine::{
    EntryContext, Machine, MachineConfig, RestoreError, Snapshot, SnapshotImage, SHADOWS_MAX,
};

fn config() -> MachineConfig {
    MachineConfig {
        memory_bytes_max: 16 << 20,
        // Small, so that checkpoints also happen between images on their own.
        replay_commands_max: 3,
        ..MachineConfig::default()
    }
}

/// A guest driven by 12-byte commands `op, count, stride` (u32 LE each):
/// - op 0 writes `count` words `stride` bytes apart from 4096, each the new
///   value of the call counter;
/// - op 1 grows memory by `count` pages;
/// - op 2 writes, then traps (the apply fails and is rolled back).
///
/// The call counter is a NON-exported mutable global (`$n`), and a float
/// global `$f` also changes; the output is the counter (4 bytes at 0).
fn guest() -> Vec<u8> {
    wat::parse_str(
        r#"(module
             (memory (export "memory") 2)
             (global $n (mut i32) (i32.const 100))
             (global $f (mut f64) (f64.const 0.5))
             (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 64))
             (func (export "paxwasm_query") (param $p i32) (param $l i32) (result i64)
               (i32.store (i32.const 0) (global.get $n))
               (i64.const 4))
             (func (export "paxwasm_apply") (param $p i32) (param $l i32) (result i64)
               (local $op i32) (local $c i32) (local $s i32) (local $i i32)
               (local.set $op (i32.load (local.get $p)))
               (local.set $c (i32.load offset=4 (local.get $p)))
               (local.set $s (i32.load offset=8 (local.get $p)))
               (global.set $n (i32.add (global.get $n) (i32.const 1)))
               (global.set $f (f64.mul (global.get $f) (f64.const 3)))
               (if (i32.eq (local.get $op) (i32.const 1))
                 (then (drop (memory.grow (local.get $c)))))
               (if (i32.ne (local.get $op) (i32.const 1))
                 (then
                   (block $done (loop $next
                     (br_if $done (i32.ge_u (local.get $i) (local.get $c)))
                     (i32.store (i32.add (i32.const 4096) (i32.mul (local.get $i) (local.get $s)))
                                (global.get $n))
                     (local.set $i (i32.add (local.get $i) (i32.const 1)))
                     (br $next)))))
               (if (i32.eq (local.get $op) (i32.const 2)) (then (unreachable)))
               (i32.store (i32.const 0) (global.get $n))
               (i64.const 4)))"#,
    )
    .unwrap()
}

fn cmd(op: u32, count: u32, stride: u32) -> Vec<u8> {
    [op, count, stride]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn entry(i: i64) -> EntryContext {
    EntryContext {
        time_ms: 1_700_000_000_000 + i,
        seed: i as u64 * 7919,
    }
}

fn write(machine: &mut Machine, count: u32, stride: u32, i: i64) {
    machine.apply(&cmd(0, count, stride), entry(i)).unwrap();
}

fn image_bytes(image: &SnapshotImage) -> Vec<u8> {
    let mut out = Vec::new();
    image.write_to(&mut out).unwrap();
    assert_eq!(out.len() as u64, image.encoded_len());
    out
}

/// Each image, written out at the end, holds exactly `Snapshot::to_bytes()`
/// of the state at its call, through later applies, rollbacks, growth,
/// overlapping images (second shadow, then the full-copy fallback) and a
/// flipped byte.
#[test]
fn images_keep_the_state_at_their_call() {
    let mut machine = Machine::load(&guest(), &config()).unwrap();
    let mut images: Vec<(SnapshotImage, Vec<u8>)> = Vec::new();
    let take = |machine: &mut Machine| {
        let image = machine.snapshot_image();
        let expected = machine.snapshot().to_bytes();
        (image, expected)
    };
    write(&mut machine, 10, 4096, 1);
    images.push(take(&mut machine)); // first image: full copy into a new shadow
    write(&mut machine, 3, 8192, 2);
    assert!(machine.apply(&cmd(2, 5, 4096), entry(3)).is_err()); // rolled back
    machine.apply(&cmd(1, 3, 0), entry(4)).unwrap(); // grows to 5 pages
    write(&mut machine, 40, 4096, 5); // into the new pages
    images.push(take(&mut machine)); // image 0 alive: second shadow
    const { assert!(SHADOWS_MAX >= 2) };
    write(&mut machine, 2, 4096, 6);
    images.push(take(&mut machine)); // both shadows held: one-off full copy
    machine.debug_flip_byte(4096 + 17);
    write(&mut machine, 1, 4096, 7);
    // Writing an image out on another thread while the machine goes on.
    let (image, expected) = images.remove(0);
    let written = std::thread::spawn(move || image_bytes(&image));
    write(&mut machine, 50, 4096 + 4, 8);
    machine.debug_flip_byte(5 * 65536 - 1);
    assert_eq!(written.join().unwrap(), expected);
    // Image 0 is gone: its shadow is reused incrementally with everything
    // changed since it (writes, growth, flips).
    images.push(take(&mut machine));
    write(&mut machine, 7, 4096 * 3, 9);
    images.push(take(&mut machine));
    for (image, expected) in &images {
        assert_eq!(image_bytes(image), *expected);
        assert_eq!(image.module_id(), machine.module_id());
    }
    // And the encoding decodes to a snapshot the old decoder accepts.
    let (last, expected) = images.last().unwrap();
    assert_eq!(
        Snapshot::from_bytes(&image_bytes(last)).unwrap().to_bytes(),
        *expected
    );
}

#[test]
fn debug_flip_byte_changes_the_state_hash_and_the_memory() {
    let mut machine = Machine::load(&guest(), &config()).unwrap();
    let mut twin = Machine::load(&guest(), &config()).unwrap();
    for m in [&mut machine, &mut twin] {
        write(m, 4, 4096, 1);
    }
    assert_eq!(machine.state_hash(), twin.state_hash());
    let before = machine.snapshot().memory[4096];
    machine.debug_flip_byte(4096);
    assert_eq!(machine.snapshot().memory[4096], !before);
    assert_ne!(machine.state_hash(), twin.state_hash());
    // The flip is committed: a failed command's rollback keeps it.
    assert!(machine.apply(&cmd(2, 1, 0), entry(2)).is_err());
    assert_eq!(machine.snapshot().memory[4096], !before);
    machine.debug_flip_byte(4096);
    assert_eq!(machine.state_hash(), twin.state_hash());
}

#[test]
fn streamed_restore_round_trips_to_the_same_state() {
    let mut machine = Machine::load(&guest(), &config()).unwrap();
    machine.apply(&cmd(1, 20, 0), entry(1)).unwrap();
    write(&mut machine, 300, 4096, 2);
    let bytes = image_bytes(&machine.snapshot_image());
    let hash = machine.state_hash();

    let mut restored =
        Machine::from_snapshot_reader(&guest(), &mut bytes.as_slice(), &config()).unwrap();
    assert_eq!(restored.state_hash(), hash);
    assert_eq!(restored.snapshot().to_bytes(), bytes);
    // The first image after a streamed restore needs no full copy, and is right.
    assert_eq!(image_bytes(&restored.snapshot_image()), bytes);
    for i in 3..10 {
        let a = machine.apply(&cmd(0, 5, 4096 * 2), entry(i)).unwrap();
        let b = restored.apply(&cmd(0, 5, 4096 * 2), entry(i)).unwrap();
        assert_eq!(a, b);
    }
    assert_eq!(restored.state_hash(), machine.state_hash());
    assert_eq!(
        image_bytes(&restored.snapshot_image()),
        machine.snapshot().to_bytes()
    );

    // In place, over a machine with other state, and through `restore`.
    let mut other = Machine::load(&guest(), &config()).unwrap();
    write(&mut other, 1, 4096, 1);
    other.restore_from_reader(&mut bytes.as_slice()).unwrap();
    assert_eq!(other.state_hash(), hash);
    let mut third = Machine::load(&guest(), &config()).unwrap();
    third
        .restore(&Snapshot::from_bytes(&bytes).unwrap())
        .unwrap();
    assert_eq!(third.state_hash(), hash);
    assert_eq!(image_bytes(&third.snapshot_image()), bytes);
}

/// The issue asks for this explicitly: state kept only in a non-exported
/// mutable global survives image → streamed restore.
#[test]
fn non_exported_global_survives_image_and_restore() {
    let mut machine = Machine::load(&guest(), &config()).unwrap();
    for i in 0..5 {
        machine.apply(&cmd(0, 0, 0), entry(i)).unwrap();
    }
    assert_eq!(machine.query(b"").unwrap(), 105u32.to_le_bytes());
    let bytes = image_bytes(&machine.snapshot_image());
    let mut restored =
        Machine::from_snapshot_reader(&guest(), &mut bytes.as_slice(), &config()).unwrap();
    assert_eq!(restored.query(b"").unwrap(), 105u32.to_le_bytes());
    assert_eq!(
        restored.apply(&cmd(0, 0, 0), entry(9)).unwrap(),
        106u32.to_le_bytes()
    );
    assert_eq!(
        machine.apply(&cmd(0, 0, 0), entry(9)).unwrap(),
        106u32.to_le_bytes()
    );
    // The f64 global too: the hashes cover every mutable global.
    assert_eq!(restored.state_hash(), machine.state_hash());
}

/// A reader that fails with an I/O error after `left` bytes.
struct Failing<'a> {
    bytes: &'a [u8],
    left: usize,
}

impl Read for Failing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "peer gone"));
        }
        let n = buf.len().min(self.left).min(self.bytes.len());
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        self.left -= n;
        Ok(n)
    }
}

/// Byte offsets in the encoding of `guest()`'s snapshots (2 globals).
const GLOBALS_AT: usize = 8 + 32 + 8 + 8 + 4;
const MEMORY_LEN_AT: usize = GLOBALS_AT + 2 * 17;
const MEMORY_AT: usize = MEMORY_LEN_AT + 8;

#[test]
fn hostile_or_broken_streams_are_refused_and_change_nothing() {
    let mut source = Machine::load(&guest(), &config()).unwrap();
    source.apply(&cmd(1, 30, 0), entry(1)).unwrap();
    write(&mut source, 200, 4096, 2);
    let good = image_bytes(&source.snapshot_image());

    let mut machine = Machine::load(&guest(), &config()).unwrap();
    write(&mut machine, 3, 4096, 1);
    let hash = machine.state_hash();
    let snapshot = machine.snapshot();

    let patched = |at: usize, with: &[u8]| {
        let mut bytes = good.clone();
        bytes[at..at + with.len()].copy_from_slice(with);
        bytes
    };
    let other_module = {
        let bytes = wat::parse_str(
            r#"(module (memory (export "memory") 1)
                 (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 0))
                 (func (export "paxwasm_apply") (param i32 i32) (result i64) (i64.const 0)))"#,
        )
        .unwrap();
        image_bytes(&Machine::load(&bytes, &config()).unwrap().snapshot_image())
    };
    let mut trailing = good.clone();
    trailing.push(0);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "bad snapshot: truncated"),
        (
            "wrong magic",
            patched(0, b"PAXWSNP2"),
            "bad snapshot: wrong magic",
        ),
        (
            "other module",
            other_module,
            "snapshot is of module sha256:",
        ),
        (
            "cut in header",
            good[..30].to_vec(),
            "bad snapshot: truncated",
        ),
        (
            "cut in globals",
            good[..GLOBALS_AT + 20].to_vec(),
            "bad snapshot: truncated",
        ),
        (
            "cut in memory",
            good[..MEMORY_AT + 100_000].to_vec(),
            "bad snapshot: truncated",
        ),
        (
            "one byte short",
            good[..good.len() - 1].to_vec(),
            "bad snapshot: truncated",
        ),
        ("trailing byte", trailing, "bad snapshot: trailing bytes"),
        (
            "global count",
            patched(GLOBALS_AT - 4, &3u32.to_le_bytes()),
            "snapshot globals do not match",
        ),
        (
            "global count huge",
            patched(GLOBALS_AT - 4, &u32::MAX.to_le_bytes()),
            "snapshot globals do not match",
        ),
        (
            "global kind",
            patched(GLOBALS_AT, &[1]),
            "snapshot globals do not match",
        ),
        (
            "global tag",
            patched(GLOBALS_AT + 17, &[9]),
            "bad snapshot: unknown global type tag",
        ),
        (
            "memory not whole pages",
            patched(MEMORY_LEN_AT, &(32 * 65536u64 + 1).to_le_bytes()),
            "snapshot memory of 2097153 bytes",
        ),
        (
            "memory below the module's minimum",
            patched(MEMORY_LEN_AT, &65536u64.to_le_bytes()),
            "snapshot memory of 65536 bytes",
        ),
        (
            "memory above the cap",
            patched(MEMORY_LEN_AT, &(17u64 << 20).to_le_bytes()),
            "snapshot memory of 17825792 bytes",
        ),
        (
            "memory length huge",
            patched(MEMORY_LEN_AT, &u64::MAX.to_le_bytes()),
            "does not fit the module",
        ),
    ];
    for (name, bytes, message) in cases {
        let error = machine
            .restore_from_reader(&mut bytes.as_slice())
            .unwrap_err();
        assert!(
            error.to_string().contains(message),
            "{name}: {error} (wanted {message})"
        );
        assert_eq!(machine.state_hash(), hash, "{name}");
        assert_eq!(machine.snapshot(), snapshot, "{name}");
    }
    let error = machine
        .restore_from_reader(&mut Failing {
            bytes: &good,
            left: MEMORY_AT + 3 * 65536,
        })
        .unwrap_err();
    assert!(
        matches!(&error, RestoreError::Io(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "{error:?}"
    );
    assert_eq!(error.to_string(), "reading snapshot: peer gone");
    assert_eq!(machine.state_hash(), hash);
    assert_eq!(machine.snapshot(), snapshot);
    // Still a working machine, and the good stream still restores.
    write(&mut machine, 1, 4096, 2);
    machine.restore_from_reader(&mut good.as_slice()).unwrap();
    assert_eq!(machine.state_hash(), source.state_hash());
}
