//! Node snapshot files: everything a replica needs to rebuild its replicated state at one
//! slot, in one self-checking file under `<data dir>/snapshots/`.
//!
//! A snapshot is written on a background thread (never on the core task), to a temporary
//! file that is synced, renamed into place and followed by a sync of the directory, so a
//! crash leaves either the old set of snapshots or the old set plus the new one, never a
//! half-written file under a final name. The newest `SNAPSHOTS_KEPT` are kept.
//!
//! File layout (integers little-endian, `bytes` = u64 length + bytes, `str` = u32
//! length + UTF-8):
//!
//! ```text
//! magic "PXWNSNAP" | format version u32 (= 4; 1 to 3 are still read) | slot u64
//! | voters: count u32, node id u64 each
//! | (version 3, 4) old voters: 0 | 1 count u32 node id u64 each   (1: joint C(old,new))
//! | (version 3, 4) learners: count u32, node id u64 each
//! | applier state: bytes            (Applier::export_state)
//! | current module: 0 | 1 id str index u64
//! | history: count u32, per event: module str | index u64 | migrated u8 | 0 / 1 failed str
//! | module bytes: bytes             (empty when no module is installed)
//! | machine image: bytes            (machine::Snapshot::to_bytes; empty without a module)
//! | staged module (version 2 and 3): 0 | 1 sha256 [32] total u64 bytes
//!                                   (the upgrade staging area, see node/upgrade.rs)
//! | address book (version 3 and 4): count u32, per member id u64 | peer str | http str
//!                                   (see node/members.rs)
//! | apply rules u32 (version 4)     (see node/app.rs; 1 in older files)
//! | sha256 (32 bytes) of everything before it
//! ```
//!
//! The configuration is the one in force at the slot (`Replica::applied_configuration`),
//! whole: voters, old voters while joint, learners. Versions 1 and 2 stored the voters
//! only (there were no learners then) and no address book.
//!
//! The trailing sha256 identifies the file: a transfer names a snapshot by (slot, sha256),
//! and a file whose content does not hash to its trailer is corrupt and never loaded.
//!
//! This module knows files and bytes; it never talks to peers, never touches the store
//! and never runs the machine.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::paxos::{Configuration, NodeId, Slot};

use super::handle::ModuleEvent;
use super::members::AddressBook;
use super::upgrade::Staging;

/// Name of the snapshot folder inside the node's data directory.
pub const SNAPSHOT_DIR_NAME: &str = "snapshots";
/// Snapshots kept on disk: the newest and the one before it, so a corrupt newest file
/// still leaves a local snapshot to restart from.
pub const SNAPSHOTS_KEPT: usize = 2;
const MAGIC: &[u8; 8] = b"PXWNSNAP";
/// Version of the file layout this build writes and reads.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 4;
/// The first layout (no staged module), still read: files written before upgrades
/// travelled in chunks restore as snapshots with an empty staging area.
const SNAPSHOT_FORMAT_VERSION_1: u32 = 1;
/// The second layout (voters only, no address book), still read: its configuration is
/// its voters, and the address book is seeded from `--cluster`.
const SNAPSHOT_FORMAT_VERSION_2: u32 = 2;
/// The third layout (no apply rules), still read: its state was applied one machine
/// call per command (apply rules 1).
const SNAPSHOT_FORMAT_VERSION_3: u32 = 3;
/// Most node ids in one set of a stored configuration.
const CONFIGURATION_IDS_MAX: usize = 4096;
const FILE_PREFIX: &str = "snapshot-";
const FILE_SUFFIX: &str = ".pxsnap";
const TEMP_SUFFIX: &str = ".tmp";
const PARTIAL_PREFIX: &str = "incoming-";
const PARTIAL_SUFFIX: &str = ".partial";
const CORRUPT_SUFFIX: &str = ".corrupt";
const SHA256_BYTES: usize = 32;
/// Read size when hashing or copying a file.
const IO_CHUNK_BYTES: usize = 1 << 20;

/// What identifies one snapshot file, here and across a transfer.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnapshotId {
    pub slot: Slot,
    /// The file's trailer: sha256 of every byte before it.
    pub sha256: [u8; 32],
    /// Length of the whole file, trailer included.
    pub file_bytes: u64,
}

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "snapshot(slot {}, {} bytes, sha256:{})",
            self.slot,
            self.file_bytes,
            &hex(&self.sha256)[..16]
        )
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The application metadata a snapshot carries besides the machine image: what
/// `GET /v1/app` shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppMeta {
    /// Current module id (`sha256:…`) and the slot it took effect at.
    pub current: Option<(String, u64)>,
    pub history: Vec<ModuleEvent>,
    /// The apply rules in force at the slot (`app::APPLY_RULES_MAX`).
    pub apply_rules: u32,
}

/// A decoded snapshot file.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeSnapshot {
    pub slot: Slot,
    /// The configuration in force at `slot`.
    pub configuration: Configuration,
    /// `None` in a version-1 or -2 file (no address book then).
    pub addresses: Option<AddressBook>,
    pub applier_state: Vec<u8>,
    pub app: AppMeta,
    pub module_bytes: Vec<u8>,
    /// `machine::Snapshot::to_bytes()` of the machine; empty when no module is installed.
    pub machine_image: Vec<u8>,
    /// The upgrade staging area (one chunk holding every staged byte).
    pub staged: Option<Staging>,
}

