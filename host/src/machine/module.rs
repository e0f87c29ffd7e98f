//! Load-time checks and instrumentation of a guest module.
//!
//! Everything a replica refuses, it refuses here, before any code runs, with an
//! error that names the reason. The check is a pure function of the module bytes
//! and the [`MachineConfig`], so every replica accepts or refuses the same module.
//!
//! Instrumentation rewrites the module so the host can see and set all of its
//! state: every mutable global is exported under a reserved name, and the start
//! function is removed from the start section and exported instead, so the host
//! decides when it runs (on a fresh install, never on restore).

use sha2::{Digest, Sha256};
use wasmparser::{
    CompositeInnerType, ExternalKind, FuncType, Operator, Parser, Payload, TypeRef, ValType,
    Validator, WasmFeatures,
};

use super::MachineConfig;

/// The import module every host function lives in.
pub const IMPORT_MODULE: &str = "paxwasm";
/// Prefix of the exports the instrumentation adds; guests may not use it.
pub const RESERVED_EXPORT_PREFIX: &str = "paxwasm.";
/// Export name of the mutable global with index `n` is this prefix plus `n`.
pub const GLOBAL_EXPORT_PREFIX: &str = "paxwasm.global.";
/// Export name of the module's former start function.
pub const START_EXPORT: &str = "paxwasm.start";

pub const EXPORT_MEMORY: &str = "memory";
pub const EXPORT_ALLOC: &str = "paxwasm_alloc";
pub const EXPORT_APPLY: &str = "paxwasm_apply";
pub const EXPORT_QUERY: &str = "paxwasm_query";
pub const EXPORT_INIT: &str = "paxwasm_init";
pub const EXPORT_EXPORT_STATE: &str = "paxwasm_export_state";
pub const EXPORT_IMPORT_STATE: &str = "paxwasm_import_state";
/// Optional: applies a batch of framed commands, handing each result to
/// `IMPORT_COMMAND_DONE` (ABI.md, "Batches").
pub const EXPORT_APPLY_BATCH: &str = "paxwasm_apply_batch";
/// Optional immutable i32 global: the address of the guest's input
/// descriptor (ABI.md, "Input buffer"), which lets the host skip
/// `paxwasm_alloc` when the input fits the buffer it names.
pub const EXPORT_INPUT_BUFFER: &str = "paxwasm_input_buffer";

pub const IMPORT_LOG: &str = "log";
pub const IMPORT_ENTRY_TIME_MS: &str = "entry_time_ms";
pub const IMPORT_ENTRY_SEED: &str = "entry_seed";
pub const IMPORT_COMMAND_DONE: &str = "command_done";

/// Wasm page size in bytes (the only page size allowed: custom page sizes are off).
pub const WASM_PAGE_BYTES: u64 = 65_536;

/// The Wasm features a guest may use. Everything here is deterministic under
/// NaN canonicalization; threads, relaxed SIMD, multiple or 64-bit memories,
/// exceptions and GC are refused. The engine enables exactly this set too.
pub fn allowed_features() -> WasmFeatures {
    WasmFeatures::MUTABLE_GLOBAL
        | WasmFeatures::SATURATING_FLOAT_TO_INT
        | WasmFeatures::SIGN_EXTENSION
        | WasmFeatures::REFERENCE_TYPES
        | WasmFeatures::MULTI_VALUE
        | WasmFeatures::BULK_MEMORY
        | WasmFeatures::SIMD
        | WasmFeatures::TAIL_CALL
        | WasmFeatures::FLOATS
        | WasmFeatures::EXTENDED_CONST
        | WasmFeatures::GC_TYPES
}

/// Identity of a module: sha256 of its bytes as the operator supplied them
/// (before instrumentation).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModuleId(pub [u8; 32]);

impl ModuleId {
    pub fn of(bytes: &[u8]) -> ModuleId {
        ModuleId(Sha256::digest(bytes).into())
    }
}

