use super::*;

const SESSION: u64 = 3_000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn join_request(member: &str, assignor: Assignor, owned: Vec<TopicPartition>) -> GroupRequest {
    assert!(owned.is_empty(), "use join_owning");
    join_owning(member, assignor, owned, 0)
}

/// A join from a member that owns `owned` since `generation`.
fn join_owning(
    member: &str,
    assignor: Assignor,
    owned: Vec<TopicPartition>,
    generation: u64,
) -> GroupRequest {
    GroupRequest::Join {
        group: "g".into(),
        join: JoinRequest {
            member: member.into(),
            topics: BTreeMap::from([("t".to_string(), 6)]),
            assignor,
            session_timeout_ms: SESSION,
            rebalance_timeout_ms: 5_000,
            heartbeat_interval_ms: 1_000,
            owned_generation: generation,
            owned,
        },
    }
}

/// Runs `actions`, storing every record at once, and returns the replies.
fn settle(
    c: &mut Coordinator,
    mut actions: Vec<Action>,
    now: Duration,
) -> BTreeMap<RequestId, Result<GroupResponse, GroupError>> {
    let mut replies = BTreeMap::new();
    while !actions.is_empty() {
        let mut next = Vec::new();
        for action in actions {
            match action {
                Action::Reply { id, answer } => {
                    replies.insert(id, answer);
                }
                Action::Persist { token, .. } => next.extend(c.persisted(token, Ok(()), now)),
            }
        }
        actions = next;
    }
    replies
}

fn generation_of(answer: &Result<GroupResponse, GroupError>) -> u64 {
    match answer {
        Ok(GroupResponse::Joined { generation, .. }) => *generation,
        other => panic!("expected Joined, got {other:?}"),
    }
}

fn assignment_of(
    c: &mut Coordinator,
    member: &str,
    generation: u64,
    now: Duration,
) -> Vec<TopicPartition> {
    let request = GroupRequest::Sync {
        group: "g".into(),
        member: member.into(),
        generation,
    };
    match c.handle(0, request, now).pop() {
        Some(Action::Reply {
            answer: Ok(GroupResponse::Synced { assignment, .. }),
            ..
        }) => assignment,
        other => panic!("sync failed: {other:?}"),
    }
}

/// Three members join; returns the generation they all end in.
fn three_members(c: &mut Coordinator, assignor: Assignor) -> u64 {
    // a's join ends a round at once (it is alone); b and c join while its
    // generation is stored, so a must rejoin for the next round to end.
    let mut actions = c.handle(1, join_request("a", assignor, vec![]), ms(0));
    actions.extend(c.handle(2, join_request("b", assignor, vec![]), ms(1)));
    actions.extend(c.handle(3, join_request("c", assignor, vec![]), ms(2)));
    let replies = settle(c, actions, ms(2));
    assert_eq!(generation_of(&replies[&1]), 1);
    assert!(!replies.contains_key(&2), "b waits for a to rejoin");
    let actions = c.handle(4, join_request("a", assignor, vec![]), ms(2));
    let replies = settle(c, actions, ms(2));
    let generation = generation_of(&replies[&4]);
    assert_eq!(generation, 2);
    assert_eq!(generation_of(&replies[&2]), generation);
    assert_eq!(generation_of(&replies[&3]), generation);
    generation
}

fn assert_each_partition_once(assignments: &[Vec<TopicPartition>]) {
    let mut seen = BTreeSet::new();
    for tps in assignments {
        for tp in tps {
            assert!(
                seen.insert(tp.clone()),
                "{tp:?} assigned twice: {assignments:?}"
            );
        }
    }
    assert_eq!(seen.len(), 6, "every partition assigned: {assignments:?}");
}

