//! [`Producer`]: sends records to topics.
//!
//! Keyed records go to the partition chosen by hashing the key
//! ([`partition_for_key`]), so each key's records stay in order; keyless records
//! stick to one partition per batch. Records wait in a per-partition queue
//! ([`crate::core::producer`]) until a batch is full (`batch_size`) or has
//! lingered (`linger`), and at most `max_in_flight` batches per partition await
//! their answer. Unanswered records hold `buffer_memory` (their encoded bytes
//! plus [`RECORD_OVERHEAD`] each); when it is full, sending waits up to
//! `max_block`.
//!
//! With `enable_idempotence` (the default) the producer chains its own
//! records per partition: each batch carries its first sequence number and the
//! producer-chain hash before it. The log refuses gaps and answers a retried
//! batch with its original offsets, so retries (after a timeout, a leader
//! change) never store a record twice or out of order, and a consumer can
//! verify the stream end to end against [`Producer::chain_head`]. A named
//! producer (`producer_id`) keeps its identity across restarts.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::debug;

use crate::chain::{self, MessageId, ProducerId};
use crate::config::ProducerConfig;
use crate::core::producer::{
    Answer, Failure, Idempotence, Item, Output, PartitionSender, SendSettings,
};
use crate::error::{Error, Result, StoreError};
use crate::node::{Node, now_ms};
use crate::record::{Header, Record, RecordMetadata};
use crate::wire::ProducerBatch;

/// What a queued record costs in memory beyond its encoded bytes, counted
/// against `buffer_memory`: the record's fields and allocations, its digest,
/// its answer channel and the caller's handle on it. Measured: about 500
/// bytes per record in `meshlog produce` with 1.5 million short lines queued.
pub const RECORD_OVERHEAD: usize = 512;

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

    /// Sets a dedup key (NATS's message id): a partition's leader stores a
    /// record whose key it stored within its dedup window only once, and
    /// answers a repeat with the original's offset and ID. Carried in the
    /// [`crate::DEDUP_HEADER`] header.
    pub fn with_dedup_key(self, key: impl Into<Vec<u8>>) -> Self {
        self.with_header(crate::core::dedup::DEDUP_HEADER, key)
    }

    /// Sets the timestamp.
    pub fn with_timestamp(mut self, timestamp_ms: i64) -> Self {
        self.timestamp = Some(timestamp_ms);
        self
    }
}

/// Sends records. Cheap to clone; clones share one identity, one buffer and
/// one background sender task.
#[derive(Clone)]
pub struct Producer {
    shared: Arc<Shared>,
}

struct Shared {
    node: Node,
    config: ProducerConfig,
    id: Option<ProducerId>,
    commands: mpsc::UnboundedSender<Command>,
    memory: Arc<Semaphore>,
    routing: Arc<Mutex<Routing>>,
    /// Per (topic, partition): the acknowledged next sequence and chain head
    /// (the furthest one: answers may come back out of order).
    heads: Arc<Mutex<ChainHeads>>,
}

/// What the producer knows about topics it sends to.
#[derive(Default)]
struct Routing {
    /// Partition count and `max_message_bytes` per topic.
    topics: HashMap<String, (u32, usize)>,
    /// Keyless records' current partition per topic and the bytes sent there.
    sticky: HashMap<String, (u32, usize)>,
    next_sticky: u32,
}

/// Per (topic, partition): a producer's next sequence and chain head.
type ChainHeads = HashMap<(String, u32), (u64, MessageId)>;

/// A record's fate, as the sender task reports it.
type Reply = oneshot::Sender<Result<RecordMetadata>>;

/// What travels with each record through the queue.
struct Token {
    reply: Reply,
    /// Buffer memory held until the record is answered.
    _memory: OwnedSemaphorePermit,
}

/// A stored batch: its first offset and each record's ID.
type Stored = (u64, Vec<MessageId>);

/// A refusal, cloneable so that it can fail every record of a batch.
#[derive(Clone, Debug)]
struct Cause(Arc<Error>);

