//! `Node`: the running replica as its front ends see it (`NodeApi`), and `start`, which
//! opens the store, recovers, starts the transport and spawns the core task.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::machine::{Machine, MachineConfig, ModuleId};
use crate::net::{Transport, TransportConfig};
use crate::paxos::{
    Applier, Ballot, Configuration, IdempotencyKey, NodeId, ReadMode, Replica, SplitMix64,
};
use crate::storage::Store;

use super::app::{command_envelope, WasmApp};
use super::checkpoint::{CheckpointStatus, Checkpoints};
use super::config::NodeConfig;
use super::handle::{
    AppInfo, CheckpointView, ClusterView, CommandError, CommandOk, CommandRequest, Consistency,
    DeployError, DeployOk, DiskView, FlipError, FlipOk, MemberChange, MemberError, ModuleEvent,
    NodeApi, PeerView, QueryError, QueryOk, Readiness, StatusView,
};
use super::members::AddressBook;
use super::runtime::{self, Core, PeerSeen, Request, Snapshots};
use super::snapshot::{SnapshotDir, SnapshotFile};
use super::upgrade::{self, Compiler, MODULE_CHUNK_BYTES};

/// Monotone counters of the runtime, read by `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub commands_applied: AtomicU64,
    pub slots_applied: AtomicU64,
    /// Runs of a slot's commands that crossed into the guest in one call, and
    /// those of them that failed there and were applied command by command.
    pub apply_batch_calls: AtomicU64,
    pub apply_batch_commands: AtomicU64,
    pub apply_batch_fallbacks: AtomicU64,
    /// Time spent applying batches, summed.
    pub apply_us: AtomicU64,
    pub persists: AtomicU64,
    pub persist_entries: AtomicU64,
    /// Commands of this replica's clients answered from an applied slot, and the time
    /// from the API handing each over to its answer, summed (queueing, consensus,
    /// syncs and apply; not HTTP).
    pub commands_answered: AtomicU64,
    pub command_core_us: AtomicU64,
    pub leader_changes: AtomicU64,
    pub decode_errors: AtomicU64,
    /// Forwarded commands answered from the result a peer (the leader) sent.
    pub results_from_peers: AtomicU64,
    /// Peer checkpoint reports whose hash differed from this replica's.
    pub checkpoint_mismatches: AtomicU64,
    /// Checkpoints taken, and the time spent hashing the state for them.
    pub checkpoints: AtomicU64,
    pub checkpoint_hash_us: AtomicU64,
    pub snapshots_taken: AtomicU64,
    /// Apply-loop pause of the latest snapshot capture, and the sum of all.
    pub snapshot_pause_us_last: AtomicU64,
    pub snapshot_pause_us_total: AtomicU64,
    /// Background write (incl. fsyncs) of the latest snapshot, and its size.
    pub snapshot_write_us_last: AtomicU64,
    pub snapshot_bytes_last: AtomicU64,
    pub snapshot_installs: AtomicU64,
    pub snapshot_install_failures: AtomicU64,
    pub snapshot_transfers_sent: AtomicU64,
    pub snapshot_transfer_bytes_sent: AtomicU64,
    pub snapshot_transfer_bytes_received: AtomicU64,
    /// Peer messages dropped because this replica is low on disk space.
    pub disk_low_dropped: AtomicU64,
}

impl Counters {
    pub fn add(&self, counter: &AtomicU64, amount: u64) {
        counter.fetch_add(amount, Ordering::Relaxed);
    }
}

/// What the core task last published about itself.
#[derive(Clone, Debug)]
pub(crate) struct Published {
    pub role: &'static str,
    /// `voter`, `learner` or `outside` in the configuration this replica knows chosen.
    pub membership: &'static str,
    /// The applied configuration (`None` before the core runs: a joining node).
    pub configuration: Option<Configuration>,
    /// The address book at the applied index.
    pub addresses: AddressBook,
    pub leader: Option<NodeId>,
    pub ballot: Ballot,
    pub commit_index: u64,
    pub applied_index: u64,
    /// Slot of the newest durable snapshot (0: none).
    pub snapshot_index: u64,
    /// The apply rules in force at the applied index.
    pub apply_rules: u32,
    pub module: Option<(String, u64)>,
    pub history: Vec<ModuleEvent>,
    pub state_hash: Option<(u64, String)>,
    /// Set by each status read, taken by the core at its next state-hash tick: the
    /// status hash is refreshed every `state_hash_interval_ms` while someone reads
    /// it, and every `state_hash_idle_interval_ms` otherwise.
    pub state_hash_wanted: bool,
    pub peers: BTreeMap<NodeId, PeerSeen>,
    pub requests_pending: usize,
    pub dedup_clients: usize,
    pub checkpoint: Option<CheckpointStatus>,
    /// Why this replica serves no reads: its state diverged from the majority's.
    pub diverged: Option<String>,
    /// False for a member that lost its data and came back (`--rejoin`).
    pub voting: bool,
    /// Free space of the data directory's filesystem, and whether it is too low to
    /// take part in writes.
    pub disk: runtime::DiskWatch,
    /// While applying is paused at an upgrade slot for this replica's compile of its
    /// module: the module, the slot and since when; and how many actions wait.
    pub applying_held: Option<([u8; 32], u64, std::time::Instant)>,
    pub applies_held: usize,
}

struct Inner {
    id: NodeId,
    http_advertise: String,
    requests: mpsc::Sender<Request>,
    /// False while a node that joins without `--cluster` waits for its snapshot.
    core_running: Arc<std::sync::atomic::AtomicBool>,
    published: Arc<Mutex<Published>>,
    counters: Arc<Counters>,
    store: Arc<Store>,
    transport: Option<Arc<Transport>>,
    machine: MachineConfig,
    /// The replica's background compiles; a deploy waits for its module's here.
    compiler: Arc<Compiler>,
    /// One module upload at a time from this node: two of its own would replace each
    /// other's staging area.
    uploading: tokio::sync::Mutex<()>,
    command_bytes_max: usize,
    request_timeout: Duration,
    retry_after_ms: u64,
    test_hooks: bool,
}

