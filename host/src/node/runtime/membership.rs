//! The core task's membership duties (docs/notes/members.md): turning membership
//! requests into an address entry and a `ChangeMembership` event, answering them once
//! the change is applied here, pointing the transport at the members of the applied
//! configuration, publishing the membership, and telling the address book which ids
//! became members (ids are never reused).
//!
//! It never decides a change (the core checks and proposes it) and never answers
//! before the change is applied on this replica.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use tokio::sync::oneshot;

use crate::paxos::{
    Command, Configuration, Event, Membership, MembershipChange, NodeId, Origin, Outcome,
    RequestId, Slot, Value,
};

use super::super::handle::{ClusterView, MemberChange, MemberError, MemberView};
use super::super::members::{self, AddressBook};
use super::super::service::Published;
use super::{Loop, PeerSeen, Waiter};

pub(crate) type MemberReply = oneshot::Sender<Result<ClusterView, MemberError>>;

/// How long a member removed by a configuration entry stays in the transport's peer set
/// when it never reports that entry chosen (it may be down for good, or partitioned).
/// Long enough for a slow or briefly stopped replica to catch up and learn it.
pub(crate) const DEPARTING_REACH_MS_MAX: u64 = 60_000;

/// A member that an applied configuration entry removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Departing {
    /// The slot of the entry that removed it: once its chosen prefix reaches that slot,
    /// its own status says `outside`.
    pub slot: Slot,
    /// The tick this replica applied that entry at.
    pub since_tick: u64,
}

/// Records as departing every member of `before` that `after` (applied at `slot`, on
/// tick `tick`) no longer has; forgets a departing id that is a member again.
pub(crate) fn note_departures(
    departing: &mut BTreeMap<NodeId, Departing>,
    before: &Configuration,
    after: &Configuration,
    slot: Slot,
    tick: u64,
) {
    for id in before.members() {
        if !after.is_member(id) {
            departing.entry(id).or_insert(Departing {
                slot,
                since_tick: tick,
            });
        }
    }
    departing.retain(|id, _| !after.is_member(*id));
}

/// Keeps the departing members that have not yet reported (`chosen_reported`: the last
/// chosen index a member reported) a chosen index at or past the slot that removed them,
/// and whose `reach_ticks_max` are not over at `tick`. Returns whether any was dropped.
pub(crate) fn retain_departing(
    departing: &mut BTreeMap<NodeId, Departing>,
    chosen_reported: impl Fn(NodeId) -> Option<Slot>,
    tick: u64,
    reach_ticks_max: u64,
) -> bool {
    let before = departing.len();
    departing.retain(|id, gone| {
        let knows = chosen_reported(*id).is_some_and(|chosen| chosen >= gone.slot);
        let expired = tick.saturating_sub(gone.since_tick) > reach_ticks_max;
        !knows && !expired
    });
    departing.len() != before
}

/// What the core task tracks for membership.
#[derive(Default)]
pub(crate) struct MemberState {
    /// Changes the core accepted, by slot, with the value it proposed there: answered
    /// when that slot applies (or refused when another value was chosen there).
    accepted: BTreeMap<Slot, (Value, MemberReply)>,
    /// Voter changes whose C(old,new) applied, waiting for C(new) to apply.
    awaiting_final: Vec<MemberReply>,
    /// Voter changes whose C(new) applied here (at the slot), waiting until a majority of
    /// C(new)'s voters reported a chosen index at or past it (peer info): from then on
    /// those voters can elect a leader without C(old), so an operator may stop C(old)'s
    /// members once answered. Before, losing an old majority (e.g. one of two old
    /// voters) would leave replicas that know only C(old,new) unable to elect anyone.
    confirming: Vec<(Slot, Configuration, MemberReply)>,
    /// The configuration of the last applied configuration entry (or the one restored at
    /// start or from a snapshot): the next entry is compared with it to find the members
    /// it removes. Not `Replica::applied_configuration`, which the core moves for a
    /// whole run of chosen slots before the runtime applies them one by one.
    applied: Option<Configuration>,
    /// Members an applied configuration entry removed, kept in the peer set until they
    /// know it (`retain_departing`): until then they still need the leader's heartbeats
    /// and catch-up to learn that they are out.
    departing: BTreeMap<NodeId, Departing>,
    /// Where the transport points now.
    peers: BTreeMap<NodeId, SocketAddr>,
    /// Address-book version the transport was last pointed at.
    refreshed_addresses: u64,
}

