//! The embedded API on a real node: producer, consumer, offsets, long poll,
//! key partitioning and end-to-end producer-chain verification.

use std::collections::BTreeMap;
use std::time::Duration;

use meshlog::chain::ProducerChainVerifier;
use meshlog::{
    ConsumerConfig, Error, Node, NodeConfig, OffsetReset, ProducerConfig, ProducerRecord,
    TopicConfig,
};

async fn node(dir: &tempfile::TempDir) -> Node {
    Node::open(
        NodeConfig::default()
            .with_data_dir(dir.path())
            .without_network(),
    )
    .await
    .expect("open node")
}

fn earliest(group: &str) -> ConsumerConfig {
    ConsumerConfig::default()
        .with_group_id(group)
        .with_auto_offset_reset(OffsetReset::Earliest)
}

/// Polls until `n` records arrived or a poll comes back empty.
async fn poll_n(consumer: &mut meshlog::Consumer, n: usize) -> Vec<meshlog::ConsumerRecord> {
    let mut out = Vec::new();
    while out.len() < n {
        let batch = consumer.poll(Duration::from_secs(5)).await.expect("poll");
        if batch.is_empty() {
            break;
        }
        out.extend(batch);
    }
    out
}

#[tokio::test]
async fn keyed_records_keep_their_partition_and_order() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(&dir).await;
    node.create_topic("t", TopicConfig::default().with_partitions(4))
        .await
        .unwrap();
    let producer = node.producer(ProducerConfig::default());
    let mut sent: BTreeMap<String, Vec<(u32, u64)>> = BTreeMap::new();
    for i in 0..60 {
        let key = format!("user-{}", i % 6);
        let m = producer
            .send("t", Some(key.as_bytes()), format!("{i}").as_bytes())
            .await
            .unwrap();
        sent.entry(key).or_default().push((m.partition, m.offset));
    }
    for (key, places) in &sent {
        assert!(
            places.iter().all(|(p, _)| *p == places[0].0),
            "{key} moved partitions"
        );
        assert!(
            places.windows(2).all(|w| w[0].1 < w[1].1),
            "{key} out of order"
        );
    }
    // Keyless records spread over every partition.
    let mut partitions = std::collections::BTreeSet::new();
    for _ in 0..8 {
        partitions.insert(producer.send("t", None, b"v").await.unwrap().partition);
    }
    assert_eq!(partitions.len(), 4);

    let mut consumer = node.consumer(earliest("g")).unwrap();
    consumer.subscribe(&["t"]).unwrap();
    let records = poll_n(&mut consumer, 68).await;
    assert_eq!(records.len(), 68);
    let mut per_key: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.key().is_some()) {
        let key = String::from_utf8(r.key().unwrap().to_vec()).unwrap();
        per_key
            .entry(key)
            .or_default()
            .push(String::from_utf8_lossy(r.value()).parse().unwrap());
    }
    for values in per_key.values() {
        assert!(
            values.windows(2).all(|w| w[0] < w[1]),
            "per-key order broken: {values:?}"
        );
    }
    node.shutdown().await;
}