/// A running replica. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

/// Stops the core task; see `Running::stop`.
pub struct Running {
    shutdown: watch::Sender<bool>,
    core: Option<JoinHandle<()>>,
}

impl Running {
    /// Stops the core after its current turn (queued persists still complete) and waits.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(core) = self.core.take() {
            let _ = core.await;
        }
    }
}

/// Maps an `Idempotency-Key` header to the core's dedup key: the client id is the first
/// 8 bytes (little-endian) of SHA-256("paxwasm-idempotency-key-v1\0" ‖ key) and the
/// sequence number is always 1. Every key is thus its own client with one request, so a
/// retry is a duplicate of the first (same result, never applied twice), deterministically
/// on every replica; the table is bounded by the core (`DEDUP_CLIENTS_MAX`, oldest
/// evicted first). Distinct keys collide with probability about n²/2⁶⁵.
pub fn idempotency_key(key: &str) -> IdempotencyKey {
    let mut hasher = Sha256::new();
    hasher.update(b"paxwasm-idempotency-key-v1\0");
    hasher.update(key.as_bytes());
    let digest = hasher.finalize();
    let client = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes of a digest"));
    IdempotencyKey { client, seq: 1 }
}

/// Opens the store in `config.data_dir` (refusing another node's or cluster's), rebuilds
/// the core from it, starts the peer transport and the core task.
pub async fn start(config: NodeConfig) -> anyhow::Result<(Node, Running)> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    if !config.members.is_empty() {
        anyhow::ensure!(
            config.members.contains_key(&config.id),
            "--cluster does not name this node's id {}",
            config.id
        );
    }
    let (store, recovered) = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            Store::open_with(
                config.storage.clone(),
                &config.data_dir,
                &config.cluster_id,
                config.id,
            )
        })
        .await
        .expect("store open task panicked")
        .map_err(|error| anyhow::anyhow!("{error}"))?
    };
    let store = Arc::new(store);
    let amnesic = amnesia(&config, &store, &recovered).await?;

    let mut transport_config =
        TransportConfig::new(config.id, config.cluster_hash(), config.peer_listen);
    // The peers of `--cluster` to begin with; once the core runs, the transport follows
    // the applied configuration and the address book (`runtime/membership.rs`).
    transport_config.peers = config
        .members
        .iter()
        .filter(|(id, _)| **id != config.id)
        .map(|(id, addr)| (*id, *addr))
        .collect();
    transport_config.frame_bytes_max = config.frame_bytes_max;
    transport_config.queue_bytes_max = transport_config
        .queue_bytes_max
        .max(2 * config.frame_bytes_max as usize);
    let (transport, inbound) = Transport::start(transport_config).await?;
    let transport = Arc::new(transport);

    let mut compiler = if config.debug_refuse_compiles {
        Compiler::refusing(config.machine.clone())
    } else if config.debug_compile_delay_ms > 0 {
        Compiler::slowed(
            config.machine.clone(),
            Duration::from_millis(config.debug_compile_delay_ms),
        )
    } else {
        Compiler::new(config.machine.clone())
    };
    compiler.set_apply_rules_max(config.apply_rules_max);
    let restored = restore_newest_snapshot_blocking(&config, &compiler).await?;
    let store_is_empty = holds_no_acceptor_state(&recovered);
    let joining = config.members.is_empty() && restored.state.is_none();
    if joining {
        anyhow::ensure!(
            store_is_empty,
            "{} holds acceptor state but no snapshot, and no --cluster was given: start it \
             with the --cluster it was started with",
            config.data_dir.display()
        );
    }

    let published = Arc::new(Mutex::new(Published {
        role: if joining { "joining" } else { "follower" },
        membership: "outside",
        configuration: None,
        addresses: AddressBook::default(),
        leader: None,
        ballot: recovered
            .promised
            .map(|b| Ballot {
                round: b.round,
                node: b.node,
            })
            .unwrap_or(Ballot::ZERO),
        commit_index: recovered.chosen.unwrap_or(0).max(restored.slot()),
        applied_index: restored.slot(),
        snapshot_index: restored.slot(),
        apply_rules: restored
            .state
            .as_ref()
            .map_or(super::app::APPLY_RULES_ONE_CALL_PER_COMMAND, |(app, ..)| {
                app.apply_rules()
            }),
        module: None,
        history: Vec::new(),
        state_hash: None,
        state_hash_wanted: false,
        peers: BTreeMap::new(),
        requests_pending: 0,
        dedup_clients: 0,
        checkpoint: None,
        diverged: None,
        voting: false,
        disk: runtime::DiskWatch::new(config.disk_free_bytes_min),
        applying_held: None,
        applies_held: 0,
    }));
    let counters = Arc::new(Counters::default());
    let (requests_tx, requests_rx) = mpsc::channel(config.requests_queued_max);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let core_running = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let parts = CoreParts {
        core_running: core_running.clone(),
        config: config.clone(),
        store: store.clone(),
        recovered,
        amnesic,
        transport: transport.clone(),
        inbound,
        compiler: compiler.clone(),
        published: published.clone(),
        counters: counters.clone(),
        requests: requests_rx,
        shutdown: shutdown_rx,
    };
    let core = if joining {
        tracing::info!(
            node = config.id,
            "no --cluster given: waiting to be added to a cluster by a membership change \
             (the first peer that contacts this node is asked for a snapshot)"
        );
        tokio::spawn(async move {
            let mut shutdown = parts.shutdown.clone();
            tokio::select! {
                _ = shutdown.changed() => {}
                launched = join_and_launch(parts, restored) => {
                    if let Err(error) = launched {
                        tracing::error!(error = %format!("{error:#}"), "joining the cluster failed; stopping");
                        eprintln!("paxwasm: joining the cluster failed: {error:#}");
                        std::process::exit(1);
                    }
                }
            }
        })
    } else {
        let (core, snapshots) = launch(parts, restored).await?;
        tokio::spawn(runtime::run(core, snapshots))
    };
    let node = Node {
        inner: Arc::new(Inner {
            id: config.id,
            http_advertise: config.http_advertise.clone(),
            requests: requests_tx,
            core_running,
            published,
            counters,
            store,
            transport: Some(transport),
            machine: config.machine.clone(),
            compiler,
            uploading: tokio::sync::Mutex::new(()),
            command_bytes_max: config.command_bytes_max,
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            retry_after_ms: config.retry_after_ms,
            test_hooks: config.test_hooks,
        }),
    };
    Ok((
        node,
        Running {
            shutdown: shutdown_tx,
            core: Some(core),
        },
    ))
}

