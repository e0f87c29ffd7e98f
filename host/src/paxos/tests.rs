//! Unit tests of the core: exact actions for the key protocol steps.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;

const SEED: u64 = 7;

fn three() -> Configuration {
    Configuration::new([1, 2, 3])
}

fn ballot(round: u64, node: NodeId) -> Ballot {
    Ballot { round, node }
}

fn batch(payload: &[u8], request: RequestId) -> Value {
    Value::Batch(Arc::new(Batch {
        commands: vec![command(payload, 9, request)],
        timestamp_ms: 0,
        seed: 0,
    }))
}

fn command(payload: &[u8], node: NodeId, request: RequestId) -> Command {
    Command {
        payload: payload.to_vec(),
        idempotency_key: None,
        origin: Origin { node, request },
    }
}

fn message(from: NodeId, msg: Message) -> Event {
    Event::Message { from, msg }
}

fn tick(replica: &mut Replica) -> Vec<Action> {
    replica.step(Event::Tick { now_ms: 1_000 })
}

/// Completes every persist in `actions` (in order) and returns all actions after.
fn persist_all(replica: &mut Replica, actions: &[Action]) -> Vec<Action> {
    let mut out = Vec::new();
    for action in actions {
        if let Action::Persist { token, .. } = action {
            out.extend(replica.step(Event::Persisted { token: *token }));
        }
    }
    out
}

fn sends(actions: &[Action]) -> Vec<(NodeId, Message)> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Send { to, msg } => Some((*to, msg.clone())),
            _ => None,
        })
        .collect()
}

/// Ticks node 1 until it asks for pre-votes, grants them, and returns the actions of
/// starting Phase 1 (ballot (1, 1) on a fresh replica).
fn start_phase1(replica: &mut Replica) -> Vec<Action> {
    for _ in 0..Params::default().election_ticks_max {
        let actions = tick(replica);
        if actions.iter().any(|a| {
            matches!(
                a,
                Action::Send {
                    msg: Message::PreVote { .. },
                    ..
                }
            )
        }) {
            let grant = Message::PreVoteReply {
                round: 1,
                granted: true,
                promised: Ballot::ZERO,
            };
            return replica.step(message(2, grant));
        }
    }
    panic!("no election within election_ticks_max");
}

/// Elects node 1 of {1,2,3} with node 2's empty promise; returns the leader's actions
/// after the promise quorum.
fn elect(replica: &mut Replica) -> Vec<Action> {
    let actions = start_phase1(replica);
    persist_all(replica, &actions);
    let promise = Message::Promise {
        ballot: ballot(1, 1),
        first_slot: 1,
        entries: vec![],
    };
    replica.step(message(2, promise))
}

#[test]
fn prepare_is_answered_only_after_the_promise_is_persisted() {
    let mut acceptor = Replica::new(2, three(), Params::default(), SEED);
    // A fresh replica refuses other candidates for election_ticks_min (lease safety).
    for _ in 0..Params::default().election_ticks_min {
        tick(&mut acceptor);
    }
    let actions = acceptor.step(message(
        1,
        Message::Prepare {
            ballot: ballot(1, 1),
            first_slot: 1,
        },
    ));
    assert_eq!(
        actions,
        vec![Action::Persist {
            token: 1,
            record: PersistRecord {
                promised: Some(ballot(1, 1)),
                ..Default::default()
            },
        }]
    );
    assert_eq!(acceptor.status().promised, ballot(1, 1));
    let actions = acceptor.step(Event::Persisted { token: 1 });
    assert_eq!(
        actions,
        vec![Action::Send {
            to: 1,
            msg: Message::Promise {
                ballot: ballot(1, 1),
                first_slot: 1,
                entries: vec![]
            },
        }]
    );
    // A lower ballot is rejected at once: no state behind a rejection.
    let actions = acceptor.step(message(
        3,
        Message::Prepare {
            ballot: ballot(0, 3),
            first_slot: 1,
        },
    ));
    assert_eq!(
        actions,
        vec![Action::Send {
            to: 3,
            msg: Message::Reject {
                promised: ballot(1, 1)
            }
        }]
    );
}

#[test]
fn accept_is_acknowledged_only_after_the_entry_is_persisted() {
    let mut acceptor = Replica::new(2, three(), Params::default(), SEED);
    let value = batch(b"x", 1);
    let accept = Message::Accept {
        ballot: ballot(1, 1),
        slot: 1,
        value: value.clone(),
        chosen_index: 0,
    };
    let actions = acceptor.step(message(1, accept));
    let entry = LogEntry {
        ballot: ballot(1, 1),
        value: value.clone(),
        chosen: false,
    };
    assert_eq!(
        actions,
        vec![Action::Persist {
            token: 1,
            record: PersistRecord {
                promised: Some(ballot(1, 1)),
                entries: vec![(1, entry)],
                chosen_index: None
            },
        }]
    );
    assert_eq!(
        acceptor.step(Event::Persisted { token: 1 }),
        vec![Action::Send {
            to: 1,
            msg: Message::Accepted {
                ballot: ballot(1, 1),
                slot: 1
            }
        }]
    );
    // The commit index arrives with the next message; the entry was accepted in the
    // leader's current ballot, so it is known chosen and applied.
    let heartbeat = Message::Heartbeat {
        ballot: ballot(1, 1),
        seq: 1,
        chosen_index: 1,
    };
    assert_eq!(
        acceptor.step(message(1, heartbeat)),
        vec![
            Action::Persist {
                token: 2,
                record: PersistRecord {
                    chosen_index: Some(1),
                    ..Default::default()
                }
            },
            Action::Send {
                to: 1,
                msg: Message::HeartbeatAck {
                    ballot: ballot(1, 1),
                    seq: 1,
                    chosen_index: 1
                }
            },
            Action::Apply { slot: 1, value },
        ]
    );
}

#[test]
fn follower_does_not_learn_a_commit_for_a_value_from_an_older_ballot() {
    let mut acceptor = Replica::new(2, three(), Params::default(), SEED);
    let stale = batch(b"old", 1);
    let accept = Message::Accept {
        ballot: ballot(1, 1),
        slot: 1,
        value: stale,
        chosen_index: 0,
    };
    acceptor.step(message(1, accept));
    // A new leader in ballot (2, 3) says slot 1 is chosen; what we hold may not be it.
    let heartbeat = Message::Heartbeat {
        ballot: ballot(2, 3),
        seq: 1,
        chosen_index: 1,
    };
    assert_eq!(
        acceptor.step(message(3, heartbeat)),
        vec![Action::Send {
            to: 3,
            msg: Message::HeartbeatAck {
                ballot: ballot(2, 3),
                seq: 1,
                chosen_index: 0
            }
        }]
    );
    // Catch-up delivers the chosen value, which replaces ours.
    let chosen = batch(b"new", 2);
    let catchup = Message::Chosen {
        ballot: ballot(2, 3),
        entries: vec![(1, chosen.clone())],
        chosen_index: 1,
    };
    let actions = acceptor.step(message(3, catchup));
    let entry = LogEntry {
        ballot: ballot(1, 1),
        value: chosen.clone(),
        chosen: true,
    };
    assert_eq!(
        actions,
        vec![
            Action::Persist {
                token: 2,
                record: PersistRecord {
                    entries: vec![(1, entry)],
                    ..Default::default()
                }
            },
            Action::Persist {
                token: 3,
                record: PersistRecord {
                    chosen_index: Some(1),
                    ..Default::default()
                }
            },
            Action::Send {
                to: 3,
                msg: Message::Learned {
                    ballot: ballot(2, 3),
                    chosen_index: 1
                }
            },
            Action::Apply {
                slot: 1,
                value: chosen
            },
        ]
    );
}

