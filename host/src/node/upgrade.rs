//! Module upgrades through the log (see docs/notes/upgrade.md): module bytes travel as
//! bounded chunk entries into a replicated staging area, each replica compiles a
//! completely staged module on a background thread, and a small upgrade entry names the
//! module by sha256 at the slot where every replica switches.
//!
//! This file owns the envelope layouts of chunks and upgrades, the staging area (part of
//! the replicated state, so it is in snapshots) and the compile cache (local, not
//! replicated: it only saves time, never changes an outcome). It never decides whether
//! an upgrade succeeds; `app.rs` does that at the upgrade slot, deterministically.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::machine::{CompiledModule, Machine, MachineConfig, ModuleId};

/// Envelope kind of a module chunk: `2 | sha256 [32] | total_bytes u64 | offset u64 | data`.
pub const ENVELOPE_CHUNK: u8 = 2;
/// Envelope kind of an upgrade: `3 | migrate u8 | sha256 [32]`.
pub const ENVELOPE_UPGRADE: u8 = 3;
/// Module bytes per chunk entry: small enough that one entry never holds the log (or a
/// batch) for long, large enough that a several-MiB module takes few round trips.
pub const MODULE_CHUNK_BYTES: usize = 256 * 1024;
/// Compiled modules kept in the cache (the staged one, plus a few that finished and
/// were not installed yet); the oldest finished one is evicted first.
pub const COMPILED_MODULES_KEPT: usize = 4;
const CHUNK_HEAD_BYTES: usize = 32 + 8 + 8;

pub fn chunk_envelope(sha256: &[u8; 32], total_bytes: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + CHUNK_HEAD_BYTES + data.len());
    out.push(ENVELOPE_CHUNK);
    out.extend_from_slice(sha256);
    out.extend_from_slice(&total_bytes.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(data);
    out
}

pub fn upgrade_envelope(sha256: &[u8; 32], migrate: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + 32);
    out.push(ENVELOPE_UPGRADE);
    out.push(u8::from(migrate));
    out.extend_from_slice(sha256);
    out
}

/// A decoded chunk (the body after the kind byte).
pub struct Chunk<'a> {
    pub sha256: [u8; 32],
    pub total_bytes: u64,
    pub offset: u64,
    pub data: &'a [u8],
}

pub fn decode_chunk(body: &[u8]) -> Option<Chunk<'_>> {
    if body.len() < CHUNK_HEAD_BYTES {
        return None;
    }
    let (head, data) = body.split_at(CHUNK_HEAD_BYTES);
    Some(Chunk {
        sha256: head[..32].try_into().expect("32 bytes"),
        total_bytes: u64::from_le_bytes(head[32..40].try_into().expect("8 bytes")),
        offset: u64::from_le_bytes(head[40..48].try_into().expect("8 bytes")),
        data,
    })
}

/// `(migrate, sha256)` of an upgrade body.
pub fn decode_upgrade(body: &[u8]) -> Option<(bool, [u8; 32])> {
    match body.split_first() {
        Some((&migrate, sha)) if migrate <= 1 && sha.len() == 32 => {
            Some((migrate == 1, sha.try_into().expect("32 bytes")))
        }
        _ => None,
    }
}

pub fn module_name(sha256: &[u8; 32]) -> String {
    ModuleId(*sha256).to_string()
}

/// The replicated staging area: at most one module being uploaded. A chunk at offset 0
/// of another module replaces it; an upgrade entry naming it empties it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staging {
    pub sha256: [u8; 32],
    pub total_bytes: u64,
    /// The applied chunks in order; shared, so a snapshot capture copies no module byte.
    pub chunks: Vec<Arc<[u8]>>,
    pub staged_bytes: u64,
}

impl Staging {
    pub fn new(sha256: [u8; 32], total_bytes: u64) -> Staging {
        Staging {
            sha256,
            total_bytes,
            chunks: Vec::new(),
            staged_bytes: 0,
        }
    }

