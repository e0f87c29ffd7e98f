//! Membership changes in a small scripted cluster: instant persists, instant messages,
//! links cut and replicas crashed at exact points. The crash tests stop the leader
//! right after a C(old,new) entry was accepted by a minority, by a majority of the old
//! voters only, and by a majority of the new voters only.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::*;

const SEED: u64 = 11;
/// Enough ticks for any election or change with the default timings.
const TICKS_MAX: u64 = 2_000;

struct Net {
    bootstrap: Configuration,
    params: Params,
    replicas: BTreeMap<NodeId, Replica>,
    durable: BTreeMap<NodeId, DurableState>,
    /// Messages and persist completions waiting to be handled, in order.
    queue: VecDeque<(NodeId, Event)>,
    /// Directed links that drop everything.
    cut: BTreeSet<(NodeId, NodeId)>,
    applied: BTreeMap<NodeId, Vec<(Slot, Value)>>,
    replies: Vec<(NodeId, RequestId, Outcome)>,
    restarts: u64,
}

impl Net {
    fn new(voters: &[NodeId], learners: &[NodeId]) -> Net {
        Net::with_params(voters, learners, Params::default())
    }

    fn with_params(voters: &[NodeId], learners: &[NodeId], params: Params) -> Net {
        let bootstrap =
            Configuration::with_learners(voters.iter().copied(), learners.iter().copied());
        let mut net = Net {
            bootstrap: bootstrap.clone(),
            params: params.clone(),
            replicas: BTreeMap::new(),
            durable: BTreeMap::new(),
            queue: VecDeque::new(),
            cut: BTreeSet::new(),
            applied: BTreeMap::new(),
            replies: Vec::new(),
            restarts: 0,
        };
        for &id in voters.iter().chain(learners) {
            let replica = Replica::new(id, bootstrap.clone(), params.clone(), SEED);
            net.replicas.insert(id, replica);
            net.durable.insert(id, DurableState::default());
            net.applied.insert(id, Vec::new());
        }
        net
    }

    fn step(&mut self, id: NodeId, event: Event) {
        let Some(replica) = self.replicas.get_mut(&id) else {
            return;
        };
        for action in replica.step(event) {
            match action {
                Action::Persist { token, record } => {
                    self.durable.get_mut(&id).expect("known").apply(&record);
                    self.queue.push_back((id, Event::Persisted { token }));
                }
                Action::Send { to, msg } => {
                    if !self.cut.contains(&(id, to)) {
                        self.queue.push_back((to, Event::Message { from: id, msg }));
                    }
                }
                Action::Apply { slot, value } => {
                    self.applied
                        .get_mut(&id)
                        .expect("known")
                        .push((slot, value));
                }
                Action::Reply { request, outcome } => self.replies.push((id, request, outcome)),
                Action::SendSnapshot { .. } | Action::Compact { .. } => {
                    panic!("no snapshot is saved here, so nothing is compacted")
                }
            }
        }
    }

    fn drain(&mut self) {
        while let Some((id, event)) = self.queue.pop_front() {
            self.step(id, event);
        }
    }

    fn tick(&mut self) {
        let ids: Vec<NodeId> = self.replicas.keys().copied().collect();
        for id in ids {
            self.step(id, Event::Tick { now_ms: 0 });
            self.drain();
        }
    }

    fn leader(&self) -> Option<NodeId> {
        self.replicas
            .values()
            .find(|replica| replica.status().leading.is_some())
            .map(Replica::id)
    }

    /// Ticks until `done` holds; panics after `TICKS_MAX`.
    fn tick_until(&mut self, what: &str, done: impl Fn(&Net) -> bool) {
        for _ in 0..TICKS_MAX {
            if done(self) {
                return;
            }
            self.tick();
        }
        let states: Vec<String> = self
            .replicas
            .values()
            .map(|r| format!("{:?} {:?}", r.status(), r.configuration()))
            .collect();
        panic!(
            "not reached within {TICKS_MAX} ticks: {what}\n{}\nreplies {:?}\nlogs {:?}",
            states.join("\n"),
            self.replies,
            self.applied
        );
    }