#[test]
fn phase1_adopts_highest_ballot_values_and_fills_holes_with_noops() {
    let mut leader = Replica::new(1, three(), Params::default(), SEED);
    let actions = start_phase1(&mut leader);
    let prepare = Message::Prepare {
        ballot: ballot(1, 1),
        first_slot: 1,
    };
    assert_eq!(
        actions,
        vec![
            Action::Send {
                to: 2,
                msg: prepare.clone()
            },
            Action::Send {
                to: 3,
                msg: prepare
            },
            Action::Persist {
                token: 1,
                record: PersistRecord {
                    promised: Some(ballot(1, 1)),
                    ..Default::default()
                }
            },
        ]
    );
    // Our own promise (empty log) counts once persisted; one more is a quorum.
    assert_eq!(leader.step(Event::Persisted { token: 1 }), vec![]);
    let low = batch(b"low", 1);
    let high = batch(b"high", 2);
    let other = batch(b"other", 3);
    let entries = vec![
        (
            1,
            LogEntry {
                ballot: ballot(0, 2),
                value: low,
                chosen: false,
            },
        ),
        (
            3,
            LogEntry {
                ballot: ballot(0, 3),
                value: other.clone(),
                chosen: false,
            },
        ),
    ];
    let actions = leader.step(message(
        2,
        Message::Promise {
            ballot: ballot(1, 1),
            first_slot: 1,
            entries,
        },
    ));
    // Only one promise from a peer so far: node 2 alone plus us is a quorum of 3.
    let b = ballot(1, 1);
    let accept = |slot, value: &Value| Message::Accept {
        ballot: b,
        slot,
        value: value.clone(),
        chosen_index: 0,
    };
    let expected_sends: Vec<(NodeId, Message)> = [
        (1, accept(1, &batch(b"low", 1))),
        (2, accept(2, &Value::Noop)),
        (3, accept(3, &other)),
        (4, accept(4, &Value::Noop)),
    ]
    .into_iter()
    .flat_map(|(_, msg)| [(2, msg.clone()), (3, msg)])
    .chain([
        (
            2,
            Message::Heartbeat {
                ballot: b,
                seq: 1,
                chosen_index: 0,
            },
        ),
        (
            3,
            Message::Heartbeat {
                ballot: b,
                seq: 1,
                chosen_index: 0,
            },
        ),
    ])
    .collect();
    assert_eq!(sends(&actions), expected_sends);
    assert_eq!(leader.status().leading, Some(b));
    // With five voters, two peers report slot 1 in different ballots: the higher wins.
    let mut leader2 = Replica::new(
        1,
        Configuration::new([1, 2, 3, 4, 5]),
        Params::default(),
        SEED,
    );
    start_phase1(&mut leader2);
    let grant = Message::PreVoteReply {
        round: 1,
        granted: true,
        promised: Ballot::ZERO,
    };
    let actions = leader2.step(message(3, grant));
    persist_all(&mut leader2, &actions);
    let low_entry = LogEntry {
        ballot: ballot(0, 2),
        value: batch(b"low", 1),
        chosen: false,
    };
    let high_entry = LogEntry {
        ballot: ballot(0, 4),
        value: high.clone(),
        chosen: false,
    };
    assert!(sends(&leader2.step(message(
        2,
        Message::Promise {
            ballot: b,
            first_slot: 1,
            entries: vec![(1, low_entry)]
        }
    )))
    .is_empty());
    let actions = leader2.step(message(
        4,
        Message::Promise {
            ballot: b,
            first_slot: 1,
            entries: vec![(1, high_entry)],
        },
    ));
    let first_accept = sends(&actions).into_iter().next().expect("accepts sent");
    assert_eq!(
        first_accept,
        (
            2,
            Message::Accept {
                ballot: b,
                slot: 1,
                value: high,
                chosen_index: 0
            }
        )
    );
}

#[test]
fn planted_bug_makes_phase1_ignore_accepted_values() {
    let params = Params {
        bug_ignore_phase1_values: true,
        ..Params::default()
    };
    let mut leader = Replica::new(1, three(), params, SEED);
    let actions = start_phase1(&mut leader);
    persist_all(&mut leader, &actions);
    let entries = vec![(
        1,
        LogEntry {
            ballot: ballot(0, 2),
            value: batch(b"v", 1),
            chosen: false,
        },
    )];
    let actions = leader.step(message(
        2,
        Message::Promise {
            ballot: ballot(1, 1),
            first_slot: 1,
            entries,
        },
    ));
    let first = sends(&actions).into_iter().next().expect("accepts sent");
    assert_eq!(
        first,
        (
            2,
            Message::Accept {
                ballot: ballot(1, 1),
                slot: 1,
                value: Value::Noop,
                chosen_index: 0
            }
        )
    );
}

/// Runs the leader's round: persists its own writes, acks every accept and heartbeat
/// from node 2, and returns everything emitted.
fn ack_from_2(leader: &mut Replica, actions: &[Action]) -> Vec<Action> {
    let mut out = persist_all(leader, actions);
    for (to, msg) in sends(actions) {
        if to != 2 {
            continue;
        }
        let reply = match msg {
            Message::Accept { ballot, slot, .. } => Message::Accepted { ballot, slot },
            Message::Heartbeat { ballot, seq, .. } => Message::HeartbeatAck {
                ballot,
                seq,
                chosen_index: 0,
            },
            _ => continue,
        };
        let more = leader.step(message(2, reply));
        out.extend(persist_all(leader, &more));
        out.extend(more);
    }
    out
}

#[test]
fn lease_reads_are_served_until_the_lease_expires_then_need_a_quorum_round() {
    let params = Params::default();
    let mut leader = Replica::new(1, three(), params.clone(), SEED);
    let actions = elect(&mut leader);
    let sent_tick_actions = ack_from_2(&mut leader, &actions);
    assert!(sent_tick_actions.contains(&Action::Apply {
        slot: 1,
        value: Value::Noop
    }));
    assert!(leader.lease_valid());
    // The lease counts from when the acknowledged round was SENT.
    assert_eq!(
        leader.step(Event::Read {
            request: 5,
            mode: ReadMode::Lease
        }),
        vec![Action::Reply {
            request: 5,
            outcome: Outcome::ReadReady
        }]
    );
    // Ticks pass with heartbeats unanswered: the lease runs out after lease_ticks.
    for _ in 0..params.lease_ticks - 1 {
        tick(&mut leader);
        assert!(leader.lease_valid());
    }
    tick(&mut leader);
    assert!(!leader.lease_valid());
    // A lease read now waits for a confirming round sent after it arrived.
    assert_eq!(
        leader.step(Event::Read {
            request: 6,
            mode: ReadMode::Lease
        }),
        vec![]
    );
    let actions = tick(&mut leader);
    let seq = sends(&actions)
        .into_iter()
        .find_map(|(_, msg)| match msg {
            Message::Heartbeat { seq, .. } => Some(seq),
            _ => None,
        })
        .expect("a confirming round is sent on the next tick");
    let ack = Message::HeartbeatAck {
        ballot: ballot(1, 1),
        seq: seq - 1,
        chosen_index: 1,
    };
    assert_eq!(
        leader.step(message(3, ack)),
        vec![],
        "an older round does not confirm the read"
    );
    let ack = Message::HeartbeatAck {
        ballot: ballot(1, 1),
        seq,
        chosen_index: 1,
    };
    assert_eq!(
        leader.step(message(3, ack)),
        vec![Action::Reply {
            request: 6,
            outcome: Outcome::ReadReady
        }]
    );
}