/// What building the core task needs from `start`.
struct CoreParts {
    config: NodeConfig,
    store: Arc<Store>,
    recovered: crate::storage::Recovered,
    amnesic: bool,
    transport: Arc<Transport>,
    inbound: crate::net::InboundReceiver,
    compiler: Arc<Compiler>,
    published: Arc<Mutex<Published>>,
    counters: Arc<Counters>,
    requests: mpsc::Receiver<Request>,
    shutdown: watch::Receiver<bool>,
    core_running: Arc<std::sync::atomic::AtomicBool>,
}

/// A node started without `--cluster` on an empty store: waits for a peer to contact
/// it (the members point their transports at it once it is a learner), fetches that
/// peer's snapshot, then starts its core from the configuration and address book in it.
async fn join_and_launch(mut parts: CoreParts, restored: RestoredSnapshot) -> anyhow::Result<()> {
    let RestoredSnapshot { dir, .. } = restored;
    let id = parts.config.id;
    let mut slot_min = 1;
    let restored = loop {
        super::bootstrap::fetch_snapshot(
            &parts.config,
            &parts.transport,
            &mut parts.inbound,
            &dir,
            slot_min,
            Vec::new(),
        )
        .await?;
        let restored = restore_newest_snapshot_blocking(&parts.config, &parts.compiler).await?;
        let Some((_, _, configuration)) = &restored.state else {
            anyhow::bail!("the fetched snapshot did not restore");
        };
        if configuration.is_member(id) {
            break restored;
        }
        // Taken before this node was added: starting from it would leave the core
        // outside a configuration it never learns, unable to answer the leader.
        tracing::warn!(
            node = id,
            slot = restored.slot(),
            "the fetched snapshot predates this node's addition; asking for a newer one"
        );
        slot_min = restored.slot() + 1;
    };
    if let Some((_, _, configuration)) = &restored.state {
        if configuration.is_voter(id) && !parts.amnesic {
            // An empty store, yet the cluster counts this id as a voter: this member lost
            // its data and was restarted as if new. It forgot the promises and accepts it
            // gave, so it must never vote again under this id (Paxos is only safe if
            // acceptors never forget): the same mark `--rejoin` writes, before the core
            // starts. The operator replaces it under a new id (ids are never reused).
            tracing::error!(
                node = id,
                "this node's store is empty but the cluster lists it as a voter: it lost its \
                 data; it will learn but never vote again under this id (remove it and add \
                 the host back under a new id)"
            );
            mark_amnesic(&parts.store).await?;
            parts.amnesic = true;
        }
    }
    let (core, snapshots) = launch(parts, restored).await?;
    runtime::run(core, snapshots).await;
    Ok(())
}

/// Builds the core from the store and the restored snapshot: fetches a peer's snapshot
/// first when the store was compacted past every valid local one.
async fn launch(
    mut parts: CoreParts,
    mut restored: RestoredSnapshot,
) -> anyhow::Result<(Core, Snapshots)> {
    let config = parts.config.clone();
    let recovered = &parts.recovered;
    if recovered.log_start > restored.slot() + 1 {
        // The log before `log_start` is gone and no local snapshot covers it: the state
        // up to there can only come from a peer. Until it arrives this replica does not
        // take part (its promises and accepted entries stay on disk, untouched).
        tracing::error!(
            log_start = recovered.log_start,
            snapshot_slot = restored.slot(),
            "the store was compacted past the newest valid local snapshot; fetching a snapshot from a peer"
        );
        let dir =
            SnapshotDir::open(&config.data_dir).map_err(|error| anyhow::anyhow!("{error}"))?;
        let peers = config
            .members
            .keys()
            .copied()
            .filter(|id| *id != config.id)
            .collect();
        super::bootstrap::fetch_snapshot(
            &config,
            &parts.transport,
            &mut parts.inbound,
            &dir,
            recovered.log_start - 1,
            peers,
        )
        .await?;
        restored = restore_newest_snapshot_blocking(&config, &parts.compiler).await?;
    }
    let snapshot_slot = restored.slot();
    let mut durable = runtime::durable_state(recovered, snapshot_slot)?;
    durable.amnesic = parts.amnesic;
    tracing::info!(
        node = config.id,
        promised = ?durable.promised,
        entries = durable.log.len(),
        chosen_index = durable.chosen_index,
        snapshot_slot,
        log_start = durable.log_start,
        "recovered acceptor state; chosen slots after the snapshot are replayed through the machine"
    );
    let RestoredSnapshot {
        dir: snapshot_dir,
        files: snapshot_files,
        state,
    } = restored;
    let mut applier = Applier::new(config.id, WasmApp::with_compiler(parts.compiler.clone()));
    // The configuration in force at the snapshot (the first one, from `--cluster`, when
    // there is none); configuration entries after it come from the log.
    let configuration = match state {
        Some((app, applier_state, configuration)) => {
            applier.machine = app;
            applier.import_state(&applier_state).map_err(|error| {
                anyhow::anyhow!("restoring the snapshot at {snapshot_slot}: {error}")
            })?;
            anyhow::ensure!(
                applier.applied_index == snapshot_slot,
                "the snapshot at slot {snapshot_slot} holds an applier state at {}",
                applier.applied_index
            );
            configuration
        }
        None => Configuration::new(config.members.keys().copied()),
    };
    if applier.machine.addresses().entries.is_empty() {
        // The book at slot 0, or a version-1/2 snapshot's (which had none).
        applier
            .machine
            .seed_addresses(AddressBook::seeded(&config.members));
    }
    let seed = SplitMix64::new(runtime::first_request_id(config.id)).next_u64();
    let mut params = config.params.clone();
    // A promise this replica could not send in one peer frame is not made at all.
    params.promise_bytes_max = params
        .promise_bytes_max
        .min(config.frame_bytes_max as usize);
    let replica = Replica::restart(config.id, configuration.clone(), params, seed, durable);
    let snapshots = Snapshots::start(
        snapshot_dir,
        config.snapshot.clone(),
        parts.compiler.clone(),
        snapshot_files,
        snapshot_slot,
    )
    .context("starting the snapshot worker")?;
    let core = Core {
        id: config.id,
        replica,
        applier,
        store: parts.store,
        transport: parts.transport,
        http_advertise: config.http_advertise.clone(),
        peer_listen: config.peer_listen,
        requests: parts.requests,
        inbound: parts.inbound,
        published: parts.published,
        counters: parts.counters,
        shutdown: parts.shutdown,
        tick_ms: config.tick_ms,
        retry_after_ms: config.retry_after_ms,
        requests_pending_max: config.requests_pending_max,
        peer_info_interval_ms: config.peer_info_interval_ms,
        state_hash_interval_ms: config.state_hash_interval_ms,
        state_hash_idle_interval_ms: config.state_hash_idle_interval_ms,
        events_per_turn_max: config.events_per_turn_max,
        next_request: runtime::first_request_id(config.id),
        checkpoints: Checkpoints::new(config.id, configuration, config.checkpoint.clone()),
        checkpoint_repair_delay_ms: config.checkpoint_repair_delay_ms,
        data_dir: config.data_dir.clone(),
        disk_free_bytes_min: config.disk_free_bytes_min,
        disk_check_interval_ms: config.disk_check_interval_ms,
    };
    parts.core_running.store(true, Ordering::Relaxed);
    Ok((core, snapshots))
}

