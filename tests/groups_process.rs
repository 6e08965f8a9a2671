//! Consumer groups across real `meshlog node` processes on 127.0.0.1: the
//! coordinator is the leader of the group's `__offsets` partition, members
//! share partitions, a SIGKILLed consumer's partitions move to the others,
//! a SIGKILLed coordinator's node leaves every committed offset intact, and
//! two groups each receive every record.

mod common;

use std::collections::BTreeSet;
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
            consumer.commit().await.expect("commit");
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
            consumer.commit().await.expect("commit");
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
    stop_all(client, &mut nodes).await;
}