type Queue = PartitionSender<Record, Token, Stored, Cause>;
type QueueKey = (Arc<str>, u32);

enum Command {
    Push {
        topic: Arc<str>,
        partition: u32,
        item: Item<Record, Token>,
        /// Send at once instead of lingering.
        seal: bool,
    },
    Flush(oneshot::Sender<()>),
    /// Send every open batch of a topic now.
    Seal(Arc<str>),
}

/// A record's acknowledgement: resolves once the record is stored (or failed).
pub struct Delivery {
    answer: oneshot::Receiver<Result<RecordMetadata>>,
}

impl Future for Delivery {
    type Output = Result<RecordMetadata>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.answer)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::Closed)))
    }
}

impl Producer {
    pub(crate) fn new(node: Node, config: ProducerConfig) -> Self {
        let id = config
            .enable_idempotence
            .then(|| match &config.producer_id {
                Some(name) => producer_id_for(name),
                None => random_producer_id(),
            });
        let (commands, rx) = mpsc::unbounded_channel();
        let heads = Arc::new(Mutex::new(HashMap::new()));
        let routing = Arc::new(Mutex::new(Routing::default()));
        let memory = Arc::new(Semaphore::new(
            config.buffer_memory.clamp(1, Semaphore::MAX_PERMITS),
        ));
        let task = SenderTask {
            node: node.clone(),
            config: config.clone(),
            id,
            queues: HashMap::new(),
            in_flight: FuturesUnordered::new(),
            flushes: Vec::new(),
            counts: HashMap::new(),
            heads: heads.clone(),
            routing: routing.clone(),
            start: tokio::time::Instant::now(),
        };
        tokio::spawn(task.run(rx));
        Producer {
            shared: Arc::new(Shared {
                node,
                config,
                id,
                commands,
                memory,
                routing,
                heads,
            }),
        }
    }

    /// The producer's identity, when idempotence is on.
    pub fn id(&self) -> Option<ProducerId> {
        self.shared.id
    }

    /// The number of this producer's records acknowledged in a partition (its
    /// next sequence there) and its producer-chain head after them, as far as
    /// this producer instance has seen.
    pub fn chain_head(&self, topic: &str, partition: u32) -> Option<(u64, MessageId)> {
        let heads = self.shared.heads.lock().ok()?;
        heads.get(&(topic.to_string(), partition)).copied()
    }

    /// Sends one record and waits until it is acknowledged (no lingering).
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

    /// Sends one record with headers, partition or timestamp set, and waits
    /// until it is acknowledged (no lingering).
    pub async fn send_record(&self, topic: &str, record: ProducerRecord) -> Result<RecordMetadata> {
        self.push(topic, record, true).await?.await
    }