    fn elect(&mut self) -> NodeId {
        self.tick_until("a leader whose first entry is applied", |net| {
            net.leader().is_some_and(|id| {
                let status = net.replicas[&id].status();
                status.applied_index == status.chosen_index && status.chosen_index > 0
            })
        });
        self.leader().expect("just checked")
    }

    fn change(&mut self, at: NodeId, change: MembershipChange) -> Outcome {
        let request = 1_000 + self.replies.len() as u64;
        self.step(
            at,
            Event::ChangeMembership {
                request,
                change,
                force: false,
            },
        );
        let (_, _, outcome) = self
            .replies
            .iter()
            .find(|(_, r, _)| *r == request)
            .expect("a membership request is answered at once")
            .clone();
        outcome
    }

    fn crash(&mut self, id: NodeId) {
        self.replicas.remove(&id);
        self.queue.retain(|(to, _)| *to != id);
    }

    fn restart(&mut self, id: NodeId) {
        self.restarts += 1;
        let durable = self.durable[&id].clone();
        let replica = Replica::restart(
            id,
            self.bootstrap.clone(),
            self.params.clone(),
            SEED + self.restarts,
            durable,
        );
        self.replicas.insert(id, replica);
        self.applied.insert(id, Vec::new());
    }

    fn propose(&mut self, at: NodeId, payload: &[u8]) {
        let request = 5_000 + self.replies.len() as u64;
        let command = Command {
            payload: payload.to_vec(),
            idempotency_key: None,
            origin: Origin { node: at, request },
        };
        self.step(at, Event::Propose { request, command });
        self.drain();
    }

    fn configuration(&self, id: NodeId) -> Configuration {
        self.replicas[&id].configuration().clone()
    }

    /// Every replica applied a prefix of one and the same log.
    fn assert_one_log(&self) {
        let longest = self
            .applied
            .values()
            .max_by_key(|log| log.len())
            .expect("some");
        for (id, log) in &self.applied {
            assert_eq!(log[..], longest[..log.len()], "replica {id} diverged");
        }
    }

    fn cut_all_from(&mut self, from: NodeId, except: &[NodeId]) {
        for &to in self.replicas.keys() {
            if to != from && !except.contains(&to) {
                self.cut.insert((from, to));
            }
        }
    }

    fn cut_between(&mut self, a: NodeId, b: NodeId) {
        self.cut.insert((a, b));
        self.cut.insert((b, a));
    }
}

fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
    ids.iter().copied().collect()
}

fn configuration_entries(log: &[(Slot, Value)]) -> Vec<Configuration> {
    log.iter()
        .filter_map(|(_, value)| match value {
            Value::Configuration(config) => Some(Configuration::clone(config)),
            _ => None,
        })
        .collect()
}

