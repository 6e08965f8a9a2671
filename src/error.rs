//! Typed errors, one enum per layer, plus the umbrella [`Error`] the public API
//! returns. Every variant says what went wrong in terms a user can act on.

use std::path::PathBuf;

use thiserror::Error as ThisError;

use crate::chain::{MessageId, ProducerId};

/// Encoding or decoding a frame failed.
#[derive(Debug, Clone, PartialEq, Eq, ThisError)]
#[non_exhaustive]
pub enum WireError {
    /// The frame had no bytes at all.
    #[error("empty frame")]
    Empty,
    /// The frame was written by a format version this build does not read.
    #[error("unsupported format version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
        /// The version this build reads.
        supported: u8,
    },
    /// The frame is larger than the hard cap.
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The frame's size.
        size: usize,
        /// The cap.
        max: usize,
    },
    /// The bytes after the version are not a valid encoding.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A valid value was followed by extra bytes.
    #[error("{0} unexpected trailing bytes after the frame")]
    TrailingBytes(usize),
}

/// A hash chain did not verify.
#[derive(Debug, Clone, PartialEq, Eq, ThisError)]
#[non_exhaustive]
pub enum ChainError {
    /// Offsets did not run on one after another.
    #[error("offset gap: expected offset {expected}, found {found}")]
    OffsetGap {
        /// The offset that should have come next.
        expected: u64,
        /// The offset that came.
        found: u64,
    },
    /// The recomputed chain does not end at the expected head.
    #[error("chain head mismatch: expected {expected}, computed {computed}")]
    HeadMismatch {
        /// The head the log (or a replica) claims.
        expected: MessageId,
        /// The head recomputed from the records.
        computed: MessageId,
    },
    /// A producer's records are missing, duplicated or out of order.
    #[error("producer {producer}: expected sequence {expected}, found {found}")]
    SequenceGap {
        /// The producer.
        producer: ProducerId,
        /// The sequence that should have come next.
        expected: u64,
        /// The sequence that came.
        found: u64,
    },
}

/// A configuration value is out of range or inconsistent with another.
#[derive(Debug, Clone, PartialEq, Eq, ThisError)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting has a value it cannot take.
    #[error("invalid {name}: {reason}")]
    Invalid {
        /// The setting's name, as Kafka spells it in snake_case.
        name: &'static str,
        /// Why the value is refused.
        reason: String,
    },
}

/// The log store failed or refused a request.
#[derive(Debug, ThisError)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process has the data directory's database open.
    #[error("the database {path} is in use by another meshlog process")]
    InUse {
        /// The database file.
        path: PathBuf,
    },
    /// The database file is damaged or its contents contradict each other.
    #[error("corrupt store {path}: {detail}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What was found to be wrong.
        detail: String,
    },
    /// Reading or writing the disk failed (a full disk lands here).
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The database engine reported an error.
    #[error("database error: {0}")]
    Database(#[from] redb::Error),
    /// No topic has this name.
    #[error("topic '{0}' not found")]
    TopicNotFound(String),
    /// A topic of this name exists with a different configuration.
    #[error("topic '{0}' already exists with a different configuration")]
    TopicExists(String),
    /// The topic has no such partition.
    #[error("topic '{topic}' has no partition {partition}")]
    PartitionNotFound {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: u32,
    },
    /// A record exceeds the topic's `max_message_bytes`.
    #[error("record of {size} bytes exceeds max_message_bytes = {max}")]
    RecordTooLarge {
        /// The record's encoded size.
        size: usize,
        /// The topic's limit.
        max: usize,
    },
    /// A batch has no records.
    #[error("empty batch")]
    EmptyBatch,
    /// The requested offset is outside the partition's log.
    #[error("offset {offset} is out of range for {topic}/{partition} (log holds {start}..{end})")]
    OffsetOutOfRange {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The offset asked for.
        offset: u64,
        /// The first offset still stored.
        start: u64,
        /// One past the last offset.
        end: u64,
    },
    /// An idempotent producer skipped sequence numbers: records in between are missing.
    #[error("producer {producer}: sequence gap (expected {expected}, got {found})")]
    SequenceGap {
        /// The producer.
        producer: ProducerId,
        /// The sequence the log expected next.
        expected: u64,
        /// The batch's first sequence.
        found: u64,
    },
    /// A batch's previous producer hash is not the producer chain head the log holds.
    #[error("producer {producer}: batch at sequence {seq} does not extend the producer chain")]
    ProducerChainMismatch {
        /// The producer.
        producer: ProducerId,
        /// The batch's first sequence.
        seq: u64,
    },
    /// A retried batch is older than the producer state the log still keeps.
    #[error("producer {producer}: sequence {seq} is a retry too old to look up")]
    StaleSequence {
        /// The producer.
        producer: ProducerId,
        /// The batch's first sequence.
        seq: u64,
    },
    /// A replicated batch does not extend this replica's log, or would cut
    /// committed records: the sender's log and ours disagree.
    #[error("{topic}/{partition}: replicated log refused: {detail}")]
    Diverged {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// What did not fit.
        detail: String,
    },
    /// The write transaction carrying this operation failed, so nothing in it was stored.
    #[error("write failed, nothing of it was stored: {0}")]
    CommitFailed(String),
    /// An earlier write failed (a full disk, an I/O error, a crashed writer): the
    /// store takes no more writes and the node is stopping.
    #[error("the store stopped after a failed write: {0}")]
    Failed(String),
    /// A stored batch could not be decoded.
    #[error("stored batch is unreadable: {0}")]
    Wire(#[from] WireError),
    /// A configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

macro_rules! redb_errors_into_store_error {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Database(e.into())
            }
        }
    )*};
}
redb_errors_into_store_error!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl From<crate::core::idempotence::SequenceError> for StoreError {
    fn from(e: crate::core::idempotence::SequenceError) -> Self {
        use crate::core::idempotence::SequenceError;
        match e {
            SequenceError::Gap {
                producer,
                expected,
                found,
            } => StoreError::SequenceGap {
                producer,
                expected,
                found,
            },
            SequenceError::ChainMismatch { producer, seq } => {
                StoreError::ProducerChainMismatch { producer, seq }
            }
            SequenceError::Stale { producer, seq } => StoreError::StaleSequence { producer, seq },
        }
    }
}

