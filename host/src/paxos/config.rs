//! The configuration value that decides quorums. Every quorum check in the core goes
//! through `Configuration::is_quorum`: a strict majority of the voters, and while a
//! change is in progress (joint consensus, C(old,new)) also a strict majority of the
//! old voters. Learners receive the log but never count.

use std::collections::BTreeSet;

use super::types::NodeId;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Configuration {
    /// The voters of C(new) (or of the only configuration when not joint).
    pub voters: BTreeSet<NodeId>,
    /// `Some(old voters)` while joint: C(old,new). Quorums need both majorities.
    pub old_voters: Option<BTreeSet<NodeId>>,
    /// Non-voters that receive the log and catch up; never part of a quorum.
    pub learners: BTreeSet<NodeId>,
}

/// What a node is in a configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Membership {
    /// Counts in quorums (in the old or the new voter set).
    Voter,
    Learner,
    /// Not in the configuration: removed, or not added yet. Takes no part.
    Outside,
}

impl Configuration {
    /// A plain configuration of `voters` and no learners.
    pub fn new(voters: impl IntoIterator<Item = NodeId>) -> Configuration {
        Configuration::with_learners(voters, [])
    }

    pub fn with_learners(
        voters: impl IntoIterator<Item = NodeId>,
        learners: impl IntoIterator<Item = NodeId>,
    ) -> Configuration {
        let config = Configuration {
            voters: voters.into_iter().collect(),
            old_voters: None,
            learners: learners.into_iter().collect(),
        };
        config.check();
        config
    }

    /// C(old,new): the voters of `self` become the old voters of the joint
    /// configuration whose new voters and learners are `target`'s.
    pub fn joint_to(&self, target: &Configuration) -> Configuration {
        assert!(!self.is_joint() && !target.is_joint(), "joint of a joint");
        let joint = Configuration {
            voters: target.voters.clone(),
            old_voters: Some(self.voters.clone()),
            learners: target.learners.clone(),
        };
        joint.check();
        joint
    }

    /// C(new) of a joint configuration (itself when not joint).
    pub fn final_config(&self) -> Configuration {
        Configuration {
            voters: self.voters.clone(),
            old_voters: None,
            learners: self.learners.clone(),
        }
    }

    /// Panics on a configuration no code path may build: it is a programmer error.
    fn check(&self) {
        assert!(
            !self.voters.is_empty(),
            "a configuration needs at least one voter"
        );
        if let Some(old) = &self.old_voters {
            assert!(!old.is_empty(), "a joint configuration needs old voters");
        }
        assert!(
            self.learners.is_disjoint(&self.voters),
            "a learner cannot also be a voter"
        );
    }

    pub fn is_joint(&self) -> bool {
        self.old_voters.is_some()
    }

    /// True when the nodes for which `acked` holds form a quorum: a strict majority
    /// of the voters, and while joint also of the old voters. Learners never count.
    pub fn is_quorum(&self, acked: impl Fn(NodeId) -> bool) -> bool {
        let majority = |set: &BTreeSet<NodeId>| {
            let count = set.iter().filter(|&&node| acked(node)).count();
            count * 2 > set.len()
        };
        majority(&self.voters) && self.old_voters.as_ref().is_none_or(majority)
    }

    /// Voter in the new or (while joint) the old voter set.
    pub fn is_voter(&self, node: NodeId) -> bool {
        self.voters.contains(&node)
            || self
                .old_voters
                .as_ref()
                .is_some_and(|old| old.contains(&node))
    }

    pub fn membership(&self, node: NodeId) -> Membership {
        if self.is_voter(node) {
            Membership::Voter
        } else if self.learners.contains(&node) {
            Membership::Learner
        } else {
            Membership::Outside
        }
    }

    pub fn is_member(&self, node: NodeId) -> bool {
        self.membership(node) != Membership::Outside
    }

    /// Every node that takes part (voters old and new, then learners), each once, in
    /// id order.
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        let mut all: BTreeSet<NodeId> = self.voters.clone();
        if let Some(old) = &self.old_voters {
            all.extend(old.iter().copied());
        }
        all.extend(self.learners.iter().copied());
        all.into_iter()
    }
}