#[test]
fn joint_quorum_needs_a_majority_of_old_and_of_new() {
    let old = Configuration::new([1, 2, 3]);
    let joint = old.joint_to(&Configuration::new([3, 4, 5]));
    let acked = |ids: &'static [NodeId]| move |node| ids.contains(&node);
    assert!(joint.is_quorum(acked(&[1, 3, 4])));
    assert!(joint.is_quorum(acked(&[1, 2, 4, 5])));
    assert!(!joint.is_quorum(acked(&[1, 2, 3])), "no majority of new");
    assert!(!joint.is_quorum(acked(&[3, 4, 5])), "no majority of old");
    assert!(!joint.is_quorum(acked(&[1, 4, 6])));
    let with_learners = Configuration::with_learners([1, 2, 3], [4, 5]);
    assert!(
        !with_learners.is_quorum(acked(&[1, 4, 5])),
        "learners never count"
    );
    assert_eq!(joint.members().collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert_eq!(joint.membership(1), Membership::Voter);
    assert_eq!(with_learners.membership(4), Membership::Learner);
    assert_eq!(with_learners.membership(9), Membership::Outside);
}

#[test]
fn add_learner_promote_and_remove_go_through_the_log() {
    let mut net = Net::new(&[1, 2, 3], &[]);
    net.replicas.insert(
        4,
        Replica::new(4, Configuration::new([1, 2, 3]), Params::default(), SEED),
    );
    net.durable.insert(4, DurableState::default());
    net.applied.insert(4, Vec::new());
    let leader = net.elect();
    assert_eq!(net.replicas[&4].status().membership, Membership::Outside);

    let outcome = net.change(leader, MembershipChange::AddLearner(4));
    assert!(
        matches!(outcome, Outcome::ChangeAccepted { .. }),
        "{outcome:?}"
    );
    net.drain();
    net.tick_until("4 learns it is a learner", |net| {
        net.replicas[&4].status().membership == Membership::Learner
    });
    // A learner never counts: the voters are unchanged and 4 does not campaign.
    assert_eq!(net.configuration(leader).voters, set(&[1, 2, 3]));

    net.tick_until("the leader hears 4's chosen index", |net| {
        net.replicas[&4].status().chosen_index == net.replicas[&leader].status().chosen_index
    });
    net.tick();
    let outcome = net.change(leader, MembershipChange::Promote(4));
    assert!(
        matches!(outcome, Outcome::ChangeAccepted { .. }),
        "{outcome:?}"
    );
    // A second change while the first is in progress is refused.
    let outcome = net.change(leader, MembershipChange::Remove(2));
    assert_eq!(
        outcome,
        Outcome::ChangeRefused(ChangeRefusal::ChangeInProgress)
    );
    net.drain();
    net.tick_until("C(new) with 4 as a voter is chosen everywhere", |net| {
        net.replicas
            .values()
            .all(|r| r.configuration() == &Configuration::new([1, 2, 3, 4]))
    });
    // C(old,new) then C(new), both applied by every replica at the same slots.
    let configs = configuration_entries(&net.applied[&1]);
    assert_eq!(configs.len(), 3, "{configs:?}");
    assert!(configs[1].is_joint());
    assert_eq!(configs[2], Configuration::new([1, 2, 3, 4]));

    let victim = if leader == 2 { 3 } else { 2 };
    let outcome = net.change(leader, MembershipChange::Remove(victim));
    assert!(
        matches!(outcome, Outcome::ChangeAccepted { .. }),
        "{outcome:?}"
    );
    net.drain();
    net.tick_until("the removed replica knows it", |net| {
        net.replicas[&victim].status().membership == Membership::Outside
    });
    net.tick_until("everyone else runs without it", |net| {
        net.replicas
            .values()
            .filter(|r| r.id() != victim)
            .all(|r| !r.configuration().is_member(victim) && !r.configuration().is_joint())
    });
    // The removed replica never campaigns again, even long after: no new ballot of
    // its own appears anywhere.
    let round_before = net
        .replicas
        .values()
        .map(|r| r.status().promised.round)
        .max()
        .expect("replicas");
    for _ in 0..200 {
        net.tick();
        assert!(net.replicas[&victim].status().leading.is_none());
    }
    assert!(net
        .replicas
        .values()
        .all(|r| r.status().promised.node != victim || r.status().promised.round <= round_before));
    net.propose(net.leader().expect("a leader"), b"after removal");
    net.tick_until("the command is applied by the new voters", |net| {
        net.applied
            .iter()
            .filter(|(id, _)| **id != victim)
            .all(|(_, log)| {
                log.iter()
                    .any(|(_, value)| matches!(value, Value::Batch(_)))
            })
    });
    net.assert_one_log();
}

#[test]
fn promotion_is_refused_while_the_learner_lags_or_without_a_running_quorum() {
    let mut net = Net::new(&[1, 2, 3], &[4, 5]);
    // 4 and 5 hear nothing: they lag and are not running as far as the leader knows.
    for voter in [1, 2, 3] {
        net.cut_between(voter, 4);
        net.cut_between(voter, 5);
    }
    let leader = net.elect();
    // Never heard from, a learner's lag is unknown: it may not even hold a snapshot.
    assert_eq!(
        net.change(leader, MembershipChange::Promote(4)),
        Outcome::ChangeRefused(ChangeRefusal::LearnerNotHeard { node: 4 })
    );
    // 4 answers the leader once, then is cut off again while the log grows.
    net.cut.remove(&(4, leader));
    net.cut.remove(&(leader, 4));
    for _ in 0..=Params::default().heartbeat_ticks {
        net.tick();
    }
    net.cut_between(leader, 4);
    let reported = net.replicas[&4].status().chosen_index;
    let lag_limit = Params::default().learner_lag_entries_max;
    for n in 0..=lag_limit {
        net.propose(leader, format!("c{n}").as_bytes());
        net.tick();
    }
    let chosen = net.replicas[&leader].status().chosen_index;
    assert!(chosen > reported + lag_limit);
    assert_eq!(
        net.change(leader, MembershipChange::Promote(4)),
        Outcome::ChangeRefused(ChangeRefusal::LearnerLags {
            node: 4,
            behind_entries: chosen - reported,
            limit: lag_limit,
        })
    );
    assert_eq!(
        net.change(leader, MembershipChange::Promote(1)),
        Outcome::ChangeRefused(ChangeRefusal::NotALearner { node: 1 })
    );
    assert_eq!(
        net.change(leader, MembershipChange::AddLearner(4)),
        Outcome::ChangeRefused(ChangeRefusal::AlreadyMember { node: 4 })
    );
    assert_eq!(
        net.change(leader, MembershipChange::Remove(9)),
        Outcome::ChangeRefused(ChangeRefusal::NotAMember { node: 9 })
    );
    // Removing two voters of three leaves one running voter of one: allowed; but a
    // configuration whose voters are silent learners is refused unless forced.
    let replace = MembershipChange::Replace {
        voters: set(&[leader, 4, 5]),
        learners: BTreeSet::new(),
    };
    for node in [4, 5] {
        net.cut.remove(&(node, leader));
        net.cut.remove(&(leader, node));
    }
    net.tick_until("4 and 5 caught up", |net| {
        [4, 5].iter().all(|id| {
            net.replicas[id].status().chosen_index == net.replicas[&leader].status().chosen_index
        })
    });
    for _ in 0..=Params::default().heartbeat_ticks {
        net.tick();
    }
    // Now they are caught up but crashed: not running.
    net.crash(4);
    net.crash(5);
    for _ in 0..Params::default().election_ticks_min {
        net.tick();
    }
    if net.leader() == Some(leader) {
        assert_eq!(
            net.change(leader, replace),
            Outcome::ChangeRefused(ChangeRefusal::NoRunningQuorum {
                running: 1,
                voters: 3
            })
        );
    }
}

/// Sets up voters {1,2,3} and learners {4,5}, elects a leader, and has it propose
/// C({1,2,3},{x,4,5}) where x is an old voter other than the leader. The accept of
/// that entry reaches only `reach(leader, x, y)` (y is the third old voter); then the
/// leader crashes. Returns (net, leader, x, y, slot of the entry).
fn crash_after_joint_accepted_by(
    params: Params,
    reach: impl Fn(NodeId, NodeId, NodeId) -> Vec<NodeId>,
) -> (Net, NodeId, NodeId, NodeId, Slot) {
    let mut net = Net::with_params(&[1, 2, 3], &[4, 5], params);
    let leader = net.elect();
    net.tick_until("learners caught up and heard from", |net| {
        [4, 5].iter().all(|id| {
            net.replicas[id].status().chosen_index == net.replicas[&leader].status().chosen_index
        })
    });
    net.tick();
    let others: Vec<NodeId> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    let (x, y) = (others[0], others[1]);
    let reached = reach(leader, x, y);
    net.cut_all_from(leader, &reached);
    let outcome = net.change(
        leader,
        MembershipChange::Replace {
            voters: set(&[x, 4, 5]),
            learners: BTreeSet::new(),
        },
    );
    let Outcome::ChangeAccepted { slot } = outcome else {
        panic!("change refused: {outcome:?}")
    };
    net.drain();
    for id in [x, y, 4, 5] {
        let holds = net.durable[&id]
            .log
            .get(&slot)
            .is_some_and(|entry| matches!(entry.value, Value::Configuration(_)));
        assert_eq!(holds, reached.contains(&id), "replica {id}");
    }
    net.crash(leader);
    net.cut.clear();
    (net, leader, x, y, slot)
}

#[test]
fn leader_crash_after_joint_entry_accepted_by_a_minority_loses_the_change_safely() {
    let (mut net, old_leader, x, y, slot) =
        crash_after_joint_accepted_by(Params::default(), |_, _, _| vec![]);
    let leader = net.elect();
    assert!([x, y].contains(&leader));
    assert_eq!(
        net.configuration(leader),
        Configuration::with_learners([1, 2, 3], [4, 5])
    );
    net.restart(old_leader);
    net.propose(leader, b"after");
    net.tick_until("everyone applied past the lost entry", |net| {
        net.replicas
            .values()
            .all(|r| r.status().applied_index > slot)
    });
    net.assert_one_log();
    assert!(configuration_entries(&net.applied[&x]).is_empty());
}

#[test]
fn leader_crash_after_joint_entry_accepted_by_old_majority_only_is_completed() {
    // The leader and y accepted: a majority of old, so the entry is chosen (old
    // governs its own slot), though no new voter but the leader's knows it.
    let (mut net, old_leader, x, y, slot) =
        crash_after_joint_accepted_by(Params::default(), |_, _, y| vec![y]);
    // Keep 4 and 5 away from both survivors: a candidate gets old-majority promises
    // ({x, y}), y's reveals C(old,new), and without 4 or 5 it must not lead.
    for (a, b) in [(x, 4), (x, 5), (y, 4), (y, 5)] {
        net.cut_between(a, b);
    }
    for _ in 0..300 {
        net.tick();
        assert_eq!(
            net.leader(),
            None,
            "led without a majority of the new voters"
        );
    }
    net.cut.clear();
    let leader = net.elect();
    net.tick_until("C(new) chosen at the new leader", |net| {
        net.configuration(leader) == Configuration::new([x, 4, 5])
    });
    net.restart(old_leader);
    net.tick_until("everyone learns C(new)", |net| {
        [x, 4, 5]
            .iter()
            .all(|id| net.configuration(*id) == Configuration::new([x, 4, 5]))
    });
    let configs = configuration_entries(&net.applied[&x]);
    assert!(configs[0].is_joint(), "{configs:?}");
    assert_eq!(
        net.applied[&x]
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, v)| v.clone()),
        Some(Value::Configuration(std::sync::Arc::new(
            configs[0].clone()
        )))
    );
    net.assert_one_log();
    // y is no longer a member, and the old leader neither.
    let leader = net.leader().expect("a leader");
    assert!([x, 4, 5].contains(&leader));
}

