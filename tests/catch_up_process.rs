//! Catch-up from the log start, across real `meshlog node` processes: with a
//! small `retention.bytes`, the first segments expire; a fourth node that
//! joins afterwards restarts each partition it is given at its leader's log
//! start, is sent the log from there, becomes a voter, and holds exactly the
//! committed records of the other replicas from its log start on.

mod common;

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::Duration;

use common::cluster::{client, node_args, node_id, read_all, stop_all, wait_until};
use common::{NodeProcess, spawn_node};
use meshlog::net::NodeId;
use meshlog::{Acks, ProducerConfig, ProducerRecord, Retention, TopicConfig};

const TOPIC: &str = "trimmed";
const PARTITIONS: u32 = 8;

fn spawn(
    index: usize,
    dir: &std::path::Path,
    bootstrap: Option<&str>,
    tx: &mpsc::Sender<common::Line>,
) -> NodeProcess {
    let mut args = node_args();
    args.extend(["--retention-check-interval-ms", "200"].map(String::from));
    spawn_node(index, dir, bootstrap, tx, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joining_after_retention_catches_up_from_the_log_start_and_votes() {
    let dirs: Vec<tempfile::TempDir> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let (tx, _lines) = mpsc::channel();
    let first = spawn(0, dirs[0].path(), None, &tx);
    let bootstrap = first.address.clone();
    let mut nodes = vec![
        Some(first),
        Some(spawn(1, dirs[1].path(), Some(&bootstrap), &tx)),
        Some(spawn(2, dirs[2].path(), Some(&bootstrap), &tx)),
    ];
    let client = client(dirs[4].path(), &bootstrap).await;
    wait_until(
        "the client sees 3 storage nodes",
        Duration::from_secs(30),
        || async { client.live_storage_nodes().await.map_or(0, |n| n.len()) == 3 },
    )
    .await;
    let config = TopicConfig::default()
        .with_partitions(PARTITIONS)
        .with_replication_factor(3)
        .with_segment_bytes(8 * 1024)
        .with_retention(Retention {
            time: None,
            bytes: Some(16 * 1024),
        });
    client
        .create_topic(TOPIC, config)
        .await
        .expect("create the topic");
    wait_until(
        "every partition has a leader",
        Duration::from_secs(30),
        || async {
            client
                .describe_topic(TOPIC)
                .await
                .is_ok_and(|t| t.partitions.iter().all(|p| p.leader.is_some()))
        },
    )
    .await;

    // Far more than the retained bytes and than a replica keeps in memory
    // (a batch per partition each round: 300 entries per partition).
    let producer = client.producer(ProducerConfig::default().with_acks(Acks::All));
    for n in 0..300 {
        let records: Vec<ProducerRecord> = (0..PARTITIONS)
            .flat_map(|p| {
                (0..2).map(move |i| {
                    ProducerRecord::new(format!("{p}-{n}-{i}-{}", "x".repeat(200)))
                        .with_partition(p)
                })
            })
            .collect();
        producer
            .send_batch(TOPIC, records)
            .await
            .expect("acknowledged");
    }
    wait_until(
        "retention dropped the first segments of every partition",
        Duration::from_secs(30),
        || async {
            client
                .describe_topic(TOPIC)
                .await
                .is_ok_and(|t| t.partitions.iter().all(|p| p.log_start_offset > 0))
        },
    )
    .await;

    // A fourth node joins; placement gives it some of the partitions.
    let fourth = spawn(3, dirs[3].path(), Some(&bootstrap), &tx);
    let new = node_id(&fourth);
    nodes.push(Some(fourth));
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let moved: Vec<u32> = loop {
        if let (Ok(mine), Ok(theirs)) = (
            client.describe_topic_at(new, TOPIC).await,
            client.describe_topic(TOPIC).await,
        ) {
            let moved: Vec<u32> = (0..PARTITIONS)
                .filter(|p| mine.partitions[*p as usize].replicas.contains(&new))
                .collect();
            let caught_up = moved.iter().all(|p| {
                let (m, t) = (
                    &mine.partitions[*p as usize],
                    &theirs.partitions[*p as usize],
                );
                t.replicas.contains(&new)
                    && m.high_watermark == t.high_watermark
                    && m.head == t.head
            });
            if !moved.is_empty() && caught_up {
                break moved;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the fourth node does not vote, caught up, in any partition within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("partitions moved to the new node: {moved:?}");
    let ids: Vec<NodeId> = nodes.iter().flatten().map(node_id).collect();
    stop_all(client, &mut nodes).await;

    // Its records are the committed records of the others, from its log start.
    let stores: Vec<meshlog::store::Store> = dirs[..4]
        .iter()
        .map(|d| meshlog::store::Store::open(d.path(), true).expect("reopen the store"))
        .collect();
    for p in &moved {
        let state = stores[3].partition_state(TOPIC, *p).expect("state");
        assert!(
            state.log_start_offset > 0,
            "partition {p} starts after the expired segments"
        );
        let mine: BTreeMap<u64, meshlog::chain::MessageId> = read_all(&stores[3], TOPIC, *p)
            .into_iter()
            .map(|r| (r.offset, r.id))
            .collect();
        assert_eq!(
            mine.keys().next().copied(),
            Some(state.log_start_offset),
            "partition {p} is readable from its log start"
        );
        assert_eq!(
            mine.len() as u64,
            state.high_watermark - state.log_start_offset
        );
        for (other, store) in stores[..3].iter().enumerate() {
            let Ok(theirs) = store.partition_state(TOPIC, *p) else {
                continue;
            };
            if theirs.high_watermark < state.high_watermark {
                continue; // no longer a replica of it
            }
            for record in read_all(store, TOPIC, *p) {
                if let Some(id) = mine.get(&record.offset) {
                    assert_eq!(
                        *id, record.id,
                        "partition {p} offset {} on node {other}",
                        record.offset
                    );
                }
            }
        }
        stores[3]
            .verify_partition(TOPIC, *p)
            .expect("its chain verifies from its log start");
    }
    assert_eq!(ids.len(), 4);
}
