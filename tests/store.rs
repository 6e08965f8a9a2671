//! The redb log store on real files: appends, dedup, retention, offsets,
//! group commit, and what happens when the file is damaged.

use std::time::Duration;

use meshlog::chain::{self, MessageId, ProducerId};
use meshlog::error::StoreError;
use meshlog::store::{AppendRequest, Store, WriteOp, WriteOutcome};
use meshlog::wire::{PreparedRecords, ProducerBatch};
use meshlog::{Record, Retention, TopicConfig};
use redb::ReadableTable;

const DAY_MS: i64 = 24 * 3600 * 1000;

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(dir.path(), false).expect("open store")
}

fn records(n: usize, timestamp: i64, tag: &str) -> Vec<Record> {
    (0..n)
        .map(|i| Record::new(format!("{tag}-{i}-{}", "x".repeat(100)), timestamp))
        .collect()
}

fn prepared(records: &[Record]) -> PreparedRecords {
    PreparedRecords::new(records).expect("prepare records")
}

fn plain(topic: &str, partition: u32, records: Vec<Record>) -> AppendRequest {
    AppendRequest {
        topic: topic.into(),
        partition,
        producer: None,
        records: prepared(&records),
    }
}

fn idempotent(
    topic: &str,
    producer: ProducerId,
    base_seq: u64,
    prev: MessageId,
    records: Vec<Record>,
) -> AppendRequest {
    AppendRequest {
        topic: topic.into(),
        partition: 0,
        producer: Some(ProducerBatch {
            producer,
            base_seq,
            prev,
        }),
        records: prepared(&records),
    }
}

/// The producer-chain head after `records`, starting from `prev` at `base_seq`.
fn producer_head(
    prev: MessageId,
    producer: ProducerId,
    base_seq: u64,
    records: &[Record],
) -> MessageId {
    records.iter().enumerate().fold(prev, |h, (i, r)| {
        chain::producer_link(&h, producer, base_seq + i as u64, &chain::record_digest(r))
    })
}

#[test]
fn append_assigns_offsets_and_chain_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store
        .create_topic("t", TopicConfig::default().with_partitions(2), 0)
        .unwrap();
    let first = store.append(plain("t", 1, records(3, 1, "a"))).unwrap();
    let second = store.append(plain("t", 1, records(2, 1, "b"))).unwrap();
    assert_eq!((first.base_offset, second.base_offset), (0, 3));
    let read = store.read("t", 1, 0, usize::MAX).unwrap();
    let offsets: Vec<u64> = read.records.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, vec![0, 1, 2, 3, 4]);
    let ids: Vec<MessageId> = first.ids.iter().chain(&second.ids).copied().collect();
    assert_eq!(read.records.iter().map(|r| r.id).collect::<Vec<_>>(), ids);
    let state = store.partition_state("t", 1).unwrap();
    assert_eq!((state.high_watermark, state.head), (5, ids[4]));
    assert_eq!(store.verify_partition("t", 1).unwrap().records, 5);
    assert_eq!(
        store.partition_state("t", 0).unwrap().head,
        chain::partition_genesis("t", 0)
    );
}

