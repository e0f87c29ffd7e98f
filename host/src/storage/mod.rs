//! Durable acceptor state on fjall, with group commit.
//!
//! This module owns the node's on-disk acceptor state: the node identity (cluster id, node
//! id, format version), the promised ballot, the accepted entries per slot, the chosen
//! index, a small replicated-metadata keyspace, and the compaction watermark below which
//! entries are deleted. It acknowledges a write only after the write is synced to disk
//! (`fdatasync`), and it lets many concurrent writes share one sync (group commit): one
//! committer thread takes every batch queued since its last sync, writes them as one fjall
//! batch, syncs once, then completes every waiter.
//!
//! It never interprets what it stores: an accepted entry is opaque bytes (the caller encodes
//! ballot and value), metadata values are opaque bytes. It knows nothing of Paxos beyond two
//! invariants it asserts: the promised ballot and the chosen index never go backwards. It
//! never continues after a failed write or sync: that is fail-stop (see [`FailStop`]).
//!
//! It uses no async runtime of its own: the committer is a plain thread, the queue and the
//! completions are tokio's runtime-agnostic `sync` channels, so a tokio task can `.await` a
//! write and a plain thread can block on it.

mod committer;
mod layout;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

pub use layout::FORMAT_VERSION;

/// Name of the fjall database folder inside the node's data directory; other modules may
/// keep their own folders (snapshots, modules) next to it.
pub const STORE_DIR_NAME: &str = "store";

/// A Paxos ballot as the store sees it: plain numbers, ordered by round, then node id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ballot {
    pub round: u64,
    pub node: u64,
}

/// One durable write request. Everything in it becomes durable together (it is part of one
/// fjall batch) and is acknowledged together.
///
/// Within one store, batches are applied in the order they were submitted; when two
/// batches write the same key, the later one wins.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    /// The new promised ballot. Must not be lower than any promised ballot submitted before.
    pub promised: Option<Ballot>,
    /// Accepted entries: slot -> opaque bytes (the caller encodes ballot and value).
    pub accepted: Vec<(u64, Vec<u8>)>,
    /// The new chosen index. Must not be lower than any chosen index submitted before.
    pub chosen: Option<u64>,
    /// Replicated metadata: key -> opaque bytes.
    pub meta: Vec<(String, Vec<u8>)>,
    /// Compaction: forget every accepted entry with a slot below this one. Durable and
    /// atomic with the rest of the batch (so "snapshot at N" metadata and "delete below N"
    /// can go together); the keys themselves are deleted later in the background, in
    /// bounded steps, because fjall has no range delete. A value lower than the current
    /// watermark changes nothing.
    pub delete_below: Option<u64>,
}

impl WriteBatch {
    /// True when the batch writes nothing (it is still synced and acknowledged in order).
    pub fn is_empty(&self) -> bool {
        self.promised.is_none()
            && self.accepted.is_empty()
            && self.chosen.is_none()
            && self.meta.is_empty()
            && self.delete_below.is_none()
    }
}

/// The acceptor state found on disk when the store was opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub promised: Option<Ballot>,
    /// Accepted entries at or above `log_start`.
    pub accepted: BTreeMap<u64, Vec<u8>>,
    pub chosen: Option<u64>,
    pub meta: BTreeMap<String, Vec<u8>>,
    /// The compaction watermark: every slot below it was deleted (0 when nothing was).
    pub log_start: u64,
}

/// Limits and hooks of a store. `StorageConfig::default()` is what a node runs with.
#[derive(Clone)]
pub struct StorageConfig {
    /// Write requests that may wait in the queue before `submit` waits (backpressure).
    pub queue_batches_max: usize,
    /// Write requests the committer puts into one group (one fjall batch, one sync).
    pub group_batches_max: usize,
    /// Payload bytes (keys + values) after which the committer closes a group; a single
    /// larger request still forms a group of its own.
    pub group_bytes_max: usize,
    /// Entry keys deleted per background step below the compaction watermark; bounds how
    /// long the committer is away from new writes.
    pub delete_keys_per_step_max: usize,
    /// fjall block cache size.
    pub cache_bytes: u64,
    /// A failed write on a filesystem with less free space than this is reported as a full
    /// disk even when fjall's error does not say ENOSPC (fjall reports a full disk met by its
    /// background flush only as `Poisoned`). Default 64 MiB: about the largest single
    /// allocation fjall makes (journal preallocation), so less than that free at a failure
    /// means the disk filled up.
    pub disk_full_free_bytes_max: u64,
    /// What to do when a write or sync fails; the default aborts the process.
    pub fail_stop: Arc<dyn FailStop>,
    /// Test hook: runs before every fjall write and every sync of the committer and can
    /// make it fail like the disk would. `None` in production.
    pub fault_hook: Option<FaultHook>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            queue_batches_max: 4096,
            group_batches_max: 4096,
            group_bytes_max: 16 * 1024 * 1024,
            delete_keys_per_step_max: 1024,
            cache_bytes: 32 * 1024 * 1024,
            disk_full_free_bytes_max: 64 * 1024 * 1024,
            fail_stop: Arc::new(AbortProcess),
            fault_hook: None,
        }
    }
}

