//! The encoded form of batches: one format-version byte, then postcard.
//!
//! Every frame that leaves memory (a batch on disk now, protocol messages on the
//! network later) goes through [`encode`] and [`decode`]: a size cap is checked
//! before anything is parsed, an unknown version is refused with its number, and
//! malformed bytes are a [`WireError`], never a panic.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use std::fmt;

use crate::chain::{self, ChainEntry, MessageId, ProducerId, ProducerStamp};
use crate::error::WireError;
use crate::record::Record;

/// The version byte this build writes and the only one it reads.
pub const FORMAT_VERSION: u8 = 1;

/// Hard cap on one encoded frame (a stored batch): 32 MiB. Topic limits
/// (`max_message_bytes`) are lower; this one bounds what a decoder will touch.
pub const MAX_FRAME_BYTES: usize = 32 * 1024 * 1024;

/// Hard cap on the records in one batch.
pub const MAX_BATCH_RECORDS: usize = 1_000_000;

/// Largest encoded size of one stored batch value. An append with more bytes is
/// stored as several consecutive batches, so that no database value grows huge.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// An idempotent producer's part of a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerBatch {
    /// Who wrote the batch.
    pub producer: ProducerId,
    /// Sequence number of the batch's first record in the producer's stream.
    pub base_seq: u64,
    /// The producer-chain hash before the batch's first record.
    pub prev: MessageId,
}

/// The chain state around a stored batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHeader {
    /// The leader epoch the batch was written in.
    pub epoch: u64,
    /// Offset of the first record.
    pub base_offset: u64,
    /// Partition-chain ID of the record just before the batch.
    pub prev_id: MessageId,
    /// Partition-chain ID of the batch's last record.
    pub last_id: MessageId,
    /// Set when an idempotent producer wrote the batch.
    pub producer: Option<ProducerBatch>,
}

/// A batch as the log stores it: its header, then its records. (postcard writes
/// nested structs as their fields in order, so the encoding is the header's
/// encoding followed by the records', which [`encode_prepared`] relies on.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBatch {
    /// Chain state and producer stamp.
    pub header: BatchHeader,
    /// The records, in offset order.
    pub records: Vec<Record>,
}

impl StoredBatch {
    /// Offset one past the batch's last record.
    pub fn next_offset(&self) -> u64 {
        self.header.base_offset + self.records.len() as u64
    }

    /// The producer stamp of the record at `index` in this batch.
    pub fn stamp(&self, index: usize) -> ProducerStamp {
        self.header
            .producer
            .as_ref()
            .map(|p| (p.producer, p.base_seq + index as u64))
    }

    /// The batch's records as the partition chain sees them.
    pub fn chain_entries(&self) -> impl Iterator<Item = ChainEntry<'_>> {
        self.records
            .iter()
            .enumerate()
            .map(move |(i, record)| ChainEntry {
                epoch: self.header.epoch,
                offset: self.header.base_offset + i as u64,
                stamp: self.stamp(i),
                record,
            })
    }

    /// Every record's partition-chain ID, recomputed from `prev_id`.
    pub fn ids(&self) -> Vec<MessageId> {
        let digests: Vec<MessageId> = self.records.iter().map(chain::record_digest).collect();
        chain_ids(&self.header, &digests)
    }

    /// The producer-chain hash after the batch's last record, for idempotent batches.
    pub fn producer_head(&self) -> Option<MessageId> {
        let digests: Vec<MessageId> = self.records.iter().map(chain::record_digest).collect();
        Some(producer_head(self.header.producer.as_ref()?, &digests))
    }
}

/// The partition-chain IDs of records with these digests, after `header.prev_id`.
pub fn chain_ids(header: &BatchHeader, digests: &[MessageId]) -> Vec<MessageId> {
    let mut prev = header.prev_id;
    digests
        .iter()
        .enumerate()
        .map(|(i, digest)| {
            let stamp = header
                .producer
                .as_ref()
                .map(|p| (p.producer, p.base_seq + i as u64));
            prev = chain::partition_link(
                &prev,
                header.epoch,
                header.base_offset + i as u64,
                stamp,
                digest,
            );
            prev
        })
        .collect()
}

/// The producer-chain hash after records with these digests, from `batch.prev`.
pub fn producer_head(batch: &ProducerBatch, digests: &[MessageId]) -> MessageId {
    digests
        .iter()
        .enumerate()
        .fold(batch.prev, |head, (i, digest)| {
            chain::producer_link(&head, batch.producer, batch.base_seq + i as u64, digest)
        })
}

/// Records made ready for the log: each record's digest and encoding, computed
/// by the sender, off the writer's path; split into chunks of at most
/// [`CHUNK_BYTES`] (or one record). Only [`PreparedRecords::new`] builds one,
/// so digests always match the encoded records.
#[derive(Clone)]
pub struct PreparedRecords {
    chunks: Vec<PreparedChunk>,
    len: usize,
    largest_record: usize,
}

