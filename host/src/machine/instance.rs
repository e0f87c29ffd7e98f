//! One wasmtime instance of a guest and the calls into it. The only place that
//! touches wasmtime's store and turns its errors into canonical [`ApplyError`]s.

use wasmtime::{
    Caller, Global, InstancePre, Linker, Memory, ResourceLimiter, Store, Trap, TypedFunc, Val,
};

use super::module::{
    CheckedModule, GlobalKind, EXPORT_ALLOC, EXPORT_APPLY, EXPORT_APPLY_BATCH, EXPORT_EXPORT_STATE,
    EXPORT_IMPORT_STATE, EXPORT_INIT, EXPORT_INPUT_BUFFER, EXPORT_MEMORY, EXPORT_QUERY,
    IMPORT_COMMAND_DONE, IMPORT_ENTRY_SEED, IMPORT_ENTRY_TIME_MS, IMPORT_LOG, IMPORT_MODULE,
    START_EXPORT,
};
use super::snapshot::GlobalValue;
use super::{ApplyError, EntryContext, GuestLog};

/// Fuel for instantiation. It runs no guest code, but wasmtime meters constant
/// expressions and the copying of data segments, which are bounded by the module's
/// size (itself capped by `module_bytes_max`). A smaller budget would turn a valid
/// module with a few MiB of data into a failed instantiation.
const INSTANTIATION_FUEL: u64 = u64::MAX / 4;

/// Per-store host data: what the imports read and what the limiter records.
pub struct HostState {
    pub entry: EntryContext,
    pub memory_bytes_max: usize,
    pub table_elements_max: usize,
    /// Set when a `memory.grow` was refused by the cap during the current call.
    pub memory_refused: bool,
    /// Set whenever the limiter lets memory grow (guest `memory.grow` and
    /// host `Memory::grow` alike); [`Instance`] then re-reads the memory size
    /// it caches. Cleared by the instance.
    pub memory_grew: bool,
    pub log: GuestLog,
    /// Set only during a `paxwasm_apply_batch` call: what `command_done` needs.
    pub batch: Option<BatchRun>,
}

/// The host's side of one `paxwasm_apply_batch` call (ABI.md, "Batches").
pub struct BatchRun {
    /// Commands in the batch: `command_done` answers "stop" after the last one
    /// and traps if called again.
    pub commands: usize,
    pub budget: u64,
    pub output_bytes_max: usize,
    pub memory: Memory,
    /// The memory's base address and its size when the call began (re-read
    /// after a growth): `command_done` reads outputs without wasmtime's store
    /// lookup, as `Instance::guest_memory` does.
    pub memory_base: *const u8,
    pub memory_size: usize,
    pub output: BatchOutput,
}

// SAFETY: `memory_base` points into the linear memory of the store this run is
// the host data of; it is dereferenced only by `command_done`, on the thread
// running that store's batch call, and the run is taken out of the store before
// the call returns. (`ResourceLimiter` asks the host data to be `Send`.)
unsafe impl Send for BatchRun {}

/// What the commands of a batch call produced so far.
#[derive(Debug, Default)]
pub struct BatchOutput {
    /// Their outputs, back to back.
    pub out: Vec<u8>,
    /// Per command done: where its output ends in `out`, and the fuel it used.
    pub done: Vec<(usize, u64)>,
    /// Fuel the guest used after the last `command_done`, on the way out of the
    /// call (a budget of its own, reset by that `command_done`).
    pub tail_fuel: u64,
}