impl std::fmt::Display for ModuleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for ModuleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The type of one mutable global, as kept in snapshots and the state hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalKind {
    I32,
    I64,
    F32,
    F64,
    V128,
}

impl GlobalKind {
    pub fn tag(self) -> u8 {
        match self {
            GlobalKind::I32 => 0,
            GlobalKind::I64 => 1,
            GlobalKind::F32 => 2,
            GlobalKind::F64 => 3,
            GlobalKind::V128 => 4,
        }
    }
}

/// What the machine needs to know about a checked module.
#[derive(Clone, Debug)]
pub struct CheckedModule {
    pub id: ModuleId,
    /// The instrumented bytes that are compiled.
    pub instrumented: Vec<u8>,
    /// Mutable globals in index order; global `i` of this list is exported as
    /// `GLOBAL_EXPORT_PREFIX` + its module index, listed in `global_exports`.
    pub global_kinds: Vec<GlobalKind>,
    pub global_exports: Vec<String>,
    pub has_start: bool,
    pub has_query: bool,
    pub has_init: bool,
    pub has_export_state: bool,
    pub has_import_state: bool,
    pub has_input_buffer: bool,
    /// Exports `paxwasm_apply_batch` (and so imports `paxwasm.command_done`).
    pub has_apply_batch: bool,
}

/// Why a module was refused at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError(pub String);

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "module refused: {}", self.0)
    }
}

impl std::error::Error for LoadError {}

fn refuse<T>(reason: impl Into<String>) -> Result<T, LoadError> {
    Err(LoadError(reason.into()))
}