#[test]
fn every_partition_has_one_owner_in_a_generation_with_each_assignor() {
    for assignor in [
        Assignor::Range,
        Assignor::RoundRobin,
        Assignor::CooperativeSticky,
    ] {
        let mut c = Coordinator::new();
        let generation = three_members(&mut c, assignor);
        let now = ms(3);
        let mut assignments: Vec<Vec<TopicPartition>> = ["a", "b", "c"]
            .iter()
            .map(|m| assignment_of(&mut c, m, generation, now))
            .collect();
        if assignor.is_cooperative() {
            // Withheld partitions come in the second round.
            assignments = rejoin_all(&mut c, &["a", "b", "c"], &assignments, generation, now);
        }
        assert_each_partition_once(&assignments);
        for tps in &assignments {
            assert_eq!(tps.len(), 2, "{assignor:?} balanced: {assignments:?}");
        }
    }
}

/// Every member rejoins with what it owns; returns the new assignments.
fn rejoin_all(
    c: &mut Coordinator,
    members: &[&str],
    owned: &[Vec<TopicPartition>],
    generation: u64,
    now: Duration,
) -> Vec<Vec<TopicPartition>> {
    let mut actions = Vec::new();
    for (i, m) in members.iter().enumerate() {
        actions.extend(c.handle(
            100 + i as u64,
            join_owning(m, Assignor::CooperativeSticky, owned[i].clone(), generation),
            now,
        ));
    }
    let replies = settle(c, actions, now);
    let next = generation_of(&replies[&100]);
    assert!(next > generation);
    members
        .iter()
        .map(|m| assignment_of(c, m, next, now))
        .collect()
}

#[test]
fn range_gives_contiguous_ranges_and_round_robin_deals_in_turn() {
    let subs: BTreeMap<MemberId, BTreeSet<String>> = ["a", "b"]
        .iter()
        .map(|m| (m.to_string(), BTreeSet::from(["t".to_string()])))
        .collect();
    let counts = BTreeMap::from([("t".to_string(), 5)]);
    let range = assign_range(&subs, &counts);
    let tp = |p| ("t".to_string(), p);
    assert_eq!(range["a"], vec![tp(0), tp(1), tp(2)]);
    assert_eq!(range["b"], vec![tp(3), tp(4)]);
    let rr = assign_round_robin(&subs, &counts);
    assert_eq!(rr["a"], vec![tp(0), tp(2), tp(4)]);
    assert_eq!(rr["b"], vec![tp(1), tp(3)]);
}

#[test]
fn sticky_keeps_owned_partitions_and_moves_only_what_balance_needs() {
    let subs = |ms: &[&str]| -> BTreeMap<MemberId, BTreeSet<String>> {
        ms.iter()
            .map(|m| (m.to_string(), BTreeSet::from(["t".to_string()])))
            .collect()
    };
    let counts = BTreeMap::from([("t".to_string(), 12)]);
    let first = assign_sticky(&subs(&["a", "b"]), &counts, &BTreeMap::new());
    let mut owned = first.clone();
    owned.insert("c".into(), Vec::new());
    let second = assign_sticky(&subs(&["a", "b", "c"]), &counts, &owned);
    for m in ["a", "b"] {
        assert_eq!(second[m].len(), 4);
        assert!(
            second[m].iter().all(|tp| first[m].contains(tp)),
            "{m} kept its own"
        );
    }
    assert_eq!(second["c"].len(), 4);
}