#[test]
fn leader_crash_after_joint_entry_accepted_by_new_majority_only_is_safe() {
    // 4 and 5 accepted (a majority of new) but only the leader of old: not chosen.
    let (mut net, old_leader, x, _y, slot) =
        crash_after_joint_accepted_by(Params::default(), |_, _, _| vec![4, 5]);
    let leader = net.elect();
    net.restart(old_leader);
    net.propose(leader, b"after");
    net.tick_until("everyone applied the command after the entry", |net| {
        net.applied.values().all(|log| {
            log.iter()
                .any(|(s, value)| *s > slot && matches!(value, Value::Batch(_)))
        })
    });
    net.assert_one_log();
    // Either outcome is allowed (the entry was not chosen): dropped, or recovered and
    // completed. Whichever, everyone agrees and no configuration is left joint.
    net.tick_until("no joint configuration left", |net| {
        !net.configuration(net.leader().unwrap_or(x)).is_joint()
    });
    net.assert_one_log();
}

#[test]
fn leader_not_in_new_configuration_steps_down_once_it_is_chosen() {
    let mut net = Net::new(&[1, 2, 3], &[4]);
    let leader = net.elect();
    net.tick_until("learner caught up", |net| {
        net.replicas[&4].status().chosen_index == net.replicas[&leader].status().chosen_index
    });
    net.tick();
    let mut voters = set(&[1, 2, 3, 4]);
    voters.remove(&leader);
    let outcome = net.change(
        leader,
        MembershipChange::Replace {
            voters: voters.clone(),
            learners: BTreeSet::new(),
        },
    );
    assert!(
        matches!(outcome, Outcome::ChangeAccepted { .. }),
        "{outcome:?}"
    );
    net.drain();
    net.tick_until("the old leader stepped down", |net| {
        net.replicas[&leader].status().leading.is_none()
    });
    assert_eq!(net.configuration(leader).voters, voters);
    assert_eq!(
        net.replicas[&leader].status().membership,
        Membership::Outside
    );
    let next = net.elect();
    assert!(voters.contains(&next));
    net.propose(next, b"new era");
    net.tick_until("applied by the new voters", |net| {
        voters.iter().all(|id| {
            net.applied[id]
                .iter()
                .any(|(_, value)| matches!(value, Value::Batch(_)))
        })
    });
    net.assert_one_log();
}

