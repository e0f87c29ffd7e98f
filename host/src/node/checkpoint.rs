//! State-hash checkpoints: replicas prove to each other that they hold the same state.
//!
//! Every `interval_entries` applied log slots (at the slots that are multiples of it,
//! so every replica picks the same ones), the runtime hashes the machine's state and
//! tells its peers `(index, hash)`. `Checkpoints` keeps the local hash and the peers'
//! reports of a bounded window of recent indexes (peers apply at different speeds, so a
//! report may arrive long before or after the local hash) and decides, per index:
//!
//! - agreed: every other voter reported the local hash;
//! - mismatch: some peer reported another hash (a finding for the runtime to log and
//!   count);
//! - minority: a hash other than the local one is held by a quorum of the
//!   configuration. This replica then has *diverged*: it must not serve reads until it
//!   reinstalls a snapshot from the majority (`on_snapshot_installed`), or until a later
//!   checkpoint shows its hash equal to a quorum's again.
//!
//! It is a plain value: no clock, no I/O, no machine. The runtime feeds it hashes and
//! reports, performs the findings (log lines, metric) and asks it whether to serve.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::paxos::{Configuration, NodeId, Slot};

/// Applied entries between two checkpoints when `--checkpoint-entries` is not given:
/// at 10 000 commands per second, one checkpoint every 100 ms at most.
pub const CHECKPOINT_ENTRIES_DEFAULT: u64 = 1000;
/// Checkpoint indexes remembered (local hashes and peers' reports). A peer more than
/// this many checkpoints ahead or behind is not compared until it comes closer.
pub const CHECKPOINT_WINDOW_MAX: usize = 64;

/// The machine's state hash (`Machine::state_hash`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StateHash(pub [u8; 32]);

impl fmt::Display for StateHash {
    /// `sha256:<64 hex digits>`, the form `/v1/status` shows.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointConfig {
    /// A checkpoint is taken at every applied slot that is a multiple of this.
    pub interval_entries: u64,
    /// See `CHECKPOINT_WINDOW_MAX`.
    pub window_checkpoints_max: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            interval_entries: CHECKPOINT_ENTRIES_DEFAULT,
            window_checkpoints_max: CHECKPOINT_WINDOW_MAX,
        }
    }
}

/// The newest local checkpoint, as `/v1/status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointStatus {
    pub index: Slot,
    pub hash: StateHash,
    /// Every other voter reported this same hash for `index`. False while some voter
    /// has not reported yet (it may just be slower), and false on a mismatch.
    pub agreed: bool,
}

/// This replica's state differs from the state a quorum of the configuration holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Divergence {
    /// The checkpoint at which it was found.
    pub index: Slot,
    pub local: StateHash,
    pub majority: StateHash,
    /// The voters that reported `majority` at `index` (never this replica).
    pub majority_nodes: Vec<NodeId>,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "this replica's state diverged from the majority at checkpoint index {}: local hash {}, majority hash {} (nodes {:?}); it serves no reads until it has reinstalled a snapshot from the majority",
            self.index, self.local, self.majority, self.majority_nodes
        )
    }
}

/// What a new hash or report revealed; the runtime logs each and counts mismatches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// `peer` reported `theirs` for `index`, where this replica computed `local`.
    /// Reported once per (index, peer, hash).
    Mismatch {
        index: Slot,
        peer: NodeId,
        local: StateHash,
        theirs: StateHash,
    },
    /// A quorum holds another hash than this replica at `index`: it has diverged.
    /// Reported when this replica enters the diverged state.
    Diverged(Divergence),
    /// A later checkpoint shows this replica in agreement with a quorum again.
    Recovered { index: Slot },
}

#[derive(Clone, Debug, Default)]
struct Record {
    local: Option<StateHash>,
    reports: BTreeMap<NodeId, StateHash>,
}

pub struct Checkpoints {
    id: NodeId,
    configuration: Configuration,
    config: CheckpointConfig,
    records: BTreeMap<Slot, Record>,
    newest_local: Option<Slot>,
    diverged: Option<Divergence>,
}