impl fmt::Debug for NodeSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeSnapshot")
            .field("slot", &self.slot)
            .field("configuration", &self.configuration)
            .field("addresses", &self.addresses)
            .field("applier_state_bytes", &self.applier_state.len())
            .field("app", &self.app)
            .field("module_bytes", &self.module_bytes.len())
            .field("machine_image_bytes", &self.machine_image.len())
            .field(
                "staged",
                &self
                    .staged
                    .as_ref()
                    .map(|s| (s.staged_bytes, s.total_bytes)),
            )
            .finish()
    }
}

/// Where the machine image of a snapshot being written comes from: something that writes
/// exactly `encoded_len` bytes (the machine's snapshot encoding).
pub trait ImageSource: Send {
    fn encoded_len(&self) -> u64;
    fn write_to(&self, out: &mut dyn Write) -> io::Result<()>;
}

/// The machine's low-pause image (`Machine::snapshot_image()`): a shadow copy of the
/// memory, written out on the worker thread while the machine goes on.
impl ImageSource for crate::machine::SnapshotImage {
    fn encoded_len(&self) -> u64 {
        crate::machine::SnapshotImage::encoded_len(self)
    }

    fn write_to(&self, out: &mut dyn Write) -> io::Result<()> {
        crate::machine::SnapshotImage::write_to(self, out)
    }
}

/// A full in-memory copy of the machine state (`Machine::snapshot()`).
impl ImageSource for crate::machine::Snapshot {
    fn encoded_len(&self) -> u64 {
        // The layout of `Snapshot::to_bytes`: magic, module id, time, seed, global count,
        // 17 bytes per global, memory length, memory.
        (8 + 32 + 8 + 8 + 4 + 17 * self.globals.len() + 8 + self.memory.len()) as u64
    }

    fn write_to(&self, out: &mut dyn Write) -> io::Result<()> {
        out.write_all(&self.to_bytes())
    }
}

/// What the core captured at `slot`, to be written by the background writer.
pub struct SnapshotContents {
    pub slot: Slot,
    pub configuration: Configuration,
    pub addresses: AddressBook,
    pub applier_state: Vec<u8>,
    pub app: AppMeta,
    pub module_bytes: Option<std::sync::Arc<Vec<u8>>>,
    pub image: Option<Box<dyn ImageSource>>,
    pub staged: Option<Staging>,
}

#[derive(Debug)]
pub enum SnapshotError {
    Io {
        path: PathBuf,
        error: io::Error,
    },
    /// The file is not a valid snapshot (bad checksum, truncated, unknown version, ...).
    Corrupt {
        path: PathBuf,
        reason: String,
    },
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotError::Io { path, error } => {
                write!(f, "snapshot file {}: {error}", path.display())
            }
            SnapshotError::Corrupt { path, reason } => {
                write!(f, "snapshot file {} is corrupt: {reason}", path.display())
            }
        }
    }
}

impl std::error::Error for SnapshotError {}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |error| SnapshotError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// Writes everything through to `inner` and hashes it on the way.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Checks that a writer produced exactly the bytes it promised.
struct CountingWriter<'a> {
    inner: &'a mut dyn Write,
    written: u64,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    put_u32(
        out,
        u32::try_from(text.len()).expect("snapshot strings are short"),
    );
    out.extend_from_slice(text.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u64(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Everything before the module bytes (small: no module, no memory).
fn put_ids<'a>(out: &mut Vec<u8>, ids: impl ExactSizeIterator<Item = &'a NodeId>) {
    put_u32(out, u32::try_from(ids.len()).expect("id count fits u32"));
    for id in ids {
        put_u64(out, *id);
    }
}

fn encode_head(
    slot: Slot,
    configuration: &Configuration,
    applier_state: &[u8],
    app: &AppMeta,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + applier_state.len());
    out.extend_from_slice(MAGIC);
    put_u32(&mut out, SNAPSHOT_FORMAT_VERSION);
    put_u64(&mut out, slot);
    put_ids(&mut out, configuration.voters.iter());
    match &configuration.old_voters {
        None => out.push(0),
        Some(old) => {
            out.push(1);
            put_ids(&mut out, old.iter());
        }
    }
    put_ids(&mut out, configuration.learners.iter());
    put_bytes(&mut out, applier_state);
    match &app.current {
        None => out.push(0),
        Some((id, index)) => {
            out.push(1);
            put_str(&mut out, id);
            put_u64(&mut out, *index);
        }
    }
    put_u32(
        &mut out,
        u32::try_from(app.history.len()).expect("history is bounded"),
    );
    for event in &app.history {
        put_str(&mut out, &event.module);
        put_u64(&mut out, event.index);
        out.push(u8::from(event.migrated));
        match &event.failed {
            None => out.push(0),
            Some(reason) => {
                out.push(1);
                put_str(&mut out, reason);
            }
        }
    }
    out
}

