//! The redb tables and the values kept in them.
//!
//! Keys are tuples so that one partition's rows sit together and range scans
//! walk them in offset order. Values are versioned postcard frames
//! ([`crate::wire::encode`]), so a damaged value is a clear error on decode.

use std::collections::VecDeque;

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use crate::chain::MessageId;
use crate::config::TopicConfig;
use crate::core::replication::LogEntry;
use crate::core::replication::Snapshot;
use crate::error::StoreError;
use crate::peer::NodeId;
use crate::wire::ProducerBatch;

/// The key in [`META`] of the mesh this node belongs to.
pub(super) const MESH_ID: &str = "mesh_id";

/// The key in [`META`] of one past the last applied offset of `__meta`.
pub(super) const META_APPLIED: &str = "meta_applied";

/// Counters and the schema version: `"next_topic_id"`, `"schema_version"`,
/// and [`META_APPLIED`].
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Topic name → [`TopicEntry`].
pub(super) const TOPICS: TableDefinition<&str, &[u8]> = TableDefinition::new("topics");
/// (topic id, partition) → [`PartitionState`].
pub(super) const PARTITIONS: TableDefinition<(u32, u32), &[u8]> =
    TableDefinition::new("partitions");
/// (topic id, partition, base offset) → encoded [`crate::wire::StoredBatch`].
pub(super) const BATCHES: TableDefinition<(u32, u32, u64), &[u8]> = TableDefinition::new("batches");
/// (topic id, partition, base offset) → [`SegmentMeta`].
pub(super) const SEGMENTS: TableDefinition<(u32, u32, u64), &[u8]> =
    TableDefinition::new("segments");
/// (topic id, partition, producer id) → [`ProducerState`].
pub(super) const PRODUCERS: TableDefinition<(u32, u32, u64), &[u8]> =
    TableDefinition::new("producers");
/// (topic id, partition, entry index) → [`EntryRow`]: a replicated partition's log
/// as replication sees it, one row per batch or epoch-start marker.
pub(super) const ENTRIES: TableDefinition<(u32, u32, u64), &[u8]> = TableDefinition::new("entries");
/// (topic id, partition) → [`VoteRow`]: a replica's epoch and promise.
pub(super) const VOTES: TableDefinition<(u32, u32), &[u8]> = TableDefinition::new("votes");
/// (topic id, partition) → [`SnapshotRow`]: where a replica's log restarts
/// (it reads the entries from there on, not the whole log).
pub(super) const SNAPSHOTS: TableDefinition<(u32, u32), &[u8]> = TableDefinition::new("snapshots");
/// (topic id, partition) → [`SnapshotRow`]: where a replicated log's stored
/// entries start once retention dropped the oldest (absent: at entry 0).
pub(super) const LOG_STARTS: TableDefinition<(u32, u32), &[u8]> =
    TableDefinition::new("log_starts");
/// (group, topic, partition) → committed offset (the next offset to read).
pub(super) const GROUP_OFFSETS: TableDefinition<(&str, &str, u32), u64> =
    TableDefinition::new("group_offsets");

/// The schema this build writes; a file with another is refused on open.
pub(super) const SCHEMA_VERSION: u64 = 1;

/// A topic as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicEntry {
    /// Short numeric id used in table keys instead of the name.
    pub id: u32,
    /// The topic's name.
    pub name: String,
    /// Its settings.
    pub config: TopicConfig,
    /// When it was created, in ms since the Unix epoch.
    pub created_ms: i64,
    /// The replicas of each partition, in order, when the topic is replicated
    /// across the mesh (empty only for a topic written by the store alone, as
    /// its own tests and benchmark do).
    pub replicas: Vec<Vec<NodeId>>,
}

/// One entry of a replicated partition's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryRow {
    /// The entry as replication sees it (its digest is the batch's last record ID).
    pub entry: LogEntry,
    /// Offset of the batch's first record (the log end, for a marker).
    pub base_offset: u64,
    /// Records in the batch; 0 for an epoch-start marker.
    pub count: u32,
}

/// Where a replica's log restarts: the point below which its entries are
/// compacted (committed and dropped from memory), and the record log there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRow {
    /// The replication snapshot point (entry index, the ID, epoch and replica
    /// set in force there).
    pub snapshot: Snapshot<NodeId>,
    /// One past the last record before the point.
    pub record_end: u64,
    /// The chain ID of the last record before the point (the chain ID before
    /// the partition's first record when there is none).
    pub record_head: MessageId,
}

/// A replica's durable election state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteRow {
    /// The highest epoch it has seen.
    pub epoch: u64,
    /// Whom it promised in that epoch.
    pub voted_for: Option<NodeId>,
}

/// The log state of one partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    /// The leader epoch of the newest batch.
    pub epoch: u64,
    /// The first offset still stored (retention moves it forward).
    pub log_start_offset: u64,
    /// One past the last stored offset.
    pub log_end_offset: u64,
    /// One past the last committed offset: what consumers may read up to. On a
    /// single node every durable append is committed, so it equals `log_end_offset`.
    pub high_watermark: u64,
    /// The chain ID of the record at `log_end_offset - 1` (genesis when empty).
    pub head: MessageId,
    /// The chain ID just before `log_start_offset`: where verification starts.
    pub start_prev_id: MessageId,
    /// Encoded bytes stored in the partition.
    pub bytes: u64,
}