#[test]
fn planted_config_bug_leads_without_the_new_majority() {
    // The same crash point as above with the planted bug: the candidate ignores the
    // C(old,new) that y's promise reveals and leads with old voters only. This shows
    // the check above has teeth.
    let params = Params {
        bug_phase1_ignores_revealed_configurations: true,
        ..Params::default()
    };
    let (mut net, _, x, y, _) = crash_after_joint_accepted_by(params, |_, _, y| vec![y]);
    for (a, b) in [(x, 4), (x, 5), (y, 4), (y, 5)] {
        net.cut_between(a, b);
    }
    net.tick_until("the buggy candidate leads", |net| net.leader().is_some());
}

#[test]
fn snapshot_install_carries_the_configuration_in_force_at_its_slot() {
    let old = Configuration::new([1, 2, 3]);
    let new = Configuration::with_learners([1, 2, 4], [3]);
    let mut follower = Replica::new(4, old.clone(), Params::default(), SEED);
    assert_eq!(follower.status().membership, Membership::Outside);
    let actions = follower.step(Event::SnapshotInstalled {
        slot: 10,
        configuration: new.clone(),
    });
    assert_eq!(actions, vec![Action::Compact { below: 11 }]);
    assert_eq!(follower.configuration(), &new);
    assert_eq!(follower.applied_configuration(), &new);
    assert_eq!(follower.status().membership, Membership::Voter);
    // An older snapshot changes nothing.
    assert_eq!(
        follower.step(Event::SnapshotInstalled {
            slot: 5,
            configuration: old.clone(),
        }),
        vec![]
    );
    assert_eq!(follower.configuration(), &new);
    // A restart from that snapshot starts from its configuration, not the first one.
    let durable = DurableState {
        snapshot_slot: 10,
        log_start: 11,
        chosen_index: 10,
        ..DurableState::default()
    };
    let restarted = Replica::restart(4, new.clone(), Params::default(), SEED, durable);
    assert_eq!(restarted.configuration(), &new);
    assert_eq!(restarted.status().membership, Membership::Voter);
}