/// The cluster as the API shows it: every member of `config` with its role and
/// addresses (from the book, else the HTTP address the member announced itself).
pub(crate) fn cluster_view(
    config: &Configuration,
    book: &AddressBook,
    http_seen: impl Fn(NodeId) -> Option<String>,
    leader: Option<NodeId>,
) -> ClusterView {
    let members = config
        .members()
        .map(|id| {
            let role = if config.voters.contains(&id) {
                "voter"
            } else if config.learners.contains(&id) {
                "learner"
            } else {
                "old-voter"
            };
            let address = book.get(id);
            let http = address
                .map(|a| a.http.clone())
                .filter(|http| !http.is_empty())
                .or_else(|| http_seen(id))
                .unwrap_or_default();
            MemberView {
                id,
                role: role.into(),
                peer: address.map(|a| a.peer.to_string()).unwrap_or_default(),
                http,
            }
        })
        .collect();
    ClusterView {
        members,
        leader,
        voters: config.voters.iter().copied().collect(),
        old_voters: config
            .old_voters
            .as_ref()
            .map(|old| old.iter().copied().collect()),
        learners: config.learners.iter().copied().collect(),
    }
}

impl Loop {
    fn member_cluster_view(&self) -> ClusterView {
        let own_http = self.core.http_advertise.clone();
        let own = self.core.id;
        let peers = &self.peers;
        cluster_view(
            self.core.replica.applied_configuration(),
            self.core.applier.machine.addresses(),
            |id| {
                if id == own {
                    Some(own_http.clone())
                } else {
                    peers.get(&id).and_then(|seen: &PeerSeen| seen.http.clone())
                }
            },
            self.leader_seen,
        )
    }

