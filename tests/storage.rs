//! The acceptor store at its boundary: what is written comes back after reopening, a data
//! directory of another node is refused, group commit groups, the queue is bounded, and a
//! failed write or sync is fail-stop.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::pin;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use paxwasm::storage::{
    Ballot, FailStop, FaultHook, FaultPoint, Recovered, StorageConfig, StorageError, Store,
    WriteBatch,
};

const CLUSTER: &str = "test-cluster";
const NODE: u64 = 3;

fn open(dir: &Path) -> (Store, Recovered) {
    Store::open(dir, CLUSTER, NODE).expect("open store")
}

fn accept(slot: u64, entry: &[u8]) -> WriteBatch {
    WriteBatch {
        accepted: vec![(slot, entry.to_vec())],
        ..WriteBatch::default()
    }
}

/// Records fail-stops instead of aborting, so a test can look at what happened after.
#[derive(Default)]
struct RecordFailStop(Mutex<Vec<StorageError>>);

impl FailStop for RecordFailStop {
    fn fail_stop(&self, error: &StorageError) {
        self.0.lock().unwrap().push(error.clone());
    }
}

/// A fault hook that parks the committer at its first write until the test releases it,
/// so the test controls exactly what is queued when the next group is formed.
fn gate() -> (FaultHook, std_mpsc::Sender<()>, std_mpsc::Receiver<()>) {
    let (release, released) = std_mpsc::channel::<()>();
    let (parked, on_parked) = std_mpsc::channel::<()>();
    let released = Mutex::new(Some((released, parked)));
    let hook: FaultHook = Arc::new(move |point| {
        if point == FaultPoint::Write {
            if let Some((released, parked)) = released.lock().unwrap().take() {
                parked.send(()).unwrap();
                released.recv().unwrap();
            }
        }
        Ok(())
    });
    (hook, release, on_parked)
}

#[test]
fn a_new_directory_recovers_empty() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, recovered) = open(dir.path());
    assert_eq!(recovered, Recovered::default());
}

#[test]
fn writes_come_back_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path());
        store
            .write_blocking(WriteBatch {
                promised: Some(Ballot { round: 1, node: 2 }),
                accepted: vec![(1, b"one".to_vec()), (2, b"two".to_vec())],
                chosen: None,
                meta: vec![("members".to_string(), b"1,2,3".to_vec())],
                delete_below: None,
            })
            .unwrap();
        store
            .write_blocking(WriteBatch {
                promised: Some(Ballot { round: 4, node: 1 }),
                accepted: vec![(2, b"two again".to_vec()), (3, b"three".to_vec())],
                chosen: Some(2),
                meta: vec![],
                delete_below: None,
            })
            .unwrap();
        assert_eq!(store.accepted(2).unwrap(), Some(b"two again".to_vec()));
        assert_eq!(store.accepted(9).unwrap(), None);
        assert_eq!(store.meta("members").unwrap(), Some(b"1,2,3".to_vec()));
        assert_eq!(
            store.accepted_from(2, 10).unwrap(),
            vec![(2, b"two again".to_vec()), (3, b"three".to_vec())]
        );
        let metrics = store.metrics();
        assert_eq!(metrics.batches, 2);
        assert_eq!(metrics.syncs, 2);
        assert_eq!(metrics.queue_depth, 0);
    }
    let (_store, recovered) = open(dir.path());
    assert_eq!(
        recovered,
        Recovered {
            promised: Some(Ballot { round: 4, node: 1 }),
            accepted: BTreeMap::from([
                (1, b"one".to_vec()),
                (2, b"two again".to_vec()),
                (3, b"three".to_vec()),
            ]),
            chosen: Some(2),
            meta: BTreeMap::from([("members".to_string(), b"1,2,3".to_vec())]),
            log_start: 0,
        }
    );
}

#[test]
fn later_submissions_win_within_one_group() {
    let dir = tempfile::tempdir().unwrap();
    let (hook, release, parked) = gate();
    let config = StorageConfig {
        fault_hook: Some(hook),
        ..StorageConfig::default()
    };
    {
        let (store, _) = Store::open_with(config, dir.path(), CLUSTER, NODE).unwrap();
        let first = store.submit_blocking(accept(0, b"gate")).unwrap();
        parked.recv().unwrap();
        // These three form one group: the same slot and key written twice must end up
        // with the later value.
        let pending = [
            store.submit_blocking(accept(7, b"old")).unwrap(),
            store.submit_blocking(accept(7, b"new")).unwrap(),
            store
                .submit_blocking(WriteBatch {
                    meta: vec![("k".to_string(), b"v2".to_vec())],
                    ..WriteBatch::default()
                })
                .unwrap(),
        ];
        release.send(()).unwrap();
        first.wait().unwrap();
        for p in pending {
            p.wait().unwrap();
        }
        assert_eq!(store.metrics().syncs, 2);
    }
    let (_store, recovered) = open(dir.path());
    assert_eq!(recovered.accepted.get(&7), Some(&b"new".to_vec()));
    assert_eq!(recovered.meta.get("k"), Some(&b"v2".to_vec()));
}

