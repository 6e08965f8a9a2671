//! A replicated partition's log in the store: entries enter only when they
//! extend the log, a peer's forged batch is refused with nothing stored, an
//! uncommitted suffix can be cut (rolling back producer state) and a
//! committed one cannot; a replica restarted at a leader's log start takes the
//! idempotent producers' states there and ends with the leader's.

use std::sync::Arc;

use meshlog::chain::{self, MessageId, ProducerId};
use meshlog::core::replication::LogEntry;
use meshlog::error::StoreError;
use meshlog::store::{ReplicatedEntry, Store, WriteOp, WriteOutcome};
use meshlog::wire::{self, BatchHeader, ProducerBatch, StoredBatch};
use meshlog::{Record, TopicConfig};

const TOPIC: &str = "r";

fn store_with_topic(dir: &tempfile::TempDir) -> Store {
    let store = Store::open(dir.path(), false).expect("open");
    store
        .create_topic(TOPIC, TopicConfig::default(), 0)
        .expect("create");
    store
}

/// A batch of `values` after `prev` (record chain) and its log entry after
/// `prev_entry` at entry `index`.
fn batch_entry(
    epoch: u64,
    base_offset: u64,
    prev: MessageId,
    index: u64,
    prev_entry: MessageId,
    values: &[&str],
    producer: Option<ProducerBatch>,
) -> (ReplicatedEntry, MessageId) {
    let records: Vec<Record> = values.iter().map(|v| Record::new(*v, 1)).collect();
    let digests: Vec<MessageId> = records.iter().map(chain::record_digest).collect();
    let mut header = BatchHeader {
        epoch,
        base_offset,
        prev_id: prev,
        last_id: prev,
        producer,
    };
    header.last_id = *wire::chain_ids(&header, &digests).last().expect("records");
    let last_id = header.last_id;
    let bytes = wire::encode(&StoredBatch { header, records }).expect("encode");
    let id = chain::partition_link(&prev_entry, epoch, index, None, &last_id);
    let entry = LogEntry {
        epoch,
        digest: last_id,
        id,
        config: None,
    };
    (
        ReplicatedEntry {
            entry,
            batch: Some(Arc::new(bytes)),
        },
        last_id,
    )
}

fn replicate(
    store: &Store,
    truncate_from: u64,
    entries: Vec<ReplicatedEntry>,
) -> Result<WriteOutcome, StoreError> {
    let op = WriteOp::ReplicateLog {
        topic: TOPIC.into(),
        partition: 0,
        truncate_from,
        entries,
    };
    store
        .write(vec![op])
        .expect("transaction")
        .pop()
        .expect("one outcome")
}

#[test]
fn a_forged_batch_is_refused_and_nothing_of_it_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_topic(&dir);
    let genesis = chain::partition_genesis(TOPIC, 0);
    let (first, head) = batch_entry(1, 0, genesis, 0, genesis, &["a", "b"], None);
    replicate(&store, 0, vec![first.clone()]).expect("a batch that extends the log");

    // Records swapped under a header that claims the originals' chain.
    let (mut forged, _) = batch_entry(1, 2, head, 1, first.entry.id, &["c"], None);
    let mut batch = wire::decode_batch(forged.batch.as_ref().unwrap()).unwrap();
    batch.records[0] = Record::new("evil", 1);
    forged.batch = Some(Arc::new(wire::encode(&batch).unwrap()));
    let refused = replicate(&store, 1, vec![forged]);
    assert!(
        matches!(refused, Err(StoreError::Diverged { .. })),
        "{refused:?}"
    );

    // A batch that skips offsets is refused too.
    let (gap, _) = batch_entry(1, 5, head, 1, first.entry.id, &["c"], None);
    assert!(matches!(
        replicate(&store, 1, vec![gap]),
        Err(StoreError::Diverged { .. })
    ));

    let state = store.partition_state(TOPIC, 0).unwrap();
    assert_eq!((state.log_end_offset, state.head), (2, head));
    assert_eq!(store.replica_log(TOPIC, 0).unwrap().entries.len(), 1);
}

