//! The deterministic Wasm state machine of one replica.
//!
//! It owns a guest module (checked and instrumented at load), its instance and
//! its committed state, and offers apply, query, snapshot, restore, state hash
//! and upgrade. Every operation that changes replicated state is a pure
//! function of the module bytes, the config and the sequence of (command,
//! entry context) inputs, so replicas that feed the same log agree.
//!
//! It never reads a clock, draws randomness, or does I/O on the guest's
//! behalf; it knows nothing about Paxos, storage or the network.
//!
//! # How state is kept (see docs/notes/machine.md)
//!
//! The committed linear memory (the *base*) lives in a memfd; the instance
//! maps it privately, so writes since the last checkpoint are private pages.
//! A successful apply only appends its input to a replay log. A failed apply
//! drops the pages written since the last checkpoint, resets the globals to
//! the base, and replays the logged inputs with the same fuel: the state is
//! then exactly as before the failed command. A checkpoint (every
//! `replay_commands_max` commands, or when a query, snapshot or state hash
//! needs the base current) writes the pages written since the previous one
//! into the memfd. Where userfaultfd tracking works, the primary keeps its
//! private copies (equal to the base from then on, write-protected again);
//! otherwise the checkpoint drops them.
//!
//! A snapshot image (`image.rs`) copies only the pages checkpoints wrote since
//! the previous image into a *shadow* memfd, which another thread then writes
//! out while the machine keeps applying.

mod hash;
mod image;
mod instance;
mod memory;
mod module;
mod precompiled;
mod snapshot;

use std::io::Read;
use std::sync::Arc;

use wasmtime::{Engine, InstancePre, Linker};

pub use hash::{HASH_GROUP_LEAVES, HASH_LEAF_BYTES};
pub use image::{SnapshotImage, IMAGE_CHUNK_BYTES, SHADOWS_MAX};
pub use module::{allowed_features, GlobalKind, LoadError, ModuleId, WASM_PAGE_BYTES};
pub use precompiled::CompiledModule;
pub use snapshot::{GlobalValue, Snapshot, SnapshotDecodeError};

use hash::PageHashes;
use image::{PageSet, Shadow, StreamError};
use instance::{BatchOutput, Call, HostState, Instance};
use memory::{DirtyScanner, Discarder, Memfd, MemfdCreator, Scanned, Uffd};
use module::CheckedModule;

/// Where the guest's `paxwasm.log` output goes. It is never part of state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestLog {
    Discard,
    Stderr,
}

/// Limits and budgets. Every replica of a cluster must use the same values
/// (except `guest_log`), since they decide which commands fail.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    pub module_bytes_max: u64,
    /// Functions, imported plus defined.
    pub functions_max: u64,
    pub memory_initial_pages_max: u64,
    /// Cap on linear memory; `memory.grow` beyond it returns -1.
    pub memory_bytes_max: u64,
    /// Elements of the module's table (for indirect calls), fixed at
    /// instantiation.
    pub table_elements_max: u64,
    /// Fuel for `paxwasm_alloc` + `paxwasm_apply` of one command.
    pub fuel_per_command: u64,
    /// Fuel for `paxwasm_alloc` + `paxwasm_query` of one query.
    pub fuel_per_query: u64,
    /// Fuel for each step of an install or upgrade (start + init, export,
    /// import).
    pub fuel_per_migration: u64,
    pub output_bytes_max: u64,
    /// Bytes handed from `paxwasm_export_state` to `paxwasm_import_state`.
    pub migration_state_bytes_max: u64,
    /// Native stack the guest may use (wasmtime `max_wasm_stack`).
    pub stack_bytes_max: usize,
    /// A checkpoint is taken after this many commands since the last one,
    /// which bounds how many commands a rollback replays.
    pub replay_commands_max: usize,
    /// ... or once the commands since the last checkpoint used this much fuel
    /// (bounds the time a rollback spends replaying).
    pub replay_fuel_max: u64,
    /// ... or once their inputs add up to this many bytes.
    pub replay_input_bytes_max: usize,
    /// Private copies of pages a checkpoint keeps in the primary (see
    /// `Machine::checkpoint`), at most: beyond, they are all dropped, so the
    /// pages written since stay resident twice for at most this many bytes.
    pub kept_copies_bytes_max: usize,
    pub guest_log: GuestLog,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            module_bytes_max: 16 << 20,
            functions_max: 100_000,
            memory_initial_pages_max: 1024,
            memory_bytes_max: 256 << 20,
            table_elements_max: 100_000,
            fuel_per_command: 50_000_000,
            fuel_per_query: 50_000_000,
            fuel_per_migration: 2_000_000_000,
            output_bytes_max: 1 << 20,
            migration_state_bytes_max: 256 << 20,
            stack_bytes_max: 512 << 10,
            replay_commands_max: 16_384,
            replay_fuel_max: 50_000_000,
            replay_input_bytes_max: 4 << 20,
            kept_copies_bytes_max: 64 << 20,
            guest_log: GuestLog::Discard,
        }
    }
}

/// The leader-chosen context stored in a log entry, visible to the guest
/// through `paxwasm.entry_time_ms` and `paxwasm.entry_seed`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryContext {
    pub time_ms: i64,
    pub seed: u64,
}