impl Checkpoints {
    pub fn new(id: NodeId, configuration: Configuration, config: CheckpointConfig) -> Self {
        assert!(
            config.interval_entries > 0,
            "checkpoint interval must be positive"
        );
        assert!(
            config.window_checkpoints_max > 0,
            "checkpoint window must hold at least one checkpoint"
        );
        Checkpoints {
            id,
            configuration,
            config,
            records: BTreeMap::new(),
            newest_local: None,
            diverged: None,
        }
    }

    /// Whether the state after applying `slot` is a checkpoint.
    pub fn is_checkpoint(&self, slot: Slot) -> bool {
        slot > 0 && slot.is_multiple_of(self.config.interval_entries)
    }

    /// The configuration whose quorums decide who is in the minority (membership
    /// changes replace it).
    pub fn set_configuration(&mut self, configuration: &Configuration) {
        if self.configuration != *configuration {
            self.configuration = configuration.clone();
        }
    }

    /// Records this replica's hash at checkpoint `index`.
    pub fn record_local(&mut self, index: Slot, hash: StateHash, findings: &mut Vec<Finding>) {
        assert!(
            self.is_checkpoint(index),
            "slot {index} is not a checkpoint"
        );
        self.newest_local = Some(self.newest_local.map_or(index, |newest| newest.max(index)));
        self.records.entry(index).or_default().local = Some(hash);
        let reports: Vec<(NodeId, StateHash)> = self.records[&index]
            .reports
            .iter()
            .map(|(peer, theirs)| (*peer, *theirs))
            .collect();
        for (peer, theirs) in reports {
            if theirs != hash {
                findings.push(Finding::Mismatch {
                    index,
                    peer,
                    local: hash,
                    theirs,
                });
            }
        }
        self.decide(index, findings);
        self.evict();
    }

    /// Records what `peer` reported for `index`. Reports from non-voters are ignored;
    /// a repeated report changes nothing and reveals nothing new.
    pub fn record_peer(
        &mut self,
        peer: NodeId,
        index: Slot,
        hash: StateHash,
        findings: &mut Vec<Finding>,
    ) {
        if peer == self.id || !self.configuration.is_voter(peer) {
            return;
        }
        let record = self.records.entry(index).or_default();
        let previous = record.reports.insert(peer, hash);
        if previous == Some(hash) {
            return;
        }
        if let Some(local) = record.local {
            if local != hash {
                findings.push(Finding::Mismatch {
                    index,
                    peer,
                    local,
                    theirs: hash,
                });
            }
            self.decide(index, findings);
        }
        self.evict();
    }

    /// The machine now holds a snapshot of the majority's state at `slot`: hashes this
    /// replica computed before are of a replaced state and are forgotten (peers'
    /// reports stay), and the replica serves again. Its next checkpoint is checked as
    /// usual; the runtime records the snapshot's slot itself if it is a checkpoint.
    /// Returns the divergence this ends, if any.
    pub fn on_snapshot_installed(&mut self) -> Option<Divergence> {
        for record in self.records.values_mut() {
            record.local = None;
        }
        self.records.retain(|_, record| !record.reports.is_empty());
        self.newest_local = None;
        self.diverged.take()
    }

    /// `Some` while this replica's state is known to differ from a quorum's.
    pub fn diverged(&self) -> Option<&Divergence> {
        self.diverged.as_ref()
    }

    /// The newest checkpoint this replica computed, and whether every peer agreed.
    pub fn newest(&self) -> Option<CheckpointStatus> {
        let index = self.newest_local?;
        let record = &self.records[&index];
        let hash = record
            .local
            .expect("the newest local checkpoint has a hash");
        let agreed = self
            .configuration
            .members()
            .filter(|node| *node != self.id)
            .all(|node| record.reports.get(&node) == Some(&hash));
        Some(CheckpointStatus {
            index,
            hash,
            agreed,
        })
    }

    /// Checkpoints the window holds (local or reported), for tests and metrics.
    pub fn window_len(&self) -> usize {
        self.records.len()
    }