#[test]
fn leader_without_quorum_contact_steps_down_and_answers_waiting_requests() {
    let params = Params::default();
    let mut leader = Replica::new(1, three(), params.clone(), SEED);
    let actions = elect(&mut leader);
    ack_from_2(&mut leader, &actions);
    assert!(leader.status().leading.is_some());
    leader.step(Event::Read {
        request: 8,
        mode: ReadMode::ReadIndex,
    });
    let mut last = Vec::new();
    for _ in 0..params.election_ticks_min {
        last = tick(&mut leader);
    }
    assert_eq!(leader.status().leading, None);
    assert_eq!(
        last,
        vec![Action::Reply {
            request: 8,
            outcome: Outcome::NotLeader { leader_hint: None }
        }]
    );
}

#[test]
fn new_leader_serves_no_read_before_its_own_entry_is_applied() {
    let mut leader = Replica::new(1, three(), Params::default(), SEED);
    let actions = elect(&mut leader);
    persist_all(&mut leader, &actions);
    assert_eq!(
        leader.step(Event::Read {
            request: 1,
            mode: ReadMode::Lease
        }),
        vec![]
    );
    let heartbeat_seq = 1;
    let ack = Message::HeartbeatAck {
        ballot: ballot(1, 1),
        seq: heartbeat_seq,
        chosen_index: 0,
    };
    let actions = leader.step(message(2, ack));
    // Catch-up is not needed (nothing chosen); the read still waits for its own round
    // and for the leader's no-op to be chosen and applied.
    assert!(!actions.iter().any(|a| matches!(a, Action::Reply { .. })));
    let actions = tick(&mut leader);
    let seq = sends(&actions)
        .into_iter()
        .find_map(|(_, msg)| match msg {
            Message::Heartbeat { seq, .. } => Some(seq),
            _ => None,
        })
        .expect("confirming round");
    let ack = Message::HeartbeatAck {
        ballot: ballot(1, 1),
        seq,
        chosen_index: 0,
    };
    let actions = leader.step(message(2, ack));
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Reply { .. })),
        "no-op not chosen yet"
    );
    let actions = leader.step(message(
        2,
        Message::Accepted {
            ballot: ballot(1, 1),
            slot: 1,
        },
    ));
    assert_eq!(
        actions,
        vec![
            Action::Persist {
                token: 3,
                record: PersistRecord {
                    chosen_index: Some(1),
                    ..Default::default()
                }
            },
            Action::Apply {
                slot: 1,
                value: Value::Noop
            },
            Action::Reply {
                request: 1,
                outcome: Outcome::ReadReady
            },
        ]
    );
}

#[test]
fn follower_forwards_proposals_to_the_leader_or_says_not_leader() {
    let mut follower = Replica::new(2, three(), Params::default(), SEED);
    let cmd = command(b"c", 0, 0);
    assert_eq!(
        follower.step(Event::Propose {
            request: 4,
            command: cmd.clone()
        }),
        vec![Action::Reply {
            request: 4,
            outcome: Outcome::NotLeader { leader_hint: None }
        }]
    );
    follower.step(message(
        3,
        Message::Heartbeat {
            ballot: ballot(1, 3),
            seq: 1,
            chosen_index: 0,
        },
    ));
    assert_eq!(
        follower.step(Event::Propose {
            request: 4,
            command: cmd
        }),
        vec![Action::Send {
            to: 3,
            msg: Message::Forward {
                command: command(b"c", 2, 4)
            }
        }]
    );
    assert_eq!(
        follower.step(Event::Read {
            request: 5,
            mode: ReadMode::Lease
        }),
        vec![Action::Reply {
            request: 5,
            outcome: Outcome::NotLeader {
                leader_hint: Some(3)
            }
        }]
    );
}

#[test]
fn live_leader_blocks_pre_votes_and_prepares_from_others() {
    let mut follower = Replica::new(2, three(), Params::default(), SEED);
    for _ in 0..Params::default().election_ticks_min {
        tick(&mut follower);
    }
    follower.step(message(
        1,
        Message::Heartbeat {
            ballot: ballot(1, 1),
            seq: 1,
            chosen_index: 0,
        },
    ));
    assert_eq!(
        follower.step(message(3, Message::PreVote { round: 2 })),
        vec![Action::Send {
            to: 3,
            msg: Message::PreVoteReply {
                round: 2,
                granted: false,
                promised: Ballot::ZERO
            }
        }]
    );
    assert_eq!(
        follower.step(message(
            3,
            Message::Prepare {
                ballot: ballot(2, 3),
                first_slot: 1
            }
        )),
        vec![]
    );
}

/// Default parameters, except that the leader proposes each command as soon as the
/// window allows, without waiting for its own persists (so tests get a slot each).
fn one_slot_per_proposal() -> Params {
    Params {
        slots_unpersisted_max: u64::MAX,
        ..Params::default()
    }
}

/// The batches (slot, command count) in the accepts sent to node 2.
fn batches_to_2(actions: &[Action]) -> Vec<(Slot, usize)> {
    sends(actions)
        .into_iter()
        .filter_map(|(to, msg)| match (to, msg) {
            (
                2,
                Message::Accept {
                    slot,
                    value: Value::Batch(batch),
                    ..
                },
            ) => Some((slot, batch.commands.len())),
            _ => None,
        })
        .collect()
}

#[test]
fn leader_holds_batches_while_its_own_accept_is_being_persisted() {
    let params = Params {
        batch_bytes_max: 3 * (8 + COMMAND_OVERHEAD_BYTES),
        slots_unpersisted_max: 1,
        ..Params::default()
    };
    let mut leader = Replica::new(1, three(), params, SEED);
    let elected = elect(&mut leader);
    let propose = |leader: &mut Replica, request| {
        leader.step(Event::Propose {
            request,
            command: command(b"12345678", 0, 0),
        })
    };
    // The ready no-op (slot 1) waits for the leader's own persist: commands queue.
    let mut held = propose(&mut leader, 0);
    held.extend(propose(&mut leader, 1));
    assert_eq!(batches_to_2(&held), vec![]);
    // Its own accept is durable: both go out together, in one slot.
    let released = persist_all(&mut leader, &elected);
    assert_eq!(batches_to_2(&released), vec![(2, 2)]);
    // Slot 2 waits for its persist now; a third command is held, but not a full batch.
    let held = propose(&mut leader, 2);
    assert_eq!(batches_to_2(&held), vec![]);
    let held = propose(&mut leader, 3);
    assert_eq!(batches_to_2(&held), vec![]);
    let full = propose(&mut leader, 4);
    assert_eq!(batches_to_2(&full), vec![(3, 3)]);
    // With two unpersisted slots allowed, one more batch goes out while the first is
    // being persisted; the next waits.
    let two = Params {
        slots_unpersisted_max: 2,
        ..Params::default()
    };
    let mut overlapped = Replica::new(1, three(), two, SEED);
    let elected = elect(&mut overlapped);
    let mut actions = propose(&mut overlapped, 0);
    actions.extend(propose(&mut overlapped, 1));
    assert_eq!(batches_to_2(&actions), vec![(2, 1)]);
    assert_eq!(
        batches_to_2(&persist_all(&mut overlapped, &elected)),
        vec![(3, 1)]
    );
    // Without the hold, every proposal takes a slot of its own at once.
    let mut eager = Replica::new(1, three(), one_slot_per_proposal(), SEED);
    elect(&mut eager);
    let mut actions = propose(&mut eager, 0);
    actions.extend(propose(&mut eager, 1));
    assert_eq!(batches_to_2(&actions), vec![(2, 1), (3, 1)]);
}

