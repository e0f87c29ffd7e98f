//! The replicated application as the Paxos applier sees it: a `StateMachine` over the
//! Wasm machine, plus the envelope that lets a module install travel through the log
//! as an ordinary command (so the core stays unaware of modules).
//!
//! Command payload envelope (first byte):
//! - `0`, then the application command bytes;
//! - `1`, then `migrate u8` (0 or 1), then the module bytes: install or replace the module.
//!
//! Result bytes (what the applier stores in the dedup table and hands back), first byte:
//! - `0` output: the module's output follows;
//! - `1` rejected: a canonical error follows (`trap: …`, `fuel exhausted`, …), state unchanged;
//! - `2` no module deployed yet;
//! - `3` installed: the module id (`sha256:…`) follows;
//! - `4` install failed: the reason follows (the previous module stays).
//!
//! Everything here is deterministic: the same log gives the same results and state on
//! every replica. It never reads a clock or does I/O.

use std::sync::Arc;

use crate::machine::{EntryContext, Machine, MachineConfig, Migration};
use crate::paxos::{ApplyContext, StateMachine, STALE_RESULT};

use super::handle::ModuleEvent;
use super::snapshot::{AppMeta, ImageSource, NodeSnapshot};

const ENVELOPE_COMMAND: u8 = 0;
const ENVELOPE_INSTALL: u8 = 1;

const RESULT_OUTPUT: u8 = 0;
const RESULT_REJECTED: u8 = 1;
const RESULT_NO_MODULE: u8 = 2;
const RESULT_INSTALLED: u8 = 3;
const RESULT_INSTALL_FAILED: u8 = 4;

/// Module events kept for `GET /v1/app`; older ones are dropped (the current module is
/// always known separately).
pub const MODULE_HISTORY_MAX: usize = 64;

pub fn command_envelope(command: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(command.len() + 1);
    out.push(ENVELOPE_COMMAND);
    out.extend_from_slice(command);
    out
}

pub fn install_envelope(module: &[u8], migrate: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(module.len() + 2);
    out.push(ENVELOPE_INSTALL);
    out.push(u8::from(migrate));
    out.extend_from_slice(module);
    out
}

/// The decoded result of one applied command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppResult {
    Output(Vec<u8>),
    Rejected(String),
    NoModule,
    Installed {
        module: String,
    },
    InstallFailed {
        reason: String,
    },
    /// A retry of an idempotency key whose result was evicted from the dedup table.
    StaleDuplicate,
}

impl AppResult {
    pub fn encode(&self) -> Vec<u8> {
        let (kind, body): (u8, &[u8]) = match self {
            AppResult::Output(output) => (RESULT_OUTPUT, output),
            AppResult::Rejected(error) => (RESULT_REJECTED, error.as_bytes()),
            AppResult::NoModule => (RESULT_NO_MODULE, b""),
            AppResult::Installed { module } => (RESULT_INSTALLED, module.as_bytes()),
            AppResult::InstallFailed { reason } => (RESULT_INSTALL_FAILED, reason.as_bytes()),
            AppResult::StaleDuplicate => return STALE_RESULT.to_vec(),
        };
        let mut out = Vec::with_capacity(body.len() + 1);
        out.push(kind);
        out.extend_from_slice(body);
        out
    }

    /// Decodes what `encode` wrote (or the applier's stale-duplicate marker). Results
    /// come only from this module's `apply`, so anything else is a broken invariant.
    pub fn decode(bytes: &[u8]) -> AppResult {
        if bytes == STALE_RESULT {
            return AppResult::StaleDuplicate;
        }
        let (kind, body) = bytes.split_first().expect("results are never empty");
        let text = || String::from_utf8_lossy(body).into_owned();
        match *kind {
            RESULT_OUTPUT => AppResult::Output(body.to_vec()),
            RESULT_REJECTED => AppResult::Rejected(text()),
            RESULT_NO_MODULE => AppResult::NoModule,
            RESULT_INSTALLED => AppResult::Installed { module: text() },
            RESULT_INSTALL_FAILED => AppResult::InstallFailed { reason: text() },
            other => panic!("unknown result kind {other}"),
        }
    }
}