#[test]
fn retried_batch_is_deduplicated_and_gaps_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store.create_topic("t", TopicConfig::default(), 0).unwrap();
    let p = ProducerId(42);
    let genesis = chain::producer_genesis(p, "t", 0);
    let batch0 = records(3, 1, "first");
    let head0 = producer_head(genesis, p, 0, &batch0);

    let original = store
        .append(idempotent("t", p, 0, genesis, batch0.clone()))
        .unwrap();
    assert!(!original.duplicate);
    assert_eq!(original.producer_head, Some(head0));

    // The retry returns the original offsets and IDs and writes nothing.
    let retry = store
        .append(idempotent("t", p, 0, genesis, batch0.clone()))
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(
        (retry.base_offset, &retry.ids),
        (original.base_offset, &original.ids)
    );
    assert_eq!(store.partition_state("t", 0).unwrap().high_watermark, 3);

    // A retry inside one group commit with the original is deduplicated too.
    let batch1 = records(2, 1, "second");
    let ops = vec![
        WriteOp::Append(idempotent("t", p, 3, head0, batch1.clone())),
        WriteOp::Append(idempotent("t", p, 3, head0, batch1.clone())),
    ];
    let results = store.write(ops).unwrap();
    let outcomes: Vec<_> = results
        .into_iter()
        .map(|r| match r.unwrap() {
            WriteOutcome::Appended(o) => o,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(outcomes[0].base_offset, 3);
    assert!(outcomes[1].duplicate && outcomes[1].base_offset == 3);
    let head1 = producer_head(head0, p, 3, &batch1);

    let gap = store
        .append(idempotent("t", p, 9, head1, records(1, 1, "gap")))
        .unwrap_err();
    assert!(
        matches!(
            gap,
            StoreError::SequenceGap {
                expected: 5,
                found: 9,
                ..
            }
        ),
        "{gap}"
    );
    let forged = store
        .append(idempotent("t", p, 5, head0, records(1, 1, "forged")))
        .unwrap_err();
    assert!(
        matches!(forged, StoreError::ProducerChainMismatch { seq: 5, .. }),
        "{forged}"
    );

    // Every record is stored exactly once, and the producer state survives a restart.
    drop(store);
    let store = open(&dir);
    let values: Vec<Vec<u8>> = store
        .read("t", 0, 0, usize::MAX)
        .unwrap()
        .records
        .into_iter()
        .map(|r| r.record.value)
        .collect();
    let expected: Vec<Vec<u8>> = batch0
        .iter()
        .chain(&batch1)
        .map(|r| r.value.clone())
        .collect();
    assert_eq!(values, expected);
    let again = store.append(idempotent("t", p, 3, head0, batch1)).unwrap();
    assert!(again.duplicate && again.base_offset == 3);
}

#[test]
fn retention_by_bytes_drops_only_whole_old_segments() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let config = TopicConfig::default()
        .with_segment_bytes(2048)
        .with_retention(Retention {
            time: None,
            bytes: Some(6000),
        });
    store.create_topic("t", config, 0).unwrap();
    for i in 0..40 {
        store
            .append(plain("t", 0, records(2, 1, &format!("b{i}"))))
            .unwrap();
    }
    let before = store.segments("t", 0).unwrap();
    assert!(
        before.len() >= 5,
        "expected several segments, got {}",
        before.len()
    );
    let total: u64 = before.iter().map(|s| s.bytes).sum();
    assert_eq!(total, store.partition_state("t", 0).unwrap().bytes);

    let results = store
        .write(vec![WriteOp::EnforceRetention { now_ms: 2 }])
        .unwrap();
    let Ok(WriteOutcome::RetentionApplied { segments_dropped }) = &results[0] else {
        panic!("{results:?}")
    };
    let after = store.segments("t", 0).unwrap();
    assert_eq!(after.len() as u64, before.len() as u64 - segments_dropped);
    assert!(*segments_dropped > 0);
    // What remains is exactly the newest segments, untouched, and still >= retention.bytes.
    assert_eq!(after[..], before[before.len() - after.len()..]);
    let state = store.partition_state("t", 0).unwrap();
    assert_eq!(state.log_start_offset, after[0].base_offset);
    assert!(state.bytes >= 6000, "kept {} bytes", state.bytes);
    // Dropping one more segment would go below the limit.
    assert!(state.bytes - after[0].bytes < 6000);
    assert!(matches!(
        store.read("t", 0, 0, 1 << 20),
        Err(StoreError::OffsetOutOfRange { start, .. }) if start == state.log_start_offset
    ));
    let read = store
        .read("t", 0, state.log_start_offset, usize::MAX)
        .unwrap();
    assert_eq!(
        read.records.first().map(|r| r.offset),
        Some(state.log_start_offset)
    );
    assert_eq!(
        store.verify_partition("t", 0).unwrap().records,
        80 - state.log_start_offset
    );
    drop(store);
    open(&dir).verify_partition("t", 0).unwrap();
}