#[test]
fn batching_respects_batch_bytes_max_and_the_pipelining_window() {
    let params = Params {
        batch_bytes_max: 2 * (8 + COMMAND_OVERHEAD_BYTES),
        slots_in_flight_max: 2,
        ..Params::default()
    };
    let mut leader = Replica::new(1, three(), params, SEED);
    let actions = elect(&mut leader);
    persist_all(&mut leader, &actions);
    // The ready no-op occupies one of the two window slots.
    let mut accepted_slots = Vec::new();
    for request in 0..5 {
        let actions = leader.step(Event::Propose {
            request,
            command: command(b"12345678", 0, 0),
        });
        for (to, msg) in sends(&actions) {
            if let (
                2,
                Message::Accept {
                    slot,
                    value: Value::Batch(batch),
                    ..
                },
            ) = (to, msg)
            {
                accepted_slots.push((slot, batch.commands.len()));
            }
        }
    }
    assert_eq!(
        accepted_slots,
        vec![(2, 1)],
        "window of 2 holds the no-op and one batch"
    );
    let actions = leader.step(message(
        2,
        Message::Accepted {
            ballot: ballot(1, 1),
            slot: 1,
        },
    ));
    let batches: Vec<(Slot, usize)> = sends(&actions)
        .into_iter()
        .filter_map(|(to, msg)| match (to, msg) {
            (
                2,
                Message::Accept {
                    slot,
                    value: Value::Batch(batch),
                    ..
                },
            ) => Some((slot, batch.commands.len())),
            _ => None,
        })
        .collect();
    assert_eq!(
        batches,
        vec![(3, 2)],
        "one more slot opened; it takes two commands"
    );
}

#[test]
fn restart_keeps_only_persisted_state() {
    let mut acceptor = Replica::new(2, three(), Params::default(), SEED);
    let value = batch(b"x", 1);
    let accept = Message::Accept {
        ballot: ballot(1, 1),
        slot: 1,
        value: value.clone(),
        chosen_index: 0,
    };
    let actions = acceptor.step(message(1, accept));
    let mut durable = DurableState::default();
    // The persist never completed: a restart forgets the accept and the promise.
    let restarted = Replica::restart(2, three(), Params::default(), SEED, durable.clone());
    assert_eq!(restarted.status().promised, Ballot::ZERO);
    assert_eq!(restarted.entry(1), None);
    let Action::Persist { record, .. } = &actions[0] else {
        panic!("persist first")
    };
    durable.apply(record);
    durable.apply(&PersistRecord {
        chosen_index: Some(1),
        ..Default::default()
    });
    let mut restarted = Replica::restart(2, three(), Params::default(), SEED, durable);
    assert_eq!(restarted.status().promised, ballot(1, 1));
    // The chosen prefix is applied again from slot 1 on the first event.
    assert_eq!(tick(&mut restarted), vec![Action::Apply { slot: 1, value }]);
}

struct Counter {
    applied: u64,
}

impl StateMachine for Counter {
    fn apply(&mut self, payload: &[u8], _context: &ApplyContext) -> Vec<u8> {
        self.applied += 1;
        let mut result = payload.to_vec();
        result.extend_from_slice(&self.applied.to_le_bytes());
        result
    }
}

#[test]
fn dedup_applies_a_keyed_command_once_and_returns_the_first_result() {
    let mut applier = Applier::new(1, Counter { applied: 0 });
    let keyed = |seq, request| Command {
        payload: b"inc".to_vec(),
        idempotency_key: Some(IdempotencyKey { client: 42, seq }),
        origin: Origin { node: 1, request },
    };
    let value = Value::Batch(Arc::new(Batch {
        commands: vec![keyed(1, 10), keyed(1, 11)],
        timestamp_ms: 5,
        seed: 6,
    }));
    let mut replies = Vec::new();
    applier.apply(1, &value, &mut replies);
    let first = [b"inc".as_slice(), &1u64.to_le_bytes()].concat();
    assert_eq!(replies, vec![(10, first.clone()), (11, first.clone())]);
    assert_eq!(applier.machine.applied, 1);
    // The same key decided again in a later slot (a retry after a leader change).
    replies.clear();
    let value = Value::Batch(Arc::new(Batch {
        commands: vec![keyed(1, 12), keyed(2, 13), keyed(1, 14)],
        timestamp_ms: 5,
        seed: 6,
    }));
    applier.apply(2, &value, &mut replies);
    let second = [b"inc".as_slice(), &2u64.to_le_bytes()].concat();
    assert_eq!(
        replies,
        vec![(12, first), (13, second), (14, STALE_RESULT.to_vec())]
    );
    assert_eq!(applier.machine.applied, 2);
    assert_eq!(
        applier.dedup.check(IdempotencyKey { client: 42, seq: 3 }),
        DedupCheck::New
    );
}

#[test]
fn quorum_is_a_strict_majority_of_voters() {
    let config = Configuration::new([1, 2, 3, 4, 5]);
    assert!(!config.is_quorum(|node| node <= 2));
    assert!(config.is_quorum(|node| node <= 3));
    assert!(
        !config.is_quorum(|node| node >= 6),
        "non-voters never count"
    );
}

#[test]
fn dedup_forgets_the_client_applied_longest_ago_beyond_its_limit() {
    let mut table = DedupTable::new(2);
    let key = |client, seq| IdempotencyKey { client, seq };
    table.record(key(1, 1), 10, b"a".to_vec());
    table.record(key(2, 1), 11, b"b".to_vec());
    table.record(key(1, 2), 12, b"c".to_vec());
    table.record(key(3, 1), 13, b"d".to_vec());
    assert_eq!(table.clients(), 2);
    assert_eq!(
        table.check(key(2, 1)),
        DedupCheck::New,
        "client 2 was forgotten"
    );
    assert_eq!(table.check(key(1, 2)), DedupCheck::Duplicate(b"c"));
    assert_eq!(table.check(key(1, 1)), DedupCheck::Stale);
    assert_eq!(table.check(key(3, 1)), DedupCheck::Duplicate(b"d"));
}

#[test]
fn catch_up_sends_chosen_entries_in_bounded_chunks() {
    let params = Params {
        catchup_entries_max: 2,
        ..one_slot_per_proposal()
    };
    let mut leader = Replica::new(1, three(), params, SEED);
    let mut pending = elect(&mut leader);
    for request in 0..3 {
        pending.extend(leader.step(Event::Propose {
            request,
            command: command(b"c", 0, 0),
        }));
    }
    ack_from_2(&mut leader, &pending);
    assert_eq!(
        leader.status().chosen_index,
        4,
        "the no-op and three batches"
    );
    let b = ballot(1, 1);
    let lagging = Message::HeartbeatAck {
        ballot: b,
        seq: 1,
        chosen_index: 0,
    };
    let values: Vec<Value> = (1..=4)
        .map(|slot| leader.entry(slot).expect("chosen").value.clone())
        .collect();
    assert_eq!(
        leader.step(message(3, lagging)),
        vec![Action::Send {
            to: 3,
            msg: Message::Chosen {
                ballot: b,
                entries: vec![(1, values[0].clone()), (2, values[1].clone())],
                chosen_index: 4
            }
        }]
    );
    // The follower's reply drives the next chunk; a repeated heartbeat ack while the
    // stream is under way does not start a second one.
    let repeated = Message::HeartbeatAck {
        ballot: b,
        seq: 1,
        chosen_index: 0,
    };
    assert_eq!(leader.step(message(3, repeated)), vec![]);
    assert_eq!(
        leader.step(message(
            3,
            Message::Learned {
                ballot: b,
                chosen_index: 2
            }
        )),
        vec![Action::Send {
            to: 3,
            msg: Message::Chosen {
                ballot: b,
                entries: vec![(3, values[2].clone()), (4, values[3].clone())],
                chosen_index: 4
            }
        }]
    );
    assert_eq!(
        leader.step(message(
            3,
            Message::Learned {
                ballot: b,
                chosen_index: 4
            }
        )),
        vec![]
    );
}

