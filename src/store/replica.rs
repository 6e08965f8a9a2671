//! A replicated partition's log as replication sees it: entries, truncation
//! and the replica's election state.
//!
//! Replication (`core::replication`) works on *entries*: each is one stored
//! batch, or an epoch-start marker that holds no records. The store keeps one
//! [`EntryRow`] per entry next to the batches, so a restarting replica gets
//! back exactly the log it had made durable.
//!
//! [`WriteOp::ReplicateLog`] is the one way entries enter the log, for the
//! leader's own batches and for those a follower receives alike. It first cuts
//! the log at an entry (dropping an uncommitted divergent suffix, never a
//! committed record), then appends the entries, checking each batch against
//! the log it extends: the batch must start at the log end, after the head,
//! and its records must hash to the IDs its header and entry claim. So a peer
//! that lies about a batch is refused, and nothing of it is stored.
//!
//! [`WriteOp::ReplicateLog`]: super::WriteOp::ReplicateLog

use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable};

use super::Store;
use super::tables::*;
use super::write::{Tables, TxnCache};
use crate::chain::{self, MessageId};
use crate::core::replication::LogEntry;
use crate::error::StoreError;
use crate::wire::{self, ProducerBatch, StoredBatch};

/// One entry to append to a replicated log, with its batch's encoded bytes
/// (none for an epoch-start marker).
#[derive(Clone, Debug)]
pub struct ReplicatedEntry {
    /// The entry.
    pub entry: LogEntry,
    /// The encoded [`StoredBatch`], exactly as the leader stored it.
    pub batch: Option<Arc<Vec<u8>>>,
}

/// Where a replicated log ends after a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogEnd {
    /// Entries in the log.
    pub entries: u64,
    /// The ID of the last entry (`None` when the log is empty).
    pub last_entry_id: Option<MessageId>,
    /// One past the last record offset.
    pub log_end_offset: u64,
    /// The chain ID of the last record.
    pub head: MessageId,
}

/// What the store holds of a range of a replicated log's entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredEntries {
    /// The entries, with the ID of the entry before the first.
    Entries(MessageId, Vec<EntryRow>),
    /// Retention dropped some of them: the stored log starts at this point.
    Dropped(SnapshotRow),
    /// Not all of them are stored (the range passes the log end).
    Missing,
}

/// What a replica restarts from: its vote, its snapshot point and its log's
/// entries from there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaLog {
    /// Its election state (epoch 0 and no promise when never written).
    pub vote: Option<VoteRow>,
    /// Where its entries start (`None`: at entry 0).
    pub snapshot: Option<SnapshotRow>,
    /// Its entries, in order from the snapshot point.
    pub entries: Vec<EntryRow>,
}

impl Store {
    /// Cuts `topic/partition`'s log before entry `truncate_from`, then appends
    /// `entries` after it. Refuses (storing nothing of this operation) a cut
    /// below the high watermark and any batch that does not extend the log.
    pub(super) fn apply_replicate(
        &self,
        t: &mut Tables<'_>,
        cache: &mut TxnCache,
        topic: &str,
        partition: u32,
        truncate_from: u64,
        entries: Vec<ReplicatedEntry>,
    ) -> Result<LogEnd, StoreError> {
        let entry = self.existing_topic(t, cache, topic)?;
        let key = (entry.id, partition);
        let decoded = self.check_entries(t, cache, topic, key, truncate_from, &entries)?;
        self.truncate_entries(t, cache, key, truncate_from)?;
        let mut state = self.cached_partition(t, cache, key)?;
        let mut index = truncate_from;
        for (replicated, batch) in entries.iter().zip(decoded) {
            let row = EntryRow {
                entry: replicated.entry.clone(),
                base_offset: state.log_end_offset,
                count: batch.as_ref().map_or(0, |b| b.records.len() as u32),
            };
            if let (Some(batch), Some(bytes)) = (batch, &replicated.batch) {
                self.store_batch(t, cache, &entry.config, key, &mut state, &batch, bytes)?;
            }
            t.entries
                .insert((key.0, key.1, index), self.encode_value(&row)?.as_slice())?;
            index += 1;
        }
        let last_entry_id = match index {
            0 => None,
            n => match self.entry_row(t, key, n - 1)? {
                Some(row) => Some(row.entry.id),
                None => match self.log_start(t, key)? {
                    Some(point) if point.snapshot.index == n => Some(point.snapshot.last_id),
                    _ => {
                        return Err(
                            self.corrupt(format!("partition {key:?}: entry {} is missing", n - 1))
                        );
                    }
                },
            },
        };
        cache.partitions.insert(key, state.clone());
        Ok(LogEnd {
            entries: index,
            last_entry_id,
            log_end_offset: state.log_end_offset,
            head: state.head,
        })
    }

