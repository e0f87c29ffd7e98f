//! The core task's snapshot duties: taking snapshots every `snapshot_entries` applied
//! entries (or `snapshot_log_bytes` of applied commands), compacting the store once one is
//! durable, shipping snapshots to peers the core names (`Action::SendSnapshot`) or that
//! ask, and installing snapshots received from peers.
//!
//! Only the capture runs on the core task: the machine image, the applier state and the
//! application metadata at the applied index (the apply-loop pause). Writing, hashing,
//! verifying, compiling a received module and every `fsync` run on the snapshot worker
//! thread, which reports back on a channel the core loop selects on; the core keeps
//! persisting, replying and applying meanwhile. Reading and writing transfer chunks
//! (at most `chunk_bytes` each, from and to the page cache) are done inline.

use std::collections::HashMap;
use std::fs::File;
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;

use std::sync::Arc;

use crate::paxos::{
    Applier, ApplyContext, Configuration, Event, NodeId, Slot, StateMachine, Value,
};

use super::super::app::WasmApp;
use super::super::codec::{self, WireMessage};
use super::super::snapshot::{
    self, SnapshotContents, SnapshotDir, SnapshotFile, SnapshotId, SNAPSHOTS_KEPT,
};
use super::super::transfer::{ChunkVerdict, Receiver, Senders, TransferConfig, TransferMessage};
use super::super::upgrade::Compiler;
use super::Loop;

/// When to snapshot, and how to transfer. Part of `NodeConfig`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotConfig {
    /// Snapshot after this many applied entries (slots) since the previous snapshot.
    pub entries: u64,
    /// ... or after this many bytes of applied commands, whichever comes first.
    pub log_bytes: u64,
    pub transfer: TransferConfig,
    /// Test hook: the worker sleeps this long between writing a snapshot's temporary
    /// file and syncing/renaming it, so a test can kill -9 the process mid-write.
    #[doc(hidden)]
    pub write_pause_ms: u64,
}

impl Default for SnapshotConfig {
    fn default() -> SnapshotConfig {
        SnapshotConfig {
            entries: 10_000,
            log_bytes: 64 * 1024 * 1024,
            transfer: TransferConfig::default(),
            write_pause_ms: 0,
        }
    }
}

/// Work for the snapshot worker thread.
pub(crate) enum Job {
    /// Boxed: the capture is large beside the other variant.
    Write(Box<SnapshotContents>),
    /// Verify the complete partial file of `id`, rebuild the application from it and make
    /// it the newest durable snapshot.
    Install { id: SnapshotId, forced: bool },
}

/// What the worker reports back.
pub(crate) enum Done {
    Saved {
        file: SnapshotFile,
        write_us: u64,
    },
    SaveFailed {
        slot: Slot,
        reason: String,
    },
    Installed {
        file: SnapshotFile,
        applier_state: Vec<u8>,
        app: Box<WasmApp>,
        configuration: Configuration,
        forced: bool,
    },
    InstallFailed {
        id: SnapshotId,
        reason: String,
    },
}

/// The snapshot state of the core task.
pub(crate) struct Snapshots {
    pub dir: SnapshotDir,
    pub config: SnapshotConfig,
    /// Durable snapshot files, newest first (at most `SNAPSHOTS_KEPT`).
    pub files: Vec<SnapshotFile>,
    /// Applied index of the newest snapshot taken, restored or installed; the triggers
    /// count from it.
    pub last_slot: Slot,
    pub log_bytes_since: u64,
    pub writing: bool,
    /// Peers that asked for a snapshot this replica does not have (nodes joining the
    /// cluster, docs/notes/members.md): one is taken at the next turn, whatever the
    /// triggers, and offered to them once durable.
    pub wanted_by: Vec<NodeId>,
    jobs: std_mpsc::SyncSender<Job>,
    pub done: mpsc::UnboundedReceiver<Done>,
    pub senders: Senders,
    pub receiver: Receiver,
    /// Files being sent, per peer (kept open: a pruned file stays readable).
    open_files: HashMap<NodeId, (SnapshotId, File)>,
    started: Instant,
}