fn signature(params: &[ValType], results: &[ValType]) -> String {
    let list = |types: &[ValType]| {
        types
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!("({}) -> ({})", list(params), list(results))
}

fn expect_signature(
    what: &str,
    ty: &FuncType,
    params: &[ValType],
    results: &[ValType],
) -> Result<(), LoadError> {
    if ty.params() == params && ty.results() == results {
        return Ok(());
    }
    refuse(format!(
        "{what} has signature {}, expected {}",
        signature(ty.params(), ty.results()),
        signature(params, results)
    ))
}

/// Checks `bytes` against the guest ABI and `config`'s limits and returns the
/// instrumented module.
pub fn check(bytes: &[u8], config: &MachineConfig) -> Result<CheckedModule, LoadError> {
    if bytes.len() as u64 > config.module_bytes_max {
        return refuse(format!(
            "module is {} bytes, more than module_bytes_max = {}",
            bytes.len(),
            config.module_bytes_max
        ));
    }
    if wasmparser::Parser::is_component(bytes) {
        return refuse("a component was given; a guest must be a core Wasm module");
    }
    let mut validator = Validator::new_with_features(allowed_features());
    if let Err(e) = validator.validate_all(bytes) {
        return refuse(format!(
            "invalid Wasm or a feature that is not allowed: {e}"
        ));
    }

    let mut types: Vec<Option<FuncType>> = Vec::new();
    let mut func_types: Vec<u32> = Vec::new(); // type index per function (imports first)
    let mut imported_funcs = 0u32;
    let mut imports_command_done = false;
    let mut memories = 0u32;
    let mut global_kinds = Vec::new();
    let mut global_indices = Vec::new();
    let mut global_count = 0u32;
    // (type, mutable) of every global, in index order (none are imported).
    let mut global_types: Vec<(ValType, bool)> = Vec::new();
    let mut exports: Vec<(String, ExternalKind, u32)> = Vec::new();
    let mut start: Option<u32> = None;

    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| LoadError(format!("unreadable module: {e}")))?;
        match payload {
            Payload::TypeSection(reader) => {
                for group in reader {
                    let group = group.map_err(|e| LoadError(e.to_string()))?;
                    for sub in group.into_types() {
                        types.push(match sub.composite_type.inner {
                            CompositeInnerType::Func(f) => Some(f),
                            _ => None,
                        });
                    }
                }
            }
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import.map_err(|e| LoadError(e.to_string()))?;
                    let name = format!("{}.{}", import.module, import.name);
                    if import.module != IMPORT_MODULE {
                        return refuse(format!(
                            "import `{name}` is not allowed: imports may only come from module `{IMPORT_MODULE}`"
                        ));
                    }
                    let TypeRef::Func(type_index) = import.ty else {
                        return refuse(format!(
                            "import `{name}` is not allowed: only functions may be imported"
                        ));
                    };
                    let ty = func_type(&types, type_index)?;
                    match import.name {
                        IMPORT_LOG => expect_signature(&format!("import `{name}`"), ty, &[ValType::I32, ValType::I32], &[])?,
                        IMPORT_ENTRY_TIME_MS | IMPORT_ENTRY_SEED => {
                            expect_signature(&format!("import `{name}`"), ty, &[], &[ValType::I64])?
                        }
                        IMPORT_COMMAND_DONE => {
                            expect_signature(&format!("import `{name}`"), ty, &[ValType::I32, ValType::I32], &[ValType::I32])?;
                            imports_command_done = true;
                        }
                        _ => {
                            return refuse(format!(
                                "import `{name}` is unknown: the host offers only `{IMPORT_LOG}`, `{IMPORT_ENTRY_TIME_MS}`, `{IMPORT_ENTRY_SEED}` and `{IMPORT_COMMAND_DONE}`"
                            ))
                        }
                    }
                    func_types.push(type_index);
                    imported_funcs += 1;
                }
            }
            Payload::FunctionSection(reader) => {
                for type_index in reader {
                    func_types.push(type_index.map_err(|e| LoadError(e.to_string()))?);
                }
                if func_types.len() as u64 > config.functions_max {
                    return refuse(format!(
                        "module has {} functions, more than functions_max = {}",
                        func_types.len(),
                        config.functions_max
                    ));
                }
            }
            Payload::MemorySection(reader) => {
                for memory in reader {
                    let memory = memory.map_err(|e| LoadError(e.to_string()))?;
                    memories += 1;
                    if memory.initial > config.memory_initial_pages_max {
                        return refuse(format!(
                            "memory has {} initial pages, more than memory_initial_pages_max = {}",
                            memory.initial, config.memory_initial_pages_max
                        ));
                    }
                }
            }
            Payload::GlobalSection(reader) => {
                for global in reader {
                    let global = global.map_err(|e| LoadError(e.to_string()))?;
                    let index = global_count;
                    global_count += 1;
                    global_types.push((global.ty.content_type, global.ty.mutable));
                    if !global.ty.mutable {
                        continue;
                    }
                    let kind = match global.ty.content_type {
                        ValType::I32 => GlobalKind::I32,
                        ValType::I64 => GlobalKind::I64,
                        ValType::F32 => GlobalKind::F32,
                        ValType::F64 => GlobalKind::F64,
                        ValType::V128 => GlobalKind::V128,
                        ValType::Ref(_) => {
                            return refuse(format!(
                            "mutable global {index} holds a reference, which cannot be snapshotted"
                        ))
                        }
                    };
                    global_kinds.push(kind);
                    global_indices.push(index);
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    let export = export.map_err(|e| LoadError(e.to_string()))?;
                    if export.name.starts_with(RESERVED_EXPORT_PREFIX) {
                        return refuse(format!(
                            "export `{}` uses the reserved prefix `{RESERVED_EXPORT_PREFIX}`",
                            export.name
                        ));
                    }
                    exports.push((export.name.to_string(), export.kind, export.index));
                }
            }
            Payload::StartSection { func, .. } => start = Some(func),
            Payload::CodeSectionEntry(body) => {
                let mut ops = body
                    .get_operators_reader()
                    .map_err(|e| LoadError(e.to_string()))?;
                while !ops.eof() {
                    let op = ops.read().map_err(|e| LoadError(e.to_string()))?;
                    if let Some(name) = state_outside_memory(&op) {
                        return refuse(format!(
                            "instruction `{name}` changes table or segment state, which is not part of snapshots"
                        ));
                    }
                }
            }
            _ => {}
        }
    }

    if memories != 1 {
        return refuse(format!(
            "module defines {memories} memories, exactly one is required"
        ));
    }
    let find = |name: &str| exports.iter().find(|(n, _, _)| n == name);
    match find(EXPORT_MEMORY) {
        Some((_, ExternalKind::Memory, _)) => {}
        Some(_) => return refuse(format!("export `{EXPORT_MEMORY}` is not a memory")),
        None => return refuse(format!("the memory must be exported as `{EXPORT_MEMORY}`")),
    }
    let export_func = |name: &str,
                       required: bool,
                       params: &[ValType],
                       results: &[ValType]|
     -> Result<bool, LoadError> {
        match find(name) {
            None if required => refuse(format!("required export `{name}` is missing")),
            None => Ok(false),
            Some((_, ExternalKind::Func, index)) => {
                let type_index = func_types[*index as usize];
                expect_signature(
                    &format!("export `{name}`"),
                    func_type(&types, type_index)?,
                    params,
                    results,
                )?;
                Ok(true)
            }
            Some(_) => refuse(format!("export `{name}` is not a function")),
        }
    };
    use ValType::{I32, I64};
    export_func(EXPORT_ALLOC, true, &[I32], &[I32])?;
    export_func(EXPORT_APPLY, true, &[I32, I32], &[I64])?;
    let has_query = export_func(EXPORT_QUERY, false, &[I32, I32], &[I64])?;
    let has_init = export_func(EXPORT_INIT, false, &[], &[])?;
    let has_export_state = export_func(EXPORT_EXPORT_STATE, false, &[], &[I64])?;
    let has_import_state = export_func(EXPORT_IMPORT_STATE, false, &[I32, I32], &[])?;
    let has_apply_batch = export_func(EXPORT_APPLY_BATCH, false, &[I32, I32], &[])?;
    if has_apply_batch && !imports_command_done {
        return refuse(format!(
            "export `{EXPORT_APPLY_BATCH}` needs import `{IMPORT_MODULE}.{IMPORT_COMMAND_DONE}`: a batch hands each result to it"
        ));
    }
    let has_input_buffer = match find(EXPORT_INPUT_BUFFER) {
        None => false,
        Some((_, ExternalKind::Global, index))
            if global_types.get(*index as usize) == Some(&(I32, false)) =>
        {
            true
        }
        Some(_) => {
            return refuse(format!(
                "export `{EXPORT_INPUT_BUFFER}` must be an immutable i32 global (the address of the input descriptor)"
            ))
        }
    };
    let _ = imported_funcs;

    let global_exports: Vec<String> = global_indices
        .iter()
        .map(|i| format!("{GLOBAL_EXPORT_PREFIX}{i}"))
        .collect();
    let instrumented = instrument(bytes, &global_indices, &global_exports, start)?;
    Ok(CheckedModule {
        id: ModuleId::of(bytes),
        instrumented,
        global_kinds,
        global_exports,
        has_start: start.is_some(),
        has_query,
        has_init,
        has_export_state,
        has_import_state,
        has_input_buffer,
        has_apply_batch,
    })
}