#[test]
fn retention_by_time_drops_expired_segments_even_the_active_one_when_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let config = TopicConfig {
        segment_time: Duration::from_secs(3600),
        retention: Retention {
            time: Some(Duration::from_secs(7 * 24 * 3600)),
            bytes: None,
        },
        ..TopicConfig::default()
    };
    store.create_topic("t", config, 0).unwrap();
    let now = 100 * DAY_MS;
    // Two old segments (rolled by segment_time), then a recent one.
    store
        .append(plain("t", 0, records(5, now - 20 * DAY_MS, "old1")))
        .unwrap();
    store
        .append(plain("t", 0, records(5, now - 10 * DAY_MS, "old2")))
        .unwrap();
    store
        .append(plain("t", 0, records(5, now - DAY_MS, "new")))
        .unwrap();
    assert_eq!(store.segments("t", 0).unwrap().len(), 3);

    let results = store
        .write(vec![WriteOp::EnforceRetention { now_ms: now }])
        .unwrap();
    assert!(matches!(
        results[0],
        Ok(WriteOutcome::RetentionApplied {
            segments_dropped: 2
        })
    ));
    let state = store.partition_state("t", 0).unwrap();
    assert_eq!((state.log_start_offset, state.high_watermark), (10, 15));

    // Much later even the active segment has expired: the partition empties,
    // and its chain goes on from the same head.
    let head = store.partition_state("t", 0).unwrap().head;
    let results = store
        .write(vec![WriteOp::EnforceRetention {
            now_ms: now + 365 * DAY_MS,
        }])
        .unwrap();
    assert!(matches!(
        results[0],
        Ok(WriteOutcome::RetentionApplied {
            segments_dropped: 1
        })
    ));
    let state = store.partition_state("t", 0).unwrap();
    assert_eq!(
        (state.log_start_offset, state.high_watermark, state.bytes),
        (15, 15, 0)
    );
    assert!(
        store
            .read("t", 0, 15, usize::MAX)
            .unwrap()
            .records
            .is_empty()
    );
    store
        .append(plain("t", 0, records(2, now, "after")))
        .unwrap();
    let read = store.read("t", 0, 15, usize::MAX).unwrap().records;
    assert_eq!(read.len(), 2);
    assert_eq!(store.verify_partition("t", 0).unwrap().records, 2);
    assert_ne!(read[1].id, head);
}

#[test]
fn group_commit_fails_refused_operations_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store
        .create_topic("t", TopicConfig::default().with_partitions(2), 0)
        .unwrap();
    let big = vec![Record::new(vec![0u8; 2 << 20], 0)];
    let results = store
        .write(vec![
            WriteOp::Append(plain("t", 0, records(2, 0, "ok"))),
            WriteOp::Append(plain("missing", 0, records(1, 0, "x"))),
            WriteOp::Append(plain("t", 7, records(1, 0, "x"))),
            WriteOp::Append(plain("t", 1, big)),
            WriteOp::Append(plain("t", 1, vec![])),
            WriteOp::CommitOffsets {
                group: "g".into(),
                offsets: vec![("t".into(), 0, 2)],
            },
            WriteOp::Append(plain("t", 0, records(1, 0, "ok2"))),
        ])
        .unwrap();
    assert!(matches!(&results[0], Ok(WriteOutcome::Appended(o)) if o.base_offset == 0));
    assert!(matches!(&results[1], Err(StoreError::TopicNotFound(t)) if t == "missing"));
    assert!(matches!(
        &results[2],
        Err(StoreError::PartitionNotFound { partition: 7, .. })
    ));
    assert!(matches!(
        &results[3],
        Err(StoreError::RecordTooLarge { max: 1048576, .. })
    ));
    assert!(matches!(&results[4], Err(StoreError::EmptyBatch)));
    assert!(matches!(&results[5], Ok(WriteOutcome::OffsetsCommitted)));
    assert!(matches!(&results[6], Ok(WriteOutcome::Appended(o)) if o.base_offset == 2));
    assert_eq!(store.partition_state("t", 1).unwrap().high_watermark, 0);
    assert_eq!(store.committed_offset("g", "t", 0).unwrap(), Some(2));
}

#[test]
fn topics_and_offsets_survive_reopen_and_delete_removes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let config = TopicConfig::default().with_partitions(3);
    let (_, created) = store.create_topic("a", config.clone(), 0).unwrap();
    assert!(created);
    let (_, created) = store.create_topic("a", config.clone(), 0).unwrap();
    assert!(!created, "same config is a no-op");
    assert!(matches!(
        store.create_topic("a", config.clone().with_partitions(4), 0),
        Err(StoreError::TopicExists(_))
    ));
    assert!(matches!(
        store.create_topic("bad/name", config.clone(), 0),
        Err(StoreError::Config(_))
    ));
    store.create_topic("b", config, 0).unwrap();
    store.append(plain("a", 2, records(4, 0, "r"))).unwrap();
    store
        .write(vec![WriteOp::CommitOffsets {
            group: "g".into(),
            offsets: vec![("a".into(), 2, 3), ("b".into(), 0, 0)],
        }])
        .unwrap();
    drop(store);

    let store = open(&dir);
    let names: Vec<String> = store
        .list_topics()
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(
        store.group_offsets("g").unwrap(),
        vec![("a".to_string(), 2, 3), ("b".to_string(), 0, 0)]
    );
    assert_eq!(store.read("a", 2, 0, usize::MAX).unwrap().records.len(), 4);

    store
        .write(vec![WriteOp::DeleteTopic { name: "a".into() }])
        .unwrap()
        .remove(0)
        .unwrap();
    assert!(matches!(
        store.topic("a"),
        Err(StoreError::TopicNotFound(_))
    ));
    assert_eq!(
        store.group_offsets("g").unwrap(),
        vec![("b".to_string(), 0, 0)]
    );
    // Re-creating it starts an empty log.
    store.create_topic("a", TopicConfig::default(), 0).unwrap();
    assert_eq!(store.partition_state("a", 0).unwrap().high_watermark, 0);
}