    /// A membership request from the API. Only the leader takes it: a follower's `api`
    /// forwards the HTTP request to the leader on `NotLeader`.
    pub(super) fn on_member_request(
        &mut self,
        request: RequestId,
        origin: Origin,
        change: MemberChange,
        reply: MemberReply,
    ) {
        let status = self.core.replica.status();
        if status.leading.is_none() {
            let answer = match self.leader_hint(status.leader_hint) {
                Some(leader) => MemberError::NotLeader {
                    leader: Some(leader),
                },
                None => MemberError::Unavailable {
                    reason: "no leader is known; retry shortly".into(),
                    retry_after_ms: self.core.retry_after_ms,
                },
            };
            let _ = reply.send(Err(answer));
            return;
        }
        let change = match change {
            MemberChange::Add { id, peer, http } => {
                let address = match members::check_address(&peer, &http) {
                    Ok(address) if id != 0 => address,
                    Ok(_) => {
                        let _ = reply.send(Err(MemberError::Invalid {
                            reason: "node id 0 is reserved; ids start at 1".into(),
                        }));
                        return;
                    }
                    Err(reason) => {
                        let _ = reply.send(Err(MemberError::Invalid { reason }));
                        return;
                    }
                };
                // A retried add (e.g. after a 504) that already took effect: the same
                // learner at the same addresses. Nothing to propose; answered like the
                // first (its learner configuration is applied here).
                let book = self.core.applier.machine.addresses();
                if self
                    .core
                    .replica
                    .applied_configuration()
                    .learners
                    .contains(&id)
                    && self.core.replica.configuration().learners.contains(&id)
                    && book.get(id) == Some(&address)
                {
                    let _ = reply.send(Ok(self.member_cluster_view()));
                    return;
                }
                // Checked before the address entry, so a refused add never rewrites
                // the address of a member (the core checks again when it proposes).
                if self.core.replica.configuration().is_member(id) {
                    let refusal = crate::paxos::ChangeRefusal::AlreadyMember { node: id };
                    let _ = reply.send(Err(MemberError::Refused {
                        reason: refusal.to_string(),
                    }));
                    return;
                }
                // The applied entry refuses it too (`AddressBook::record`); checked here
                // so nothing is proposed for it.
                if self
                    .core
                    .applier
                    .machine
                    .addresses()
                    .was_member
                    .contains(&id)
                {
                    let _ = reply.send(Err(MemberError::Refused {
                        reason: members::reused_id(id),
                    }));
                    return;
                }
                // The address entry first: every replica knows how to reach the
                // learner from the slot that makes it one.
                self.waiters.insert(request, Waiter::Address { id, reply });
                let command = Command {
                    payload: members::address_envelope(id, &address),
                    idempotency_key: None,
                    origin,
                };
                self.step(Event::Propose { request, command });
                return;
            }
            MemberChange::Promote { id } => {
                // A retried promote that already took effect: `id` is a voter of the
                // configuration in force, which is not joint. Answered like the first
                // one: once a majority of its voters report a chosen index at or past
                // this replica's applied index (at or past C(new)'s slot).
                if self.settled_voters_satisfy(|voters| voters.contains(&id)) {
                    self.answer_once_confirmed(reply);
                    return;
                }
                (MembershipChange::Promote(id), false)
            }
            MemberChange::Remove { id, force } => (MembershipChange::Remove(id), force),
            MemberChange::SetVoters { voters, force } => {
                if self.settled_voters_satisfy(|current| *current == voters) {
                    // Already the voters (a retry after a 504, say).
                    self.answer_once_confirmed(reply);
                    return;
                }
                // Learners not named stay learners; no new id enters here (a new member
                // comes in through an add, which records its addresses first).
                let learners = self
                    .core
                    .replica
                    .configuration()
                    .learners
                    .difference(&voters)
                    .copied()
                    .collect();
                (MembershipChange::Replace { voters, learners }, force)
            }
        };
        self.propose_change(request, change, reply);
    }

    /// Whether the configuration in force is settled (not joint, nothing newer chosen)
    /// and its voters pass `check`: a retried change that already took effect.
    fn settled_voters_satisfy(&self, check: impl Fn(&BTreeSet<NodeId>) -> bool) -> bool {
        let applied = self.core.replica.applied_configuration();
        !applied.is_joint()
            && self.core.replica.configuration() == applied
            && check(&applied.voters)
    }

    /// Answers a retried change like the first one: once a majority of the voters in
    /// force report a chosen index at or past this replica's applied index (so at or
    /// past C(new)'s slot).
    fn answer_once_confirmed(&mut self, reply: MemberReply) {
        let slot = self.core.replica.status().applied_index;
        let config = self.core.replica.applied_configuration().clone();
        self.members.confirming.push((slot, config, reply));
        self.confirm_changes(None);
    }

    fn propose_change(
        &mut self,
        request: RequestId,
        (change, force): (MembershipChange, bool),
        reply: MemberReply,
    ) {
        self.waiters.insert(request, Waiter::Change(reply));
        self.step(Event::ChangeMembership {
            request,
            change,
            force,
        });
    }

    /// The address entry of an add applied here: now the learner itself.
    pub(super) fn on_address_recorded(&mut self, id: NodeId, reply: MemberReply) {
        let request = self.new_request_id();
        self.propose_change(request, (MembershipChange::AddLearner(id), false), reply);
    }