/// Start of the `/readyz` reason of a replica removed from the configuration (`paxwasm
/// dev` does not wait for such a replica to become ready).
pub const REMOVED_READINESS: &str = "removed from the cluster";

/// Metadata key of a store recreated after its member's data was lost (`--rejoin`);
/// value `[1]`. Never removed: such a replica never votes again under its id (it forgot
/// promises and accepts it gave); it is replaced by a node under a new id (node ids are
/// never reused, docs/notes/members.md).
pub const META_AMNESIC: &str = "amnesic";

/// A store that never promised, accepted, learned or compacted anything.
fn holds_no_acceptor_state(recovered: &crate::storage::Recovered) -> bool {
    recovered.promised.is_none()
        && recovered.accepted.is_empty()
        && recovered.chosen.is_none()
        && recovered.log_start <= 1
}

/// Writes the durable mark of a replica that lost its acceptor state (it never votes
/// again, `DurableState::amnesic`), synced before the core starts.
async fn mark_amnesic(store: &Store) -> anyhow::Result<()> {
    store
        .write(crate::storage::WriteBatch {
            meta: vec![(META_AMNESIC.to_string(), vec![1])],
            ..Default::default()
        })
        .await
        .map_err(|error| anyhow::anyhow!("marking the store amnesic: {error}"))
}

/// Whether this replica lost its acceptor state: its store carries the amnesic mark, or
/// it is empty and started with `--rejoin` (then the mark is written, durably, before
/// anything else, so a crash during the recovery that follows cannot forget it).
async fn amnesia(
    config: &NodeConfig,
    store: &Store,
    recovered: &crate::storage::Recovered,
) -> anyhow::Result<bool> {
    if recovered
        .meta
        .get(META_AMNESIC)
        .is_some_and(|value| value == &[1])
    {
        tracing::warn!(
            node = config.id,
            "this member lost its data earlier (--rejoin): it learns from its peers but does not vote"
        );
        return Ok(true);
    }
    if !config.rejoin {
        return Ok(false);
    }
    let empty = holds_no_acceptor_state(recovered);
    anyhow::ensure!(
        empty,
        "--rejoin is for a member whose data was lost, but {} holds acceptor state \
         (promised {:?}, {} entries, chosen {:?}); start it without --rejoin",
        config.data_dir.display(),
        recovered.promised,
        recovered.accepted.len(),
        recovered.chosen
    );
    mark_amnesic(store).await?;
    tracing::warn!(
        node = config.id,
        "rejoining after data loss: this member restores its state from its peers and does not vote"
    );
    Ok(true)
}

/// What `start` found in the snapshot folder.
struct RestoredSnapshot {
    dir: SnapshotDir,
    /// The durable snapshots, newest first.
    files: Vec<SnapshotFile>,
    /// The application, applier state and configuration of the newest valid snapshot.
    state: Option<(WasmApp, Vec<u8>, Configuration)>,
}

impl RestoredSnapshot {
    fn slot(&self) -> u64 {
        match &self.state {
            Some(_) => self.files.first().map_or(0, |file| file.id.slot),
            None => 0,
        }
    }
}

async fn restore_newest_snapshot_blocking(
    config: &NodeConfig,
    compiler: &Arc<Compiler>,
) -> anyhow::Result<RestoredSnapshot> {
    let config = config.clone();
    let compiler = compiler.clone();
    tokio::task::spawn_blocking(move || restore_newest_snapshot(&config, &compiler))
        .await
        .expect("snapshot restore task panicked")
}