/// Writes `contents` as a complete snapshot file to `out` and returns its trailer hash and
/// length.
pub fn write_snapshot(
    contents: &SnapshotContents,
    out: &mut dyn Write,
) -> io::Result<([u8; 32], u64)> {
    let mut writer = HashingWriter {
        inner: out,
        hasher: Sha256::new(),
        written: 0,
    };
    writer.write_all(&encode_head(
        contents.slot,
        &contents.configuration,
        &contents.applier_state,
        &contents.app,
    ))?;
    let module: &[u8] = contents
        .module_bytes
        .as_deref()
        .map_or(&[], |m| m.as_slice());
    writer.write_all(&(module.len() as u64).to_le_bytes())?;
    writer.write_all(module)?;
    match &contents.image {
        None => writer.write_all(&0u64.to_le_bytes())?,
        Some(image) => {
            let promised = image.encoded_len();
            writer.write_all(&promised.to_le_bytes())?;
            let mut counting = CountingWriter {
                inner: &mut writer,
                written: 0,
            };
            image.write_to(&mut counting)?;
            assert_eq!(
                counting.written, promised,
                "the machine image wrote another length than it announced"
            );
        }
    }
    match &contents.staged {
        None => writer.write_all(&[0])?,
        Some(staged) => {
            writer.write_all(&[1])?;
            writer.write_all(&staged.sha256)?;
            writer.write_all(&staged.total_bytes.to_le_bytes())?;
            writer.write_all(&staged.staged_bytes.to_le_bytes())?;
            for chunk in &staged.chunks {
                writer.write_all(chunk)?;
            }
        }
    }
    let mut book = Vec::new();
    contents.addresses.encode(&mut book);
    writer.write_all(&book)?;
    writer.write_all(&contents.app.apply_rules.to_le_bytes())?;
    let sha256: [u8; 32] = writer.hasher.finalize_reset().into();
    writer.inner.write_all(&sha256)?;
    writer.inner.flush()?;
    Ok((sha256, writer.written + SHA256_BYTES as u64))
}

/// Decodes a whole snapshot file held in memory, checking its trailer first.
pub fn decode_snapshot(bytes: &[u8]) -> Result<(NodeSnapshot, SnapshotId), String> {
    if bytes.len() < MAGIC.len() + SHA256_BYTES {
        return Err(format!("{} bytes is too short", bytes.len()));
    }
    let (body, trailer) = bytes.split_at(bytes.len() - SHA256_BYTES);
    let sha256: [u8; 32] = Sha256::digest(body).into();
    if sha256.as_slice() != trailer {
        return Err(format!(
            "sha256 mismatch: content hashes to {}, the trailer says {}",
            hex(&sha256),
            hex(trailer)
        ));
    }
    let mut reader = Reader { input: body };
    if reader.take(8, "magic")? != MAGIC {
        return Err("not a paxwasm node snapshot (wrong magic)".into());
    }
    let version = reader.u32("format version")?;
    if !(SNAPSHOT_FORMAT_VERSION_1..=SNAPSHOT_FORMAT_VERSION).contains(&version) {
        return Err(format!(
            "format version {version}, this build reads {SNAPSHOT_FORMAT_VERSION_1} to \
             {SNAPSHOT_FORMAT_VERSION}"
        ));
    }
    let slot = reader.u64("slot")?;
    let voters = reader.ids("voter")?;
    let (old_voters, learners) = if version > SNAPSHOT_FORMAT_VERSION_2 {
        let old_voters = match reader.u8("joint")? {
            0 => None,
            1 => Some(reader.ids("old voter")?),
            tag => return Err(format!("bad joint tag {tag}")),
        };
        (old_voters, reader.ids("learner")?)
    } else {
        (None, Vec::new())
    };
    let configuration = Configuration {
        voters: voters.into_iter().collect(),
        old_voters: old_voters.map(|old| old.into_iter().collect()),
        learners: learners.into_iter().collect(),
    };
    if configuration.voters.is_empty()
        || configuration
            .old_voters
            .as_ref()
            .is_some_and(|old| old.is_empty())
        || !configuration.voters.is_disjoint(&configuration.learners)
    {
        return Err(format!("invalid configuration {configuration:?}"));
    }
    let applier_state = reader.bytes("applier state")?.to_vec();
    let current = match reader.u8("current module")? {
        0 => None,
        1 => Some((reader.str("module id")?, reader.u64("module index")?)),
        tag => return Err(format!("bad current-module tag {tag}")),
    };
    let history_count = reader.u32("history count")? as usize;
    // Each event takes at least 4 + 8 + 1 + 1 bytes.
    if history_count.saturating_mul(14) > reader.input.len() {
        return Err("history count exceeds the file".into());
    }
    let mut history = Vec::with_capacity(history_count);
    for _ in 0..history_count {
        let module = reader.str("history module")?;
        let index = reader.u64("history index")?;
        let migrated = match reader.u8("history migrated")? {
            0 => false,
            1 => true,
            tag => return Err(format!("bad migrated flag {tag}")),
        };
        let failed = match reader.u8("history failed")? {
            0 => None,
            1 => Some(reader.str("history failure")?),
            tag => return Err(format!("bad failed tag {tag}")),
        };
        history.push(ModuleEvent {
            module,
            index,
            migrated,
            failed,
        });
    }
    let module_bytes = reader.bytes("module bytes")?.to_vec();
    let machine_image = reader.bytes("machine image")?.to_vec();
    let staged = if version == SNAPSHOT_FORMAT_VERSION_1 {
        None
    } else {
        match reader.u8("staged module")? {
            0 => None,
            1 => {
                let sha256: [u8; 32] = reader
                    .take(32, "staged sha256")?
                    .try_into()
                    .expect("32 bytes");
                let total_bytes = reader.u64("staged total")?;
                let bytes = reader.bytes("staged bytes")?;
                if bytes.is_empty() || bytes.len() as u64 > total_bytes {
                    return Err(format!(
                        "{} staged bytes of a {total_bytes}-byte module",
                        bytes.len()
                    ));
                }
                let mut staging = Staging::new(sha256, total_bytes);
                staging.push(bytes);
                Some(staging)
            }
            tag => return Err(format!("bad staged-module tag {tag}")),
        }
    };
    let addresses = if version > SNAPSHOT_FORMAT_VERSION_2 {
        let (book, rest) = AddressBook::decode(reader.input)?;
        reader.input = rest;
        Some(book)
    } else {
        None
    };
    let apply_rules = if version > SNAPSHOT_FORMAT_VERSION_3 {
        match reader.u32("apply rules")? {
            0 => return Err("apply rules 0".into()),
            rules => rules,
        }
    } else {
        1
    };
    if !reader.input.is_empty() {
        return Err(format!(
            "{} bytes after the last section",
            reader.input.len()
        ));
    }
    if module_bytes.is_empty() != machine_image.is_empty() {
        return Err("a module without a machine image (or the reverse)".into());
    }
    let id = SnapshotId {
        slot,
        sha256,
        file_bytes: bytes.len() as u64,
    };
    Ok((
        NodeSnapshot {
            slot,
            configuration,
            addresses,
            applier_state,
            app: AppMeta {
                current,
                history,
                apply_rules,
            },
            module_bytes,
            machine_image,
            staged,
        },
        id,
    ))
}