#[test]
fn a_directory_of_another_node_or_cluster_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));

    let error = Store::open(dir.path(), CLUSTER, 4).err().unwrap();
    assert_eq!(
        error,
        StorageError::WrongIdentity {
            dir: dir.path().to_path_buf(),
            found_cluster_id: CLUSTER.to_string(),
            found_node_id: NODE,
            expected_cluster_id: CLUSTER.to_string(),
            expected_node_id: 4,
        }
    );
    assert_eq!(
        error.to_string(),
        format!(
            "refusing to start: data directory {} belongs to cluster \"test-cluster\" node 3, \
             but this process is cluster \"test-cluster\" node 4; use that node's own data \
             directory",
            dir.path().display()
        )
    );

    let error = Store::open(dir.path(), "other-cluster", NODE)
        .err()
        .unwrap();
    assert_eq!(
        error,
        StorageError::WrongIdentity {
            dir: dir.path().to_path_buf(),
            found_cluster_id: CLUSTER.to_string(),
            found_node_id: NODE,
            expected_cluster_id: "other-cluster".to_string(),
            expected_node_id: NODE,
        }
    );
    // The refusal changed nothing: the right node still opens it.
    drop(open(dir.path()));
}

#[test]
fn a_directory_open_in_another_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, _) = open(dir.path());
    let error = Store::open(dir.path(), CLUSTER, NODE).err().unwrap();
    assert_eq!(
        error,
        StorageError::Locked {
            dir: dir.path().to_path_buf()
        }
    );
}

#[test]
fn queued_writes_share_one_sync() {
    const QUEUED: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let (hook, release, parked) = gate();
    let config = StorageConfig {
        fault_hook: Some(hook),
        ..StorageConfig::default()
    };
    let (store, _) = Store::open_with(config, dir.path(), CLUSTER, NODE).unwrap();
    let first = store.submit_blocking(accept(0, b"first")).unwrap();
    parked.recv().unwrap();
    let pending: Vec<_> = (1..=QUEUED as u64)
        .map(|slot| store.submit_blocking(accept(slot, &[1; 128])).unwrap())
        .collect();
    assert_eq!(store.metrics().queue_depth, QUEUED as u64);
    release.send(()).unwrap();
    first.wait().unwrap();
    for p in pending {
        p.wait().unwrap();
    }
    let metrics = store.metrics();
    assert_eq!(metrics.batches, QUEUED as u64 + 1);
    assert_eq!(metrics.syncs, 2);
    assert_eq!(metrics.group_batches_max, QUEUED as u64);
    assert_eq!(metrics.writes, QUEUED as u64 + 1);
    assert_eq!(metrics.bytes, QUEUED as u64 * (8 + 128) + 8 + 5);
    assert_eq!(metrics.queue_depth, 0);
}

#[test]
fn a_group_is_closed_at_group_batches_max() {
    let dir = tempfile::tempdir().unwrap();
    let (hook, release, parked) = gate();
    let config = StorageConfig {
        fault_hook: Some(hook),
        group_batches_max: 4,
        ..StorageConfig::default()
    };
    let (store, _) = Store::open_with(config, dir.path(), CLUSTER, NODE).unwrap();
    let first = store.submit_blocking(accept(0, b"first")).unwrap();
    parked.recv().unwrap();
    let pending: Vec<_> = (1..=10)
        .map(|slot| store.submit_blocking(accept(slot, b"x")).unwrap())
        .collect();
    release.send(()).unwrap();
    first.wait().unwrap();
    for p in pending {
        p.wait().unwrap();
    }
    // 1 + groups of 4, 4, 2.
    assert_eq!(store.metrics().syncs, 4);
    assert_eq!(store.metrics().group_batches_max, 4);
}

#[test]
fn concurrent_writers_share_syncs() {
    const WRITERS: u64 = 32;
    const WRITES_PER_WRITER: u64 = 50;
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    std::thread::scope(|scope| {
        for writer in 0..WRITERS {
            let store = &store;
            scope.spawn(move || {
                for i in 0..WRITES_PER_WRITER {
                    let slot = i * WRITERS + writer;
                    store.write_blocking(accept(slot, &[7; 128])).unwrap();
                }
            });
        }
    });
    let metrics = store.metrics();
    assert_eq!(metrics.batches, WRITERS * WRITES_PER_WRITER);
    assert!(
        metrics.syncs < metrics.batches,
        "group commit did not group: {metrics:?}"
    );
    drop(store);
    let (_store, recovered) = open(dir.path());
    assert_eq!(recovered.accepted.len() as u64, WRITERS * WRITES_PER_WRITER);
}