    /// Decodes and checks every batch against the log as it will be after the
    /// cut, before anything is changed.
    fn check_entries(
        &self,
        t: &Tables<'_>,
        cache: &mut TxnCache,
        topic: &str,
        key: (u32, u32),
        truncate_from: u64,
        entries: &[ReplicatedEntry],
    ) -> Result<Vec<Option<StoredBatch>>, StoreError> {
        let state = self.cached_partition(t, cache, key)?;
        let count = match t
            .entries
            .range((key.0, key.1, 0)..=(key.0, key.1, u64::MAX))?
            .next_back()
        {
            Some(row) => row?.0.value().2 + 1,
            None => self.log_start(t, key)?.map_or(0, |p| p.snapshot.index),
        };
        if truncate_from > count {
            return Err(self.diverged(
                topic,
                key.1,
                format!("entries from {truncate_from} would leave a hole after entry {count}"),
            ));
        }
        let (mut end, mut head) = self.log_end_before(t, key, &state, truncate_from)?;
        if end < state.high_watermark {
            return Err(self.diverged(
                topic,
                key.1,
                format!(
                    "cutting at offset {end} would drop committed records (high watermark {})",
                    state.high_watermark
                ),
            ));
        }
        let mut out = Vec::with_capacity(entries.len());
        for replicated in entries {
            let Some(bytes) = &replicated.batch else {
                if replicated.entry.has_payload() {
                    return Err(self.diverged(topic, key.1, "an entry with records has no batch"));
                }
                out.push(None);
                continue;
            };
            if !replicated.entry.has_payload() {
                return Err(self.diverged(
                    topic,
                    key.1,
                    "a marker or configuration entry has a batch",
                ));
            }
            let batch = wire::decode_batch(bytes)?;
            let h = &batch.header;
            let ids = batch.ids();
            let fits = h.base_offset == end
                && h.prev_id == head
                && h.epoch == replicated.entry.epoch
                && !batch.records.is_empty()
                && ids.last() == Some(&h.last_id)
                && h.last_id == replicated.entry.digest;
            if !fits {
                return Err(self.diverged(
                    topic,
                    key.1,
                    format!(
                        "the batch at offset {} does not extend the log at {end}",
                        h.base_offset
                    ),
                ));
            }
            end = batch.next_offset();
            head = h.last_id;
            out.push(Some(batch));
        }
        Ok(out)
    }

    /// The record log end and head just before entry `index`.
    fn log_end_before(
        &self,
        t: &Tables<'_>,
        key: (u32, u32),
        state: &PartitionState,
        index: u64,
    ) -> Result<(u64, MessageId), StoreError> {
        let Some(cut) = self.entry_row(t, key, index)? else {
            return Ok((state.log_end_offset, state.head));
        };
        if cut.base_offset == state.log_start_offset {
            return Ok((cut.base_offset, state.start_prev_id));
        }
        let before = t
            .batches
            .range((key.0, key.1, 0)..(key.0, key.1, cut.base_offset))?
            .next_back();
        match before {
            Some(row) => {
                let (k, v) = row?;
                let batch = self.decode_batch(k.value(), v.value())?;
                Ok((batch.next_offset(), batch.header.last_id))
            }
            None => Ok((cut.base_offset, state.start_prev_id)),
        }
    }

    /// Drops entries from `index` on, with their batches, segments and the
    /// producer state they made.
    fn truncate_entries(
        &self,
        t: &mut Tables<'_>,
        cache: &mut TxnCache,
        key: (u32, u32),
        index: u64,
    ) -> Result<(), StoreError> {
        let Some(cut) = self.entry_row(t, key, index)? else {
            return Ok(());
        };
        let mut state = self.cached_partition(t, cache, key)?;
        let (end, head) = self.log_end_before(t, key, &state, index)?;
        let mut dropped_bytes = 0u64;
        t.batches.retain_in(
            (key.0, key.1, cut.base_offset)..=(key.0, key.1, u64::MAX),
            |_, v| {
                dropped_bytes += v.len() as u64;
                false
            },
        )?;
        t.entries
            .retain_in((key.0, key.1, index)..=(key.0, key.1, u64::MAX), |_, _| {
                false
            })?;
        self.cut_segments(t, cache, key, end)?;
        self.roll_back_producers(t, cache, key, end)?;
        state.log_end_offset = end;
        state.head = head;
        state.bytes = state.bytes.saturating_sub(dropped_bytes);
        cache.partitions.insert(key, state);
        Ok(())
    }