#[tokio::test]
async fn committed_offsets_resume_a_group_and_reset_policies_apply() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(&dir).await;
    node.create_topic("t", TopicConfig::default())
        .await
        .unwrap();
    let producer = node.producer(ProducerConfig::default());
    for i in 0..10 {
        producer
            .send("t", None, format!("{i}").as_bytes())
            .await
            .unwrap();
    }

    let mut first = node
        .consumer(earliest("g").with_auto_commit(false))
        .unwrap();
    first.subscribe(&["t"]).unwrap();
    let got = poll_n(&mut first, 10).await;
    assert_eq!(got.len(), 10);
    first.seek("t", 0, 4).unwrap();
    first.commit().await.unwrap();
    assert_eq!(first.committed("t", 0).await.unwrap(), Some(4));

    // Same group, restarted node: resumes at the committed offset.
    node.shutdown().await;
    let node = self::node(&dir).await;
    let mut second = node.consumer(earliest("g")).unwrap();
    second.subscribe(&["t"]).unwrap();
    let resumed = poll_n(&mut second, 6).await;
    assert_eq!(resumed.first().map(|r| r.offset), Some(4));
    assert_eq!(resumed.len(), 6);
    second.close().await.unwrap();

    // latest: only what comes after; none: a typed error.
    let mut latest = node
        .consumer(ConsumerConfig::default().with_group_id("fresh"))
        .unwrap();
    latest.subscribe(&["t"]).unwrap();
    // "latest" is resolved once the consumer knows its partitions: poll
    // (returning nothing, as nothing new was written) until it has a position.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while latest.position("t", 0).is_none() && tokio::time::Instant::now() < deadline {
        assert!(
            latest
                .poll(Duration::from_millis(20))
                .await
                .unwrap()
                .is_empty()
        );
    }
    assert_eq!(
        latest.position("t", 0),
        Some(10),
        "latest starts at the log end"
    );
    node.producer(ProducerConfig::default())
        .send("t", None, b"new")
        .await
        .unwrap();
    let new = latest.poll(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        new.iter().map(|r| r.value().to_vec()).collect::<Vec<_>>(),
        [b"new".to_vec()]
    );

    let none = ConsumerConfig::default()
        .with_group_id("nobody")
        .with_auto_offset_reset(OffsetReset::None);
    let mut strict = node.consumer(none).unwrap();
    strict.subscribe(&["t"]).unwrap();
    assert!(matches!(
        strict.poll(Duration::from_millis(10)).await,
        Err(Error::NoOffset { partition: 0, .. })
    ));

    let mut groupless = node.consumer(ConsumerConfig::default()).unwrap();
    assert!(matches!(groupless.commit().await, Err(Error::NoGroup)));
    // Topics are looked up at the poll (as in a mesh, where one may be created later).
    groupless.subscribe(&["nope"]).unwrap();
    let unknown = groupless.poll(Duration::from_millis(10)).await;
    assert!(
        matches!(unknown, Err(Error::TopicNotFound(_))),
        "{unknown:?}"
    );
    assert!(matches!(
        groupless.seek("t", 0, 0),
        Err(Error::NotAssigned { .. })
    ));
    node.shutdown().await;
}

#[tokio::test]
async fn poll_wakes_when_a_record_arrives_during_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(&dir).await;
    node.create_topic("t", TopicConfig::default())
        .await
        .unwrap();
    let mut consumer = node.consumer(ConsumerConfig::default()).unwrap();
    consumer.subscribe(&["t"]).unwrap();
    assert!(consumer.poll(Duration::ZERO).await.unwrap().is_empty());

    let producer = node.producer(ProducerConfig::default());
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let send = tokio::spawn(async move {
        started_rx.await.unwrap();
        producer.send("t", None, b"late").await.unwrap()
    });
    let poll = async {
        started_tx.send(()).unwrap();
        consumer.poll(Duration::from_secs(60)).await.unwrap()
    };
    let records = poll.await;
    let sent = send.await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!((records[0].offset, records[0].id), (sent.offset, sent.id));
    node.shutdown().await;
}

#[tokio::test]
async fn consumers_verify_the_producer_chain_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(&dir).await;
    node.create_topic("t", TopicConfig::default().with_partitions(2))
        .await
        .unwrap();
    let producer = node.producer(ProducerConfig::default());
    let id = producer.id().expect("idempotent by default");
    let batch: Vec<ProducerRecord> = (0..50)
        .map(|i| {
            ProducerRecord::new(format!("v{i}"))
                .with_key(format!("k{}", i % 5))
                .with_header("n", vec![i as u8])
        })
        .collect();
    let metas = producer.send_batch("t", batch).await.unwrap();
    assert_eq!(metas.len(), 50);

    let mut consumer = node.consumer(earliest("verify")).unwrap();
    consumer.subscribe(&["t"]).unwrap();
    let records = poll_n(&mut consumer, 50).await;
    assert_eq!(records.len(), 50);
    let mut verifiers: BTreeMap<u32, ProducerChainVerifier> = BTreeMap::new();
    for r in &records {
        assert_eq!(r.producer.map(|(p, _)| p), Some(id));
        verifiers
            .entry(r.partition)
            .or_default()
            .observe("t", r.partition, r.producer, &r.record)
            .unwrap();
    }
    for (partition, verifier) in &verifiers {
        assert_eq!(
            verifier.head(id),
            producer.chain_head("t", *partition),
            "partition {partition}"
        );
    }
    for m in &metas {
        assert_eq!(
            records
                .iter()
                .find(|r| r.partition == m.partition && r.offset == m.offset)
                .map(|r| r.id),
            Some(m.id)
        );
    }
    node.shutdown().await;
}

