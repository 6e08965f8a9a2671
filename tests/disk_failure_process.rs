//! A node whose disk fills up under load stops on its own: it says why on
//! stderr and exits non-zero, its peers keep serving, and nothing
//! acknowledged is lost. The node's data directory is on a small tmpfs the
//! test mounts (it needs root, and fails saying so without it).

mod common;

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::SmallDisk;
use common::cluster::{create_replicated, read_all, start_cluster_at, wait_for_agreement};
use meshlog::{Acks, ProducerConfig, ProducerRecord};

const TOPIC: &str = "filling";
const PARTITIONS: u32 = 3;
/// Records per batch, and bytes per record value.
const PER_BATCH: usize = 25;
const VALUE_BYTES: usize = 4096;

/// Batch `n`: keys `n-i`, values the key padded to [`VALUE_BYTES`].
fn batch(n: usize) -> Vec<ProducerRecord> {
    (0..PER_BATCH)
        .map(|i| {
            let key = format!("{n}-{i}");
            let value = format!("{key}:{}", "x".repeat(VALUE_BYTES));
            ProducerRecord::new(value).with_key(key)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_disk_fills_exits_with_a_clear_error_and_its_peers_lose_nothing() {
    let disk = SmallDisk::mount("16m");
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let small = disk.path().join("node");
    let paths = [
        dirs[0].path(),
        dirs[1].path(),
        small.as_path(),
        dirs[3].path(),
    ];
    let (tx, lines) = mpsc::channel();
    let (mut nodes, ids, client) = start_cluster_at(&paths, &tx).await;
    create_replicated(&client, TOPIC, PARTITIONS).await;
    let producer = client.producer(
        ProducerConfig::default()
            .with_acks(Acks::All)
            .with_delivery_timeout(Duration::from_secs(30)),
    );

    // Produce until the node on the small disk exits (every partition has a
    // replica there, so every acknowledged batch is on its disk too).
    let mut acked: BTreeMap<String, (u32, u64)> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut n = 0;
    let status = loop {
        let process = nodes[2].as_mut().expect("running");
        if let Some(status) = process.child.try_wait().expect("poll the node") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the node on a 16 MiB disk still runs after {} acknowledged records",
            acked.len()
        );
        match producer.send_batch(TOPIC, batch(n)).await {
            Ok(sent) => {
                for (i, meta) in sent.iter().enumerate() {
                    acked.insert(format!("{n}-{i}"), (meta.partition, meta.offset));
                }
            }
            Err(error) => eprintln!("batch {n} not acknowledged: {error}"),
        }
        n += 1;
    };
    println!(
        "the node on the small disk exited ({status}) after {} acknowledged records",
        acked.len()
    );
    assert!(
        !acked.is_empty(),
        "records were acknowledged before the disk filled"
    );
    assert_eq!(status.code(), Some(1), "a failed store exits with code 1");
    let said: Vec<String> = lines
        .try_iter()
        .filter(|line| line.node == 2)
        .map(|line| line.text)
        .collect();
    let last = said.last().cloned().unwrap_or_default();
    assert!(
        last.starts_with("error: the store failed"),
        "its last line says the store failed: {last:?}"
    );
    assert!(
        said.iter()
            .any(|l| l.contains("ERROR") && l.contains("steps down from every partition")),
        "the node logged that it steps down: {said:?}"
    );

    // The two others keep serving: new records are acknowledged by them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut served = 0;
    while served < 3 {
        assert!(
            Instant::now() < deadline,
            "the remaining nodes acknowledged {served} of 3 batches in 60 s"
        );
        let n = 1_000_000 + served;
        match producer.send_batch(TOPIC, batch(n)).await {
            Ok(sent) => {
                for (i, meta) in sent.iter().enumerate() {
                    acked.insert(format!("{n}-{i}"), (meta.partition, meta.offset));
                }
                served += 1;
            }
            Err(error) => eprintln!("batch {n} not acknowledged yet: {error}"),
        }
    }
    // Both hold every acknowledged record as committed before they stop.
    let mut ends = BTreeMap::new();
    for (partition, offset) in acked.values() {
        let end = ends.entry(*partition).or_insert(0u64);
        *end = (*end).max(offset + 1);
    }
    wait_for_agreement(&client, &ids[..2], TOPIC, PARTITIONS, &ends).await;
    client.shutdown().await;
    for process in nodes.iter_mut().take(2).flatten() {
        common::sigterm(&process.child);
        let status = common::wait_exit(&mut process.child, Duration::from_secs(20));
        assert!(status.success(), "clean exit, got {status}");
    }

    // Each of the two holds every acknowledged record, once, where it was acknowledged.
    for dir in &dirs[..2] {
        let store = meshlog::store::Store::open(dir.path(), true).expect("reopen the store");
        let mut stored: BTreeMap<String, (u32, u64)> = BTreeMap::new();
        for partition in 0..PARTITIONS {
            for record in read_all(&store, TOPIC, partition) {
                let value = String::from_utf8_lossy(record.value()).into_owned();
                let key = value.split(':').next().unwrap_or_default().to_string();
                let previous = stored.insert(key.clone(), (partition, record.offset));
                assert!(previous.is_none(), "{key} stored twice");
            }
            store
                .verify_partition(TOPIC, partition)
                .expect("the chain verifies");
        }
        for (key, place) in &acked {
            assert_eq!(stored.get(key), Some(place), "acknowledged record {key}");
        }
    }
}
