//! The redb tables and the values kept in them.
//!
//! Keys are tuples so that one partition's rows sit together and range scans
//! walk them in offset order. Values are versioned postcard frames
//! ([`crate::wire::encode`]), so a damaged value is a clear error on decode.

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use crate::chain::MessageId;
use crate::config::TopicConfig;
use crate::core::replication::LogEntry;
use crate::core::replication::Snapshot;
use crate::peer::NodeId;

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

impl PartitionState {
    /// Where committed records end for a reader, given `known_committed`
    /// (one past the last record offset a replica knows committed and durable
    /// here): the stored high watermark or further, never past the log end.
    pub fn readable_end(&self, known_committed: u64) -> u64 {
        self.high_watermark
            .max(known_committed.min(self.log_end_offset))
    }
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

pub use crate::core::idempotence::{
    PRODUCER_EXPIRATION_MS, PRODUCER_WINDOW_BATCHES, ProducerState, RecentBatch, SequenceCheck,
};