impl Snapshots {
    /// Starts the worker thread. `files` are the durable snapshots found at start,
    /// newest first; `restored_slot` is the slot the state was restored from (0: none).
    pub fn start(
        dir: SnapshotDir,
        config: SnapshotConfig,
        compiler: Arc<Compiler>,
        files: Vec<SnapshotFile>,
        restored_slot: Slot,
    ) -> std::io::Result<Snapshots> {
        // One job queued at most: a capture is taken only when the previous write is done.
        let (jobs, job_rx) = std_mpsc::sync_channel(1);
        let (done_tx, done) = mpsc::unbounded_channel();
        let worker_dir = dir.clone();
        std::thread::Builder::new()
            .name("snapshot-worker".into())
            .spawn({
                let pause_ms = config.write_pause_ms;
                move || worker(worker_dir, compiler, pause_ms, job_rx, done_tx)
            })?;
        Ok(Snapshots {
            dir,
            senders: Senders::new(config.transfer.clone(), 0),
            receiver: Receiver::new(config.transfer.clone()),
            config,
            files,
            last_slot: restored_slot,
            log_bytes_since: 0,
            writing: false,
            wanted_by: Vec::new(),
            jobs,
            done,
            open_files: HashMap::new(),
            started: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn newest(&self) -> Option<&SnapshotFile> {
        self.files.first()
    }

    fn add_file(&mut self, file: SnapshotFile) {
        self.files.retain(|f| f.id.slot != file.id.slot);
        self.files.push(file);
        self.files.sort_by_key(|f| std::cmp::Reverse(f.id.slot));
        self.files.truncate(SNAPSHOTS_KEPT);
    }
}

fn worker(
    dir: SnapshotDir,
    compiler: Arc<Compiler>,
    write_pause_ms: u64,
    jobs: std_mpsc::Receiver<Job>,
    done: mpsc::UnboundedSender<Done>,
) {
    while let Ok(job) = jobs.recv() {
        let report = match job {
            Job::Write(contents) => {
                let started = Instant::now();
                match dir.write_pausing(&contents, write_pause_ms) {
                    Ok(file) => Done::Saved {
                        file,
                        write_us: started.elapsed().as_micros() as u64,
                    },
                    Err(error) => Done::SaveFailed {
                        slot: contents.slot,
                        reason: error.to_string(),
                    },
                }
            }
            Job::Install { id, forced } => match install(&dir, &compiler, &id, forced) {
                Ok((file, applier_state, app, configuration)) => Done::Installed {
                    file,
                    applier_state,
                    app: Box::new(app),
                    configuration,
                    forced,
                },
                Err(reason) => {
                    // A bad file is not resumed: the next offer starts from scratch.
                    let _ = std::fs::remove_file(dir.partial_path(&id));
                    Done::InstallFailed { id, reason }
                }
            },
        };
        if done.send(report).is_err() {
            return;
        }
    }
}

/// Verifies a received file, rebuilds the application from it, then makes the file the
/// newest durable snapshot (only once the application was built, so a file that cannot
/// be restored never becomes a snapshot to restart from).
fn install(
    dir: &SnapshotDir,
    compiler: &Arc<Compiler>,
    id: &SnapshotId,
    forced: bool,
) -> Result<(SnapshotFile, Vec<u8>, WasmApp, Configuration), String> {
    let snapshot = dir.verify_partial(id).map_err(|e| e.to_string())?;
    // A checksum only proves the sender's file arrived intact: the applier state must
    // also decode and be of the same slot, or installing it would stop the core.
    let mut applier = Applier::new(0, NoMachine);
    applier
        .import_state(&snapshot.applier_state)
        .map_err(|error| error.to_string())?;
    if applier.applied_index != id.slot {
        return Err(format!(
            "snapshot of slot {} holds an applier state of slot {}",
            id.slot, applier.applied_index
        ));
    }
    let app = WasmApp::from_snapshot(compiler, &snapshot)?;
    if forced {
        // A repair: local snapshots newer than the majority's were taken from the
        // diverged state. Left in place they would be served to peers and loaded at
        // the next restart, bringing the divergence back (or spreading it).
        dir.remove_newer_than(id.slot)
            .map_err(|error| error.to_string())?;
    }
    let file = dir.adopt_partial(id).map_err(|e| e.to_string())?;
    // The configuration applied at its slot (whole since format version 3; the decoder
    // refuses one without voters).
    Ok((file, snapshot.applier_state, app, snapshot.configuration))
}

/// Stands in for the application when only an applier state is decoded and checked.
struct NoMachine;

impl StateMachine for NoMachine {
    fn apply(&mut self, _payload: &[u8], _context: &ApplyContext) -> Vec<u8> {
        unreachable!("a checked applier state is never applied to")
    }
}

/// Bytes of client data in a value, for the log-bytes trigger.
pub(crate) fn value_bytes(value: &Value) -> u64 {
    match value {
        Value::Batch(batch) => batch
            .commands
            .iter()
            .map(|command| command.payload.len() as u64)
            .sum(),
        _ => 0,
    }
}

impl Loop {
    fn send_transfer(&self, to: NodeId, message: &TransferMessage) {
        let payload = codec::encode_wire(&WireMessage::Transfer(message.clone()));
        if let Err(error) = self.core.transport.send(to, Bytes::from(payload)) {
            tracing::debug!(to, %error, "snapshot transfer message not queued");
        }
    }

    /// Takes a snapshot when enough was applied since the last one and none is being
    /// written. Called after each turn's actions, so the applied index is a slot boundary.
    pub(super) fn maybe_snapshot(&mut self) {
        let applied = self.core.applier.applied_index;
        let snap = &self.snap;
        let due = applied >= snap.last_slot + snap.config.entries
            || ((snap.log_bytes_since >= snap.config.log_bytes || !snap.wanted_by.is_empty())
                && applied > snap.last_slot);
        if !due || snap.writing {
            return;
        }
        // A diverged state must not be made durable: a restart would load it again.
        // Nor one taken while applies are held (`Loop::apply_or_hold`): its
        // configuration would come from the core, which is ahead of the state.
        if self.core.checkpoints.diverged().is_some() || !self.held.is_empty() {
            return;
        }
        // Nor one the disk has no room for (`disk.rs`): the file is written before
        // compaction frees the log, and the room above the threshold is for the
        // store. The previous snapshot's size is the estimate.
        let estimate = self
            .core
            .counters
            .snapshot_bytes_last
            .load(std::sync::atomic::Ordering::Relaxed);
        if !self.disk.room_for(estimate) {
            return;
        }
        let started = Instant::now();
        let capture = self.core.applier.machine.capture();
        let applier_state = self.core.applier.export_state();
        let contents = SnapshotContents {
            slot: applied,
            configuration: self.core.replica.applied_configuration().clone(),
            addresses: capture.addresses,
            applier_state,
            app: capture.meta,
            module_bytes: capture.module_bytes,
            image: capture.image,
            staged: capture.staged,
        };
        let pause_us = started.elapsed().as_micros() as u64;
        let counters = &self.core.counters;
        counters
            .snapshot_pause_us_last
            .store(pause_us, std::sync::atomic::Ordering::Relaxed);
        counters.add(&counters.snapshot_pause_us_total, pause_us);
        tracing::debug!(
            slot = applied,
            pause_us,
            "snapshot captured; writing it in the background"
        );
        self.snap.writing = true;
        self.snap.last_slot = applied;
        self.snap.log_bytes_since = 0;
        self.snap
            .jobs
            .send(Job::Write(Box::new(contents)))
            .expect("the snapshot worker lives as long as the core");
    }

    pub(super) fn on_snapshot_done(&mut self, done: Done) {
        use std::sync::atomic::Ordering::Relaxed;
        match done {
            Done::Saved { file, write_us } => {
                self.snap.writing = false;
                let counters = &self.core.counters;
                counters.add(&counters.snapshots_taken, 1);
                counters.snapshot_write_us_last.store(write_us, Relaxed);
                counters
                    .snapshot_bytes_last
                    .store(file.id.file_bytes, Relaxed);
                tracing::info!(
                    slot = file.id.slot,
                    bytes = file.id.file_bytes,
                    write_ms = write_us / 1000,
                    "snapshot durable"
                );
                let slot = file.id.slot;
                let id = file.id;
                self.snap.add_file(file);
                self.step(Event::SnapshotSaved { slot });
                let now = self.snap.now_ms();
                let wanted_by = std::mem::take(&mut self.snap.wanted_by);
                if self.core.checkpoints.diverged().is_some() {
                    // Diverged since the peers asked: they ask again and someone else
                    // answers.
                    return;
                }
                for peer in wanted_by {
                    tracing::info!(peer, ?id, "offering the snapshot taken for a peer");
                    let _ = self.snap.senders.offer(peer, id, now);
                    self.send_transfer(peer, &TransferMessage::Offer { id });
                }
            }
            Done::SaveFailed { slot, reason } => {
                // Not fatal: the log is simply not compacted; the next trigger retries.
                self.snap.writing = false;
                tracing::error!(slot, %reason, "writing a snapshot failed; the log is kept and the next snapshot retries");
            }
            Done::Installed {
                file,
                applier_state,
                app,
                configuration,
                forced,
            } => self.on_installed(file, applier_state, *app, configuration, forced),
            Done::InstallFailed { id, reason } => {
                self.snap.receiver.installed(false);
                self.core
                    .counters
                    .add(&self.core.counters.snapshot_install_failures, 1);
                tracing::error!(?id, %reason, "a received snapshot failed verification or restore; not installed");
            }
        }
    }

    fn on_installed(
        &mut self,
        file: SnapshotFile,
        applier_state: Vec<u8>,
        app: WasmApp,
        configuration: Configuration,
        forced: bool,
    ) {
        let slot = file.id.slot;
        let applied = self.core.applier.applied_index;
        // Applies may be held behind a compile (`Loop::apply_or_hold`): the core is
        // ahead of the state then, and a snapshot it is not behind is not installed
        // (the held applies get there).
        let core_behind = slot > self.core.replica.status().applied_index;
        self.snap.receiver.installed(true);
        if forced {
            // The worker deleted the newer (diverged) files; forget them here too.
            self.snap.files.retain(|f| f.id.slot <= slot);
        }
        self.snap.add_file(file);
        if slot > applied && core_behind {
            self.replace_state(app, &applier_state);
            self.drop_held_through(slot);
            self.step(Event::SnapshotInstalled {
                slot,
                configuration,
            });
        } else if forced {
            // Repair of a replica that is not behind: install the snapshot, then apply
            // again the chosen entries after it, which the log still holds.
            let mut values = Vec::new();
            for next in slot + 1..=applied {
                match self.core.replica.entry(next) {
                    Some(entry) if entry.chosen => values.push((next, entry.value.clone())),
                    _ => {
                        tracing::warn!(slot, applied, missing = next, "a requested snapshot is older than the log kept here; not installed (ask again)");
                        return;
                    }
                }
            }
            self.replace_state(app, &applier_state);
            self.drop_held_through(slot);
            // Their clients were answered when the slots were first applied; nothing
            // is sent to followers either.
            self.core.applier.collect_remote = false;
            let mut replies = Vec::new();
            for (next, value) in values {
                // Clients of these slots were answered when they were first applied.
                self.core.applier.apply(next, &value, &mut replies);
                if let Value::Configuration(config) = &value {
                    // The former-member set is application state kept by the runtime
                    // (`Loop::apply` does this for every applied configuration): skipping
                    // it here would let this replica's set, and its later snapshots,
                    // forget an id and allow it to be reused.
                    self.core.applier.machine.note_members(config);
                }
            }
            tracing::info!(
                slot,
                applied,
                "snapshot installed on request and the log after it applied again"
            );
        } else {
            tracing::info!(
                slot,
                applied,
                "received snapshot is not ahead of the applied state; kept on disk only"
            );
            return;
        }
        self.core
            .counters
            .add(&self.core.counters.snapshot_installs, 1);
        self.snap.last_slot = self.snap.last_slot.max(slot);
        self.snap.log_bytes_since = 0;
        // The machine changed under the published hash and module info.
        self.hashed_index = None;
        self.app_version_published = u64::MAX;
        tracing::info!(slot, "snapshot installed");
        self.on_state_replaced();
    }

    fn replace_state(&mut self, app: WasmApp, applier_state: &[u8]) {
        let previous = std::mem::replace(&mut self.core.applier.machine, app);
        if let Err(error) = self.core.applier.import_state(applier_state) {
            // The file was verified (sha256) and restored, so its applier state is ours
            // to read: a decode error is a build mismatch, not a network fault.
            self.core.applier.machine = previous;
            panic!("a verified snapshot holds an applier state this build cannot read: {error}");
        }
    }

    /// `Action::SendSnapshot`: offer `to` the newest durable snapshot, unless a transfer
    /// to it is already running.
    pub(super) fn send_snapshot(&mut self, to: NodeId, slot: Slot) {
        // This replica's state (and maybe its newest snapshots) differ from the
        // majority's: let a peer that agrees ship it.
        if self.core.checkpoints.diverged().is_some() {
            return;
        }
        let Some(newest) = self.snap.newest().map(|f| f.id) else {
            tracing::warn!(
                to,
                slot,
                "a peer needs a snapshot but none is durable here yet"
            );
            return;
        };
        if newest.slot + 1 < slot {
            tracing::warn!(
                to,
                slot,
                newest = newest.slot,
                "the newest snapshot does not cover what the peer needs"
            );
            return;
        }
        let now = self.snap.now_ms();
        if let Some(offer) = self.snap.senders.offer(to, newest, now) {
            tracing::info!(
                to,
                ?newest,
                "offering a snapshot to a peer that is behind the compacted log"
            );
            self.core
                .counters
                .add(&self.core.counters.snapshot_transfers_sent, 1);
            self.send_transfer(to, &offer);
        }
    }

    /// Makes this replica ask `from` for its newest snapshot and install it even if this
    /// replica is not behind (divergence repair, see docs/notes/node-snap.md). The
    /// snapshot replaces the machine and the applier state; entries applied here after
    /// its slot are applied again from the log.
    // Called by the state-hash checkpoints (`Loop::request_repair`) to repair a
    // diverged replica.
    pub(crate) fn request_snapshot(&mut self, from: NodeId) {
        let now = self.snap.now_ms();
        match self.snap.receiver.request(from, now) {
            Some(request) => {
                tracing::info!(from, "asking a peer for its newest snapshot");
                self.send_transfer(from, &request);
            }
            None => tracing::info!(
                from,
                "a snapshot is being installed; not asking for another now"
            ),
        }
    }

    pub(super) fn on_transfer(&mut self, from: NodeId, message: TransferMessage) {
        let now = self.snap.now_ms();
        match message {
            TransferMessage::Request { slot_min } => {
                if self.core.checkpoints.diverged().is_some() {
                    // Never seed a peer from state a checkpoint showed to be wrong.
                    return;
                }
                let Some(newest) = self
                    .snap
                    .newest()
                    .map(|f| f.id)
                    .filter(|newest| newest.slot >= slot_min)
                else {
                    // The asker retries; by then the snapshot taken for it is durable.
                    tracing::info!(
                        from,
                        slot_min,
                        "a peer asks for a snapshot and none covers it here: taking one"
                    );
                    if !self.snap.wanted_by.contains(&from) {
                        self.snap.wanted_by.push(from);
                    }
                    return;
                };
                if newest.slot >= slot_min {
                    let _ = self.snap.senders.offer(from, newest, now);
                    self.send_transfer(from, &TransferMessage::Offer { id: newest });
                }
            }
            TransferMessage::Offer { id } => {
                let partial = self.snap.dir.partial_path(&id);
                let partial_len = snapshot::partial_len(&partial);
                let applied = self
                    .core
                    .applier
                    .applied_index
                    .max(self.core.replica.status().applied_index);
                if let Some(fetch) =
                    self.snap
                        .receiver
                        .on_offer(from, id, applied, partial_len, now)
                {
                    tracing::info!(
                        from,
                        ?id,
                        resume_from = partial_len.min(id.file_bytes),
                        "receiving a snapshot"
                    );
                    if let Err(error) = self.snap.dir.remove_partials_except(Some(&id)) {
                        tracing::warn!(%error, "cannot remove old partial snapshot files");
                    }
                    self.send_transfer(from, &fetch);
                }
            }
            TransferMessage::Fetch { id, offset, resend } => {
                let available = self.snap.files.iter().any(|f| f.id == id);
                if let Some(reply) = self
                    .snap
                    .senders
                    .on_fetch(from, id, offset, resend, available, now)
                {
                    self.send_transfer(from, &reply);
                }
                self.pump_chunks();
            }
            TransferMessage::Chunk { id, offset, data } => {
                let len = data.len() as u64;
                match self.snap.receiver.on_chunk(from, id, offset, len, now) {
                    ChunkVerdict::Ignore => {}
                    ChunkVerdict::Refetch(fetch) => self.send_transfer(from, &fetch),
                    ChunkVerdict::Write => {
                        let path = self.snap.dir.partial_path(&id);
                        if let Err(error) = snapshot::write_partial_at(&path, &data, offset) {
                            tracing::error!(%error, path = %path.display(), "cannot write a received snapshot chunk; the transfer retries");
                            return;
                        }
                        let (ack, complete) = self.snap.receiver.written(len, now);
                        self.core
                            .counters
                            .add(&self.core.counters.snapshot_transfer_bytes_received, len);
                        self.send_transfer(from, &ack);
                        if complete {
                            tracing::info!(
                                from,
                                ?id,
                                "snapshot received; verifying and installing it"
                            );
                            let forced = matches!(
                                self.snap.receiver.state,
                                super::super::transfer::Incoming::Installing { forced: true, .. }
                            );
                            self.snap
                                .jobs
                                .send(Job::Install { id, forced })
                                .expect("the snapshot worker lives as long as the core");
                        }
                    }
                }
            }
            TransferMessage::Gone { id } => {
                if let Some(request) = self.snap.receiver.on_gone(from, id, now) {
                    self.send_transfer(from, &request);
                }
            }
        }
    }

    /// Per tick: receiver retries, sender re-offers, and the chunks the throttle allows.
    pub(super) fn transfer_tick(&mut self) {
        let now = self.snap.now_ms();
        if let Some((to, message)) = self.snap.receiver.poll(now) {
            self.send_transfer(to, &message);
        }
        self.pump_chunks();
    }

    fn pump_chunks(&mut self) {
        let now = self.snap.now_ms();
        let mut reads = Vec::new();
        for (to, message) in self.snap.senders.poll(now, &mut reads) {
            self.send_transfer(to, &message);
        }
        for read in reads {
            let cached =
                matches!(self.snap.open_files.get(&read.to), Some((id, _)) if *id == read.id);
            if !cached {
                let Some(path) = self
                    .snap
                    .files
                    .iter()
                    .find(|f| f.id == read.id)
                    .map(|f| f.path.clone())
                else {
                    self.snap.senders.cancel(read.to);
                    self.send_transfer(read.to, &TransferMessage::Gone { id: read.id });
                    continue;
                };
                match File::open(&path) {
                    Ok(file) => {
                        self.snap.open_files.insert(read.to, (read.id, file));
                    }
                    Err(error) => {
                        tracing::warn!(%error, path = %path.display(), "cannot open a snapshot to send");
                        self.snap.senders.cancel(read.to);
                        self.send_transfer(read.to, &TransferMessage::Gone { id: read.id });
                        continue;
                    }
                }
            }
            let (_, file) = &self.snap.open_files[&read.to];
            let mut data = vec![0; read.len as usize];
            if let Err(error) = snapshot::read_at(file, &mut data, read.offset) {
                tracing::warn!(%error, "cannot read a snapshot chunk");
                continue;
            }
            let payload = codec::encode_chunk(&read.id, read.offset, &data);
            self.core
                .counters
                .add(&self.core.counters.snapshot_transfer_bytes_sent, read.len);
            if let Err(error) = self.core.transport.send(read.to, Bytes::from(payload)) {
                // The receiver notices the gap and asks again.
                tracing::debug!(to = read.to, %error, "snapshot chunk not queued");
            }
        }
        let senders = &self.snap.senders;
        self.snap
            .open_files
            .retain(|peer, _| senders.is_sending_to(*peer));
    }
}