impl BatchOutput {
    /// Fuel of the whole call: every command and the way out.
    pub fn fuel_used(&self) -> u64 {
        self.done.iter().map(|&(_, fuel)| fuel).sum::<u64>() + self.tail_fuel
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes_max {
            self.memory_refused = true;
            return Ok(false);
        }
        // Even if the growth fails after this approval, a re-read of the size
        // is merely needless.
        self.memory_grew = true;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Only instantiation creates table elements (`table.grow` is refused
        // at load).
        Ok(desired <= self.table_elements_max)
    }
}

/// A host function's deterministic trap (a guest passed a bad pointer).
#[derive(Debug)]
struct HostTrap(&'static str);

impl std::fmt::Display for HostTrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for HostTrap {}

pub fn linker(engine: &wasmtime::Engine) -> Linker<HostState> {
    let mut linker = Linker::new(engine);
    linker
        .func_wrap(
            IMPORT_MODULE,
            IMPORT_LOG,
            |mut caller: Caller<'_, HostState>, ptr: i32, len: i32| {
                let Some(wasmtime::Extern::Memory(memory)) = caller.get_export(EXPORT_MEMORY)
                else {
                    return Err(wasmtime::Error::new(HostTrap(
                        "out of bounds memory access",
                    )));
                };
                let (data, host) = memory.data_and_store_mut(&mut caller);
                let Some(bytes) = guest_slice(data, ptr as u32, len as u32) else {
                    return Err(wasmtime::Error::new(HostTrap(
                        "out of bounds memory access",
                    )));
                };
                if let GuestLog::Stderr = host.log {
                    eprintln!("guest log: {}", String::from_utf8_lossy(bytes));
                }
                Ok(())
            },
        )
        .expect("defining paxwasm.log");
    linker
        .func_wrap(
            IMPORT_MODULE,
            IMPORT_ENTRY_TIME_MS,
            |caller: Caller<'_, HostState>| caller.data().entry.time_ms,
        )
        .expect("defining paxwasm.entry_time_ms");
    linker
        .func_wrap(
            IMPORT_MODULE,
            IMPORT_ENTRY_SEED,
            |caller: Caller<'_, HostState>| caller.data().entry.seed as i64,
        )
        .expect("defining paxwasm.entry_seed");
    linker
        .func_wrap(IMPORT_MODULE, IMPORT_COMMAND_DONE, command_done)
        .expect("defining paxwasm.command_done");
    linker
}

/// `paxwasm.command_done(ptr, len) -> stop`: one command of a batch is done and its
/// output is at `ptr`. Copies the output out, notes the fuel the command used and
/// gives the next command a fresh budget, as the per-command path does between
/// calls. Traps (failing the whole batch, which the machine then applies command
/// by command) outside a batch, after the last command, or on an output that is
/// too large or outside memory.
fn command_done(mut caller: Caller<'_, HostState>, ptr: i32, len: i32) -> wasmtime::Result<i32> {
    let fuel_left = caller.get_fuel()?;
    let host = caller.data();
    let Some(run) = host.batch.as_ref() else {
        return Err(wasmtime::Error::new(HostTrap(
            "command_done outside a batch",
        )));
    };
    let (memory, grew) = (run.memory, host.memory_grew);
    // The limiter approved a growth during this call: the size is read again
    // (the flag stays set for the instance, which caches the size too).
    let grown_size = grew.then(|| memory.data_size(&caller));
    let host = caller.data_mut();
    let run = host.batch.as_mut().expect("checked above");
    if let Some(size) = grown_size {
        run.memory_size = size;
    }
    if run.output.done.len() >= run.commands {
        return Err(wasmtime::Error::new(HostTrap(
            "command_done after the last command of the batch",
        )));
    }
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    if len > run.output_bytes_max {
        return Err(wasmtime::Error::new(HostTrap("output too large")));
    }
    if start
        .checked_add(len)
        .is_none_or(|end| end > run.memory_size)
    {
        return Err(wasmtime::Error::new(HostTrap(
            "out of bounds memory access",
        )));
    }
    // SAFETY: `memory_base` and `memory_size` describe this instance's linear
    // memory as it is now (memory never moves, and a growth was accounted for
    // above); the range was checked to lie inside it; no other reference into
    // memory is alive while the host function runs.
    let output = unsafe { std::slice::from_raw_parts(run.memory_base.add(start), len) };
    let done = &mut run.output;
    done.out.extend_from_slice(output);
    done.done.push((done.out.len(), run.budget - fuel_left));
    let stop = done.done.len() == run.commands;
    let budget = run.budget;
    host.memory_refused = false;
    caller.set_fuel(budget)?;
    Ok(i32::from(stop))
}

fn guest_slice(memory: &[u8], ptr: u32, len: u32) -> Option<&[u8]> {
    let start = ptr as usize;
    memory.get(start..start.checked_add(len as usize)?)
}

/// The address of the buffer the input descriptor at `at` names, if the
/// descriptor lies in memory, the buffer holds at least `len` bytes and lies
/// in memory too. Whatever the guest stored there, the host only writes
/// inside linear memory; a descriptor that does not qualify means "call
/// `paxwasm_alloc`", which every replica decides alike (it is state).
fn described_buffer(memory: &[u8], at: u32, len: u32) -> Option<u32> {
    let descriptor = guest_slice(memory, at, INPUT_DESCRIPTOR_BYTES)?;
    let ptr = u32::from_le_bytes(descriptor[..4].try_into().unwrap());
    let capacity = u32::from_le_bytes(descriptor[4..].try_into().unwrap());
    if len > capacity {
        return None;
    }
    guest_slice(memory, ptr, len)?;
    Some(ptr)
}

/// A live instance and its typed entry points.
pub struct Instance {
    pub store: Store<HostState>,
    pub memory: Memory,
    /// Start of linear memory, read once: the engine never moves a memory
    /// (`memory_may_move(false)`) and the host-owned `MemfdMemory` maps its
    /// whole capacity at creation, so the address is fixed for the
    /// instance's life. Spares the calls a store lookup per memory access.
    memory_base: *mut u8,
    /// Accessible bytes at `memory_base` as of the last growth the limiter
    /// approved (see [`HostState::memory_grew`]).
    memory_size: usize,
    alloc: TypedFunc<i32, i32>,
    apply: TypedFunc<(i32, i32), i64>,
    query: Option<TypedFunc<(i32, i32), i64>>,
    init: Option<TypedFunc<(), ()>>,
    start: Option<TypedFunc<(), ()>>,
    export_state: Option<TypedFunc<(), i64>>,
    import_state: Option<TypedFunc<(i32, i32), ()>>,
    apply_batch: Option<TypedFunc<(i32, i32), ()>>,
    /// Address of the guest's input descriptor, if it exports one
    /// (`paxwasm_input_buffer`, an immutable global: read once).
    input_descriptor: Option<u32>,
    globals: Vec<(Global, GlobalKind)>,
}

// SAFETY: `memory_base` (the one field that is not `Send` by itself) points
// into the memory owned by `store`, which moves along with it; it is only
// dereferenced through `&mut self` (`guest_memory`), so no two threads can use
// it at once. The store's `HostState::batch` holds the same pointer only while
// `call_batch` runs (it is taken out before that returns).
unsafe impl Send for Instance {}

/// Bytes of the input descriptor: buffer address (u32 LE), capacity (u32 LE).
const INPUT_DESCRIPTOR_BYTES: u32 = 8;

/// Which guest function takes an input buffer and returns an output buffer.
#[derive(Clone, Copy, Debug)]
pub enum Call {
    Apply,
    Query,
}

impl Instance {
    /// Instantiates without running any guest code (the start function was
    /// turned into an export at load). Data segments are written into memory.
    pub fn new(
        pre: &InstancePre<HostState>,
        checked: &CheckedModule,
        host: HostState,
    ) -> wasmtime::Result<Instance> {
        let mut store = Store::new(pre.module().engine(), host);
        store.limiter(|host| host as &mut dyn ResourceLimiter);
        // Instantiation runs no guest code (the start function is an export
        // now), but wasmtime meters the evaluation of data segment offsets.
        store.set_fuel(INSTANTIATION_FUEL)?;
        let instance = pre.instantiate(&mut store)?;
        let memory = instance
            .get_memory(&mut store, EXPORT_MEMORY)
            .expect("checked at load");
        store.data_mut().memory_grew = false;
        let (memory_base, memory_size) = (memory.data_ptr(&store), memory.data_size(&store));
        let globals = checked
            .global_exports
            .iter()
            .zip(&checked.global_kinds)
            .map(|(name, kind)| {
                (
                    instance.get_global(&mut store, name).expect("instrumented"),
                    *kind,
                )
            })
            .collect();
        let input_descriptor = if checked.has_input_buffer {
            let global = instance
                .get_global(&mut store, EXPORT_INPUT_BUFFER)
                .expect("checked at load");
            match global.get(&mut store) {
                Val::I32(address) => Some(address as u32),
                other => unreachable!("checked at load to be an i32 global: {other:?}"),
            }
        } else {
            None
        };
        Ok(Instance {
            memory_base,
            memory_size,
            input_descriptor,
            alloc: instance.get_typed_func(&mut store, EXPORT_ALLOC)?,
            apply: instance.get_typed_func(&mut store, EXPORT_APPLY)?,
            query: optional(
                checked.has_query,
                instance.get_typed_func(&mut store, EXPORT_QUERY),
            )?,
            init: optional(
                checked.has_init,
                instance.get_typed_func(&mut store, EXPORT_INIT),
            )?,
            start: optional(
                checked.has_start,
                instance.get_typed_func(&mut store, START_EXPORT),
            )?,
            export_state: optional(
                checked.has_export_state,
                instance.get_typed_func(&mut store, EXPORT_EXPORT_STATE),
            )?,
            import_state: optional(
                checked.has_import_state,
                instance.get_typed_func(&mut store, EXPORT_IMPORT_STATE),
            )?,
            apply_batch: optional(
                checked.has_apply_batch,
                instance.get_typed_func(&mut store, EXPORT_APPLY_BATCH),
            )?,
            memory,
            globals,
            store,
        })
    }

