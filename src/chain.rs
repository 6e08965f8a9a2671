//! Hash-chained message IDs.
//!
//! Every record gets a 32-byte blake3 ID that commits it and everything before it:
//!
//! - **Partition chain** (written by the partition's leader):
//!   `id[n] = blake3(id[n-1] ‖ epoch ‖ offset ‖ producer ‖ seq ‖ digest(record))`, starting
//!   from a fixed genesis per (topic, partition). Equal IDs at offset `n` mean equal
//!   logs up to `n`, so replicas agree by comparing heads and find where they diverge
//!   by binary search ([`first_divergence`]).
//! - **Producer chain** (written by an idempotent producer, per partition):
//!   `p[s] = blake3(p[s-1] ‖ producer ‖ seq ‖ digest(record))`. The log rejects a batch whose
//!   previous producer hash is not the one it holds, and a consumer can check that it
//!   saw a producer's stream whole and in order ([`ProducerChainVerifier`]).
//!
//! `digest(record) = blake3(timestamp ‖ key ‖ value ‖ headers)` ([`record_digest`])
//! covers the whole record, headers included, so none of it can be altered
//! unnoticed; variable-length fields are length-prefixed so that no two different
//! records hash the same input. Hashing a digest rather than the record itself
//! keeps each chain link to two blake3 blocks, and lets the digests be computed in
//! parallel, off the writer's path, before the chain order is known.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ChainError;
use crate::record::Record;

/// Number of bytes in a [`MessageId`].
pub const ID_LEN: usize = 32;

/// A 32-byte blake3 hash identifying a record and, through the chain, its whole prefix.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(pub [u8; ID_LEN]);

impl MessageId {
    /// The ID's bytes.
    pub fn as_bytes(&self) -> &[u8; ID_LEN] {
        &self.0
    }

    /// The full ID in lowercase hex (64 characters).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The first 12 hex characters: how IDs are shown to people.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.short())
    }
}

/// The identity of an idempotent producer: random, chosen once per producer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProducerId(pub u64);

impl fmt::Display for ProducerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for ProducerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProducerId({self})")
    }
}

/// Who wrote a record: an idempotent producer and the record's sequence number in
/// that producer's stream for the partition.
pub type ProducerStamp = Option<(ProducerId, u64)>;

const PARTITION_GENESIS_DOMAIN: &[u8] = b"meshlog/partition-genesis/v1";
const PRODUCER_GENESIS_DOMAIN: &[u8] = b"meshlog/producer-genesis/v1";

/// The fixed ID that precedes offset 0 of a partition.
pub fn partition_genesis(topic: &str, partition: u32) -> MessageId {
    hash_link(|buf| {
        buf.extend_from_slice(PARTITION_GENESIS_DOMAIN);
        put_bytes(buf, topic.as_bytes());
        buf.extend_from_slice(&partition.to_le_bytes());
    })
}

/// The ID that precedes a producer's first record (sequence 0) in a partition.
pub fn producer_genesis(producer: ProducerId, topic: &str, partition: u32) -> MessageId {
    hash_link(|buf| {
        buf.extend_from_slice(PRODUCER_GENESIS_DOMAIN);
        buf.extend_from_slice(&producer.0.to_le_bytes());
        put_bytes(buf, topic.as_bytes());
        buf.extend_from_slice(&partition.to_le_bytes());
    })
}

/// The digest of one record: what both chains hash in place of the record.
pub fn record_digest(record: &Record) -> MessageId {
    hash_link(|buf| put_record(buf, record))
}

/// One link of the partition chain: the ID of the record at `offset`, given the ID
/// of the record before it and the record's [`record_digest`].
pub fn partition_link(
    prev: &MessageId,
    epoch: u64,
    offset: u64,
    stamp: ProducerStamp,
    digest: &MessageId,
) -> MessageId {
    hash_link(|buf| {
        buf.extend_from_slice(&prev.0);
        buf.extend_from_slice(&epoch.to_le_bytes());
        buf.extend_from_slice(&offset.to_le_bytes());
        match stamp {
            Some((producer, seq)) => {
                buf.push(1);
                buf.extend_from_slice(&producer.0.to_le_bytes());
                buf.extend_from_slice(&seq.to_le_bytes());
            }
            None => buf.push(0),
        }
        buf.extend_from_slice(&digest.0);
    })
}

