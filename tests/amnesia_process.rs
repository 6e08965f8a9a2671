//! A voter that loses its database (its `node.key` kept) while producers
//! write with `acks=all`: restarted, it comes back under a new peer id, so it
//! is a new replica to the mesh (a learner that votes only once caught up);
//! no acknowledged record is lost and no epoch ever has two leaders.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{create_replicated, node_id, read_all, spawn, start_cluster, stop_all};
use meshlog::net::NodeId;
use meshlog::{Acks, Node, ProducerConfig, ProducerRecord, RecordMetadata};

const TOPIC: &str = "kept";
const PARTITIONS: u32 = 3;

/// Who each node says leads each (partition, epoch); fails on two leaders.
#[derive(Default)]
struct Leaders(BTreeMap<(u32, u64), NodeId>);

impl Leaders {
    async fn observe(&mut self, client: &Node, nodes: &[NodeId]) {
        for node in nodes {
            let Ok(view) = client.describe_topic_at(*node, TOPIC).await else {
                continue;
            };
            for p in &view.partitions {
                let Some(leader) = p.leader else { continue };
                let previous = self.0.insert((p.partition, p.epoch), leader);
                assert!(
                    previous.is_none_or(|l| l == leader),
                    "partition {} epoch {}: leaders {previous:?} and {leader}",
                    p.partition,
                    p.epoch
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_that_loses_its_database_rejoins_as_a_new_replica_and_nothing_acknowledged_is_lost()
{
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (tx, _lines) = mpsc::channel();
    let (mut nodes, ids, client) = start_cluster(&dirs, &tx).await;
    create_replicated(&client, TOPIC, PARTITIONS).await;

    // Producers write all along.
    let acked: Arc<Mutex<Vec<RecordMetadata>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let producer = client.producer(
            ProducerConfig::default()
                .with_acks(Acks::All)
                .with_delivery_timeout(Duration::from_secs(20)),
        );
        let (acked, stop) = (acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let records: Vec<ProducerRecord> = (0..10)
                    .map(|i| ProducerRecord::new(format!("v{n}-{i}")).with_key(format!("k{i}")))
                    .collect();
                if let Ok(sent) = producer.send_batch(TOPIC, records).await {
                    acked.lock().unwrap().extend(sent);
                }
                n += 1;
            }
        })
    };
    let mut leaders = Leaders::default();
    let started = Instant::now();
    while acked.lock().unwrap().len() < 500 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "producing is too slow"
        );
        leaders.observe(&client, &ids).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The metadata log gains its voters one at a time from its founder: a
    // permanent loss while it has two would leave it without a quorum for
    // good (the lost identity never comes back), so the loss waits until it
    // has all three.
    common::cluster::wait_until(
        "the metadata log has three voters",
        Duration::from_secs(30),
        || async {
            client.describe_topic("__meta").await.is_ok_and(|t| {
                t.partitions
                    .iter()
                    .all(|p| p.replicas.len() == 3 && p.learners.is_empty())
            })
        },
    )
    .await;

    // The leader of partition 0 loses its database; its identity file stays.
    let leader = client
        .describe_topic(TOPIC)
        .await
        .expect("describe")
        .partitions[0]
        .leader
        .expect("a leader");
    let victim = ids
        .iter()
        .position(|id| *id == leader)
        .expect("a known node");
    if let Some(mut process) = nodes[victim].take() {
        process.child.kill().expect("SIGKILL");
        process.child.wait().expect("reap");
    }
    std::fs::remove_file(dirs[victim].path().join("meshlog.redb")).expect("delete the database");
    assert!(dirs[victim].path().join("node.key").exists());
    let bootstrap = nodes
        .iter()
        .flatten()
        .next()
        .expect("a running node")
        .address
        .clone();
    let restarted = spawn(victim, dirs[victim].path(), Some(&bootstrap), &tx);
    let new = node_id(&restarted);
    assert_ne!(
        new, ids[victim],
        "a node without its database takes a new peer id"
    );
    nodes[victim] = Some(restarted);
    let mut now_ids = ids.clone();
    now_ids[victim] = new;

    // Placement replaces the old identity with the new one in every partition,
    // through a learner that is promoted once it has caught up.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        leaders.observe(&client, &now_ids).await;
        let replaced = client.describe_topic(TOPIC).await.is_ok_and(|t| {
            t.partitions.iter().all(|p| {
                p.replicas.contains(&new)
                    && !p.replicas.contains(&ids[victim])
                    && p.learners.is_empty()
            })
        });
        if replaced {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new identity did not replace the old one in 90 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.expect("the producer task");
    let acked = acked.lock().unwrap().clone();
    println!(
        "{} records acknowledged; {} (partition, epoch) leaderships observed",
        acked.len(),
        leaders.0.len()
    );
    let mut ends = BTreeMap::new();
    for meta in &acked {
        let end = ends.entry(meta.partition).or_insert(0u64);
        *end = (*end).max(meta.offset + 1);
    }
    common::cluster::wait_for_agreement(&client, &now_ids, TOPIC, PARTITIONS, &ends).await;
    stop_all(client, &mut nodes).await;

    // Every replica, the one that lost its database included, holds every
    // acknowledged record once, at its offset.
    for dir in &dirs[..3] {
        let store = meshlog::store::Store::open(dir.path(), true).expect("reopen the store");
        for partition in 0..PARTITIONS {
            let records = read_all(&store, TOPIC, partition);
            let offsets: BTreeSet<u64> = records.iter().map(|r| r.offset).collect();
            assert_eq!(offsets.len(), records.len());
            let by_offset: BTreeMap<u64, _> = records.iter().map(|r| (r.offset, r.id)).collect();
            for meta in acked.iter().filter(|m| m.partition == partition) {
                assert_eq!(by_offset.get(&meta.offset), Some(&meta.id), "{meta:?}");
            }
        }
    }
}
