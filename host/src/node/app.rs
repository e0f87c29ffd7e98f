//! The replicated application as the Paxos applier sees it: a `StateMachine` over the
//! Wasm machine, plus the envelope that lets a module install travel through the log
//! as an ordinary command (so the core stays unaware of modules).
//!
//! Command payload envelope (first byte):
//! - `0`, then the application command bytes;
//! - `1`, then `migrate u8` (0 or 1), then the module bytes: install or replace the module
//!   in one entry (the first format; still applied, so old logs replay, but no longer
//!   proposed: a module of several MiB would be one giant entry compiled on the core task);
//! - `2`, a module chunk, and `3`, an upgrade naming a staged module: see `upgrade.rs`;
//! - `4`, a member's addresses: see `members.rs`;
//! - `5`, then `rules u32` (LE): from the next payload on, apply with these apply rules
//!   (see `APPLY_RULES_MAX`). Proposed by a leader once every member says it implements
//!   them.
//!
//! Result bytes (what the applier stores in the dedup table and hands back), first byte:
//! - `0` output: the module's output follows;
//! - `1` rejected: a canonical error follows (`trap: …`, `fuel exhausted`, …), state unchanged;
//! - `2` no module deployed yet;
//! - `3` installed: the module id (`sha256:…`) follows;
//! - `4` install failed: the reason follows (the previous module stays);
//! - `5` chunk staged: the staged byte count (u64) follows;
//! - `6` address recorded in the address book;
//! - `7` apply rules: the rules in force after the entry (u32 LE) follow.
//!
//! Everything here is deterministic: the same log gives the same results and state on
//! every replica. It never reads a clock or does I/O.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::machine::{BatchResults, BatchStats, EntryContext, Machine, MachineConfig, Migration};
use crate::paxos::{ApplyContext, StateMachine, Value, STALE_RESULT};

use super::handle::ModuleEvent;
use super::members::{self, AddressBook, ENVELOPE_ADDRESS};
use super::snapshot::{AppMeta, ImageSource, NodeSnapshot};
use super::upgrade::{self, Chunk, Compiler, Staging, ENVELOPE_CHUNK, ENVELOPE_UPGRADE};

const ENVELOPE_COMMAND: u8 = 0;
const ENVELOPE_INSTALL: u8 = 1;
const ENVELOPE_APPLY_RULES: u8 = 5;

/// Apply rules: how this host turns a slot's commands into machine calls. The choice
/// shows in the state (a batch call leaves other bytes in linear memory than the same
/// commands one call each: the framed input, the guest's stack), so it is replicated:
/// every replica applies each payload under the rules the log put in force before it, and a
/// host that changes how it applies adds a number here instead of changing what a
/// number means. 1: one `paxwasm_apply` call per command (every state before the rules
/// entry existed). 2: a run of two or more consecutive commands of a slot in one
/// `paxwasm_apply_batch` call (`Machine::apply_batch`).
pub const APPLY_RULES_ONE_CALL_PER_COMMAND: u32 = 1;
/// See `APPLY_RULES_ONE_CALL_PER_COMMAND`.
pub const APPLY_RULES_BATCHES: u32 = 2;
/// The highest apply rules this build implements.
pub const APPLY_RULES_MAX: u32 = APPLY_RULES_BATCHES;

const RESULT_OUTPUT: u8 = 0;
const RESULT_REJECTED: u8 = 1;
const RESULT_NO_MODULE: u8 = 2;
const RESULT_INSTALLED: u8 = 3;
const RESULT_INSTALL_FAILED: u8 = 4;
const RESULT_STAGED: u8 = 5;
const RESULT_ADDRESS: u8 = 6;
const RESULT_APPLY_RULES: u8 = 7;