#[test]
fn a_stale_generation_or_a_foreign_partition_cannot_commit() {
    let mut c = Coordinator::new();
    let generation = three_members(&mut c, Assignor::Range);
    let now = ms(10);
    let mine = assignment_of(&mut c, "a", generation, now);
    let theirs = assignment_of(&mut c, "b", generation, now);
    let commit = |member: &str, generation, tp: &TopicPartition| GroupRequest::Commit {
        group: "g".into(),
        member: Some((member.into(), generation)),
        offsets: vec![(tp.clone(), 7)],
    };
    let stale = c.handle(1, commit("a", generation - 1, &mine[0]), now);
    assert!(matches!(
        &stale[..],
        [Action::Reply {
            answer: Err(GroupError::IllegalGeneration { .. }),
            ..
        }]
    ));
    let foreign = c.handle(2, commit("a", generation, &theirs[0]), now);
    assert!(matches!(
        &foreign[..],
        [Action::Reply {
            answer: Err(GroupError::NotAssigned(..)),
            ..
        }]
    ));
    assert_eq!(c.committed("g", &theirs[0]), None);
    // A commit is answered only once its record is stored.
    let good = c.handle(3, commit("a", generation, &mine[0]), now);
    assert!(matches!(&good[..], [Action::Persist { .. }]));
    assert_eq!(c.committed("g", &mine[0]), None);
    let replies = settle(&mut c, good, now);
    assert_eq!(replies[&3], Ok(GroupResponse::Committed));
    assert_eq!(c.committed("g", &mine[0]), Some(7));
    // An admin commit waits until the group is empty.
    let admin = GroupRequest::Commit {
        group: "g".into(),
        member: None,
        offsets: vec![(mine[0].clone(), 0)],
    };
    let refused = c.handle(4, admin, now);
    assert!(matches!(
        &refused[..],
        [Action::Reply {
            answer: Err(GroupError::GroupNotEmpty(3)),
            ..
        }]
    ));
}

#[test]
fn a_silent_member_is_removed_after_its_session_and_the_others_take_its_partitions() {
    let mut c = Coordinator::new();
    let generation = three_members(&mut c, Assignor::RoundRobin);
    let heartbeat = |m: &str, g| GroupRequest::Heartbeat {
        group: "g".into(),
        member: m.into(),
        generation: g,
    };
    // a and b heartbeat; c falls silent.
    let mut now = ms(0);
    let mut rebalancing = false;
    while now < ms(SESSION + 1_000) && !rebalancing {
        now += ms(500);
        let tick = c.tick(now);
        settle(&mut c, tick, now);
        for m in ["a", "b"] {
            let answer = c.handle(9, heartbeat(m, generation), now);
            rebalancing |= matches!(
                &answer[..],
                [Action::Reply {
                    answer: Err(GroupError::RebalanceInProgress),
                    ..
                }]
            );
        }
    }
    assert!(
        rebalancing,
        "the group rebalances once c's session has expired"
    );
    assert!(
        now > ms(SESSION),
        "not before the session timeout ({now:?})"
    );
    let mut actions = c.handle(20, join_request("a", Assignor::RoundRobin, vec![]), now);
    actions.extend(c.handle(21, join_request("b", Assignor::RoundRobin, vec![]), now));
    let replies = settle(&mut c, actions, now);
    let next = generation_of(&replies[&20]);
    assert_eq!(next, generation + 1);
    let assignments: Vec<_> = ["a", "b"]
        .iter()
        .map(|m| assignment_of(&mut c, m, next, now))
        .collect();
    assert_each_partition_once(&assignments);
    let late = c.handle(22, heartbeat("c", generation), now);
    assert!(matches!(
        &late[..],
        [Action::Reply {
            answer: Err(GroupError::UnknownMember(_)),
            ..
        }]
    ));
}

