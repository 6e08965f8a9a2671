//! The encoded form of batches: one format-version byte, then postcard.
//!
//! Every frame that leaves memory (a batch on disk now, protocol messages on the
//! network later) goes through [`encode`] and [`decode`]: a size cap is checked
//! before anything is parsed, an unknown version is refused with its number, and
//! malformed bytes are a [`WireError`], never a panic.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::chain::{ChainEntry, MessageId, ProducerId, ProducerStamp};
use crate::error::WireError;
use crate::record::Record;

/// The version byte this build writes and the only one it reads.
pub const FORMAT_VERSION: u8 = 1;

/// Hard cap on one encoded frame (a stored batch): 32 MiB. Topic limits
/// (`max_message_bytes`) are lower; this one bounds what a decoder will touch.
pub const MAX_FRAME_BYTES: usize = 32 * 1024 * 1024;

/// Hard cap on the records in one batch.
pub const MAX_BATCH_RECORDS: usize = 1_000_000;

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

/// A batch as the log stores it: records plus the chain state around them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBatch {
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
    /// The records, in offset order.
    pub records: Vec<Record>,
}

impl StoredBatch {
    /// Offset one past the batch's last record.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + self.records.len() as u64
    }

    /// The producer stamp of the record at `index` in this batch.
    pub fn stamp(&self, index: usize) -> ProducerStamp {
        self.producer
            .as_ref()
            .map(|p| (p.producer, p.base_seq + index as u64))
    }

    /// The batch's records as the partition chain sees them.
    pub fn chain_entries(&self) -> impl Iterator<Item = ChainEntry<'_>> {
        self.records
            .iter()
            .enumerate()
            .map(move |(i, record)| ChainEntry {
                epoch: self.epoch,
                offset: self.base_offset + i as u64,
                stamp: self.stamp(i),
                record,
            })
    }

    /// Every record's partition-chain ID, recomputed from `prev_id`.
    pub fn ids(&self) -> Vec<MessageId> {
        let mut prev = self.prev_id;
        self.chain_entries()
            .map(|e| {
                prev = crate::chain::partition_link(&prev, e.epoch, e.offset, e.stamp, e.record);
                prev
            })
            .collect()
    }
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
            epoch: 1,
            base_offset: 10,
            prev_id: partition_genesis("t", 0),
            last_id: partition_genesis("t", 0),
            producer: Some(ProducerBatch {
                producer: ProducerId(9),
                base_seq: 4,
                prev: partition_genesis("x", 1),
            }),
            records,
        };
        batch.last_id = *batch.ids().last().unwrap();
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