#[test]
fn election_starts_with_a_pre_vote_that_changes_no_state() {
    let mut replica = Replica::new(1, three(), Params::default(), SEED);
    let mut actions = Vec::new();
    let mut ticks = 0;
    while actions.is_empty() {
        actions = tick(&mut replica);
        ticks += 1;
    }
    let params = Params::default();
    assert!((params.election_ticks_min..params.election_ticks_max).contains(&ticks));
    // Our own pre-vote is answered in-process; peers are asked.
    assert_eq!(
        actions,
        vec![
            Action::Send {
                to: 2,
                msg: Message::PreVote { round: 1 }
            },
            Action::Send {
                to: 3,
                msg: Message::PreVote { round: 1 }
            },
        ]
    );
    assert_eq!(
        replica.status().promised,
        Ballot::ZERO,
        "a pre-vote promises nothing"
    );
    // A denial changes nothing; a grant completes the quorum and starts Phase 1 with a
    // round above everything seen, including the granting peer's promise.
    let deny = Message::PreVoteReply {
        round: 1,
        granted: false,
        promised: ballot(4, 3),
    };
    assert_eq!(replica.step(message(3, deny)), vec![]);
    let grant = Message::PreVoteReply {
        round: 1,
        granted: true,
        promised: Ballot::ZERO,
    };
    let prepare = Message::Prepare {
        ballot: ballot(5, 1),
        first_slot: 1,
    };
    assert_eq!(
        replica.step(message(2, grant)),
        vec![
            Action::Send {
                to: 2,
                msg: prepare.clone()
            },
            Action::Send {
                to: 3,
                msg: prepare
            },
            Action::Persist {
                token: 1,
                record: PersistRecord {
                    promised: Some(ballot(5, 1)),
                    ..Default::default()
                }
            },
        ]
    );
}

#[test]
fn leader_steps_down_on_a_higher_ballot_and_answers_queued_proposals() {
    let params = Params {
        slots_in_flight_max: 1,
        ..Params::default()
    };
    let mut leader = Replica::new(1, three(), params, SEED);
    elect(&mut leader);
    // The window (1 slot) is taken by the ready no-op: this proposal stays queued.
    assert_eq!(
        leader.step(Event::Propose {
            request: 7,
            command: command(b"q", 0, 0)
        }),
        vec![]
    );
    assert_eq!(
        leader.step(message(
            2,
            Message::Reject {
                promised: ballot(3, 2)
            }
        )),
        vec![Action::Reply {
            request: 7,
            outcome: Outcome::NotLeader { leader_hint: None }
        }]
    );
    assert_eq!(leader.status().leading, None);
}

#[test]
fn restarted_replica_refuses_other_candidates_for_an_election_timeout() {
    let params = Params::default();
    let mut replica = Replica::restart(2, three(), params.clone(), SEED, DurableState::default());
    let prepare = Message::Prepare {
        ballot: ballot(1, 3),
        first_slot: 1,
    };
    assert_eq!(replica.step(message(3, prepare.clone())), vec![]);
    for _ in 0..params.election_ticks_min {
        tick(&mut replica);
    }
    let actions = replica.step(message(3, prepare));
    assert!(
        matches!(actions.as_slice(), [Action::Persist { .. }]),
        "{actions:?}"
    );
}

#[test]
fn replica_and_applier_can_move_to_another_thread() {
    // The replica process runs the core inside an async task.
    fn assert_send<T: Send + 'static>() {}
    assert_send::<Replica>();
    assert_send::<Applier<Counter>>();
    assert_send::<Action>();
}

#[test]
fn lease_counts_from_when_the_round_was_sent_not_when_acks_arrived() {
    let params = Params::default();
    let mut leader = Replica::new(1, three(), params.clone(), SEED);
    let actions = elect(&mut leader);
    persist_all(&mut leader, &actions);
    // The no-op is chosen (ready), but round 1 (sent at election) is not acked yet.
    leader.step(message(
        2,
        Message::Accepted {
            ballot: ballot(1, 1),
            slot: 1,
        },
    ));
    assert!(!leader.lease_valid());
    let late_ticks = 6;
    for _ in 0..late_ticks {
        tick(&mut leader);
    }
    // The ack of round 1 arrives late: the lease still ends lease_ticks after round 1
    // was sent, so only lease_ticks - late_ticks of it remain.
    let ack = Message::HeartbeatAck {
        ballot: ballot(1, 1),
        seq: 1,
        chosen_index: 1,
    };
    leader.step(message(2, ack));
    assert!(leader.lease_valid());
    for _ in 0..params.lease_ticks - late_ticks - 1 {
        tick(&mut leader);
        assert!(leader.lease_valid());
    }
    tick(&mut leader);
    assert!(
        !leader.lease_valid(),
        "a lease measured from ack arrival would still hold"
    );
}

#[test]
fn new_leader_never_stamps_a_batch_earlier_than_a_batch_it_recovered() {
    // A previous leader's clock ran ahead: it stamped slot 1 at 5 000 ms. The new
    // leader's clock says 1 000 ms; its first batch goes after slot 1 in the log, and
    // the state machine must never see time go backwards.
    let mut leader = Replica::new(1, three(), one_slot_per_proposal(), SEED);
    let actions = start_phase1(&mut leader);
    persist_all(&mut leader, &actions);
    let recovered = Value::Batch(Arc::new(Batch {
        commands: vec![command(b"old", 2, 1)],
        timestamp_ms: 5_000,
        seed: 0,
    }));
    let entry = LogEntry {
        ballot: ballot(0, 2),
        value: recovered,
        chosen: false,
    };
    leader.step(message(
        2,
        Message::Promise {
            ballot: ballot(1, 1),
            first_slot: 1,
            entries: vec![(1, entry)],
        },
    ));
    assert_eq!(leader.status().leading, Some(ballot(1, 1)));
    let actions = leader.step(Event::Propose {
        request: 7,
        command: command(b"new", 0, 0),
    });
    let stamps: Vec<(Slot, u64)> = sends(&actions)
        .into_iter()
        .filter_map(|(_, msg)| match msg {
            Message::Accept {
                slot,
                value: Value::Batch(batch),
                ..
            } => Some((slot, batch.timestamp_ms)),
            _ => None,
        })
        .collect();
    assert_eq!(stamps, vec![(3, 5_000), (3, 5_000)]);
}

/// Records the context of every command it applies.
struct Clock {
    seen: Vec<ApplyContext>,
}

impl StateMachine for Clock {
    fn apply(&mut self, _payload: &[u8], context: &ApplyContext) -> Vec<u8> {
        self.seen.push(*context);
        Vec::new()
    }
}