    fn cut_segments(
        &self,
        t: &mut Tables<'_>,
        cache: &mut TxnCache,
        key: (u32, u32),
        end: u64,
    ) -> Result<(), StoreError> {
        cache.active_segments.remove(&key);
        t.segments
            .retain_in((key.0, key.1, end)..=(key.0, key.1, u64::MAX), |_, _| false)?;
        let last = t
            .segments
            .range((key.0, key.1, 0)..(key.0, key.1, end))?
            .next_back()
            .map(|row| row.map(|(_, v)| v.value().to_vec()))
            .transpose()?;
        if let Some(bytes) = last {
            let mut segment: SegmentMeta = self.decode_value("segment", &bytes)?;
            if segment.next_offset > end {
                let mut kept = 0u64;
                for row in t
                    .batches
                    .range((key.0, key.1, segment.base_offset)..(key.0, key.1, end))?
                {
                    kept += row?.1.value().len() as u64;
                }
                segment.next_offset = end;
                segment.bytes = kept;
                t.segments.insert(
                    (key.0, key.1, segment.base_offset),
                    self.encode_value(&segment)?.as_slice(),
                )?;
            }
        }
        Ok(())
    }

    fn roll_back_producers(
        &self,
        t: &mut Tables<'_>,
        cache: &mut TxnCache,
        key: (u32, u32),
        end: u64,
    ) -> Result<(), StoreError> {
        let mut rows = Vec::new();
        for row in t
            .producers
            .range((key.0, key.1, 0)..=(key.0, key.1, u64::MAX))?
        {
            let (k, v) = row?;
            rows.push((k.value(), Some(v.value().to_vec())));
        }
        // Producers first written in this transaction are only in the cache.
        for pkey in cache.producers.keys() {
            if (pkey.0, pkey.1) == key && !rows.iter().any(|(k, _)| k == pkey) {
                rows.push((*pkey, None));
            }
        }
        for (pkey, bytes) in rows {
            let state = match (cache.producers.remove(&pkey), bytes) {
                (Some(state), _) => state,
                (None, Some(bytes)) => {
                    self.decode_value::<ProducerState>("producer state", &bytes)?
                }
                (None, None) => continue,
            };
            match state.rolled_back_to(end) {
                Some(state) => {
                    cache.producers.insert(pkey, state);
                }
                None => {
                    t.producers.remove(pkey)?;
                }
            }
        }
        Ok(())
    }