/// A segment: a run of whole batches that retention keeps or drops together.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentMeta {
    /// Offset of its first record.
    pub base_offset: u64,
    /// One past its last record.
    pub next_offset: u64,
    /// Encoded bytes of its batches.
    pub bytes: u64,
    /// Oldest record timestamp in it (ms), which decides when it rolls.
    pub min_timestamp: i64,
    /// Newest record timestamp in it (ms), which decides when it expires.
    pub max_timestamp: i64,
}

/// How many of a producer's recent batches the log remembers for retries.
/// Kafka remembers 5; a retry older than this is refused with `StaleSequence`.
pub const PRODUCER_WINDOW_BATCHES: usize = 64;

/// What the log knows of one idempotent producer in one partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerState {
    /// The sequence its next batch must start at.
    pub next_seq: u64,
    /// Its producer-chain head: the hash after its last appended record.
    pub head: MessageId,
    /// Its most recent batches, oldest first, to answer retries with the original offsets.
    pub recent: VecDeque<RecentBatch>,
    /// The newest record timestamp it wrote here (ms): the state expires
    /// [`PRODUCER_EXPIRATION_MS`] after it.
    pub last_timestamp: i64,
}

/// How long the log keeps the state of a producer that stopped writing to a
/// partition: one day, Kafka's `producer.id.expiration.ms`. A producer that
/// comes back later starts its chain over (sequence 0, producer genesis).
/// Measured on record timestamps, since the store has no clock of its own: a
/// producer that writes records stamped more than a day in the past sees one
/// `SequenceGap` after a retention run, then starts over.
pub const PRODUCER_EXPIRATION_MS: i64 = 24 * 3600 * 1000;

/// One remembered producer batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentBatch {
    /// Its first sequence.
    pub base_seq: u64,
    /// How many records it held.
    pub count: u32,
    /// Where it was appended.
    pub base_offset: u64,
    /// The producer-chain hash before it, to roll the state back to it.
    pub prev: MessageId,
}

/// What an idempotent batch is, against the producer's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceCheck {
    /// The next batch in sequence, extending the producer chain.
    Next,
    /// A retry of this remembered batch (its records still to be compared).
    Retry(RecentBatch),
}

impl ProducerState {
    /// Checks a batch of `count` records stamped `pb` against `state` (`None`:
    /// the producer has written nothing here; its chain starts at `genesis`).
    /// Gaps, chain mismatches and retries too old to look up are errors.
    pub fn check(
        state: Option<&ProducerState>,
        genesis: MessageId,
        pb: &ProducerBatch,
        count: usize,
    ) -> Result<SequenceCheck, StoreError> {
        let (next_seq, head) = state.map_or((0, genesis), |s| (s.next_seq, s.head));
        if pb.base_seq > next_seq {
            return Err(StoreError::SequenceGap {
                producer: pb.producer,
                expected: next_seq,
                found: pb.base_seq,
            });
        }
        if pb.base_seq == next_seq {
            if pb.prev != head {
                return Err(StoreError::ProducerChainMismatch {
                    producer: pb.producer,
                    seq: pb.base_seq,
                });
            }
            return Ok(SequenceCheck::Next);
        }
        state
            .and_then(|s| {
                s.recent
                    .iter()
                    .find(|b| b.base_seq == pb.base_seq && b.count as usize == count)
            })
            .map(|b| SequenceCheck::Retry(*b))
            .ok_or(StoreError::StaleSequence {
                producer: pb.producer,
                seq: pb.base_seq,
            })
    }

    /// The state after a batch of `count` records that started as `first`, was
    /// stored at `base_offset`, and left the producer chain at `after`.
    pub fn advanced(
        state: Option<ProducerState>,
        first: &ProducerBatch,
        after: &ProducerBatch,
        base_offset: u64,
        count: u32,
        newest_timestamp: i64,
    ) -> ProducerState {
        let mut state = state.unwrap_or(ProducerState {
            next_seq: 0,
            head: after.prev,
            recent: VecDeque::new(),
            last_timestamp: newest_timestamp,
        });
        state.next_seq = after.base_seq;
        state.head = after.prev;
        state.last_timestamp = state.last_timestamp.max(newest_timestamp);
        state.recent.push_back(RecentBatch {
            base_seq: first.base_seq,
            count,
            base_offset,
            prev: first.prev,
        });
        if state.recent.len() > PRODUCER_WINDOW_BATCHES {
            state.recent.pop_front();
        }
        state
    }

    /// The state as it was before any batch at or after `offset`; `None` when
    /// that is before everything remembered (the producer starts over).
    pub fn rolled_back_to(&self, offset: u64) -> Option<ProducerState> {
        let keep = self
            .recent
            .iter()
            .take_while(|b| b.base_offset < offset)
            .count();
        if keep == self.recent.len() {
            return Some(self.clone());
        }
        let first_cut = self.recent[keep];
        if keep == 0 && first_cut.base_seq > 0 {
            // Batches before the first cut one are not remembered: the state
            // before it is unknown, except that a producer at sequence 0 had none.
            return None;
        }
        Some(ProducerState {
            next_seq: first_cut.base_seq,
            head: first_cut.prev,
            recent: self.recent.iter().take(keep).copied().collect(),
            last_timestamp: self.last_timestamp,
        })
    }
}