#[test]
fn a_full_queue_makes_submit_wait() {
    const QUEUE: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let (hook, release, parked) = gate();
    let config = StorageConfig {
        fault_hook: Some(hook),
        queue_batches_max: QUEUE,
        ..StorageConfig::default()
    };
    let (store, _) = Store::open_with(config, dir.path(), CLUSTER, NODE).unwrap();
    let first = store.submit_blocking(accept(0, b"first")).unwrap();
    parked.recv().unwrap();
    let mut pending: Vec<_> = (1..=QUEUE as u64)
        .map(|slot| store.submit_blocking(accept(slot, b"x")).unwrap())
        .collect();
    assert_eq!(store.metrics().queue_depth, QUEUE as u64);

    let mut context = Context::from_waker(Waker::noop());
    let mut blocked = pin!(store.submit(accept(99, b"waits")));
    assert!(blocked.as_mut().poll(&mut context).is_pending());

    release.send(()).unwrap();
    first.wait().unwrap();
    // The committer drains the queue, so the blocked submit gets its place.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    pending.push(runtime.block_on(blocked).unwrap());
    for p in pending {
        p.wait().unwrap();
    }
    assert_eq!(store.accepted(99).unwrap(), Some(b"waits".to_vec()));
}

#[test]
fn async_callers_await_durability() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pending = store.submit(accept(5, b"five")).await.unwrap();
        pending.await.unwrap();
        store
            .write(WriteBatch {
                chosen: Some(5),
                ..WriteBatch::default()
            })
            .await
            .unwrap();
    });
    drop(store);
    let (_store, recovered) = open(dir.path());
    assert_eq!(recovered.chosen, Some(5));
    assert_eq!(recovered.accepted, BTreeMap::from([(5, b"five".to_vec())]));
}

#[test]
fn delete_below_forgets_entries_and_deletes_them_in_steps() {
    const SLOTS: u64 = 100;
    const BELOW: u64 = 60;
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig {
        delete_keys_per_step_max: 7,
        ..StorageConfig::default()
    };
    {
        let (store, _) = Store::open_with(config.clone(), dir.path(), CLUSTER, NODE).unwrap();
        let batch = WriteBatch {
            accepted: (0..SLOTS).map(|slot| (slot, vec![slot as u8])).collect(),
            ..WriteBatch::default()
        };
        store.write_blocking(batch).unwrap();
        store
            .write_blocking(WriteBatch {
                meta: vec![("snapshot_index".to_string(), BELOW.to_be_bytes().to_vec())],
                delete_below: Some(BELOW),
                ..WriteBatch::default()
            })
            .unwrap();
        assert_eq!(store.log_start(), BELOW);
        assert_eq!(store.accepted(BELOW - 1).unwrap(), None);
        assert_eq!(store.accepted(BELOW).unwrap(), Some(vec![BELOW as u8]));
        assert_eq!(
            store.accepted_from(0, 1).unwrap(),
            vec![(BELOW, vec![BELOW as u8])]
        );
        // A lower watermark changes nothing.
        store
            .write_blocking(WriteBatch {
                delete_below: Some(10),
                ..WriteBatch::default()
            })
            .unwrap();
        assert_eq!(store.log_start(), BELOW);

        // Deletion runs in the background; wait for it (bounded), then check the count.
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.metrics().deleted_entries < BELOW && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(store.metrics().deleted_entries, BELOW);
    }
    let (_store, recovered) = Store::open_with(config, dir.path(), CLUSTER, NODE).unwrap();
    assert_eq!(recovered.log_start, BELOW);
    assert_eq!(
        recovered.accepted.keys().copied().collect::<Vec<_>>(),
        (BELOW..SLOTS).collect::<Vec<_>>()
    );
    assert_eq!(
        recovered.meta.get("snapshot_index"),
        Some(&BELOW.to_be_bytes().to_vec())
    );
}

fn fail_stop_at(point: FaultPoint, error_kind: std::io::ErrorKind) -> StorageError {
    fail_stop_with(point, error_kind, StorageConfig::default())
}