    /// Stores one checked batch at the log end and advances the partition and
    /// its producer's state.
    #[allow(clippy::too_many_arguments)]
    fn store_batch(
        &self,
        t: &mut Tables<'_>,
        cache: &mut TxnCache,
        config: &crate::config::TopicConfig,
        key: (u32, u32),
        state: &mut PartitionState,
        batch: &StoredBatch,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let h = &batch.header;
        t.batches.insert((key.0, key.1, h.base_offset), bytes)?;
        let timestamps = batch.records.iter().map(|r| r.timestamp);
        let span = (
            timestamps.clone().min().unwrap_or(0),
            timestamps.max().unwrap_or(0),
        );
        self.extend_segment(
            t,
            cache,
            config,
            key,
            (h.base_offset, batch.next_offset()),
            bytes.len() as u64,
            span,
        )?;
        if let Some(first) = &h.producer {
            let digests: Vec<MessageId> = batch.records.iter().map(chain::record_digest).collect();
            let after = ProducerBatch {
                producer: first.producer,
                base_seq: first.base_seq + digests.len() as u64,
                prev: wire::producer_head(first, &digests),
            };
            let pkey = (key.0, key.1, first.producer.0);
            let previous = self.cached_producer(t, cache, key, first.producer)?;
            let next = ProducerState::advanced(
                previous,
                first,
                &after,
                h.base_offset,
                digests.len() as u32,
                span.1,
            );
            cache.producers.insert(pkey, next);
        }
        state.log_end_offset = batch.next_offset();
        state.head = h.last_id;
        state.epoch = h.epoch;
        state.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Raises the high watermark of a replicated partition (never past its log
    /// end, never backwards).
    pub(super) fn apply_high_watermark(
        &self,
        t: &mut Tables<'_>,
        cache: &mut TxnCache,
        topic: &str,
        partition: u32,
        high_watermark: u64,
    ) -> Result<(), StoreError> {
        let entry = self.existing_topic(t, cache, topic)?;
        let key = (entry.id, partition);
        let mut state = self.cached_partition(t, cache, key)?;
        state.high_watermark = state
            .high_watermark
            .max(high_watermark.min(state.log_end_offset));
        cache.partitions.insert(key, state);
        Ok(())
    }

    /// Stores where a replica's log restarts.
    pub(super) fn apply_snapshot(
        &self,
        t: &mut Tables<'_>,
        cache: &mut TxnCache,
        topic: &str,
        partition: u32,
        snapshot: &SnapshotRow,
    ) -> Result<(), StoreError> {
        let entry = self.existing_topic(t, cache, topic)?;
        t.snapshots.insert(
            (entry.id, partition),
            self.encode_value(snapshot)?.as_slice(),
        )?;
        Ok(())
    }

    /// Where a replicated log's stored entries start, once retention dropped some.
    pub(super) fn log_start(
        &self,
        t: &Tables<'_>,
        key: (u32, u32),
    ) -> Result<Option<SnapshotRow>, StoreError> {
        match t.log_starts.get(key)? {
            Some(v) => Ok(Some(self.decode_value("log start", v.value())?)),
            None => Ok(None),
        }
    }

    /// Drops a replicated partition's whole log and restarts it at `point`:
    /// no batches, entries, segments or producer states; the record log
    /// starts (and ends) at `point.record_end`, after `point.record_head`.
    pub(super) fn apply_install(
        &self,
        t: &mut Tables<'_>,
        cache: &mut TxnCache,
        topic: &str,
        partition: u32,
        point: &SnapshotRow,
        producers: Vec<(crate::chain::ProducerId, ProducerState)>,
    ) -> Result<(), StoreError> {
        let entry = self.existing_topic(t, cache, topic)?;
        let key = (entry.id, partition);
        let all = (key.0, key.1, 0)..=(key.0, key.1, u64::MAX);
        t.batches.retain_in(all.clone(), |_, _| false)?;
        t.segments.retain_in(all.clone(), |_, _| false)?;
        t.entries.retain_in(all.clone(), |_, _| false)?;
        t.producers.retain_in(all, |_, _| false)?;
        cache.active_segments.remove(&key);
        cache.producers.retain(|k, _| (k.0, k.1) != key);
        for (producer, state) in producers {
            cache.producers.insert((key.0, key.1, producer.0), state);
        }
        let mut state = self.cached_partition(t, cache, key)?;
        state.log_start_offset = point.record_end;
        state.log_end_offset = point.record_end;
        state.high_watermark = point.record_end;
        state.head = point.record_head;
        state.start_prev_id = point.record_head;
        state.epoch = point.snapshot.last_epoch;
        state.bytes = 0;
        cache.partitions.insert(key, state);
        let bytes = self.encode_value(point)?;
        t.log_starts.insert(key, bytes.as_slice())?;
        t.snapshots.insert(key, bytes.as_slice())?;
        Ok(())
    }

    /// Stores a replica's epoch and promise.
    pub(super) fn apply_vote(
        &self,
        t: &mut Tables<'_>,
        cache: &mut TxnCache,
        topic: &str,
        partition: u32,
        vote: &VoteRow,
    ) -> Result<(), StoreError> {
        let entry = self.existing_topic(t, cache, topic)?;
        t.votes
            .insert((entry.id, partition), self.encode_value(vote)?.as_slice())?;
        Ok(())
    }

    fn existing_topic(
        &self,
        t: &Tables<'_>,
        cache: &mut TxnCache,
        topic: &str,
    ) -> Result<TopicEntry, StoreError> {
        self.cached_topic(t, cache, topic)?
            .ok_or_else(|| StoreError::TopicNotFound(topic.to_string()))
    }

    fn entry_row(
        &self,
        t: &Tables<'_>,
        key: (u32, u32),
        index: u64,
    ) -> Result<Option<EntryRow>, StoreError> {
        match t.entries.get((key.0, key.1, index))? {
            Some(v) => Ok(Some(self.decode_value("log entry", v.value())?)),
            None => Ok(None),
        }
    }

    fn diverged(&self, topic: &str, partition: u32, detail: impl Into<String>) -> StoreError {
        StoreError::Diverged {
            topic: topic.to_string(),
            partition,
            detail: detail.into(),
        }
    }

    /// The vote, snapshot point and entries from there that a replica of
    /// `topic/partition` restarts from: the log's tail, not its history.
    pub fn replica_log(&self, topic: &str, partition: u32) -> Result<ReplicaLog, StoreError> {
        let txn = self.db.begin_read()?;
        let entry = self.topic_in(&txn, topic)?;
        let votes = txn.open_table(VOTES)?;
        let vote = match votes.get((entry.id, partition))? {
            Some(v) => Some(self.decode_value("vote", v.value())?),
            None => None,
        };
        let snapshots = txn.open_table(SNAPSHOTS)?;
        let snapshot: Option<SnapshotRow> = match snapshots.get((entry.id, partition))? {
            Some(v) => Some(self.decode_value("snapshot point", v.value())?),
            None => None,
        };
        let first = snapshot.as_ref().map_or(0, |s| s.snapshot.index);
        let entries_table = txn.open_table(ENTRIES)?;
        let mut entries = Vec::new();
        for row in
            entries_table.range((entry.id, partition, first)..=(entry.id, partition, u64::MAX))?
        {
            let (k, v) = row?;
            if k.value().2 != first + entries.len() as u64 {
                return Err(self.corrupt(format!(
                    "{topic}/{partition}: log entry {} follows entry {}",
                    k.value().2,
                    first + entries.len() as u64
                )));
            }
            entries.push(self.decode_value::<EntryRow>("log entry", v.value())?);
        }
        Ok(ReplicaLog {
            vote,
            snapshot,
            entries,
        })
    }

    /// Entries `from..upto` of a replicated log and the ID of the entry
    /// before `from` (the genesis at 0), as the leader sends a follower
    /// that is far behind; or, when retention dropped some of them, where
    /// the stored log starts now.
    pub fn stored_entries(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        upto: u64,
    ) -> Result<StoredEntries, StoreError> {
        let txn = self.db.begin_read()?;
        let entry = self.topic_in(&txn, topic)?;
        let key = (entry.id, partition);
        let table = txn.open_table(ENTRIES)?;
        let starts = txn.open_table(LOG_STARTS)?;
        let start: Option<SnapshotRow> = match starts.get(key)? {
            Some(v) => Some(self.decode_value("log start", v.value())?),
            None => None,
        };
        let prev_id = match (from, start) {
            (_, Some(point)) if from < point.snapshot.index => {
                return Ok(StoredEntries::Dropped(point));
            }
            (_, Some(point)) if from == point.snapshot.index => point.snapshot.last_id,
            (0, _) => chain::partition_genesis(topic, partition),
            (n, _) => match table.get((key.0, key.1, n - 1))? {
                Some(v) => {
                    self.decode_value::<EntryRow>("log entry", v.value())?
                        .entry
                        .id
                }
                None => return Ok(StoredEntries::Missing),
            },
        };
        let mut rows = Vec::new();
        for row in table.range((key.0, key.1, from)..(key.0, key.1, upto))? {
            let (k, v) = row?;
            if k.value().2 != from + rows.len() as u64 {
                return Ok(StoredEntries::Missing);
            }
            rows.push(self.decode_value::<EntryRow>("log entry", v.value())?);
        }
        if rows.len() as u64 != upto.saturating_sub(from) {
            return Ok(StoredEntries::Missing);
        }
        Ok(StoredEntries::Entries(prev_id, rows))
    }

    /// The outcome of a producer's batch already in the log (a retry's answer):
    /// its offsets, IDs and producer head, read back from the stored batch.
    pub fn stored_append(
        &self,
        topic: &str,
        partition: u32,
        original: RecentBatch,
    ) -> Result<super::AppendOutcome, StoreError> {
        let bytes = self
            .batch_bytes(topic, partition, original.base_offset)?
            .ok_or_else(|| {
                self.corrupt(format!(
                    "{topic}/{partition}: no batch at {}",
                    original.base_offset
                ))
            })?;
        let batch = self.decode_batch((0, partition, original.base_offset), &bytes)?;
        if batch.records.len() != original.count as usize {
            return Err(self.corrupt(format!(
                "{topic}/{partition}: the producer's batch at {} holds {} records, not {}",
                original.base_offset,
                batch.records.len(),
                original.count
            )));
        }
        Ok(super::AppendOutcome {
            base_offset: original.base_offset,
            ids: batch.ids(),
            duplicate: true,
            producer_head: batch.producer_head(),
        })
    }

    /// The encoded batch stored at `base_offset`, if any.
    pub fn batch_bytes(
        &self,
        topic: &str,
        partition: u32,
        base_offset: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let entry = self.topic_in(&txn, topic)?;
        let batches = txn.open_table(BATCHES)?;
        Ok(batches
            .get((entry.id, partition, base_offset))?
            .map(|v| v.value().to_vec()))
    }
}
