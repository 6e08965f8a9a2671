//! Consumer groups across real `meshlog node` processes on 127.0.0.1: the
//! coordinator is the leader of the group's `__offsets` partition, members
//! share partitions, a SIGKILLed consumer's partitions move to the others,
//! a SIGKILLed coordinator's node leaves every committed offset intact, and
//! two groups each receive every record.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Line;
use common::cluster::{create_replicated, start_cluster, stop_all};
use meshlog::{
    Acks, Assignor, Consumer, ConsumerConfig, Node, OffsetReset, ProducerConfig, ProducerRecord,
};

const PARTITIONS: u32 = 6;

/// Sends `count` keyed records from `first`; returns (partition, offset) of each.
async fn produce(client: &Node, topic: &str, first: u64, count: u64) -> BTreeSet<(u32, u64)> {
    let producer = client.producer(ProducerConfig {
        acks: Acks::All,
        ..ProducerConfig::default()
    });
    let records: Vec<ProducerRecord> = (first..first + count)
        .map(|n| ProducerRecord::new(format!("v-{n}")).with_key(format!("k{}", n % 50)))
        .collect();
    let mut stored = BTreeSet::new();
    for chunk in records.chunks(500) {
        for meta in producer
            .send_batch(topic, chunk.to_vec())
            .await
            .expect("acknowledged")
        {
            stored.insert((meta.partition, meta.offset));
        }
    }
    stored
}

fn group_consumer(client: &Node, group: &str, assignor: Assignor) -> Consumer {
    let config = ConsumerConfig::default()
        .with_group_id(group)
        .with_auto_offset_reset(OffsetReset::Earliest)
        .with_assignor(assignor)
        .with_session_timeout(Duration::from_secs(3));
    client.consumer(config).expect("a consumer")
}

/// Commits a consumer's positions; a refusal during a rebalance (or after
/// being fenced) leaves them uncommitted, as the API promises.
async fn commit(consumer: &mut Consumer) {
    match consumer.commit().await {
        Ok(()) | Err(meshlog::Error::Group(_)) => {}
        Err(error) => panic!("commit failed: {error}"),
    }
}

