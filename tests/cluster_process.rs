//! Replicated partitions across real `meshlog node` processes on 127.0.0.1:
//! a partition leader SIGKILLed mid-stream and restarted later loses no
//! acknowledged record, duplicates none, and all replicas agree afterwards.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::cluster::{
    create_replicated, node_id, read_all, signal, spawn, start_cluster, stop_all,
    wait_for_agreement, wait_until,
};
use meshlog::net::NodeId;
use meshlog::{
    Acks, ConsumerConfig, Node, OffsetReset, ProducerConfig, ProducerRecord, RecordMetadata,
};

const TOPIC: &str = "events";
const PARTITIONS: u32 = 6;

/// The records of one batch: `count` records with key `key`, values
/// `{key}-{n}`, and fixed timestamps, so a resend is the same batch.
fn batch(key: &str, first: usize, count: usize) -> Vec<ProducerRecord> {
    (first..first + count)
        .map(|n| {
            ProducerRecord::new(format!("{key}-{n}"))
                .with_key(key)
                .with_timestamp(1_700_000_000_000 + n as i64)
        })
        .collect()
}

/// Every record of a partition, from offset 0 up to the high watermark.
fn all_values(store: &meshlog::store::Store, topic: &str, partition: u32) -> Vec<String> {
    read_all(store, topic, partition)
        .iter()
        .map(|r| String::from_utf8_lossy(r.value()).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_followers_cannot_commit_and_its_suffix_is_dropped() {
    const FENCED: &str = "fenced";
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (tx, _lines) = mpsc::channel();
    let (mut nodes, ids, client) = start_cluster(&dirs, &tx).await;
    create_replicated(&client, FENCED, 1).await;
    let producer = client.producer(ProducerConfig::default());
    let before = batch("before", 0, 20);
    send_until_acked_to(&producer, FENCED, before).await;

    // Freeze both followers: the leader is cut off from them.
    let described = client.describe_topic(FENCED).await.expect("describe");
    let old = described.partitions[0].leader.expect("a leader");
    let old_epoch = described.partitions[0].epoch;
    let leader = ids.iter().position(|id| *id == old).expect("a known node");
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for f in &followers {
        signal(nodes[*f].as_ref().expect("running"), "-STOP");
    }
    let isolated =
        client.producer(ProducerConfig::default().with_delivery_timeout(Duration::from_secs(2)));
    let refused = isolated.send_batch(FENCED, batch("isolated", 0, 5)).await;
    assert!(
        matches!(refused, Err(meshlog::Error::Timeout { .. })),
        "a leader without its quorum cannot acknowledge: {refused:?}"
    );
    let view = client
        .describe_topic_at(old, FENCED)
        .await
        .expect("the old leader answers");
    assert_eq!(
        view.partitions[0].high_watermark, 20,
        "nothing committed without a quorum"
    );

    // Freeze the old leader, wake the followers: they elect a new leader.
    signal(nodes[leader].as_ref().expect("running"), "-STOP");
    let woken = Instant::now();
    for f in &followers {
        signal(nodes[*f].as_ref().expect("running"), "-CONT");
    }
    let candidates: Vec<NodeId> = followers.iter().map(|f| ids[*f]).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let new_leader = loop {
        if let Some(elected) = elected(&client, &candidates, old_epoch).await {
            break elected;
        }
        assert!(Instant::now() < deadline, "no new leader within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let takeover = woken.elapsed();
    println!("a new leader took over {takeover:?} after the followers woke");
    // Election timeout (1 s) + jitter (up to 1 s) + a vote round trip, with slack.
    assert!(
        takeover < Duration::from_secs(4),
        "takeover took {takeover:?}"
    );
    let after = client.producer(ProducerConfig::default());
    send_until_acked_to(&after, FENCED, batch("after", 0, 10)).await;

    // The old leader comes back: it follows and drops its uncommitted suffix.
    signal(nodes[leader].as_ref().expect("running"), "-CONT");
    wait_until(
        "the old leader follows the new one",
        Duration::from_secs(20),
        || async {
            let Ok(mine) = client.describe_topic_at(old, FENCED).await else {
                return false;
            };
            if mine.partitions[0].leader != Some(new_leader) {
                return false;
            }
            // Every replica (the old leader included) has all 30 committed.
            let mut heads = Vec::new();
            for id in &ids {
                match client.describe_topic_at(*id, FENCED).await {
                    Ok(view) if view.partitions[0].high_watermark == 30 => {
                        heads.push(view.partitions[0].head);
                    }
                    _ => return false,
                }
            }
            heads.windows(2).all(|w| w[0] == w[1])
        },
    )
    .await;
    stop_all(client, &mut nodes).await;
    let mut ends = Vec::new();
    for dir in &dirs[..3] {
        let store = meshlog::store::Store::open(dir.path(), true).expect("reopen the store");
        let values = all_values(&store, FENCED, 0);
        assert_eq!(values.len(), 30, "20 before and 10 after: {values:?}");
        assert!(
            values.iter().all(|v| !v.starts_with("isolated")),
            "{values:?}"
        );
        let state = store.partition_state(FENCED, 0).expect("state");
        assert_eq!(
            state.log_end_offset, state.high_watermark,
            "no uncommitted suffix is left"
        );
        ends.push((state.log_end_offset, state.head));
    }
    assert!(
        ends.windows(2).all(|w| w[0] == w[1]),
        "replicas agree: {ends:?}"
    );
}

/// The candidate that reports itself leader of `fenced` in an epoch after `old_epoch`.
async fn elected(client: &Node, candidates: &[NodeId], old_epoch: u64) -> Option<NodeId> {
    for candidate in candidates {
        if let Ok(view) = client.describe_topic_at(*candidate, "fenced").await {
            let p = &view.partitions[0];
            if p.leader == Some(*candidate) && p.epoch > old_epoch {
                return Some(*candidate);
            }
        }
    }
    None
}

/// Sends one batch to `topic` until it is acknowledged.
async fn send_until_acked_to(
    producer: &meshlog::Producer,
    topic: &str,
    records: Vec<ProducerRecord>,
) -> Vec<RecordMetadata> {
    for attempt in 0..20 {
        match producer.send_batch(topic, records.clone()).await {
            Ok(sent) => return sent,
            Err(e) => eprintln!("send attempt {attempt} failed: {e}"),
        }
    }
    panic!("a batch was not acknowledged in 20 attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_loses_no_acknowledged_record_and_replicas_agree() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (tx, _lines) = mpsc::channel();
    let (mut nodes, ids, client) = start_cluster(&dirs, &tx).await;
    create_replicated(&client, TOPIC, PARTITIONS).await;

    let producer = client.producer(ProducerConfig::default().with_acks(Acks::All));
    let keys: Vec<String> = (0..12).map(|k| format!("key{k}")).collect();
    const ROUNDS: usize = 30;
    const PER_BATCH: usize = 10;
    let mut acked: Vec<RecordMetadata> = Vec::new();
    let mut values: BTreeMap<(u32, u64), String> = BTreeMap::new();
    let mut victim: Option<usize> = None;
    let mut killed_at = None;
    let mut failover = None;
    for round in 0..ROUNDS {
        if round == ROUNDS / 3 {
            // SIGKILL the leader of partition 0 mid-stream.
            let leader = client
                .describe_topic(TOPIC)
                .await
                .expect("describe")
                .partitions[0]
                .leader
                .expect("a leader");
            let index = ids
                .iter()
                .position(|id| *id == leader)
                .expect("a known node");
            if let Some(mut process) = nodes[index].take() {
                process.child.kill().expect("SIGKILL");
                process.child.wait().expect("reap");
            }
            victim = Some(index);
            killed_at = Some(Instant::now());
        }
        if round == 2 * ROUNDS / 3
            && let Some(index) = victim
        {
            let alive = nodes.iter().flatten().next().map(|n| n.address.clone());
            let restarted = spawn(index, dirs[index].path(), alive.as_deref(), &tx);
            assert_eq!(
                node_id(&restarted),
                ids[index],
                "same identity after restart"
            );
            nodes[index] = Some(restarted);
        }
        for key in &keys {
            let records = batch(key, round * PER_BATCH, PER_BATCH);
            let sent = send_until_acked_to(&producer, TOPIC, records).await;
            if killed_at.is_some() && failover.is_none() && sent[0].partition == 0 {
                failover = killed_at.map(|k| k.elapsed());
            }
            for (i, meta) in sent.iter().enumerate() {
                values.insert(
                    (meta.partition, meta.offset),
                    format!("{key}-{}", round * PER_BATCH + i),
                );
            }
            acked.extend(sent);
        }
    }
    println!(
        "acknowledged {} records; partition 0 accepted writes again {:?} after its leader was killed",
        acked.len(),
        failover
    );

    // Every replica reports the same committed offset and chain head per partition.
    let mut expected_end = BTreeMap::new();
    for meta in &acked {
        let end = expected_end.entry(meta.partition).or_insert(0u64);
        *end = (*end).max(meta.offset + 1);
    }
    wait_for_agreement(&client, &ids, TOPIC, PARTITIONS, &expected_end).await;
    // A consumer on the light client reads every partition from its
    // replicas over the mesh: each acknowledged record, once, at its offset.
    let mut consumer = client
        .consumer(ConsumerConfig::default().with_auto_offset_reset(OffsetReset::Earliest))
        .expect("consumer");
    consumer.subscribe(&[TOPIC]).expect("subscribe");
    let mut consumed: BTreeMap<(u32, u64), meshlog::chain::MessageId> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while consumed.len() < acked.len() {
        assert!(
            Instant::now() < deadline,
            "consumed {} of {}",
            consumed.len(),
            acked.len()
        );
        for record in consumer.poll(Duration::from_secs(1)).await.expect("poll") {
            let previous = consumed.insert((record.partition, record.offset), record.id);
            assert!(
                previous.is_none(),
                "offset {} delivered twice",
                record.offset
            );
        }
    }
    for meta in &acked {
        assert_eq!(
            consumed.get(&(meta.partition, meta.offset)),
            Some(&meta.id),
            "{meta:?}"
        );
    }
    stop_all(client, &mut nodes).await;

    // Each store holds every acknowledged record exactly once, at its offset.
    for dir in &dirs[..3] {
        let store = meshlog::store::Store::open(dir.path(), true).expect("reopen the store");
        for partition in 0..PARTITIONS {
            let mut seen = BTreeSet::new();
            for record in read_all(&store, TOPIC, partition) {
                let value = String::from_utf8_lossy(record.value()).into_owned();
                assert!(
                    seen.insert(value.clone()),
                    "{value} stored twice in partition {partition}"
                );
                if let Some(expected) = values.get(&(partition, record.offset)) {
                    assert_eq!(
                        &value, expected,
                        "partition {partition} offset {}",
                        record.offset
                    );
                }
            }
            store
                .verify_partition(TOPIC, partition)
                .expect("the chain verifies");
        }
        for meta in &acked {
            let read = store
                .read(TOPIC, meta.partition, meta.offset, 1)
                .expect("read");
            assert_eq!(
                read.records.first().map(|r| r.id),
                Some(meta.id),
                "{meta:?}"
            );
        }
    }
}
