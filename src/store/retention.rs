//! Retention: dropping a partition's oldest segments, whole, once they are
//! older than `retention.time` or not needed to keep `retention.bytes`.
//!
//! As in Kafka, segments go oldest first and the scan stops at the first one
//! that must stay. The active (newest) segment is dropped only when all of it
//! has expired, so a quiet partition frees its space too; size alone never
//! drops it. A segment's age is that of its newest record.
//!
//! A replicated partition drops only segments wholly below its replica's
//! snapshot point (committed, and compacted from memory: at least
//! `keep_committed` entries below the high watermark), never what is at or
//! above the high watermark. With the segments go the entry rows of their
//! batches, and the point where the stored entries now start is kept
//! (entry index, the ID and epoch before it, the replica set in force, the
//! record offset and chain ID there): a replica that needs what was dropped
//! restarts there.

use redb::ReadableTable;

use super::Store;
use super::tables::{
    EntryRow, PRODUCER_EXPIRATION_MS, PartitionState, ProducerState, SegmentMeta, SnapshotRow,
    TopicEntry,
};
use super::write::Tables;
use crate::core::replication::{ReplicaSet, Snapshot};
use crate::error::StoreError;

impl Store {
    /// Applies retention to every partition; returns the number of segments dropped.
    pub(super) fn apply_retention(
        &self,
        t: &mut Tables<'_>,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let mut topics: Vec<TopicEntry> = Vec::new();
        for row in t.topics.iter()? {
            topics.push(self.decode_value("topic", row?.1.value())?);
        }
        let mut dropped = 0;
        for topic in &topics {
            for partition in 0..topic.config.partitions {
                dropped += self.retain_partition(t, topic, partition, now_ms)?;
            }
        }
        self.expire_producers(t, now_ms)?;
        Ok(dropped)
    }

    /// Forgets producers that wrote nothing to a partition for
    /// [`PRODUCER_EXPIRATION_MS`]. A state that cannot be decoded is kept (and
    /// reported when it is next used).
    fn expire_producers(&self, t: &mut Tables<'_>, now_ms: i64) -> Result<(), StoreError> {
        let cutoff = now_ms.saturating_sub(PRODUCER_EXPIRATION_MS);
        t.producers.retain(|_, value| {
            crate::wire::decode::<ProducerState>(value).map_or(true, |s| s.last_timestamp >= cutoff)
        })?;
        Ok(())
    }

    fn retain_partition(
        &self,
        t: &mut Tables<'_>,
        topic: &TopicEntry,
        partition: u32,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let tid = topic.id;
        let mut segments: Vec<SegmentMeta> = Vec::new();
        for row in t
            .segments
            .range((tid, partition, 0)..=(tid, partition, u64::MAX))?
        {
            segments.push(self.decode_value("segment", row?.1.value())?);
        }
        if segments.is_empty() {
            return Ok(0);
        }
        let active = segments.len() - 1;
        let Some(state_bytes) = t
            .partitions
            .get((tid, partition))?
            .map(|v| v.value().to_vec())
        else {
            return Ok(0);
        };
        let mut state: PartitionState = self.decode_value("partition state", &state_bytes)?;
        let replicated = self.is_replicated(t, (tid, partition))?;
        // A replicated partition keeps everything from its snapshot point on.
        let keep_from = match &replicated {
            Some(point) => point.as_ref().map_or(0, |p| p.record_end),
            None => u64::MAX,
        };
        let retention = &topic.config.retention;
        let ttl_ms = retention
            .time
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let mut dropped = 0;
        for (index, segment) in segments.iter().enumerate() {
            let expired =
                ttl_ms.is_some_and(|ttl| now_ms.saturating_sub(segment.max_timestamp) > ttl);
            // The active segment goes only when all of it has expired (a quiet
            // partition); size alone never drops it.
            let surplus = index < active
                && retention
                    .bytes
                    .is_some_and(|limit| state.bytes.saturating_sub(segment.bytes) >= limit);
            if !(expired || surplus) || segment.next_offset > keep_from {
                break;
            }
            self.drop_segment(t, tid, partition, segment)?;
            state.bytes = state.bytes.saturating_sub(segment.bytes);
            state.log_start_offset = segment.next_offset;
            dropped += 1;
        }
        if dropped > 0 {
            state.start_prev_id = if state.log_start_offset == state.log_end_offset {
                // Everything expired: the chain goes on from the head.
                state.head
            } else {
                self.prev_id_at(t, tid, partition, state.log_start_offset)?
            };
            t.partitions
                .insert((tid, partition), self.encode_value(&state)?.as_slice())?;
            if replicated.is_some() {
                self.drop_entries_before(t, topic, partition, &state)?;
            }
        }
        Ok(dropped)
    }