/// Loads the newest snapshot that checks out (sha256) and rebuilds the application from
/// it. A corrupt file is reported and set aside, and the next older one is tried.
/// Blocking: reads and hashes whole files and compiles the module.
fn restore_newest_snapshot(
    config: &NodeConfig,
    compiler: &Arc<Compiler>,
) -> anyhow::Result<RestoredSnapshot> {
    let dir = SnapshotDir::open(&config.data_dir).map_err(|error| anyhow::anyhow!("{error}"))?;
    loop {
        let Some((snapshot, file)) = dir
            .load_newest_valid()
            .map_err(|error| anyhow::anyhow!("{error}"))?
        else {
            return Ok(RestoredSnapshot {
                dir,
                files: Vec::new(),
                state: None,
            });
        };
        match WasmApp::from_snapshot(compiler, &snapshot) {
            Ok(app) => {
                tracing::info!(slot = file.id.slot, bytes = file.id.file_bytes, path = %file.path.display(), "restored the state machine from a snapshot");
                // The older one (if any) stays listed so it can still be sent to peers.
                let mut files = vec![file.clone()];
                for (slot, path) in dir.list().map_err(|error| anyhow::anyhow!("{error}"))? {
                    if slot < file.id.slot {
                        if let Ok(id) = SnapshotDir::peek_id(&path) {
                            files.push(SnapshotFile { id, path });
                        }
                    }
                }
                return Ok(RestoredSnapshot {
                    dir,
                    files,
                    state: Some((app, snapshot.applier_state, snapshot.configuration)),
                });
            }
            Err(reason) => {
                tracing::error!(slot = file.id.slot, %reason, "a snapshot checks out but cannot be restored; setting it aside");
                let aside = file.path.with_extension("pxsnap.corrupt");
                std::fs::rename(&file.path, &aside)
                    .with_context(|| format!("moving {} aside", file.path.display()))?;
            }
        }
    }
}

impl Node {
    fn published(&self) -> Published {
        self.inner
            .published
            .lock()
            .expect("published state lock poisoned")
            .clone()
    }

    /// Why this replica takes no writes now, if its disk is nearly full (507), and
    /// whether a module is deployed. Reads only that much under the lock (no clone of
    /// `Published`): it is on every command's path.
    fn write_refusal(&self) -> (Option<String>, bool) {
        let published = self
            .inner
            .published
            .lock()
            .expect("published state lock poisoned");
        (
            published.disk.low.then(|| published.disk.reason()),
            published.module.is_some(),
        )
    }

    fn unavailable_reason(&self) -> String {
        if self.published().configuration.is_none() {
            "this node is not a member of a cluster yet".into()
        } else {
            "the replica is shutting down".into()
        }
    }

    /// Sends `request` to the core and waits for the answer, at most the request timeout.
    /// `Err(None)`: the core did not take it (queue full or stopped); `Err(Some(()))`:
    /// the timeout passed with no answer.
    async fn ask<T>(
        &self,
        request: Request,
        answer: oneshot::Receiver<T>,
    ) -> Result<T, Option<String>> {
        if !self.inner.core_running.load(Ordering::Relaxed) {
            // A joining node's core does not run yet: nothing would answer.
            return Err(Some(self.unavailable_reason()));
        }
        match self.inner.requests.try_send(request) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(Some("the replica's request queue is full".into()))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(Some(self.unavailable_reason()))
            }
        }
        match tokio::time::timeout(self.inner.request_timeout, answer).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(Some(self.unavailable_reason())),
            Err(_) => Err(None),
        }
    }
}

/// `ask`'s error: `Some(reason)` means "never taken" (503), `None` means "timed out" (504).
type AskError = Option<String>;

impl Node {
    fn deploy_ask_error(&self, error: AskError) -> DeployError {
        match error {
            Some(reason) => DeployError::Unavailable {
                reason,
                retry_after_ms: self.inner.retry_after_ms,
            },
            None => DeployError::Unknown {
                reason: format!(
                    "no outcome within {} ms; the module may or may not be installed",
                    self.inner.request_timeout.as_millis()
                ),
            },
        }
    }
}

impl NodeApi for Node {
    async fn submit(&self, request: CommandRequest) -> Result<CommandOk, CommandError> {
        if request.payload.len() > self.inner.command_bytes_max {
            return Err(CommandError::TooLarge {
                limit_bytes: self.inner.command_bytes_max,
            });
        }
        let (disk_low, deployed) = self.write_refusal();
        if let Some(reason) = disk_low {
            return Err(CommandError::StorageLow { reason });
        }
        if !deployed {
            return Err(CommandError::NoModule);
        }
        let (reply, answer) = oneshot::channel();
        let request = Request::Command {
            payload: command_envelope(&request.payload),
            key: request.idempotency_key.as_deref().map(idempotency_key),
            reply,
            received: std::time::Instant::now(),
        };
        self.ask(request, answer)
            .await
            .unwrap_or_else(|error: AskError| {
                Err(match error {
                    Some(reason) => CommandError::Unavailable {
                        reason,
                        retry_after_ms: self.inner.retry_after_ms,
                    },
                    None => CommandError::Unknown {
                        reason: format!(
                            "no outcome within {} ms; the command may or may not be applied",
                            self.inner.request_timeout.as_millis()
                        ),
                    },
                })
            })
    }

    async fn query(
        &self,
        payload: Vec<u8>,
        consistency: Consistency,
    ) -> Result<QueryOk, QueryError> {
        if payload.len() > self.inner.command_bytes_max {
            return Err(QueryError::Rejected {
                error: format!(
                    "query of {} bytes exceeds the limit of {} bytes",
                    payload.len(),
                    self.inner.command_bytes_max
                ),
            });
        }
        let mode = match consistency {
            Consistency::Linearizable => Some(ReadMode::ReadIndex),
            Consistency::Lease => Some(ReadMode::Lease),
            Consistency::Stale => None,
        };
        let (reply, answer) = oneshot::channel();
        let request = Request::Query {
            payload,
            mode,
            reply,
        };
        self.ask(request, answer)
            .await
            .unwrap_or_else(|error: AskError| {
                Err(QueryError::Unavailable {
                    reason: error.unwrap_or_else(|| {
                        format!(
                            "no answer within {} ms",
                            self.inner.request_timeout.as_millis()
                        )
                    }),
                    retry_after_ms: self.inner.retry_after_ms,
                })
            })
    }