#[test]
fn an_uncommitted_suffix_is_cut_with_its_producer_state_and_a_committed_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_topic(&dir);
    let genesis = chain::partition_genesis(TOPIC, 0);
    let producer = ProducerId(7);
    let pb = |seq, prev| ProducerBatch {
        producer,
        base_seq: seq,
        prev,
    };
    let p0 = chain::producer_genesis(producer, TOPIC, 0);
    let (e0, h0) = batch_entry(1, 0, genesis, 0, genesis, &["a"], Some(pb(0, p0)));
    let after_a = wire::producer_head(&pb(0, p0), &[chain::record_digest(&Record::new("a", 1))]);
    let (e1, _) = batch_entry(1, 1, h0, 1, e0.entry.id, &["b"], Some(pb(1, after_a)));
    replicate(&store, 0, vec![e0.clone(), e1]).expect("two batches");
    assert_eq!(
        store
            .producer_state(TOPIC, 0, producer)
            .unwrap()
            .unwrap()
            .next_seq,
        2
    );

    // A new leader replaces entry 1: the producer is back at sequence 1.
    let (other, h1) = batch_entry(2, 1, h0, 1, e0.entry.id, &["x"], None);
    replicate(&store, 1, vec![other]).expect("cut and replace");
    let state = store.partition_state(TOPIC, 0).unwrap();
    assert_eq!((state.log_end_offset, state.head), (2, h1));
    let producer_state = store.producer_state(TOPIC, 0, producer).unwrap().unwrap();
    assert_eq!((producer_state.next_seq, producer_state.head), (1, after_a));

    // Once committed, entries cannot be cut.
    let op = WriteOp::SetHighWatermark {
        topic: TOPIC.into(),
        partition: 0,
        high_watermark: 2,
    };
    store.write(vec![op]).unwrap().pop().unwrap().unwrap();
    let (late, _) = batch_entry(3, 1, h0, 1, e0.entry.id, &["y"], None);
    assert!(matches!(
        replicate(&store, 1, vec![late]),
        Err(StoreError::Diverged { .. })
    ));
    let read = store.read(TOPIC, 0, 0, 1 << 20).unwrap();
    let values: Vec<&[u8]> = read.records.iter().map(|r| r.value()).collect();
    assert_eq!(values, vec![b"a".as_slice(), b"x".as_slice()]);
    drop(store);
    // The log survives a reopen, chain checked.
    let store = Store::open(dir.path(), false).expect("reopen");
    assert_eq!(store.replica_log(TOPIC, 0).unwrap().entries.len(), 2);
    store
        .verify_partition(TOPIC, 0)
        .expect("the chain verifies");
}

/// A replicated log of `count` one-record entries (about 1 KiB each) in
/// small segments; returns the entries' IDs and record IDs.
/// Idempotent producers of [`long_log`]: one that writes only its first
/// 20 batches, one that writes every third batch throughout.
const EARLY: ProducerId = ProducerId(1);
const STEADY: ProducerId = ProducerId(2);

/// The producer stamp of batch `i` of [`long_log`], if any, advancing `chains`.
fn long_log_stamp(
    i: u64,
    value: &str,
    chains: &mut std::collections::BTreeMap<ProducerId, ProducerBatch>,
) -> Option<ProducerBatch> {
    let producer = match i {
        _ if i % 3 == 0 => STEADY,
        _ if i < 20 => EARLY,
        _ => return None,
    };
    let stamp = chains.entry(producer).or_insert(ProducerBatch {
        producer,
        base_seq: 0,
        prev: chain::producer_genesis(producer, TOPIC, 0),
    });
    let first = stamp.clone();
    let digest = chain::record_digest(&Record::new(value, 1));
    *stamp = ProducerBatch {
        producer,
        base_seq: first.base_seq + 1,
        prev: wire::producer_head(&first, &[digest]),
    };
    Some(first)
}