    /// Looks for a hash held by a quorum at `index` (the local hash counts for this
    /// replica) and updates the diverged state from it.
    fn decide(&mut self, index: Slot, findings: &mut Vec<Finding>) {
        let record = &self.records[&index];
        let Some(local) = record.local else {
            return;
        };
        let mut holders: BTreeMap<StateHash, BTreeSet<NodeId>> = BTreeMap::new();
        holders.entry(local).or_default().insert(self.id);
        for (peer, hash) in &record.reports {
            holders.entry(*hash).or_default().insert(*peer);
        }
        let quorum = holders
            .into_iter()
            .find(|(_, nodes)| self.configuration.is_quorum(|node| nodes.contains(&node)));
        let Some((majority, nodes)) = quorum else {
            return;
        };
        if majority == local {
            // Agreement at an index after the divergence proves the state is the
            // majority's again; agreement at an older index proves nothing now.
            if self.diverged.as_ref().is_some_and(|d| index > d.index) {
                self.diverged = None;
                findings.push(Finding::Recovered { index });
            }
        } else if self.diverged.is_none() {
            let divergence = Divergence {
                index,
                local,
                majority,
                majority_nodes: nodes.into_iter().collect(),
            };
            self.diverged = Some(divergence.clone());
            findings.push(Finding::Diverged(divergence));
        }
    }