impl fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageConfig")
            .field("queue_batches_max", &self.queue_batches_max)
            .field("group_batches_max", &self.group_batches_max)
            .field("group_bytes_max", &self.group_bytes_max)
            .field("delete_keys_per_step_max", &self.delete_keys_per_step_max)
            .field("cache_bytes", &self.cache_bytes)
            .field("disk_full_free_bytes_max", &self.disk_full_free_bytes_max)
            .field("fault_hook", &self.fault_hook.is_some())
            .finish_non_exhaustive()
    }
}

/// Where the committer is about to touch the disk; passed to the [`FaultHook`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPoint {
    /// Before a group (or a background delete step) is written to the fjall journal.
    Write,
    /// Before the journal is synced.
    Sync,
}

/// Returns an error to make the committer fail at that point as if the disk had failed
/// (e.g. `io::ErrorKind::StorageFull` for a full disk).
pub type FaultHook = Arc<dyn Fn(FaultPoint) -> std::io::Result<()> + Send + Sync>;

/// Called once, on the committer thread, when a write or sync failed, after the error is
/// logged. After a failed `fdatasync` the kernel may have dropped the dirty pages, so the
/// state on disk is unknown: the only safe move is to stop and recover from disk on
/// restart. The production handler ([`AbortProcess`]) never returns. A test handler may
/// return; the store then fails every waiting and every later write and issues no further
/// writes of its own.
pub trait FailStop: Send + Sync + 'static {
    fn fail_stop(&self, error: &StorageError);
}

/// The production [`FailStop`]: abort the process (no unwinding, no destructors that could
/// write more).
#[derive(Clone, Copy, Debug, Default)]
pub struct AbortProcess;

impl FailStop for AbortProcess {
    fn fail_stop(&self, _error: &StorageError) {
        std::process::abort();
    }
}

/// Errors of the store. Open-time errors are operating conditions the caller reports;
/// `DiskFull` and `WriteFailed` reach a waiter only when a test [`FailStop`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageError {
    /// The data directory belongs to another cluster or node.
    WrongIdentity {
        dir: PathBuf,
        found_cluster_id: String,
        found_node_id: u64,
        expected_cluster_id: String,
        expected_node_id: u64,
    },
    /// The data directory was written by an incompatible version of the store.
    UnsupportedFormat {
        dir: PathBuf,
        found: u32,
        supported: u32,
    },
    /// Another process has the data directory open.
    Locked { dir: PathBuf },
    /// The data directory could not be opened or its contents are not what this store
    /// writes.
    Open { dir: PathBuf, reason: String },
    /// A write failed because the disk is full (ENOSPC).
    DiskFull { dir: PathBuf, reason: String },
    /// A write or sync failed for another reason.
    WriteFailed { dir: PathBuf, reason: String },
    /// A read failed.
    ReadFailed { dir: PathBuf, reason: String },
    /// The store has stopped (after a fail-stop, or its committer is gone) and accepts no
    /// more writes.
    Stopped,
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::WrongIdentity {
                dir,
                found_cluster_id,
                found_node_id,
                expected_cluster_id,
                expected_node_id,
            } => write!(
                f,
                "refusing to start: data directory {} belongs to cluster {found_cluster_id:?} \
                 node {found_node_id}, but this process is cluster {expected_cluster_id:?} \
                 node {expected_node_id}; use that node's own data directory",
                dir.display()
            ),
            StorageError::UnsupportedFormat {
                dir,
                found,
                supported,
            } => write!(
                f,
                "refusing to start: data directory {} has storage format version {found}, \
                 this build reads version {supported}",
                dir.display()
            ),
            StorageError::Locked { dir } => write!(
                f,
                "refusing to start: data directory {} is in use by another process",
                dir.display()
            ),
            StorageError::Open { dir, reason } => {
                write!(f, "cannot open data directory {}: {reason}", dir.display())
            }
            StorageError::DiskFull { dir, reason } => write!(
                f,
                "the disk is full (ENOSPC): writing the acceptor store in {} failed: {reason}",
                dir.display()
            ),
            StorageError::WriteFailed { dir, reason } => write!(
                f,
                "writing or syncing the acceptor store in {} failed: {reason}",
                dir.display()
            ),
            StorageError::ReadFailed { dir, reason } => write!(
                f,
                "reading the acceptor store in {} failed: {reason}",
                dir.display()
            ),
            StorageError::Stopped => write!(
                f,
                "the acceptor store has stopped after a failed write and accepts no writes"
            ),
        }
    }
}