/// The canonical, replicated outcome of a failed guest call: the kind only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyError {
    Trap(&'static str),
    FuelExhausted,
    MemoryLimitExceeded,
    OutputTooLarge,
    /// The input does not fit the guest's 32-bit address space.
    InputTooLarge,
    MissingExport(&'static str),
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Trap(kind) => write!(f, "trap: {kind}"),
            ApplyError::FuelExhausted => f.write_str("fuel exhausted"),
            ApplyError::MemoryLimitExceeded => f.write_str("memory limit exceeded"),
            ApplyError::OutputTooLarge => f.write_str("output too large"),
            ApplyError::InputTooLarge => f.write_str("input too large"),
            ApplyError::MissingExport(name) => write!(f, "missing export `{name}`"),
        }
    }
}

impl std::error::Error for ApplyError {}

/// How often [`Machine::apply_batch`] called the guest with a batch, and how
/// often such a call failed and the batch went command by command instead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    pub calls: u64,
    /// Commands applied by batch calls that succeeded.
    pub commands: u64,
    pub fallbacks: u64,
}

/// What [`Machine::apply_batch`] produced: per command, its output or its error,
/// in command order. Reused across batches (its buffers keep their capacity).
#[derive(Debug, Default)]
pub struct BatchResults {
    /// The outputs back to back (`output.out`); `output.done` is the guest
    /// call's scratch.
    output: BatchOutput,
    /// Per command: where its output ends in `output.out`, and whether it applied.
    ends: Vec<(usize, Result<(), ApplyError>)>,
}

impl BatchResults {
    fn clear(&mut self) {
        self.output.out.clear();
        self.ends.clear();
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The output of command `i`, or why it failed.
    pub fn get(&self, i: usize) -> Result<&[u8], ApplyError> {
        let start = if i == 0 { 0 } else { self.ends[i - 1].0 };
        let (end, outcome) = &self.ends[i];
        (*outcome).map(|()| &self.output.out[start..*end])
    }
}

/// Whether an upgrade hands the old state to the new module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Migration {
    /// Old `paxwasm_export_state` → new `paxwasm_import_state`.
    Migrate,
    /// The new module starts with empty state (`paxwasm_init`).
    StartFresh,
}

#[derive(Debug)]
pub enum UpgradeError {
    Refused(LoadError),
    /// The old module failed to export its state.
    Export(ApplyError),
    /// The new module failed to start or to import the state.
    Import(ApplyError),
}

impl std::fmt::Display for UpgradeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpgradeError::Refused(e) => write!(f, "upgrade refused: {e}"),
            UpgradeError::Export(e) => write!(f, "upgrade failed: old module's state export: {e}"),
            UpgradeError::Import(e) => {
                write!(f, "upgrade failed: new module's start or state import: {e}")
            }
        }
    }
}

impl std::error::Error for UpgradeError {}

#[derive(Debug)]
pub enum RestoreError {
    WrongModule {
        snapshot: ModuleId,
        machine: ModuleId,
    },
    BadMemorySize(usize),
    BadGlobals,
    /// The bytes are not a snapshot (magic, tag, truncated, trailing bytes).
    Decode(SnapshotDecodeError),
    /// The reader of a streaming restore failed.
    Io(std::io::Error),
}

impl From<StreamError> for RestoreError {
    fn from(e: StreamError) -> RestoreError {
        match e {
            StreamError::Decode(e) => RestoreError::Decode(e),
            StreamError::Io(e) => RestoreError::Io(e),
        }
    }
}

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestoreError::WrongModule { snapshot, machine } => {
                write!(
                    f,
                    "snapshot is of module {snapshot}, the machine runs {machine}"
                )
            }
            RestoreError::BadMemorySize(bytes) => write!(
                f,
                "snapshot memory of {bytes} bytes does not fit the module"
            ),
            RestoreError::BadGlobals => {
                f.write_str("snapshot globals do not match the module's mutable globals")
            }
            RestoreError::Decode(e) => write!(f, "{e}"),
            RestoreError::Io(e) => write!(f, "reading snapshot: {e}"),
        }
    }
}

impl std::error::Error for RestoreError {}

/// A compiled, checked module ready to instantiate.
struct Loaded {
    checked: CheckedModule,
    pre: InstancePre<HostState>,
    /// Wasm memory size right after instantiation (the declared minimum).
    initial_memory_bytes: usize,
}

/// The committed state the instance returns to on rollback.
struct Base {
    memfd: Arc<Memfd>,
    globals: Vec<GlobalValue>,
    memory_bytes: usize,
}

/// Inputs applied since the base, to replay after a rollback.
#[derive(Default)]
struct ReplayLog {
    input: Vec<u8>,
    commands: Vec<Replayed>,
    fuel_used: u64,
}

struct Replayed {
    input_end: usize,
    entry: EntryContext,
    /// Of the command, or of every command of the batch.
    fuel_used: u64,
    /// 0: one `paxwasm_apply` call on the input. n > 0: one
    /// `paxwasm_apply_batch` call on n framed commands. A rollback replays the
    /// very calls the state came from: a batch leaves other bytes in linear
    /// memory (the framed input, the stack) than the same commands one by one.
    batch: u32,
}

impl ReplayLog {
    fn clear(&mut self) {
        self.input.clear();
        self.commands.clear();
        self.fuel_used = 0;
    }
}

