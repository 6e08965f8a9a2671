//! What a node says of a topic: [`TopicDescription`] and
//! [`PartitionDescription`], as `meshlog topic describe` shows them and as
//! peers send them to each other.

use crate::chain::MessageId;
use crate::config::TopicConfig;
use crate::peer::NodeId;

/// A topic and the state of each of its partitions.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct TopicDescription {
    /// The topic's name.
    pub name: String,
    /// Its settings.
    pub config: TopicConfig,
    /// Its partitions, in order.
    pub partitions: Vec<PartitionDescription>,
}

/// The state of one partition.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct PartitionDescription {
    /// The partition number.
    pub partition: u32,
    /// The leader epoch of its newest records.
    pub epoch: u64,
    /// The first offset still stored.
    pub log_start_offset: u64,
    /// One past the last committed offset: consumers read below it.
    pub high_watermark: u64,
    /// One past the last stored offset on the describing node; above the
    /// high watermark while records wait for a quorum.
    pub log_end_offset: u64,
    /// The chain ID of the last committed record (the genesis ID when empty).
    pub head: MessageId,
    /// Bytes stored.
    pub bytes: u64,
    /// The leader the describing node knows of (itself on a node without network;
    /// `None` when it does not host the partition or no leader is known).
    pub leader: Option<NodeId>,
    /// The partition's replicas.
    pub replicas: Vec<NodeId>,
    /// The replicas in sync, as the leader sees them (empty unless the
    /// describing node leads the partition).
    pub in_sync: Vec<NodeId>,
    /// Replicas catching up before they are promoted to voters.
    pub learners: Vec<NodeId>,
    /// Where placement wants the replicas: the top live storage nodes by
    /// rendezvous hash (empty when the describing node does not host it).
    pub target_replicas: Vec<NodeId>,
}
