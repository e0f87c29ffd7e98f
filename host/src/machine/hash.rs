//! The state hash: sha256 over the module id, the mutable globals and the
//! linear memory, built as a two-level tree so that only written pages are
//! rehashed:
//!
//! ```text
//! leaf  = sha256(4 KiB of memory)
//! group = sha256(leaf hashes of 256 consecutive leaves, i.e. 1 MiB of memory)
//! root  = sha256("paxwasm-state-v1" || module id (32 bytes) || memory bytes (u64 LE)
//!                || global count (u32 LE) || per global: tag (u8) || value (u128 LE)
//!                || group hashes in order)
//! ```
//!
//! The definition is part of the replicated contract: every replica must
//! compute it the same way.

use sha2::{Digest, Sha256};

use super::snapshot::GlobalValue;
use super::ModuleId;

pub const HASH_LEAF_BYTES: usize = 4096;
pub const HASH_GROUP_LEAVES: usize = 256;
const DOMAIN: &[u8] = b"paxwasm-state-v1";

/// Cached leaf and group hashes of one linear memory.
pub struct PageHashes {
    leaves: Vec<[u8; 32]>,
    leaf_dirty: Vec<bool>,
    dirty_leaves: Vec<usize>,
    groups: Vec<[u8; 32]>,
    group_dirty: Vec<bool>,
    zero_leaf: [u8; 32],
}

impl PageHashes {
    pub fn new() -> PageHashes {
        PageHashes {
            leaves: Vec::new(),
            leaf_dirty: Vec::new(),
            dirty_leaves: Vec::new(),
            groups: Vec::new(),
            group_dirty: Vec::new(),
            zero_leaf: Sha256::digest([0u8; HASH_LEAF_BYTES]).into(),
        }
    }

    /// Forgets everything: the next root rehashes all of memory.
    pub fn invalidate(&mut self) {
        self.leaves.clear();
        self.leaf_dirty.clear();
        self.dirty_leaves.clear();
        self.groups.clear();
        self.group_dirty.clear();
    }

    /// Marks leaves overlapping `[start, end)` as changed.
    pub fn mark_written(&mut self, start: usize, end: usize) {
        let first = start / HASH_LEAF_BYTES;
        let last = end.div_ceil(HASH_LEAF_BYTES).min(self.leaves.len());
        for leaf in first..last {
            if !self.leaf_dirty[leaf] {
                self.leaf_dirty[leaf] = true;
                self.dirty_leaves.push(leaf);
            }
        }
    }

    /// Makes the cache cover `memory_bytes`. Pages beyond the previously
    /// covered length are marked changed (they may be zero, or restored).
    fn cover(&mut self, memory_bytes: usize) {
        assert_eq!(memory_bytes % HASH_LEAF_BYTES, 0);
        let leaves = memory_bytes / HASH_LEAF_BYTES;
        assert!(
            leaves >= self.leaves.len(),
            "linear memory never shrinks under a hash cache"
        );
        let old = self.leaves.len();
        self.leaves.resize(leaves, self.zero_leaf);
        self.leaf_dirty.resize(leaves, false);
        self.groups
            .resize(leaves.div_ceil(HASH_GROUP_LEAVES), [0; 32]);
        self.group_dirty.resize(self.groups.len(), true);
        self.mark_written(old * HASH_LEAF_BYTES, memory_bytes);
    }

    pub fn root(
        &mut self,
        module_id: ModuleId,
        globals: &[GlobalValue],
        memory: &[u8],
    ) -> [u8; 32] {
        self.cover(memory.len());
        for leaf in self.dirty_leaves.drain(..) {
            let start = leaf * HASH_LEAF_BYTES;
            self.leaves[leaf] = Sha256::digest(&memory[start..start + HASH_LEAF_BYTES]).into();
            self.leaf_dirty[leaf] = false;
            self.group_dirty[leaf / HASH_GROUP_LEAVES] = true;
        }
        for (group, dirty) in self.group_dirty.iter_mut().enumerate() {
            if *dirty {
                let start = group * HASH_GROUP_LEAVES;
                let end = (start + HASH_GROUP_LEAVES).min(self.leaves.len());
                let mut hasher = Sha256::new();
                for leaf in &self.leaves[start..end] {
                    hasher.update(leaf);
                }
                self.groups[group] = hasher.finalize().into();
                *dirty = false;
            }
        }
        let mut hasher = Sha256::new();
        hasher.update(DOMAIN);
        hasher.update(module_id.0);
        hasher.update((memory.len() as u64).to_le_bytes());
        hasher.update((globals.len() as u32).to_le_bytes());
        for global in globals {
            hasher.update([global.kind.tag()]);
            hasher.update(global.bits.to_le_bytes());
        }
        for group in &self.groups {
            hasher.update(group);
        }
        hasher.finalize().into()
    }
}

/// The whole-memory hash computed from scratch, for tests of the cache.
#[cfg(test)]
fn root_from_scratch(module_id: ModuleId, globals: &[GlobalValue], memory: &[u8]) -> [u8; 32] {
    PageHashes::new().root(module_id, globals, memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_root_equals_root_from_scratch() {
        let id = ModuleId([7; 32]);
        let mut memory = vec![0u8; 3 * 65536 * 7];
        let mut cache = PageHashes::new();
        let first = cache.root(id, &[], &memory);
        assert_eq!(first, root_from_scratch(id, &[], &memory));
        memory[70_000] = 1;
        memory[1_200_000] = 9;
        cache.mark_written(69_632, 73_728);
        cache.mark_written(1_200_000, 1_200_001);
        let second = cache.root(id, &[], &memory);
        assert_ne!(first, second);
        assert_eq!(second, root_from_scratch(id, &[], &memory));
        memory.resize(memory.len() + 65536, 3);
        assert_eq!(
            cache.root(id, &[], &memory),
            root_from_scratch(id, &[], &memory)
        );
    }
}