pub struct Machine {
    config: MachineConfig,
    engine: Engine,
    linker: Linker<HostState>,
    creator: Arc<MemfdCreator>,
    loaded: Loaded,
    base: Base,
    primary: Instance,
    /// Instance used for queries and state export: maps the base privately;
    /// whatever it writes is dropped after each call.
    reader: Option<Instance>,
    replay: ReplayLog,
    batch_stats: BatchStats,
    /// True when guest code ran on `primary` since the last checkpoint.
    primary_changed: bool,
    last_entry: EntryContext,
    hashes: PageHashes,
    /// Tracks the primary's writes in its page tables (`WP_ASYNC`), when the
    /// kernel allows; `None` falls back to telling private pages from file
    /// pages, which costs time per populated page (see `memory.rs`).
    tracker: Option<Arc<Uffd>>,
    scanner: DirtyScanner,
    discarder: Discarder,
    runs: Vec<(usize, usize)>,
    /// Pages of which the primary may hold a private copy equal to the base
    /// (kept by checkpoints; a superset after rollbacks).
    kept: PageSet,
    /// Reused output buffer of `apply`.
    scratch: Vec<u8>,
    /// Reused buffer of the copies into shadows.
    copy_buffer: Vec<u8>,
    /// Memfds holding earlier images, for incremental images (`image.rs`).
    shadows: Vec<Shadow>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("module_id", &self.module_id())
            .finish_non_exhaustive()
    }
}

/// Host failures (out of memory, mmap refused) are not replicated outcomes;
/// the replica cannot stay deterministic past them, so it stops.
fn host_failure(what: &str, error: impl std::fmt::Display) -> ! {
    panic!("paxwasm machine: {what}: {error}")
}

