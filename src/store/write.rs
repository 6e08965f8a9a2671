//! Group commit: many write operations in one redb transaction.
//!
//! [`Store::write`] opens one transaction, applies each [`WriteOp`] in order
//! against a per-transaction cache of the rows it touches, writes the cache back,
//! and commits with the durability the store was opened with (metadata changes
//! are always fsync'd). An operation that is refused (unknown topic, a sequence
//! gap, a record too large, ...) is checked before it changes anything, so it
//! fails alone; a storage failure fails the whole transaction and every
//! operation in it, and nothing of it is stored.

use std::collections::BTreeMap;

use redb::{ReadableTable, Table, WriteTransaction};

use super::Store;
use super::replica::{LogEnd, ReplicatedEntry};
use super::tables::*;
use crate::chain::{self, MessageId, ProducerId};
use crate::config::TopicConfig;
use crate::error::StoreError;
use crate::meta::MetaCommand;
use crate::peer::NodeId;
use crate::wire::{self, BatchHeader, PreparedRecords, ProducerBatch};

/// Epoch of every batch the store's own `Append` writes (its tests and its
/// benchmark); replicated logs carry their leader's epoch.
const SINGLE_NODE_EPOCH: u64 = 1;

/// A batch to append to one partition.
#[derive(Clone, Debug)]
pub struct AppendRequest {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// Set by idempotent producers: who sends, the first sequence, and the
    /// producer-chain hash before the batch.
    pub producer: Option<ProducerBatch>,
    /// The records, digested and encoded by the sender. Must not be empty.
    pub records: PreparedRecords,
}

/// Where an appended batch landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Offset of the batch's first record.
    pub base_offset: u64,
    /// The partition-chain ID of each record.
    pub ids: Vec<MessageId>,
    /// True when the batch was a retry of one already stored: nothing was
    /// written and the original offsets and IDs are returned.
    pub duplicate: bool,
    /// The producer-chain head after the batch, for idempotent batches.
    pub producer_head: Option<MessageId>,
}

/// One operation of a group commit.
#[derive(Clone, Debug)]
pub enum WriteOp {
    /// Create a topic; a no-op when it exists with the same config.
    CreateTopic {
        /// Its name.
        name: String,
        /// Its settings (validated here).
        config: TopicConfig,
        /// Creation time, ms since the Unix epoch.
        now_ms: i64,
        /// The replicas of each partition across the mesh (empty for a topic
        /// written by the store alone).
        replicas: Vec<Vec<NodeId>>,
    },
    /// Delete a topic with all its records and committed offsets.
    DeleteTopic {
        /// Its name.
        name: String,
    },
    /// Append a batch.
    Append(AppendRequest),
    /// Store a group's committed offsets (the next offset to read per partition).
    CommitOffsets {
        /// The consumer group.
        group: String,
        /// (topic, partition, offset) triples.
        offsets: Vec<(String, u32, u64)>,
    },
    /// Cut a replicated partition's log before entry `truncate_from`, then
    /// append `entries`: the one way entries enter a replicated log.
    ReplicateLog {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The first entry to drop (the log's entry count: drop nothing).
        truncate_from: u64,
        /// The entries to append, in order.
        entries: Vec<ReplicatedEntry>,
    },
    /// Raise a replicated partition's high watermark.
    SetHighWatermark {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// One past the last committed offset.
        high_watermark: u64,
    },
    /// Store where a replica's log restarts (written lazily, like the high
    /// watermark: an older point only means reading more entries on open).
    SetSnapshot {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The point.
        snapshot: SnapshotRow,
    },
    /// Drop a replicated partition's whole log and restart it at `point`
    /// (the leader's log start): a replica too far behind catches up from there.
    InstallSnapshot {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// Where the log restarts.
        point: SnapshotRow,
        /// The idempotent producers' states there (from the leader's
        /// [`super::Store::producers_at`]).
        producers: Vec<(crate::chain::ProducerId, ProducerState)>,
    },
    /// Store a replica's epoch and promise (always made durable).
    SetVote {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The vote.
        vote: VoteRow,
    },
    /// Apply the metadata command committed at `offset` of `__meta` (skipped
    /// when already applied: the applied offset is stored with the change).
    ApplyMeta {
        /// Its offset in `__meta`.
        offset: u64,
        /// The command (`None`: an unreadable record, skipped).
        command: Option<MetaCommand>,
        /// When it is applied, ms since the Unix epoch.
        now_ms: i64,
    },
    /// Record the mesh this node belongs to (always made durable).
    SetMeshId {
        /// The mesh.
        mesh_id: u64,
    },
    /// Drop expired segments of every partition.
    EnforceRetention {
        /// The current time, ms since the Unix epoch.
        now_ms: i64,
    },
}

impl WriteOp {
    /// Metadata changes are always made durable, whatever the fsync setting.
    fn is_metadata(&self) -> bool {
        matches!(
            self,
            WriteOp::CreateTopic { .. }
                | WriteOp::DeleteTopic { .. }
                | WriteOp::SetVote { .. }
                | WriteOp::InstallSnapshot { .. }
                | WriteOp::ApplyMeta { .. }
                | WriteOp::SetMeshId { .. }
        )
    }
}

/// What one operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The topic exists now; `created` is false when it already existed.
    TopicCreated {
        /// The stored topic.
        topic: TopicEntry,
        /// Whether this operation created it.
        created: bool,
    },
    /// The topic is gone.
    TopicDeleted,
    /// The batch is stored (or was already).
    Appended(AppendOutcome),
    /// The offsets are stored.
    OffsetsCommitted,
    /// The replicated log now ends here.
    LogReplicated(LogEnd),
    /// The high watermark or vote is stored.
    Done,
    /// Retention ran; this many segments were dropped.
    RetentionApplied {
        /// Segments dropped.
        segments_dropped: u64,
    },
}