    /// `Some` for a replicated partition (one with entry rows or a snapshot
    /// point), with its stored snapshot point if it has one.
    #[allow(clippy::option_option)]
    fn is_replicated(
        &self,
        t: &Tables<'_>,
        key: (u32, u32),
    ) -> Result<Option<Option<SnapshotRow>>, StoreError> {
        if let Some(v) = t.snapshots.get(key)? {
            return Ok(Some(Some(self.decode_value("snapshot point", v.value())?)));
        }
        let any_entry = t
            .entries
            .range((key.0, key.1, 0)..=(key.0, key.1, u64::MAX))?
            .next()
            .is_some();
        Ok(any_entry.then_some(None))
    }

    /// Drops the entry rows whose records retention dropped and stores where
    /// the entries now start.
    fn drop_entries_before(
        &self,
        t: &mut Tables<'_>,
        topic: &TopicEntry,
        partition: u32,
        state: &PartitionState,
    ) -> Result<(), StoreError> {
        let key = (topic.id, partition);
        let previous = self.log_start(t, key)?;
        let mut members = match &previous {
            Some(point) => point.snapshot.members.clone(),
            None => ReplicaSet::of_voters(
                topic
                    .replicas
                    .get(partition as usize)
                    .cloned()
                    .unwrap_or_default(),
            ),
        };
        let mut last: Option<(u64, EntryRow)> = None;
        for row in t
            .entries
            .range((key.0, key.1, 0)..=(key.0, key.1, u64::MAX))?
        {
            let (k, v) = row?;
            let entry: EntryRow = self.decode_value("log entry", v.value())?;
            if entry.base_offset >= state.log_start_offset {
                break;
            }
            if let Some(set) = entry
                .entry
                .config
                .as_ref()
                .and_then(|bytes| postcard::from_bytes::<ReplicaSet<_>>(bytes).ok())
            {
                members = set;
            }
            last = Some((k.value().2, entry));
        }
        let Some((index, row)) = last else {
            return Ok(());
        };
        t.entries
            .retain_in((key.0, key.1, 0)..=(key.0, key.1, index), |_, _| false)?;
        let point = SnapshotRow {
            snapshot: Snapshot {
                index: index + 1,
                last_id: row.entry.id,
                last_epoch: row.entry.epoch,
                members,
            },
            record_end: state.log_start_offset,
            record_head: state.start_prev_id,
        };
        t.log_starts
            .insert(key, self.encode_value(&point)?.as_slice())?;
        Ok(())
    }

    fn drop_segment(
        &self,
        t: &mut Tables<'_>,
        tid: u32,
        partition: u32,
        segment: &SegmentMeta,
    ) -> Result<(), StoreError> {
        t.batches.retain_in(
            (tid, partition, segment.base_offset)..(tid, partition, segment.next_offset),
            |_, _| false,
        )?;
        t.segments.remove((tid, partition, segment.base_offset))?;
        Ok(())
    }

    /// The chain ID before the batch starting at `offset`.
    fn prev_id_at(
        &self,
        t: &Tables<'_>,
        tid: u32,
        partition: u32,
        offset: u64,
    ) -> Result<crate::chain::MessageId, StoreError> {
        let value = t
            .batches
            .get((tid, partition, offset))?
            .ok_or_else(|| self.corrupt(format!("no batch starts at segment boundary {offset}")))?;
        Ok(self
            .decode_batch((tid, partition, offset), value.value())?
            .header
            .prev_id)
    }
}