#[test]
fn state_machine_clock_never_goes_back_when_log_stamps_do() {
    // Slot 1 was formed by a deposed leader whose clock ran ahead (9 000 ms) and was
    // recovered by Phase 1; slot 2 by a leader with a slower clock (4 000 ms). Both are
    // legitimately chosen in that order; the machine sees 9 000 ms twice, then time
    // moves on (slot 3 at 12 000 ms).
    let mut applier = Applier::new(1, Clock { seen: Vec::new() });
    let stamped = |timestamp_ms, seed| {
        Value::Batch(Arc::new(Batch {
            commands: vec![command(b"x", 9, 1)],
            timestamp_ms,
            seed,
        }))
    };
    let mut replies = Vec::new();
    applier.apply(1, &stamped(9_000, 1), &mut replies);
    applier.apply(2, &stamped(4_000, 2), &mut replies);
    applier.apply(3, &stamped(12_000, 3), &mut replies);
    let context = |slot, timestamp_ms, seed| ApplyContext {
        slot,
        timestamp_ms,
        seed,
    };
    assert_eq!(
        applier.machine.seen,
        vec![
            context(1, 9_000, 1),
            context(2, 9_000, 2),
            context(3, 12_000, 3)
        ]
    );
}

#[test]
fn restarted_leader_whose_own_promise_was_lost_never_reuses_its_ballot() {
    // Node 1 led in ballot (5, 1) with promises from 2 and 3 only, and crashed before
    // its own promise was durable: it restarts promised (3, 2). Reusing (5, 1) could
    // put two values in one (slot, ballot). Its pre-vote quorum must include a replica
    // that promised (5, 1), whose reply raises the next round to 6.
    let durable = DurableState {
        promised: ballot(3, 2),
        ..Default::default()
    };
    let mut replica = Replica::restart(1, three(), Params::default(), SEED, durable);
    let mut pre_vote_round = None;
    for _ in 0..Params::default().election_ticks_max {
        for (_, msg) in sends(&tick(&mut replica)) {
            if let Message::PreVote { round } = msg {
                pre_vote_round = Some(round);
            }
        }
        if pre_vote_round.is_some() {
            break;
        }
    }
    assert_eq!(pre_vote_round, Some(4), "pre-vote changes no state");
    let grant = Message::PreVoteReply {
        round: 4,
        granted: true,
        promised: ballot(5, 1),
    };
    let actions = replica.step(message(2, grant));
    let prepare = Message::Prepare {
        ballot: ballot(6, 1),
        first_slot: 1,
    };
    assert_eq!(sends(&actions), vec![(2, prepare.clone()), (3, prepare)]);
}

// ---- snapshots and compaction ----------------------------------------------------------

fn leader_with_four_chosen_slots(params: Params) -> Replica {
    let params = Params {
        slots_unpersisted_max: u64::MAX,
        ..params
    };
    let mut leader = Replica::new(1, three(), params, SEED);
    let mut pending = elect(&mut leader);
    for request in 0..3 {
        pending.extend(leader.step(Event::Propose {
            request,
            command: command(b"c", 0, 0),
        }));
    }
    ack_from_2(&mut leader, &pending);
    assert_eq!(leader.status().applied_index, 4);
    leader
}

#[test]
fn saved_snapshot_compacts_below_the_margin_and_lagging_peers_get_a_snapshot() {
    let params = Params {
        compaction_margin_entries: 1,
        ..Params::default()
    };
    let mut leader = leader_with_four_chosen_slots(params);
    let last = leader.entry(4).expect("chosen").value.clone();
    assert_eq!(
        leader.step(Event::SnapshotSaved { slot: 4 }),
        vec![Action::Compact { below: 4 }],
        "one entry under the snapshot stays for lagging peers"
    );
    let status = leader.status();
    assert_eq!((status.log_start, status.snapshot_slot), (4, 4));
    assert_eq!(leader.entry(3), None);
    let b = ballot(1, 1);
    // A peer that still needs slot 1 can only be caught up by a snapshot...
    let far_behind = Message::HeartbeatAck {
        ballot: b,
        seq: 1,
        chosen_index: 0,
    };
    assert_eq!(
        leader.step(message(3, far_behind)),
        vec![Action::SendSnapshot { to: 3, slot: 1 }]
    );
    // ...one within the margin still gets log entries.
    let within_margin = Message::HeartbeatAck {
        ballot: b,
        seq: 1,
        chosen_index: 3,
    };
    assert_eq!(
        leader.step(message(2, within_margin)),
        vec![Action::Send {
            to: 2,
            msg: Message::Chosen {
                ballot: b,
                entries: vec![(4, last)],
                chosen_index: 4
            }
        }]
    );
    // An older snapshot never moves the log start back.
    assert_eq!(leader.step(Event::SnapshotSaved { slot: 2 }), vec![]);
    assert_eq!(leader.status().log_start, 4);
}

#[test]
fn acceptor_never_promises_a_candidate_that_needs_compacted_slots() {
    // Restarted from a snapshot at 4 with everything below compacted away.
    let durable = DurableState {
        snapshot_slot: 4,
        log_start: 5,
        chosen_index: 4,
        ..DurableState::default()
    };
    let mut acceptor = Replica::restart(2, three(), Params::default(), SEED, durable);
    // A restarted replica supports no candidate for an election timeout.
    for _ in 0..Params::default().election_ticks_min {
        tick(&mut acceptor);
    }
    let promised = acceptor.status().promised;
    // A candidate whose chosen prefix ends at 2: slots 3 and 4 are chosen but gone
    // here, so a promise could not report them.
    let actions = acceptor.step(message(
        3,
        Message::Prepare {
            ballot: ballot(9, 3),
            first_slot: 3,
        },
    ));
    let persists = actions
        .iter()
        .filter(|a| matches!(a, Action::Persist { .. }))
        .count();
    assert_eq!(persists, 0, "no promise is made: {actions:?}");
    assert!(actions.contains(&Action::SendSnapshot { to: 3, slot: 3 }));
    assert!(!sends(&actions)
        .iter()
        .any(|(_, msg)| matches!(msg, Message::Promise { .. })));
    assert_eq!(acceptor.status().promised, promised);
}

#[test]
fn installed_snapshot_counts_as_applied_and_the_log_continues_after_it() {
    let mut follower = Replica::new(2, three(), Params::default(), SEED);
    // An entry accepted before the install, below the snapshot: dropped with it.
    let b = ballot(1, 1);
    let early = Message::Accept {
        ballot: b,
        slot: 3,
        value: batch(b"old", 1),
        chosen_index: 0,
    };
    let actions = follower.step(message(1, early));
    persist_all(&mut follower, &actions);
    assert_eq!(
        follower.step(Event::SnapshotInstalled {
            slot: 10,
            configuration: three(),
        }),
        vec![Action::Compact { below: 11 }],
        "no Apply for the slots the snapshot covers"
    );
    let status = follower.status();
    assert_eq!(
        (
            status.chosen_index,
            status.applied_index,
            status.log_start,
            status.snapshot_slot
        ),
        (10, 10, 11, 10)
    );
    assert_eq!(follower.entry(3), None);
    // An older snapshot arriving late changes nothing.
    assert_eq!(
        follower.step(Event::SnapshotInstalled {
            slot: 7,
            configuration: three(),
        }),
        vec![]
    );
    let value = batch(b"next", 2);
    let accept = Message::Accept {
        ballot: b,
        slot: 11,
        value: value.clone(),
        chosen_index: 0,
    };
    let actions = follower.step(message(1, accept));
    persist_all(&mut follower, &actions);
    let heartbeat = Message::Heartbeat {
        ballot: b,
        seq: 1,
        chosen_index: 11,
    };
    let actions = follower.step(message(1, heartbeat));
    let applied: Vec<&Action> = actions
        .iter()
        .filter(|a| matches!(a, Action::Apply { .. }))
        .collect();
    assert_eq!(applied, vec![&Action::Apply { slot: 11, value }]);
}