/// The tables one write transaction works on.
pub(super) struct Tables<'t> {
    pub meta: Table<'t, &'static str, u64>,
    pub topics: Table<'t, &'static str, &'static [u8]>,
    pub partitions: Table<'t, (u32, u32), &'static [u8]>,
    pub batches: Table<'t, (u32, u32, u64), &'static [u8]>,
    pub segments: Table<'t, (u32, u32, u64), &'static [u8]>,
    pub producers: Table<'t, (u32, u32, u64), &'static [u8]>,
    pub offsets: Table<'t, (&'static str, &'static str, u32), u64>,
    pub entries: Table<'t, (u32, u32, u64), &'static [u8]>,
    pub votes: Table<'t, (u32, u32), &'static [u8]>,
    pub snapshots: Table<'t, (u32, u32), &'static [u8]>,
    pub log_starts: Table<'t, (u32, u32), &'static [u8]>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Tables {
            meta: txn.open_table(META)?,
            topics: txn.open_table(TOPICS)?,
            partitions: txn.open_table(PARTITIONS)?,
            batches: txn.open_table(BATCHES)?,
            segments: txn.open_table(SEGMENTS)?,
            producers: txn.open_table(PRODUCERS)?,
            offsets: txn.open_table(GROUP_OFFSETS)?,
            entries: txn.open_table(ENTRIES)?,
            votes: txn.open_table(VOTES)?,
            snapshots: txn.open_table(SNAPSHOTS)?,
            log_starts: txn.open_table(LOG_STARTS)?,
        })
    }
}

/// The rows one transaction has read or changed, written back once at the end
/// so that a group of appends to one partition costs one state update.
#[derive(Default)]
pub(super) struct TxnCache {
    pub topics: BTreeMap<String, TopicEntry>,
    pub partitions: BTreeMap<(u32, u32), PartitionState>,
    /// The newest (active) segment of each touched partition.
    pub active_segments: BTreeMap<(u32, u32), SegmentMeta>,
    pub producers: BTreeMap<(u32, u32, u64), ProducerState>,
}

/// Errors that mean the transaction itself failed, not just one operation.
fn is_fatal(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Io(_)
            | StoreError::Database(_)
            | StoreError::Corrupt { .. }
            | StoreError::Wire(_)
    )
}