/// Polls every consumer in turn until together they received `want`, or
/// fails after `within`. Returns what each received.
async fn consume_all(
    consumers: &mut [Consumer],
    want: &BTreeSet<(u32, u64)>,
    within: Duration,
) -> Vec<Vec<(u32, u64)>> {
    let deadline = Instant::now() + within;
    let mut received: Vec<Vec<(u32, u64)>> = vec![Vec::new(); consumers.len()];
    loop {
        for (i, consumer) in consumers.iter_mut().enumerate() {
            let records = consumer
                .poll(Duration::from_millis(200))
                .await
                .expect("poll");
            received[i].extend(records.iter().map(|r| (r.partition, r.offset)));
            commit(consumer).await;
        }
        let union: BTreeSet<(u32, u64)> = received.iter().flatten().copied().collect();
        if want.is_subset(&union) {
            return received;
        }
        assert!(
            Instant::now() < deadline,
            "received {} of {} records within {within:?}",
            want.intersection(&union).count(),
            want.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_each_receive_every_record_and_members_of_one_share_partitions() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().expect("dir")).collect();
    let (tx, _rx) = mpsc::channel::<Line>();
    let (mut nodes, _ids, client) = start_cluster(&dirs, &tx).await;
    create_replicated(&client, "events", PARTITIONS).await;
    let sent = produce(&client, "events", 0, 600).await;

    // "audit" is one consumer; "billing" is two that share the partitions.
    let mut audit = vec![group_consumer(&client, "audit", Assignor::Range)];
    let mut billing = vec![
        group_consumer(&client, "billing", Assignor::RoundRobin),
        group_consumer(&client, "billing", Assignor::RoundRobin),
    ];
    for consumer in audit.iter_mut().chain(billing.iter_mut()) {
        consumer.subscribe(&["events"]).expect("subscribe");
    }
    let by_audit = consume_all(&mut audit, &sent, Duration::from_secs(60)).await;
    assert_eq!(
        by_audit[0].len(),
        sent.len(),
        "the single member read each record once"
    );
    let mut by_billing = consume_all(&mut billing, &sent, Duration::from_secs(60)).await;
    // The member that joined first read everything alone; poll both until
    // the second one is in and they share one generation.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(billing[0].generation() == billing[1].generation()
        && billing.iter().all(|c| !c.assignment().is_empty()))
    {
        assert!(Instant::now() < deadline, "the two members never settled");
        for (i, consumer) in billing.iter_mut().enumerate() {
            let records = consumer
                .poll(Duration::from_millis(200))
                .await
                .expect("poll");
            by_billing[i].extend(records.iter().map(|r| (r.partition, r.offset)));
            commit(consumer).await;
        }
    }
    let a: BTreeSet<u32> = billing[0].assignment().iter().map(|tp| tp.1).collect();
    let b: BTreeSet<u32> = billing[1].assignment().iter().map(|tp| tp.1).collect();
    assert!(a.is_disjoint(&b), "no partition owned twice: {a:?} {b:?}");
    assert_eq!(a.len() + b.len(), PARTITIONS as usize);
    assert_eq!(a.len(), 3, "round-robin splits evenly");

    // New records go to each partition's one owner.
    let more = produce(&client, "events", 600, 600).await;
    let received = consume_all(&mut billing, &more, Duration::from_secs(60)).await;
    for (i, owned) in [&a, &b].into_iter().enumerate() {
        for (partition, offset) in &received[i] {
            assert!(
                owned.contains(partition),
                "member {i} read {partition}/{offset} it does not own"
            );
        }
    }
    let union: BTreeSet<(u32, u64)> = by_billing
        .iter()
        .chain(&received)
        .flatten()
        .copied()
        .collect();
    let all: BTreeSet<(u32, u64)> = sent.union(&more).copied().collect();
    assert_eq!(union, all);
    let by_audit_more = consume_all(&mut audit, &more, Duration::from_secs(60)).await;
    assert_eq!(
        by_audit_more[0].len(),
        more.len(),
        "audit reads the new records once too"
    );

    let info = client.describe_group("billing").await.expect("describe");
    assert_eq!(info.members.len(), 2);
    assert_eq!(info.state, "Stable");
    let committed: u64 = info.offsets.iter().map(|o| o.committed).sum();
    assert_eq!(committed, all.len() as u64, "every record committed");
    let groups = client.list_groups().await.expect("list");
    assert!(groups.contains(&"audit".to_string()) && groups.contains(&"billing".to_string()));

    for consumer in audit.into_iter().chain(billing) {
        consumer.close().await.expect("close");
    }
    let info = client.describe_group("billing").await.expect("describe");
    assert!(info.members.is_empty(), "close leaves at once: {info:?}");

    // A member subscribed to a topic that does not exist yet rebalances
    // when it appears, and reads it.
    let mut early = vec![group_consumer(&client, "early", Assignor::Range)];
    early[0].subscribe(&["later"]).expect("subscribe");
    assert!(
        early[0]
            .poll(Duration::from_millis(500))
            .await
            .expect("poll")
            .is_empty()
    );
    create_replicated(&client, "later", 2).await;
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    early[0].set_rebalance_listener(Box::new(Recorder(events.clone())));
    let later = produce(&client, "later", 0, 50).await;
    consume_all(&mut early, &later, Duration::from_secs(30)).await;
    assert_eq!(
        early[0].assignment().len(),
        2,
        "both partitions of the new topic"
    );
    let told: Vec<String> = events.lock().expect("events").clone();
    assert_eq!(
        told,
        ["assigned later/0 later/1"],
        "the listener heard of the assignment"
    );

    // A paused partition is not read until resumed.
    early[0].pause(&[("later".to_string(), 0)]);
    let more = produce(&client, "later", 50, 50).await;
    let in_paused: BTreeSet<(u32, u64)> = more.iter().filter(|(p, _)| *p == 0).copied().collect();
    let in_other: BTreeSet<(u32, u64)> = more.difference(&in_paused).copied().collect();
    let read = consume_all(&mut early, &in_other, Duration::from_secs(30)).await;
    assert!(
        read[0].iter().all(|(p, _)| *p != 0),
        "nothing read from the paused partition"
    );
    early[0].resume(&[("later".to_string(), 0)]);
    consume_all(&mut early, &in_paused, Duration::from_secs(30)).await;

    // Asynchronous commits are stored in order: the later one, made after
    // more records were read, wins.
    let first = early[0].commit_async();
    let last = produce(&client, "later", 100, 20).await;
    let mut read = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !last.is_subset(&read) {
        assert!(Instant::now() < deadline, "the last records were not read");
        let records = early[0]
            .poll(Duration::from_millis(200))
            .await
            .expect("poll");
        read.extend(records.iter().map(|r| (r.partition, r.offset)));
    }
    let second = early[0].commit_async();
    first.await.expect("the first commit");
    second.await.expect("the second commit");
    for partition in 0..2 {
        let position = early[0].position("later", partition);
        let committed = early[0]
            .committed("later", partition)
            .await
            .expect("committed");
        assert_eq!(committed, position, "partition {partition}");
    }
    stop_all(client, &mut nodes).await;
}