fn engine(config: &MachineConfig, creator: Arc<MemfdCreator>) -> Engine {
    let mut c = wasmtime::Config::new();
    c.consume_fuel(true)
        .cranelift_nan_canonicalization(true)
        .wasm_relaxed_simd(false)
        .relaxed_simd_deterministic(true)
        .wasm_simd(true)
        .wasm_multi_memory(false)
        .wasm_memory64(false)
        .wasm_tail_call(true)
        .wasm_bulk_memory(true)
        .wasm_multi_value(true)
        .wasm_extended_const(true)
        .wasm_wide_arithmetic(false)
        .wasm_custom_page_sizes(false)
        .max_wasm_stack(config.stack_bytes_max)
        .with_host_memory(creator)
        .memory_may_move(false)
        // Data segments are copied into our memory, not mapped as an image.
        .memory_init_cow(false);
    // For profiling only: wasmtime then writes /tmp/perf-<pid>.map, so `perf
    // report` names guest code `wasm[0]::function[N]` instead of raw addresses.
    if std::env::var_os("PAXWASM_PERFMAP").is_some() {
        c.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    Engine::new(&c).unwrap_or_else(|e| host_failure("engine configuration", e))
}

impl Machine {
    /// Checks, compiles and installs `module_bytes` with empty state: runs its
    /// start function and `paxwasm_init`.
    pub fn load(module_bytes: &[u8], config: &MachineConfig) -> Result<Machine, LoadError> {
        let creator = Arc::new(MemfdCreator::default());
        let engine = engine(config, creator.clone());
        let linker = instance::linker(&engine);
        let loaded = compile(&engine, &linker, module_bytes, config)?;
        Machine::start(config, engine, linker, creator, loaded)
    }

    /// Installs a compiled module with empty state (the second half of `load`).
    fn start(
        config: &MachineConfig,
        engine: Engine,
        linker: Linker<HostState>,
        creator: Arc<MemfdCreator>,
        loaded: Loaded,
    ) -> Result<Machine, LoadError> {
        let entry = EntryContext::default();
        let tracker = Uffd::new();
        let (base, primary) = install(&loaded, config, &creator, tracker.as_ref(), entry, None)
            .map_err(|e| LoadError(format!("install failed: {e}")))?;
        let mut machine = Machine {
            config: config.clone(),
            engine,
            linker,
            creator,
            loaded,
            base,
            primary,
            reader: None,
            replay: ReplayLog::default(),
            batch_stats: BatchStats::default(),
            primary_changed: true,
            last_entry: entry,
            hashes: PageHashes::new(),
            tracker,
            scanner: DirtyScanner::new(),
            discarder: Discarder::new(),
            runs: Vec::new(),
            kept: PageSet::new(config.memory_bytes_max as usize),
            scratch: Vec::new(),
            copy_buffer: Vec::new(),
            shadows: Vec::new(),
        };
        machine.checkpoint();
        Ok(machine)
    }

    /// Loads `module_bytes` and restores `snapshot` into it.
    pub fn from_snapshot(
        module_bytes: &[u8],
        snapshot: &Snapshot,
        config: &MachineConfig,
    ) -> anyhow::Result<Machine> {
        let mut machine = Machine::load(module_bytes, config)?;
        machine.restore(snapshot)?;
        Ok(machine)
    }

    /// Loads `module_bytes` and restores the encoded snapshot read from `r`
    /// (see [`Machine::restore_from_reader`]).
    pub fn from_snapshot_reader(
        module_bytes: &[u8],
        r: &mut dyn Read,
        config: &MachineConfig,
    ) -> anyhow::Result<Machine> {
        let mut machine = Machine::load(module_bytes, config)?;
        machine.restore_from_reader(r)?;
        Ok(machine)
    }

    pub fn module_id(&self) -> ModuleId {
        self.loaded.checked.id
    }

    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// Size of the committed linear memory in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.base.memory_bytes
    }

    /// Applies one committed command. On error the state is exactly as it was
    /// before the call.
    pub fn apply(&mut self, command: &[u8], entry: EntryContext) -> Result<Vec<u8>, ApplyError> {
        let mut out = Vec::new();
        self.apply_into(command, entry, &mut out)?;
        Ok(out)
    }

    /// Like [`Machine::apply`], appending the result to `out` (no allocation
    /// once `out` has capacity).
    pub fn apply_into(
        &mut self,
        command: &[u8],
        entry: EntryContext,
        out: &mut Vec<u8>,
    ) -> Result<(), ApplyError> {
        self.last_entry = entry;
        let out_start = out.len();
        let result = self.primary.call(
            Call::Apply,
            command,
            entry,
            self.config.fuel_per_command,
            self.config.output_bytes_max as usize,
            out,
        );
        self.primary_changed = true;
        match result {
            Ok(fuel_used) => {
                self.replay.input.extend_from_slice(command);
                self.replay.fuel_used += fuel_used;
                self.replay.commands.push(Replayed {
                    input_end: self.replay.input.len(),
                    entry,
                    fuel_used,
                    batch: 0,
                });
                self.checkpoint_if_replay_is_long();
                Ok(())
            }
            Err(error) => {
                out.truncate(out_start);
                self.roll_back();
                Err(error)
            }
        }
    }

    /// Applies the commands of one log entry in order, as `apply_into` would
    /// one by one: each gets `fuel_per_command` and its own result, a failed one
    /// changes nothing, and the others apply. With a module that takes batches
    /// (`paxwasm_apply_batch`) and two or more commands, they cross into the
    /// guest in one call, which saves the per-call cost (≈ 160 instructions per
    /// command here). If anything in that call fails, the batch is rolled back
    /// and applied command by command instead. So every result is one the
    /// per-command path gives, except at the limits: the guest's glue around a
    /// command differs, so a command within a few fuel units, stack bytes or
    /// memory pages of its limit may succeed in a batch and fail alone (or the
    /// reverse).
    ///
    /// The state a batch leaves differs in bytes (the framed input, the guest's
    /// stack) from the same commands applied one by one, so callers must choose
    /// the grouping by replicated state alone (the node: runs of one log entry's
    /// commands, split by the dedup table; see `paxos::apply`).
    pub fn apply_batch(
        &mut self,
        commands: &[&[u8]],
        entry: EntryContext,
        results: &mut BatchResults,
    ) {
        results.clear();
        if commands.len() >= 2
            && self.primary.takes_batches()
            && self.try_batch(commands, entry, results)
        {
            return;
        }
        for command in commands {
            let outcome = self.apply_into(command, entry, &mut results.output.out);
            results.ends.push((results.output.out.len(), outcome));
        }
    }

    /// One `paxwasm_apply_batch` call over `commands`; false (and the state as
    /// before) when it failed.
    fn try_batch(
        &mut self,
        commands: &[&[u8]],
        entry: EntryContext,
        results: &mut BatchResults,
    ) -> bool {
        self.last_entry = entry;
        let start = self.replay.input.len();
        for command in commands {
            let Ok(len) = u32::try_from(command.len()) else {
                self.replay.input.truncate(start);
                return false;
            };
            self.replay.input.extend_from_slice(&len.to_le_bytes());
            self.replay.input.extend_from_slice(command);
        }
        let outcome = self.primary.call_batch(
            &self.replay.input[start..],
            commands.len(),
            entry,
            self.config.fuel_per_command,
            self.config.output_bytes_max as usize,
            &mut results.output,
        );
        self.primary_changed = true;
        self.batch_stats.calls += 1;
        if outcome.is_err() {
            self.batch_stats.fallbacks += 1;
            self.replay.input.truncate(start);
            results.output.out.clear();
            self.roll_back();
            return false;
        }
        self.batch_stats.commands += commands.len() as u64;
        let fuel_used = results.output.fuel_used();
        self.replay.fuel_used += fuel_used;
        self.replay.commands.push(Replayed {
            input_end: self.replay.input.len(),
            entry,
            fuel_used,
            batch: commands.len() as u32,
        });
        let ends = results.output.done.iter().map(|&(end, _)| (end, Ok(())));
        results.ends.extend(ends);
        self.checkpoint_if_replay_is_long();
        true
    }

    pub fn batch_stats(&self) -> BatchStats {
        self.batch_stats
    }

    fn checkpoint_if_replay_is_long(&mut self) {
        if self.replay.commands.len() >= self.config.replay_commands_max
            || self.replay.fuel_used >= self.config.replay_fuel_max
            || self.replay.input.len() >= self.config.replay_input_bytes_max
        {
            self.checkpoint();
        }
    }

    /// Runs a read-only query against the committed state. Nothing the query
    /// writes (memory, globals, memory growth) survives the call.
    pub fn query(&mut self, query: &[u8]) -> Result<Vec<u8>, ApplyError> {
        if !self.loaded.checked.has_query {
            return Err(ApplyError::MissingExport(module::EXPORT_QUERY));
        }
        let mut out = Vec::new();
        let entry = self.last_entry;
        let (fuel, output_bytes_max) = (
            self.config.fuel_per_query,
            self.config.output_bytes_max as usize,
        );
        self.with_reader(|reader| {
            reader.call(Call::Query, query, entry, fuel, output_bytes_max, &mut out)
        })?;
        Ok(out)
    }

    /// The complete instance state plus the module id.
    pub fn snapshot(&mut self) -> Snapshot {
        self.checkpoint();
        Snapshot {
            module_id: self.module_id(),
            last_entry: self.last_entry,
            globals: self.base.globals.clone(),
            memory: self.primary.memory().to_vec(),
        }
    }

    /// A point-in-time image of the state, to be written out later (on any
    /// thread) while the machine goes on. The pause is a checkpoint plus a
    /// copy of the pages changed since the previous image into a shadow
    /// memfd; a full copy only for the first image of a base (after load or
    /// upgrade) or when every kept shadow is still held by an image.
    pub fn snapshot_image(&mut self) -> SnapshotImage {
        self.checkpoint();
        let bytes = self.base.memory_bytes;
        assert_eq!(self.primary.memory_bytes(), bytes);
        // A shadow no image holds any more is ours to bring up to date; images
        // are only made here, so a count that is unique stays unique.
        let free = self
            .shadows
            .iter_mut()
            .position(|shadow| Arc::get_mut(&mut shadow.memfd).is_some());
        let memfd = match free {
            Some(index) => {
                let shadow = &mut self.shadows[index];
                shadow.stale.drain_runs(bytes, &mut self.runs);
                image::copy_runs(
                    &self.base.memfd,
                    &shadow.memfd,
                    &self.runs,
                    &mut self.copy_buffer,
                )
                .unwrap_or_else(|e| host_failure("copying into shadow memfd", e));
                shadow.memfd.clone()
            }
            None => {
                let memfd = new_memfd(&self.config);
                let runs = self.base.memfd.data_runs(bytes);
                image::copy_runs(&self.base.memfd, &memfd, &runs, &mut self.copy_buffer)
                    .unwrap_or_else(|e| host_failure("copying into shadow memfd", e));
                if self.shadows.len() < SHADOWS_MAX {
                    self.shadows.push(Shadow {
                        memfd: memfd.clone(),
                        stale: PageSet::new(self.config.memory_bytes_max as usize),
                    });
                }
                memfd
            }
        };
        SnapshotImage::new(
            self.module_id(),
            self.last_entry,
            &self.base.globals,
            memfd,
            bytes,
        )
    }

    /// Replaces the state with `snapshot` (which must be of this module). The
    /// module's start function and `paxwasm_init` do not run.
    pub fn restore(&mut self, snapshot: &Snapshot) -> Result<(), RestoreError> {
        self.check_module(snapshot.module_id)?;
        let bytes = self.check_memory_bytes(snapshot.memory.len() as u64)?;
        let kinds: Vec<GlobalKind> = snapshot.globals.iter().map(|g| g.kind).collect();
        if kinds != self.loaded.checked.global_kinds {
            return Err(RestoreError::BadGlobals);
        }
        let (memfd, shadow) = (new_memfd(&self.config), new_memfd(&self.config));
        image::nonzero_runs(&snapshot.memory, memory::os_page_bytes(), &mut self.runs);
        for &(start, end) in &self.runs {
            for target in [&memfd, &shadow] {
                target
                    .write_at(start, &snapshot.memory[start..end])
                    .unwrap_or_else(|e| host_failure("writing memfd", e));
            }
        }
        self.adopt(
            memfd,
            shadow,
            snapshot.globals.clone(),
            bytes,
            snapshot.last_entry,
        );
        Ok(())
    }

    /// Replaces the state with the encoded snapshot (`Snapshot::to_bytes`
    /// format, as [`SnapshotImage::write_to`] writes it) read from `r`,
    /// streamed into a new memfd: no second copy of memory in RAM. `r` must
    /// end where the snapshot ends (wrap it in [`Read::take`] if more
    /// follows). The checks are those of [`Machine::restore`], made as the
    /// header arrives (module id first, then globals, then memory size); on
    /// any error, including a failing or truncated reader, the machine is
    /// unchanged.
    pub fn restore_from_reader(&mut self, r: &mut dyn Read) -> Result<(), RestoreError> {
        let mut fixed = [0u8; snapshot::HEADER_FIXED_BYTES];
        image::read_exact(r, &mut fixed)?;
        if fixed[..8] != snapshot::MAGIC[..] {
            return Err(RestoreError::Decode(SnapshotDecodeError("wrong magic")));
        }
        self.check_module(ModuleId(fixed[8..40].try_into().unwrap()))?;
        let last_entry = EntryContext {
            time_ms: i64::from_le_bytes(fixed[40..48].try_into().unwrap()),
            seed: u64::from_le_bytes(fixed[48..56].try_into().unwrap()),
        };
        let count = u32::from_le_bytes(fixed[56..60].try_into().unwrap());
        let kinds = &self.loaded.checked.global_kinds;
        if count as usize != kinds.len() {
            return Err(RestoreError::BadGlobals);
        }
        let mut globals = Vec::with_capacity(kinds.len());
        for kind in kinds {
            let global = image::read_global(r)?;
            if global.kind != *kind {
                return Err(RestoreError::BadGlobals);
            }
            globals.push(global);
        }
        let mut size = [0u8; 8];
        image::read_exact(r, &mut size)?;
        let bytes = self.check_memory_bytes(u64::from_le_bytes(size))?;
        let (memfd, shadow) = (new_memfd(&self.config), new_memfd(&self.config));
        let mut buffer = vec![0u8; IMAGE_CHUNK_BYTES.min(bytes)];
        let page_bytes = memory::os_page_bytes();
        let mut offset = 0;
        while offset < bytes {
            let len = (bytes - offset).min(buffer.len());
            image::read_exact(r, &mut buffer[..len])?;
            // The fresh memfds read zero already: write only the rest, so a
            // mostly empty memory stays sparse.
            image::nonzero_runs(&buffer[..len], page_bytes, &mut self.runs);
            for &(start, end) in &self.runs {
                for target in [&memfd, &shadow] {
                    target
                        .write_at(offset + start, &buffer[start..end])
                        .unwrap_or_else(|e| host_failure("writing memfd", e));
                }
            }
            offset += len;
        }
        image::expect_end(r)?;
        self.adopt(memfd, shadow, globals, bytes, last_entry);
        Ok(())
    }

    /// TEST HOOK ONLY, never for production: inverts one byte of this
    /// replica's committed memory, so that its state (and state hash) differs
    /// from its peers'. It exists to prove that state-hash checkpoints detect a
    /// diverged replica. Panics if `offset` is outside linear memory.
    pub fn debug_flip_byte(&mut self, offset: usize) {
        self.checkpoint();
        assert!(
            offset < self.base.memory_bytes,
            "debug_flip_byte: offset {offset} outside linear memory of {} bytes",
            self.base.memory_bytes
        );
        let mut byte = [0u8];
        self.base
            .memfd
            .read_at(offset, &mut byte)
            .unwrap_or_else(|e| host_failure("reading memfd", e));
        byte[0] = !byte[0];
        // Written through the primary, as a command would: the checkpoint
        // then carries it into the base, the hashes and the shadows (the
        // primary may keep a private copy of this page, which a write to the
        // memfd alone would not change).
        // SAFETY: `offset` lies inside the primary's accessible memory
        // (asserted above, and the primary's size is the base's after the
        // checkpoint); no guest code runs and no reference into it is held.
        unsafe { *self.primary.memory_ptr().add(offset) = byte[0] };
        self.primary_changed = true;
        self.checkpoint();
    }

    fn check_module(&self, snapshot: ModuleId) -> Result<(), RestoreError> {
        if snapshot != self.module_id() {
            return Err(RestoreError::WrongModule {
                snapshot,
                machine: self.module_id(),
            });
        }
        Ok(())
    }

    /// The snapshot's memory size if this module and config can hold it.
    fn check_memory_bytes(&self, bytes: u64) -> Result<usize, RestoreError> {
        let size = usize::try_from(bytes).unwrap_or(usize::MAX);
        if !size.is_multiple_of(WASM_PAGE_BYTES as usize)
            || size < self.loaded.initial_memory_bytes
            || bytes > self.config.memory_bytes_max
        {
            return Err(RestoreError::BadMemorySize(size));
        }
        Ok(size)
    }

    /// Makes `memfd` (with `globals`, `bytes` of memory) the committed state,
    /// with `shadow` holding the same memory for the next image.
    fn adopt(
        &mut self,
        memfd: Arc<Memfd>,
        shadow: Arc<Memfd>,
        globals: Vec<GlobalValue>,
        bytes: usize,
        last_entry: EntryContext,
    ) {
        self.base = Base {
            memfd,
            globals,
            memory_bytes: bytes,
        };
        self.replace_primary(instance_over_base(
            &self.loaded,
            &self.config,
            &self.creator,
            self.tracker.as_ref(),
            &self.base,
        ));
        self.reader = None;
        self.replay.clear();
        self.primary_changed = false;
        self.last_entry = last_entry;
        self.hashes.invalidate();
        self.shadows = vec![Shadow {
            memfd: shadow,
            stale: PageSet::new(self.config.memory_bytes_max as usize),
        }];
    }

    /// sha256 over module id, globals and memory (definition in `hash.rs`).
    /// Only pages written since the last call are rehashed.
    pub fn state_hash(&mut self) -> [u8; 32] {
        self.checkpoint();
        let id = self.module_id();
        self.hashes
            .root(id, &self.base.globals, self.primary.memory())
    }

    /// `sha256:<hex>` of [`Machine::state_hash`].
    pub fn state_hash_hex(&mut self) -> String {
        format!("{}", ModuleId(self.state_hash()))
    }

    /// Replaces the module. With [`Migration::Migrate`], the old module's
    /// exported state is imported by the new one; if anything fails (missing
    /// export, trap, fuel, memory), the old module and state stay.
    pub fn upgrade(&mut self, new_module: &[u8], migration: Migration) -> Result<(), UpgradeError> {
        let loaded = compile(&self.engine, &self.linker, new_module, &self.config)
            .map_err(UpgradeError::Refused)?;
        self.switch(loaded, migration)
    }

    /// Replaces the module with a compiled one (the second half of `upgrade`).
    fn switch(&mut self, loaded: Loaded, migration: Migration) -> Result<(), UpgradeError> {
        let entry = self.last_entry;
        let state = match migration {
            Migration::StartFresh => None,
            Migration::Migrate => {
                if !loaded.checked.has_import_state {
                    return Err(UpgradeError::Import(ApplyError::MissingExport(
                        module::EXPORT_IMPORT_STATE,
                    )));
                }
                let (fuel, bytes_max) = (
                    self.config.fuel_per_migration,
                    self.config.migration_state_bytes_max as usize,
                );
                let state = self
                    .with_reader(|reader| reader.export_state(entry, fuel, bytes_max))
                    .map_err(UpgradeError::Export)?;
                Some(state)
            }
        };
        let (base, primary) = install(
            &loaded,
            &self.config,
            &self.creator,
            self.tracker.as_ref(),
            entry,
            state.as_deref(),
        )
        .map_err(UpgradeError::Import)?;
        self.loaded = loaded;
        self.base = base;
        self.replace_primary(primary);
        // The shadows hold images of the old base.
        self.shadows.clear();
        self.reader = None;
        self.replay.clear();
        self.primary_changed = true;
        self.hashes.invalidate();
        self.checkpoint();
        Ok(())
    }

    /// Writes the primary's private pages into the base and makes the base's
    /// globals current; afterwards a rollback has nothing to replay.
    fn checkpoint(&mut self) {
        if !self.primary_changed {
            return;
        }
        let ptr = self.primary.memory_ptr();
        let bytes = self.primary.memory_bytes();
        let tracked = self.tracker.is_some();
        let scanned = self
            .scanner
            .written_runs(ptr, bytes, tracked, &mut self.runs);
        for &(start, end) in &self.runs {
            // SAFETY: `[start, end)` lies inside the primary's accessible
            // memory (scanned above) and no guest code runs during this call.
            let written = unsafe { std::slice::from_raw_parts(ptr.add(start), end - start) };
            self.base
                .memfd
                .write_at(start, written)
                .unwrap_or_else(|e| host_failure("writing memfd", e));
            self.hashes.mark_written(start, end);
            for shadow in &mut self.shadows {
                shadow.stale.mark(start, end);
            }
        }
        match scanned {
            Scanned::PrivateCopies => {
                // SAFETY: as above; the bytes are now in the memfd, so
                // dropping the private copies does not change what the memory
                // reads.
                unsafe { self.discarder.discard(ptr, &self.runs) };
                self.kept.clear();
            }
            // The private copies stay: they now equal the base and the scan
            // protected them again, so the next write to one is reported by
            // the next scan, and a rollback drops just those. Keeping them
            // spares every page the guest writes again a copy-on-write fault
            // (allocate, copy 4 KiB from the memfd) after each checkpoint; it
            // leaves only the write-protect fault, which copies nothing. With
            // writes spread over a large state (a kv store under load) those
            // copies were most of a command's apply time. The price: pages
            // resident twice (private copy and memfd), hence the bound.
            Scanned::WrittenSinceLastScan => {
                for &(start, end) in &self.runs {
                    self.kept.mark(start, end);
                }
                if self.kept.bytes() > self.config.kept_copies_bytes_max {
                    self.kept.drain_runs(bytes, &mut self.runs);
                    // SAFETY: as above; every kept copy equals the base and is
                    // protected (the scan just protected the written ones), so
                    // dropping them changes nothing the memory reads and leaves
                    // markers that keep later writes tracked.
                    unsafe { self.discarder.discard(ptr, &self.runs) };
                }
            }
        }
        self.base.globals = self.primary.globals();
        self.base.memory_bytes = bytes;
        self.replay.clear();
        self.primary_changed = false;
    }

    /// Installs a new primary instance (it holds no private copies yet).
    fn replace_primary(&mut self, primary: Instance) {
        self.primary = primary;
        self.kept.clear();
    }

    /// Returns the primary to the state before the failed command: back to the
    /// base, then replay of the commands applied since.
    fn roll_back(&mut self) {
        if self.primary.memory_bytes() == self.base.memory_bytes {
            let (ptr, bytes) = (self.primary.memory_ptr(), self.base.memory_bytes);
            if self.tracker.is_some() {
                // Drop only the pages written since the checkpoint (private
                // copies kept by checkpoints equal the base), protected again
                // by the scan; if the scan falls back, the runs are every
                // private copy. A drop of the whole range would walk every
                // write-protect marker (≈ 75 µs per 16 MiB) and leave the
                // dropped pages unprotected.
                let scanned = self.scanner.written_runs(ptr, bytes, true, &mut self.runs);
                // SAFETY: runs inside the primary's memory; no guest code is
                // running and no reference into it is held.
                unsafe { self.discarder.discard(ptr, &self.runs) };
                if scanned == Scanned::PrivateCopies {
                    self.kept.clear();
                }
            } else {
                // SAFETY: the primary's memory range; as above.
                unsafe { memory::discard_private_pages(ptr, bytes) };
                self.kept.clear();
            }
            self.primary.set_globals(&self.base.globals);
        } else {
            // Memory cannot shrink in place, and replay must see the size the
            // commands saw: rebuild the instance over the base.
            self.replace_primary(instance_over_base(
                &self.loaded,
                &self.config,
                &self.creator,
                self.tracker.as_ref(),
                &self.base,
            ));
        }
        let replay = std::mem::take(&mut self.replay);
        // The replayed commands logged once already.
        let log = std::mem::replace(&mut self.primary.store.data_mut().log, GuestLog::Discard);
        let mut start = 0;
        let mut batch_output = BatchOutput::default();
        for command in &replay.commands {
            self.scratch.clear();
            let input = &replay.input[start..command.input_end];
            let result = if command.batch == 0 {
                self.primary.call(
                    Call::Apply,
                    input,
                    command.entry,
                    self.config.fuel_per_command,
                    self.config.output_bytes_max as usize,
                    &mut self.scratch,
                )
            } else {
                self.primary
                    .call_batch(
                        input,
                        command.batch as usize,
                        command.entry,
                        self.config.fuel_per_command,
                        self.config.output_bytes_max as usize,
                        &mut batch_output,
                    )
                    .map(|()| batch_output.fuel_used())
            };
            assert_eq!(
                result,
                Ok(command.fuel_used),
                "replay after rollback diverged: the machine is not deterministic"
            );
            start = command.input_end;
        }
        self.primary.store.data_mut().log = log;
        self.replay = replay;
        self.primary_changed = !self.replay.commands.is_empty();
        // Keep the next rollback short.
        self.checkpoint();
    }

    /// Runs `f` on the reader instance over the current committed state:
    /// whatever earlier calls wrote is reset to the base first, and nothing
    /// `f` writes reaches the base.
    fn with_reader<T>(
        &mut self,
        f: impl FnOnce(&mut Instance) -> Result<T, ApplyError>,
    ) -> Result<T, ApplyError> {
        self.checkpoint();
        let mut reader = match self.reader.take() {
            // A reader whose memory size differs from the base (an earlier
            // call grew it, or the base grew) is rebuilt: a call must see
            // exactly the committed memory size.
            Some(mut reader) if reader.memory_bytes() == self.base.memory_bytes => {
                // The pages earlier calls wrote are private copies, which no
                // longer follow the memfd: overwrite them with the base's
                // current bytes. Copying them back in place, rather than
                // dropping them (`madvise`), spares the call the page faults
                // of writing them again, which cost more than the copy.
                let ptr = reader.memory_ptr();
                self.scanner
                    .written_runs(ptr, reader.memory_bytes(), false, &mut self.runs);
                for &(start, end) in &self.runs {
                    // SAFETY: a range inside the reader's memory; no guest
                    // code runs and no reference into it is held.
                    let written =
                        unsafe { std::slice::from_raw_parts_mut(ptr.add(start), end - start) };
                    self.base
                        .memfd
                        .read_at(start, written)
                        .unwrap_or_else(|e| host_failure("reading memfd", e));
                }
                reader.set_globals(&self.base.globals);
                reader
            }
            _ => instance_over_base(&self.loaded, &self.config, &self.creator, None, &self.base),
        };
        let result = f(&mut reader);
        // Pages the call only read stay mapped to the memfd's page cache (the
        // base); the pages it wrote are reset at the start of the next call.
        if reader.memory_bytes() == self.base.memory_bytes {
            self.reader = Some(reader);
        }
        result
    }
}

