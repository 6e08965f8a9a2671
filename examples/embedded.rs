//! An application that embeds a meshlog node: it creates a topic, produces
//! keyed records, and consumes them back as a consumer group, then verifies
//! every partition's hash chain.
//!
//! Run it with `cargo run --example embedded`. It uses a temporary data
//! directory and stays off the network.

use std::time::Duration;

use meshlog::{
    ConsumerConfig, Node, NodeConfig, OffsetReset, ProducerConfig, ProducerRecord, TopicConfig,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let node = Node::open(
        NodeConfig::default()
            .with_data_dir(dir.path())
            .without_network(),
    )
    .await?;
    node.create_topic("orders", TopicConfig::default().with_partitions(2))
        .await?;

    let producer = node.producer(ProducerConfig::default());
    let batch: Vec<ProducerRecord> = (0..10)
        .map(|i| {
            ProducerRecord::new(format!("order {i}"))
                .with_key(format!("customer-{}", i % 3))
                .with_header("source", "example")
        })
        .collect();
    for meta in producer.send_batch("orders", batch).await? {
        println!(
            "sent to {}/{} at offset {} (id {})",
            meta.topic, meta.partition, meta.offset, meta.id
        );
    }

    let config = ConsumerConfig::default()
        .with_group_id("billing")
        .with_auto_offset_reset(OffsetReset::Earliest);
    let mut consumer = node.consumer(config)?;
    consumer.subscribe(&["orders"])?;
    let mut received = 0;
    while received < 10 {
        let records = consumer.poll(Duration::from_secs(5)).await?;
        if records.is_empty() {
            break;
        }
        for r in &records {
            let key = String::from_utf8_lossy(r.key().unwrap_or_default());
            println!("got {key}: {}", String::from_utf8_lossy(r.value()));
        }
        received += records.len();
    }
    consumer.commit().await?;

    for partition in 0..2 {
        let checked = node.verify_partition("orders", partition).await?;
        println!("partition {partition}: {checked} records, hash chain verified");
    }
    node.shutdown().await;
    Ok(())
}