/// One link of a producer chain: the producer hash after record `seq`, given the
/// hash after the record before it and the record's [`record_digest`].
pub fn producer_link(
    prev: &MessageId,
    producer: ProducerId,
    seq: u64,
    digest: &MessageId,
) -> MessageId {
    hash_link(|buf| {
        buf.extend_from_slice(&prev.0);
        buf.extend_from_slice(&producer.0.to_le_bytes());
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(&digest.0);
    })
}

/// Hashes what `fill` writes, in one call: assembling the input in a reused
/// buffer and hashing it whole is about twice as fast as many small
/// `Hasher::update` calls for records of a few hundred bytes.
fn hash_link(fill: impl FnOnce(&mut Vec<u8>)) -> MessageId {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        buf.clear();
        fill(&mut buf);
        let id = MessageId(*blake3::hash(&buf).as_bytes());
        if buf.capacity() > 1 << 20 {
            // Do not keep a large record's buffer alive forever.
            *buf = Vec::new();
        }
        id
    })
}

fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    buf.extend_from_slice(bytes);
}

fn put_record(buf: &mut Vec<u8>, record: &Record) {
    buf.extend_from_slice(&record.timestamp.to_le_bytes());
    match &record.key {
        Some(key) => {
            buf.push(1);
            put_bytes(buf, key);
        }
        None => buf.push(0),
    }
    put_bytes(buf, &record.value);
    buf.extend_from_slice(&(record.headers.len() as u64).to_le_bytes());
    for header in &record.headers {
        put_bytes(buf, header.key.as_bytes());
        put_bytes(buf, &header.value);
    }
}

/// One record as the partition chain sees it.
#[derive(Clone, Copy, Debug)]
pub struct ChainEntry<'a> {
    /// The leader epoch the record was written in.
    pub epoch: u64,
    /// The record's offset.
    pub offset: u64,
    /// The idempotent producer and sequence, if any.
    pub stamp: ProducerStamp,
    /// The record.
    pub record: &'a Record,
}

/// Recomputes the chain over `entries`, starting after `prev` at offset
/// `first_offset`, and checks that it ends at `expected_head`.
///
/// Any changed, dropped, duplicated or reordered record makes it fail: offsets
/// must run on without gaps, and the recomputed head must equal the expected one.
/// Returns the number of records checked.
pub fn verify_run<'a>(
    prev: MessageId,
    first_offset: u64,
    entries: impl IntoIterator<Item = ChainEntry<'a>>,
    expected_head: &MessageId,
) -> Result<u64, ChainError> {
    let mut head = prev;
    let mut next_offset = first_offset;
    for entry in entries {
        if entry.offset != next_offset {
            return Err(ChainError::OffsetGap {
                expected: next_offset,
                found: entry.offset,
            });
        }
        let digest = record_digest(entry.record);
        head = partition_link(&head, entry.epoch, entry.offset, entry.stamp, &digest);
        next_offset += 1;
    }
    if head != *expected_head {
        return Err(ChainError::HeadMismatch {
            expected: *expected_head,
            computed: head,
        });
    }
    Ok(next_offset - first_offset)
}