    pub fn is_complete(&self) -> bool {
        self.staged_bytes == self.total_bytes
    }

    pub fn push(&mut self, data: &[u8]) {
        self.staged_bytes += data.len() as u64;
        self.chunks.push(Arc::from(data));
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.staged_bytes as usize);
        for chunk in &self.chunks {
            out.extend_from_slice(chunk);
        }
        out
    }

    pub fn hashes_to_its_name(&self) -> bool {
        let mut hasher = Sha256::new();
        for chunk in &self.chunks {
            hasher.update(chunk);
        }
        <[u8; 32]>::from(hasher.finalize()) == self.sha256
    }
}

type Compiled = Result<Arc<CompiledModule>, String>;

enum CompileState {
    Running,
    Done(Compiled),
}

#[derive(Default)]
struct Cache {
    modules: HashMap<[u8; 32], CompileState>,
    /// Keys of `modules`, oldest first.
    order: Vec<[u8; 32]>,
}

/// Modules compiled (or being compiled) on background threads, by sha256. Shared by the
/// replica's application (which starts compiles and waits for them at an upgrade slot)
/// and the node front end (whose PUT waits for its own replica's compile before
/// proposing the upgrade entry).
pub struct Compiler {
    config: MachineConfig,
    /// Test hook (`--debug-refuse-compiles`): every compile fails.
    refuse: bool,
    /// Test hook (`--debug-compile-delay-ms`): every compile first sleeps this long.
    delay: Duration,
    /// The highest apply rules this host implements (`app::APPLY_RULES_MAX`, or less
    /// with `--apply-rules-max`). Kept here because everything that builds a `WasmApp`
    /// (the core, the snapshot worker) holds the node's compiler.
    apply_rules_max: u32,
    state: Mutex<Cache>,
    finished: Condvar,
}

impl Compiler {
    pub fn new(config: MachineConfig) -> Arc<Compiler> {
        Arc::new(Compiler {
            config,
            refuse: false,
            delay: Duration::ZERO,
            apply_rules_max: super::app::APPLY_RULES_MAX,
            state: Mutex::new(Cache::default()),
            finished: Condvar::new(),
        })
    }

    /// A compiler whose every compile fails, for the test of a replica that cannot load
    /// a chosen module.
    pub fn refusing(config: MachineConfig) -> Arc<Compiler> {
        let mut compiler = Compiler::new(config);
        Arc::get_mut(&mut compiler).expect("just created").refuse = true;
        compiler
    }

    /// A compiler whose every compile takes `delay` longer, for the test of a replica
    /// that reaches an upgrade slot before its compile is done.
    pub fn slowed(config: MachineConfig, delay: Duration) -> Arc<Compiler> {
        let mut compiler = Compiler::new(config);
        Arc::get_mut(&mut compiler).expect("just created").delay = delay;
        compiler
    }

    /// This host applies the log with apply rules up to `rules` only, as an older
    /// host would (`--apply-rules-max`; between 1 and `app::APPLY_RULES_MAX`).
    pub fn set_apply_rules_max(self: &mut Arc<Compiler>, rules: u32) {
        Arc::get_mut(self)
            .expect("set before the compiler is shared")
            .apply_rules_max = rules;
    }

    /// The highest apply rules this host implements.
    pub fn apply_rules_max(&self) -> u32 {
        self.apply_rules_max
    }

