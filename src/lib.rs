//! meshlog: a brokerless, peer-to-peer, Kafka-like message bus.
//!
//! Every node is both producer and consumer. Records live in topics split into
//! partitions; each record gets an offset and a hash-chained 32-byte blake3 ID
//! that commits it and every record before it.
//!
//! # Layout
//! - [`chain`]: message IDs, the partition and producer chains, verification.
//! - [`peer`]: [`peer::NodeId`], a node's identity as plain data.
//! - [`record`]: [`Record`], [`ConsumerRecord`], [`RecordMetadata`].
//! - [`wire`]: versioned postcard frames with hard size caps; stored batches.
//! - [`store`]: the redb log store (batches, segments, retention, producer
//!   state, committed offsets) with group commit.
//! - [`config`]: [`NodeConfig`], [`TopicConfig`], [`ProducerConfig`], [`ConsumerConfig`].
//! - [`description`]: [`TopicDescription`], [`PartitionDescription`].
//! - [`core`]: pure state machines (membership, placement, replication): events
//!   in, actions out, no I/O and no clock, so the simulation drives them too.
//! - [`net`]: the libp2p shell (the only module that imports libp2p).
//! - [`protocol`]: what peers ask each other (produce, replication, topics).
//! - [`meta`]: the metadata log `__meta` that orders topic changes.
//! - `replica` (private): the replication driver, one task running every
//!   partition replica a node hosts over the core, the store and the mesh.
//! - `cluster` (private): a node's requests across the mesh (topic changes,
//!   descriptions, produce routing to leaders).
//! - `bound_identity` (private): a storage node's peer id belongs to its database.
//! - [`node`]: [`Node`], the handle an application embeds; it owns the store's writer.
//! - [`producer`], [`consumer`]: the client API.
//! - [`error`]: one error enum per layer and the umbrella [`Error`].
//!
//! # Example
//! ```no_run
//! use meshlog::{Node, NodeConfig, TopicConfig, ConsumerConfig, OffsetReset};
//! use std::time::Duration;
//!
//! # async fn run() -> meshlog::Result<()> {
//! let node = Node::open(NodeConfig::default().with_data_dir("/tmp/meshlog-example")).await?;
//! node.create_topic("test", TopicConfig::default().with_partitions(3)).await?;
//! let producer = node.producer(Default::default());
//! let meta = producer.send("test", Some(b"key"), b"hello").await?;
//! println!("{}/{} @ {} id {}", meta.topic, meta.partition, meta.offset, meta.id);
//!
//! let mut consumer = node.consumer(
//!     ConsumerConfig::default().with_group_id("g").with_auto_offset_reset(OffsetReset::Earliest),
//! )?;
//! consumer.subscribe(&["test"])?;
//! for record in consumer.poll(Duration::from_secs(1)).await? {
//!     println!("{:?}", record.value());
//! }
//! consumer.commit().await?;
//! node.shutdown().await;
//! # Ok(()) }
//! ```

mod bound_identity;
pub mod chain;
mod cluster;
pub mod config;
pub mod consumer;
pub mod coordinator;
pub mod core;
pub mod description;
pub mod error;
pub mod meta;
pub mod net;
pub mod node;
pub mod peer;
pub mod producer;
pub mod protocol;
pub mod record;
mod replica;
/// One partition replica's engine driven over a real store, for the
/// simulation (feature `fault-injection` only).
#[cfg(feature = "fault-injection")]
pub use replica::driven;
pub mod store;
pub mod wire;

pub use crate::core::dedup::DEDUP_HEADER;
pub use chain::{MessageId, ProducerId};
pub use config::{
    Acks, Assignor, ConsumerConfig, NodeConfig, OffsetReset, Partitioner, ProducerConfig,
    Retention, TopicConfig,
};
pub use consumer::{Consumer, RebalanceListener};
pub use error::{Error, Result};
pub use node::{GroupInfo, GroupOffset, Node, PartitionDescription, TopicDescription};
pub use producer::{Delivery, Producer, ProducerRecord};
pub use record::{ConsumerRecord, Header, Record, RecordMetadata};