fn func_type(types: &[Option<FuncType>], index: u32) -> Result<&FuncType, LoadError> {
    match types.get(index as usize) {
        Some(Some(ty)) => Ok(ty),
        _ => refuse(format!("type {index} is not a function type")),
    }
}

/// Instructions that change instance state other than linear memory and
/// globals (tables, dropped segments). Snapshots cover memory and globals only,
/// so modules using these are refused. Rust and C toolchains do not emit them
/// for single-threaded code.
fn state_outside_memory(op: &Operator) -> Option<&'static str> {
    Some(match op {
        Operator::TableSet { .. } => "table.set",
        Operator::TableGrow { .. } => "table.grow",
        Operator::TableFill { .. } => "table.fill",
        Operator::TableCopy { .. } => "table.copy",
        Operator::TableInit { .. } => "table.init",
        Operator::ElemDrop { .. } => "elem.drop",
        Operator::DataDrop { .. } => "data.drop",
        _ => return None,
    })
}

/// Rewrites the module: the export section gains one export per mutable
/// global (and the start function); the start section is dropped. Every other
/// section is copied byte for byte.
fn instrument(
    bytes: &[u8],
    global_indices: &[u32],
    global_exports: &[String],
    start: Option<u32>,
) -> Result<Vec<u8>, LoadError> {
    let mut module = wasm_encoder::Module::new();
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| LoadError(e.to_string()))?;
        match &payload {
            Payload::ExportSection(reader) => {
                let mut section = wasm_encoder::ExportSection::new();
                for export in reader.clone() {
                    let export = export.map_err(|e| LoadError(e.to_string()))?;
                    let kind = match export.kind {
                        ExternalKind::Func | ExternalKind::FuncExact => {
                            wasm_encoder::ExportKind::Func
                        }
                        ExternalKind::Table => wasm_encoder::ExportKind::Table,
                        ExternalKind::Memory => wasm_encoder::ExportKind::Memory,
                        ExternalKind::Global => wasm_encoder::ExportKind::Global,
                        ExternalKind::Tag => wasm_encoder::ExportKind::Tag,
                    };
                    section.export(export.name, kind, export.index);
                }
                for (index, name) in global_indices.iter().zip(global_exports) {
                    section.export(name, wasm_encoder::ExportKind::Global, *index);
                }
                if let Some(func) = start {
                    section.export(START_EXPORT, wasm_encoder::ExportKind::Func, func);
                }
                module.section(&section);
            }
            Payload::StartSection { .. } => {}
            other => {
                if let Some((id, range)) = other.as_section() {
                    module.section(&wasm_encoder::RawSection {
                        id,
                        data: &bytes[range],
                    });
                }
            }
        }
    }
    Ok(module.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instrumentation_exports_mutable_globals_and_removes_the_start_section() {
        let bytes = wat::parse_str(
            r#"(module
                 (global $a (mut i32) (i32.const 1))
                 (global $b i64 (i64.const 2))
                 (global $c (mut f64) (f64.const 3))
                 (memory (export "memory") 1)
                 (func $start)
                 (start $start)
                 (func (export "paxwasm_alloc") (param i32) (result i32) (i32.const 0))
                 (func (export "paxwasm_apply") (param i32 i32) (result i64) (i64.const 0)))"#,
        )
        .unwrap();
        let checked = check(&bytes, &MachineConfig::default()).unwrap();
        assert_eq!(checked.id, ModuleId::of(&bytes));
        assert_eq!(checked.global_kinds, [GlobalKind::I32, GlobalKind::F64]);
        assert_eq!(
            checked.global_exports,
            ["paxwasm.global.0", "paxwasm.global.2"]
        );
        assert!(checked.has_start && !checked.has_query && !checked.has_init);
        let mut exports = Vec::new();
        for payload in Parser::new(0).parse_all(&checked.instrumented) {
            match payload.unwrap() {
                Payload::StartSection { .. } => panic!("start section kept"),
                Payload::ExportSection(reader) => {
                    for export in reader {
                        let export = export.unwrap();
                        exports.push((export.name.to_string(), export.index));
                    }
                }
                _ => {}
            }
        }
        let names: Vec<(&str, u32)> = exports.iter().map(|(n, i)| (n.as_str(), *i)).collect();
        assert_eq!(
            names,
            [
                ("memory", 0),
                ("paxwasm_alloc", 1),
                ("paxwasm_apply", 2),
                ("paxwasm.global.0", 0),
                ("paxwasm.global.2", 2),
                ("paxwasm.start", 0)
            ]
        );
        wasmparser::validate(&checked.instrumented).unwrap();
    }
}