impl std::error::Error for StorageError {}

/// True when `error` or one of its causes is ENOSPC.
fn is_disk_full(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::StorageFull {
                return true;
            }
        }
        cause = current.source();
    }
    false
}

/// Counters for /metrics. Monotonic except `queue_depth`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StorageMetrics {
    /// Journal syncs (`fdatasync`) done by the committer: one per group.
    pub syncs: u64,
    /// Write requests ([`WriteBatch`]es) acknowledged as durable.
    pub batches: u64,
    /// Key writes (puts) acknowledged as durable, after coalescing within a group.
    pub writes: u64,
    /// Payload bytes (keys + values) of those writes.
    pub bytes: u64,
    /// The largest number of requests that shared one sync.
    pub group_batches_max: u64,
    /// Total time spent in the sync call, in microseconds.
    pub sync_time_us: u64,
    /// Entry keys deleted in the background below the compaction watermark.
    pub deleted_entries: u64,
    /// Write requests waiting in the queue right now.
    pub queue_depth: u64,
}

/// State shared between the [`Store`] handle and its committer thread.
struct Shared {
    dir: PathBuf,
    stopped: AtomicBool,
    /// The compaction watermark that is durable; reads below it return nothing.
    log_start: AtomicU64,
    syncs: AtomicU64,
    batches: AtomicU64,
    writes: AtomicU64,
    bytes: AtomicU64,
    group_batches_max: AtomicU64,
    sync_time_us: AtomicU64,
    deleted_entries: AtomicU64,
}

/// One queued write: the batch and who to tell when it is durable.
struct Request {
    batch: WriteBatch,
    done: oneshot::Sender<Result<(), StorageError>>,
}

/// Completes when its write is durable (`Ok`) or can never be (`Err`).
///
/// A tokio task `.await`s it; a plain thread calls [`Pending::wait`].
#[must_use = "a write is durable only when its Pending completes with Ok"]
pub struct Pending(oneshot::Receiver<Result<(), StorageError>>);

impl Pending {
    /// Blocks the current thread until the write is durable. Must not be called from an
    /// async task (it would block the runtime's worker): `.await` the `Pending` there.
    pub fn wait(self) -> Result<(), StorageError> {
        self.0.blocking_recv().unwrap_or(Err(StorageError::Stopped))
    }

    /// The outcome if the committer already answered, without waiting.
    pub fn try_outcome(&mut self) -> Option<Result<(), StorageError>> {
        match self.0.try_recv() {
            Ok(outcome) => Some(outcome),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(StorageError::Stopped)),
        }
    }
}

impl Future for Pending {
    type Output = Result<(), StorageError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // A dropped sender means the committer is gone without answering: not durable.
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(StorageError::Stopped)))
    }
}

/// The node's durable acceptor store. Dropping it finishes the queued writes and joins the
/// committer thread (at most one group, so a few milliseconds).
pub struct Store {
    sender: Option<mpsc::Sender<Request>>,
    committer: Option<JoinHandle<()>>,
    keyspaces: layout::Keyspaces,
    shared: Arc<Shared>,
}

impl Store {
    /// Opens (or creates, when it holds no store yet) the store in the node's data
    /// directory `dir`, checks that it belongs to `cluster_id`/`node_id`, and returns what
    /// it recovered. Blocking: call it before the runtime starts or via `spawn_blocking`.
    pub fn open(
        dir: &Path,
        cluster_id: &str,
        node_id: u64,
    ) -> Result<(Store, Recovered), StorageError> {
        Store::open_with(StorageConfig::default(), dir, cluster_id, node_id)
    }