fn new_memfd(config: &MachineConfig) -> Arc<Memfd> {
    Memfd::new(config.memory_bytes_max as usize)
        .unwrap_or_else(|e| host_failure("creating memfd", e))
}

fn compile(
    engine: &Engine,
    linker: &Linker<HostState>,
    bytes: &[u8],
    config: &MachineConfig,
) -> Result<Loaded, LoadError> {
    let checked = module::check(bytes, config)?;
    let module = wasmtime::Module::new(engine, &checked.instrumented)
        .map_err(|e| LoadError(format!("compilation failed: {e}")))?;
    link(linker, checked, module, config)
}

/// The steps after compilation: the memory bound and the link against the host
/// functions (cheap; shared with precompiled modules, see `precompiled.rs`).
fn link(
    linker: &Linker<HostState>,
    checked: CheckedModule,
    module: wasmtime::Module,
    config: &MachineConfig,
) -> Result<Loaded, LoadError> {
    let memory_type = module
        .exports()
        .find_map(|e| e.ty().memory().cloned())
        .expect("checked: the module exports one memory");
    let initial_memory_bytes = (memory_type.minimum() * WASM_PAGE_BYTES) as usize;
    if initial_memory_bytes as u64 > config.memory_bytes_max {
        return Err(LoadError(format!(
            "initial memory of {initial_memory_bytes} bytes exceeds memory_bytes_max = {}",
            config.memory_bytes_max
        )));
    }
    let pre = linker
        .instantiate_pre(&module)
        .map_err(|e| LoadError(format!("linking failed: {e}")))?;
    Ok(Loaded {
        checked,
        pre,
        initial_memory_bytes,
    })
}

