//! [`Producer`]: sends records to topics.
//!
//! Keyed records go to the partition chosen by hashing the key
//! ([`partition_for_key`]), so each key's records stay in order; keyless records
//! go round-robin over the partitions. `send` returns once the record is stored
//! as durably as the node's `fsync` setting promises.
//!
//! With `enable_idempotence` (the default) the producer has a random
//! [`ProducerId`] and chains its own records per partition: each batch carries
//! its first sequence number and the producer-chain hash before it. The log
//! refuses gaps and answers a retried batch with its original offsets, and a
//! consumer can verify the stream end to end against [`Producer::chain_head`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::chain::{self, MessageId, ProducerId};
use crate::config::ProducerConfig;
use crate::error::{Error, Result};
use crate::node::{Node, WritePermit, WriteReply, await_reply, now_ms};
use crate::record::{Header, Record, RecordMetadata};
use crate::store::{AppendRequest, WriteOp, WriteOutcome};
use crate::wire::{PreparedRecords, ProducerBatch};

/// The partition a key maps to among `partitions`: the first 8 bytes of the
/// key's blake3 hash, modulo the partition count. Stable across versions and
/// platforms, so every producer agrees.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    let hash = blake3::hash(key);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    (u64::from_le_bytes(first) % u64::from(partitions.max(1))) as u32
}

/// A record to send, with optional routing and timestamp.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProducerRecord {
    /// Records with the same key go to the same partition.
    pub key: Option<Vec<u8>>,
    /// The payload.
    pub value: Vec<u8>,
    /// Application headers.
    pub headers: Vec<Header>,
    /// Send to this partition instead of choosing one.
    pub partition: Option<u32>,
    /// Milliseconds since the Unix epoch; `None` means now.
    pub timestamp: Option<i64>,
}

impl ProducerRecord {
    /// A keyless record.
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        ProducerRecord {
            value: value.into(),
            ..Self::default()
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

    /// Sends to a fixed partition.
    pub fn with_partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Sets the timestamp.
    pub fn with_timestamp(mut self, timestamp_ms: i64) -> Self {
        self.timestamp = Some(timestamp_ms);
        self
    }
}

/// Records bound for each partition, with their indexes in the caller's input.
type PartitionGroups = std::collections::BTreeMap<u32, (Vec<usize>, Vec<Record>)>;

/// Sends records. Cheap to clone; clones share one identity and sequence state.
#[derive(Clone)]
pub struct Producer {
    node: Node,
    config: ProducerConfig,
    session: Arc<Mutex<Session>>,
    /// In a mesh, one batch at a time goes to the leaders, so that a
    /// partition's batches arrive in sequence order.
    mesh_sends: Arc<tokio::sync::Mutex<()>>,
}

/// What a producer remembers between sends.
struct Session {
    /// `Some` when idempotence is on.
    id: Option<ProducerId>,
    /// Per (topic, partition): the next sequence and the producer-chain head.
    chains: HashMap<(String, u32), (u64, MessageId)>,
    /// Partition counts of topics sent to.
    partition_counts: HashMap<String, u32>,
    /// Where the next keyless record goes.
    round_robin: u32,
    /// Idempotent batches queued per (topic, partition) and not yet answered.
    in_flight: HashMap<(String, u32), u32>,
    /// Partitions where a batch failed: their chain state is re-read from the
    /// log once nothing is in flight there any more.
    stale: std::collections::HashSet<(String, u32)>,
}

impl Producer {
    pub(crate) fn new(node: Node, config: ProducerConfig) -> Self {
        let id = config.enable_idempotence.then(random_producer_id);
        Producer {
            node,
            config,
            mesh_sends: Arc::new(tokio::sync::Mutex::new(())),
            session: Arc::new(Mutex::new(Session {
                id,
                chains: HashMap::new(),
                partition_counts: HashMap::new(),
                round_robin: 0,
                in_flight: HashMap::new(),
                stale: Default::default(),
            })),
        }
    }