    pub fn memory_bytes(&self) -> usize {
        self.memory.data_size(&self.store)
    }

    pub fn memory_ptr(&self) -> *mut u8 {
        self.memory.data_ptr(&self.store)
    }

    pub fn memory(&self) -> &[u8] {
        self.memory.data(&self.store)
    }

    /// Grows memory from the host to exactly `bytes` (used when rebuilding an
    /// instance over committed state). Panics if that is impossible: the size
    /// was reached before under the same cap.
    pub fn grow_to(&mut self, bytes: usize) {
        let current = self.memory_bytes();
        assert!(bytes >= current && bytes.is_multiple_of(super::module::WASM_PAGE_BYTES as usize));
        let pages = ((bytes - current) as u64) / super::module::WASM_PAGE_BYTES;
        if pages > 0 {
            self.memory
                .grow(&mut self.store, pages)
                .expect("regrowing memory to a size it had before");
        }
        self.note_growth();
    }

    /// Re-reads the memory size if the limiter approved a growth since the
    /// last read.
    #[inline]
    fn note_growth(&mut self) {
        let host = self.store.data_mut();
        if host.memory_grew {
            host.memory_grew = false;
            self.memory_size = self.memory.data_size(&self.store);
        }
    }

    /// Linear memory as a slice, without wasmtime's store lookup: the cached
    /// base and a size re-read only after the limiter approved a growth.
    #[inline]
    fn guest_memory(&mut self) -> &mut [u8] {
        self.note_growth();
        debug_assert_eq!(self.memory_base, self.memory.data_ptr(&self.store));
        debug_assert_eq!(self.memory_size, self.memory.data_size(&self.store));
        // SAFETY: `memory_base` is this instance's memory, which never moves
        // (see the field). `memory_size` is its current size: memory never
        // shrinks, and every growth, by the guest or the host, passes the
        // store's limiter first, which sets `memory_grew`, handled above (the
        // debug assertions check both). No guest code runs while the slice
        // lives (it borrows `self`, and so the store, mutably), and wasmtime
        // holds no reference into linear memory between calls.
        unsafe { std::slice::from_raw_parts_mut(self.memory_base, self.memory_size) }
    }