/// The Wasm application of one replica: the current module's machine (none before the
/// first install) and the history of installs.
pub struct WasmApp {
    config: MachineConfig,
    machine: Option<Machine>,
    /// Current module id and the slot it took effect at.
    current: Option<(String, u64)>,
    history: Vec<ModuleEvent>,
    /// Bytes of the current module, kept for snapshots (a replica restored from a
    /// snapshot has no log entry holding them).
    module_bytes: Option<Arc<Vec<u8>>>,
    /// Bumped on every module event, so the runtime republishes `history` only then.
    pub version: u64,
}

/// What a snapshot takes from the application at one slot.
pub struct AppCapture {
    pub meta: AppMeta,
    pub module_bytes: Option<Arc<Vec<u8>>>,
    pub image: Option<Box<dyn ImageSource>>,
}

impl WasmApp {
    pub fn new(config: MachineConfig) -> WasmApp {
        WasmApp {
            config,
            machine: None,
            current: None,
            history: Vec::new(),
            module_bytes: None,
            version: 0,
        }
    }

    /// Rebuilds the application from a snapshot: loads its module and restores the
    /// machine image. Blocking (compiles the module): call it off the core task.
    pub fn from_snapshot(
        config: MachineConfig,
        snapshot: &NodeSnapshot,
    ) -> Result<WasmApp, String> {
        let mut app = WasmApp::new(config);
        app.current = snapshot.app.current.clone();
        app.history = snapshot.app.history.clone();
        app.version = 1;
        if snapshot.module_bytes.is_empty() {
            if app.current.is_some() {
                return Err("the snapshot names a current module but holds no module".into());
            }
            return Ok(app);
        }
        // Streamed into the machine's memory: no decoded second copy of the memory.
        let machine = Machine::from_snapshot_reader(
            &snapshot.module_bytes,
            &mut snapshot.machine_image.as_slice(),
            &app.config,
        )
        .map_err(|error| format!("restoring the machine: {error:#}"))?;
        let id = machine.module_id().to_string();
        if app.current.as_ref().map(|(current, _)| current) != Some(&id) {
            return Err(format!(
                "the snapshot's module is {id}, its metadata says {:?}",
                app.current
            ));
        }
        app.machine = Some(machine);
        app.module_bytes = Some(Arc::new(snapshot.module_bytes.clone()));
        Ok(app)
    }

    /// Captures the state for a snapshot. The machine part is the only costly step: the
    /// machine's image copies the pages written since its previous image into a shadow
    /// (the whole memory the first time); that copy is the pause of the apply loop.
    pub fn capture(&mut self) -> AppCapture {
        AppCapture {
            meta: AppMeta {
                current: self.current.clone(),
                history: self.history.clone(),
            },
            module_bytes: self.module_bytes.clone(),
            image: self
                .machine
                .as_mut()
                .map(|machine| Box::new(machine.snapshot_image()) as Box<dyn ImageSource>),
        }
    }

    /// The machine, for test hooks and checkpoints.
    pub fn machine_mut(&mut self) -> Option<&mut Machine> {
        self.machine.as_mut()
    }

    pub fn current(&self) -> Option<&(String, u64)> {
        self.current.as_ref()
    }

    pub fn history(&self) -> &[ModuleEvent] {
        &self.history
    }

    /// Runs a read-only query against the applied state; `Ok(None)` without a module.
    pub fn query(&mut self, query: &[u8]) -> Option<Result<Vec<u8>, String>> {
        let machine = self.machine.as_mut()?;
        Some(machine.query(query).map_err(|error| error.to_string()))
    }

    /// `sha256:<hex>` of the application state, `None` before the first install.
    pub fn state_hash(&mut self) -> Option<String> {
        let machine = self.machine.as_mut()?;
        Some(machine.state_hash_hex())
    }

    /// The machine's state hash (`Machine::state_hash`), `None` before the first
    /// install. Incremental: only pages written since the last call are rehashed.
    pub fn state_hash_bytes(&mut self) -> Option<[u8; 32]> {
        Some(self.machine.as_mut()?.state_hash())
    }

    /// Test hook: inverts the byte at `offset` of the committed linear memory, on this
    /// replica only, so its state diverges from its peers'.
    pub fn debug_flip_byte(&mut self, offset: u64) -> Result<(), String> {
        let machine = self
            .machine
            .as_mut()
            .ok_or_else(|| "no module is deployed".to_string())?;
        let memory_bytes = machine.memory_bytes();
        let offset = usize::try_from(offset)
            .ok()
            .filter(|offset| *offset < memory_bytes)
            .ok_or_else(|| format!("offset {offset} is outside the {memory_bytes}-byte memory"))?;
        machine.debug_flip_byte(offset);
        Ok(())
    }