#[test]
fn restart_from_a_snapshot_replays_only_the_log_after_it() {
    let mut durable = DurableState {
        snapshot_slot: 10,
        log_start: 8,
        chosen_index: 11,
        ..DurableState::default()
    };
    for slot in 8..=12 {
        durable.log.insert(
            slot,
            LogEntry {
                ballot: ballot(1, 1),
                value: batch(b"v", slot),
                chosen: false,
            },
        );
    }
    let mut replica = Replica::restart(2, three(), Params::default(), SEED, durable);
    let status = replica.status();
    assert_eq!(
        (
            status.applied_index,
            status.chosen_index,
            status.log_start,
            status.snapshot_slot
        ),
        (10, 11, 8, 10)
    );
    assert!(replica.entry(9).expect("kept for catch-up").chosen);
    assert!(!replica.entry(12).expect("accepted").chosen);
    assert_eq!(
        tick(&mut replica),
        vec![Action::Apply {
            slot: 11,
            value: batch(b"v", 11)
        }]
    );
}

#[test]
fn applier_state_round_trips_and_refuses_damaged_input() {
    let mut applier = Applier::new(1, Counter { applied: 0 });
    let keyed = |client, seq, payload: &[u8]| Command {
        payload: payload.to_vec(),
        idempotency_key: Some(IdempotencyKey { client, seq }),
        origin: Origin {
            node: 2,
            request: 0,
        },
    };
    let value = Value::Batch(Arc::new(Batch {
        commands: vec![keyed(7, 1, b"a"), keyed(3, 5, b"b")],
        timestamp_ms: 1_234,
        seed: 0,
    }));
    applier.apply(1, &value, &mut Vec::new());
    let exported = applier.export_state();
    let mut other = Applier::new(1, Counter { applied: 2 });
    other.import_state(&exported).expect("round trip");
    assert_eq!(other.applied_index, 1);
    assert_eq!(other.clock_ms(), 1_234);
    assert_eq!(other.dedup, applier.dedup);
    assert_eq!(other.export_state(), exported, "deterministic encoding");
    // A retry after the import gets the first result, not a second apply.
    let retry = Value::Batch(Arc::new(Batch {
        commands: vec![keyed(7, 1, b"a")],
        timestamp_ms: 0,
        seed: 0,
    }));
    let mut replies = Vec::new();
    other.apply(2, &retry, &mut replies);
    assert_eq!(other.machine.applied, 2, "not applied again");
    for damaged in [
        &exported[..exported.len() - 1],
        &exported[1..],
        &[exported.as_slice(), b"x"].concat()[..],
    ] {
        let mut fresh = Applier::new(1, Counter { applied: 0 });
        assert!(fresh.import_state(damaged).is_err());
        assert_eq!(fresh.applied_index, 0, "nothing changes on error");
    }
}

#[test]
fn amnesic_replica_learns_but_never_votes() {
    let durable = DurableState {
        amnesic: true,
        ..DurableState::default()
    };
    let mut replica = Replica::restart(2, three(), Params::default(), SEED, durable);
    assert!(replica.status().amnesic);
    // No campaign of its own, ever.
    for _ in 0..3 * Params::default().election_ticks_max {
        let actions = tick(&mut replica);
        assert!(sends(&actions).is_empty(), "{actions:?}");
    }
    // No pre-vote grant and no promise.
    let actions = replica.step(message(1, Message::PreVote { round: 1 }));
    assert_eq!(
        sends(&actions),
        vec![(
            1,
            Message::PreVoteReply {
                round: 1,
                granted: false,
                promised: Ballot::ZERO
            }
        )]
    );
    let b = ballot(1, 1);
    let actions = replica.step(message(
        1,
        Message::Prepare {
            ballot: b,
            first_slot: 1,
        },
    ));
    assert_eq!(actions, vec![]);
    // Accepts are stored (to learn commits) but never acknowledged.
    let value = batch(b"v", 1);
    let actions = replica.step(message(
        1,
        Message::Accept {
            ballot: b,
            slot: 1,
            value: value.clone(),
            chosen_index: 0,
        },
    ));
    let after = persist_all(&mut replica, &actions);
    assert!(!sends(&after)
        .iter()
        .any(|(_, msg)| matches!(msg, Message::Accepted { .. })));
    let actions = replica.step(message(
        1,
        Message::Heartbeat {
            ballot: b,
            seq: 1,
            chosen_index: 1,
        },
    ));
    assert!(actions.contains(&Action::Apply { slot: 1, value }));
}

#[test]
fn restart_after_an_install_whose_compaction_was_lost_trusts_no_covered_entry() {
    // Slot 1 holds a value this replica accepted that lost; a snapshot at 2 was then
    // installed from a peer, and the crash came before the compaction was durable.
    let mut durable = DurableState {
        snapshot_slot: 2,
        log_start: 1,
        chosen_index: 0,
        ..DurableState::default()
    };
    durable.log.insert(
        1,
        LogEntry {
            ballot: ballot(1, 1),
            value: batch(b"lost", 1),
            chosen: false,
        },
    );
    durable.log.insert(
        3,
        LogEntry {
            ballot: ballot(2, 1),
            value: batch(b"after", 3),
            chosen: false,
        },
    );
    let mut replica = Replica::restart(2, three(), Params::default(), SEED, durable);
    assert_eq!(replica.entry(1), None, "never reported as chosen");
    assert!(!replica.entry(3).expect("kept").chosen);
    let status = replica.status();
    assert_eq!(
        (status.log_start, status.chosen_index, status.applied_index),
        (3, 2, 2)
    );
    // The lost compaction is redone first thing.
    assert_eq!(tick(&mut replica), vec![Action::Compact { below: 3 }]);
}

#[test]
fn acceptor_makes_no_promise_too_large_to_send() {
    let entry_bytes = 64;
    let params = Params {
        promise_bytes_max: 2 * entry_bytes,
        ..Params::default()
    };
    let mut acceptor = Replica::new(2, three(), params, SEED);
    let leader = ballot(1, 1);
    for slot in 1..=5 {
        let actions = acceptor.step(message(
            1,
            Message::Accept {
                ballot: leader,
                slot,
                value: batch(&[b'x'; 64], slot),
                chosen_index: 0,
            },
        ));
        persist_all(&mut acceptor, &actions);
    }
    // The leader falls silent long enough for other candidates to be heard.
    for _ in 0..Params::default().election_ticks_min {
        tick(&mut acceptor);
    }
    // A candidate that would need all five entries (5 × entry_bytes > the bound):
    // no promise, no persist, and the ballot stays.
    let actions = acceptor.step(message(
        3,
        Message::Prepare {
            ballot: ballot(2, 3),
            first_slot: 1,
        },
    ));
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Persist { .. })),
        "{actions:?}"
    );
    assert!(sends(&actions).is_empty(), "{actions:?}");
    assert_eq!(acceptor.status().promised, leader);
    // One that needs the last two: promised as usual, with both entries.
    let actions = acceptor.step(message(
        3,
        Message::Prepare {
            ballot: ballot(3, 3),
            first_slot: 4,
        },
    ));
    assert_eq!(acceptor.status().promised, ballot(3, 3));
    let replies = sends(&persist_all(&mut acceptor, &actions));
    assert!(
        replies.iter().any(|(to, msg)| *to == 3
            && matches!(msg, Message::Promise { first_slot: 4, entries, .. } if entries.len() == 2)),
        "{replies:?}"
    );
}