struct Reader<'a> {
    input: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize, field: &str) -> Result<&'a [u8], String> {
        if count > self.input.len() {
            return Err(format!("truncated inside {field}"));
        }
        let (head, tail) = self.input.split_at(count);
        self.input = tail;
        Ok(head)
    }

    /// `count u32 | id u64 *` of a configuration set.
    fn ids(&mut self, field: &str) -> Result<Vec<NodeId>, String> {
        let count = self.u32(field)? as usize;
        if count > CONFIGURATION_IDS_MAX || count.saturating_mul(8) > self.input.len() {
            return Err(format!(
                "{field} count {count} exceeds the file or the limit"
            ));
        }
        (0..count).map(|_| self.u64(field)).collect()
    }

    fn u8(&mut self, field: &str) -> Result<u8, String> {
        Ok(self.take(1, field)?[0])
    }

    fn u32(&mut self, field: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4, field)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self, field: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8, field)?.try_into().expect("8 bytes"),
        ))
    }

    fn bytes(&mut self, field: &str) -> Result<&'a [u8], String> {
        let len = self.u64(field)?;
        let len = usize::try_from(len).map_err(|_| format!("{field} too long"))?;
        self.take(len, field)
    }

    fn str(&mut self, field: &str) -> Result<String, String> {
        let len = self.u32(field)? as usize;
        let bytes = self.take(len, field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{field} is not UTF-8"))
    }
}

/// A snapshot file on disk, known to be complete (it was renamed into place after a
/// sync). Whether its content is intact is checked when it is loaded or sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFile {
    pub id: SnapshotId,
    pub path: PathBuf,
}

/// The snapshot folder of one node. All writes into it go through one thread at a time
/// (the runtime's snapshot worker), so no two writers race on the folder.
#[derive(Clone, Debug)]
pub struct SnapshotDir {
    dir: PathBuf,
}