fn host_state(config: &MachineConfig) -> HostState {
    HostState {
        entry: EntryContext::default(),
        memory_bytes_max: config.memory_bytes_max as usize,
        table_elements_max: config.table_elements_max as usize,
        memory_refused: false,
        memory_grew: false,
        log: config.guest_log,
        batch: None,
    }
}

/// `tracker`: for the primary instance only (see `Machine::tracker`).
fn instantiate(
    loaded: &Loaded,
    config: &MachineConfig,
    creator: &MemfdCreator,
    tracker: Option<&Arc<Uffd>>,
    memfd: &Arc<Memfd>,
) -> Instance {
    creator.set_next(memfd.clone(), tracker.cloned());
    Instance::new(&loaded.pre, &loaded.checked, host_state(config))
        .unwrap_or_else(|e| host_failure("instantiation", e))
}

/// A new instance whose memory and globals are exactly the base: data
/// segments land in private pages and are dropped; the start function does not
/// run.
fn instance_over_base(
    loaded: &Loaded,
    config: &MachineConfig,
    creator: &MemfdCreator,
    tracker: Option<&Arc<Uffd>>,
    base: &Base,
) -> Instance {
    let mut instance = instantiate(loaded, config, creator, tracker, &base.memfd);
    instance.grow_to(base.memory_bytes);
    // SAFETY: the new instance's memory range; no guest code has run.
    unsafe { memory::discard_private_pages(instance.memory_ptr(), instance.memory_bytes()) };
    if let Some(uffd) = tracker {
        // The data segments' pages were just discarded unprotected; protect
        // them again so that reading them does not count as a write. If
        // this fails (memory not registered), reads only cost needless
        // writes of equal bytes at the next checkpoint.
        let _ = uffd.write_protect(instance.memory_ptr(), instance.memory_bytes());
    }
    instance.set_globals(&base.globals);
    instance
}

/// A fresh install: new memfd, data segments, start function, then either
/// `paxwasm_init` or `paxwasm_import_state(state)`. The returned base is not
/// yet checkpointed (its globals are the instance's initial ones).
fn install(
    loaded: &Loaded,
    config: &MachineConfig,
    creator: &MemfdCreator,
    tracker: Option<&Arc<Uffd>>,
    entry: EntryContext,
    state: Option<&[u8]>,
) -> Result<(Base, Instance), ApplyError> {
    let memfd = new_memfd(config);
    let mut instance = instantiate(loaded, config, creator, tracker, &memfd);
    instance.run_start(entry, config.fuel_per_migration, state.is_none())?;
    if let Some(state) = state {
        instance.import_state(state, entry, config.fuel_per_migration)?;
    }
    let base = Base {
        memfd,
        globals: instance.globals(),
        memory_bytes: 0,
    };
    Ok((base, instance))
}