    pub fn globals(&mut self) -> Vec<GlobalValue> {
        let mut values = Vec::with_capacity(self.globals.len());
        for (global, kind) in &self.globals {
            let bits = match global.get(&mut self.store) {
                Val::I32(v) => v as u32 as u128,
                Val::I64(v) => v as u64 as u128,
                Val::F32(v) => v as u128,
                Val::F64(v) => v as u128,
                Val::V128(v) => v.as_u128(),
                other => unreachable!("mutable reference globals are refused at load: {other:?}"),
            };
            values.push(GlobalValue { kind: *kind, bits });
        }
        values
    }

    pub fn set_globals(&mut self, values: &[GlobalValue]) {
        assert_eq!(values.len(), self.globals.len());
        for ((global, kind), value) in self.globals.iter().zip(values) {
            assert_eq!(*kind, value.kind);
            let val = match kind {
                GlobalKind::I32 => Val::I32(value.bits as u32 as i32),
                GlobalKind::I64 => Val::I64(value.bits as u64 as i64),
                GlobalKind::F32 => Val::F32(value.bits as u32),
                GlobalKind::F64 => Val::F64(value.bits as u64),
                GlobalKind::V128 => Val::V128(value.bits.into()),
            };
            global
                .set(&mut self.store, val)
                .expect("global types checked at load");
        }
    }

    fn begin(&mut self, entry: EntryContext, fuel: u64) {
        let host = self.store.data_mut();
        host.entry = entry;
        host.memory_refused = false;
        self.store.set_fuel(fuel).expect("fuel metering is on");
    }