    fn record(&mut self, event: ModuleEvent) {
        if event.failed.is_none() {
            self.current = Some((event.module.clone(), event.index));
        }
        self.history.push(event);
        if self.history.len() > MODULE_HISTORY_MAX {
            self.history.remove(0);
        }
        self.version += 1;
    }

    fn install(&mut self, module: &[u8], migrate: bool, slot: u64) -> AppResult {
        let module_id = crate::machine::ModuleId::of(module).to_string();
        let outcome = if let Some(machine) = self.machine.as_mut() {
            let migration = if migrate {
                Migration::Migrate
            } else {
                Migration::StartFresh
            };
            machine
                .upgrade(module, migration)
                .map_err(|error| error.to_string())
        } else {
            match Machine::load(module, &self.config) {
                Ok(machine) => {
                    self.machine = Some(machine);
                    Ok(())
                }
                Err(error) => Err(error.to_string()),
            }
        };
        let failed = outcome.err();
        if failed.is_none() {
            self.module_bytes = Some(Arc::new(module.to_vec()));
        }
        self.record(ModuleEvent {
            module: module_id.clone(),
            index: slot,
            migrated: migrate,
            failed: failed.clone(),
        });
        match failed {
            None => AppResult::Installed { module: module_id },
            Some(reason) => {
                tracing::warn!(slot, module = %module_id, %reason, "module install failed; the previous module stays");
                AppResult::InstallFailed { reason }
            }
        }
    }
}