/// The stuck state of harsh seed 302280 (see also `reconfig_tests`): new voters that
/// never learned their promotion was chosen take themselves for learners and never
/// campaign, and the old voters that know it are learners now. A learner that hears
/// no leader asks one member what was chosen; any replica answers from its chosen
/// prefix (or with a snapshot once compacted), leading or not.
#[test]
fn learner_without_a_leader_asks_what_was_chosen_and_any_replica_answers() {
    let old = Configuration::with_learners([1, 2, 3], [4]);
    let new = Configuration::with_learners([2, 3, 4], [1]);
    let joint = old.joint_to(&new);
    let values = [joint, new.clone()].map(|config| Value::Configuration(Arc::new(config)));
    let chosen_log = || -> BTreeMap<Slot, LogEntry> {
        (1..=2)
            .map(|slot| {
                let entry = LogEntry {
                    ballot: ballot(1, 1),
                    value: values[slot as usize - 1].clone(),
                    chosen: true,
                };
                (slot, entry)
            })
            .collect()
    };
    // Replica 1 led the change and stepped down: it knows C(new) is chosen.
    let durable = DurableState {
        promised: ballot(1, 1),
        log: chosen_log(),
        chosen_index: 2,
        ..DurableState::default()
    };
    let mut old_leader = Replica::restart(1, old.clone(), Params::default(), SEED, durable);
    assert_eq!(old_leader.status().membership, Membership::Learner);
    tick(&mut old_leader);

    let mut learner = Replica::new(4, old.clone(), Params::default(), SEED);
    let probe = (0..Params::default().election_ticks_max)
        .map(|_| tick(&mut learner))
        .find(|actions| !actions.is_empty())
        .expect("a learner without a leader asks within an election timeout");
    let asked = Message::Learned {
        ballot: Ballot::ZERO,
        chosen_index: 0,
    };
    let [Action::Send { to, msg }] = &probe[..] else {
        panic!("one question, no campaign: {probe:?}")
    };
    assert!([1, 2, 3].contains(to), "asks a member: {to}");
    assert_eq!(msg, &asked);

    // A replica that does not lead answers from its chosen prefix.
    let answer = Message::Chosen {
        ballot: Ballot::ZERO,
        entries: vec![(1, values[0].clone()), (2, values[1].clone())],
        chosen_index: 2,
    };
    assert_eq!(
        old_leader.step(message(4, asked.clone())),
        vec![Action::Send {
            to: 4,
            msg: answer.clone()
        }]
    );
    let actions = learner.step(message(1, answer));
    assert!(sends(&actions).contains(&(
        1,
        Message::Learned {
            ballot: Ballot::ZERO,
            chosen_index: 2
        }
    )));
    assert_eq!(learner.configuration(), &new);
    assert_eq!(learner.status().membership, Membership::Voter);
    // Caught up: no further chunk.
    let caught_up = Message::Learned {
        ballot: Ballot::ZERO,
        chosen_index: 2,
    };
    assert_eq!(old_leader.step(message(4, caught_up)), vec![]);
    // Now a voter, it campaigns.
    let campaign = (0..Params::default().election_ticks_max)
        .flat_map(|_| tick(&mut learner))
        .find(|action| {
            matches!(
                action,
                Action::Send {
                    msg: Message::PreVote { .. },
                    ..
                }
            )
        });
    assert!(campaign.is_some(), "the promoted voter never campaigned");

    // Compacted past what the learner lacks: the answer is a snapshot transfer.
    let durable = DurableState {
        promised: ballot(1, 1),
        chosen_index: 2,
        snapshot_slot: 2,
        log_start: 3,
        ..DurableState::default()
    };
    let mut compacted = Replica::restart(1, new, Params::default(), SEED, durable);
    tick(&mut compacted);
    assert_eq!(
        compacted.step(message(4, asked)),
        vec![Action::SendSnapshot { to: 4, slot: 1 }]
    );
}

/// A state machine that numbers what it applies and remembers the groups
/// `apply_all` got.
#[derive(Default)]
struct Grouping {
    applied: u64,
    log: Vec<Vec<u8>>,
    groups: Vec<usize>,
}

impl StateMachine for Grouping {
    fn apply(&mut self, payload: &[u8], _context: &ApplyContext) -> Vec<u8> {
        self.applied += 1;
        self.log.push(payload.to_vec());
        let mut result = payload.to_vec();
        result.extend_from_slice(&self.applied.to_le_bytes());
        result
    }

    fn apply_all(
        &mut self,
        payloads: &[&[u8]],
        context: &ApplyContext,
        results: &mut Vec<Vec<u8>>,
    ) {
        self.groups.push(payloads.len());
        for payload in payloads {
            results.push(self.apply(payload, context));
        }
    }
}

/// The applier's loop before commands were grouped: check, apply, record, one
/// command at a time. The reference the grouped applier must equal.
fn apply_one_by_one(
    dedup: &mut DedupTable,
    machine: &mut Grouping,
    slot: Slot,
    batch: &Batch,
) -> Vec<(RequestId, Vec<u8>)> {
    let context = ApplyContext {
        slot,
        timestamp_ms: batch.timestamp_ms,
        seed: batch.seed,
    };
    let mut replies = Vec::new();
    for command in &batch.commands {
        let result = match command.idempotency_key {
            None => machine.apply(&command.payload, &context),
            Some(key) => match dedup.check(key) {
                DedupCheck::Duplicate(result) => result.to_vec(),
                DedupCheck::Stale => STALE_RESULT.to_vec(),
                DedupCheck::New => {
                    let result = machine.apply(&command.payload, &context);
                    dedup.record(key, slot, result.clone());
                    result
                }
            },
        };
        replies.push((command.origin.request, result));
    }
    replies
}

/// Random slots of keyed commands (new, repeated and stale sequence numbers, many
/// clients against a small dedup bound, so entries are evicted) and unkeyed ones:
/// the grouped applier gives every reply, applies every command in the same order
/// and ends with the same dedup table as one command at a time.
#[test]
fn grouped_apply_gives_the_results_of_one_command_at_a_time() {
    let mut grouped_calls = 0;
    for seed in 0..300u64 {
        let mut rng = SplitMix64::new(seed);
        let clients_max = 1 + (rng.next_u64() % 6) as usize;
        let mut applier = Applier::new(1, Grouping::default());
        applier.dedup = DedupTable::new(clients_max);
        let (mut dedup, mut machine) = (DedupTable::new(clients_max), Grouping::default());
        let mut seqs: BTreeMap<u64, u64> = BTreeMap::new();
        let mut request = 0;
        for slot in 1..=25 {
            let commands = (0..rng.next_u64() % 12)
                .map(|_| {
                    request += 1;
                    let client = rng.next_u64() % 8;
                    let last = seqs.entry(client).or_insert(0);
                    let idempotency_key = match rng.next_u64() % 5 {
                        0 => None,
                        1 if *last > 0 => Some(*last),     // a retry
                        2 if *last > 1 => Some(*last - 1), // stale
                        _ => {
                            *last += 1;
                            Some(*last)
                        }
                    }
                    .map(|seq| IdempotencyKey { client, seq });
                    Command {
                        payload: format!("c{request}").into_bytes(),
                        idempotency_key,
                        origin: Origin { node: 1, request },
                    }
                })
                .collect();
            let batch = Batch {
                commands,
                timestamp_ms: 0,
                seed: 0,
            };
            let expected = apply_one_by_one(&mut dedup, &mut machine, slot, &batch);
            let mut replies = Vec::new();
            applier.apply(slot, &Value::Batch(Arc::new(batch)), &mut replies);
            assert_eq!(replies, expected, "seed {seed} slot {slot}");
            assert_eq!(applier.dedup, dedup, "seed {seed} slot {slot}");
        }
        assert_eq!(applier.machine.log, machine.log, "seed {seed}");
        grouped_calls += applier.machine.groups.iter().filter(|&&n| n > 1).count();
    }
    assert!(
        grouped_calls > 1000,
        "groups of two or more: {grouped_calls}"
    );
}
