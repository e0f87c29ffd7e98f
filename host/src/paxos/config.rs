//! The configuration value that decides quorums. Every quorum check in the core goes
//! through `Configuration::is_quorum`, so joint consensus ("a majority of old AND a
//! majority of new") will be a change in this one place.

use std::collections::BTreeSet;

use super::types::NodeId;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Configuration {
    pub voters: BTreeSet<NodeId>,
}

impl Configuration {
    pub fn new(voters: impl IntoIterator<Item = NodeId>) -> Configuration {
        let voters: BTreeSet<NodeId> = voters.into_iter().collect();
        assert!(
            !voters.is_empty(),
            "a configuration needs at least one voter"
        );
        Configuration { voters }
    }

    /// True when the nodes for which `acked` holds form a quorum: today a strict
    /// majority of voters. Non-voters never count.
    pub fn is_quorum(&self, acked: impl Fn(NodeId) -> bool) -> bool {
        let count = self.voters.iter().filter(|&&node| acked(node)).count();
        count * 2 > self.voters.len()
    }

    pub fn is_voter(&self, node: NodeId) -> bool {
        self.voters.contains(&node)
    }

    /// Every node that takes part (voters today; learners later).
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.voters.iter().copied()
    }
}