    /// The core's answer to a `ChangeMembership`.
    pub(super) fn on_change_outcome(&mut self, reply: MemberReply, outcome: Outcome) {
        let answer = match outcome {
            Outcome::ChangeAccepted { slot } => {
                let proposed = self
                    .core
                    .replica
                    .entry(slot)
                    .map(|entry| entry.value.clone())
                    .expect("the leader holds the entry it just proposed");
                self.members.accepted.insert(slot, (proposed, reply));
                return;
            }
            Outcome::ChangeRefused(refusal) => MemberError::Refused {
                reason: refusal.to_string(),
            },
            Outcome::NotLeader { leader_hint } => match self.leader_hint(leader_hint) {
                Some(leader) => MemberError::NotLeader {
                    leader: Some(leader),
                },
                None => MemberError::Unavailable {
                    reason: "no leader is known; retry shortly".into(),
                    retry_after_ms: self.core.retry_after_ms,
                },
            },
            Outcome::Busy | Outcome::ReadReady => {
                panic!("a membership change answered {outcome:?}")
            }
        };
        let _ = reply.send(Err(answer));
    }

    /// After each applied slot: answers the changes waiting for it, records the members
    /// of an applied configuration in the address book, and re-points the transport when
    /// the configuration or an address changed.
    pub(super) fn after_apply_membership(&mut self, slot: Slot, value: &Value) {
        if let Some((proposed, reply)) = self.members.accepted.remove(&slot) {
            if proposed != *value {
                let _ = reply.send(Err(MemberError::Unavailable {
                    reason: format!(
                        "the leader changed before the configuration entry was chosen: slot \
                         {slot} holds another value and the membership is unchanged; retry"
                    ),
                    retry_after_ms: self.core.retry_after_ms,
                }));
            } else if matches!(value, Value::Configuration(config) if config.is_joint()) {
                self.members.awaiting_final.push(reply);
            } else {
                let _ = reply.send(Ok(self.member_cluster_view()));
            }
        }
        let Value::Configuration(config) = value else {
            if self.core.applier.machine.addresses_version != self.members.refreshed_addresses {
                self.refresh_peers();
            }
            return;
        };
        if !config.is_joint() {
            for reply in std::mem::take(&mut self.members.awaiting_final) {
                self.members
                    .confirming
                    .push((slot, Configuration::clone(config), reply));
            }
            self.confirm_changes(None);
        }
        self.core.applier.machine.note_members(config);
        tracing::info!(
            node = self.core.id,
            slot,
            voters = ?config.voters,
            old_voters = ?config.old_voters,
            learners = ?config.learners,
            "configuration applied"
        );
        if let Some(before) = self.members.applied.replace(Configuration::clone(config)) {
            note_departures(
                &mut self.members.departing,
                &before,
                config,
                slot,
                self.clock.delivered,
            );
        }
        self.refresh_peers();
        // Tell the peers at once how far this replica got: a leader answering a voter
        // change waits for a majority of C(new) to report it (`confirm_changes`).
        self.send_peer_info();
    }

    /// At start and after an installed snapshot: the configuration came whole, not
    /// through an entry, so nobody departs from it; the next entry is compared with it.
    pub(super) fn on_configuration_replaced(&mut self) {
        self.members.applied = Some(self.core.replica.applied_configuration().clone());
        self.refresh_peers();
    }

    /// Points the transport at every member of the configurations in force (applied and
    /// chosen) and at the departing members, at the addresses of the book.
    pub(super) fn refresh_peers(&mut self) {
        self.members.refreshed_addresses = self.core.applier.machine.addresses_version;
        let applied = self.core.replica.applied_configuration();
        let book = self.core.applier.machine.addresses();
        let mut ids: Vec<NodeId> = applied.members().collect();
        ids.extend(self.core.replica.configuration().members());
        ids.extend(self.members.departing.keys().copied());
        let mut peers = BTreeMap::new();
        for id in ids {
            if id == self.core.id {
                continue;
            }
            match book.get(id) {
                Some(address) => {
                    peers.insert(id, address.peer);
                }
                None => tracing::warn!(
                    node = self.core.id,
                    member = id,
                    "a member has no address in the address book; it cannot be reached"
                ),
            }
        }
        if peers != self.members.peers {
            tracing::info!(
                node = self.core.id,
                ?peers,
                "peer set follows the configuration"
            );
            self.core.transport.set_peers(peers.clone());
            self.members.peers = peers;
        }
    }