/// The error type of meshlog's public API.
#[derive(Debug, ThisError)]
#[non_exhaustive]
pub enum Error {
    /// No topic has this name.
    #[error("topic '{0}' not found")]
    TopicNotFound(String),
    /// A topic of this name exists with a different configuration.
    #[error("topic '{0}' already exists with a different configuration")]
    TopicExists(String),
    /// A record exceeds the topic's `max_message_bytes`.
    #[error("record of {size} bytes exceeds max_message_bytes = {max}")]
    RecordTooLarge {
        /// The record's encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// `auto_offset_reset = none` and the group has no committed offset here
    /// (or the committed offset is no longer in the log).
    #[error("no valid offset for {topic}/{partition} and auto_offset_reset is none")]
    NoOffset {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
    },
    /// `commit` was called on a consumer without a `group_id`.
    #[error("this consumer has no group_id, so it has nowhere to commit offsets")]
    NoGroup,
    /// The partition is not assigned to this consumer.
    #[error("{topic}/{partition} is not assigned to this consumer")]
    NotAssigned {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
    },
    /// The node asked does not lead the partition; `hint` is the leader it
    /// knows of. Producers retry there by themselves.
    #[error("{topic}/{partition}: not the leader (leader: {})", hint.map_or_else(|| "unknown".to_string(), |h| h.to_string()))]
    NotLeader {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The leader, if known.
        hint: Option<crate::net::NodeId>,
    },
    /// Fewer replicas are in sync than the topic's `min_insync_replicas`, so
    /// `Acks::All` cannot be honoured; `Acks::Leader` still can.
    #[error(
        "{topic}/{partition}: not enough replicas in sync ({in_sync} of the {required} required)"
    )]
    NotEnoughReplicas {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// Replicas in sync, the leader included.
        in_sync: usize,
        /// Replicas required.
        required: usize,
    },
    /// The records were not acknowledged within the producer's `delivery_timeout`.
    #[error("{topic}/{partition}: not acknowledged in time")]
    Timeout {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
    },
    /// The producer's buffer stayed full (`buffer_memory`) for `max_block`.
    #[error(
        "the producer's buffer of {buffer_memory} bytes stayed full for {waited:?} (max_block)"
    )]
    BufferFull {
        /// The buffer's size.
        buffer_memory: usize,
        /// How long `send` waited.
        waited: std::time::Duration,
    },
    /// A replaying producer's record is already in the log at sequence `seq`
    /// of its stream: it was not stored again.
    #[error("{topic}/{partition}: the producer's record at sequence {seq} is already stored")]
    AlreadyStored {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The record's sequence number in the producer's stream.
        seq: u64,
    },
    /// The log holds other records of this producer at sequence `seq`: a
    /// replay that differs from the stored stream, or records older than the
    /// leader remembers batches.
    #[error("{topic}/{partition}: the log holds other records of this producer at sequence {seq}")]
    ProducerConflict {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The first conflicting sequence.
        seq: u64,
    },
    /// The batch's stamp does not fit the producer's chain in the log, which
    /// stands at `next_seq` (the producer resends from there by itself).
    #[error("{topic}/{partition}: out of sequence (the log expects sequence {next_seq})")]
    OutOfSequence {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The sequence the log expects next from this producer.
        next_seq: u64,
        /// The producer-chain hash at that point.
        head: MessageId,
    },
    /// Records repeat dedup keys the partition stored within its window
    /// (index in the batch, original offset, original ID). The producer
    /// handles this itself: each such record is reported at its original.
    #[error("{topic}/{partition}: {} records repeat stored dedup keys", originals.len())]
    Duplicates {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// Index in the batch, original offset and ID of each duplicate.
        originals: Vec<(u32, u64, MessageId)>,
    },
    /// The mesh has too few live storage nodes for the request.
    #[error("{0}")]
    NotEnoughNodes(String),
    /// A peer refused the request for a reason given as text.
    #[error("refused by the mesh: {0}")]
    Refused(String),
    /// A consumer group's coordinator refused the request: a stale
    /// generation (the member was fenced), an unknown member, a rebalance
    /// in progress, a partition not assigned to the member, ...
    #[error("consumer group: {0}")]
    Group(#[from] crate::core::group::GroupError),
    /// The node has shut down.
    #[error("the node is shut down")]
    Closed,
    /// A configuration value is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The log store failed.
    #[error(transparent)]
    Store(StoreError),
    /// The network layer failed.
    #[error(transparent)]
    Net(crate::net::NetError),
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TopicNotFound(topic) => Error::TopicNotFound(topic),
            StoreError::TopicExists(topic) => Error::TopicExists(topic),
            StoreError::RecordTooLarge { size, max } => Error::RecordTooLarge { size, max },
            StoreError::Config(e) => Error::Config(e),
            other => Error::Store(other),
        }
    }
}

/// Shorthand for results of the public API.
pub type Result<T, E = Error> = std::result::Result<T, E>;