/// One future stored batch of a [`PreparedRecords`].
#[derive(Clone)]
pub struct PreparedChunk {
    /// postcard encoding of the chunk's records, as a sequence.
    encoded_records: Vec<u8>,
    /// [`chain::record_digest`] of each record.
    digests: Vec<MessageId>,
    /// Oldest record timestamp (ms).
    min_timestamp: i64,
    /// Newest record timestamp (ms).
    max_timestamp: i64,
}

impl PreparedRecords {
    /// Digests and encodes `records`.
    pub fn new(records: &[Record]) -> Result<Self, WireError> {
        if records.len() > MAX_BATCH_RECORDS {
            return Err(WireError::Malformed(format!(
                "batch of {} records exceeds the cap of {MAX_BATCH_RECORDS}",
                records.len()
            )));
        }
        let mut chunks = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (i, record) in records.iter().enumerate() {
            let size = record.encoded_len();
            if i > start && bytes + size > CHUNK_BYTES {
                chunks.push(PreparedChunk::new(&records[start..i], bytes)?);
                (start, bytes) = (i, 0);
            }
            bytes += size;
        }
        if start < records.len() {
            chunks.push(PreparedChunk::new(&records[start..], bytes)?);
        }
        Ok(PreparedRecords {
            chunks,
            len: records.len(),
            largest_record: records.iter().map(Record::encoded_len).max().unwrap_or(0),
        })
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no records.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The largest record's [`Record::encoded_len`].
    pub fn largest_record(&self) -> usize {
        self.largest_record
    }

    /// The chunks, in order.
    pub fn chunks(&self) -> &[PreparedChunk] {
        &self.chunks
    }

    /// Where a producer's chain stands after these records, if they are sent
    /// as `first`: the next sequence and the producer-chain head.
    pub fn producer_after(&self, first: &ProducerBatch) -> ProducerBatch {
        let mut after = first.clone();
        for chunk in &self.chunks {
            after.prev = producer_head(&after, chunk.digests());
            after.base_seq += chunk.len() as u64;
        }
        after
    }
}

impl fmt::Debug for PreparedRecords {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PreparedRecords({} records in {} chunks)",
            self.len,
            self.chunks.len()
        )
    }
}