fn long_log(store: &Store, count: u64) -> (Vec<MessageId>, Vec<MessageId>) {
    let genesis = chain::partition_genesis(TOPIC, 0);
    let (mut prev, mut prev_entry) = (genesis, genesis);
    let (mut entry_ids, mut record_ids) = (Vec::new(), Vec::new());
    let value = "v".repeat(1000);
    let mut chains = std::collections::BTreeMap::new();
    for i in 0..count {
        let stamp = long_log_stamp(i, &value, &mut chains);
        let (entry, head) = batch_entry(1, i, prev, i, prev_entry, &[value.as_str()], stamp);
        prev_entry = entry.entry.id;
        prev = head;
        entry_ids.push(prev_entry);
        record_ids.push(head);
        replicate(store, i, vec![entry]).expect("extends the log");
    }
    let op = WriteOp::SetHighWatermark {
        topic: TOPIC.into(),
        partition: 0,
        high_watermark: count,
    };
    store.write(vec![op]).expect("transaction");
    (entry_ids, record_ids)
}

fn enforce_retention(store: &Store) {
    let op = WriteOp::EnforceRetention { now_ms: 0 };
    store.write(vec![op]).expect("transaction");
}

#[test]
fn retention_keeps_a_replicated_log_from_its_snapshot_point_and_says_where_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), false).expect("open");
    let config = TopicConfig::default()
        .with_segment_bytes(4 * 1024)
        .with_retention(meshlog::Retention {
            time: None,
            bytes: Some(8 * 1024),
        });
    store.create_topic(TOPIC, config, 0).expect("create");
    let (entry_ids, record_ids) = long_log(&store, 100);

    // Without a snapshot point nothing is known compacted: nothing goes.
    enforce_retention(&store);
    assert_eq!(store.partition_state(TOPIC, 0).unwrap().log_start_offset, 0);

    // Entries below 60 are compacted: retention may drop segments below them only.
    let point = meshlog::store::SnapshotRow {
        snapshot: meshlog::core::replication::Snapshot {
            index: 60,
            last_id: entry_ids[59],
            last_epoch: 1,
            members: meshlog::core::replication::ReplicaSet::default(),
        },
        record_end: 60,
        record_head: record_ids[59],
    };
    let op = WriteOp::SetSnapshot {
        topic: TOPIC.into(),
        partition: 0,
        snapshot: point,
    };
    store.write(vec![op]).expect("transaction");
    enforce_retention(&store);
    let state = store.partition_state(TOPIC, 0).unwrap();
    assert!(
        state.log_start_offset > 0 && state.log_start_offset <= 60,
        "dropped below the snapshot point only: log start {}",
        state.log_start_offset
    );
    let start = state.log_start_offset;
    // The entries of dropped records are gone; the store says where it starts.
    match store.stored_entries(TOPIC, 0, 0, 10).expect("read") {
        meshlog::store::StoredEntries::Dropped(at) => {
            assert_eq!(at.snapshot.index, start);
            assert_eq!(at.snapshot.last_id, entry_ids[start as usize - 1]);
            assert_eq!(at.record_end, start);
            assert_eq!(at.record_head, record_ids[start as usize - 1]);
        }
        other => panic!("entries before the log start: {other:?}"),
    }
    match store
        .stored_entries(TOPIC, 0, start, start + 5)
        .expect("read")
    {
        meshlog::store::StoredEntries::Entries(prev, rows) => {
            assert_eq!(prev, entry_ids[start as usize - 1]);
            assert_eq!(rows.len(), 5);
        }
        other => panic!("entries from the log start: {other:?}"),
    }
    let log = store.replica_log(TOPIC, 0).expect("log");
    assert_eq!(log.snapshot.map(|p| p.snapshot.index), Some(60));
    assert_eq!(
        log.entries.len(),
        40,
        "a restart reads the tail from the snapshot point"
    );

    // Another replica restarted at that log start takes the entries after it.
    let other_dir = tempfile::tempdir().unwrap();
    let other = store_with_topic(&other_dir);
    let meshlog::store::StoredEntries::Dropped(at) = store.stored_entries(TOPIC, 0, 0, 1).unwrap()
    else {
        panic!("a log start");
    };
    // With the producers' states there, as a leader sends them.
    let producers = store.producers_at(TOPIC, 0, at.record_end).expect("read");
    assert!(
        producers.iter().any(|(p, _)| *p == EARLY) || start <= 19,
        "a producer that wrote only before the log start is sent: {producers:?}"
    );
    let op = WriteOp::InstallSnapshot {
        topic: TOPIC.into(),
        partition: 0,
        point: at,
        producers,
    };
    other
        .write(vec![op])
        .expect("transaction")
        .pop()
        .unwrap()
        .expect("installed");
    let meshlog::store::StoredEntries::Entries(_, rows) =
        store.stored_entries(TOPIC, 0, start, 100).unwrap()
    else {
        panic!("entries");
    };
    let entries: Vec<ReplicatedEntry> = rows
        .iter()
        .map(|row| ReplicatedEntry {
            entry: row.entry.clone(),
            batch: store
                .batch_bytes(TOPIC, 0, row.base_offset)
                .unwrap()
                .map(Arc::new),
        })
        .collect();
    replicate(&other, start, entries).expect("the entries after the log start extend it");
    let mine = other.partition_state(TOPIC, 0).unwrap();
    assert_eq!((mine.log_start_offset, mine.log_end_offset), (start, 100));
    assert_eq!(mine.head, record_ids[99]);
    // Its idempotent producers stand where the leader's do: their retries
    // are answered the same once it leads.
    for producer in [EARLY, STEADY] {
        let theirs = store.producer_state(TOPIC, 0, producer).unwrap();
        assert!(theirs.is_some(), "the leader knows {producer:?}");
        assert_eq!(
            other.producer_state(TOPIC, 0, producer).unwrap(),
            theirs,
            "{producer:?} after a restart at the log start {start}"
        );
    }
}

