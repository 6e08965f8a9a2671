//! Deduplication by a key the application gives a record (NATS's
//! `Nats-Msg-Id`): a partition's leader does not store a record whose dedup
//! key it stored within the dedup window, and answers with the original's
//! offset and ID instead.
//!
//! [`DedupWindow`] is one replica's part in it. The index lives in the
//! leader's memory. It is built when a replica starts leading, from the
//! committed records of the last window, which the driver reads from the
//! store off its task once the window asks for it ([`DedupWindow::take_build`]);
//! until the index is installed, keyed records are refused as retriable, so
//! none is appended that the index would miss. It is kept current with the
//! leader's own appends and dropped when the log is cut or restarts. It works
//! on record timestamps, so the window is measured on the producers' clocks.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::chain::MessageId;
use crate::record::Record;

/// The header that carries a record's dedup key.
pub const DEDUP_HEADER: &str = "meshlog-msg-id";

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

/// An index of recent dedup keys, built for one leader epoch.
#[derive(Clone, Debug, Default)]
pub struct DedupIndex {
    /// The epoch the index was built for; `None` when it must be rebuilt.
    built_for: Option<u64>,
    by_key: HashMap<Vec<u8>, (Original, i64)>,
    /// Keys in the order stored, with their timestamps, for expiry.
    order: VecDeque<(i64, Vec<u8>, u64)>,
}

impl DedupIndex {
    /// An empty index, not built for any epoch.
    pub fn new() -> Self {
        DedupIndex::default()
    }

    /// Whether the index is current for `epoch`.
    pub fn is_built_for(&self, epoch: u64) -> bool {
        self.built_for == Some(epoch)
    }

    /// Marks the index complete for `epoch` (every committed key of the
    /// window before it is in).
    pub fn built(mut self, epoch: u64) -> Self {
        self.built_for = Some(epoch);
        self
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
}

/// Why a batch with dedup keys is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DedupRefusal {
    /// The index for this epoch is not built yet: retry.
    Building,
    /// These records (index in the batch, original offset, original ID)
    /// repeat keys stored within the window.
    Duplicates(Vec<(u32, u64, MessageId)>),
}

/// One partition replica's dedup keys: the index and its building.
#[derive(Clone, Debug)]
pub struct DedupWindow {
    window: Duration,
    index: DedupIndex,
    /// The epoch an index is being built for, and whether the driver has
    /// been asked to start it.
    build: Option<(u64, bool)>,
}

impl DedupWindow {
    /// Keys are remembered for `window` (on record timestamps).
    pub fn new(window: Duration) -> Self {
        DedupWindow {
            window,
            index: DedupIndex::new(),
            build: None,
        }
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Checks a batch about to be appended by the leader of `epoch`.
    /// `readable` tells whether everything committed before the epoch can be
    /// read from the store (the index is built from it, so not before).
    pub fn check(
        &mut self,
        records: &[Record],
        epoch: u64,
        readable: impl FnOnce() -> bool,
    ) -> Result<(), DedupRefusal> {
        if !records.iter().any(|r| dedup_key(r).is_some()) {
            return Ok(());
        }
        if !self.index.is_built_for(epoch) {
            if self.build.is_none_or(|(building, _)| building != epoch) && readable() {
                self.build = Some((epoch, false));
            }
            return Err(DedupRefusal::Building);
        }
        let duplicates: Vec<(u32, u64, MessageId)> = records
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let original = self.index.lookup(dedup_key(r)?, r.timestamp, self.window)?;
                Some((i as u32, original.offset, original.id))
            })
            .collect();
        if duplicates.is_empty() {
            Ok(())
        } else {
            Err(DedupRefusal::Duplicates(duplicates))
        }
    }

    /// The epoch to build an index for off the task, once per request: the
    /// result goes to [`Self::install`].
    pub fn take_build(&mut self) -> Option<u64> {
        match &mut self.build {
            Some((epoch, asked @ false)) => {
                *asked = true;
                Some(*epoch)
            }
            _ => None,
        }
    }

    /// An index built for `asked_for`: used if this replica still leads that
    /// epoch (`leading`). One that could not be read (not built) is asked for
    /// again by the next keyed record.
    pub fn install(&mut self, asked_for: u64, index: DedupIndex, epoch: u64, leading: bool) {
        if self
            .build
            .is_some_and(|(building, _)| building == asked_for)
        {
            self.build = None;
        }
        if leading && index.is_built_for(epoch) {
            self.index = index;
        }
    }

    /// Indexes the dedup keys of records just appended in `epoch`, the first
    /// at `base_offset`, with these IDs.
    pub fn remember(
        &mut self,
        records: &[Record],
        base_offset: u64,
        ids: &[MessageId],
        epoch: u64,
    ) {
        if !self.index.is_built_for(epoch) {
            return;
        }
        for (i, (record, id)) in records.iter().zip(ids).enumerate() {
            if let Some(key) = dedup_key(record) {
                let original = Original {
                    offset: base_offset + i as u64,
                    id: *id,
                };
                self.index
                    .insert(key, original, record.timestamp, self.window);
            }
        }
    }

    /// Forgets every key: the log was cut or restarted, so they may name
    /// records that are gone.
    pub fn invalidate(&mut self) {
        self.index = DedupIndex::new();
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

    fn keyed(key: &str, timestamp: i64) -> Record {
        Record::new(b"v".to_vec(), timestamp).with_header(DEDUP_HEADER, key)
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

    #[test]
    fn keyed_records_wait_for_the_index_of_their_epoch() {
        let mut dedup = DedupWindow::new(Duration::from_secs(120));
        let records = [keyed("pay-1", 1_000)];
        assert!(
            dedup
                .check(&[Record::new(b"x".to_vec(), 1_000)], 3, || false)
                .is_ok()
        );
        assert_eq!(
            dedup.check(&records, 3, || false),
            Err(DedupRefusal::Building)
        );
        assert_eq!(dedup.take_build(), None, "not before the log is readable");
        assert_eq!(
            dedup.check(&records, 3, || true),
            Err(DedupRefusal::Building)
        );
        assert_eq!(dedup.take_build(), Some(3));
        assert_eq!(dedup.take_build(), None, "asked for once");
        dedup.install(3, DedupIndex::new().built(3), 3, true);
        assert!(dedup.check(&records, 3, || true).is_ok());
        dedup.remember(&records, 40, &[MessageId([4; 32])], 3);
        assert_eq!(
            dedup.check(&records, 3, || true),
            Err(DedupRefusal::Duplicates(vec![(0, 40, MessageId([4; 32]))]))
        );
        dedup.invalidate();
        assert_eq!(
            dedup.check(&records, 3, || true),
            Err(DedupRefusal::Building)
        );
    }

    #[test]
    fn an_index_for_another_epoch_or_a_failed_read_is_not_used() {
        let mut dedup = DedupWindow::new(Duration::from_secs(120));
        let records = [keyed("pay-1", 1_000)];
        let _ = dedup.check(&records, 3, || true);
        assert_eq!(dedup.take_build(), Some(3));
        // The read failed: an index not built for any epoch.
        dedup.install(3, DedupIndex::new(), 3, true);
        assert_eq!(
            dedup.check(&records, 3, || true),
            Err(DedupRefusal::Building)
        );
        assert_eq!(dedup.take_build(), Some(3), "asked for again");
        // Built for epoch 3, but the replica leads epoch 4 by now.
        dedup.install(3, DedupIndex::new().built(3), 4, true);
        assert_eq!(
            dedup.check(&records, 4, || true),
            Err(DedupRefusal::Building)
        );
    }
}