#[test]
fn cooperative_moves_never_give_a_partition_two_owners_at_once() {
    let mut c = Coordinator::new();
    let assignor = Assignor::CooperativeSticky;
    let actions = c.handle(1, join_request("a", assignor, vec![]), ms(0));
    let g1 = generation_of(&settle(&mut c, actions, ms(0))[&1]);
    let a1 = assignment_of(&mut c, "a", g1, ms(0));
    assert_eq!(a1.len(), 6);
    // b joins: a keeps consuming everything while the round runs, then
    // gives up half; b gets that half only in the following generation.
    let mut actions = c.handle(2, join_request("b", assignor, vec![]), ms(10));
    actions.extend(c.handle(3, join_owning("a", assignor, a1.clone(), g1), ms(10)));
    let replies = settle(&mut c, actions, ms(10));
    let g2 = generation_of(&replies[&2]);
    let a2 = assignment_of(&mut c, "a", g2, ms(10));
    let b2 = assignment_of(&mut c, "b", g2, ms(10));
    assert_eq!(a2.len(), 3, "a gives up half");
    assert!(b2.is_empty(), "b waits until a has given them up: {b2:?}");
    // a commits a partition it gives up, in the new generation: nobody owns it yet.
    let given_up = a1
        .iter()
        .find(|tp| !a2.contains(tp))
        .expect("one moves")
        .clone();
    let commit = GroupRequest::Commit {
        group: "g".into(),
        member: Some(("a".into(), g2)),
        offsets: vec![(given_up.clone(), 9)],
    };
    let actions = c.handle(5, commit.clone(), ms(15));
    assert_eq!(
        settle(&mut c, actions, ms(15))[&5],
        Ok(GroupResponse::Committed)
    );
    let heartbeat = GroupRequest::Heartbeat {
        group: "g".into(),
        member: "a".into(),
        generation: g2,
    };
    assert!(matches!(
        &c.handle(4, heartbeat, ms(20))[..],
        [Action::Reply {
            answer: Err(GroupError::RebalanceInProgress),
            ..
        }]
    ));
    let assignments = rejoin_all(&mut c, &["a", "b"], &[a2.clone(), b2], g2, ms(30));
    assert_eq!(assignments[0], a2, "a keeps what it kept");
    assert_each_partition_once(&assignments);
    assert!(assignments[1].contains(&given_up));
    // Once b owns it, a cannot move it any more.
    let g3 = c.generation("g");
    let late = GroupRequest::Commit {
        group: "g".into(),
        member: Some(("a".into(), g3)),
        offsets: vec![(given_up, 10)],
    };
    assert!(matches!(
        &c.handle(6, late, ms(31))[..],
        [Action::Reply {
            answer: Err(GroupError::NotAssigned(..)),
            ..
        }]
    ));
}

#[test]
fn a_new_coordinator_continues_generations_and_offsets_from_the_log() {
    let mut log = Vec::new();
    let mut c = Coordinator::new();
    let mut actions = c.handle(1, join_request("a", Assignor::Range, vec![]), ms(0));
    while let Some(action) = actions.pop() {
        if let Action::Persist { token, record } = action {
            log.push(record);
            actions.extend(c.persisted(token, Ok(()), ms(0)));
        }
    }
    let generation = c.generation("g");
    let commit = GroupRequest::Commit {
        group: "g".into(),
        member: Some(("a".into(), generation)),
        offsets: vec![(("t".into(), 0), 42)],
    };
    for action in c.handle(2, commit, ms(1)) {
        if let Action::Persist { token, record } = action {
            log.push(record);
            c.persisted(token, Ok(()), ms(1));
        }
    }
    let mut next = Coordinator::new();
    for record in &log {
        next.load(record);
    }
    assert_eq!(next.committed("g", &("t".into(), 0)), Some(42));
    // It does not know who owns what in the loaded generation: its members
    // may still commit in it until the next generation is stored; older
    // generations may not.
    let commit_in = |generation| GroupRequest::Commit {
        group: "g".into(),
        member: Some(("a".into(), generation)),
        offsets: vec![(("t".into(), 0), 50)],
    };
    assert!(matches!(
        &next.handle(3, commit_in(generation), ms(0))[..],
        [Action::Persist { .. }]
    ));
    assert!(matches!(
        &next.handle(5, commit_in(generation - 1), ms(0))[..],
        [Action::Reply {
            answer: Err(GroupError::UnknownMember(_)),
            ..
        }]
    ));
    // The new coordinator does not know the members: its first round waits
    // for the others to rejoin (two heartbeat intervals) before it ends.
    let actions = next.handle(4, join_request("a", Assignor::Range, vec![]), ms(0));
    assert!(
        settle(&mut next, actions, ms(0)).is_empty(),
        "the round waits"
    );
    let actions = next.tick(ms(2_600));
    let rejoined = generation_of(&settle(&mut next, actions, ms(2_600))[&4]);
    assert!(
        rejoined > generation,
        "generations never repeat across coordinators"
    );
    assert!(matches!(
        &next.handle(6, commit_in(generation), ms(2_700))[..],
        [Action::Reply {
            answer: Err(GroupError::IllegalGeneration { .. }),
            ..
        }]
    ));
}