    /// Peer info from `from`: voter changes may now be known chosen by a majority of
    /// C(new), and a departing member may now know it is out.
    pub(super) fn on_peer_chosen_index(&mut self, from: NodeId, chosen_index: Slot) {
        if !self.members.confirming.is_empty() {
            self.confirm_changes(Some((from, chosen_index)));
        }
        if self.members.departing.contains_key(&from) {
            self.prune_departing(Some((from, chosen_index)));
        }
    }

    /// Drops from the peer set the departing members that know they are out (`heard`: a
    /// report not yet in `self.peers`) or were kept for `DEPARTING_REACH_MS_MAX`.
    pub(super) fn prune_departing(&mut self, heard: Option<(NodeId, Slot)>) {
        if self.members.departing.is_empty() {
            return;
        }
        let reach_ticks_max = DEPARTING_REACH_MS_MAX / self.core.tick_ms.max(1);
        let peers = &self.peers;
        let chosen_reported = |id: NodeId| match heard {
            Some((from, chosen)) if from == id => Some(chosen),
            _ => peers.get(&id).and_then(|seen| seen.chosen_index),
        };
        let departing_before = self.members.departing.clone();
        if retain_departing(
            &mut self.members.departing,
            chosen_reported,
            self.clock.delivered,
            reach_ticks_max,
        ) {
            for id in departing_before.keys() {
                if !self.members.departing.contains_key(id) {
                    tracing::info!(
                        node = self.core.id,
                        member = id,
                        "a removed member knows it is out (or was kept long enough): no \
                         longer a peer"
                    );
                }
            }
            self.refresh_peers();
        }
    }

    /// Answers the voter changes whose C(new) a majority of its voters knows chosen
    /// (`heard`: a report not yet in `self.peers`).
    fn confirm_changes(&mut self, heard: Option<(NodeId, Slot)>) {
        let own = (self.core.id, self.core.replica.status().chosen_index);
        let knows = |peers: &BTreeMap<NodeId, PeerSeen>, id: NodeId, slot: Slot| {
            let chosen = if id == own.0 {
                Some(own.1)
            } else {
                match heard {
                    Some((from, chosen)) if from == id => Some(chosen),
                    _ => peers.get(&id).and_then(|seen| seen.chosen_index),
                }
            };
            chosen.is_some_and(|chosen| chosen >= slot)
        };
        let mut waiting = Vec::new();
        let mut answered = Vec::new();
        for (slot, config, reply) in std::mem::take(&mut self.members.confirming) {
            if config.is_quorum(|id| knows(&self.peers, id, slot)) {
                answered.push(reply);
            } else {
                waiting.push((slot, config, reply));
            }
        }
        self.members.confirming = waiting;
        if !answered.is_empty() {
            let view = self.member_cluster_view();
            for reply in answered {
                let _ = reply.send(Ok(view.clone()));
            }
        }
    }

    /// The membership part of what the core task publishes.
    pub(super) fn publish_membership(&self, published: &mut Published) {
        let status = self.core.replica.status();
        published.membership = match status.membership {
            Membership::Voter => "voter",
            Membership::Learner => "learner",
            Membership::Outside => "outside",
        };
        if status.leading.is_none() {
            published.role = match status.membership {
                Membership::Voter => "follower",
                Membership::Learner => "learner",
                Membership::Outside => "removed",
            };
        }
        published.voting = !status.amnesic && status.membership == Membership::Voter;
        let config = self.core.replica.applied_configuration();
        if published.configuration.as_ref() != Some(config) {
            published.configuration = Some(config.clone());
        }
        let book = self.core.applier.machine.addresses();
        if published.addresses != *book {
            published.addresses = book.clone();
        }
    }