/// Finds the first offset in `start..end` at which two logs hold different IDs,
/// by binary search: since an ID commits its whole prefix, "same ID at `n`" holds
/// for every offset below the divergence point and for none from it on.
///
/// `same_at(offset)` reports whether both logs have the same ID at `offset`; it
/// may fail (for example when reading a remote log), and its error is returned.
/// `None` means the logs agree on the whole range. Calls `same_at` at most
/// `log2(end - start) + 1` times.
pub fn first_divergence<E>(
    start: u64,
    end: u64,
    mut same_at: impl FnMut(u64) -> Result<bool, E>,
) -> Result<Option<u64>, E> {
    let (mut lo, mut hi) = (start, end);
    // Invariant: every offset below `lo` is the same; the answer lies in lo..=hi.
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if same_at(mid)? {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok((lo < end).then_some(lo))
}

/// Checks, record by record, that a consumer saw each idempotent producer's stream
/// for one partition whole and in order, and reports each producer's chain head.
///
/// Compare [`ProducerChainVerifier::head`] with the head the producer reports
/// (`Producer::chain_head`) to know the stream arrived unaltered end to end.
#[derive(Debug, Default)]
pub struct ProducerChainVerifier {
    /// Per producer: the next expected sequence and the chain hash so far.
    producers: BTreeMap<ProducerId, (u64, MessageId)>,
}

impl ProducerChainVerifier {
    /// A verifier that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next record of the partition, in offset order. Records without a
    /// producer stamp are ignored. The first record seen from a producer must be
    /// its sequence 0, so the chain starts at the producer genesis.
    pub fn observe(
        &mut self,
        topic: &str,
        partition: u32,
        stamp: ProducerStamp,
        record: &Record,
    ) -> Result<(), ChainError> {
        let Some((producer, seq)) = stamp else {
            return Ok(());
        };
        let (expected, head) = self
            .producers
            .entry(producer)
            .or_insert_with(|| (0, producer_genesis(producer, topic, partition)));
        if seq != *expected {
            return Err(ChainError::SequenceGap {
                producer,
                expected: *expected,
                found: seq,
            });
        }
        *head = producer_link(head, producer, seq, &record_digest(record));
        *expected += 1;
        Ok(())
    }

    /// The producer's chain head and the number of its records seen so far.
    pub fn head(&self, producer: ProducerId) -> Option<(u64, MessageId)> {
        self.producers.get(&producer).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn records(values: &[Vec<u8>]) -> Vec<Record> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| Record::new(v.clone(), i as i64).with_key(format!("k{}", i % 3)))
            .collect()
    }

    /// Builds the chain over `records` from genesis; returns the IDs.
    fn chain_ids(records: &[Record]) -> Vec<MessageId> {
        let mut prev = partition_genesis("t", 0);
        records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                prev = partition_link(&prev, 1, i as u64, None, &record_digest(r));
                prev
            })
            .collect()
    }

    fn entries(records: &[Record]) -> Vec<ChainEntry<'_>> {
        records
            .iter()
            .enumerate()
            .map(|(i, r)| ChainEntry {
                epoch: 1,
                offset: i as u64,
                stamp: None,
                record: r,
            })
            .collect()
    }

    fn verify(records: &[Record], head: &MessageId) -> Result<u64, ChainError> {
        verify_run(partition_genesis("t", 0), 0, entries(records), head)
    }

    #[test]
    fn intact_chain_verifies() {
        let recs = records(&[b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        let head = *chain_ids(&recs).last().unwrap();
        assert_eq!(verify(&recs, &head).unwrap(), 3);
    }

    #[test]
    fn genesis_differs_per_partition_and_topic() {
        assert_ne!(partition_genesis("t", 0), partition_genesis("t", 1));
        assert_ne!(partition_genesis("t", 0), partition_genesis("u", 0));
        assert_ne!(
            producer_genesis(ProducerId(1), "t", 0),
            producer_genesis(ProducerId(2), "t", 0)
        );
    }

    #[test]
    fn epoch_and_stamp_are_part_of_the_id() {
        let r = Record::new(b"v".to_vec(), 0);
        let g = partition_genesis("t", 0);
        let d = record_digest(&r);
        let base = partition_link(&g, 1, 0, None, &d);
        assert_ne!(base, partition_link(&g, 2, 0, None, &d));
        assert_ne!(base, partition_link(&g, 1, 0, Some((ProducerId(0), 0)), &d));
        let with_header = r.clone().with_header("h", b"x".to_vec());
        assert_ne!(
            base,
            partition_link(&g, 1, 0, None, &record_digest(&with_header))
        );
    }

    #[test]
    fn divergence_found_by_binary_search() {
        let a = records(&[b"1".to_vec(), b"2".to_vec(), b"3".to_vec(), b"4".to_vec()]);
        let mut b = a.clone();
        b[2].value = b"x".to_vec();
        let (ia, ib) = (chain_ids(&a), chain_ids(&b));
        let mut calls = 0;
        let found = first_divergence::<()>(0, 4, |o| {
            calls += 1;
            Ok(ia[o as usize] == ib[o as usize])
        });
        assert_eq!(found, Ok(Some(2)));
        assert!(calls <= 3);
        assert_eq!(
            first_divergence::<()>(0, 4, |o| Ok(ia[o as usize] == ia[o as usize])),
            Ok(None)
        );
    }

    #[test]
    fn producer_verifier_detects_gap_and_tracks_head() {
        let p = ProducerId(7);
        let recs = records(&[b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        let mut v = ProducerChainVerifier::new();
        v.observe("t", 0, Some((p, 0)), &recs[0]).unwrap();
        let err = v.observe("t", 0, Some((p, 2)), &recs[2]).unwrap_err();
        assert!(matches!(
            err,
            ChainError::SequenceGap {
                expected: 1,
                found: 2,
                ..
            }
        ));
        v.observe("t", 0, Some((p, 1)), &recs[1]).unwrap();
        let expected = producer_link(
            &producer_link(&producer_genesis(p, "t", 0), p, 0, &record_digest(&recs[0])),
            p,
            1,
            &record_digest(&recs[1]),
        );
        assert_eq!(v.head(p), Some((2, expected)));
    }

    /// A tampering applied to an intact log.
    #[derive(Clone, Debug)]
    enum Tamper {
        Change { index: usize, byte: u8 },
        Drop { index: usize },
        Duplicate { index: usize },
        Swap { index: usize },
    }

    fn tamper_strategy() -> impl Strategy<Value = Tamper> {
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(index, byte)| Tamper::Change { index, byte }),
            any::<usize>().prop_map(|index| Tamper::Drop { index }),
            any::<usize>().prop_map(|index| Tamper::Duplicate { index }),
            any::<usize>().prop_map(|index| Tamper::Swap { index }),
        ]
    }

    /// Applies `t`; returns false when it would leave the log unchanged (for
    /// example swapping two equal records), which no checker can detect.
    fn apply(recs: &mut Vec<Record>, t: &Tamper) -> bool {
        let n = recs.len();
        match *t {
            Tamper::Change { index, byte } => {
                let r = &mut recs[index % n];
                let pos = byte as usize % (r.value.len() + 1);
                if pos == r.value.len() {
                    r.value.push(byte);
                } else {
                    r.value[pos] ^= byte | 1;
                }
            }
            Tamper::Drop { index } => {
                recs.remove(index % n);
            }
            Tamper::Duplicate { index } => {
                let r = recs[index % n].clone();
                recs.insert(index % n, r);
            }
            Tamper::Swap { index } => {
                if n < 2 {
                    return false;
                }
                let i = index % (n - 1);
                if recs[i] == recs[i + 1] {
                    return false;
                }
                recs.swap(i, i + 1);
            }
        }
        true
    }

    proptest! {
        #[test]
        fn any_tampering_is_detected(
            values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..16), 1..24),
            tamper in tamper_strategy(),
        ) {
            let original = records(&values);
            let head = *chain_ids(&original).last().unwrap();
            let mut tampered = original.clone();
            prop_assume!(apply(&mut tampered, &tamper));
            prop_assert!(verify(&tampered, &head).is_err(), "undetected {:?}", tamper);
        }

        #[test]
        fn divergence_is_the_first_differing_offset(
            values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..8), 1..40),
            at in any::<usize>(),
        ) {
            let a = records(&values);
            let mut b = a.clone();
            let at = at % a.len();
            b[at].value.push(0xff);
            let (ia, ib) = (chain_ids(&a), chain_ids(&b));
            let found = first_divergence::<()>(0, a.len() as u64, |o| Ok(ia[o as usize] == ib[o as usize]));
            prop_assert_eq!(found, Ok(Some(at as u64)));
        }
    }
}