    /// [`Store::open`] with explicit limits and hooks.
    pub fn open_with(
        config: StorageConfig,
        dir: &Path,
        cluster_id: &str,
        node_id: u64,
    ) -> Result<(Store, Recovered), StorageError> {
        assert!(
            config.queue_batches_max > 0,
            "queue_batches_max must be > 0"
        );
        assert!(
            config.group_batches_max > 0,
            "group_batches_max must be > 0"
        );
        assert!(
            config.delete_keys_per_step_max > 0,
            "delete_keys_per_step_max must be > 0"
        );
        let (db, keyspaces) = layout::open_database(&config, dir)?;
        layout::check_or_create_identity(&db, &keyspaces, dir, cluster_id, node_id)?;
        let recovered = layout::recover(&keyspaces, dir)?;
        tracing::info!(
            dir = %dir.display(),
            cluster_id,
            node_id,
            entries = recovered.accepted.len(),
            log_start = recovered.log_start,
            chosen = ?recovered.chosen,
            promised = ?recovered.promised,
            "acceptor store opened"
        );

        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            stopped: AtomicBool::new(false),
            log_start: AtomicU64::new(recovered.log_start),
            syncs: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            group_batches_max: AtomicU64::new(0),
            sync_time_us: AtomicU64::new(0),
            deleted_entries: AtomicU64::new(0),
        });
        let (sender, receiver) = mpsc::channel(config.queue_batches_max);
        let committer = committer::Committer::new(
            config,
            db,
            keyspaces.clone(),
            receiver,
            Arc::clone(&shared),
            &recovered,
        );
        let committer = std::thread::Builder::new()
            .name(format!("storage-committer-{node_id}"))
            .spawn(move || committer.run())
            .map_err(|e| StorageError::Open {
                dir: dir.to_path_buf(),
                reason: format!("cannot start the committer thread: {e}"),
            })?;
        let store = Store {
            sender: Some(sender),
            committer: Some(committer),
            keyspaces,
            shared,
        };
        Ok((store, recovered))
    }

    /// Queues a write, waiting while the queue is full (backpressure). The returned
    /// [`Pending`] completes when the write is durable. Writes are applied and acknowledged
    /// in the order of their `submit` calls.
    pub async fn submit(&self, batch: WriteBatch) -> Result<Pending, StorageError> {
        let (request, pending) = self.request(batch)?;
        self.sender()
            .send(request)
            .await
            .map_err(|_| StorageError::Stopped)?;
        Ok(pending)
    }

    /// [`Store::submit`] for plain threads: blocks while the queue is full. Must not be
    /// called from an async task.
    pub fn submit_blocking(&self, batch: WriteBatch) -> Result<Pending, StorageError> {
        let (request, pending) = self.request(batch)?;
        self.sender()
            .blocking_send(request)
            .map_err(|_| StorageError::Stopped)?;
        Ok(pending)
    }

    /// Submits and waits until durable.
    pub async fn write(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.submit(batch).await?.await
    }

    /// Submits and blocks until durable. Must not be called from an async task.
    pub fn write_blocking(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.submit_blocking(batch)?.wait()
    }

    /// The accepted entry at `slot`, or `None` when there is none or it is below the
    /// compaction watermark. Reads see every write the committer has applied, including
    /// one whose sync is still running: read only what you were told is durable when that
    /// matters.
    pub fn accepted(&self, slot: u64) -> Result<Option<Vec<u8>>, StorageError> {
        if slot < self.shared.log_start.load(Ordering::Acquire) {
            return Ok(None);
        }
        layout::read_entry(&self.keyspaces, &self.shared.dir, slot)
    }

    /// Up to `count_max` accepted entries with slots in `from..`, in slot order, skipping
    /// slots below the compaction watermark. Same visibility as [`Store::accepted`].
    pub fn accepted_from(
        &self,
        from: u64,
        count_max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let from = from.max(self.shared.log_start.load(Ordering::Acquire));
        layout::read_entries_from(&self.keyspaces, &self.shared.dir, from, count_max)
    }

    /// The replicated metadata value under `key`. Same visibility as [`Store::accepted`].
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        layout::read_meta(&self.keyspaces, &self.shared.dir, key)
    }

    /// The durable compaction watermark: entries below it are gone.
    pub fn log_start(&self) -> u64 {
        self.shared.log_start.load(Ordering::Acquire)
    }

    /// A snapshot of the counters, for /metrics.
    pub fn metrics(&self) -> StorageMetrics {
        let sender = self.sender();
        let s = &self.shared;
        StorageMetrics {
            syncs: s.syncs.load(Ordering::Relaxed),
            batches: s.batches.load(Ordering::Relaxed),
            writes: s.writes.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            group_batches_max: s.group_batches_max.load(Ordering::Relaxed),
            sync_time_us: s.sync_time_us.load(Ordering::Relaxed),
            deleted_entries: s.deleted_entries.load(Ordering::Relaxed),
            queue_depth: (sender.max_capacity() - sender.capacity()) as u64,
        }
    }

    /// True after a fail-stop whose handler returned (tests only): every write fails.
    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire)
    }

    fn sender(&self) -> &mpsc::Sender<Request> {
        self.sender
            .as_ref()
            .expect("the sender lives until Store is dropped")
    }

    fn request(&self, batch: WriteBatch) -> Result<(Request, Pending), StorageError> {
        if self.is_stopped() {
            return Err(StorageError::Stopped);
        }
        let (done, receiver) = oneshot::channel();
        Ok((Request { batch, done }, Pending(receiver)))
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Closing the queue lets the committer finish what is queued and exit; joining it
        // releases the fjall database (and its directory lock) before `drop` returns, so the
        // same directory can be reopened right after.
        drop(self.sender.take());
        if let Some(committer) = self.committer.take() {
            if committer.join().is_err() {
                tracing::error!("the storage committer thread panicked");
            }
        }
    }
}