#[test]
fn records_a_replica_knows_committed_are_readable_before_the_high_watermark_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_topic(&dir);
    let genesis = chain::partition_genesis(TOPIC, 0);
    let (first, head) = batch_entry(1, 0, genesis, 0, genesis, &["a", "b"], None);
    let (second, _) = batch_entry(1, 2, head, 1, first.entry.id, &["c"], None);
    replicate(&store, 0, vec![first, second]).expect("two batches");
    assert_eq!(store.partition_state(TOPIC, 0).unwrap().high_watermark, 0);

    // With the stored high watermark alone nothing is readable yet.
    let read = store.read(TOPIC, 0, 0, 1 << 20).expect("read");
    assert!(read.records.is_empty());
    assert_eq!(read.high_watermark, 0);

    // Known committed up to 2: "a" and "b", not "c".
    let read = store.read_committed(TOPIC, 0, 0, 1 << 20, 2).expect("read");
    let values: Vec<&[u8]> = read.records.iter().map(|r| r.value()).collect();
    assert_eq!(values, vec![&b"a"[..], b"b"]);
    assert_eq!(read.high_watermark, 2);

    // Never past what the store holds.
    let read = store
        .read_committed(TOPIC, 0, 0, 1 << 20, 99)
        .expect("read");
    assert_eq!((read.records.len(), read.high_watermark), (3, 3));
    assert!(matches!(
        store.read_committed(TOPIC, 0, 4, 1 << 20, 99),
        Err(StoreError::OffsetOutOfRange { end: 3, .. })
    ));
    // Between the commit known here and the log end: nothing yet, no error
    // (a reader that saw offset 3 committed on another replica).
    let read = store.read_committed(TOPIC, 0, 3, 1 << 20, 2).expect("read");
    assert!(read.records.is_empty());
    assert_eq!(read.high_watermark, 2);
}