    /// Keeps the window bounded: drops the oldest indexes, never the newest local one
    /// (it is what `/v1/status` shows).
    fn evict(&mut self) {
        while self.records.len() > self.config.window_checkpoints_max {
            let oldest = self
                .records
                .keys()
                .copied()
                .find(|index| Some(*index) != self.newest_local)
                .expect("a window above its bound holds more than the newest local index");
            self.records.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 10;

    fn hash(byte: u8) -> StateHash {
        StateHash([byte; 32])
    }

    fn three(id: NodeId) -> Checkpoints {
        five_or_three(id, 3)
    }

    fn five_or_three(id: NodeId, voters: u64) -> Checkpoints {
        Checkpoints::new(
            id,
            Configuration::new(1..=voters),
            CheckpointConfig {
                interval_entries: K,
                window_checkpoints_max: 4,
            },
        )
    }

    fn local(checkpoints: &mut Checkpoints, index: Slot, h: StateHash) -> Vec<Finding> {
        let mut findings = Vec::new();
        checkpoints.record_local(index, h, &mut findings);
        findings
    }

    fn peer(
        checkpoints: &mut Checkpoints,
        from: NodeId,
        index: Slot,
        h: StateHash,
    ) -> Vec<Finding> {
        let mut findings = Vec::new();
        checkpoints.record_peer(from, index, h, &mut findings);
        findings
    }

    #[test]
    fn checkpoints_are_the_multiples_of_the_interval() {
        let checkpoints = three(1);
        assert!(!checkpoints.is_checkpoint(0));
        assert!(!checkpoints.is_checkpoint(9));
        assert!(checkpoints.is_checkpoint(10));
        assert!(checkpoints.is_checkpoint(30));
        assert!(!checkpoints.is_checkpoint(31));
    }

    #[test]
    fn agreed_once_every_peer_reported_the_same_hash() {
        let mut c = three(1);
        assert_eq!(c.newest(), None);
        assert_eq!(local(&mut c, 10, hash(7)), vec![]);
        let pending = CheckpointStatus {
            index: 10,
            hash: hash(7),
            agreed: false,
        };
        assert_eq!(c.newest(), Some(pending));
        assert_eq!(peer(&mut c, 2, 10, hash(7)), vec![]);
        assert_eq!(c.newest(), Some(pending), "node 3 has not reported yet");
        assert_eq!(peer(&mut c, 3, 10, hash(7)), vec![]);
        assert_eq!(
            c.newest(),
            Some(CheckpointStatus {
                agreed: true,
                ..pending
            })
        );
        assert_eq!(c.diverged(), None);
        // The next checkpoint starts unconfirmed again.
        local(&mut c, 20, hash(8));
        assert_eq!(c.newest().map(|s| (s.index, s.agreed)), Some((20, false)));
    }

    #[test]
    fn the_minority_replica_diverges_once_a_quorum_holds_another_hash() {
        let mut c = three(1);
        local(&mut c, 10, hash(1));
        // One differing peer: a mismatch, but no quorum holds the other hash yet.
        let findings = peer(&mut c, 2, 10, hash(2));
        assert_eq!(
            findings,
            vec![Finding::Mismatch {
                index: 10,
                peer: 2,
                local: hash(1),
                theirs: hash(2),
            }]
        );
        assert_eq!(c.diverged(), None);
        let findings = peer(&mut c, 3, 10, hash(2));
        let divergence = Divergence {
            index: 10,
            local: hash(1),
            majority: hash(2),
            majority_nodes: vec![2, 3],
        };
        assert_eq!(
            findings,
            vec![
                Finding::Mismatch {
                    index: 10,
                    peer: 3,
                    local: hash(1),
                    theirs: hash(2),
                },
                Finding::Diverged(divergence.clone()),
            ]
        );
        assert_eq!(c.diverged(), Some(&divergence));
        assert!(!c.newest().unwrap().agreed);
        // Later mismatching checkpoints keep it diverged without a second alarm.
        local(&mut c, 20, hash(3));
        peer(&mut c, 2, 20, hash(4));
        let findings = peer(&mut c, 3, 20, hash(4));
        assert!(!findings.iter().any(|f| matches!(f, Finding::Diverged(_))));
        assert_eq!(c.diverged(), Some(&divergence));
    }

    #[test]
    fn the_majority_replica_sees_the_mismatch_but_does_not_diverge() {
        let mut c = three(2);
        local(&mut c, 10, hash(2));
        let findings = peer(&mut c, 1, 10, hash(1));
        assert_eq!(
            findings,
            vec![Finding::Mismatch {
                index: 10,
                peer: 1,
                local: hash(2),
                theirs: hash(1),
            }]
        );
        assert_eq!(peer(&mut c, 3, 10, hash(2)), vec![]);
        assert_eq!(c.diverged(), None);
        assert!(!c.newest().unwrap().agreed, "node 1 disagrees");
    }

    #[test]
    fn no_quorum_no_verdict_in_five() {
        // Five voters, three hashes: nobody holds a quorum, nobody is told to stop.
        let mut c = five_or_three(1, 5);
        local(&mut c, 10, hash(1));
        peer(&mut c, 2, 10, hash(1));
        peer(&mut c, 3, 10, hash(2));
        peer(&mut c, 4, 10, hash(2));
        peer(&mut c, 5, 10, hash(3));
        assert_eq!(c.diverged(), None);
        // A third report of hash 2 would be a quorum (3 of 5); replacing node 5's report
        // models node 5 repairing itself and reporting again.
        let findings = peer(&mut c, 5, 10, hash(2));
        assert!(
            matches!(findings.last(), Some(Finding::Diverged(d)) if d.majority_nodes == vec![3, 4, 5])
        );
    }

    #[test]
    fn reports_before_the_local_hash_are_compared_when_it_arrives() {
        // Peers are faster: their reports come first, in any order of indexes.
        let mut c = three(1);
        assert_eq!(peer(&mut c, 3, 20, hash(9)), vec![]);
        assert_eq!(peer(&mut c, 2, 10, hash(5)), vec![]);
        assert_eq!(peer(&mut c, 3, 10, hash(5)), vec![]);
        assert_eq!(peer(&mut c, 2, 20, hash(9)), vec![]);
        assert_eq!(c.newest(), None, "reports alone are no local checkpoint");
        let findings = local(&mut c, 10, hash(4));
        assert_eq!(findings.len(), 3, "{findings:?}");
        assert!(
            matches!(&findings[2], Finding::Diverged(d) if d.index == 10 && d.majority == hash(5))
        );
        // Equal reports repeated (peers resend their newest) reveal nothing new.
        assert_eq!(peer(&mut c, 2, 10, hash(5)), vec![]);
        // A later checkpoint equal to the quorum's ends the divergence.
        let findings = local(&mut c, 20, hash(9));
        assert_eq!(findings, vec![Finding::Recovered { index: 20 }]);
        assert_eq!(c.diverged(), None);
        assert!(c.newest().unwrap().agreed);
    }

    #[test]
    fn agreement_at_an_older_index_does_not_end_a_divergence() {
        let mut c = three(1);
        local(&mut c, 20, hash(1));
        peer(&mut c, 2, 20, hash(2));
        peer(&mut c, 3, 20, hash(2));
        assert!(c.diverged().is_some());
        // A late report about index 10, where this replica was still right.
        local(&mut c, 10, hash(6));
        peer(&mut c, 2, 10, hash(6));
        peer(&mut c, 3, 10, hash(6));
        assert_eq!(c.diverged().map(|d| d.index), Some(20));
    }

    #[test]
    fn a_snapshot_install_ends_the_divergence_and_forgets_local_hashes() {
        let mut c = three(1);
        local(&mut c, 10, hash(1));
        peer(&mut c, 2, 10, hash(2));
        peer(&mut c, 3, 10, hash(2));
        peer(&mut c, 2, 30, hash(3));
        assert!(c.diverged().is_some());
        assert_eq!(c.on_snapshot_installed().map(|d| d.index), Some(10));
        assert_eq!(c.diverged(), None);
        assert_eq!(c.newest(), None);
        // The peers' reports stay: the next local checkpoint is checked at once.
        peer(&mut c, 3, 30, hash(3));
        assert_eq!(local(&mut c, 30, hash(3)), vec![]);
        assert!(c.newest().unwrap().agreed);
    }

    #[test]
    fn the_window_is_bounded_and_keeps_the_newest_local_checkpoint() {
        let mut c = three(1);
        local(&mut c, 10, hash(1));
        // A peer far ahead reports many checkpoints (the window holds 4).
        for index in (20..=200).step_by(10) {
            peer(&mut c, 2, index, hash(2));
            assert!(c.window_len() <= 4);
        }
        assert_eq!(c.newest().map(|s| s.index), Some(10));
        // The oldest reports were dropped: index 20 is compared against nothing.
        assert_eq!(local(&mut c, 20, hash(1)), vec![]);
        assert!(c.window_len() <= 4);
        // Recent ones are kept and compared.
        let findings = local(&mut c, 200, hash(1));
        assert_eq!(findings.len(), 1, "{findings:?}");
    }

    #[test]
    fn reports_from_strangers_and_from_itself_are_ignored() {
        let mut c = three(1);
        local(&mut c, 10, hash(1));
        assert_eq!(peer(&mut c, 9, 10, hash(2)), vec![]);
        assert_eq!(peer(&mut c, 1, 10, hash(2)), vec![]);
        assert_eq!(c.window_len(), 1);
        assert_eq!(c.diverged(), None);
    }

    #[test]
    fn quorums_follow_the_configuration() {
        let mut c = three(1);
        local(&mut c, 10, hash(1));
        peer(&mut c, 2, 10, hash(2));
        // Node 4 is no voter yet: its report does not count.
        assert_eq!(peer(&mut c, 4, 10, hash(2)), vec![]);
        assert_eq!(c.diverged(), None);
        // In a configuration of five, 2 of 5 is no quorum, 3 of 5 is.
        c.set_configuration(&Configuration::new(1..=5));
        assert!(!peer(&mut c, 4, 10, hash(2)).is_empty());
        assert_eq!(c.diverged(), None);
        peer(&mut c, 5, 10, hash(2));
        assert_eq!(
            c.diverged().map(|d| d.majority_nodes.clone()),
            Some(vec![2, 4, 5])
        );
    }

    #[test]
    fn hashes_print_as_sha256_hex() {
        let mut bytes = [0u8; 32];
        bytes[0] = 0xab;
        bytes[31] = 0x01;
        let text = StateHash(bytes).to_string();
        assert_eq!(text.len(), "sha256:".len() + 64);
        assert!(text.starts_with("sha256:ab00"));
        assert!(text.ends_with("01"));
    }
}