    /// Sends many records and waits for all of them: those bound for one
    /// partition travel together, in the order given. Returns each record's
    /// metadata in input order, or the first error; on error, other records
    /// may be stored.
    pub async fn send_batch(
        &self,
        topic: &str,
        records: Vec<ProducerRecord>,
    ) -> Result<Vec<RecordMetadata>> {
        let last = records.len().saturating_sub(1);
        let mut deliveries = Vec::with_capacity(records.len());
        for (i, record) in records.into_iter().enumerate() {
            deliveries.push(self.push(topic, record, i == last).await?);
        }
        // Every partition's part goes out now, not only the last record's.
        self.shared
            .commands
            .send(Command::Seal(Arc::from(topic)))
            .map_err(|_| Error::Closed)?;
        let mut out = Vec::with_capacity(deliveries.len());
        let mut first_error = None;
        for delivery in deliveries {
            match delivery.await {
                Ok(meta) => out.push(meta),
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Queues a record and returns its [`Delivery`] at once: the record
    /// waits up to `linger` for more records to share its batch. Waits up to
    /// `max_block` while the buffer is full ([`Error::BufferFull`]).
    pub async fn enqueue(&self, topic: &str, record: ProducerRecord) -> Result<Delivery> {
        self.push(topic, record, false).await
    }

    /// Sends every queued record now and waits until each is answered.
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .commands
            .send(Command::Flush(tx))
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)
    }

    async fn push(&self, topic: &str, record: ProducerRecord, seal: bool) -> Result<Delivery> {
        let (partitions, max) = self.topic_info(topic).await?;
        let timestamp = record.timestamp.unwrap_or_else(now_ms);
        let explicit = record.partition;
        let record = Record {
            key: record.key,
            value: record.value,
            headers: record.headers,
            timestamp,
        };
        let bytes = record.encoded_len();
        if bytes > max {
            return Err(Error::RecordTooLarge { size: bytes, max });
        }
        let partition = self.partition(
            topic,
            explicit,
            record.key.as_deref(),
            partitions,
            bytes,
            seal,
        )?;
        let memory = self.reserve_memory(bytes).await?;
        let (reply, answer) = oneshot::channel();
        let item = Item {
            digest: chain::record_digest(&record),
            record,
            bytes,
            token: Token {
                reply,
                _memory: memory,
            },
        };
        self.shared
            .commands
            .send(Command::Push {
                topic: Arc::from(topic),
                partition,
                item,
                seal,
            })
            .map_err(|_| Error::Closed)?;
        Ok(Delivery { answer })
    }

    async fn reserve_memory(&self, bytes: usize) -> Result<OwnedSemaphorePermit> {
        let config = &self.shared.config;
        let cost = bytes.saturating_add(RECORD_OVERHEAD);
        let permits = cost.clamp(1, config.buffer_memory.max(1)) as u32;
        let acquire = self.shared.memory.clone().acquire_many_owned(permits);
        match tokio::time::timeout(config.max_block, acquire).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::BufferFull {
                buffer_memory: config.buffer_memory,
                waited: config.max_block,
            }),
        }
    }

    /// The partition for a record: as given, else by the partitioner, else
    /// by key hash, else the topic's sticky partition, which moves on once a
    /// batch's worth of keyless records went there (or the batch is sent at once).
    fn partition(
        &self,
        topic: &str,
        explicit: Option<u32>,
        key: Option<&[u8]>,
        partitions: u32,
        bytes: usize,
        seal: bool,
    ) -> Result<u32> {
        if let Some(p) = explicit {
            if p < partitions {
                return Ok(p);
            }
            return Err(Error::Store(StoreError::PartitionNotFound {
                topic: topic.to_string(),
                partition: p,
            }));
        }
        if let Some(partitioner) = &self.shared.config.partitioner {
            return Ok((partitioner.0)(key, partitions) % partitions.max(1));
        }
        if let Some(key) = key {
            return Ok(partition_for_key(key, partitions));
        }
        let mut routing = self.shared.routing.lock().map_err(|_| Error::Closed)?;
        let next = routing.next_sticky;
        let (partition, filled) = routing
            .sticky
            .entry(topic.to_string())
            .or_insert((next % partitions.max(1), 0));
        *filled += bytes;
        let chosen = *partition % partitions.max(1);
        if seal || *filled >= self.shared.config.batch_size {
            // The batch is full: the next keyless records stick elsewhere.
            *partition = (*partition + 1) % partitions.max(1);
            *filled = 0;
        }
        routing.next_sticky = routing.next_sticky.wrapping_add(1);
        Ok(chosen)
    }

    async fn topic_info(&self, topic: &str) -> Result<(u32, usize)> {
        let known = self
            .shared
            .routing
            .lock()
            .ok()
            .and_then(|r| r.topics.get(topic).copied());
        if let Some(info) = known {
            return Ok(info);
        }
        let config = self.shared.node.topic_metadata(topic).await?.config;
        let info = (config.partitions, config.max_message_bytes as usize);
        if let Ok(mut routing) = self.shared.routing.lock() {
            routing.topics.insert(topic.to_string(), info);
        }
        Ok(info)
    }
}

