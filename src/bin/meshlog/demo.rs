//! `meshlog demo`: the Kafka quick-start on a throwaway node.
//!
//! Creates topic `test` with 3 partitions, sends 100 records keyed
//! `message_i`, reads them back as a consumer group, verifies every
//! partition's hash chain, then restarts the node from its files and checks
//! that every record and every chain head is still there.

use std::collections::BTreeMap;
use std::time::Duration;

use meshlog::{
    ConsumerConfig, MessageId, Node, NodeConfig, OffsetReset, ProducerConfig, TopicConfig,
};

use crate::CliResult;

const TOPIC: &str = "test";
const PARTITIONS: u32 = 3;
const RECORDS: usize = 100;

/// Runs the demo in a temporary directory that is removed at the end.
pub async fn run() -> CliResult {
    let dir = tempfile::Builder::new().prefix("meshlog-demo-").tempdir()?;
    println!(
        "== meshlog demo: one node, data in {}\n",
        dir.path().display()
    );
    // One node alone for now; the demo grows into a local mesh with replication.
    let config = NodeConfig::default()
        .with_data_dir(dir.path())
        .without_network();

    let node = Node::open(config.clone()).await?;
    node.create_topic(TOPIC, TopicConfig::default().with_partitions(PARTITIONS))
        .await?;
    println!("Created topic '{TOPIC}' with {PARTITIONS} partitions.\n");

    println!("Sending {RECORDS} records keyed message_i (each acknowledged after fsync):");
    println!(
        "  {:<8} {:<10} {:>9} {:>7}  id",
        "topic", "key", "partition", "offset"
    );
    let producer = node.producer(ProducerConfig::default());
    for i in 0..RECORDS {
        let key = format!("message_{i}");
        let m = producer
            .send(TOPIC, Some(key.as_bytes()), format!("hello {i}").as_bytes())
            .await?;
        println!(
            "  {:<8} {:<10} {:>9} {:>7}  {}",
            m.topic, key, m.partition, m.offset, m.id
        );
    }

    let per_partition = consume_all(&node).await?;
    println!("\nRead back as group 'demo' from the beginning:");
    for (partition, count) in &per_partition {
        println!("  partition {partition}: {count} records");
    }
    let read: usize = per_partition.values().sum();
    check(
        read == RECORDS,
        format!("read {read} records, expected {RECORDS}"),
    )?;

    let heads_before = verify_heads(&node).await?;
    node.shutdown().await;
    drop(node);

    println!("\nRestarting the node from its files...");
    let node = Node::open(config).await?;
    let heads_after = verify_heads(&node).await?;
    check(
        heads_before == heads_after,
        "chain heads changed across the restart".to_string(),
    )?;
    println!("Every partition reopened with the same chain head.");
    node.shutdown().await;

    println!("\n== All {RECORDS} records were stored, read back and verified.");
    println!("\nTry it yourself:");
    println!("  meshlog topic create test --partitions 3 --replication-factor 1");
    println!("  printf 'a\\nb\\nc\\n' | meshlog produce test --key k --print-metadata");
    println!("  meshlog consume test --group g --from-beginning --max-messages 3");
    println!("  meshlog topic describe test");
    println!("  meshlog bench storage");
    println!(
        "  meshlog node --listen /ip4/127.0.0.1/tcp/4001      # then: meshlog peers --bootstrap <its address>"
    );
    Ok(())
}

async fn consume_all(node: &Node) -> Result<BTreeMap<u32, usize>, Box<dyn std::error::Error>> {
    let config = ConsumerConfig::default()
        .with_group_id("demo")
        .with_auto_offset_reset(OffsetReset::Earliest);
    let mut consumer = node.consumer(config)?;
    consumer.subscribe(&[TOPIC])?;
    let mut per_partition = BTreeMap::new();
    let mut total = 0;
    while total < RECORDS {
        let records = consumer.poll(Duration::from_secs(5)).await?;
        if records.is_empty() {
            break;
        }
        for r in &records {
            *per_partition.entry(r.partition).or_insert(0) += 1;
        }
        total += records.len();
    }
    consumer.commit().await?;
    Ok(per_partition)
}

/// Recomputes each partition's chain from its records and returns the heads.
async fn verify_heads(node: &Node) -> Result<Vec<MessageId>, Box<dyn std::error::Error>> {
    let description = node.describe_topic(TOPIC).await?;
    let mut heads = Vec::new();
    for p in &description.partitions {
        let checked = node.verify_partition(TOPIC, p.partition).await?;
        println!(
            "  partition {}: {checked} records, chain verified, head {}",
            p.partition, p.head
        );
        heads.push(p.head);
    }
    Ok(heads)
}

fn check(ok: bool, failure: String) -> CliResult {
    if ok { Ok(()) } else { Err(failure.into()) }
}