#[test]
fn a_removed_replica_with_a_higher_ballot_cannot_depose_the_leader() {
    let mut net = Net::new(&[1, 2, 3, 4], &[]);
    let leader = net.elect();
    let victim = if leader == 4 { 3 } else { 4 };
    net.tick();
    let outcome = net.change(leader, MembershipChange::Remove(victim));
    assert!(
        matches!(outcome, Outcome::ChangeAccepted { .. }),
        "{outcome:?}"
    );
    net.crash(victim);
    net.drain();
    net.tick_until("C(new) without the victim is chosen", |net| {
        let config = net.configuration(leader);
        !config.is_joint() && !config.is_member(victim)
    });
    // The removed replica, with a stale view, campaigned in a far higher ballot.
    let high = Ballot {
        round: 1_000,
        node: victim,
    };
    let replica = net.replicas.get_mut(&leader).expect("leader is up");
    let actions = replica.step(Event::Message {
        from: victim,
        msg: Message::Reject { promised: high },
    });
    assert!(
        replica.status().leading.is_some(),
        "deposed by a removed replica"
    );
    // It is told what was chosen instead, so it can learn its removal.
    let chosen_index = replica.status().chosen_index;
    assert!(actions.iter().any(|action| matches!(
        action,
        Action::Send { to, msg: Message::Chosen { entries, chosen_index: c, .. } }
            if *to == victim && entries.is_empty() && *c == chosen_index
    )));
    // Members that hear the live leader ignore its Prepare.
    let member = [1, 2, 3, 4]
        .into_iter()
        .find(|id| *id != leader && *id != victim)
        .expect("a follower");
    let follower = net.replicas.get_mut(&member).expect("up");
    let before = follower.status().promised;
    let actions = follower.step(Event::Message {
        from: victim,
        msg: Message::Prepare {
            ballot: high,
            first_slot: 1,
        },
    });
    assert_eq!(actions, vec![]);
    assert_eq!(follower.status().promised, before);
}

