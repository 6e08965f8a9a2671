//! Building a new leader's dedup index ([`crate::core::dedup`]) from the
//! store: a read of up to [`REBUILD_SCAN_RECORDS`] committed records, for
//! the blocking pool.

use std::time::Duration;

use crate::core::dedup::{DedupIndex, Original, dedup_key};
use crate::error::StoreError;
use crate::store::Store;

/// Most records read back from the store to build the index.
const REBUILD_SCAN_RECORDS: u64 = 200_000;

/// Builds the index for `epoch` from the committed records of the last
/// `window` (at most [`REBUILD_SCAN_RECORDS`] records back). An index the
/// store cannot be read for (wholly) is empty and not built for any epoch.
pub(crate) fn build(
    store: &Store,
    topic: &str,
    partition: u32,
    epoch: u64,
    window: Duration,
) -> DedupIndex {
    let mut index = DedupIndex::new();
    let Ok(bounds) = store.partition_state(topic, partition) else {
        return index;
    };
    let mut offset = bounds
        .log_start_offset
        .max(bounds.high_watermark.saturating_sub(REBUILD_SCAN_RECORDS));
    loop {
        let read = match store.read(topic, partition, offset, 1 << 20) {
            Ok(read) => read,
            // Retention moved the log start past the scan: what it dropped
            // holds no originals any more; go on from the new start.
            Err(StoreError::OffsetOutOfRange { start, .. }) if start > offset => {
                offset = start;
                continue;
            }
            // A partial index would miss keys: none, asked for again later.
            Err(_) => return DedupIndex::new(),
        };
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
    index.built(epoch)
}