/// A rebalance listener that writes down what it is told.
struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl meshlog::RebalanceListener for Recorder {
    fn on_partitions_assigned(&mut self, assigned: &[(String, u32)]) {
        let names: Vec<String> = assigned.iter().map(|(t, p)| format!("{t}/{p}")).collect();
        if let Ok(mut events) = self.0.lock() {
            events.push(format!("assigned {}", names.join(" ")));
        }
    }

    fn on_partitions_revoked(
        &mut self,
        revoked: &[(String, u32)],
        _commits: &mut BTreeMap<(String, u32), u64>,
    ) {
        let names: Vec<String> = revoked.iter().map(|(t, p)| format!("{t}/{p}")).collect();
        if let Ok(mut events) = self.0.lock() {
            events.push(format!("revoked {}", names.join(" ")));
        }
    }
}

/// What one `meshlog consume` process printed: records and memberships.
#[derive(Default)]
struct ConsumerOutput {
    member: Option<String>,
    /// (partition, offset) of each record printed, in order.
    records: Vec<(u32, u64)>,
    /// (generation, partitions) as the member reported them.
    generations: Vec<(u64, BTreeSet<u32>)>,
}

/// Reads the lines of the consumer processes into their outputs.
fn collect(lines: &mpsc::Receiver<Line>, outputs: &mut [ConsumerOutput]) {
    while let Ok(line) = lines.try_recv() {
        let output = &mut outputs[line.node];
        if let Some(rest) = line.text.strip_prefix("member ") {
            // "member ID generation G: topic/p topic/p"
            let mut words = rest.split_whitespace();
            output.member = words.next().map(String::from);
            let generation = words
                .nth(1)
                .and_then(|g| g.trim_end_matches(':').parse().ok())
                .expect("a generation");
            let partitions = words
                .filter_map(|tp| tp.rsplit_once('/')?.1.parse().ok())
                .collect();
            output.generations.push((generation, partitions));
        } else if let Some((partition, rest)) = line.text.split_once('\t')
            && let Some((offset, _)) = rest.split_once('\t')
            && let (Ok(partition), Ok(offset)) = (partition.parse(), offset.parse())
        {
            output.records.push((partition, offset));
        }
    }
}