fn fail_stop_with(
    point: FaultPoint,
    error_kind: std::io::ErrorKind,
    config: StorageConfig,
) -> StorageError {
    let dir = tempfile::tempdir().unwrap();
    let handler = Arc::new(RecordFailStop::default());
    let hook: FaultHook = Arc::new(move |at| {
        if at == point {
            Err(std::io::Error::new(error_kind, "injected"))
        } else {
            Ok(())
        }
    });
    let config = StorageConfig {
        fail_stop: handler.clone(),
        fault_hook: Some(hook),
        ..config
    };
    let (store, _) = Store::open_with(config, dir.path(), CLUSTER, NODE).unwrap();
    let error = store.write_blocking(accept(1, b"lost")).unwrap_err();
    assert_eq!(*handler.0.lock().unwrap(), vec![error.clone()]);
    assert!(store.is_stopped());
    // Never continue after a failed write or sync: every later write fails too.
    assert_eq!(
        store.write_blocking(accept(2, b"refused")),
        Err(StorageError::Stopped)
    );
    assert_eq!(store.metrics().syncs, 0);
    assert_eq!(store.metrics().batches, 0);
    assert_eq!(handler.0.lock().unwrap().len(), 1);
    error
}

#[test]
fn a_failed_sync_is_fail_stop() {
    let error = fail_stop_at(FaultPoint::Sync, std::io::ErrorKind::Other);
    let StorageError::WriteFailed { reason, .. } = &error else {
        panic!("expected WriteFailed, got {error:?}");
    };
    assert!(reason.contains("injected"), "{reason}");
}

#[test]
fn a_full_disk_is_fail_stop_saying_the_disk_is_full() {
    let error = fail_stop_at(FaultPoint::Write, std::io::ErrorKind::StorageFull);
    assert!(matches!(error, StorageError::DiskFull { .. }), "{error:?}");
    assert!(
        error.to_string().starts_with("the disk is full (ENOSPC)"),
        "{error}"
    );
}

#[test]
fn a_failure_with_little_free_space_is_reported_as_a_full_disk() {
    // fjall reports ENOSPC met by its background flush only as `Poisoned`; the free space
    // left decides. Every filesystem has less than u64::MAX bytes free.
    let config = StorageConfig {
        disk_full_free_bytes_max: u64::MAX,
        ..StorageConfig::default()
    };
    let error = fail_stop_with(FaultPoint::Sync, std::io::ErrorKind::Other, config);
    let StorageError::DiskFull { reason, .. } = &error else {
        panic!("expected DiskFull, got {error:?}");
    };
    assert!(reason.contains("injected"), "{reason}");
    assert!(
        reason.ends_with("bytes free on that filesystem)"),
        "{reason}"
    );
}

#[test]
fn a_promise_that_goes_backwards_stops_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let promise = |round| WriteBatch {
        promised: Some(Ballot { round, node: 1 }),
        ..WriteBatch::default()
    };
    store.write_blocking(promise(5)).unwrap();
    store.write_blocking(promise(5)).unwrap();
    // A programmer error in the caller: the committer panics and never writes it.
    assert_eq!(store.write_blocking(promise(4)), Err(StorageError::Stopped));
    assert_eq!(store.write_blocking(promise(6)), Err(StorageError::Stopped));
}

/// Rewrites one key of the `node` keyspace behind the store's back, as an older or newer
/// build (or a half-created store) would have left it.
fn tamper_identity(dir: &Path, key: &str, value: Option<&[u8]>) {
    let db = fjall::Database::builder(dir.join(paxwasm::storage::STORE_DIR_NAME))
        .open()
        .unwrap();
    let node = db
        .keyspace("node", fjall::KeyspaceCreateOptions::default)
        .unwrap();
    match value {
        Some(value) => node.insert(key, value).unwrap(),
        None => node.remove(key).unwrap(),
    }
    db.persist(fjall::PersistMode::SyncAll).unwrap();
}

#[test]
fn another_format_version_or_a_store_without_identity_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path());
        store.write_blocking(accept(1, b"one")).unwrap();
    }
    tamper_identity(dir.path(), "format_version", Some(&2u32.to_be_bytes()));
    assert_eq!(
        Store::open(dir.path(), CLUSTER, NODE).err().unwrap(),
        StorageError::UnsupportedFormat {
            dir: dir.path().to_path_buf(),
            found: 2,
            supported: paxwasm::storage::FORMAT_VERSION,
        }
    );
    tamper_identity(dir.path(), "format_version", None);
    let error = Store::open(dir.path(), CLUSTER, NODE).err().unwrap();
    assert_eq!(
        error.to_string(),
        format!(
            "cannot open data directory {}: the store has acceptor data but no complete node \
             identity; refusing to adopt it",
            dir.path().display()
        )
    );
}
