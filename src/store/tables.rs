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

/// Counters and the schema version: `"next_topic_id"`, `"schema_version"`.
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
}