    async fn deploy(&self, module: Vec<u8>, migrate: bool) -> Result<DeployOk, DeployError> {
        let limit_bytes = self.inner.machine.module_bytes_max as usize;
        if module.len() > limit_bytes {
            return Err(DeployError::TooLarge { limit_bytes });
        }
        if let (Some(reason), _) = self.write_refusal() {
            return Err(DeployError::StorageLow { reason });
        }
        // Validate here, off the core task: compiling takes a while and an invalid module
        // must never enter the log.
        let config = self.inner.machine.clone();
        let (module, checked) = tokio::task::spawn_blocking(move || {
            let checked = Machine::load(&module, &config).map(drop);
            (module, checked)
        })
        .await
        .expect("module validation task panicked");
        if let Err(error) = checked {
            return Err(DeployError::Invalid {
                reason: error.to_string(),
            });
        }
        let _uploading = self.inner.uploading.lock().await;
        // The bytes first, one bounded chunk entry at a time: other commands interleave
        // with them, and every replica stages them and compiles once the last arrives.
        let sha256 = ModuleId::of(&module).0;
        let total_bytes = module.len() as u64;
        for (n, chunk) in module.chunks(MODULE_CHUNK_BYTES).enumerate() {
            let offset = (n * MODULE_CHUNK_BYTES) as u64;
            let (reply, answer) = oneshot::channel();
            let request = Request::Stage {
                payload: upgrade::chunk_envelope(&sha256, total_bytes, offset, chunk),
                reply,
            };
            self.ask(request, answer)
                .await
                .unwrap_or_else(|error| Err(self.deploy_ask_error(error)))?;
        }
        // Propose the switch only once this replica compiled the module, so the upgrade
        // slot does not wait here (other replicas compile in parallel and usually finish
        // about as soon).
        let compiler = self.inner.compiler.clone();
        let timeout = self.inner.request_timeout;
        let compiled = tokio::task::spawn_blocking(move || compiler.wait(&sha256, timeout))
            .await
            .expect("compile wait task panicked");
        match compiled {
            Some(Ok(_)) => {}
            Some(Err(reason)) => return Err(DeployError::Invalid { reason }),
            None => {
                return Err(DeployError::Unavailable {
                    reason: format!(
                        "module {} is staged but not compiled here within {} ms",
                        upgrade::module_name(&sha256),
                        timeout.as_millis()
                    ),
                    retry_after_ms: self.inner.retry_after_ms,
                })
            }
        }
        let (reply, answer) = oneshot::channel();
        let request = Request::Deploy {
            payload: upgrade::upgrade_envelope(&sha256, migrate),
            reply,
        };
        self.ask(request, answer)
            .await
            .unwrap_or_else(|error| Err(self.deploy_ask_error(error)))
    }

    fn test_hooks_enabled(&self) -> bool {
        self.inner.test_hooks
    }

    async fn debug_flip_byte(&self, offset: u64) -> Result<FlipOk, FlipError> {
        if !self.inner.test_hooks {
            return Err(FlipError::Disabled);
        }
        let (reply, answer) = oneshot::channel();
        self.ask(Request::DebugFlipByte { offset, reply }, answer)
            .await
            .unwrap_or_else(|error: AskError| {
                Err(FlipError::Unavailable {
                    reason: error.unwrap_or_else(|| "no answer in time".into()),
                })
            })
    }

    async fn debug_disk_free(&self, free_bytes: Option<u64>) -> Result<(), FlipError> {
        if !self.inner.test_hooks {
            return Err(FlipError::Disabled);
        }
        let (reply, answer) = oneshot::channel();
        match self
            .ask(Request::DebugDiskFree { free_bytes, reply }, answer)
            .await
        {
            Ok(taken) => taken.map_err(|reason| FlipError::Refused { reason }),
            Err(error) => Err(FlipError::Unavailable {
                reason: error.unwrap_or_else(|| "no answer in time".into()),
            }),
        }
    }

    fn app(&self) -> AppInfo {
        let published = self.published();
        AppInfo {
            module: published.module.as_ref().map(|(id, _)| id.clone()),
            index: published.module.as_ref().map(|(_, index)| *index),
            history: published.history,
        }
    }

    fn id(&self) -> NodeId {
        self.inner.id
    }

    fn status(&self) -> StatusView {
        let published = {
            let mut shared = self
                .inner
                .published
                .lock()
                .expect("published state lock poisoned");
            shared.state_hash_wanted = true;
            shared.clone()
        };
        let transport = self.inner.transport.as_ref().map(|t| t.metrics());
        let peers = published
            .configuration
            .iter()
            .flat_map(|config| config.members())
            .filter(|id| *id != self.inner.id)
            .map(|id| {
                let seen = published.peers.get(&id).cloned().unwrap_or_default();
                let address = published.addresses.get(id);
                PeerView {
                    id,
                    peer: address.map(|a| a.peer.to_string()).unwrap_or_default(),
                    http: seen
                        .http
                        .or_else(|| address.map(|a| a.http.clone()))
                        .unwrap_or_default(),
                    connected: transport
                        .as_ref()
                        .and_then(|t| t.peers.get(&id))
                        .is_some_and(|p| p.connected),
                    chosen_index: seen.chosen_index,
                    apply_rules_max: seen.apply_rules_max,
                }
            })
            .collect();
        StatusView {
            id: self.inner.id,
            role: published.role.to_string(),
            membership: published.membership.to_string(),
            leader: published.leader,
            ballot: (published.ballot.round, published.ballot.node),
            commit_index: published.commit_index,
            applied_index: published.applied_index,
            snapshot_index: published.snapshot_index,
            apply_rules: published.apply_rules,
            voting: published.voting,
            module: published.module.map(|(id, _)| id),
            state_hash: published.state_hash,
            peers,
            checkpoint: published.checkpoint.map(|checkpoint| CheckpointView {
                index: checkpoint.index,
                hash: checkpoint.hash.to_string(),
                agreed: checkpoint.agreed,
            }),
            disk: published.disk.free_bytes.map(|free_bytes| DiskView {
                free_bytes,
                free_bytes_min: published.disk.free_bytes_min,
                low: published.disk.low,
            }),
        }
    }