impl Store {
    /// Applies `ops` in one transaction and commits it. The outer error means
    /// the transaction failed and none of the operations was stored; otherwise
    /// each operation has its own result, in order.
    pub fn write(
        &self,
        ops: Vec<WriteOp>,
    ) -> Result<Vec<Result<WriteOutcome, StoreError>>, StoreError> {
        let durable = self.fsync || ops.iter().any(WriteOp::is_metadata);
        let mut txn = self.db.begin_write()?;
        txn.set_durability(if durable {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        })?;
        let mut results = Vec::with_capacity(ops.len());
        {
            let mut tables = Tables::open(&txn)?;
            let mut cache = TxnCache::default();
            for op in ops {
                match self.apply(&mut tables, &mut cache, op) {
                    Err(e) if is_fatal(&e) => return Err(e),
                    result => results.push(result),
                }
            }
            self.flush_cache(&mut tables, cache)?;
        }
        txn.commit()?;
        Ok(results)
    }

    /// Appends one batch in its own transaction.
    pub fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        match self.write(vec![WriteOp::Append(request)])?.pop() {
            Some(Ok(WriteOutcome::Appended(outcome))) => Ok(outcome),
            Some(Err(e)) => Err(e),
            _ => Err(self.corrupt("append returned no outcome")),
        }
    }

    /// Creates a topic in its own transaction.
    pub fn create_topic(
        &self,
        name: &str,
        config: TopicConfig,
        now_ms: i64,
    ) -> Result<(TopicEntry, bool), StoreError> {
        let op = WriteOp::CreateTopic {
            name: name.to_string(),
            config,
            now_ms,
            replicas: Vec::new(),
        };
        match self.write(vec![op])?.pop() {
            Some(Ok(WriteOutcome::TopicCreated { topic, created })) => Ok((topic, created)),
            Some(Err(e)) => Err(e),
            _ => Err(self.corrupt("create_topic returned no outcome")),
        }
    }

    fn apply(
        &self,
        t: &mut Tables<'_>,
        cache: &mut TxnCache,
        op: WriteOp,
    ) -> Result<WriteOutcome, StoreError> {
        match op {
            WriteOp::CreateTopic {
                name,
                config,
                now_ms,
                replicas,
            } => self.apply_create_topic(t, cache, name, config, now_ms, replicas),
            WriteOp::DeleteTopic { name } => self.apply_delete_topic(t, cache, &name),
            WriteOp::Append(request) => self
                .apply_append(t, cache, request)
                .map(WriteOutcome::Appended),
            WriteOp::CommitOffsets { group, offsets } => {
                for (topic, partition, offset) in &offsets {
                    t.offsets
                        .insert((group.as_str(), topic.as_str(), *partition), *offset)?;
                }
                Ok(WriteOutcome::OffsetsCommitted)
            }
            WriteOp::ReplicateLog {
                topic,
                partition,
                truncate_from,
                entries,
            } => self
                .apply_replicate(t, cache, &topic, partition, truncate_from, entries)
                .map(WriteOutcome::LogReplicated),
            WriteOp::SetHighWatermark {
                topic,
                partition,
                high_watermark,
            } => self
                .apply_high_watermark(t, cache, &topic, partition, high_watermark)
                .map(|()| WriteOutcome::Done),
            WriteOp::SetVote {
                topic,
                partition,
                vote,
            } => self
                .apply_vote(t, cache, &topic, partition, &vote)
                .map(|()| WriteOutcome::Done),
            WriteOp::SetSnapshot {
                topic,
                partition,
                snapshot,
            } => self
                .apply_snapshot(t, cache, &topic, partition, &snapshot)
                .map(|()| WriteOutcome::Done),
            WriteOp::InstallSnapshot {
                topic,
                partition,
                point,
                producers,
            } => self
                .apply_install(t, cache, &topic, partition, &point, producers)
                .map(|()| WriteOutcome::Done),
            WriteOp::ApplyMeta {
                offset,
                command,
                now_ms,
            } => self.apply_meta(t, cache, offset, command, now_ms),
            WriteOp::SetMeshId { mesh_id } => {
                t.meta.insert(MESH_ID, mesh_id)?;
                Ok(WriteOutcome::Done)
            }
            WriteOp::EnforceRetention { now_ms } => {
                // Retention reads whole partitions from the tables: write back first.
                self.flush_cache(t, std::mem::take(cache))?;
                let segments_dropped = self.apply_retention(t, now_ms)?;
                Ok(WriteOutcome::RetentionApplied { segments_dropped })
            }
        }
    }

    fn apply_create_topic(
        &self,
        t: &mut Tables<'_>,
        cache: &mut TxnCache,
        name: String,
        config: TopicConfig,
        now_ms: i64,
        replicas: Vec<Vec<NodeId>>,
    ) -> Result<WriteOutcome, StoreError> {
        validate_topic_name(&name)?;
        config.validate()?;
        if let Some(existing) = self.cached_topic(t, cache, &name)? {
            if existing.config == config {
                return Ok(WriteOutcome::TopicCreated {
                    topic: existing,
                    created: false,
                });
            }
            return Err(StoreError::TopicExists(name));
        }
        let id = t.meta.get("next_topic_id")?.map_or(0, |v| v.value());
        let id32 = u32::try_from(id).map_err(|_| self.corrupt("topic ids exhausted"))?;
        t.meta.insert("next_topic_id", id + 1)?;
        let entry = TopicEntry {
            id: id32,
            name: name.clone(),
            config,
            created_ms: now_ms,
            replicas,
        };
        t.topics
            .insert(name.as_str(), self.encode_value(&entry)?.as_slice())?;
        for p in 0..entry.config.partitions {
            let genesis = chain::partition_genesis(&name, p);
            let state = PartitionState {
                epoch: SINGLE_NODE_EPOCH,
                log_start_offset: 0,
                log_end_offset: 0,
                high_watermark: 0,
                head: genesis,
                start_prev_id: genesis,
                bytes: 0,
            };
            cache.partitions.insert((id32, p), state);
        }
        cache.topics.insert(name, entry.clone());
        Ok(WriteOutcome::TopicCreated {
            topic: entry,
            created: true,
        })
    }

    fn apply_meta(
        &self,
        t: &mut Tables<'_>,
        cache: &mut TxnCache,
        offset: u64,
        command: Option<MetaCommand>,
        now_ms: i64,
    ) -> Result<WriteOutcome, StoreError> {
        let applied = t.meta.get(META_APPLIED)?.map_or(0, |v| v.value());
        if offset < applied {
            return Ok(WriteOutcome::Done);
        }
        t.meta.insert(META_APPLIED, offset + 1)?;
        let Some(command) = command else {
            return Ok(WriteOutcome::Done);
        };
        // A command the table refuses (the topic exists with another config,
        // or is already gone) is a no-op: the log's first word stands.
        let outcome = match command {
            MetaCommand::CreateTopic {
                name,
                config,
                replicas,
            } => match self.cached_topic(t, cache, &name)? {
                Some(_) => return Ok(WriteOutcome::Done),
                None => self.apply_create_topic(t, cache, name, config, now_ms, replicas),
            },
            MetaCommand::DeleteTopic { name } => match self.cached_topic(t, cache, &name)? {
                Some(_) => self.apply_delete_topic(t, cache, &name),
                None => return Ok(WriteOutcome::Done),
            },
        };
        match outcome {
            Err(e) if !is_fatal(&e) => Ok(WriteOutcome::Done),
            other => other,
        }
    }

    fn apply_delete_topic(
        &self,
        t: &mut Tables<'_>,
        cache: &mut TxnCache,
        name: &str,
    ) -> Result<WriteOutcome, StoreError> {
        let entry = self
            .cached_topic(t, cache, name)?
            .ok_or_else(|| StoreError::TopicNotFound(name.to_string()))?;
        let tid = entry.id;
        cache.topics.remove(name);
        cache.partitions.retain(|k, _| k.0 != tid);
        cache.active_segments.retain(|k, _| k.0 != tid);
        cache.producers.retain(|k, _| k.0 != tid);
        t.topics.remove(name)?;
        t.partitions
            .retain_in((tid, 0)..=(tid, u32::MAX), |_, _| false)?;
        t.batches
            .retain_in((tid, 0, 0)..=(tid, u32::MAX, u64::MAX), |_, _| false)?;
        t.segments
            .retain_in((tid, 0, 0)..=(tid, u32::MAX, u64::MAX), |_, _| false)?;
        t.producers
            .retain_in((tid, 0, 0)..=(tid, u32::MAX, u64::MAX), |_, _| false)?;
        t.offsets.retain(|(_, topic, _), _| topic != name)?;
        Ok(WriteOutcome::TopicDeleted)
    }

    fn apply_append(
        &self,
        t: &mut Tables<'_>,
        cache: &mut TxnCache,
        req: AppendRequest,
    ) -> Result<AppendOutcome, StoreError> {
        if req.records.is_empty() {
            return Err(StoreError::EmptyBatch);
        }
        let topic = self
            .cached_topic(t, cache, &req.topic)?
            .ok_or_else(|| StoreError::TopicNotFound(req.topic.clone()))?;
        if req.partition >= topic.config.partitions {
            return Err(StoreError::PartitionNotFound {
                topic: req.topic,
                partition: req.partition,
            });
        }
        let max = topic.config.max_message_bytes as usize;
        if req.records.largest_record() > max {
            let size = req.records.largest_record();
            return Err(StoreError::RecordTooLarge { size, max });
        }
        let key = (topic.id, req.partition);
        if let Some(pb) = &req.producer
            && let Some(retry) =
                self.check_producer(t, cache, &topic.name, key, pb, &req.records)?
        {
            return Ok(retry);
        }
        let mut state = self.cached_partition(t, cache, key)?;
        let base_offset = state.log_end_offset;
        let mut ids = Vec::with_capacity(req.records.len());
        let mut producer = req.producer.clone();
        for chunk in req.records.chunks() {
            let header = BatchHeader {
                epoch: SINGLE_NODE_EPOCH,
                base_offset: state.log_end_offset,
                prev_id: state.head,
                last_id: state.head,
                producer: producer.clone(),
            };
            let chunk_ids = wire::chain_ids(&header, chunk.digests());
            let header = BatchHeader {
                last_id: chunk_ids.last().copied().unwrap_or(state.head),
                ..header
            };
            let value = wire::encode_prepared(&header, chunk)?;
            t.batches
                .insert((key.0, key.1, header.base_offset), value.as_slice())?;
            let next_offset = header.base_offset + chunk.len() as u64;
            self.extend_segment(
                t,
                cache,
                &topic.config,
                key,
                (header.base_offset, next_offset),
                value.len() as u64,
                chunk.timestamps(),
            )?;
            if let Some(pb) = producer.as_mut() {
                pb.prev = wire::producer_head(pb, chunk.digests());
                pb.base_seq += chunk.len() as u64;
            }
            state.log_end_offset = next_offset;
            state.head = header.last_id;
            state.bytes += value.len() as u64;
            ids.extend(chunk_ids);
        }
        state.high_watermark = state.log_end_offset;
        state.epoch = SINGLE_NODE_EPOCH;
        cache.partitions.insert(key, state);
        let producer_head = match (&req.producer, &producer) {
            (Some(first), Some(after)) => {
                self.record_producer(cache, key, first, after, base_offset, &req.records);
                Some(after.prev)
            }
            _ => None,
        };
        Ok(AppendOutcome {
            base_offset,
            ids,
            duplicate: false,
            producer_head,
        })
    }

    /// Checks an idempotent batch against the producer's state: `Ok(Some(_))` is
    /// a retry already stored (with its original offsets), `Ok(None)` the next
    /// batch in sequence; gaps, chain mismatches and too-old retries are errors.
    /// A "retry" whose records differ from the stored ones (its producer-chain
    /// head differs) is a `ProducerChainMismatch`, never a duplicate.
    fn check_producer(
        &self,
        t: &mut Tables<'_>,
        cache: &mut TxnCache,
        topic: &str,
        key: (u32, u32),
        pb: &ProducerBatch,
        records: &PreparedRecords,
    ) -> Result<Option<AppendOutcome>, StoreError> {
        let state = self.cached_producer(t, cache, key, pb.producer)?;
        let genesis = chain::producer_genesis(pb.producer, topic, key.1);
        let remembered = match ProducerState::check(state.as_ref(), genesis, pb, records.len())? {
            SequenceCheck::Next => return Ok(None),
            SequenceCheck::Retry(original) => original,
        };
        let stale = StoreError::StaleSequence {
            producer: pb.producer,
            seq: pb.base_seq,
        };
        let log_start = self.cached_partition(t, cache, key)?.log_start_offset;
        let Some(original) = Some(remembered).filter(|o| o.base_offset >= log_start) else {
            // Never stored, or retention has dropped it since.
            return Err(stale);
        };
        let stored = self.stored_outcome(t, key, original)?;
        if stored.producer_head != Some(records.producer_after(pb).prev) {
            return Err(StoreError::ProducerChainMismatch {
                producer: pb.producer,
                seq: pb.base_seq,
            });
        }
        Ok(Some(stored))
    }

    /// The outcome of an append already stored: its IDs and producer head, read
    /// back from the batches it was stored as.
    fn stored_outcome(
        &self,
        t: &Tables<'_>,
        key: (u32, u32),
        original: RecentBatch,
    ) -> Result<AppendOutcome, StoreError> {
        let end = original.base_offset + u64::from(original.count);
        let mut ids = Vec::with_capacity(original.count as usize);
        let mut producer_head = None;
        for row in t
            .batches
            .range((key.0, key.1, original.base_offset)..(key.0, key.1, end))?
        {
            let (k, v) = row?;
            let batch = self.decode_batch(k.value(), v.value())?;
            ids.extend(batch.ids());
            producer_head = batch.producer_head();
        }
        if ids.len() != original.count as usize {
            return Err(self.corrupt(format!(
                "producer state points at {} records from {}, {} are stored",
                original.count,
                original.base_offset,
                ids.len()
            )));
        }
        Ok(AppendOutcome {
            base_offset: original.base_offset,
            ids,
            duplicate: true,
            producer_head,
        })
    }

    /// Advances the producer's state past an append that started as `first`
    /// and ended with the producer chain at `after`.
    fn record_producer(
        &self,
        cache: &mut TxnCache,
        key: (u32, u32),
        first: &ProducerBatch,
        after: &ProducerBatch,
        base_offset: u64,
        records: &PreparedRecords,
    ) {
        let count = records.len();
        let newest = records
            .chunks()
            .iter()
            .map(|c| c.timestamps().1)
            .max()
            .unwrap_or(0);
        let pkey = (key.0, key.1, first.producer.0);
        let state = cache.producers.remove(&pkey);
        let state = ProducerState::advanced(state, first, after, base_offset, count as u32, newest);
        cache.producers.insert(pkey, state);
    }

    /// Adds a stored batch covering `offsets` to the partition's active segment,
    /// starting a new segment when the active one is full or old.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn extend_segment(
        &self,
        t: &mut Tables<'_>,
        cache: &mut TxnCache,
        config: &TopicConfig,
        key: (u32, u32),
        offsets: (u64, u64),
        bytes: u64,
        (min_ts, max_ts): (i64, i64),
    ) -> Result<(), StoreError> {
        let active = match cache.active_segments.remove(&key) {
            Some(segment) => Some(segment),
            None => self.load_active_segment(t, key)?,
        };
        let segment_ms = i64::try_from(config.segment_time.as_millis()).unwrap_or(i64::MAX);
        let fresh = SegmentMeta {
            base_offset: offsets.0,
            next_offset: offsets.1,
            bytes,
            min_timestamp: min_ts,
            max_timestamp: max_ts,
        };
        let segment = match active {
            Some(mut s)
                if s.bytes < config.segment_bytes
                    && max_ts.saturating_sub(s.min_timestamp) < segment_ms =>
            {
                s.next_offset = offsets.1;
                s.bytes += bytes;
                s.min_timestamp = s.min_timestamp.min(min_ts);
                s.max_timestamp = s.max_timestamp.max(max_ts);
                s
            }
            Some(full) => {
                t.segments.insert(
                    (key.0, key.1, full.base_offset),
                    self.encode_value(&full)?.as_slice(),
                )?;
                fresh
            }
            None => fresh,
        };
        cache.active_segments.insert(key, segment);
        Ok(())
    }

    fn load_active_segment(
        &self,
        t: &Tables<'_>,
        key: (u32, u32),
    ) -> Result<Option<SegmentMeta>, StoreError> {
        let last = t
            .segments
            .range((key.0, key.1, 0)..=(key.0, key.1, u64::MAX))?
            .next_back();
        match last {
            Some(row) => Ok(Some(self.decode_value("segment", row?.1.value())?)),
            None => Ok(None),
        }
    }

    pub(super) fn cached_topic(
        &self,
        t: &Tables<'_>,
        cache: &mut TxnCache,
        name: &str,
    ) -> Result<Option<TopicEntry>, StoreError> {
        if let Some(entry) = cache.topics.get(name) {
            return Ok(Some(entry.clone()));
        }
        let Some(value) = t.topics.get(name)? else {
            return Ok(None);
        };
        let entry: TopicEntry = self.decode_value("topic", value.value())?;
        cache.topics.insert(name.to_string(), entry.clone());
        Ok(Some(entry))
    }

    pub(super) fn cached_partition(
        &self,
        t: &Tables<'_>,
        cache: &mut TxnCache,
        key: (u32, u32),
    ) -> Result<PartitionState, StoreError> {
        if let Some(state) = cache.partitions.get(&key) {
            return Ok(state.clone());
        }
        let value = t
            .partitions
            .get(key)?
            .ok_or_else(|| self.corrupt(format!("partition {key:?} has no state")))?;
        let state: PartitionState = self.decode_value("partition state", value.value())?;
        cache.partitions.insert(key, state.clone());
        Ok(state)
    }

    pub(super) fn cached_producer(
        &self,
        t: &Tables<'_>,
        cache: &mut TxnCache,
        key: (u32, u32),
        producer: ProducerId,
    ) -> Result<Option<ProducerState>, StoreError> {
        let pkey = (key.0, key.1, producer.0);
        if let Some(state) = cache.producers.get(&pkey) {
            return Ok(Some(state.clone()));
        }
        match t.producers.get(pkey)? {
            Some(value) => {
                let state: ProducerState = self.decode_value("producer state", value.value())?;
                cache.producers.insert(pkey, state.clone());
                Ok(Some(state))
            }
            None => Ok(None),
        }
    }

    pub(super) fn flush_cache(
        &self,
        t: &mut Tables<'_>,
        cache: TxnCache,
    ) -> Result<(), StoreError> {
        for (key, state) in &cache.partitions {
            t.partitions
                .insert(*key, self.encode_value(state)?.as_slice())?;
        }
        for (key, segment) in &cache.active_segments {
            t.segments.insert(
                (key.0, key.1, segment.base_offset),
                self.encode_value(segment)?.as_slice(),
            )?;
        }
        for (key, state) in &cache.producers {
            t.producers
                .insert(*key, self.encode_value(state)?.as_slice())?;
        }
        Ok(())
    }

    pub(super) fn encode_value<T: serde::Serialize>(
        &self,
        value: &T,
    ) -> Result<Vec<u8>, StoreError> {
        Ok(wire::encode(value)?)
    }
}

/// Topic names follow Kafka's rule: 1 to 249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub(crate) fn validate_topic_name(name: &str) -> Result<(), StoreError> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > 249 || !valid_chars || name == "." || name == ".." {
        return Err(StoreError::Config(crate::error::ConfigError::Invalid {
            name: "topic",
            reason: format!(
                "'{name}' is not a valid topic name: use 1 to 249 of a-z A-Z 0-9 . _ -"
            ),
        }));
    }
    Ok(())
}