    fn fuel_used(&self, budget: u64) -> u64 {
        budget - self.store.get_fuel().expect("fuel metering is on")
    }

    fn canonical(&self, error: wasmtime::Error) -> ApplyError {
        canonical_error(error, self.store.data().memory_refused)
    }

    /// Runs `paxwasm_alloc` + `paxwasm_apply`/`paxwasm_query` on `input` with a
    /// budget of `fuel`, appending the output (at most `output_bytes_max`) to
    /// `out`. Returns the fuel consumed.
    #[inline(always)]
    pub fn call(
        &mut self,
        which: Call,
        input: &[u8],
        entry: EntryContext,
        fuel: u64,
        output_bytes_max: usize,
        out: &mut Vec<u8>,
    ) -> Result<u64, ApplyError> {
        if let Call::Query = which {
            if self.query.is_none() {
                return Err(ApplyError::MissingExport(EXPORT_QUERY));
            }
        }
        self.begin(entry, fuel);
        let ptr = self.write_input(input)?;
        let args = (ptr as i32, input.len() as i32);
        let packed = match which {
            Call::Apply => self.apply.call(&mut self.store, args),
            Call::Query => self
                .query
                .as_ref()
                .expect("checked above")
                .call(&mut self.store, args),
        }
        .map_err(|e| self.canonical(e))?;
        self.read_output(packed, output_bytes_max, out)?;
        Ok(self.fuel_used(fuel))
    }

    /// Whether the module takes batches (`paxwasm_apply_batch`).
    pub fn takes_batches(&self) -> bool {
        self.apply_batch.is_some()
    }

    /// Runs `paxwasm_apply_batch` on `frames`, `commands` commands framed as
    /// `[u32 LE length][bytes]`, each with a budget of `fuel`, into `output`
    /// (cleared first). `Ok` only when the guest did every
    /// command and returned: anything else fails the whole batch, and what the
    /// call wrote must be rolled back.
    pub fn call_batch(
        &mut self,
        frames: &[u8],
        commands: usize,
        entry: EntryContext,
        fuel: u64,
        output_bytes_max: usize,
        output: &mut BatchOutput,
    ) -> Result<(), ApplyError> {
        let apply_batch = self
            .apply_batch
            .clone()
            .ok_or(ApplyError::MissingExport(EXPORT_APPLY_BATCH))?;
        self.begin(entry, fuel);
        let ptr = self.write_input(frames)?;
        output.out.clear();
        output.done.clear();
        output.tail_fuel = 0;
        self.store.data_mut().batch = Some(BatchRun {
            commands,
            budget: fuel,
            output_bytes_max,
            memory: self.memory,
            memory_base: self.memory_base,
            memory_size: self.memory_size,
            output: std::mem::take(output),
        });
        let called = apply_batch.call(&mut self.store, (ptr as i32, frames.len() as i32));
        *output = self
            .store
            .data_mut()
            .batch
            .take()
            .expect("set above")
            .output;
        called.map_err(|e| self.canonical(e))?;
        if output.done.len() != commands {
            return Err(ApplyError::Trap(
                "paxwasm_apply_batch returned before the last command",
            ));
        }
        // What runs after the last command counts too: the replay log's fuel
        // bounds how long a rollback replays.
        output.tail_fuel = self.fuel_used(fuel);
        Ok(())
    }

    /// Puts `input` into guest memory and returns its address: into the
    /// buffer the guest's input descriptor names when it fits (no guest
    /// call), else into a buffer from `paxwasm_alloc`.
    #[inline(always)]
    fn write_input(&mut self, input: &[u8]) -> Result<u32, ApplyError> {
        let len = i32::try_from(input.len()).map_err(|_| ApplyError::InputTooLarge)?;
        if let Some(at) = self.input_descriptor {
            let memory = self.guest_memory();
            if let Some(ptr) = described_buffer(memory, at, len as u32) {
                let start = ptr as usize;
                memory[start..start + input.len()].copy_from_slice(input);
                return Ok(ptr);
            }
        }
        let ptr = self
            .alloc
            .call(&mut self.store, len)
            .map_err(|e| self.canonical(e))? as u32;
        let memory = self.guest_memory();
        let start = ptr as usize;
        match memory.get_mut(start..start + input.len()) {
            Some(buffer) => buffer.copy_from_slice(input),
            None => return Err(ApplyError::Trap("out of bounds memory access")),
        }
        Ok(ptr)
    }