    fn cluster(&self) -> ClusterView {
        let published = self.published();
        let Some(configuration) = &published.configuration else {
            return ClusterView {
                members: Vec::new(),
                leader: None,
                voters: Vec::new(),
                old_voters: None,
                learners: Vec::new(),
            };
        };
        runtime::cluster_view(
            configuration,
            &published.addresses,
            |id| {
                if id == self.inner.id {
                    Some(self.inner.http_advertise.clone())
                } else {
                    published.peers.get(&id).and_then(|seen| seen.http.clone())
                }
            },
            published.leader,
        )
    }

    async fn change_members(&self, change: MemberChange) -> Result<ClusterView, MemberError> {
        if let (Some(reason), _) = self.write_refusal() {
            return Err(MemberError::StorageLow { reason });
        }
        let (reply, answer) = oneshot::channel();
        self.ask(Request::Member { change, reply }, answer)
            .await
            .unwrap_or_else(|error: AskError| {
                Err(match error {
                    Some(reason) => MemberError::Unavailable {
                        reason,
                        retry_after_ms: self.inner.retry_after_ms,
                    },
                    None => MemberError::Unknown {
                        reason: format!(
                            "no outcome within {} ms",
                            self.inner.request_timeout.as_millis()
                        ),
                    },
                })
            })
    }

    fn readiness(&self) -> Readiness {
        let published = self.published();
        let reason = if published.configuration.is_none() {
            Some("not a member of a cluster yet".to_string())
        } else if published.role == "removed" {
            Some(format!("{REMOVED_READINESS}: it takes no part any more"))
        } else if let Some(diverged) = published.diverged {
            Some(diverged)
        } else if published.disk.low {
            // Like etcd's NOSPACE alarm in its health check: a replica that refuses
            // writes is taken out of a load balancer's rotation.
            Some(published.disk.reason())
        } else if published.leader.is_none() {
            Some("no leader is known".to_string())
        } else if let Some((sha256, slot, since)) = published.applying_held {
            Some(format!(
                "applying waits for this replica's compile of module {} (upgrade at slot {slot}, {} ms so far)",
                upgrade::module_name(&sha256),
                since.elapsed().as_millis()
            ))
        } else if published.applied_index < published.commit_index {
            Some(format!(
                "applied index {} is behind the commit index {}",
                published.applied_index, published.commit_index
            ))
        } else {
            None
        };
        Readiness {
            ready: reason.is_none(),
            reason,
        }
    }

