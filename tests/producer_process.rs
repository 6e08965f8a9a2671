//! The idempotent producer against real `meshlog node` processes on
//! 127.0.0.1: 100,000 keyed records through SIGKILLed and restarted partition
//! leaders, and a `meshlog produce` process SIGKILLed and run again with the
//! same producer identity.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::cluster::{
    create_replicated, node_id, read_all, spawn, start_cluster, stop_all, wait_for_agreement,
    wait_until,
};
use common::{Line, NodeProcess};
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use meshlog::chain::ProducerChainVerifier;
use meshlog::net::NodeId;
use meshlog::{Acks, Node, ProducerConfig, ProducerRecord, RecordMetadata};

const PARTITIONS: u32 = 6;

/// Every record of a partition in one store: (offset, key, value).
fn stored(
    store: &meshlog::store::Store,
    topic: &str,
    partition: u32,
) -> Vec<(u64, String, String)> {
    read_all(store, topic, partition)
        .iter()
        .map(|r| {
            let key = String::from_utf8_lossy(r.key().unwrap_or_default()).into_owned();
            let value = String::from_utf8_lossy(r.value()).into_owned();
            (r.offset, key, value)
        })
        .collect()
}

/// Checks one store: each value once, each key's values in send order
/// (`{key}-{n}` with n rising), chains verify; returns values per key.
fn check_store(dir: &Path, topic: &str, partitions: u32) -> BTreeMap<String, Vec<u64>> {
    let store = meshlog::store::Store::open(dir, true).expect("reopen the store");
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for partition in 0..partitions {
        for (offset, key, value) in stored(&store, topic, partition) {
            let n: u64 = value
                .rsplit_once('-')
                .and_then(|(_, n)| n.parse().ok())
                .unwrap_or_else(|| panic!("unexpected value {value}"));
            let seen = per_key.entry(key.clone()).or_default();
            assert!(
                seen.last().is_none_or(|last| *last < n),
                "{key}: {value} at {partition}/{offset} after {:?} (duplicate or out of order)",
                seen.last()
            );
            seen.push(n);
        }
        store
            .verify_partition(topic, partition)
            .expect("the chain verifies");
    }
    per_key
}

/// Each store in `dirs` holds, for every key `key{i}`, its values 0..counts[i]
/// exactly once and in order.
fn assert_every_key_once_in_order(dirs: &[tempfile::TempDir], topic: &str, counts: &[u64]) {
    for dir in dirs {
        let per_key = check_store(dir.path(), topic, PARTITIONS);
        for (key, count) in counts.iter().enumerate() {
            let values = per_key
                .get(&format!("key{key}"))
                .cloned()
                .unwrap_or_default();
            assert_eq!(
                values,
                (0..*count).collect::<Vec<_>>(),
                "key{key}: every record once, in order"
            );
        }
    }
}