#[test]
fn read_stops_near_max_bytes_but_returns_at_least_one_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store.create_topic("t", TopicConfig::default(), 0).unwrap();
    for i in 0..10 {
        store
            .append(plain("t", 0, records(10, 0, &format!("b{i}"))))
            .unwrap();
    }
    assert_eq!(
        store.read("t", 0, 0, 1).unwrap().records.len(),
        10,
        "one whole batch"
    );
    assert_eq!(
        store.read("t", 0, 95, 1).unwrap().records.len(),
        5,
        "rest of the batch"
    );
    let some = store.read("t", 0, 0, 3000).unwrap().records.len();
    assert!(some > 10 && some < 100, "{some}");
    assert!(store.read("t", 0, 100, 1).unwrap().records.is_empty());
    assert!(matches!(
        store.read("t", 0, 101, 1),
        Err(StoreError::OffsetOutOfRange { .. })
    ));
}

#[test]
fn a_file_that_is_not_a_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(meshlog::store::DB_FILE_NAME);
    let mut garbage = vec![0u8; 64 * 1024];
    for (i, b) in garbage.iter_mut().enumerate() {
        *b = (i * 7 + 13) as u8;
    }
    std::fs::write(&path, &garbage).unwrap();
    let err = Store::open(dir.path(), true)
        .err()
        .expect("garbage must not open");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("meshlog.redb"), "{err}");
}

#[test]
fn a_truncated_database_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(&dir);
        store.create_topic("t", TopicConfig::default(), 0).unwrap();
        store.append(plain("t", 0, records(50, 0, "r"))).unwrap();
    }
    let path = dir.path().join(meshlog::store::DB_FILE_NAME);
    let full = std::fs::read(&path).unwrap();
    for cut in [0, 17, 512, 4096, full.len() / 2, full.len() - 1] {
        std::fs::write(&path, &full[..cut]).unwrap();
        // Either it opens (redb repairs to an earlier commit) and verifies, or it is an error.
        if let Ok(store) = Store::open(dir.path(), true)
            && let Ok(topic) = store.topic("t")
        {
            assert_eq!(topic.name, "t");
            store.verify_partition("t", 0).unwrap();
        }
    }
}

#[test]
fn a_tampered_last_batch_is_detected_on_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(&dir);
        store.create_topic("t", TopicConfig::default(), 0).unwrap();
        store.append(plain("t", 0, records(3, 0, "a"))).unwrap();
        store.append(plain("t", 0, records(3, 0, "b"))).unwrap();
    }
    let path = dir.path().join(meshlog::store::DB_FILE_NAME);
    {
        // Rewrite one byte of a stored record's value, leaving the encoding valid.
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<(u32, u32, u64), &[u8]> =
                redb::TableDefinition::new("batches");
            let mut table = txn.open_table(def).unwrap();
            let mut bytes = table.get((0, 0, 3)).unwrap().unwrap().value().to_vec();
            let pos = bytes.windows(3).position(|w| w == b"b-1").unwrap();
            bytes[pos] = b'c';
            table.insert((0, 0, 3), bytes.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let err = Store::open(dir.path(), true)
        .err()
        .expect("tampering must be detected");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("chain head mismatch"), "{err}");
}

#[test]
fn a_second_opener_is_told_the_store_is_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(&dir);
    assert!(matches!(
        Store::open(dir.path(), true),
        Err(StoreError::InUse { .. })
    ));
}