#[tokio::test]
async fn oversized_records_and_closed_nodes_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(&dir).await;
    node.create_topic("t", TopicConfig::default())
        .await
        .unwrap();
    let producer = node.producer(ProducerConfig::default());
    let big = vec![0u8; 2 << 20];
    assert!(matches!(
        producer.send("t", None, &big).await,
        Err(Error::RecordTooLarge { max: 1048576, .. })
    ));
    assert!(matches!(
        producer.send("nope", None, b"v").await,
        Err(Error::TopicNotFound(_))
    ));
    // The producer is still in sequence after the refusals.
    producer.send("t", None, b"ok").await.unwrap();
    assert!(matches!(
        node.create_topic("t", TopicConfig::default().with_partitions(3))
            .await,
        Err(Error::TopicExists(_))
    ));
    node.shutdown().await;
    let late = producer.send("t", None, b"late").await;
    assert!(matches!(late, Err(Error::Closed)), "{late:?}");
    assert!(matches!(node.list_topics().await, Err(Error::Closed)));
}

#[tokio::test]
async fn auto_commit_commits_what_earlier_polls_returned() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(&dir).await;
    node.create_topic("t", TopicConfig::default())
        .await
        .unwrap();
    let producer = node.producer(ProducerConfig::default());
    for i in 0..3 {
        producer
            .send("t", None, format!("{i}").as_bytes())
            .await
            .unwrap();
    }
    let mut config = earliest("auto");
    config.auto_commit_interval = Duration::from_nanos(1);
    config.max_poll_records = 2;
    let mut consumer = node.consumer(config).unwrap();
    consumer.subscribe(&["t"]).unwrap();
    assert_eq!(
        consumer.poll(Duration::from_secs(5)).await.unwrap().len(),
        2
    );
    // Nothing was handed out before this poll, so nothing is committed yet:
    // a crash now would re-deliver offsets 0 and 1.
    assert_eq!(consumer.committed("t", 0).await.unwrap(), None);
    assert_eq!(
        consumer.poll(Duration::from_secs(5)).await.unwrap().len(),
        1
    );
    assert_eq!(consumer.committed("t", 0).await.unwrap(), Some(2));
    consumer.close().await.unwrap();
    let mut again = node.consumer(earliest("auto")).unwrap();
    again.subscribe(&["t"]).unwrap();
    assert!(
        again
            .poll(Duration::from_millis(50))
            .await
            .unwrap()
            .is_empty(),
        "close committed the last batch"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn retention_by_time_applies_to_a_quiet_partition_with_few_entries() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::default()
        .with_data_dir(dir.path())
        .without_network();
    config.retention_check_interval = Duration::from_millis(100);
    let node = Node::open(config).await.expect("open node");
    let topic = TopicConfig::default()
        .with_segment_bytes(1024)
        .with_retention(meshlog::Retention {
            time: Some(Duration::from_millis(300)),
            bytes: None,
        });
    node.create_topic("quiet", topic).await.unwrap();
    // A handful of batches, far fewer entries than a compaction waits for.
    let producer = node.producer(ProducerConfig::default());
    let value = vec![b'v'; 800];
    for _ in 0..6 {
        producer.send("quiet", None, &value).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let partition = loop {
        let described = node.describe_topic("quiet").await.unwrap();
        let partition = described.partitions[0].clone();
        if partition.log_start_offset > 0 || tokio::time::Instant::now() >= deadline {
            break partition;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        partition.log_start_offset > 0,
        "records older than retention.ms are dropped: log start still {} of {}",
        partition.log_start_offset,
        partition.high_watermark
    );
    assert_eq!(
        partition.high_watermark, 6,
        "nothing committed is unwritten"
    );
    assert!(partition.log_start_offset <= partition.high_watermark);
    node.shutdown().await;
}