/// A `meshlog consume --group` process bootstrapped at `bootstrap`.
fn spawn_consumer(
    index: usize,
    bootstrap: &str,
    group: &str,
    topic: &str,
    lines: &mpsc::Sender<Line>,
) -> std::process::Child {
    let scratch = std::env::temp_dir();
    let mut child = common::meshlog(&scratch)
        .args([
            "--bootstrap-server",
            bootstrap,
            "consume",
            topic,
            "--group",
            group,
        ])
        .args([
            "--from-beginning",
            "--print-metadata",
            "--session-timeout-ms",
            "3000",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn meshlog consume");
    common::forward(index, child.stdout.take().expect("stdout"), lines.clone());
    common::forward(index, child.stderr.take().expect("stderr"), lines.clone());
    child
}

/// Every generation's partitions are claimed by one member at most.
fn assert_one_owner_per_generation(outputs: &[ConsumerOutput]) {
    let mut owners: BTreeMap<(u64, u32), usize> = BTreeMap::new();
    for (i, output) in outputs.iter().enumerate() {
        for (generation, partitions) in &output.generations {
            for partition in partitions {
                let owner = owners.entry((*generation, *partition)).or_insert(i);
                assert_eq!(
                    *owner, i,
                    "partition {partition} owned by consumers {owner} and {i} in generation {generation}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumers_partitions_move_to_the_others_and_resume_from_its_commits() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().expect("dir")).collect();
    let (node_tx, _node_rx) = mpsc::channel::<Line>();
    let (mut nodes, _ids, client) = start_cluster(&dirs, &node_tx).await;
    let bootstrap = nodes[0].as_ref().expect("node 0").address.clone();
    create_replicated(&client, "orders", PARTITIONS).await;
    let first = produce(&client, "orders", 0, 1200).await;

    let (tx, rx) = mpsc::channel::<Line>();
    let mut children: Vec<std::process::Child> = (0..3)
        .map(|i| spawn_consumer(i, &bootstrap, "workers", "orders", &tx))
        .collect();
    let mut outputs: Vec<ConsumerOutput> = (0..3).map(|_| ConsumerOutput::default()).collect();

    // All three join one generation that covers the six partitions, and
    // together they read the first records.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        collect(&rx, &mut outputs);
        let received: BTreeSet<(u32, u64)> =
            outputs.iter().flat_map(|o| o.records.clone()).collect();
        let info = client.describe_group("workers").await.ok();
        let settled = info.as_ref().is_some_and(|i| {
            i.state == "Stable"
                && i.members.len() == 3
                && i.members.iter().all(|(_, tps)| !tps.is_empty())
                && i.members.iter().map(|(_, tps)| tps.len()).sum::<usize>() == PARTITIONS as usize
        });
        let latest_reported = outputs.iter().all(|o| {
            let generation = o.generations.last().map(|g| g.0);
            generation.is_some() && generation == info.as_ref().map(|i| i.generation)
        });
        if settled && latest_reported && first.is_subset(&received) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group did not settle: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_one_owner_per_generation(&outputs);

    // SIGKILL the member with the most partitions; note what it committed.
    let info = client.describe_group("workers").await.expect("describe");
    let (victim_member, victim_partitions) = info
        .members
        .iter()
        .max_by_key(|(_, tps)| tps.len())
        .cloned()
        .expect("a member");
    let victim = outputs
        .iter()
        .position(|o| o.member.as_deref() == Some(victim_member.as_str()))
        .expect("the victim's process");
    let victim_partitions: BTreeSet<u32> = victim_partitions.iter().map(|tp| tp.1).collect();
    // Kill it while it reads new records, so some it printed are not committed yet.
    let sending = {
        let client = client.clone();
        tokio::spawn(async move { produce(&client, "orders", 1200, 1200).await })
    };
    let printed_before = outputs[victim].records.len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while outputs[victim].records.len() == printed_before {
        assert!(
            Instant::now() < deadline,
            "the victim read none of the new records"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        collect(&rx, &mut outputs);
    }
    children[victim].kill().expect("SIGKILL the consumer");
    let killed_at = Instant::now();
    let committed_at_kill: BTreeMap<u32, u64> = client
        .describe_group("workers")
        .await
        .expect("describe")
        .offsets
        .iter()
        .map(|o| (o.partition, o.committed))
        .collect();
    let second = sending.await.expect("the producer task");

    // Its partitions move to the two others once its session (3 s) expires.
    let mut moved_after = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    let all: BTreeSet<(u32, u64)> = first.union(&second).copied().collect();
    loop {
        collect(&rx, &mut outputs);
        if moved_after.is_none()
            && let Ok(info) = client.describe_group("workers").await
            && info.state == "Stable"
            && info.members.len() == 2
            && info.members.iter().map(|(_, tps)| tps.len()).sum::<usize>() == PARTITIONS as usize
        {
            moved_after = Some(killed_at.elapsed());
        }
        let received: BTreeSet<(u32, u64)> =
            outputs.iter().flat_map(|o| o.records.clone()).collect();
        if moved_after.is_some() && all.is_subset(&received) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the kill: {} of {} records received, moved: {moved_after:?}",
            all.intersection(&received).count(),
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let moved_after = moved_after.expect("moved");
    println!(
        "the killed consumer's partitions moved {moved_after:?} after SIGKILL (session timeout 3 s)"
    );
    // The bound beyond the session: the next heartbeat (1 s), the
    // coordinator's tick, the round and the sync, on a busy 2-core machine.
    assert!(
        moved_after < Duration::from_secs(3 + 5),
        "partitions moved within session timeout + 5 s, took {moved_after:?}"
    );
    assert_one_owner_per_generation(&outputs);

    // At least once: every record; twice only after the dead member's last commit.
    let mut seen: BTreeMap<(u32, u64), usize> = BTreeMap::new();
    for record in outputs.iter().flat_map(|o| o.records.iter()) {
        *seen.entry(*record).or_default() += 1;
    }
    let duplicates: Vec<(u32, u64)> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(r, _)| *r)
        .collect();
    for (partition, offset) in &duplicates {
        assert!(
            victim_partitions.contains(partition),
            "{partition}/{offset} read twice but its partition was not the killed member's"
        );
        assert!(
            *offset >= committed_at_kill.get(partition).copied().unwrap_or(0),
            "{partition}/{offset} read twice though the killed member had committed past it"
        );
    }
    println!(
        "{} records, {} read twice (each after the killed member's last commit)",
        all.len(),
        duplicates.len()
    );

    for (i, child) in children.iter_mut().enumerate() {
        if i != victim {
            common::sigterm(child);
        }
        let _ = child.wait();
    }
    stop_all(client, &mut nodes).await;
}

/// The index of the node that leads `__offsets` partition `partition`.
async fn offsets_leader(
    client: &Node,
    ids: &[meshlog::net::NodeId],
    partition: u32,
) -> Option<usize> {
    let description = client.describe_topic("__offsets").await.ok()?;
    let leader = description.partitions.get(partition as usize)?.leader?;
    ids.iter().position(|id| *id == leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_reforms_on_the_new_coordinator_with_its_offsets_after_a_sigkill() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().expect("dir")).collect();
    let (tx, _rx) = mpsc::channel::<Line>();
    let (mut nodes, ids, client) = start_cluster(&dirs, &tx).await;
    create_replicated(&client, "ledger", PARTITIONS).await;
    let first = produce(&client, "ledger", 0, 600).await;
    // Creates __offsets; then pick a group whose coordinator is not node 0
    // (the client's bootstrap).
    client.list_groups().await.expect("list groups");
    let mut group = String::new();
    let mut coordinator = None;
    for i in 0.. {
        let name = format!("payments-{i}");
        let partition = meshlog::coordinator::offsets_partition(&name);
        let leader = offsets_leader(&client, &ids, partition).await;
        if leader.is_some_and(|l| l != 0) {
            (group, coordinator) = (name, leader);
            break;
        }
        assert!(i < 200, "no __offsets partition led by node 1 or 2");
    }
    let coordinator = coordinator.expect("a coordinator");

    let mut consumers = vec![
        group_consumer(&client, &group, Assignor::CooperativeSticky),
        group_consumer(&client, &group, Assignor::CooperativeSticky),
    ];
    for consumer in &mut consumers {
        consumer.subscribe(&["ledger"]).expect("subscribe");
    }
    consume_all(&mut consumers, &first, Duration::from_secs(60)).await;
    let before = client.describe_group(&group).await.expect("describe");
    let committed_before: BTreeMap<u32, u64> = before
        .offsets
        .iter()
        .map(|o| (o.partition, o.committed))
        .collect();
    assert_eq!(committed_before.values().sum::<u64>(), first.len() as u64);

    nodes[coordinator]
        .as_mut()
        .expect("the coordinator's process")
        .child
        .kill()
        .expect("SIGKILL the coordinator's node");
    let killed_at = Instant::now();

    // The consumers keep polling; the group re-forms on the new leader of
    // its __offsets partition with every committed offset intact.
    let deadline = Instant::now() + Duration::from_secs(60);
    let reformed = loop {
        for consumer in &mut consumers {
            let records = consumer.poll(Duration::from_millis(200)).await;
            assert!(
                records.is_ok_and(|r| r.is_empty()),
                "nothing new to read yet"
            );
        }
        if let Ok(info) = client.describe_group(&group).await
            && info.members.len() == 2
            && info.state == "Stable"
            && info.generation > before.generation
        {
            break info;
        }
        assert!(Instant::now() < deadline, "the group did not re-form");
    };
    println!(
        "the group re-formed {:?} after its coordinator's node was killed",
        killed_at.elapsed()
    );
    let committed_after: BTreeMap<u32, u64> = reformed
        .offsets
        .iter()
        .map(|o| (o.partition, o.committed))
        .collect();
    assert_eq!(
        committed_after, committed_before,
        "committed offsets intact"
    );
    let new_coordinator = offsets_leader(
        &client,
        &ids,
        meshlog::coordinator::offsets_partition(&group),
    )
    .await;
    assert_ne!(new_coordinator, Some(coordinator));

    // Consumption continues from the committed offsets: new records once each.
    let second = produce(&client, "ledger", 600, 600).await;
    let received = consume_all(&mut consumers, &second, Duration::from_secs(60)).await;
    let all: Vec<(u32, u64)> = received.into_iter().flatten().collect();
    let distinct: BTreeSet<(u32, u64)> = all.iter().copied().collect();
    assert_eq!(distinct, second, "exactly the new records");
    assert_eq!(all.len(), second.len(), "none read twice");

    for consumer in consumers {
        consumer.close().await.expect("close");
    }
    client.shutdown().await;
    for process in nodes.iter_mut().flatten() {
        let _ = process.child.kill();
    }
}