/// Exit status of a replica that cannot load a module the log chose (see `halt`).
pub const HALT_EXIT_CODE: i32 = 70;
/// How often a replica waiting at an upgrade slot for its compile says so.
const COMPILE_WAIT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Module events kept for `GET /v1/app`; older ones are dropped (the current module is
/// always known separately).
pub const MODULE_HISTORY_MAX: usize = 64;

pub fn command_envelope(command: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(command.len() + 1);
    out.push(ENVELOPE_COMMAND);
    out.extend_from_slice(command);
    out
}

/// The entry that puts apply rules `rules` in force from the payload after it on.
pub fn apply_rules_envelope(rules: u32) -> Vec<u8> {
    let mut out = vec![ENVELOPE_APPLY_RULES];
    out.extend_from_slice(&rules.to_le_bytes());
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
    /// A module chunk was staged; this many bytes of its module are staged now.
    Staged {
        staged_bytes: u64,
    },
    /// A retry of an idempotency key whose result was evicted from the dedup table.
    StaleDuplicate,
    /// An address entry was recorded in the address book.
    AddressRecorded,
    /// An apply-rules entry was applied; these rules are in force after it (never lower
    /// than before: an entry naming older rules changes nothing).
    ApplyRules {
        rules: u32,
    },
}

impl AppResult {
    pub fn encode(&self) -> Vec<u8> {
        let (kind, body): (u8, &[u8]) = match self {
            AppResult::Output(output) => (RESULT_OUTPUT, output),
            AppResult::Rejected(error) => (RESULT_REJECTED, error.as_bytes()),
            AppResult::NoModule => (RESULT_NO_MODULE, b""),
            AppResult::Installed { module } => (RESULT_INSTALLED, module.as_bytes()),
            AppResult::InstallFailed { reason } => (RESULT_INSTALL_FAILED, reason.as_bytes()),
            AppResult::Staged { staged_bytes } => {
                let mut out = vec![RESULT_STAGED];
                out.extend_from_slice(&staged_bytes.to_le_bytes());
                return out;
            }
            AppResult::StaleDuplicate => return STALE_RESULT.to_vec(),
            AppResult::AddressRecorded => (RESULT_ADDRESS, b""),
            AppResult::ApplyRules { rules } => {
                let mut out = vec![RESULT_APPLY_RULES];
                out.extend_from_slice(&rules.to_le_bytes());
                return out;
            }
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
            RESULT_ADDRESS => AppResult::AddressRecorded,
            RESULT_STAGED => AppResult::Staged {
                staged_bytes: u64::from_le_bytes(body.try_into().expect("a staged count")),
            },
            RESULT_APPLY_RULES => AppResult::ApplyRules {
                rules: u32::from_le_bytes(body.try_into().expect("a rules number")),
            },
            other => panic!("unknown result kind {other}"),
        }
    }

    /// The result of a command envelope as a peer reported it (`codec::CommandResult`):
    /// `None` for anything a command cannot produce. Never panics: the bytes come from
    /// the network.
    pub fn decode_command_result(bytes: &[u8]) -> Option<AppResult> {
        // Only the kinds whose decoding cannot panic reach `decode`.
        let from_a_command = bytes == STALE_RESULT
            || match bytes.split_first() {
                Some((&(RESULT_OUTPUT | RESULT_REJECTED), _)) => true,
                Some((&RESULT_NO_MODULE, body)) => body.is_empty(),
                _ => false,
            };
        from_a_command.then(|| AppResult::decode(bytes))
    }
}

/// The Wasm application of one replica: the current module's machine (none before the
/// first install) and the history of installs.
pub struct WasmApp {
    config: MachineConfig,
    /// Background compiles of staged modules (local, shared with the node front end).
    compiler: Arc<Compiler>,
    /// The module being uploaded (replicated state: in snapshots).
    staging: Option<Staging>,
    machine: Option<Machine>,
    /// Current module id and the slot it took effect at.
    current: Option<(String, u64)>,
    history: Vec<ModuleEvent>,
    /// Bytes of the current module, kept for snapshots (a replica restored from a
    /// snapshot has no log entry holding them).
    module_bytes: Option<Arc<Vec<u8>>>,
    /// Bumped on every module event, so the runtime republishes `history` only then.
    pub version: u64,
    /// Where every member listens (replicated state: in snapshots).
    addresses: AddressBook,
    /// Bumped when the address book changes, so the runtime re-points the transport.
    pub addresses_version: u64,
    /// The apply rules in force (replicated state: in snapshots); see
    /// `APPLY_RULES_ONE_CALL_PER_COMMAND`.
    apply_rules: u32,
    /// Reused by `apply_all` (its buffers keep their capacity).
    batch_results: BatchResults,
}

/// What a snapshot takes from the application at one slot.
pub struct AppCapture {
    pub meta: AppMeta,
    pub module_bytes: Option<Arc<Vec<u8>>>,
    pub image: Option<Box<dyn ImageSource>>,
    pub staged: Option<Staging>,
    pub addresses: AddressBook,
}

impl WasmApp {
    /// An application with its own compiler (tests; a node shares one, see `with_compiler`).
    pub fn new(config: MachineConfig) -> WasmApp {
        WasmApp::with_compiler(Compiler::new(config))
    }

    pub fn with_compiler(compiler: Arc<Compiler>) -> WasmApp {
        WasmApp {
            config: compiler.config().clone(),
            compiler,
            staging: None,
            machine: None,
            current: None,
            history: Vec::new(),
            module_bytes: None,
            version: 0,
            addresses: AddressBook::default(),
            addresses_version: 0,
            apply_rules: APPLY_RULES_ONE_CALL_PER_COMMAND,
            batch_results: BatchResults::default(),
        }
    }

    /// Rebuilds the application from a snapshot: loads its module and restores the
    /// machine image. Blocking (compiles the module): call it off the core task.
    /// Halts the process on a snapshot whose apply rules this host does not implement.
    pub fn from_snapshot(
        compiler: &Arc<Compiler>,
        snapshot: &NodeSnapshot,
    ) -> Result<WasmApp, String> {
        let mut app = WasmApp::with_compiler(compiler.clone());
        if let Err(reason) = WasmApp::check_snapshot_rules(compiler, snapshot) {
            // A sound file from a newer cluster: no reason to set it aside or fetch
            // another, and this host cannot follow the cluster past it.
            halt(&reason);
        }
        app.apply_rules = snapshot.app.apply_rules;
        app.addresses = snapshot.addresses.clone().unwrap_or_default();
        if let Some(staged) = &snapshot.staged {
            if staged.is_complete() {
                // Compile it now: its upgrade entry may be among the next to apply.
                compiler.start(staged.sha256, || staged.bytes());
            }
            app.staging = Some(staged.clone());
        }
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

    /// Whether this host implements the snapshot's apply rules (`from_snapshot` halts
    /// when not, like a replica meeting the rules entry in its log).
    fn check_snapshot_rules(compiler: &Compiler, snapshot: &NodeSnapshot) -> Result<(), String> {
        let rules = snapshot.app.apply_rules;
        if rules > compiler.apply_rules_max() {
            return Err(rules_too_new(
                rules,
                &format!("the snapshot of slot {}", snapshot.slot),
                compiler.apply_rules_max(),
            ));
        }
        Ok(())
    }

    /// Captures the state for a snapshot. The machine part is the only costly step: the
    /// machine's image copies the pages written since its previous image into a shadow
    /// (the whole memory the first time); that copy is the pause of the apply loop.
    pub fn capture(&mut self) -> AppCapture {
        AppCapture {
            meta: AppMeta {
                current: self.current.clone(),
                history: self.history.clone(),
                apply_rules: self.apply_rules,
            },
            module_bytes: self.module_bytes.clone(),
            image: self
                .machine
                .as_mut()
                .map(|machine| Box::new(machine.snapshot_image()) as Box<dyn ImageSource>),
            staged: self.staging.clone(),
            addresses: self.addresses.clone(),
        }
    }

    /// The address book at the applied index.
    pub fn addresses(&self) -> &AddressBook {
        &self.addresses
    }

    /// A configuration was applied at this slot: its members' ids are taken for good
    /// (`AddressBook::was_member`). Called by the runtime at the configuration's slot on
    /// every replica, so the book stays a function of the log.
    pub fn note_members(&mut self, config: &crate::paxos::Configuration) {
        self.addresses.note_members(config.members());
    }

    /// Replaces the address book: the seed from `--cluster` (the book at slot 0), or the
    /// book of a version-1/2 snapshot, which did not hold one.
    pub fn seed_addresses(&mut self, book: AddressBook) {
        self.addresses = book;
        self.addresses_version += 1;
    }

    /// The machine, for test hooks and checkpoints.
    pub fn machine_mut(&mut self) -> Option<&mut Machine> {
        self.machine.as_mut()
    }

    /// The apply rules in force at the applied index.
    pub fn apply_rules(&self) -> u32 {
        self.apply_rules
    }

    /// An apply-rules entry at `slot`: rules only ever rise. A host that does not
    /// implement them stops, as for a module it cannot load.
    fn raise_apply_rules(&mut self, rules: u32, slot: u64) -> AppResult {
        let supported = self.compiler.apply_rules_max();
        if rules > supported {
            halt(&rules_too_new(rules, &format!("slot {slot}"), supported));
        }
        if rules > self.apply_rules {
            tracing::info!(
                slot,
                from = self.apply_rules,
                to = rules,
                "apply rules raised"
            );
            self.apply_rules = rules;
        }
        AppResult::ApplyRules {
            rules: self.apply_rules,
        }
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

    /// The machine's batch calls, their commands and fallbacks (zero before the
    /// first install). Upgrades keep the machine, so these span every module.
    pub fn batch_stats(&self) -> BatchStats {
        self.machine
            .as_ref()
            .map(Machine::batch_stats)
            .unwrap_or_default()
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

    pub fn compiler(&self) -> &Arc<Compiler> {
        &self.compiler
    }

    pub fn staging(&self) -> Option<&Staging> {
        self.staging.as_ref()
    }

    /// A module chunk: appended to the staging area when it continues it, or starts a
    /// new staging area (dropping the old one) at offset 0 of another module. A chunk
    /// already staged is a duplicate (a retried proposal) and changes nothing.
    fn stage(&mut self, chunk: Chunk<'_>) -> AppResult {
        let name = upgrade::module_name(&chunk.sha256);
        let limit = self.config.module_bytes_max;
        if chunk.total_bytes > limit {
            return AppResult::Rejected(format!(
                "module {name} of {} bytes exceeds module_bytes_max = {limit}",
                chunk.total_bytes
            ));
        }
        if chunk.data.is_empty() {
            return AppResult::Rejected("empty module chunk".into());
        }
        let end = chunk.offset.checked_add(chunk.data.len() as u64);
        if end.is_none_or(|end| end > chunk.total_bytes) {
            // Checked before the staging area is touched: a bad chunk changes nothing.
            return AppResult::Rejected(format!(
                "chunk at offset {} of {} bytes overruns module {name} of {} bytes",
                chunk.offset,
                chunk.data.len(),
                chunk.total_bytes
            ));
        }
        let continues = matches!(&self.staging,
            Some(staging) if staging.sha256 == chunk.sha256 && staging.total_bytes == chunk.total_bytes);
        if !continues {
            if chunk.offset != 0 {
                return AppResult::Rejected(format!(
                    "chunk at offset {} of module {name}, which is not being staged \
                     (another upload replaced it); upload it again",
                    chunk.offset
                ));
            }
            if let Some(old) = &self.staging {
                tracing::info!(
                    replaced = %upgrade::module_name(&old.sha256),
                    staged_bytes = old.staged_bytes,
                    by = %name,
                    "a new upload replaces the staged module"
                );
            }
            self.staging = Some(Staging::new(chunk.sha256, chunk.total_bytes));
        }
        let staging = self.staging.as_mut().expect("staging was just ensured");
        let end = chunk.offset + chunk.data.len() as u64;
        if end <= staging.staged_bytes {
            return AppResult::Staged {
                staged_bytes: staging.staged_bytes,
            };
        }
        if chunk.offset != staging.staged_bytes || end > staging.total_bytes {
            return AppResult::Rejected(format!(
                "chunk of bytes {}..{end} of module {name}: {} of {} bytes are staged",
                chunk.offset, staging.staged_bytes, staging.total_bytes
            ));
        }
        staging.push(chunk.data);
        let staged_bytes = staging.staged_bytes;
        if staging.is_complete() {
            if !staging.hashes_to_its_name() {
                self.staging = None;
                return AppResult::Rejected(format!(
                    "the staged bytes do not hash to {name}; staging dropped"
                ));
            }
            let staging = self.staging.as_ref().expect("still staged");
            self.compiler.start(staging.sha256, || staging.bytes());
        }
        AppResult::Staged { staged_bytes }
    }

    /// The module whose background compile applying `value` would wait for (an
    /// upgrade entry naming the completely staged module, compile not ended yet); the
    /// compile is started if it was not. The runtime holds that slot, and every later
    /// apply and read-ready reply, until it ends (`Loop::release_held`), so that the core
    /// task never blocks on a compile. (An upgrade entry batched after the chunk that
    /// completes the staging is not seen here and still waits inside `upgrade`.)
    pub fn waits_for_compile(&self, value: &Value) -> Option<[u8; 32]> {
        let Value::Batch(batch) = value else {
            return None;
        };
        batch.commands.iter().find_map(|command| {
            let (&ENVELOPE_UPGRADE, body) = command.payload.split_first()? else {
                return None;
            };
            let (_, sha256) = upgrade::decode_upgrade(body)?;
            let staged = self
                .staging
                .as_ref()
                .filter(|staged| staged.sha256 == sha256 && staged.is_complete())?;
            self.compiler.start(sha256, || staged.bytes());
            (!self.compiler.is_done(&sha256)).then_some(sha256)
        })
    }

    /// An upgrade entry: switches to the staged module named `sha256` at `slot`, using
    /// the background compile (waiting for it if it is still running). Empties the
    /// staging area whatever the outcome.
    fn upgrade(&mut self, sha256: [u8; 32], migrate: bool, slot: u64) -> AppResult {
        let name = upgrade::module_name(&sha256);
        let staged = match self.staging.take() {
            Some(staged) if staged.sha256 == sha256 && staged.is_complete() => staged,
            other => {
                self.staging = other;
                let reason = format!(
                    "module {name} is not completely staged (another upload replaced it); \
                     upload it again"
                );
                return self.installed(name, migrate, slot, Err(reason), None);
            }
        };
        let started = Instant::now();
        let compiled = loop {
            // Started when the last chunk was applied (or the snapshot restored); started
            // again here if it was not, or was evicted from the cache meanwhile.
            self.compiler.start(sha256, || staged.bytes());
            match self.compiler.wait(&sha256, COMPILE_WAIT_LOG_INTERVAL) {
                Some(compiled) => break compiled,
                None => tracing::warn!(
                    slot,
                    module = %name,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "the upgrade slot waits for this replica's compile of the module"
                ),
            }
        };
        let waited_us = started.elapsed().as_micros() as u64;
        let compiled = match compiled {
            Ok(compiled) => compiled,
            Err(reason) => halt(&format!(
                "module {name}, chosen at slot {slot}, does not compile on this replica: {reason}"
            )),
        };
        let migration = if migrate {
            Migration::Migrate
        } else {
            Migration::StartFresh
        };
        let outcome = match self.machine.as_mut() {
            Some(machine) => machine
                .upgrade_compiled(&compiled, migration)
                .map_err(|error| error.to_string()),
            None => Machine::load_compiled(&compiled, &self.config)
                .map(|machine| self.machine = Some(machine))
                .map_err(|error| error.to_string()),
        };
        tracing::info!(
            slot,
            module = %name,
            compile_wait_us = waited_us,
            switch_us = started.elapsed().as_micros() as u64 - waited_us,
            ok = outcome.is_ok(),
            "upgrade entry applied"
        );
        self.installed(name, migrate, slot, outcome, Some(staged.bytes()))
    }

    /// Records an install or upgrade outcome and builds its result.
    fn installed(
        &mut self,
        module_id: String,
        migrate: bool,
        slot: u64,
        outcome: Result<(), String>,
        module: Option<Vec<u8>>,
    ) -> AppResult {
        let failed = outcome.err();
        if failed.is_none() {
            let module = module.expect("a successful install has its bytes");
            self.module_bytes = Some(Arc::new(module));
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
        self.installed(module_id, migrate, slot, outcome, Some(module.to_vec()))
    }
}

fn rules_too_new(rules: u32, source: &str, supported: u32) -> String {
    format!(
        "{source} puts apply rules {rules} in force; this host implements rules 1 to \
         {supported}: run a newer paxwasm on this replica"
    )
}

/// Stops the process: this replica cannot apply a chosen entry the way every other
/// replica does, and skipping it would diverge from them. Exits rather than panics, so
/// the whole process stops (a panic would only end the core task).
fn halt(reason: &str) -> ! {
    tracing::error!(
        reason,
        "HALT: this replica cannot apply a chosen entry; stopping"
    );
    eprintln!("paxwasm: HALT: {reason}");
    std::process::exit(HALT_EXIT_CODE);
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
            Some((&ENVELOPE_CHUNK, body)) => match upgrade::decode_chunk(body) {
                Some(chunk) => self.stage(chunk),
                None => AppResult::Rejected("malformed module chunk envelope".into()),
            },
            Some((&ENVELOPE_UPGRADE, body)) => match upgrade::decode_upgrade(body) {
                Some((migrate, sha256)) => self.upgrade(sha256, migrate, context.slot),
                None => AppResult::Rejected("malformed upgrade envelope".into()),
            },
            Some((&ENVELOPE_ADDRESS, body)) => match members::decode_address(body) {
                Ok((id, address)) => match self.addresses.record(id, address) {
                    Ok(changed) => {
                        if changed {
                            self.addresses_version += 1;
                        }
                        AppResult::AddressRecorded
                    }
                    Err(reason) => AppResult::Rejected(reason),
                },
                Err(reason) => AppResult::Rejected(format!("malformed address entry: {reason}")),
            },
            Some((&ENVELOPE_APPLY_RULES, body)) => match <[u8; 4]>::try_from(body) {
                Ok(rules) if u32::from_le_bytes(rules) >= APPLY_RULES_ONE_CALL_PER_COMMAND => {
                    self.raise_apply_rules(u32::from_le_bytes(rules), context.slot)
                }
                _ => AppResult::Rejected("malformed apply-rules entry".into()),
            },
            // Only this node's front end builds envelopes, so this is a command from a
            // replica of another version; refuse it the same way everywhere.
            _ => AppResult::Rejected("malformed command envelope".into()),
        };
        result.encode()
    }

    /// Under apply rules 2, runs of consecutive commands go to the machine with one
    /// `apply_batch` (one guest call per run when the module takes batches); everything
    /// else goes through `apply`. The runs follow from the slot's payloads and the
    /// rules in force before each payload alone.
    fn apply_all(
        &mut self,
        payloads: &[&[u8]],
        context: &ApplyContext,
        results: &mut Vec<Vec<u8>>,
    ) {
        let mut rest = payloads;
        while let Some((&first, after_first)) = rest.split_first() {
            // Checked again after every entry: a rules entry takes effect at the next
            // payload, even inside this group.
            if self.apply_rules < APPLY_RULES_BATCHES {
                results.push(self.apply(first, context));
                rest = after_first;
                continue;
            }
            let commands = rest
                .iter()
                .take_while(|payload| payload.first() == Some(&ENVELOPE_COMMAND))
                .count();
            // A lone command takes `apply` (no batch results to fill).
            let Some(machine) = self.machine.as_mut().filter(|_| commands > 1) else {
                results.push(self.apply(first, context));
                rest = after_first;
                continue;
            };
            let (run, after) = rest.split_at(commands);
            let bodies: Vec<&[u8]> = run.iter().map(|payload| &payload[1..]).collect();
            let entry = EntryContext {
                time_ms: context.timestamp_ms as i64,
                seed: context.seed,
            };
            machine.apply_batch(&bodies, entry, &mut self.batch_results);
            for i in 0..bodies.len() {
                results.push(match self.batch_results.get(i) {
                    Ok(output) => {
                        let mut result = Vec::with_capacity(1 + output.len());
                        result.push(RESULT_OUTPUT);
                        result.extend_from_slice(output);
                        result
                    }
                    Err(error) => AppResult::Rejected(error.to_string()).encode(),
                });
            }
            rest = after;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `app`'s state written as a snapshot file at `slot` (single voter 1) and read back,
    /// as a replica restarting from that file sees it.
    fn snapshot_file_round_trip(
        app: &mut WasmApp,
        slot: crate::paxos::Slot,
    ) -> crate::node::snapshot::NodeSnapshot {
        let capture = app.capture();
        let contents = crate::node::snapshot::SnapshotContents {
            slot,
            configuration: crate::paxos::Configuration::new([1]),
            addresses: capture.addresses,
            applier_state: Vec::new(),
            app: capture.meta,
            module_bytes: capture.module_bytes,
            image: capture.image,
            staged: capture.staged,
        };
        let mut file = Vec::new();
        crate::node::snapshot::write_snapshot(&contents, &mut file).unwrap();
        crate::node::snapshot::decode_snapshot(&file).unwrap().0
    }

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
            AppResult::AddressRecorded,
        ] {
            assert_eq!(AppResult::decode(&result.encode()), result);
        }
    }

    #[test]
    fn a_peer_reported_result_decodes_only_as_a_command_result() {
        for result in [
            AppResult::Output(b"OK".to_vec()),
            AppResult::Output(Vec::new()),
            AppResult::Rejected("fuel exhausted".into()),
            AppResult::NoModule,
            AppResult::StaleDuplicate,
        ] {
            assert_eq!(
                AppResult::decode_command_result(&result.encode()),
                Some(result)
            );
        }
        let staged = AppResult::Staged { staged_bytes: 7 }.encode();
        for not_a_command in [
            &b""[..],
            &[RESULT_NO_MODULE, 1][..],
            &[RESULT_STAGED, 1, 2][..],
            &staged[..],
            &AppResult::AddressRecorded.encode()[..],
            &[0xee, 1, 2][..],
        ] {
            assert_eq!(AppResult::decode_command_result(not_a_command), None);
        }
    }

    #[test]
    fn applied_output_is_encoded_like_an_output_result() {
        let kv = example("kv");
        let mut app = WasmApp::new(MachineConfig::default());
        let context = ctx(1);
        app.apply(&install_envelope(&kv, false), &context);
        let result = app.apply(&command_envelope(b"put a 1"), &context);
        assert_eq!(result, AppResult::Output(b"OK".to_vec()).encode());
        let result = app.apply(&command_envelope(b"get a"), &context);
        assert_eq!(AppResult::decode(&result), AppResult::Output(b"1".to_vec()));
    }

    /// A slot's payloads through `apply_all` (runs of commands in one guest call)
    /// and one by one: the same results, envelopes between commands included, and
    /// the same answers afterwards; two apps fed alike reach the same state hash.
    #[test]
    fn apply_all_gives_the_results_of_apply_one_by_one() {
        let kv = example("kv");
        let address = members::address_envelope(
            4,
            &members::Address {
                peer: "127.0.0.1:7104".parse().unwrap(),
                http: "127.0.0.1:7004".into(),
            },
        );
        let slots: Vec<Vec<Vec<u8>>> = vec![
            // Batch calls are made under apply rules 2 only.
            vec![apply_rules_envelope(APPLY_RULES_BATCHES)],
            // Before any module: every command answers NoModule.
            vec![
                command_envelope(b"put early 1"),
                command_envelope(b"get early"),
            ],
            vec![install_envelope(&kv, false)],
            vec![
                command_envelope(b"put a 1"),
                command_envelope(b"put b 2"),
                command_envelope(b"cas a 1 10"),
                address,
                command_envelope(b"get a"),
                vec![99, 1, 2],
                command_envelope(b"append b 3"),
                command_envelope(b"nonsense"),
                command_envelope(b"get b"),
            ],
            vec![command_envelope(b"del a")],
        ];
        let (mut grouped, mut again, mut single) = (
            WasmApp::new(MachineConfig::default()),
            WasmApp::new(MachineConfig::default()),
            WasmApp::new(MachineConfig::default()),
        );
        for (n, payloads) in slots.iter().enumerate() {
            let context = ctx(n as u64 + 1);
            let payloads: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let (mut results, mut results_again) = (Vec::new(), Vec::new());
            grouped.apply_all(&payloads, &context, &mut results);
            again.apply_all(&payloads, &context, &mut results_again);
            let expected: Vec<Vec<u8>> = payloads
                .iter()
                .map(|payload| single.apply(payload, &context))
                .collect();
            assert_eq!(results, expected, "slot {}", n + 1);
            assert_eq!(results_again, expected);
        }
        for query in [&b"get a"[..], b"get b"] {
            assert_eq!(
                grouped.machine.as_mut().unwrap().query(query),
                single.machine.as_mut().unwrap().query(query)
            );
        }
        assert_eq!(grouped.state_hash_bytes(), again.state_hash_bytes());
        let stats = grouped.machine.as_ref().unwrap().batch_stats();
        // Runs of three: a, b, cas and append, nonsense, get b (`get a` alone takes
        // the per-command path).
        assert_eq!((stats.calls, stats.fallbacks), (2, 0), "{stats:?}");
    }

    /// Apply rules decide whether runs of commands cross in one call; an entry only
    /// raises them; they survive a snapshot; a host that does not implement the rules
    /// of a snapshot refuses to restore it.
    #[test]
    fn apply_rules_rise_only_decide_batching_and_travel_in_snapshots() {
        let kv = example("kv");
        let mut app = WasmApp::new(MachineConfig::default());
        let mut reference = WasmApp::new(MachineConfig::default());
        assert_eq!(app.apply_rules(), APPLY_RULES_ONE_CALL_PER_COMMAND);
        let mut slot = 0;
        let mut apply_slot = |app: &mut WasmApp, reference: &mut WasmApp, payloads: &[Vec<u8>]| {
            slot += 1;
            let context = ctx(slot);
            let payloads: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let mut results = Vec::new();
            app.apply_all(&payloads, &context, &mut results);
            for payload in &payloads {
                reference.apply(payload, &context);
            }
            results
        };
        apply_slot(&mut app, &mut reference, &[install_envelope(&kv, false)]);
        let run = [command_envelope(b"put a 1"), command_envelope(b"put b 2")];
        apply_slot(&mut app, &mut reference, &run);
        assert_eq!(app.batch_stats().calls, 0, "rules 1: one call per command");
        // Under rules 1 the state is byte for byte the one-by-one state.
        assert_eq!(app.state_hash_bytes(), reference.state_hash_bytes());

        let results = apply_slot(
            &mut app,
            &mut reference,
            &[apply_rules_envelope(APPLY_RULES_BATCHES)],
        );
        assert_eq!(
            AppResult::decode(&results[0]),
            AppResult::ApplyRules { rules: 2 }
        );
        apply_slot(&mut app, &mut reference, &run);
        assert_eq!(app.batch_stats().calls, 1, "rules 2: the run in one call");
        let lower = apply_slot(&mut app, &mut reference, &[apply_rules_envelope(1)]);
        assert_eq!(
            AppResult::decode(&lower[0]),
            AppResult::ApplyRules { rules: 2 },
            "rules never fall"
        );
        for malformed in [vec![ENVELOPE_APPLY_RULES, 2, 0, 0], apply_rules_envelope(0)] {
            let refused = apply_slot(&mut app, &mut reference, &[malformed]);
            assert_eq!(
                AppResult::decode(&refused[0]),
                AppResult::Rejected("malformed apply-rules entry".into())
            );
        }
        assert_eq!(app.apply_rules(), APPLY_RULES_BATCHES);

        let snapshot = snapshot_file_round_trip(&mut app, slot);
        assert_eq!(snapshot.app.apply_rules, APPLY_RULES_BATCHES);
        let restored = WasmApp::from_snapshot(app.compiler(), &snapshot).unwrap();
        assert_eq!(restored.apply_rules(), APPLY_RULES_BATCHES);
        let mut older = Compiler::new(MachineConfig::default());
        older.set_apply_rules_max(APPLY_RULES_ONE_CALL_PER_COMMAND);
        let error = WasmApp::check_snapshot_rules(&older, &snapshot).unwrap_err();
        assert_eq!(
            error,
            format!(
                "the snapshot of slot {slot} puts apply rules 2 in force; this host \
                 implements rules 1 to 1: run a newer paxwasm on this replica"
            )
        );
        assert_eq!(
            WasmApp::check_snapshot_rules(app.compiler(), &snapshot),
            Ok(())
        );
    }

    /// A rules entry takes effect at the payload after it, also inside one group.
    #[test]
    fn an_apply_rules_entry_inside_a_group_takes_effect_at_the_next_payload() {
        let kv = example("kv");
        let mut app = WasmApp::new(MachineConfig::default());
        let mut results = Vec::new();
        app.apply_all(&[&install_envelope(&kv, false)], &ctx(1), &mut results);
        let payloads = [
            command_envelope(b"put a 1"),
            command_envelope(b"put b 2"),
            apply_rules_envelope(APPLY_RULES_BATCHES),
            command_envelope(b"put c 3"),
            command_envelope(b"put d 4"),
        ];
        let payloads: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        results.clear();
        app.apply_all(&payloads, &ctx(2), &mut results);
        assert_eq!(results.len(), 5);
        let stats = app.batch_stats();
        assert_eq!((stats.calls, stats.commands), (1, 2), "c and d in one call");
    }

    #[test]
    fn a_flipped_byte_changes_the_state_hash_and_flipping_back_restores_it() {
        let kv = example("kv");
        let mut app = WasmApp::new(MachineConfig::default());
        assert_eq!(app.state_hash_bytes(), None);
        assert!(app.debug_flip_byte(0).is_err(), "no module yet");
        let context = ctx(1);
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
        let kv = example("kv");
        let mut app = WasmApp::new(MachineConfig::default());
        let context = ctx(3);
        app.apply(&install_envelope(&kv, false), &context);
        app.apply(&command_envelope(b"put a 1"), &context);
        app.apply(&command_envelope(b"put b 2"), &context);
        let address = members::check_address("127.0.0.1:7104", "127.0.0.1:7004").unwrap();
        let recorded = app.apply(&members::address_envelope(4, &address), &context);
        assert_eq!(AppResult::decode(&recorded), AppResult::AddressRecorded);
        assert_eq!(app.addresses().get(4), Some(&address));
        app.note_members(&crate::paxos::Configuration::with_learners([1], [4]));
        let snapshot = snapshot_file_round_trip(&mut app, 3);
        let mut restored = WasmApp::from_snapshot(app.compiler(), &snapshot).unwrap();
        assert_eq!(restored.addresses(), app.addresses());
        // Ids are never reused, across snapshots too.
        assert!(restored.addresses().was_member.contains(&4));
        let again = restored.apply(&members::address_envelope(4, &address), &context);
        assert_eq!(
            AppResult::decode(&again),
            AppResult::Rejected(members::reused_id(4))
        );
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

    /// The bytes of an example guest (built on first use).
    fn example(name: &str) -> Vec<u8> {
        std::fs::read(crate::examples::example_module(name).unwrap()).unwrap()
    }

    fn ctx(slot: u64) -> ApplyContext {
        ApplyContext {
            slot,
            timestamp_ms: 0,
            seed: 0,
        }
    }

    /// Applies `module` as chunk entries from `slot` on; returns the next slot.
    fn stage_all(app: &mut WasmApp, module: &[u8], chunk_bytes: usize, mut slot: u64) -> u64 {
        let sha = crate::machine::ModuleId::of(module).0;
        for (n, chunk) in module.chunks(chunk_bytes).enumerate() {
            let envelope =
                upgrade::chunk_envelope(&sha, module.len() as u64, (n * chunk_bytes) as u64, chunk);
            let result = AppResult::decode(&app.apply(&envelope, &ctx(slot)));
            assert!(matches!(result, AppResult::Staged { .. }), "{result:?}");
            slot += 1;
        }
        slot
    }

    #[test]
    fn a_staged_module_is_switched_to_at_its_upgrade_slot_with_migration() {
        let kv = example("kv");
        let kv_v2 = example("kv_v2");
        let kv_sha = crate::machine::ModuleId::of(&kv).0;
        let v2_sha = crate::machine::ModuleId::of(&kv_v2).0;
        let mut app = WasmApp::new(MachineConfig::default());
        let slot = stage_all(&mut app, &kv, 10_000, 1);
        let result = app.apply(&upgrade::upgrade_envelope(&kv_sha, false), &ctx(slot));
        assert_eq!(
            AppResult::decode(&result),
            AppResult::Installed {
                module: upgrade::module_name(&kv_sha)
            }
        );
        assert!(
            app.staging().is_none(),
            "an upgrade empties the staging area"
        );
        app.apply(&command_envelope(b"put a 1"), &ctx(slot + 1));
        // Half of v2 staged, a command in between, then a duplicate chunk (a retried
        // proposal) and an out-of-place one.
        let half = kv_v2.len() / 2;
        let total = kv_v2.len() as u64;
        let first = upgrade::chunk_envelope(&v2_sha, total, 0, &kv_v2[..half]);
        let mut slot = slot + 2;
        for _ in 0..2 {
            let result = AppResult::decode(&app.apply(&first, &ctx(slot)));
            assert_eq!(
                result,
                AppResult::Staged {
                    staged_bytes: half as u64
                }
            );
            slot += 1;
        }
        app.apply(&command_envelope(b"put b 2"), &ctx(slot));
        let gap = upgrade::chunk_envelope(&v2_sha, total, half as u64 + 1, &kv_v2[half + 1..]);
        assert!(matches!(
            AppResult::decode(&app.apply(&gap, &ctx(slot + 1))),
            AppResult::Rejected(reason) if reason.contains("are staged")
        ));
        // An upgrade naming a module that is not completely staged fails, recorded.
        let early = app.apply(&upgrade::upgrade_envelope(&v2_sha, true), &ctx(slot + 2));
        assert!(matches!(
            AppResult::decode(&early),
            AppResult::InstallFailed { reason } if reason.contains("not completely staged")
        ));
        assert_eq!(app.history().last().unwrap().index, slot + 2);
        // A snapshot taken now carries the half-staged module; the restored replica
        // finishes staging and switches like the original.
        let snapshot = snapshot_file_round_trip(&mut app, slot + 2);
        let mut restored =
            WasmApp::from_snapshot(&Compiler::new(MachineConfig::default()), &snapshot).unwrap();
        let rest = upgrade::chunk_envelope(&v2_sha, total, half as u64, &kv_v2[half..]);
        let upgrade_entry = upgrade::upgrade_envelope(&v2_sha, true);
        for app in [&mut app, &mut restored] {
            let result = AppResult::decode(&app.apply(&rest, &ctx(slot + 3)));
            assert_eq!(
                result,
                AppResult::Staged {
                    staged_bytes: total
                }
            );
            let result = AppResult::decode(&app.apply(&upgrade_entry, &ctx(slot + 4)));
            assert!(matches!(result, AppResult::Installed { .. }), "{result:?}");
            assert_eq!(app.query(b"get b"), Some(Ok(b"2".to_vec())));
            assert_eq!(app.query(b"version a"), Some(Ok(b"1".to_vec())));
            assert_eq!(
                app.current(),
                Some(&(upgrade::module_name(&v2_sha), slot + 4))
            );
        }
        assert_eq!(restored.state_hash(), app.state_hash());
        assert_eq!(restored.history(), app.history());
    }

    #[test]
    fn a_failed_migration_keeps_the_old_module_and_a_new_upload_replaces_the_staging() {
        let kv = example("kv");
        let counter = example("counter");
        let kv_sha = crate::machine::ModuleId::of(&kv).0;
        let counter_sha = crate::machine::ModuleId::of(&counter).0;
        let mut app = WasmApp::new(MachineConfig::default());
        let kv_slot = stage_all(&mut app, &kv, 1 << 20, 1);
        let slot = kv_slot;
        app.apply(&upgrade::upgrade_envelope(&kv_sha, false), &ctx(slot));
        app.apply(&command_envelope(b"put a 1"), &ctx(slot + 1));
        let hash = app.state_hash();
        // An upload of kv_v2 left half done is replaced by an upload of counter.
        let kv_v2 = example("kv_v2");
        let v2_sha = crate::machine::ModuleId::of(&kv_v2).0;
        let half = upgrade::chunk_envelope(&v2_sha, kv_v2.len() as u64, 0, &kv_v2[..100]);
        app.apply(&half, &ctx(slot + 2));
        let slot = stage_all(&mut app, &counter, 1 << 20, slot + 3);
        assert_eq!(app.staging().unwrap().sha256, counter_sha);
        let rest = upgrade::chunk_envelope(&v2_sha, kv_v2.len() as u64, 100, &kv_v2[100..]);
        assert!(matches!(
            AppResult::decode(&app.apply(&rest, &ctx(slot))),
            AppResult::Rejected(reason) if reason.contains("another upload replaced it")
        ));
        // counter has no import hook: the migration fails and kv stays, state intact.
        let result = app.apply(
            &upgrade::upgrade_envelope(&counter_sha, true),
            &ctx(slot + 1),
        );
        let AppResult::InstallFailed { reason } = AppResult::decode(&result) else {
            panic!("{result:?}")
        };
        assert!(reason.contains("paxwasm_import_state"), "{reason}");
        assert_eq!(
            app.current(),
            Some(&(upgrade::module_name(&kv_sha), kv_slot))
        );
        assert_eq!(app.state_hash(), hash);
        assert_eq!(app.query(b"get a"), Some(Ok(b"1".to_vec())));
        let last = app.history().last().unwrap();
        assert_eq!(
            (last.module.as_str(), last.index, last.migrated),
            (upgrade::module_name(&counter_sha).as_str(), slot + 1, true)
        );
        assert!(app.staging().is_none());
    }

    #[test]
    fn envelopes_carry_their_kind() {
        assert_eq!(command_envelope(b"put a 1"), b"\0put a 1");
        assert_eq!(install_envelope(b"\0asm", true), b"\x01\x01\0asm");
    }

    #[test]
    fn commands_before_any_module_say_so_and_garbage_is_rejected() {
        let mut app = WasmApp::new(MachineConfig::default());
        let context = ctx(1);
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