    fn metrics(&self) -> String {
        let published = self.published();
        let c = &self.inner.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let storage = self.inner.store.metrics();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        metric(
            "paxwasm_commands_applied_total",
            "counter",
            "Client commands applied (commits).",
            get(&c.commands_applied),
        );
        metric(
            "paxwasm_apply_batch_calls_total",
            "counter",
            "Runs of a slot's commands sent to the guest in one call (including calls that failed and fell back).",
            get(&c.apply_batch_calls),
        );
        metric(
            "paxwasm_apply_batch_commands_total",
            "counter",
            "Commands applied by those calls.",
            get(&c.apply_batch_commands),
        );
        metric(
            "paxwasm_apply_batch_fallbacks_total",
            "counter",
            "Batch calls that failed in the guest (a trap, fuel, an oversized output) and were applied command by command.",
            get(&c.apply_batch_fallbacks),
        );
        metric(
            "paxwasm_slots_applied_total",
            "counter",
            "Log slots applied (batches and no-ops).",
            get(&c.slots_applied),
        );
        metric(
            "paxwasm_apply_us_total",
            "counter",
            "Microseconds spent applying batches in the Wasm machine.",
            get(&c.apply_us),
        );
        metric(
            "paxwasm_persists_total",
            "counter",
            "Store writes for the core's persists (a chosen-index-only persist rides with the next one).",
            get(&c.persists),
        );
        metric(
            "paxwasm_persist_entries_total",
            "counter",
            "Log entries in those persists.",
            get(&c.persist_entries),
        );
        metric(
            "paxwasm_commands_answered_total",
            "counter",
            "Commands of this replica's clients answered from an applied slot.",
            get(&c.commands_answered),
        );
        metric(
            "paxwasm_command_core_us_total",
            "counter",
            "Microseconds from the API handing those commands over to their answers, summed.",
            get(&c.command_core_us),
        );
        metric(
            "paxwasm_storage_syncs_total",
            "counter",
            "fdatasync calls of the store (group commits).",
            storage.syncs,
        );
        metric(
            "paxwasm_storage_batches_total",
            "counter",
            "Write batches made durable by the store.",
            storage.batches,
        );
        metric(
            "paxwasm_storage_group_batches_max",
            "gauge",
            "Most batches that shared one sync.",
            storage.group_batches_max,
        );
        metric(
            "paxwasm_storage_sync_us_total",
            "counter",
            "Microseconds spent in fdatasync.",
            storage.sync_time_us,
        );
        metric(
            "paxwasm_storage_queue_depth",
            "gauge",
            "Write batches waiting for the committer.",
            storage.queue_depth,
        );
        metric(
            "paxwasm_leader_changes_total",
            "counter",
            "Times this replica saw a new leader.",
            get(&c.leader_changes),
        );
        metric(
            "paxwasm_command_results_from_peers_total",
            "counter",
            "Forwarded commands answered from the result the leader sent, before this replica applied them.",
            get(&c.results_from_peers),
        );
        metric(
            "paxwasm_wire_decode_errors_total",
            "counter",
            "Peer payloads dropped because they did not decode.",
            get(&c.decode_errors),
        );
        metric(
            "paxwasm_checkpoint_mismatches_total",
            "counter",
            "Peer checkpoint reports whose state hash differed from this replica's.",
            get(&c.checkpoint_mismatches),
        );
        metric(
            "paxwasm_checkpoints_total",
            "counter",
            "State-hash checkpoints taken by this replica.",
            get(&c.checkpoints),
        );
        metric(
            "paxwasm_checkpoint_hash_us_total",
            "counter",
            "Microseconds the core spent hashing the state for checkpoints (incremental).",
            get(&c.checkpoint_hash_us),
        );
        metric(
            "paxwasm_checkpoint_index",
            "gauge",
            "Applied index of the newest state-hash checkpoint (0: none yet).",
            published
                .checkpoint
                .map_or(0, |checkpoint| checkpoint.index),
        );
        metric(
            "paxwasm_checkpoint_diverged",
            "gauge",
            "1 while this replica's state differs from a quorum's (it refuses reads).",
            u64::from(published.diverged.is_some()),
        );
        if let Some(free_bytes) = published.disk.free_bytes {
            // Absent, not 0, while unmeasured: 0 would read as a full disk.
            metric(
                "paxwasm_disk_free_bytes",
                "gauge",
                "Free bytes on the data directory's filesystem at the last check.",
                free_bytes,
            );
        }
        metric(
            "paxwasm_applies_held",
            "gauge",
            "Applies and read replies waiting for this replica's compile of a module at its upgrade slot.",
            published.applies_held as u64,
        );
        metric(
            "paxwasm_disk_low",
            "gauge",
            "1 while free space is below --disk-free-bytes-min (this replica takes no writes).",
            u64::from(published.disk.low),
        );
        metric(
            "paxwasm_disk_low_dropped_messages_total",
            "counter",
            "Peer messages dropped because this replica was low on disk space.",
            get(&c.disk_low_dropped),
        );
        metric(
            "paxwasm_requests_pending",
            "gauge",
            "Client requests waiting for an outcome at this replica.",
            published.requests_pending as u64,
        );
        metric(
            "paxwasm_dedup_clients",
            "gauge",
            "Idempotency keys remembered.",
            published.dedup_clients as u64,
        );
        metric(
            "paxwasm_commit_index",
            "gauge",
            "Highest slot known chosen.",
            published.commit_index,
        );
        metric(
            "paxwasm_applied_index",
            "gauge",
            "Highest slot applied.",
            published.applied_index,
        );
        metric(
            "paxwasm_apply_rules",
            "gauge",
            "Apply rules in force at the applied index (1: one Wasm call per command, 2: batch calls).",
            u64::from(published.apply_rules),
        );
        metric(
            "paxwasm_snapshot_index",
            "gauge",
            "Slot of the newest durable snapshot (0: none).",
            published.snapshot_index,
        );
        metric(
            "paxwasm_snapshots_taken_total",
            "counter",
            "Snapshots written and made durable by this replica.",
            get(&c.snapshots_taken),
        );
        metric(
            "paxwasm_snapshot_pause_us_last",
            "gauge",
            "Microseconds the apply loop paused to capture the latest snapshot.",
            get(&c.snapshot_pause_us_last),
        );
        metric(
            "paxwasm_snapshot_pause_us_total",
            "counter",
            "Microseconds the apply loop paused for snapshot captures, summed.",
            get(&c.snapshot_pause_us_total),
        );
        metric(
            "paxwasm_snapshot_write_us_last",
            "gauge",
            "Microseconds the background write of the latest snapshot took (fsyncs included).",
            get(&c.snapshot_write_us_last),
        );
        metric(
            "paxwasm_snapshot_bytes_last",
            "gauge",
            "Size of the latest snapshot file in bytes.",
            get(&c.snapshot_bytes_last),
        );
        metric(
            "paxwasm_snapshot_installs_total",
            "counter",
            "Snapshots received from peers and installed.",
            get(&c.snapshot_installs),
        );
        metric(
            "paxwasm_snapshot_install_failures_total",
            "counter",
            "Received snapshots refused (bad sha256, restore failed).",
            get(&c.snapshot_install_failures),
        );
        metric(
            "paxwasm_snapshot_transfers_sent_total",
            "counter",
            "Snapshot transfers started to peers.",
            get(&c.snapshot_transfers_sent),
        );
        metric(
            "paxwasm_snapshot_transfer_bytes_sent_total",
            "counter",
            "Snapshot bytes sent to peers.",
            get(&c.snapshot_transfer_bytes_sent),
        );
        metric(
            "paxwasm_snapshot_transfer_bytes_received_total",
            "counter",
            "Snapshot bytes received from peers.",
            get(&c.snapshot_transfer_bytes_received),
        );
        if let Some(transport) = &self.inner.transport {
            let t = transport.metrics();
            metric(
                "paxwasm_peer_frames_sent_total",
                "counter",
                "Frames sent to peers.",
                t.frames_sent(),
            );
            metric(
                "paxwasm_peer_frames_dropped_total",
                "counter",
                "Frames dropped (queue full or broken connection).",
                t.frames_dropped(),
            );
            metric(
                "paxwasm_peer_frames_received_total",
                "counter",
                "Frames received from peers.",
                t.frames_received,
            );
            metric(
                "paxwasm_peer_reconnects_total",
                "counter",
                "Peer reconnections.",
                t.reconnects(),
            );
            metric(
                "paxwasm_peer_queue_frames",
                "gauge",
                "Frames queued to peers.",
                t.queue_frames(),
            );
        }
        out
    }
}