/// The stuck state of harsh seed 302280 (3 replicas), in small: voters {1,2,3} were
/// replaced by {3,4,5}, and both entries of the change are chosen. The old voters 1
/// and 2 know it (now learners); 4 and 5 accepted both entries but never learned them
/// chosen (the leader, not in C(new), stepped down the moment C(new) was chosen), so
/// they take themselves for learners of {1,2,3}; 3 lost its disk and may never vote.
/// Nobody who may campaign thinks it is a voter. A learner without a leader asks
/// what was chosen, learns it is a voter, and the new voters elect a leader.
#[test]
fn new_voters_that_missed_their_promotion_learn_it_without_a_leader() {
    let mut net = Net::new(&[1, 2, 3], &[4, 5]);
    let old = net.bootstrap.clone();
    let target = Configuration::with_learners([3, 4, 5], [1, 2]);
    let joint = old.joint_to(&target);
    let entry = |round, config: &Configuration, chosen| LogEntry {
        ballot: Ballot { round, node: 1 },
        value: Value::Configuration(std::sync::Arc::new(config.clone())),
        chosen,
    };
    for id in [1, 2] {
        let log = BTreeMap::from([(1, entry(1, &joint, true)), (2, entry(2, &target, true))]);
        net.durable.insert(
            id,
            DurableState {
                promised: Ballot { round: 2, node: 1 },
                log,
                chosen_index: 2,
                ..DurableState::default()
            },
        );
    }
    for id in [4, 5] {
        let log = BTreeMap::from([(1, entry(1, &joint, false)), (2, entry(2, &target, false))]);
        net.durable.insert(
            id,
            DurableState {
                promised: Ballot { round: 2, node: 1 },
                log,
                ..DurableState::default()
            },
        );
    }
    net.durable.insert(
        3,
        DurableState {
            amnesic: true,
            ..DurableState::default()
        },
    );
    for id in 1..=5 {
        net.restart(id);
    }
    assert_eq!(net.configuration(1), target);
    assert_eq!(net.replicas[&4].status().membership, Membership::Learner);
    assert_eq!(net.replicas[&3].status().membership, Membership::Voter);

    let leader = net.elect();
    assert!([4, 5].contains(&leader), "leader {leader}");
    net.propose(leader, b"after the change");
    net.tick_until("every replica applied the command", |net| {
        net.applied.values().all(|log| {
            log.iter()
                .any(|(_, value)| matches!(value, Value::Batch(_)))
        })
    });
    net.assert_one_log();
    assert!(net.replicas.values().all(|r| r.configuration() == &target));
}
