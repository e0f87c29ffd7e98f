
#[test]
fn a_removed_replica_with_a_higher_ballot_cannot_depose_the_leader() {
    let mut net = Net::new(&[1, 2, 3, 4], &[]);
    let leader = net.elect();
    let victim = if leader == 4 { 3 } else { 4 };
    net.tick();
    let outcome = net.change(leader, MembershipChange::Remove(victim));
    assert!(matches!(outcome, Outcome::ChangeAccepted { .. }), "{outcome:?}");
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
    assert!(replica.status().leading.is_some(), "deposed by a removed replica");
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
