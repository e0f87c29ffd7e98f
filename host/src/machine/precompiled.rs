//! Modules compiled ahead of their install: `Machine::compile_module` does the costly
//! part of a load (check, instrument, Cranelift) on any thread, with no machine at
//! hand, so that a replica can install or upgrade at a log slot without compiling on
//! the thread that applies the log.
//!
//! Every machine has its own `Engine` (its memory creator is per machine), so the
//! compiled code travels as `Engine::precompile_module` output and is deserialized into
//! the target machine's engine, which has the same configuration.

use std::sync::Arc;

use wasmtime::{Engine, Linker};

use super::instance::{self, HostState};
use super::memory::MemfdCreator;
use super::module::{self, CheckedModule};
use super::{engine, host_failure, link, LoadError, Loaded, Machine, MachineConfig};
use super::{Migration, ModuleId, UpgradeError};

/// A checked, instrumented and compiled module, ready for `Machine::load_compiled` or
/// `Machine::upgrade_compiled` under the same `MachineConfig`.
pub struct CompiledModule {
    checked: CheckedModule,
    /// `Engine::precompile_module` of the instrumented bytes.
    artifact: Vec<u8>,
}

impl std::fmt::Debug for CompiledModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledModule")
            .field("id", &self.checked.id)
            .field("artifact_bytes", &self.artifact.len())
            .finish()
    }
}

impl CompiledModule {
    pub fn id(&self) -> ModuleId {
        self.checked.id
    }

    fn loaded(
        &self,
        engine: &Engine,
        linker: &Linker<HostState>,
        config: &MachineConfig,
    ) -> Result<Loaded, LoadError> {
        // SAFETY: `artifact` was produced in this process by `precompile_module` of an
        // engine built by `engine()` from a config that only differs in the memory
        // creator; it never left memory, so it is exactly what wasmtime wrote.
        let module = unsafe { wasmtime::Module::deserialize(engine, &self.artifact) }
            .unwrap_or_else(|e| host_failure("deserializing a precompiled module", e));
        link(linker, self.checked.clone(), module, config)
    }
}

impl Machine {
    /// The costly part of `load`: checks, instruments and compiles `module_bytes`.
    /// Blocking; needs no machine, so it runs on any thread.
    pub fn compile_module(
        module_bytes: &[u8],
        config: &MachineConfig,
    ) -> Result<CompiledModule, LoadError> {
        let checked = module::check(module_bytes, config)?;
        let engine = engine(config, Arc::new(MemfdCreator::default()));
        let artifact = engine
            .precompile_module(&checked.instrumented)
            .map_err(|e| LoadError(format!("compilation failed: {e}")))?;
        Ok(CompiledModule { checked, artifact })
    }

    /// `load` of a compiled module: links it and starts it with empty state.
    pub fn load_compiled(
        compiled: &CompiledModule,
        config: &MachineConfig,
    ) -> Result<Machine, LoadError> {
        let creator = Arc::new(MemfdCreator::default());
        let engine = engine(config, creator.clone());
        let linker = instance::linker(&engine);
        let loaded = compiled.loaded(&engine, &linker, config)?;
        Machine::start(config, engine, linker, creator, loaded)
    }

    /// `upgrade` to a compiled module; the same outcomes, without compiling.
    pub fn upgrade_compiled(
        &mut self,
        compiled: &CompiledModule,
        migration: Migration,
    ) -> Result<(), UpgradeError> {
        let loaded = compiled
            .loaded(&self.engine, &self.linker, &self.config)
            .map_err(UpgradeError::Refused)?;
        self.switch(loaded, migration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compiled_module_loads_and_upgrades_like_its_bytes() {
        let config = MachineConfig::default();
        let kv = std::fs::read(crate::examples::example_module("kv").unwrap()).unwrap();
        let kv_v2 = std::fs::read(crate::examples::example_module("kv_v2").unwrap()).unwrap();
        let compiled = Machine::compile_module(&kv, &config).unwrap();
        assert_eq!(compiled.id(), ModuleId::of(&kv));
        let mut by_bytes = Machine::load(&kv, &config).unwrap();
        let mut precompiled = Machine::load_compiled(&compiled, &config).unwrap();
        let entry = super::super::EntryContext::default();
        for machine in [&mut by_bytes, &mut precompiled] {
            machine.apply(b"put a 1", entry).unwrap();
        }
        assert_eq!(by_bytes.state_hash(), precompiled.state_hash());
        let v2 = Machine::compile_module(&kv_v2, &config).unwrap();
        by_bytes.upgrade(&kv_v2, Migration::Migrate).unwrap();
        precompiled
            .upgrade_compiled(&v2, Migration::Migrate)
            .unwrap();
        assert_eq!(by_bytes.module_id(), precompiled.module_id());
        assert_eq!(by_bytes.state_hash(), precompiled.state_hash());
        assert!(Machine::compile_module(b"not wasm", &config).is_err());
    }
}