/// The background task that owns the partition queues.
struct SenderTask {
    node: Node,
    config: ProducerConfig,
    id: Option<ProducerId>,
    queues: HashMap<QueueKey, Queue>,
    in_flight: FuturesUnordered<Pin<Box<dyn Future<Output = Answered> + Send>>>,
    /// Waiting `flush` calls, each with the records per queue it waits for.
    flushes: Vec<(HashMap<QueueKey, u64>, oneshot::Sender<()>)>,
    /// Per queue: records pushed, and records reported (stored or failed).
    counts: HashMap<QueueKey, (u64, u64)>,
    heads: Arc<Mutex<ChainHeads>>,
    /// Shared with the producer handles: a topic that turns out gone is
    /// looked up again on the next send.
    routing: Arc<Mutex<Routing>>,
    start: tokio::time::Instant,
}

/// A batch's answer, for the queue that sent it.
struct Answered {
    key: QueueKey,
    batch: u64,
    attempt: u32,
    answer: Answer<Stored, Cause>,
}

impl SenderTask {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut open = true;
        loop {
            if !open && self.in_flight.is_empty() && self.queues.values().all(Queue::is_idle) {
                return;
            }
            let wake = self
                .queues
                .values()
                .filter_map(Queue::next_wake)
                .min()
                .map(|at| self.start + at)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                command = commands.recv(), if open => match command {
                    Some(command) => self.on_command(command),
                    None => open = false,
                },
                Some(answered) = self.in_flight.next() => self.on_answer(answered),
                _ = tokio::time::sleep_until(wake) => self.poll_due(),
            }
            self.answer_flushes();
        }
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Push {
                topic,
                partition,
                item,
                seal,
            } => {
                let now = self.now();
                let key = (topic, partition);
                self.counts.entry(key.clone()).or_default().0 += 1;
                let queue = self.queue(&key);
                let mut outputs = queue.push(item, now);
                if seal {
                    queue.seal();
                    outputs.extend(queue.poll(now));
                }
                self.run_outputs(&key, outputs);
            }
            Command::Seal(topic) => self.seal_queues(|key| key.0 == topic),
            Command::Flush(done) => {
                // A flush waits for the records sent before it, not for
                // those other clones keep sending meanwhile.
                let targets = self
                    .counts
                    .iter()
                    .map(|(k, (pushed, _))| (k.clone(), *pushed));
                self.flushes.push((targets.collect(), done));
                self.seal_queues(|_| true);
            }
        }
    }

    /// Seals the open batch of every queue `which` picks, and sends what can go.
    fn seal_queues(&mut self, which: impl Fn(&QueueKey) -> bool) {
        let now = self.now();
        let keys: Vec<QueueKey> = self.queues.keys().filter(|k| which(k)).cloned().collect();
        for key in keys {
            if let Some(queue) = self.queues.get_mut(&key) {
                queue.seal();
                let outputs = queue.poll(now);
                self.run_outputs(&key, outputs);
            }
        }
    }

    fn queue(&mut self, key: &QueueKey) -> &mut Queue {
        let config = &self.config;
        let id = self.id;
        self.queues.entry(key.clone()).or_insert_with(|| {
            let settings = SendSettings {
                batch_bytes: config.batch_size.max(1),
                linger: config.linger,
                // The bounds `ProducerConfig::validate` states, for configs
                // that were not validated.
                max_in_flight: config.max_in_flight.clamp(1, 16),
                retry_backoff: config.retry_backoff,
                delivery_timeout: config.delivery_timeout,
                retries: config.retries,
            };
            let (idempotence, genesis) = match id {
                None => (Idempotence::Off, MessageId([0; 32])),
                Some(id) => {
                    let genesis = chain::producer_genesis(id, &key.0, key.1);
                    let idempotence = match (&config.producer_id, config.replay) {
                        (None, _) => Idempotence::Fresh(id),
                        (Some(_), false) => Idempotence::Resumed(id),
                        (Some(_), true) => Idempotence::Replay {
                            producer: id,
                            verify: config.replay_verify,
                        },
                    };
                    (idempotence, genesis)
                }
            };
            Queue::new(settings, idempotence, genesis)
        })
    }

    fn on_answer(&mut self, answered: Answered) {
        let now = self.now();
        let Some(queue) = self.queues.get_mut(&answered.key) else {
            return;
        };
        let outputs = queue.answer(answered.batch, answered.attempt, answered.answer, now);
        self.run_outputs(&answered.key, outputs);
    }

    fn poll_due(&mut self) {
        let now = self.now();
        let due: Vec<QueueKey> = self
            .queues
            .iter()
            .filter(|(_, q)| q.next_wake().is_some_and(|at| at <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            if let Some(queue) = self.queues.get_mut(&key) {
                let outputs = queue.poll(now);
                self.run_outputs(&key, outputs);
            }
        }
    }

    fn answer_flushes(&mut self) {
        if self.flushes.is_empty() {
            return;
        }
        let counts = &self.counts;
        let reported = |key: &QueueKey| counts.get(key).map_or(0, |c| c.1);
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.flushes)
            .into_iter()
            .partition(|(targets, _)| targets.iter().all(|(key, target)| reported(key) >= *target));
        self.flushes = waiting;
        for (_, answer) in done {
            let _ = answer.send(());
        }
    }

    /// Counts records reported (stored, already stored or failed) for `key`.
    fn reported(&mut self, key: &QueueKey, records: usize) {
        self.counts.entry(key.clone()).or_default().1 += records as u64;
    }

    fn run_outputs(&mut self, key: &QueueKey, outputs: Vec<Output<Record, Token, Stored, Cause>>) {
        let (topic, partition) = (&key.0, key.1);
        for output in outputs {
            match output {
                Output::Send {
                    batch,
                    attempt: attempt_number,
                    stamp,
                    prev,
                    records,
                    deadline,
                } => {
                    let attempt = Attempt {
                        node: self.node.clone(),
                        topic: topic.to_string(),
                        partition,
                        acks: self.config.acks,
                        producer: stamp.zip(prev).map(|((producer, base_seq), prev)| {
                            ProducerBatch {
                                producer,
                                base_seq,
                                prev,
                            }
                        }),
                        records,
                        timeout: deadline
                            .saturating_sub(self.now())
                            .max(Duration::from_millis(1)),
                    };
                    let key = key.clone();
                    self.in_flight.push(Box::pin(async move {
                        Answered {
                            key,
                            batch,
                            attempt: attempt_number,
                            answer: attempt.run().await,
                        }
                    }));
                }
                Output::Stored {
                    tokens,
                    outcome: (base_offset, ids),
                    chain_after,
                } => {
                    self.reported(key, tokens.len());
                    if self.id.is_some()
                        && let Ok(mut heads) = self.heads.lock()
                    {
                        let head = heads
                            .entry((topic.to_string(), partition))
                            .or_insert(chain_after);
                        if chain_after.0 > head.0 {
                            *head = chain_after;
                        }
                    }
                    for (i, (token, id)) in tokens.into_iter().zip(ids).enumerate() {
                        let _ = token.reply.send(Ok(RecordMetadata {
                            topic: topic.to_string(),
                            partition,
                            offset: base_offset + i as u64,
                            id,
                        }));
                    }
                }
                Output::AlreadyStored { tokens } => {
                    self.reported(key, tokens.len());
                    for (token, seq) in tokens {
                        let _ = token.reply.send(Err(Error::AlreadyStored {
                            topic: topic.to_string(),
                            partition,
                            seq,
                        }));
                    }
                }
                Output::Failed { tokens, failure } => {
                    self.reported(key, tokens.len());
                    debug!(%topic, partition, ?failure, records = tokens.len(), "records failed");
                    if let Failure::Refused(Cause(error)) = &failure
                        && matches!(
                            **error,
                            Error::TopicNotFound(_)
                                | Error::Store(StoreError::PartitionNotFound { .. })
                        )
                        && let Ok(mut routing) = self.routing.lock()
                    {
                        routing.topics.remove(&**topic);
                    }
                    for token in tokens {
                        let error = failure_error(&failure, topic, partition);
                        let _ = token.reply.send(Err(error));
                    }
                }
            }
        }
    }
}

