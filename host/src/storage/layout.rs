//! The on-disk layout: fjall keyspaces, key encodings, the identity check and recovery.
//!
//! One fjall database in `<data dir>/store` with four keyspaces:
//!
//! | keyspace   | key                   | value                                  |
//! |------------|-----------------------|----------------------------------------|
//! | `node`     | `cluster_id`          | UTF-8 cluster id                       |
//! |            | `node_id`             | u64 big-endian                         |
//! |            | `format_version`      | u32 big-endian ([`FORMAT_VERSION`])    |
//! | `acceptor` | `promised`            | round u64 BE, node u64 BE (16 bytes)   |
//! |            | `chosen`              | u64 big-endian                         |
//! |            | `log_start`           | u64 big-endian (compaction watermark)  |
//! | `entries`  | slot u64 big-endian   | opaque accepted entry                  |
//! | `meta`     | UTF-8 key             | opaque bytes                           |
//!
//! Slots are big-endian so fjall's byte order is slot order.

use std::collections::BTreeMap;
use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::{is_disk_full, Ballot, Recovered, StorageConfig, StorageError, STORE_DIR_NAME};

/// Version of the layout above; bump it when the layout changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

const KEYSPACE_NODE: &str = "node";
const KEYSPACE_ACCEPTOR: &str = "acceptor";
const KEYSPACE_ENTRIES: &str = "entries";
const KEYSPACE_META: &str = "meta";

const KEY_CLUSTER_ID: &[u8] = b"cluster_id";
const KEY_NODE_ID: &[u8] = b"node_id";
const KEY_FORMAT_VERSION: &[u8] = b"format_version";
pub(super) const KEY_PROMISED: &[u8] = b"promised";
pub(super) const KEY_CHOSEN: &[u8] = b"chosen";
pub(super) const KEY_LOG_START: &[u8] = b"log_start";

const BALLOT_BYTES: usize = 16;

/// Handles to the four keyspaces. Cheap to clone (fjall handles are reference counted).
#[derive(Clone)]
pub(super) struct Keyspaces {
    pub node: Keyspace,
    pub acceptor: Keyspace,
    pub entries: Keyspace,
    pub meta: Keyspace,
}

pub(super) fn slot_key(slot: u64) -> [u8; 8] {
    slot.to_be_bytes()
}

pub(super) fn encode_ballot(ballot: Ballot) -> [u8; BALLOT_BYTES] {
    let mut bytes = [0; BALLOT_BYTES];
    bytes[..8].copy_from_slice(&ballot.round.to_be_bytes());
    bytes[8..].copy_from_slice(&ballot.node.to_be_bytes());
    bytes
}

fn decode_ballot(bytes: &[u8]) -> Result<Ballot, String> {
    let bytes: [u8; BALLOT_BYTES] = bytes
        .try_into()
        .map_err(|_| format!("promised ballot has {} bytes, not 16", bytes.len()))?;
    let (round, node) = bytes.split_at(8);
    Ok(Ballot {
        round: u64::from_be_bytes(round.try_into().expect("split at 8 of 16")),
        node: u64::from_be_bytes(node.try_into().expect("split at 8 of 16")),
    })
}

