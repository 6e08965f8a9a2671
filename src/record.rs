//! Records: what users produce and consume.
//!
//! A [`Record`] is Kafka's record: an optional key, a value, headers and a
//! timestamp. The log stores records in batches ([`crate::wire::StoredBatch`]);
//! what a consumer receives is a [`ConsumerRecord`], which adds where the record
//! lives (topic, partition, offset) and its hash-chained [`MessageId`].

use serde::{Deserialize, Serialize};

use crate::chain::{MessageId, ProducerId};

/// One header of a record: a name and an opaque value, as in Kafka.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The header's name.
    pub key: String,
    /// The header's value; meshlog never interprets it.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// A record as a producer sends it and as the log stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Records with the same key go to the same partition, so they keep their order.
    #[serde(with = "serde_bytes")]
    pub key: Option<Vec<u8>>,
    /// The payload; meshlog never interprets it.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Application headers, kept in order.
    pub headers: Vec<Header>,
    /// Milliseconds since the Unix epoch, set by the producer (Kafka's `CreateTime`).
    pub timestamp: i64,
}

/// Bytes a record adds to a batch beyond its key, value and headers: a
/// generous bound on postcard's length prefixes and the timestamp varint.
const RECORD_OVERHEAD_BYTES: usize = 24;

impl Record {
    /// A record with no key and no headers.
    pub fn new(value: impl Into<Vec<u8>>, timestamp: i64) -> Self {
        Record {
            key: None,
            value: value.into(),
            headers: Vec::new(),
            timestamp,
        }
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Appends a header.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push(Header {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// An upper bound on the bytes this record takes in an encoded batch; the
    /// size that `max_message_bytes` limits.
    pub fn encoded_len(&self) -> usize {
        let key = self.key.as_ref().map_or(0, Vec::len);
        let headers: usize = self
            .headers
            .iter()
            .map(|h| h.key.len() + h.value.len() + 2 * 5)
            .sum();
        key + self.value.len() + headers + RECORD_OVERHEAD_BYTES
    }
}

/// A record handed to a consumer, with where it lives and its chain ID.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerRecord {
    /// The topic the record was read from.
    pub topic: String,
    /// The partition within the topic.
    pub partition: u32,
    /// The record's offset within the partition.
    pub offset: u64,
    /// The partition-chain ID: it commits this record and every record before it.
    pub id: MessageId,
    /// The idempotent producer that wrote it and the record's sequence number in
    /// that producer's stream for this partition, if it was written by one.
    pub producer: Option<(ProducerId, u64)>,
    /// The record itself.
    pub record: Record,
}

impl ConsumerRecord {
    /// The record's key, if it has one.
    pub fn key(&self) -> Option<&[u8]> {
        self.record.key.as_deref()
    }

    /// The record's value.
    pub fn value(&self) -> &[u8] {
        &self.record.value
    }
}

/// Where an acknowledged record was written: what `Producer::send` returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordMetadata {
    /// The topic written to.
    pub topic: String,
    /// The partition the record went to.
    pub partition: u32,
    /// The record's offset in that partition.
    pub offset: u64,
    /// The record's partition-chain ID.
    pub id: MessageId,
}
