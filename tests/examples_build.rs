//! `paxwasm::examples` builds every example guest, and each module keeps the
//! guest ABI (guest-sdk/ABI.md): exactly the documented exports with their
//! signatures, imports only from `paxwasm`, one memory, valid Wasm.

use std::collections::BTreeMap;
use std::path::Path;

use paxwasm::examples::{example_module, example_names};
use wasmparser::{ExternalKind, FuncType, Parser, Payload, TypeRef, ValType};

/// A function signature as `(params) -> (results)`, comparable in tests.
type Sig = (Vec<ValType>, Vec<ValType>);

fn sig(params: &[ValType], results: &[ValType]) -> Sig {
    (params.to_vec(), results.to_vec())
}

/// What a module declares at its boundary.
#[derive(Debug, Default)]
struct Boundary {
    /// Function imports: (module, name) → signature. Non-function imports are
    /// recorded with an empty signature and a `!` prefix in the name.
    imports: BTreeMap<(String, String), Sig>,
    /// Function exports → signature.
    functions: BTreeMap<String, Sig>,
    /// Other exports → kind (and for globals, whether mutable).
    others: BTreeMap<String, String>,
    memories: usize,
}

fn boundary(module: &Path) -> Boundary {
    let bytes = std::fs::read(module).unwrap();
    wasmparser::validate(&bytes).unwrap_or_else(|e| panic!("{} is invalid: {e}", module.display()));

    let mut types: Vec<FuncType> = Vec::new();
    let mut func_types: Vec<u32> = Vec::new(); // imported functions first
    let mut globals_mutable: Vec<bool> = Vec::new();
    let mut exports: Vec<(String, ExternalKind, u32)> = Vec::new();
    let mut found = Boundary::default();
    for payload in Parser::new(0).parse_all(&bytes) {
        match payload.unwrap() {
            Payload::TypeSection(reader) => {
                for group in reader {
                    for sub_type in group.unwrap().into_types() {
                        types.push(sub_type.unwrap_func().clone());
                    }
                }
            }
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import.unwrap();
                    let key = (import.module.to_owned(), import.name.to_owned());
                    match import.ty {
                        TypeRef::Func(index) => {
                            func_types.push(index);
                            let ty = &types[index as usize];
                            found.imports.insert(key, sig(ty.params(), ty.results()));
                        }
                        other => {
                            found
                                .imports
                                .insert((key.0, format!("!{other:?}")), sig(&[], &[]));
                        }
                    }
                }
            }
            Payload::FunctionSection(reader) => {
                func_types.extend(reader.into_iter().map(Result::unwrap));
            }
            Payload::MemorySection(reader) => found.memories += reader.count() as usize,
            Payload::GlobalSection(reader) => {
                for global in reader {
                    globals_mutable.push(global.unwrap().ty.mutable);
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    let export = export.unwrap();
                    exports.push((export.name.to_owned(), export.kind, export.index));
                }
            }
            _ => {}
        }
    }
    for (name, kind, index) in exports {
        match kind {
            ExternalKind::Func => {
                let ty = &types[func_types[index as usize] as usize];
                found.functions.insert(name, sig(ty.params(), ty.results()));
            }
            ExternalKind::Global => {
                let mutable = globals_mutable[index as usize];
                found
                    .others
                    .insert(name, format!("global mutable={mutable}"));
            }
            other => {
                found.others.insert(name, format!("{other:?}"));
            }
        }
    }
    found
}

/// The exports ABI.md promises for each example.
fn expected_functions(example: &str) -> BTreeMap<String, Sig> {
    use ValType::{I32, I64};
    let mut functions = BTreeMap::from([
        ("paxwasm_alloc".to_owned(), sig(&[I32], &[I32])),
        ("paxwasm_apply".to_owned(), sig(&[I32, I32], &[I64])),
        ("paxwasm_query".to_owned(), sig(&[I32, I32], &[I64])),
        ("paxwasm_init".to_owned(), sig(&[], &[])),
        ("paxwasm_apply_batch".to_owned(), sig(&[I32, I32], &[])),
    ]);
    let migrates = match example {
        "kv" | "kv_v2" => true,
        "counter" | "bank" => false,
        other => panic!("no expectation for example {other}"),
    };
    if migrates {
        functions.insert("paxwasm_export_state".to_owned(), sig(&[], &[I64]));
        functions.insert("paxwasm_import_state".to_owned(), sig(&[I32, I32], &[]));
    }
    functions
}

#[test]
fn every_example_builds_and_keeps_the_abi() {
    use ValType::{I32, I64};
    let allowed_imports: BTreeMap<(String, String), Sig> = BTreeMap::from([
        (
            ("paxwasm".to_owned(), "log".to_owned()),
            sig(&[I32, I32], &[]),
        ),
        (
            ("paxwasm".to_owned(), "entry_time_ms".to_owned()),
            sig(&[], &[I64]),
        ),
        (
            ("paxwasm".to_owned(), "entry_seed".to_owned()),
            sig(&[], &[I64]),
        ),
        (
            ("paxwasm".to_owned(), "command_done".to_owned()),
            sig(&[I32, I32], &[I32]),
        ),
    ]);
    // rustc always exports these two immutable linker globals for
    // wasm32-unknown-unknown; ABI.md says the host ignores extra exports.
    // The SDK adds the input descriptor (ABI.md, "Input buffer").
    let toolchain_exports = BTreeMap::from([
        ("memory".to_owned(), "Memory".to_owned()),
        ("__data_end".to_owned(), "global mutable=false".to_owned()),
        ("__heap_base".to_owned(), "global mutable=false".to_owned()),
        (
            "paxwasm_input_buffer".to_owned(),
            "global mutable=false".to_owned(),
        ),
    ]);

    assert_eq!(example_names(), ["counter", "kv", "kv_v2", "bank"]);
    for &name in example_names() {
        let module = example_module(name).unwrap();
        assert_eq!(module.file_name().unwrap(), format!("{name}.wasm").as_str());
        let found = boundary(&module);
        assert_eq!(
            found.functions,
            expected_functions(name),
            "{name}: exported functions"
        );
        assert_eq!(found.others, toolchain_exports, "{name}: other exports");
        assert_eq!(found.memories, 1, "{name}: defines exactly one memory");
        for (import, signature) in &found.imports {
            assert_eq!(
                allowed_imports.get(import),
                Some(signature),
                "{name}: import {import:?}"
            );
        }
    }
}

#[test]
fn every_example_crate_is_listed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples-wasm");
    let mut crates: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    crates.sort();
    let mut listed: Vec<String> = example_names()
        .iter()
        .map(|name| name.to_string())
        .collect();
    listed.sort();
    assert_eq!(crates, listed);
}

#[test]
fn unknown_example_is_refused_by_name() {
    let error = example_module("nope").unwrap_err().to_string();
    assert!(error.contains("unknown example \"nope\""), "{error}");
}

#[test]
fn repeated_calls_return_the_same_module() {
    assert_eq!(example_module("kv").unwrap(), example_module("kv").unwrap());
}