/// One attempt to store one batch at the partition's leader.
struct Attempt {
    node: Node,
    topic: String,
    partition: u32,
    acks: crate::config::Acks,
    producer: Option<ProducerBatch>,
    records: Vec<Record>,
    timeout: Duration,
}

impl Attempt {
    async fn run(self) -> Answer<Stored, Cause> {
        match self.send().await {
            Ok(stored) => Answer::Stored(stored),
            Err(error) => classify(error),
        }
    }

    /// Sends the batch to the partition's leader (this node's own replica
    /// on a node without network).
    async fn send(self) -> Result<Stored> {
        let frame = crate::protocol::ProduceFrame {
            topic: self.topic,
            partition: self.partition,
            acks: self.acks,
            producer: self.producer,
            records: self.records,
        };
        let produced = self.node.produce_in_mesh(frame, self.timeout).await?;
        Ok((produced.base_offset, produced.ids))
    }
}

/// What a failed attempt means for the queue.
fn classify(error: Error) -> Answer<Stored, Cause> {
    match error {
        Error::Duplicates { originals, .. } => Answer::Duplicates(
            originals
                .into_iter()
                .map(|(index, offset, id)| (index as usize, (offset, vec![id])))
                .collect(),
        ),
        Error::OutOfSequence { next_seq, head, .. } => Answer::OutOfSequence {
            next_seq,
            head,
            error: Cause(Arc::new(error)),
        },
        // NotEnoughReplicas fails at once (Kafka retries it): a replica
        // down is something to see now, not after `delivery_timeout`.
        Error::NotLeader { .. }
        | Error::Timeout { .. }
        | Error::Refused(_)
        | Error::Net(_)
        | Error::NotEnoughNodes(_) => Answer::Retry(Cause(Arc::new(error))),
        other => Answer::Refused(Cause(Arc::new(other))),
    }
}

