//! The peer protocol: what nodes (and light clients) ask each other.
//!
//! Every message is a request on the long-lived link from its sender to its
//! receiver ([`crate::net::link`]), answered on the same link. Replication
//! traffic is one-way: the request carries a `core::replication` message
//! (plus the batches an append ships) and asks for no answer (the node's
//! [`PeerResponse::Ack`] is not sent); the replica's real answer travels back
//! as a request of its own, as the core's messages are asynchronous.

use serde::{Deserialize, Serialize};

use crate::chain::MessageId;
use crate::config::Acks;
use crate::core::group::{GroupError, GroupRequest, GroupResponse};
use crate::core::ownership::OwnershipRecord;
use crate::core::replication::Message;
use crate::description::TopicDescription;
use crate::peer::NodeId;
use crate::record::{ConsumerRecord, Record};
use crate::wire::ProducerBatch;

/// A request from one peer to another.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Replication traffic of one partition.
    Replicate(ReplicateFrame),
    /// Append records to a partition at its leader.
    Produce(ProduceFrame),
    /// Committed records of a partition, from any replica (long poll).
    Fetch(FetchFrame),
    /// Ownership records of partitions the sender leads (gossip; one-way).
    Ownership(Vec<OwnershipRecord<NodeId>>),
    /// The topics this node knows.
    ListTopics,
    /// One topic as this node sees it.
    DescribeTopic {
        /// Its name.
        name: String,
    },
    /// Replication traffic of several partitions to one peer, handled in order.
    ReplicateMany(Vec<ReplicateFrame>),
    /// A consumer-group request, for the group's coordinator.
    Group(GroupRequest),
}

/// A replication message for one partition.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicateFrame {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The core's message.
    pub message: Message,
    /// For an append: the encoded batch of each entry that holds records, in order.
    pub batches: Vec<serde_bytes::ByteBuf>,
}

/// Records for a partition's leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProduceFrame {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// When to answer.
    pub acks: Acks,
    /// The idempotent producer's stamp, if any.
    pub producer: Option<ProducerBatch>,
    /// The records.
    pub records: Vec<Record>,
}

/// A consumer's read of one partition.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FetchFrame {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The first offset wanted; `None` asks only for the partition's bounds.
    pub offset: Option<u64>,
    /// Stop after the batch that brings the answer to this many bytes (at
    /// least one record is returned when any is available).
    pub max_bytes: u32,
    /// With nothing to return yet, wait up to this long for records to be
    /// committed (`fetch.max.wait.ms`).
    pub max_wait_ms: u32,
    /// Answer before `max_wait_ms` only once records of at least this many
    /// bytes are there (`fetch.min.bytes`).
    pub min_bytes: u32,
}

/// Committed records and the partition's bounds on the replica that answered.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fetched {
    /// Records from the requested offset on, in offset order.
    pub records: Vec<ConsumerRecord>,
    /// The first offset still stored.
    pub log_start_offset: u64,
    /// One past the last committed offset.
    pub high_watermark: u64,
}

/// Where produced records landed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Produced {
    /// Offset of the first record.
    pub base_offset: u64,
    /// Each record's partition-chain ID.
    pub ids: Vec<MessageId>,
    /// True when the batch was a retry already in the log.
    pub duplicate: bool,
    /// The producer-chain head after the batch, for idempotent batches.
    pub producer_head: Option<MessageId>,
}

/// Why a peer refused a request: the errors a client can act on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// This node does not lead the partition; `hint` may.
    NotLeader {
        /// The leader this node knows of.
        hint: Option<NodeId>,
    },
    /// Fewer replicas are in sync than `min_insync_replicas`.
    NotEnoughReplicas {
        /// Replicas in sync, the leader included.
        in_sync: usize,
        /// Replicas required.
        required: usize,
    },
    /// No such topic.
    TopicNotFound(String),
    /// No such partition.
    PartitionNotFound(String, u32),
    /// A record is over `max_message_bytes`.
    RecordTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The records were not acknowledged in time.
    Timeout,
    /// A fetch asked for an offset outside the partition's log.
    OffsetOutOfRange {
        /// The first offset still stored.
        start: u64,
        /// One past the last committed offset.
        end: u64,
    },
    /// Anything else, as text.
    Other(String),
    /// An idempotent batch does not fit the producer's chain, which stands at
    /// `next_seq` and `head` in the leader's log.
    OutOfSequence {
        /// The sequence the leader expects next from the producer.
        next_seq: u64,
        /// The producer-chain hash at that point.
        head: MessageId,
    },
    /// Nothing was stored: these records (index in the batch, original
    /// offset, original ID) repeat dedup keys the partition stored within
    /// its dedup window.
    Duplicates(Vec<(u32, u64, MessageId)>),
}

/// A peer's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    /// Received (replication traffic).
    Ack,
    /// The outcome of a produce request.
    Produced(Result<Produced, Refusal>),
    /// The outcome of a topic change.
    Done(Result<(), Refusal>),
    /// Topic names.
    Topics(Vec<String>),
    /// One topic.
    Topic(Result<TopicDescription, Refusal>),
    /// The outcome of a fetch.
    Fetched(Result<Fetched, Refusal>),
    /// A group coordinator's answer.
    Group(Result<GroupResponse, GroupError>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A peer's frame of arbitrary bytes is an error, never a panic.
        #[test]
        fn arbitrary_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = crate::wire::decode::<PeerRequest>(&bytes);
            let _ = crate::wire::decode::<PeerResponse>(&bytes);
        }

        /// A valid request with bytes flipped decodes to an error or to some
        /// request, never a panic.
        #[test]
        fn flipped_bytes_never_panic(flip in 0usize..64, bit in 0u8..8) {
            let request = PeerRequest::Fetch(FetchFrame {
                topic: "t".into(),
                partition: 3,
                offset: Some(42),
                max_bytes: 1 << 20,
                max_wait_ms: 500,
                min_bytes: 1,
            });
            let mut bytes = crate::wire::encode(&request).expect("encode");
            let at = flip % bytes.len();
            bytes[at] ^= 1 << bit;
            let _ = crate::wire::decode::<PeerRequest>(&bytes);
        }
    }
}