impl PreparedChunk {
    fn new(records: &[Record], estimated_bytes: usize) -> Result<Self, WireError> {
        let encoded_records =
            postcard::to_extend(records, Vec::with_capacity(estimated_bytes + 16))
                .map_err(|e| WireError::Malformed(e.to_string()))?;
        Ok(PreparedChunk {
            encoded_records,
            digests: records.iter().map(chain::record_digest).collect(),
            min_timestamp: records.iter().map(|r| r.timestamp).min().unwrap_or(0),
            max_timestamp: records.iter().map(|r| r.timestamp).max().unwrap_or(0),
        })
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// True when the chunk has no records.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Each record's digest.
    pub fn digests(&self) -> &[MessageId] {
        &self.digests
    }

    /// Oldest and newest record timestamps (ms).
    pub fn timestamps(&self) -> (i64, i64) {
        (self.min_timestamp, self.max_timestamp)
    }
}

/// Encodes a stored batch from its header and a prepared chunk: the same bytes
/// as [`encode`] of the equivalent [`StoredBatch`], without re-encoding records.
pub fn encode_prepared(header: &BatchHeader, chunk: &PreparedChunk) -> Result<Vec<u8>, WireError> {
    let capacity = 1 + 128 + chunk.encoded_records.len();
    let mut out = postcard::to_extend(header, {
        let mut v = Vec::with_capacity(capacity);
        v.push(FORMAT_VERSION);
        v
    })
    .map_err(|e| WireError::Malformed(e.to_string()))?;
    out.extend_from_slice(&chunk.encoded_records);
    if out.len() > MAX_FRAME_BYTES {
        return Err(WireError::FrameTooLarge {
            size: out.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    Ok(out)
}

/// Encodes `value` as a versioned frame, refusing frames over [`MAX_FRAME_BYTES`].
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    let out = postcard::to_extend(value, vec![FORMAT_VERSION])
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if out.len() > MAX_FRAME_BYTES {
        return Err(WireError::FrameTooLarge {
            size: out.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    Ok(out)
}

/// Decodes a frame written by [`encode`]. Never panics, whatever the bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(WireError::FrameTooLarge {
            size: bytes.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    let (&version, body) = bytes.split_first().ok_or(WireError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(WireError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let (value, rest) =
        postcard::take_from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

/// Decodes a stored batch and checks its shape: not empty, not over the record cap.
pub fn decode_batch(bytes: &[u8]) -> Result<StoredBatch, WireError> {
    let batch: StoredBatch = decode(bytes)?;
    if batch.records.is_empty() {
        return Err(WireError::Malformed("empty batch".into()));
    }
    if batch.records.len() > MAX_BATCH_RECORDS {
        return Err(WireError::Malformed(format!(
            "batch of {} records exceeds the cap of {MAX_BATCH_RECORDS}",
            batch.records.len()
        )));
    }
    // Offsets and sequences past the batch must exist, so arithmetic on them
    // cannot overflow further on.
    let len = batch.records.len() as u64;
    let seq_overflows = batch
        .header
        .producer
        .as_ref()
        .is_some_and(|p| p.base_seq.checked_add(len).is_none());
    if batch.header.base_offset.checked_add(len).is_none() || seq_overflows {
        return Err(WireError::Malformed("offsets or sequences overflow".into()));
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::partition_genesis;
    use proptest::prelude::*;

    fn sample_batch() -> StoredBatch {
        let records = vec![
            Record::new(b"hello".to_vec(), 1).with_key(b"k".to_vec()),
            Record::new(vec![0u8; 300], 2).with_header("h", b"v".to_vec()),
        ];
        let mut batch = StoredBatch {
            header: BatchHeader {
                epoch: 1,
                base_offset: 10,
                prev_id: partition_genesis("t", 0),
                last_id: partition_genesis("t", 0),
                producer: Some(ProducerBatch {
                    producer: ProducerId(9),
                    base_seq: 4,
                    prev: partition_genesis("x", 1),
                }),
            },
            records,
        };
        batch.header.last_id = *batch.ids().last().unwrap();
        batch
    }

    #[test]
    fn round_trip() {
        let batch = sample_batch();
        let bytes = encode(&batch).unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode_batch(&bytes).unwrap(), batch);
    }

    #[test]
    fn prepared_encoding_equals_direct_encoding() {
        let batch = sample_batch();
        let prepared = PreparedRecords::new(&batch.records).unwrap();
        assert_eq!(prepared.chunks().len(), 1);
        let chunk = &prepared.chunks()[0];
        assert_eq!(
            encode_prepared(&batch.header, chunk).unwrap(),
            encode(&batch).unwrap()
        );
        assert_eq!(chain_ids(&batch.header, chunk.digests()), batch.ids());
    }

    #[test]
    fn large_appends_are_split_into_bounded_chunks() {
        let records: Vec<Record> = (0..100)
            .map(|i| Record::new(vec![i as u8; 10_000], i))
            .collect();
        let prepared = PreparedRecords::new(&records).unwrap();
        assert_eq!(prepared.len(), 100);
        assert!(prepared.chunks().len() >= 4);
        let mut next = 0;
        for chunk in prepared.chunks() {
            assert!(chunk.encoded_records.len() <= CHUNK_BYTES);
            assert_eq!(chunk.timestamps().0, next as i64);
            next += chunk.len();
        }
        assert_eq!(next, 100);
        let huge = PreparedRecords::new(&[Record::new(vec![0u8; 2 * CHUNK_BYTES], 0)]).unwrap();
        assert_eq!(
            huge.chunks().len(),
            1,
            "one record larger than a chunk stays whole"
        );
    }

    #[test]
    fn overflowing_offsets_are_malformed() {
        let mut batch = sample_batch();
        batch.header.base_offset = u64::MAX;
        assert!(matches!(
            decode_batch(&encode(&batch).unwrap()),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn unknown_version_is_refused_with_its_number() {
        let mut bytes = encode(&sample_batch()).unwrap();
        bytes[0] = 7;
        assert_eq!(
            decode_batch(&bytes),
            Err(WireError::UnsupportedVersion {
                found: 7,
                supported: FORMAT_VERSION
            })
        );
    }

    #[test]
    fn empty_and_trailing_bytes_are_errors() {
        assert_eq!(decode_batch(&[]), Err(WireError::Empty));
        let mut bytes = encode(&sample_batch()).unwrap();
        bytes.push(0);
        assert_eq!(decode_batch(&bytes), Err(WireError::TrailingBytes(1)));
    }

    #[test]
    fn oversized_frame_is_refused_before_parsing() {
        let huge = vec![FORMAT_VERSION; MAX_FRAME_BYTES + 1];
        assert!(matches!(
            decode_batch(&huge),
            Err(WireError::FrameTooLarge { .. })
        ));
        let batch = StoredBatch {
            records: vec![Record::new(vec![1u8; MAX_FRAME_BYTES], 0)],
            ..sample_batch()
        };
        assert!(matches!(
            encode(&batch),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_batch(&bytes);
            let mut versioned = bytes.clone();
            versioned.insert(0, FORMAT_VERSION);
            let _ = decode_batch(&versioned);
        }

        #[test]
        fn every_truncation_is_an_error(cut in any::<usize>()) {
            let bytes = encode(&sample_batch()).unwrap();
            let cut = cut % bytes.len();
            prop_assert!(decode_batch(&bytes[..cut]).is_err());
        }

        #[test]
        fn bit_flips_never_panic(pos in any::<usize>(), bit in 0u8..8) {
            let mut bytes = encode(&sample_batch()).unwrap();
            let pos = pos % bytes.len();
            bytes[pos] ^= 1 << bit;
            let _ = decode_batch(&bytes);
        }
    }
}