    /// Changes still waiting when the leader changed: the ones not yet accepted by the
    /// core may or may not happen (504); accepted ones are answered when their slot
    /// applies.
    pub(super) fn fail_member_waiter(waiter: Waiter, reason: String) {
        match waiter {
            Waiter::Address { reply, .. } | Waiter::Change(reply) => {
                let _ = reply.send(Err(MemberError::Unknown { reason }));
            }
            _ => unreachable!("only membership waiters are passed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::members::check_address;

    #[test]
    fn the_view_names_old_voters_learners_and_falls_back_on_announced_http() {
        let joint =
            Configuration::new([1, 2, 3]).joint_to(&Configuration::with_learners([2, 3, 4], [5]));
        let mut book = AddressBook::seeded(&[(1, "127.0.0.1:7101".parse().unwrap())].into());
        book.record(
            4,
            check_address("127.0.0.1:7104", "127.0.0.1:7004").unwrap(),
        )
        .unwrap();
        let view = cluster_view(
            &joint,
            &book,
            |id| (id == 1).then(|| "h1:1".to_string()),
            Some(2),
        );
        let rows: Vec<(NodeId, &str, &str, &str)> = view
            .members
            .iter()
            .map(|m| (m.id, m.role.as_str(), m.peer.as_str(), m.http.as_str()))
            .collect();
        assert_eq!(
            rows,
            vec![
                (1, "old-voter", "127.0.0.1:7101", "h1:1"),
                (2, "voter", "", ""),
                (3, "voter", "", ""),
                (4, "voter", "127.0.0.1:7104", "127.0.0.1:7004"),
                (5, "learner", "", ""),
            ]
        );
        assert_eq!(view.voters, vec![2, 3, 4]);
        assert_eq!(view.old_voters, Some(vec![1, 2, 3]));
        assert_eq!(view.learners, vec![5]);
        assert_eq!(view.leader, Some(2));
    }

    #[test]
    fn a_removed_member_departs_until_it_reports_the_removing_slot_or_its_time_is_over() {
        let mut departing = BTreeMap::new();
        let old = Configuration::new([1, 2, 3]);
        let joint = old.joint_to(&Configuration::new([1, 3, 4]));
        // C(old,new) removes nobody yet: 2 is an old voter, still a member.
        note_departures(&mut departing, &old, &joint, 10, 100);
        assert!(departing.is_empty());
        let new = Configuration::new([1, 3, 4]);
        note_departures(&mut departing, &joint, &new, 11, 105);
        let gone = Departing {
            slot: 11,
            since_tick: 105,
        };
        assert_eq!(departing, BTreeMap::from([(2, gone)]));
        // The next entry (a learner added at once) keeps it: 2 has not learned yet.
        let with_learner = Configuration::with_learners([1, 3, 4], [7]);
        note_departures(&mut departing, &new, &with_learner, 13, 106);
        assert_eq!(departing, BTreeMap::from([(2, gone)]));

        // A report below the removing slot, or none, keeps it.
        let reach = 100;
        assert!(!retain_departing(&mut departing, |_| Some(10), 150, reach));
        assert!(!retain_departing(&mut departing, |_| None, 205, reach));
        assert_eq!(departing.len(), 1);
        // The removing slot reported chosen: it knows, it departs.
        assert!(retain_departing(&mut departing, |_| Some(11), 150, reach));
        assert!(departing.is_empty());

        // Never heard from: kept `reach` ticks, then dropped.
        departing.insert(2, gone);
        assert!(!retain_departing(&mut departing, |_| None, 205, reach));
        assert!(retain_departing(&mut departing, |_| None, 206, reach));
        assert!(departing.is_empty());
    }
}