fn decode_u64(bytes: &[u8], what: &str) -> Result<u64, String> {
    let bytes: [u8; 8] = bytes
        .try_into()
        .map_err(|_| format!("{what} has {} bytes, not 8", bytes.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

fn decode_u32(bytes: &[u8], what: &str) -> Result<u32, String> {
    let bytes: [u8; 4] = bytes
        .try_into()
        .map_err(|_| format!("{what} has {} bytes, not 4", bytes.len()))?;
    Ok(u32::from_be_bytes(bytes))
}

fn open_error(dir: &Path, reason: impl std::fmt::Display) -> StorageError {
    StorageError::Open {
        dir: dir.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// An I/O failure while opening: a full disk says so, anything else is an open error.
fn io_error(dir: &Path, error: &(dyn std::error::Error + 'static)) -> StorageError {
    if is_disk_full(error) {
        return StorageError::DiskFull {
            dir: dir.to_path_buf(),
            reason: error.to_string(),
        };
    }
    open_error(dir, error)
}

fn read_error(dir: &Path, error: fjall::Error) -> StorageError {
    StorageError::ReadFailed {
        dir: dir.to_path_buf(),
        reason: error.to_string(),
    }
}

/// Opens (creating if needed) the fjall database under `dir` and its keyspaces.
pub(super) fn open_database(
    config: &StorageConfig,
    dir: &Path,
) -> Result<(Database, Keyspaces), StorageError> {
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, &e))?;
    let db = Database::builder(dir.join(STORE_DIR_NAME))
        .cache_size(config.cache_bytes)
        // The committer syncs explicitly once per group; nothing else should write through.
        .manual_journal_persist(true)
        .open()
        .map_err(|e| match e {
            fjall::Error::Locked => StorageError::Locked {
                dir: dir.to_path_buf(),
            },
            e => io_error(dir, &e),
        })?;
    let keyspace = |name: &str| {
        db.keyspace(name, || {
            KeyspaceCreateOptions::default().manual_journal_persist(true)
        })
        .map_err(|e| io_error(dir, &e))
    };
    let keyspaces = Keyspaces {
        node: keyspace(KEYSPACE_NODE)?,
        acceptor: keyspace(KEYSPACE_ACCEPTOR)?,
        entries: keyspace(KEYSPACE_ENTRIES)?,
        meta: keyspace(KEYSPACE_META)?,
    };
    Ok((db, keyspaces))
}

/// Writes the identity into a store that has none, or checks the one it has.
pub(super) fn check_or_create_identity(
    db: &Database,
    keyspaces: &Keyspaces,
    dir: &Path,
    cluster_id: &str,
    node_id: u64,
) -> Result<(), StorageError> {
    let get = |key: &[u8]| keyspaces.node.get(key).map_err(|e| io_error(dir, &e));
    let (Some(found_cluster), Some(found_node), Some(found_version)) = (
        get(KEY_CLUSTER_ID)?,
        get(KEY_NODE_ID)?,
        get(KEY_FORMAT_VERSION)?,
    ) else {
        return create_identity(db, keyspaces, dir, cluster_id, node_id);
    };
    let found_version =
        decode_u32(&found_version, "format_version").map_err(|e| open_error(dir, e))?;
    if found_version != FORMAT_VERSION {
        return Err(StorageError::UnsupportedFormat {
            dir: dir.to_path_buf(),
            found: found_version,
            supported: FORMAT_VERSION,
        });
    }
    let found_cluster_id = String::from_utf8(found_cluster.to_vec())
        .map_err(|_| open_error(dir, "the stored cluster id is not UTF-8"))?;
    let found_node_id = decode_u64(&found_node, "node_id").map_err(|e| open_error(dir, e))?;
    if found_cluster_id != cluster_id || found_node_id != node_id {
        return Err(StorageError::WrongIdentity {
            dir: dir.to_path_buf(),
            found_cluster_id,
            found_node_id,
            expected_cluster_id: cluster_id.to_string(),
            expected_node_id: node_id,
        });
    }
    Ok(())
}

fn create_identity(
    db: &Database,
    keyspaces: &Keyspaces,
    dir: &Path,
    cluster_id: &str,
    node_id: u64,
) -> Result<(), StorageError> {
    // A store without a complete identity must hold nothing else: acceptor state of an
    // unknown node must never be adopted by whoever opens the directory next.
    for keyspace in [
        &keyspaces.node,
        &keyspaces.acceptor,
        &keyspaces.entries,
        &keyspaces.meta,
    ] {
        if !keyspace.is_empty().map_err(|e| io_error(dir, &e))? {
            return Err(open_error(
                dir,
                "the store has acceptor data but no complete node identity; refusing to adopt it",
            ));
        }
    }
    let mut batch = db.batch();
    batch.insert(&keyspaces.node, KEY_CLUSTER_ID, cluster_id.as_bytes());
    batch.insert(&keyspaces.node, KEY_NODE_ID, node_id.to_be_bytes());
    batch.insert(
        &keyspaces.node,
        KEY_FORMAT_VERSION,
        FORMAT_VERSION.to_be_bytes(),
    );
    batch.commit().map_err(|e| io_error(dir, &e))?;
    db.persist(PersistMode::SyncAll)
        .map_err(|e| io_error(dir, &e))?;
    tracing::info!(dir = %dir.display(), cluster_id, node_id, "created a new acceptor store");
    Ok(())
}

/// Reads the whole acceptor state.
pub(super) fn recover(keyspaces: &Keyspaces, dir: &Path) -> Result<Recovered, StorageError> {
    let corrupt = |e: String| open_error(dir, e);
    let get = |key: &[u8]| keyspaces.acceptor.get(key).map_err(|e| io_error(dir, &e));
    let promised = get(KEY_PROMISED)?
        .map(|bytes| decode_ballot(&bytes))
        .transpose()
        .map_err(corrupt)?;
    let chosen = get(KEY_CHOSEN)?
        .map(|bytes| decode_u64(&bytes, "chosen"))
        .transpose()
        .map_err(corrupt)?;
    let log_start = get(KEY_LOG_START)?
        .map(|bytes| decode_u64(&bytes, "log_start"))
        .transpose()
        .map_err(corrupt)?
        .unwrap_or(0);

    let mut accepted = BTreeMap::new();
    for guard in keyspaces.entries.range(slot_key(log_start)..) {
        let (key, value) = guard.into_inner().map_err(|e| io_error(dir, &e))?;
        let slot = decode_u64(&key, "an entry key").map_err(corrupt)?;
        accepted.insert(slot, value.to_vec());
    }
    let mut meta = BTreeMap::new();
    for guard in keyspaces.meta.iter() {
        let (key, value) = guard.into_inner().map_err(|e| io_error(dir, &e))?;
        let key = String::from_utf8(key.to_vec())
            .map_err(|_| open_error(dir, "a metadata key is not UTF-8"))?;
        meta.insert(key, value.to_vec());
    }
    Ok(Recovered {
        promised,
        accepted,
        chosen,
        meta,
        log_start,
    })
}

pub(super) fn read_entry(
    keyspaces: &Keyspaces,
    dir: &Path,
    slot: u64,
) -> Result<Option<Vec<u8>>, StorageError> {
    let value = keyspaces
        .entries
        .get(slot_key(slot))
        .map_err(|e| read_error(dir, e))?;
    Ok(value.map(|v| v.to_vec()))
}

pub(super) fn read_entries_from(
    keyspaces: &Keyspaces,
    dir: &Path,
    from: u64,
    count_max: usize,
) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
    let mut entries = Vec::new();
    for guard in keyspaces.entries.range(slot_key(from)..).take(count_max) {
        let (key, value) = guard.into_inner().map_err(|e| read_error(dir, e))?;
        let slot = decode_u64(&key, "an entry key").map_err(|reason| StorageError::ReadFailed {
            dir: dir.to_path_buf(),
            reason,
        })?;
        entries.push((slot, value.to_vec()));
    }
    Ok(entries)
}

pub(super) fn read_meta(
    keyspaces: &Keyspaces,
    dir: &Path,
    key: &str,
) -> Result<Option<Vec<u8>>, StorageError> {
    let value = keyspaces.meta.get(key).map_err(|e| read_error(dir, e))?;
    Ok(value.map(|v| v.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ballot_encoding_round_trips_and_orders_like_ballots() {
        let low = Ballot { round: 1, node: 9 };
        let high = Ballot { round: 2, node: 1 };
        assert_eq!(decode_ballot(&encode_ballot(low)), Ok(low));
        assert_eq!(decode_ballot(&encode_ballot(high)), Ok(high));
        assert!(encode_ballot(low) < encode_ballot(high));
        assert_eq!(
            decode_ballot(&[0; 15]),
            Err("promised ballot has 15 bytes, not 16".to_string())
        );
    }

    #[test]
    fn slot_keys_sort_in_slot_order() {
        assert!(slot_key(255) < slot_key(256));
        assert!(slot_key(1 << 40) < slot_key(u64::MAX));
        assert_eq!(decode_u64(&slot_key(1234), "slot"), Ok(1234));
    }
}