    /// Whether the compile of `sha256` has ended (either way); false when none was
    /// started or it was evicted.
    pub fn is_done(&self, sha256: &[u8; 32]) -> bool {
        let state = self.state.lock().expect("compiler lock poisoned");
        matches!(state.modules.get(sha256), Some(CompileState::Done(_)))
    }

    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// Starts compiling the module named `sha256` on a new thread, unless it is already
    /// compiled or compiling (then `bytes` is not called).
    pub fn start(self: &Arc<Compiler>, sha256: [u8; 32], bytes: impl FnOnce() -> Vec<u8>) {
        {
            let mut state = self.state.lock().expect("compiler lock poisoned");
            let Cache { modules, order } = &mut *state;
            if modules.contains_key(&sha256) {
                return;
            }
            modules.insert(sha256, CompileState::Running);
            order.push(sha256);
            while order.len() > COMPILED_MODULES_KEPT {
                let Some(position) = order
                    .iter()
                    .position(|sha| matches!(modules.get(sha), Some(CompileState::Done(_))))
                else {
                    break;
                };
                let evicted = order.remove(position);
                modules.remove(&evicted);
            }
        }
        let bytes = bytes();
        let compiler = Arc::clone(self);
        std::thread::Builder::new()
            .name("module-compile".into())
            .spawn(move || {
                let started = Instant::now();
                std::thread::sleep(compiler.delay);
                let outcome = if compiler.refuse {
                    Err("compilation refused by the test hook --debug-refuse-compiles".into())
                } else {
                    // A panic in the compiler must still end in a recorded outcome,
                    // or the switch slot would wait for it forever.
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        Machine::compile_module(&bytes, &compiler.config)
                    }))
                    .unwrap_or_else(|_| {
                        Err(crate::machine::LoadError(
                            "the compiler panicked on this module".into(),
                        ))
                    })
                    .map(Arc::new)
                    .map_err(|error| error.to_string())
                };
                tracing::info!(
                    module = %module_name(&sha256),
                    bytes = bytes.len(),
                    compile_ms = started.elapsed().as_millis() as u64,
                    ok = outcome.is_ok(),
                    "module compiled in the background"
                );
                let mut state = compiler.state.lock().expect("compiler lock poisoned");
                state.modules.insert(sha256, CompileState::Done(outcome));
                compiler.finished.notify_all();
            })
            .expect("spawning a compile thread");
    }

    /// Waits up to `timeout` for the compile of `sha256`: `None` when none was started
    /// (or it was evicted) or it is still running at the deadline.
    pub fn wait(&self, sha256: &[u8; 32], timeout: Duration) -> Option<Compiled> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().expect("compiler lock poisoned");
        loop {
            match state.modules.get(sha256) {
                None => return None,
                Some(CompileState::Done(outcome)) => return Some(outcome.clone()),
                Some(CompileState::Running) => {}
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            state = self
                .finished
                .wait_timeout(state, left)
                .expect("compiler lock poisoned")
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip() {
        let sha = [7u8; 32];
        let chunk = chunk_envelope(&sha, 1000, 256, b"abc");
        assert_eq!(chunk[0], ENVELOPE_CHUNK);
        let decoded = decode_chunk(&chunk[1..]).unwrap();
        assert_eq!(
            (
                decoded.sha256,
                decoded.total_bytes,
                decoded.offset,
                decoded.data
            ),
            (sha, 1000, 256, &b"abc"[..])
        );
        assert!(decode_chunk(&chunk[1..20]).is_none());
        let upgrade = upgrade_envelope(&sha, true);
        assert_eq!(upgrade.len(), 34);
        assert_eq!(decode_upgrade(&upgrade[1..]), Some((true, sha)));
        assert_eq!(decode_upgrade(&[2; 33]), None);
        assert_eq!(decode_upgrade(&[0; 5]), None);
    }

    #[test]
    fn the_compiler_compiles_in_the_background_and_reports_failures() {
        let compiler = Compiler::new(MachineConfig::default());
        let kv = std::fs::read(crate::examples::example_module("kv").unwrap()).unwrap();
        let sha = ModuleId::of(&kv).0;
        assert!(compiler.wait(&sha, Duration::ZERO).is_none());
        compiler.start(sha, || kv);
        let compiled = compiler.wait(&sha, Duration::from_secs(60)).unwrap();
        assert_eq!(compiled.unwrap().id().0, sha);
        compiler.start([1; 32], || b"not wasm".to_vec());
        let failed = compiler.wait(&[1; 32], Duration::from_secs(60)).unwrap();
        assert!(failed.unwrap_err().contains("module refused"));
    }
}