/// The error a failed record reports.
fn failure_error(failure: &Failure<Cause>, topic: &str, partition: u32) -> Error {
    match failure {
        Failure::Refused(cause) => copy_error(&cause.0),
        Failure::Expired { .. } => Error::Timeout {
            topic: topic.to_string(),
            partition,
        },
        Failure::Conflict { seq } => Error::ProducerConflict {
            topic: topic.to_string(),
            partition,
            seq: *seq,
        },
    }
}

/// A copy of `error` for one more record of a failed batch (errors holding
/// I/O errors cannot be cloned; those are copied as text).
fn copy_error(error: &Error) -> Error {
    match error {
        Error::TopicNotFound(t) => Error::TopicNotFound(t.clone()),
        Error::RecordTooLarge { size, max } => Error::RecordTooLarge {
            size: *size,
            max: *max,
        },
        Error::ProducerConflict {
            topic,
            partition,
            seq,
        } => Error::ProducerConflict {
            topic: topic.clone(),
            partition: *partition,
            seq: *seq,
        },
        Error::NotEnoughReplicas {
            topic,
            partition,
            in_sync,
            required,
        } => Error::NotEnoughReplicas {
            topic: topic.clone(),
            partition: *partition,
            in_sync: *in_sync,
            required: *required,
        },
        Error::Store(StoreError::PartitionNotFound { topic, partition }) => {
            Error::Store(StoreError::PartitionNotFound {
                topic: topic.clone(),
                partition: *partition,
            })
        }
        Error::Closed => Error::Closed,
        other => Error::Refused(other.to_string()),
    }
}

/// The identity of a named producer: the same name gives the same id.
pub fn producer_id_for(name: &str) -> ProducerId {
    let hash = blake3::derive_key("meshlog producer id", name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    ProducerId(u64::from_le_bytes(first))
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
        assert_eq!(producer_id_for("importer"), producer_id_for("importer"));
        assert_ne!(producer_id_for("importer"), producer_id_for("importer-2"));
    }
}