/// The leader of `partition` and the index of its process.
async fn leader_of(client: &Node, ids: &[NodeId], topic: &str, partition: u32) -> Option<usize> {
    let description = client.describe_topic(topic).await.ok()?;
    let leader = description.partitions.get(partition as usize)?.leader?;
    ids.iter().position(|id| *id == leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_producer_stores_100k_keyed_records_exactly_once_through_leader_kills() {
    const TOPIC: &str = "orders";
    const RECORDS: u64 = 100_000;
    const KEYS: u64 = 100;
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (tx, _lines) = mpsc::channel::<Line>();
    let (nodes, ids, client) = start_cluster(&dirs, &tx).await;
    create_replicated(&client, TOPIC, PARTITIONS).await;
    let nodes = Arc::new(std::sync::Mutex::new(nodes));

    let producer = client.producer(
        ProducerConfig::default()
            .with_acks(Acks::All)
            .with_delivery_timeout(Duration::from_secs(120)),
    );
    let acked = Arc::new(AtomicU64::new(0));
    // Kill the leader of partition 0 at 20% acknowledged, restart it at 35%;
    // the same for partition 3 at 55% and 70%.
    let killer = {
        let (client, ids, nodes, acked) =
            (client.clone(), ids.clone(), nodes.clone(), acked.clone());
        let dirs: Vec<std::path::PathBuf> = dirs.iter().map(|d| d.path().to_path_buf()).collect();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut kills = Vec::new();
            for (partition, kill_at, restart_at) in [(0, 20, 35), (3, 55, 70)] {
                let reached =
                    |percent: u64| acked.load(Ordering::Relaxed) >= RECORDS * percent / 100;
                wait_until(
                    "progress before a kill",
                    Duration::from_secs(300),
                    || async { reached(kill_at) },
                )
                .await;
                // Right after a restart an election may be under way: wait for a leader.
                let deadline = Instant::now() + Duration::from_secs(30);
                let index = loop {
                    if let Some(index) = leader_of(&client, &ids, TOPIC, partition).await {
                        break index;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "partition {partition} has no leader to kill"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                let killed: Option<NodeProcess> = nodes.lock().unwrap()[index].take();
                if let Some(mut process) = killed {
                    process.child.kill().expect("SIGKILL");
                    process.child.wait().expect("reap");
                }
                kills.push((partition, index, acked.load(Ordering::Relaxed)));
                wait_until(
                    "progress before the restart",
                    Duration::from_secs(300),
                    || async { reached(restart_at) },
                )
                .await;
                let alive = nodes
                    .lock()
                    .unwrap()
                    .iter()
                    .flatten()
                    .next()
                    .map(|n| n.address.clone());
                let restarted = spawn(index, &dirs[index], alive.as_deref(), &tx);
                assert_eq!(
                    node_id(&restarted),
                    ids[index],
                    "same identity after restart"
                );
                nodes.lock().unwrap()[index] = Some(restarted);
            }
            kills
        })
    };

    let started = Instant::now();
    let mut deliveries = FuturesOrdered::new();
    let mut sent_per_key = vec![0u64; KEYS as usize];
    for i in 0..RECORDS {
        let key = i % KEYS;
        let n = sent_per_key[key as usize];
        sent_per_key[key as usize] += 1;
        let record = ProducerRecord::new(format!("key{key}-{n}")).with_key(format!("key{key}"));
        let delivery = producer.enqueue(TOPIC, record).await.expect("enqueue");
        let acked = acked.clone();
        deliveries.push_back(async move {
            let answer = delivery.await;
            acked.fetch_add(1, Ordering::Relaxed);
            answer
        });
    }
    let answers: Vec<meshlog::Result<RecordMetadata>> = deliveries.collect().await;
    let elapsed = started.elapsed();
    let kills = killer.await.expect("the killer task");
    let failed: Vec<String> = answers
        .iter()
        .filter_map(|a| a.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(
        failed.is_empty(),
        "{} records failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    let acked: Vec<RecordMetadata> = answers.into_iter().map(|a| a.expect("acked")).collect();
    println!(
        "{} records acknowledged in {elapsed:?} ({:.0}/s) with leader kills {kills:?} (partition, node, acked at kill)",
        acked.len(),
        acked.len() as f64 / elapsed.as_secs_f64()
    );

    let mut ends = BTreeMap::new();
    for meta in &acked {
        let end = ends.entry(meta.partition).or_insert(0u64);
        *end = (*end).max(meta.offset + 1);
    }
    wait_for_agreement(&client, &ids, TOPIC, PARTITIONS, &ends).await;

    // A consumer verifies the producer's chain end to end in every partition.
    let mut consumer = client
        .consumer(
            meshlog::ConsumerConfig::default()
                .with_auto_offset_reset(meshlog::OffsetReset::Earliest),
        )
        .expect("consumer");
    consumer.subscribe(&[TOPIC]).expect("subscribe");
    let mut verifiers: BTreeMap<u32, ProducerChainVerifier> = BTreeMap::new();
    let mut consumed = 0usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    while consumed < acked.len() {
        assert!(
            Instant::now() < deadline,
            "consumed {consumed} of {}",
            acked.len()
        );
        for record in consumer.poll(Duration::from_secs(1)).await.expect("poll") {
            verifiers
                .entry(record.partition)
                .or_default()
                .observe(TOPIC, record.partition, record.producer, &record.record)
                .expect("the producer chain verifies");
            consumed += 1;
        }
    }
    let producer_id = producer.id().expect("idempotent");
    for (partition, verifier) in &verifiers {
        assert_eq!(
            verifier.head(producer_id),
            producer.chain_head(TOPIC, *partition),
            "partition {partition}"
        );
    }

    let mut nodes = std::mem::take(&mut *nodes.lock().unwrap());
    stop_all(client, &mut nodes).await;
    assert_every_key_once_in_order(&dirs[..3], TOPIC, &sent_per_key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_process_killed_and_run_again_with_its_identity_stores_each_record_once() {
    const TOPIC: &str = "imports";
    const LINES: u64 = 60_000;
    let dirs: Vec<tempfile::TempDir> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
    let (tx, _lines) = mpsc::channel::<Line>();
    let (mut nodes, ids, client) = start_cluster(&dirs[..4], &tx).await;
    create_replicated(&client, TOPIC, PARTITIONS).await;
    let bootstrap = nodes[0]
        .as_ref()
        .map(|n| n.address.clone())
        .expect("node 0");
    let input: String = (0..LINES)
        .map(|i| format!("key{}:key{}-{}\n", i % 10, i % 10, i / 10))
        .collect();
    let produce = |dir: &Path| {
        let mut child = common::meshlog(dir)
            .args([
                "--bootstrap-server",
                &bootstrap,
                "produce",
                TOPIC,
                "--key-separator",
                ":",
                "--producer-id",
                "importer",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn meshlog produce");
        let mut stdin = child.stdin.take().expect("stdin");
        let input = input.clone();
        std::thread::spawn(move || {
            // A killed child closes the pipe: the write fails, which is fine.
            let _ = stdin.write_all(input.as_bytes());
        });
        child
    };
    let stored_now = |client: Node| async move {
        client.describe_topic(TOPIC).await.map_or(0, |t| {
            t.partitions.iter().map(|p| p.high_watermark).sum::<u64>()
        })
    };

    // First run: SIGKILLed once a quarter of the input is stored.
    let mut first = produce(dirs[4].path());
    wait_until("a quarter stored", Duration::from_secs(120), || {
        stored_now(client.clone()).then(|n| async move { n >= LINES / 4 })
    })
    .await;
    first.kill().expect("SIGKILL the producer");
    first.wait().expect("reap");
    let before = stored_now(client.clone()).await;
    assert!(
        before < LINES,
        "the producer was killed mid-stream ({before} stored)"
    );

    // Second run, same identity, same input: only what is missing is stored.
    let second = produce(dirs[5].path());
    let output = second.wait_with_output().expect("wait for meshlog produce");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "second run failed: {stderr}");
    println!(
        "killed with {before} of {LINES} stored; second run: {}",
        stderr.trim()
    );
    assert!(
        stderr.contains("were already stored"),
        "the rerun skipped stored records: {stderr}"
    );

    wait_until("everything stored", Duration::from_secs(60), || {
        stored_now(client.clone()).then(|n| async move { n >= LINES })
    })
    .await;
    let ends: BTreeMap<u32, u64> = BTreeMap::new();
    wait_for_agreement(&client, &ids, TOPIC, PARTITIONS, &ends).await;
    stop_all(client, &mut nodes).await;
    assert_every_key_once_in_order(&dirs[..3], TOPIC, &[LINES / 10; 10]);
}