impl StateMachine for WasmApp {
    fn apply(&mut self, payload: &[u8], context: &ApplyContext) -> Vec<u8> {
        let result = match payload.split_first() {
            Some((&ENVELOPE_COMMAND, command)) => match &mut self.machine {
                None => AppResult::NoModule,
                Some(machine) => {
                    let entry = EntryContext {
                        // Wall-clock milliseconds fit i64 for the next 292 million years.
                        time_ms: context.timestamp_ms as i64,
                        seed: context.seed,
                    };
                    // The hot path: the module writes its output right after the
                    // result kind, so the output is copied out of the guest once.
                    let mut out = vec![RESULT_OUTPUT];
                    match machine.apply_into(command, entry, &mut out) {
                        Ok(()) => return out,
                        Err(error) => AppResult::Rejected(error.to_string()),
                    }
                }
            },
            Some((&ENVELOPE_INSTALL, rest)) => match rest.split_first() {
                Some((&migrate, module)) if migrate <= 1 => {
                    self.install(module, migrate == 1, context.slot)
                }
                _ => AppResult::Rejected("malformed module install envelope".into()),
            },
            // Only this node's front end builds envelopes, so this is a command from a
            // replica of another version; refuse it the same way everywhere.
            _ => AppResult::Rejected("malformed command envelope".into()),
        };
        result.encode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_round_trip() {
        for result in [
            AppResult::Output(b"OK".to_vec()),
            AppResult::Output(Vec::new()),
            AppResult::Rejected("trap: unreachable".into()),
            AppResult::NoModule,
            AppResult::Installed {
                module: "sha256:00".into(),
            },
            AppResult::InstallFailed {
                reason: "upgrade failed".into(),
            },
            AppResult::StaleDuplicate,
        ] {
            assert_eq!(AppResult::decode(&result.encode()), result);
        }
    }

    #[test]
    fn applied_output_is_encoded_like_an_output_result() {
        let kv = std::fs::read(crate::examples::example_module("kv").unwrap()).unwrap();
        let mut app = WasmApp::new(MachineConfig::default());
        let context = ApplyContext {
            slot: 1,
            timestamp_ms: 0,
            seed: 0,
        };
        app.apply(&install_envelope(&kv, false), &context);
        let result = app.apply(&command_envelope(b"put a 1"), &context);
        assert_eq!(result, AppResult::Output(b"OK".to_vec()).encode());
        let result = app.apply(&command_envelope(b"get a"), &context);
        assert_eq!(AppResult::decode(&result), AppResult::Output(b"1".to_vec()));
    }

    #[test]
    fn a_flipped_byte_changes_the_state_hash_and_flipping_back_restores_it() {
        let kv = std::fs::read(crate::examples::example_module("kv").unwrap()).unwrap();
        let mut app = WasmApp::new(MachineConfig::default());
        assert_eq!(app.state_hash_bytes(), None);
        assert!(app.debug_flip_byte(0).is_err(), "no module yet");
        let context = ApplyContext {
            slot: 1,
            timestamp_ms: 0,
            seed: 0,
        };
        app.apply(&install_envelope(&kv, false), &context);
        app.apply(&command_envelope(b"put a 1"), &context);
        let before = app.state_hash_bytes().unwrap();
        app.debug_flip_byte(100).unwrap();
        let flipped = app.state_hash_bytes().unwrap();
        assert_ne!(flipped, before);
        app.debug_flip_byte(100).unwrap();
        assert_eq!(app.state_hash_bytes().unwrap(), before);
        let error = app.debug_flip_byte(u64::MAX).unwrap_err();
        assert!(
            error.starts_with("offset 18446744073709551615 is outside"),
            "{error}"
        );
    }

    #[test]
    fn a_captured_app_restores_to_the_same_state_and_metadata() {
        let kv = std::fs::read(crate::examples::example_module("kv").unwrap()).unwrap();
        let mut app = WasmApp::new(MachineConfig::default());
        let context = ApplyContext {
            slot: 3,
            timestamp_ms: 0,
            seed: 0,
        };
        app.apply(&install_envelope(&kv, false), &context);
        app.apply(&command_envelope(b"put a 1"), &context);
        app.apply(&command_envelope(b"put b 2"), &context);
        let capture = app.capture();
        let contents = crate::node::snapshot::SnapshotContents {
            slot: 3,
            voters: vec![1],
            applier_state: Vec::new(),
            app: capture.meta,
            module_bytes: capture.module_bytes,
            image: capture.image,
        };
        let mut file = Vec::new();
        crate::node::snapshot::write_snapshot(&contents, &mut file).unwrap();
        let (snapshot, _) = crate::node::snapshot::decode_snapshot(&file).unwrap();
        let mut restored = WasmApp::from_snapshot(MachineConfig::default(), &snapshot).unwrap();
        assert_eq!(restored.state_hash(), app.state_hash());
        assert_eq!(restored.current(), app.current());
        assert_eq!(restored.history(), app.history());
        assert_eq!(restored.query(b"get b"), Some(Ok(b"2".to_vec())));
        // The restored app goes on like the original.
        let next = command_envelope(b"put c 3");
        assert_eq!(restored.apply(&next, &context), app.apply(&next, &context));
        assert_eq!(restored.state_hash(), app.state_hash());

        // A snapshot taken before any module restores to an empty app.
        let mut empty = WasmApp::new(MachineConfig::default());
        let capture = empty.capture();
        assert!(capture.image.is_none() && capture.module_bytes.is_none());
    }

    #[test]
    fn envelopes_carry_their_kind() {
        assert_eq!(command_envelope(b"put a 1"), b"\0put a 1");
        assert_eq!(install_envelope(b"\0asm", true), b"\x01\x01\0asm");
    }

    #[test]
    fn commands_before_any_module_say_so_and_garbage_is_rejected() {
        let mut app = WasmApp::new(MachineConfig::default());
        let context = ApplyContext {
            slot: 1,
            timestamp_ms: 0,
            seed: 0,
        };
        let result = app.apply(&command_envelope(b"get a"), &context);
        assert_eq!(AppResult::decode(&result), AppResult::NoModule);
        let result = app.apply(&[9, 1, 2], &context);
        assert_eq!(
            AppResult::decode(&result),
            AppResult::Rejected("malformed command envelope".into())
        );
        let result = app.apply(&[1, 7], &context);
        assert_eq!(
            AppResult::decode(&result),
            AppResult::Rejected("malformed module install envelope".into())
        );
        let result = app.apply(&install_envelope(b"not wasm", false), &context);
        assert!(matches!(
            AppResult::decode(&result),
            AppResult::InstallFailed { .. }
        ));
        assert_eq!(app.current(), None);
        assert_eq!(app.history().len(), 1);
    }
}
