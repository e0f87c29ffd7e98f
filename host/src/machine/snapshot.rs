//! A machine snapshot: everything needed to rebuild the instance state on
//! another replica, and its byte encoding.
//!
//! ```text
//! "PAXWSNP1" | module id (32) | entry time_ms (i64 LE) | entry seed (u64 LE)
//! | global count (u32 LE) | per global: tag (u8) value (u128 LE)
//! | memory bytes (u64 LE) | memory
//! ```

use super::module::GlobalKind;
use super::{EntryContext, ModuleId};

pub(super) const MAGIC: &[u8; 8] = b"PAXWSNP1";

/// Encoded bytes before the globals: magic, module id, entry time and seed,
/// global count.
pub(super) const HEADER_FIXED_BYTES: usize = 8 + 32 + 8 + 8 + 4;
/// Encoded bytes of one global: tag and value.
pub(super) const GLOBAL_BYTES: usize = 1 + 16;

/// The encoding up to and including the memory length: everything but the
/// memory bytes themselves.
pub(super) fn encode_header(
    module_id: ModuleId,
    last_entry: EntryContext,
    globals: &[GlobalValue],
    memory_bytes: u64,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_FIXED_BYTES + globals.len() * GLOBAL_BYTES + 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&module_id.0);
    out.extend_from_slice(&last_entry.time_ms.to_le_bytes());
    out.extend_from_slice(&last_entry.seed.to_le_bytes());
    out.extend_from_slice(&(globals.len() as u32).to_le_bytes());
    for global in globals {
        out.push(global.kind.tag());
        out.extend_from_slice(&global.bits.to_le_bytes());
    }
    out.extend_from_slice(&memory_bytes.to_le_bytes());
    out
}

/// The global type of an encoded tag (the inverse of [`GlobalKind::tag`]).
pub(super) fn kind_of_tag(tag: u8) -> Result<GlobalKind, SnapshotDecodeError> {
    match tag {
        0 => Ok(GlobalKind::I32),
        1 => Ok(GlobalKind::I64),
        2 => Ok(GlobalKind::F32),
        3 => Ok(GlobalKind::F64),
        4 => Ok(GlobalKind::V128),
        _ => Err(SnapshotDecodeError("unknown global type tag")),
    }
}

/// The value of one mutable global; floats and vectors are kept as raw bits so
/// that NaN payloads survive exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlobalValue {
    pub kind: GlobalKind,
    pub bits: u128,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub module_id: ModuleId,
    /// The entry context of the last applied command (what queries see).
    pub last_entry: EntryContext,
    /// Every mutable global of the module, in index order.
    pub globals: Vec<GlobalValue>,
    /// The whole linear memory.
    pub memory: Vec<u8>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("module_id", &self.module_id)
            .field("last_entry", &self.last_entry)
            .field("globals", &self.globals)
            .field("memory_bytes", &self.memory.len())
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotDecodeError(pub &'static str);

impl std::fmt::Display for SnapshotDecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad snapshot: {}", self.0)
    }
}

impl std::error::Error for SnapshotDecodeError {}

impl Snapshot {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = encode_header(
            self.module_id,
            self.last_entry,
            &self.globals,
            self.memory.len() as u64,
        );
        out.reserve_exact(self.memory.len());
        out.extend_from_slice(&self.memory);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Snapshot, SnapshotDecodeError> {
        let mut reader = Reader { bytes };
        if reader.take(8)? != MAGIC {
            return Err(SnapshotDecodeError("wrong magic"));
        }
        let module_id = ModuleId(reader.take(32)?.try_into().unwrap());
        let time_ms = i64::from_le_bytes(reader.take(8)?.try_into().unwrap());
        let seed = u64::from_le_bytes(reader.take(8)?.try_into().unwrap());
        let count = u32::from_le_bytes(reader.take(4)?.try_into().unwrap());
        let mut globals = Vec::new();
        for _ in 0..count {
            let kind = kind_of_tag(reader.take(1)?[0])?;
            let bits = u128::from_le_bytes(reader.take(16)?.try_into().unwrap());
            globals.push(GlobalValue { kind, bits });
        }
        let memory_bytes = u64::from_le_bytes(reader.take(8)?.try_into().unwrap());
        let memory = reader.take(
            usize::try_from(memory_bytes).map_err(|_| SnapshotDecodeError("memory too large"))?,
        )?;
        if !reader.bytes.is_empty() {
            return Err(SnapshotDecodeError("trailing bytes"));
        }
        Ok(Snapshot {
            module_id,
            last_entry: EntryContext { time_ms, seed },
            globals,
            memory: memory.to_vec(),
        })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotDecodeError> {
        if self.bytes.len() < n {
            return Err(SnapshotDecodeError("truncated"));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }
}