    #[inline(always)]
    fn read_output(
        &mut self,
        packed: i64,
        output_bytes_max: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), ApplyError> {
        let ptr = (packed as u64 >> 32) as u32;
        let len = packed as u64 as u32;
        if len as usize > output_bytes_max {
            return Err(ApplyError::OutputTooLarge);
        }
        match guest_slice(self.guest_memory(), ptr, len) {
            Some(bytes) => out.extend_from_slice(bytes),
            None => return Err(ApplyError::Trap("out of bounds memory access")),
        }
        Ok(())
    }

    /// Runs the former start function (if any) and then `paxwasm_init` (if
    /// asked and present): the install of a module with empty state.
    pub fn run_start(
        &mut self,
        entry: EntryContext,
        fuel: u64,
        with_init: bool,
    ) -> Result<(), ApplyError> {
        self.begin(entry, fuel);
        if let Some(start) = &self.start {
            start
                .call(&mut self.store, ())
                .map_err(|e| self.canonical(e))?;
        }
        if with_init {
            if let Some(init) = &self.init {
                init.call(&mut self.store, ())
                    .map_err(|e| self.canonical(e))?;
            }
        }
        Ok(())
    }

    /// Calls `paxwasm_export_state` and returns a copy of its bytes.
    pub fn export_state(
        &mut self,
        entry: EntryContext,
        fuel: u64,
        bytes_max: usize,
    ) -> Result<Vec<u8>, ApplyError> {
        let func = self
            .export_state
            .clone()
            .ok_or(ApplyError::MissingExport(EXPORT_EXPORT_STATE))?;
        self.begin(entry, fuel);
        let packed = func
            .call(&mut self.store, ())
            .map_err(|e| self.canonical(e))?;
        let mut out = Vec::new();
        self.read_output(packed, bytes_max, &mut out)?;
        Ok(out)
    }

    /// Calls `paxwasm_import_state` with `state` (buffer from `paxwasm_alloc`).
    pub fn import_state(
        &mut self,
        state: &[u8],
        entry: EntryContext,
        fuel: u64,
    ) -> Result<(), ApplyError> {
        let func = self
            .import_state
            .clone()
            .ok_or(ApplyError::MissingExport(EXPORT_IMPORT_STATE))?;
        self.begin(entry, fuel);
        let ptr = self.write_input(state)?;
        func.call(&mut self.store, (ptr as i32, state.len() as i32))
            .map_err(|e| self.canonical(e))
    }
}

fn optional<T>(present: bool, func: wasmtime::Result<T>) -> wasmtime::Result<Option<T>> {
    if present {
        func.map(Some)
    } else {
        Ok(None)
    }
}

/// Maps a wasmtime error from a guest call to its canonical, replicated form:
/// the kind only, never a backtrace or a host message.
pub fn canonical_error(error: wasmtime::Error, memory_refused: bool) -> ApplyError {
    if let Some(trap) = error.downcast_ref::<Trap>() {
        if *trap == Trap::OutOfFuel {
            return if memory_refused {
                ApplyError::MemoryLimitExceeded
            } else {
                ApplyError::FuelExhausted
            };
        }
        if memory_refused {
            return ApplyError::MemoryLimitExceeded;
        }
        return ApplyError::Trap(match trap {
            Trap::StackOverflow => "call stack exhausted",
            Trap::MemoryOutOfBounds => "out of bounds memory access",
            Trap::HeapMisaligned => "misaligned memory access",
            Trap::TableOutOfBounds => "undefined element",
            Trap::IndirectCallToNull => "uninitialized element",
            Trap::BadSignature => "indirect call type mismatch",
            Trap::IntegerOverflow => "integer overflow",
            Trap::IntegerDivisionByZero => "integer divide by zero",
            Trap::BadConversionToInteger => "invalid conversion to integer",
            Trap::UnreachableCodeReached => "unreachable",
            Trap::NullReference => "null reference",
            _ => "other",
        });
    }
    if let Some(HostTrap(kind)) = error.downcast_ref::<HostTrap>() {
        return ApplyError::Trap(kind);
    }
    if memory_refused {
        return ApplyError::MemoryLimitExceeded;
    }
    ApplyError::Trap("other")
}