#[test]
fn a_failed_store_answers_not_stored_and_changes_nothing() {
    let mut c = Coordinator::new();
    let actions = c.handle(1, join_request("a", Assignor::Range, vec![]), ms(0));
    let [Action::Persist { token, .. }] = &actions[..] else {
        panic!("expected one record to store: {actions:?}");
    };
    let answer = c.persisted(*token, Err("leader moved".into()), ms(1));
    assert!(matches!(
        &answer[..],
        [
            Action::Reply {
                answer: Err(GroupError::NotStored(_)),
                ..
            },
            ..
        ]
    ));
    assert_eq!(
        c.generation("g"),
        1,
        "a generation that may be stored is never reused"
    );
}

#[test]
fn a_claim_from_a_missed_generation_does_not_keep_a_partition_from_its_owner() {
    let mut c = Coordinator::new();
    let assignor = Assignor::CooperativeSticky;
    let actions = c.handle(1, join_request("a", assignor, vec![]), ms(0));
    let g1 = generation_of(&settle(&mut c, actions, ms(0))[&1]);
    let all = assignment_of(&mut c, "a", g1, ms(0));
    // "b" claims partitions it held in an older generation (it was cut off);
    // a's claim, from the current generation, wins: nothing moves to b
    // before a gives it up.
    let mut actions = c.handle(2, join_owning("b", assignor, all.clone(), g1 - 1), ms(10));
    actions.extend(c.handle(3, join_owning("a", assignor, all.clone(), g1), ms(10)));
    let g2 = generation_of(&settle(&mut c, actions, ms(10))[&2]);
    assert!(assignment_of(&mut c, "b", g2, ms(10)).is_empty());
    assert_eq!(assignment_of(&mut c, "a", g2, ms(10)).len(), 3);
}

#[test]
fn a_member_that_leaves_while_its_generation_is_stored_loses_its_share_at_once() {
    let mut c = Coordinator::new();
    let generation = three_members(&mut c, Assignor::Range);
    // Everyone rejoins; the round ends and its record is being stored when c leaves.
    let mut actions = Vec::new();
    for (i, m) in ["a", "b", "c"].iter().enumerate() {
        actions.extend(c.handle(
            30 + i as u64,
            join_request(m, Assignor::Range, vec![]),
            ms(100),
        ));
    }
    let persist: Vec<Action> = actions
        .iter()
        .filter(|a| matches!(a, Action::Persist { .. }))
        .cloned()
        .collect();
    assert_eq!(persist.len(), 1, "the round ended: {actions:?}");
    let leave = GroupRequest::Leave {
        group: "g".into(),
        member: "c".into(),
    };
    let left = c.handle(40, leave, ms(101));
    settle(&mut c, left, ms(101));
    let replies = settle(&mut c, persist, ms(102));
    assert_eq!(generation_of(&replies[&30]), generation + 1);
    // c's partitions are not left to nobody: a new round starts at once.
    let heartbeat = GroupRequest::Heartbeat {
        group: "g".into(),
        member: "a".into(),
        generation: generation + 1,
    };
    assert!(matches!(
        &c.handle(41, heartbeat, ms(103))[..],
        [Action::Reply {
            answer: Err(GroupError::RebalanceInProgress),
            ..
        }]
    ));
}