    /// The producer's identity, when idempotence is on.
    pub fn id(&self) -> Option<ProducerId> {
        self.lock().ok().and_then(|s| s.id)
    }

    /// The number of records this producer has had acknowledged or has in flight
    /// to a partition, and its producer-chain head there.
    pub fn chain_head(&self, topic: &str, partition: u32) -> Option<(u64, MessageId)> {
        let session = self.lock().ok()?;
        session.chains.get(&(topic.to_string(), partition)).copied()
    }

    /// Sends one record and waits until it is stored.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
    ) -> Result<RecordMetadata> {
        let mut record = ProducerRecord::new(value);
        record.key = key.map(<[u8]>::to_vec);
        self.send_record(topic, record).await
    }

    /// Sends one record with headers, partition or timestamp set.
    pub async fn send_record(&self, topic: &str, record: ProducerRecord) -> Result<RecordMetadata> {
        let mut sent = self.send_batch(topic, vec![record]).await?;
        sent.pop().ok_or(Error::Closed)
    }

    /// Sends many records: those bound for one partition travel as one batch,
    /// in the order given. Returns each record's metadata in input order, or
    /// the first error; on error, batches to other partitions may be stored.
    pub async fn send_batch(
        &self,
        topic: &str,
        records: Vec<ProducerRecord>,
    ) -> Result<Vec<RecordMetadata>> {
        if self.node.in_mesh() {
            return self.send_batch_in_mesh(topic, records).await;
        }
        let total = records.len();
        let partitions = self.partition_count(topic)?;
        let groups = self.route(topic, partitions, records)?;
        let mut pending = Vec::with_capacity(groups.len());
        let max = self.node.store()?.topic(topic)?.config.max_message_bytes as usize;
        for (partition, (indexes, batch)) in groups {
            // Digest and encode here, on the sender's task, not on the writer's.
            let prepared = PreparedRecords::new(&batch).map_err(crate::error::StoreError::Wire)?;
            if prepared.largest_record() > max {
                let size = prepared.largest_record();
                return Err(Error::RecordTooLarge { size, max });
            }
            let permit = self.node.reserve_write().await?;
            let answer = self.enqueue(permit, topic, partition, prepared)?;
            pending.push((partition, indexes, answer));
        }
        let mut out: Vec<Option<RecordMetadata>> = vec![None; total];
        let mut first_error = None;
        for (partition, indexes, answer) in pending {
            let reply = await_reply(answer).await;
            self.settle(topic, partition, reply.as_ref().err());
            match reply {
                Ok(WriteOutcome::Appended(outcome)) => {
                    for (i, (index, id)) in indexes.into_iter().zip(outcome.ids).enumerate() {
                        out[index] = Some(RecordMetadata {
                            topic: topic.to_string(),
                            partition,
                            offset: outcome.base_offset + i as u64,
                            id,
                        });
                    }
                }
                Ok(_) => first_error = first_error.or(Some(Error::Closed)),
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        out.into_iter().map(|m| m.ok_or(Error::Closed)).collect()
    }

    /// Sends through the mesh: each partition's batch goes to its leader
    /// (following `NotLeader` hints, retrying until `delivery_timeout`), one
    /// batch at a time. A retried batch keeps its sequence numbers, so the
    /// leader answers it with the original offsets instead of storing it twice.
    async fn send_batch_in_mesh(
        &self,
        topic: &str,
        records: Vec<ProducerRecord>,
    ) -> Result<Vec<RecordMetadata>> {
        let total = records.len();
        let description = self.node.topic_metadata(topic).await?;
        let partitions = description.config.partitions;
        let max = description.config.max_message_bytes as usize;
        let groups = self.route(topic, partitions, records)?;
        let _in_order = self.mesh_sends.lock().await;
        let mut out: Vec<Option<RecordMetadata>> = vec![None; total];
        for (partition, (indexes, batch)) in groups {
            let prepared = PreparedRecords::new(&batch).map_err(crate::error::StoreError::Wire)?;
            if prepared.largest_record() > max {
                let size = prepared.largest_record();
                return Err(Error::RecordTooLarge { size, max });
            }
            let stamp = self.stamp_in_mesh(topic, partition, &prepared)?;
            let frame = crate::protocol::ProduceFrame {
                topic: topic.to_string(),
                partition,
                acks: self.config.acks,
                producer: stamp.clone(),
                records: batch,
            };
            let produced = match self
                .node
                .produce_in_mesh(frame, self.config.delivery_timeout)
                .await
            {
                Ok(produced) => produced,
                Err(e) => {
                    // Not acknowledged: the next send reuses these sequence numbers.
                    if let (Some(pb), Ok(mut session)) = (stamp, self.lock()) {
                        session
                            .chains
                            .insert((topic.to_string(), partition), (pb.base_seq, pb.prev));
                    }
                    return Err(e);
                }
            };
            for (i, (index, id)) in indexes.into_iter().zip(produced.ids).enumerate() {
                out[index] = Some(RecordMetadata {
                    topic: topic.to_string(),
                    partition,
                    offset: produced.base_offset + i as u64,
                    id,
                });
            }
        }
        out.into_iter().map(|m| m.ok_or(Error::Closed)).collect()
    }

    /// The stamp of this producer's next batch to `partition`, advancing its chain.
    fn stamp_in_mesh(
        &self,
        topic: &str,
        partition: u32,
        records: &PreparedRecords,
    ) -> Result<Option<ProducerBatch>> {
        let mut session = self.lock()?;
        let Some(producer) = session.id else {
            return Ok(None);
        };
        let key = (topic.to_string(), partition);
        let start = (0, chain::producer_genesis(producer, topic, partition));
        Ok(Some(stamp(&mut session, producer, key, records, start)))
    }

    /// Groups records by partition, keeping input order within each group.
    fn route(
        &self,
        topic: &str,
        partitions: u32,
        records: Vec<ProducerRecord>,
    ) -> Result<PartitionGroups> {
        let now = now_ms();
        let mut session = self.lock()?;
        let mut groups = PartitionGroups::new();
        for (index, r) in records.into_iter().enumerate() {
            let partition = match (r.partition, &r.key) {
                (Some(p), _) if p < partitions => p,
                (Some(p), _) => {
                    return Err(Error::Store(crate::error::StoreError::PartitionNotFound {
                        topic: topic.to_string(),
                        partition: p,
                    }));
                }
                (None, Some(key)) => partition_for_key(key, partitions),
                (None, None) => {
                    session.round_robin = session.round_robin.wrapping_add(1);
                    session.round_robin % partitions
                }
            };
            let record = Record {
                key: r.key,
                value: r.value,
                headers: r.headers,
                timestamp: r.timestamp.unwrap_or(now),
            };
            let group = groups.entry(partition).or_default();
            group.0.push(index);
            group.1.push(record);
        }
        Ok(groups)
    }

    /// Stamps a batch with this producer's next sequence and chain hash,
    /// advances both and enqueues the batch, all under the session lock, so
    /// that batches enter the write queue in sequence order.
    fn enqueue(
        &self,
        permit: WritePermit<'_>,
        topic: &str,
        partition: u32,
        records: PreparedRecords,
    ) -> Result<WriteReply> {
        let mut session = self.lock()?;
        let Some(producer) = session.id else {
            let request = AppendRequest {
                topic: topic.to_string(),
                partition,
                producer: None,
                records,
            };
            return Ok(permit.send(WriteOp::Append(request)));
        };
        let key = (topic.to_string(), partition);
        let start = match session.chains.get(&key) {
            Some(known) => *known,
            None => self.stored_chain(topic, partition, producer)?,
        };
        *session.in_flight.entry(key.clone()).or_default() += 1;
        let batch = stamp(&mut session, producer, key, &records, start);
        let request = AppendRequest {
            topic: topic.to_string(),
            partition,
            producer: Some(batch),
            records,
        };
        Ok(permit.send(WriteOp::Append(request)))
    }

    /// Where this producer's chain stands in the log (genesis if it never wrote there).
    fn stored_chain(
        &self,
        topic: &str,
        partition: u32,
        producer: ProducerId,
    ) -> Result<(u64, MessageId)> {
        let state = self
            .node
            .store()?
            .producer_state(topic, partition, producer)?;
        Ok(state.map_or_else(
            || (0, chain::producer_genesis(producer, topic, partition)),
            |s| (s.next_seq, s.head),
        ))
    }

    /// A batch to `partition` was answered. After a failure the sequence state
    /// may be ahead of the log; once no batch is in flight there any more
    /// (later ones fail too, with a gap), it is dropped so that the next send
    /// re-reads where the log stands. Re-reading earlier could miss batches
    /// still queued.
    fn settle(&self, topic: &str, partition: u32, error: Option<&Error>) {
        let Ok(mut session) = self.lock() else { return };
        let key = (topic.to_string(), partition);
        if let Some(error) = error {
            tracing::debug!(topic, partition, %error, "send failed; producer will re-read its chain state");
            session.stale.insert(key.clone());
            if matches!(
                error,
                Error::TopicNotFound(_)
                    | Error::Store(crate::error::StoreError::PartitionNotFound { .. })
            ) {
                session.partition_counts.remove(topic);
            }
        }
        let left = session
            .in_flight
            .get(&key)
            .map_or(0, |n| n.saturating_sub(1));
        if left == 0 {
            session.in_flight.remove(&key);
            if session.stale.remove(&key) {
                session.chains.remove(&key);
            }
        } else {
            session.in_flight.insert(key, left);
        }
    }

    fn partition_count(&self, topic: &str) -> Result<u32> {
        if let Some(n) = self.lock()?.partition_counts.get(topic) {
            return Ok(*n);
        }
        let n = self.node.store()?.topic(topic)?.config.partitions;
        self.lock()?.partition_counts.insert(topic.to_string(), n);
        Ok(n)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Session>> {
        self.session.lock().map_err(|_| Error::Closed)
    }
}

/// Stamps a batch of `records` with the producer's next sequence number and
/// chain hash in `key`'s partition (from `start` when it has none yet), and
/// advances both past the batch.
fn stamp(
    session: &mut Session,
    producer: ProducerId,
    key: (String, u32),
    records: &PreparedRecords,
    start: (u64, MessageId),
) -> ProducerBatch {
    let (base_seq, prev) = session.chains.get(&key).copied().unwrap_or(start);
    let batch = ProducerBatch {
        producer,
        base_seq,
        prev,
    };
    let after = records.producer_after(&batch);
    session.chains.insert(key, (after.base_seq, after.prev));
    batch
}

/// A fresh random producer id. std's `RandomState` is seeded from the OS's
/// randomness; hashing a process-wide counter with it gives distinct ids
/// without another dependency.
pub(crate) fn random_producer_id() -> ProducerId {
    use std::hash::BuildHasher;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let counter = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ProducerId(std::hash::RandomState::new().hash_one((counter, std::process::id())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_partitioning_is_stable_and_in_range() {
        for n in 1..20 {
            let p = partition_for_key(b"user-42", n);
            assert!(p < n);
            assert_eq!(p, partition_for_key(b"user-42", n));
        }
        let spread: std::collections::BTreeSet<u32> = (0..100)
            .map(|i| partition_for_key(format!("k{i}").as_bytes(), 4))
            .collect();
        assert_eq!(spread.len(), 4, "100 keys should reach all 4 partitions");
    }

    #[test]
    fn producer_ids_differ() {
        assert_ne!(random_producer_id(), random_producer_id());
    }
}
