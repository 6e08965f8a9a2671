//! A replicated partition's log in the store: entries enter only when they
//! extend the log, a peer's forged batch is refused with nothing stored, an
//! uncommitted suffix can be cut (rolling back producer state) and a
//! committed one cannot.

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