#[test]
fn a_large_append_is_stored_in_chunks_and_retried_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store.create_topic("t", TopicConfig::default(), 0).unwrap();
    let p = ProducerId(3);
    let genesis = chain::producer_genesis(p, "t", 0);
    let big: Vec<Record> = (0..300)
        .map(|i| Record::new(vec![i as u8; 2000], i))
        .collect();
    let appended = store
        .append(idempotent("t", p, 0, genesis, big.clone()))
        .unwrap();
    assert_eq!(appended.ids.len(), 300);
    assert_eq!(
        appended.producer_head,
        Some(producer_head(genesis, p, 0, &big))
    );
    let read = store.read("t", 0, 0, usize::MAX).unwrap().records;
    assert_eq!(
        read.iter().map(|r| r.offset).collect::<Vec<_>>(),
        (0..300).collect::<Vec<_>>()
    );
    assert_eq!(read.iter().map(|r| r.id).collect::<Vec<_>>(), appended.ids);
    assert_eq!(store.verify_partition("t", 0).unwrap().records, 300);
    let retry = store.append(idempotent("t", p, 0, genesis, big)).unwrap();
    assert!(retry.duplicate);
    assert_eq!(
        (retry.ids, retry.producer_head),
        (appended.ids, appended.producer_head)
    );
    assert_eq!(store.partition_state("t", 0).unwrap().high_watermark, 300);
}

#[test]
fn a_retry_with_other_records_is_refused_not_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store.create_topic("t", TopicConfig::default(), 0).unwrap();
    let p = ProducerId(5);
    let genesis = chain::producer_genesis(p, "t", 0);
    store
        .append(idempotent("t", p, 0, genesis, records(2, 1, "real")))
        .unwrap();
    // Same producer, sequence and count, other content: not a retry.
    let forged = store
        .append(idempotent("t", p, 0, genesis, records(2, 1, "other")))
        .unwrap_err();
    assert!(
        matches!(forged, StoreError::ProducerChainMismatch { seq: 0, .. }),
        "{forged}"
    );
    assert_eq!(store.partition_state("t", 0).unwrap().high_watermark, 2);
}

#[test]
fn a_retry_of_a_batch_retention_dropped_is_stale_and_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let config = TopicConfig::default()
        .with_segment_bytes(1024)
        .with_retention(Retention {
            time: None,
            bytes: Some(1),
        });
    store.create_topic("t", config, 0).unwrap();
    let p = ProducerId(6);
    let genesis = chain::producer_genesis(p, "t", 0);
    let first = records(20, 1, "first");
    let head = producer_head(genesis, p, 0, &first);
    store
        .append(idempotent("t", p, 0, genesis, first.clone()))
        .unwrap();
    store
        .append(idempotent("t", p, 20, head, records(20, 1, "second")))
        .unwrap();
    store
        .write(vec![WriteOp::EnforceRetention { now_ms: 0 }])
        .unwrap();
    assert_eq!(store.partition_state("t", 0).unwrap().log_start_offset, 20);
    let results = store
        .write(vec![
            WriteOp::Append(idempotent("t", p, 0, genesis, first)),
            WriteOp::CommitOffsets {
                group: "g".into(),
                offsets: vec![("t".into(), 0, 20)],
            },
        ])
        .unwrap();
    assert!(
        matches!(results[0], Err(StoreError::StaleSequence { seq: 0, .. })),
        "{results:?}"
    );
    assert!(matches!(results[1], Ok(WriteOutcome::OffsetsCommitted)));
}

#[test]
fn idle_producers_expire_after_a_day_and_start_over() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store.create_topic("t", TopicConfig::default(), 0).unwrap();
    let (idle, busy) = (ProducerId(7), ProducerId(8));
    let now = 100 * DAY_MS;
    let g = |p| chain::producer_genesis(p, "t", 0);
    store
        .append(idempotent(
            "t",
            idle,
            0,
            g(idle),
            records(2, now - 2 * DAY_MS, "idle"),
        ))
        .unwrap();
    store
        .append(idempotent(
            "t",
            busy,
            0,
            g(busy),
            records(2, now - 1000, "busy"),
        ))
        .unwrap();
    store
        .write(vec![WriteOp::EnforceRetention { now_ms: now }])
        .unwrap();
    assert!(
        store.producer_state("t", 0, idle).unwrap().is_none(),
        "idle producer expired"
    );
    assert!(
        store.producer_state("t", 0, busy).unwrap().is_some(),
        "busy producer kept"
    );
    // The expired producer's old sequence is a gap now; starting over works.
    let gap = store
        .append(idempotent("t", idle, 2, g(idle), records(1, now, "x")))
        .unwrap_err();
    assert!(
        matches!(gap, StoreError::SequenceGap { expected: 0, .. }),
        "{gap}"
    );
    store
        .append(idempotent("t", idle, 0, g(idle), records(1, now, "again")))
        .unwrap();
}