impl SnapshotDir {
    /// Opens (creating) `<data dir>/snapshots` and removes what an interrupted write left
    /// behind (temporary files). Partial transfers are kept: they resume.
    pub fn open(data_dir: &Path) -> Result<SnapshotDir, SnapshotError> {
        let dir = data_dir.join(SNAPSHOT_DIR_NAME);
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
            let entry = entry.map_err(io_error(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(TEMP_SUFFIX) {
                tracing::info!(file = %name, "removing a snapshot file an interrupted write left behind");
                fs::remove_file(entry.path()).map_err(io_error(&entry.path()))?;
            }
        }
        Ok(SnapshotDir { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn final_path(&self, slot: Slot) -> PathBuf {
        self.dir
            .join(format!("{FILE_PREFIX}{slot:020}{FILE_SUFFIX}"))
    }

    /// The complete snapshot files, newest (highest slot) first. Their ids are read from
    /// the file names and trailers; the content is not checked here.
    pub fn list(&self) -> Result<Vec<(Slot, PathBuf)>, SnapshotError> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_error(&self.dir))? {
            let entry = entry.map_err(io_error(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(slot) = name
                .strip_prefix(FILE_PREFIX)
                .and_then(|rest| rest.strip_suffix(FILE_SUFFIX))
                .and_then(|digits| digits.parse::<Slot>().ok())
            else {
                continue;
            };
            files.push((slot, entry.path()));
        }
        files.sort_by_key(|file| std::cmp::Reverse(file.0));
        Ok(files)
    }

    /// Writes `contents` durably: temporary file, `fsync`, rename, `fsync` of the folder;
    /// then removes all but the newest `SNAPSHOTS_KEPT` snapshots.
    pub fn write(&self, contents: &SnapshotContents) -> Result<SnapshotFile, SnapshotError> {
        self.write_pausing(contents, 0)
    }

    /// [`SnapshotDir::write`] that sleeps `pause_ms` after the temporary file is written
    /// and before it is synced and renamed: a test hook that gives a kill -9 a window in
    /// the middle of a snapshot write (`--snapshot-write-pause-ms`, hidden).
    pub fn write_pausing(
        &self,
        contents: &SnapshotContents,
        pause_ms: u64,
    ) -> Result<SnapshotFile, SnapshotError> {
        let path = self.final_path(contents.slot);
        let temp = path.with_extension(format!("pxsnap{TEMP_SUFFIX}"));
        let file = File::create(&temp).map_err(io_error(&temp))?;
        let mut out = BufWriter::with_capacity(IO_CHUNK_BYTES, file);
        let (sha256, file_bytes) = write_snapshot(contents, &mut out).map_err(io_error(&temp))?;
        let file = out
            .into_inner()
            .map_err(|error| io_error(&temp)(error.into_error()))?;
        if pause_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(pause_ms));
        }
        file.sync_all().map_err(io_error(&temp))?;
        drop(file);
        fs::rename(&temp, &path).map_err(io_error(&path))?;
        self.sync_dir()?;
        self.prune()?;
        Ok(SnapshotFile {
            id: SnapshotId {
                slot: contents.slot,
                sha256,
                file_bytes,
            },
            path,
        })
    }

    fn sync_dir(&self) -> Result<(), SnapshotError> {
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io_error(&self.dir))
    }

    /// Removes all but the newest `SNAPSHOTS_KEPT` complete snapshots.
    /// Deletes every snapshot of a slot above `slot` (used by a repair).
    pub fn remove_newer_than(&self, slot: Slot) -> Result<(), SnapshotError> {
        let mut removed = false;
        for (newer, path) in self.list()? {
            if newer > slot {
                tracing::warn!(slot = newer, path = %path.display(), "removing a snapshot of the diverged state");
                fs::remove_file(&path).map_err(io_error(&path))?;
                removed = true;
            }
        }
        if removed {
            self.sync_dir()?;
        }
        Ok(())
    }

    pub fn prune(&self) -> Result<(), SnapshotError> {
        for (slot, path) in self.list()?.into_iter().skip(SNAPSHOTS_KEPT) {
            tracing::debug!(slot, path = %path.display(), "removing an old snapshot");
            fs::remove_file(&path).map_err(io_error(&path))?;
        }
        Ok(())
    }

    /// Reads and checks one snapshot file.
    pub fn load(&self, path: &Path) -> Result<(NodeSnapshot, SnapshotId), SnapshotError> {
        let bytes = fs::read(path).map_err(io_error(path))?;
        decode_snapshot(&bytes).map_err(|reason| SnapshotError::Corrupt {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// The newest snapshot whose content checks out. A corrupt file is reported (one
    /// `ERROR` line), renamed aside (`*.corrupt`, so it is neither loaded nor counted
    /// again) and the next older one is tried.
    pub fn load_newest_valid(&self) -> Result<Option<(NodeSnapshot, SnapshotFile)>, SnapshotError> {
        for (slot, path) in self.list()? {
            match self.load(&path) {
                Ok((snapshot, id)) if id.slot == slot => {
                    return Ok(Some((snapshot, SnapshotFile { id, path })));
                }
                Ok((_, id)) => self.set_aside(
                    &path,
                    &format!("its name says slot {slot} but it holds slot {}", id.slot),
                )?,
                Err(SnapshotError::Corrupt { reason, .. }) => self.set_aside(&path, &reason)?,
                Err(error) => return Err(error),
            }
        }
        Ok(None)
    }

    fn set_aside(&self, path: &Path, reason: &str) -> Result<(), SnapshotError> {
        let aside = path.with_extension(format!("pxsnap{CORRUPT_SUFFIX}"));
        tracing::error!(
            path = %path.display(),
            reason,
            moved_to = %aside.display(),
            "corrupt snapshot file: not loading it; trying an older snapshot (or a peer's)"
        );
        fs::rename(path, &aside).map_err(io_error(path))
    }

    /// Reads the id of a complete file (slot from the head, sha256 from the trailer)
    /// without checking the content.
    pub fn peek_id(path: &Path) -> Result<SnapshotId, SnapshotError> {
        let mut file = File::open(path).map_err(io_error(path))?;
        let file_bytes = file.metadata().map_err(io_error(path))?.len();
        let mut head = [0u8; 20];
        file.read_exact(&mut head).map_err(io_error(path))?;
        if &head[..8] != MAGIC || file_bytes < (head.len() + SHA256_BYTES) as u64 {
            return Err(SnapshotError::Corrupt {
                path: path.to_path_buf(),
                reason: "not a paxwasm node snapshot".into(),
            });
        }
        let slot = u64::from_le_bytes(head[12..20].try_into().expect("8 bytes"));
        let mut sha256 = [0u8; 32];
        read_at(&file, &mut sha256, file_bytes - SHA256_BYTES as u64).map_err(io_error(path))?;
        Ok(SnapshotId {
            slot,
            sha256,
            file_bytes,
        })
    }

    /// Where a snapshot received from a peer is assembled.
    pub fn partial_path(&self, id: &SnapshotId) -> PathBuf {
        self.dir.join(format!(
            "{PARTIAL_PREFIX}{:020}-{}{PARTIAL_SUFFIX}",
            id.slot,
            hex(&id.sha256)
        ))
    }

    /// Removes every partial transfer except `keep`'s.
    pub fn remove_partials_except(&self, keep: Option<&SnapshotId>) -> Result<(), SnapshotError> {
        let keep = keep.map(|id| self.partial_path(id));
        for entry in fs::read_dir(&self.dir).map_err(io_error(&self.dir))? {
            let entry = entry.map_err(io_error(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PARTIAL_PREFIX)
                && name.ends_with(PARTIAL_SUFFIX)
                && Some(entry.path()) != keep
            {
                fs::remove_file(entry.path()).map_err(io_error(&entry.path()))?;
            }
        }
        Ok(())
    }

    /// Checks a fully received file against `id` and decodes it. Blocking (hashes the
    /// whole file): call it off the core task.
    pub fn verify_partial(&self, id: &SnapshotId) -> Result<NodeSnapshot, SnapshotError> {
        let path = self.partial_path(id);
        let (snapshot, found) = self.load(&path)?;
        if found != *id {
            return Err(SnapshotError::Corrupt {
                path,
                reason: format!("received {found:?}, expected {id:?}"),
            });
        }
        Ok(snapshot)
    }

    /// Makes a verified partial file the newest snapshot: `fsync`, rename, `fsync` of the
    /// folder, prune.
    pub fn adopt_partial(&self, id: &SnapshotId) -> Result<SnapshotFile, SnapshotError> {
        let partial = self.partial_path(id);
        File::open(&partial)
            .and_then(|file| file.sync_all())
            .map_err(io_error(&partial))?;
        let path = self.final_path(id.slot);
        fs::rename(&partial, &path).map_err(io_error(&path))?;
        self.sync_dir()?;
        self.prune()?;
        Ok(SnapshotFile { id: *id, path })
    }

    /// Total bytes of the folder's files (for the disk-bound figure and metrics).
    pub fn disk_bytes(&self) -> u64 {
        fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.metadata().ok())
            .map(|meta| meta.len())
            .sum()
    }
}

/// Reads exactly `buf.len()` bytes at `offset`.
pub fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

/// Writes `data` at `offset` of the partial file for `id` (created if missing). Not
/// synced: the whole file is synced once before it is adopted.
pub fn write_partial_at(path: &Path, data: &[u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    file.write_all_at(data, offset)?;
    // A resumed transfer may have left bytes beyond this chunk from an earlier attempt;
    // they are rewritten as the transfer goes on and checked by the final sha256.
    Ok(())
}

/// Length of a partial file, 0 when there is none.
pub fn partial_len(path: &Path) -> u64 {
    fs::metadata(path).map(|meta| meta.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn contents(slot: Slot, image: Option<crate::machine::Snapshot>) -> SnapshotContents {
        let mut addresses = AddressBook::seeded(
            &[(1, "127.0.0.1:7101".parse().unwrap())]
                .into_iter()
                .collect(),
        );
        addresses
            .record(
                4,
                crate::node::members::check_address("127.0.0.1:7104", "127.0.0.1:7004").unwrap(),
            )
            .unwrap();
        addresses.note_members([1, 4].into_iter());
        SnapshotContents {
            slot,
            configuration: Configuration::new([1, 2, 3])
                .joint_to(&Configuration::with_learners([1, 2, 4], [5])),
            addresses,
            applier_state: vec![7; 40],
            app: AppMeta {
                current: Some(("sha256:ab".into(), 5)),
                history: vec![
                    ModuleEvent {
                        module: "sha256:ab".into(),
                        index: 5,
                        migrated: false,
                        failed: None,
                    },
                    ModuleEvent {
                        module: "sha256:cd".into(),
                        index: 9,
                        migrated: true,
                        failed: Some("upgrade failed: trap".into()),
                    },
                ],
                apply_rules: 2,
            },
            module_bytes: image.as_ref().map(|_| Arc::new(b"\0asm-module".to_vec())),
            staged: image.as_ref().map(|_| {
                let mut staging = Staging::new([9; 32], 10);
                staging.push(b"0123");
                staging.push(b"45");
                staging
            }),
            image: image.map(|image| Box::new(image) as Box<dyn ImageSource>),
        }
    }

    fn machine_snapshot() -> crate::machine::Snapshot {
        crate::machine::Snapshot {
            module_id: crate::machine::ModuleId([3; 32]),
            last_entry: crate::machine::EntryContext {
                time_ms: 17,
                seed: 99,
            },
            globals: vec![crate::machine::GlobalValue {
                kind: crate::machine::GlobalKind::I64,
                bits: 0x1234,
            }],
            memory: vec![0xAB; 65536],
        }
    }

    #[test]
    fn a_written_snapshot_decodes_to_what_was_captured() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = SnapshotDir::open(dir.path()).unwrap();
        let image = machine_snapshot();
        let written = snapshots.write(&contents(42, Some(image.clone()))).unwrap();
        assert_eq!(written.id.slot, 42);
        assert_eq!(
            written.id.file_bytes,
            fs::metadata(&written.path).unwrap().len()
        );
        assert_eq!(SnapshotDir::peek_id(&written.path).unwrap(), written.id);
        let (loaded, id) = snapshots.load(&written.path).unwrap();
        assert_eq!(id, written.id);
        assert_eq!(loaded.slot, 42);
        assert_eq!(loaded.configuration, contents(42, None).configuration);
        assert_eq!(
            loaded.configuration.old_voters,
            Some([1, 2, 3].into_iter().collect())
        );
        assert_eq!(loaded.addresses, Some(contents(42, None).addresses));
        assert_eq!(loaded.applier_state, vec![7; 40]);
        assert_eq!(loaded.app, contents(42, None).app);
        assert_eq!(loaded.module_bytes, b"\0asm-module");
        assert_eq!(loaded.machine_image, image.to_bytes());
        assert_eq!(
            crate::machine::Snapshot::from_bytes(&loaded.machine_image).unwrap(),
            image
        );
        let staged = loaded.staged.unwrap();
        assert_eq!((staged.sha256, staged.total_bytes), ([9; 32], 10));
        assert_eq!(staged.bytes(), b"012345");
    }

    /// Re-hashes a body edited into an older layout.
    fn with_trailer(mut body: Vec<u8>) -> Vec<u8> {
        let trailer: [u8; 32] = Sha256::digest(&body).into();
        body.extend_from_slice(&trailer);
        body
    }

    #[test]
    fn versions_1_to_3_still_decode_with_their_voters_no_address_book_and_rules_1() {
        // A version-3 file is a version-4 file without the apply rules at the end. A
        // version-2 file is a version-3 file of a plain configuration without the
        // joint tag and learner count after the voters and without the address book
        // at the end; a version-1 file also lacks the staged section (one 0 byte when
        // nothing is staged).
        let mut contents = contents(5, Some(machine_snapshot()));
        contents.staged = None;
        contents.configuration = Configuration::new([1, 2, 3]);
        contents.addresses = AddressBook::default();
        contents.app.apply_rules = 2;
        let mut v4 = Vec::new();
        write_snapshot(&contents, &mut v4).unwrap();
        let body = &v4[..v4.len() - SHA256_BYTES];
        assert_eq!(
            body[body.len() - 4..],
            2u32.to_le_bytes(),
            "the apply rules"
        );
        let mut v3 = body[..body.len() - 4].to_vec();
        v3[8..12].copy_from_slice(&3u32.to_le_bytes());
        let body = v3.clone();
        let v3 = with_trailer(v3);
        let voters_end = 8 + 4 + 8 + 4 + 3 * 8;
        assert_eq!(body[voters_end..voters_end + 5], [0, 0, 0, 0, 0]);
        assert_eq!(body[body.len() - 8..], [0; 8], "the empty address book");
        let mut v2 = body[..voters_end].to_vec();
        v2.extend_from_slice(&body[voters_end + 5..body.len() - 8]);
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(v2[v2.len() - 1], 0, "the empty staged section");
        let mut v1 = v2[..v2.len() - 1].to_vec();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let (new, _) = decode_snapshot(&v4).unwrap();
        assert_eq!(new.addresses, Some(AddressBook::default()));
        assert_eq!(new.app.apply_rules, 2);
        let (v3, _) = decode_snapshot(&v3).unwrap();
        assert_eq!(v3.app.apply_rules, 1);
        assert_eq!(v3.addresses, Some(AddressBook::default()));
        assert_eq!(v3.machine_image, new.machine_image);
        for old in [v1.clone(), v2] {
            let (old, _) = decode_snapshot(&with_trailer(old)).unwrap();
            assert_eq!(old.configuration, Configuration::new([1, 2, 3]));
            assert_eq!(old.app.apply_rules, 1);
            assert_eq!(old.addresses, None);
            assert!(old.staged.is_none());
            assert_eq!(old.machine_image, new.machine_image);
            assert_eq!(old.applier_state, new.applier_state);
        }
        v1[8..12].copy_from_slice(&5u32.to_le_bytes());
        assert!(decode_snapshot(&with_trailer(v1))
            .unwrap_err()
            .contains("format version 5"));
    }

    #[test]
    fn a_snapshot_without_a_module_round_trips() {
        let mut out = Vec::new();
        let (sha, len) = write_snapshot(&contents(1, None), &mut out).unwrap();
        assert_eq!(len, out.len() as u64);
        let (snapshot, id) = decode_snapshot(&out).unwrap();
        assert_eq!(id.sha256, sha);
        assert!(snapshot.module_bytes.is_empty() && snapshot.machine_image.is_empty());
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_detected() {
        let mut out = Vec::new();
        write_snapshot(&contents(3, Some(machine_snapshot())), &mut out).unwrap();
        // Flip one bit at a spread of positions, trailer included.
        for position in (0..out.len()).step_by(997).chain([out.len() - 1]) {
            let mut bad = out.clone();
            bad[position] ^= 0x10;
            let error = decode_snapshot(&bad).unwrap_err();
            assert!(error.contains("sha256 mismatch"), "{position}: {error}");
        }
        for len in [0, 7, 39, out.len() / 2, out.len() - 1] {
            assert!(decode_snapshot(&out[..len]).is_err(), "length {len}");
        }
    }

    #[test]
    fn a_repair_removes_every_snapshot_newer_than_the_installed_one() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = SnapshotDir::open(dir.path()).unwrap();
        for slot in [10, 20] {
            snapshots.write(&contents(slot, None)).unwrap();
        }
        snapshots.remove_newer_than(15).unwrap();
        let slots: Vec<Slot> = snapshots.list().unwrap().iter().map(|f| f.0).collect();
        assert_eq!(slots, vec![10]);
        snapshots.remove_newer_than(10).unwrap();
        assert_eq!(snapshots.list().unwrap().len(), 1, "the slot itself stays");
    }

    #[test]
    fn only_the_newest_two_are_kept_and_leftovers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = SnapshotDir::open(dir.path()).unwrap();
        for slot in [10, 30, 20] {
            snapshots.write(&contents(slot, None)).unwrap();
        }
        let slots: Vec<Slot> = snapshots.list().unwrap().iter().map(|f| f.0).collect();
        assert_eq!(slots, vec![30, 20]);
        // A crash in the middle of a write leaves a temporary file; reopening removes it.
        let temp = snapshots
            .path()
            .join("snapshot-00000000000000000040.pxsnap.tmp");
        fs::write(&temp, b"half").unwrap();
        let snapshots = SnapshotDir::open(dir.path()).unwrap();
        assert!(!temp.exists());
        assert_eq!(snapshots.list().unwrap().len(), 2);
    }

    #[test]
    fn a_corrupt_newest_snapshot_is_set_aside_and_the_older_one_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = SnapshotDir::open(dir.path()).unwrap();
        snapshots
            .write(&contents(10, Some(machine_snapshot())))
            .unwrap();
        let newest = snapshots
            .write(&contents(20, Some(machine_snapshot())))
            .unwrap();
        let mut bytes = fs::read(&newest.path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        fs::write(&newest.path, bytes).unwrap();
        let (snapshot, file) = snapshots.load_newest_valid().unwrap().unwrap();
        assert_eq!(snapshot.slot, 10);
        assert_eq!(file.id.slot, 10);
        assert!(!newest.path.exists());
        assert!(newest.path.with_extension("pxsnap.corrupt").exists());
        // Both corrupt: nothing to load.
        let mut bytes = fs::read(&file.path).unwrap();
        bytes.truncate(100);
        fs::write(&file.path, bytes).unwrap();
        assert!(snapshots.load_newest_valid().unwrap().is_none());
    }

    #[test]
    fn a_partial_file_is_verified_and_adopted_as_the_newest_snapshot() {
        let sender_dir = tempfile::tempdir().unwrap();
        let sender = SnapshotDir::open(sender_dir.path()).unwrap();
        let file = sender
            .write(&contents(77, Some(machine_snapshot())))
            .unwrap();
        let bytes = fs::read(&file.path).unwrap();

        let receiver_dir = tempfile::tempdir().unwrap();
        let receiver = SnapshotDir::open(receiver_dir.path()).unwrap();
        let partial = receiver.partial_path(&file.id);
        // Chunks arrive in order; one chunk is written twice (a resumed transfer).
        for (n, chunk) in bytes.chunks(4096).enumerate() {
            write_partial_at(&partial, chunk, (n * 4096) as u64).unwrap();
        }
        write_partial_at(&partial, &bytes[..4096], 0).unwrap();
        assert_eq!(partial_len(&partial), bytes.len() as u64);
        let snapshot = receiver.verify_partial(&file.id).unwrap();
        assert_eq!(snapshot.slot, 77);
        let adopted = receiver.adopt_partial(&file.id).unwrap();
        assert_eq!(adopted.id, file.id);
        assert!(!partial.exists());
        let (_, newest) = receiver.load_newest_valid().unwrap().unwrap();
        assert_eq!(newest.id, file.id);

        // A partial whose bytes do not hash to the announced id is refused.
        let mut other = file.id;
        other.sha256[0] ^= 1;
        let partial = receiver.partial_path(&other);
        fs::write(&partial, &bytes).unwrap();
        assert!(matches!(
            receiver.verify_partial(&other),
            Err(SnapshotError::Corrupt { .. })
        ));
        receiver.remove_partials_except(None).unwrap();
        assert!(!partial.exists());
    }
}
