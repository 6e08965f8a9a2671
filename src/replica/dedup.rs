//! Deduplication by a key the application gives a record (NATS's
//! `Nats-Msg-Id`): a partition's leader does not store a record whose dedup
//! key it stored within the dedup window, and answers with the original's
//! offset and ID instead.
//!
//! The index lives in the leader's memory. It is built when a replica starts
//! leading (from the committed records of the last window, read from the
//! store on the blocking pool while keyed records are refused as retriable),
//! kept current with the leader's own appends, and dropped when the log is
//! truncated. It works on record timestamps, so the window is measured
//! on the producers' clocks.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::chain::MessageId;
use crate::record::Record;
use crate::store::Store;

/// The header that carries a record's dedup key.
pub const DEDUP_HEADER: &str = "meshlog-msg-id";

/// Most records read back from the store to build the index.
const REBUILD_SCAN_RECORDS: u64 = 200_000;

/// The dedup key of a record, if it has one.
pub fn dedup_key(record: &Record) -> Option<&[u8]> {
    record
        .headers
        .iter()
        .find(|h| h.key == DEDUP_HEADER)
        .map(|h| h.value.as_slice())
}

/// Where a record with a dedup key was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Original {
    /// Its offset.
    pub offset: u64,
    /// Its partition-chain ID.
    pub id: MessageId,
}

/// One leader's index of recent dedup keys.
#[derive(Debug, Default)]
pub(crate) struct DedupIndex {
    /// The epoch the index was built for; `None` when it must be rebuilt.
    built_for: Option<u64>,
    by_key: HashMap<Vec<u8>, (Original, i64)>,
    /// Keys in the order stored, with their timestamps, for expiry.
    order: VecDeque<(i64, Vec<u8>, u64)>,
}

impl DedupIndex {
    /// Whether the index is current for `epoch`.
    pub fn is_built_for(&self, epoch: u64) -> bool {
        self.built_for == Some(epoch)
    }

    /// Builds the index for `epoch` from the committed records of the last
    /// `window` (at most [`REBUILD_SCAN_RECORDS`] records back): a read of up
    /// to that many records, for the blocking pool. An index the store
    /// cannot be read for is empty and not built for any epoch.
    pub fn build(store: &Store, topic: &str, partition: u32, epoch: u64, window: Duration) -> Self {
        let mut index = DedupIndex::default();
        let Ok(bounds) = store.partition_state(topic, partition) else {
            return index;
        };
        let mut offset = bounds
            .log_start_offset
            .max(bounds.high_watermark.saturating_sub(REBUILD_SCAN_RECORDS));
        while let Ok(read) = store.read(topic, partition, offset, 1 << 20) {
            let Some(last) = read.records.last() else {
                break;
            };
            offset = last.offset + 1;
            for r in &read.records {
                if let Some(key) = dedup_key(&r.record) {
                    let original = Original {
                        offset: r.offset,
                        id: r.id,
                    };
                    index.insert(key, original, r.record.timestamp, window);
                }
            }
        }
        index.built_for = Some(epoch);
        index
    }

    /// The original of a key stored within `window` of `timestamp`.
    pub fn lookup(&self, key: &[u8], timestamp: i64, window: Duration) -> Option<Original> {
        let (original, stored_at) = self.by_key.get(key)?;
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        (timestamp.saturating_sub(*stored_at) <= window_ms).then_some(*original)
    }

    /// Remembers a key stored at `original`, and forgets keys older than the window.
    pub fn insert(&mut self, key: &[u8], original: Original, timestamp: i64, window: Duration) {
        self.by_key.insert(key.to_vec(), (original, timestamp));
        self.order
            .push_back((timestamp, key.to_vec(), original.offset));
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        while let Some((at, _, _)) = self.order.front() {
            if timestamp.saturating_sub(*at) <= window_ms {
                break;
            }
            if let Some((_, key, offset)) = self.order.pop_front()
                && self
                    .by_key
                    .get(&key)
                    .is_some_and(|(o, _)| o.offset == offset)
            {
                self.by_key.remove(&key);
            }
        }
    }

    /// Forgets everything: the log was truncated, or leadership moved.
    pub fn invalidate(&mut self) {
        *self = DedupIndex::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: u64) -> Original {
        Original {
            offset,
            id: MessageId([offset as u8; 32]),
        }
    }

    #[test]
    fn keys_are_found_within_the_window_and_forgotten_after() {
        let window = Duration::from_secs(120);
        let mut index = DedupIndex::default();
        index.insert(b"order-1", at(7), 1_000, window);
        assert_eq!(index.lookup(b"order-1", 60_000, window), Some(at(7)));
        assert_eq!(index.lookup(b"order-2", 60_000, window), None);
        assert_eq!(
            index.lookup(b"order-1", 200_000, window),
            None,
            "outside the window"
        );
        index.insert(b"order-3", at(8), 200_000, window);
        assert!(
            !index.by_key.contains_key(b"order-1".as_slice()),
            "expired keys are dropped"
        );
    }
}
