//! One partition's replica on this node: the core's [`Partition`] plus what
//! the driver keeps around it.
//!
//! The core decides (who leads, what is appended, what is committed, when a
//! produce request is answered and how, when a message may go after a vote);
//! this type turns its decisions into batches, store writes, messages and
//! replies, and turns store confirmations and peers' messages back into core
//! inputs. It keeps, next to the core's entries, where each entry's records
//! sit (`spans`), the encoded batches not yet known to be on every follower
//! (`payloads`), and the reply channel of each produce request the core
//! holds under a token (`replies`). Idempotent producers' states and dedup
//! keys are the core's; this type reads them from the store when the core
//! asks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::chain::{self, MessageId, ProducerId};
use crate::config::TopicConfig;
use crate::core::dedup::{DedupIndex, DedupRefusal};
use crate::core::idempotence::{Availability, BatchProducer, ProducerCheck, ProducerStep};
use crate::core::partition::{Answer, Output, Partition, PartitionRules, Refused};
use crate::core::replication::{
    Action, DurableState, Input, LogEntry, Message, Replica, ReplicationConfig, Snapshot,
};
use crate::error::StoreError;
use crate::net::NodeId;
use crate::protocol::{ProduceFrame, Produced, Refusal};
use crate::replica::spans::{Span, Spans};
use crate::store::{ProducerState, ReplicatedEntry, SnapshotRow, Store, VoteRow};
use crate::wire::{self, BatchHeader, PreparedRecords, ProducerBatch, StoredBatch};

/// Whether a replica leads its partition, as a reader of the whole log needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Leadership {
    /// It leads `epoch`, and every record committed before the epoch is readable here.
    Leader {
        /// The epoch.
        epoch: u64,
    },
    /// It leads but is still catching up on what was committed before its epoch.
    Catching,
    /// Another replica leads (`hint`, if known).
    Follower {
        /// The leader this replica knows of.
        hint: Option<NodeId>,
    },
}

/// A produce request's answer channel.
pub(crate) type ProduceReply = oneshot::Sender<Result<Produced, Refusal>>;

/// A produce request the replica has not answered yet, with what was read
/// from the store for it so far.
pub(crate) struct PendingProduce {
    /// The request.
    pub frame: ProduceFrame,
    /// Where its answer goes.
    pub reply: ProduceReply,
    /// Stored batches read back for it (originals of retried chunks no
    /// longer cached), by base offset; `None` when the store no longer had one.
    batches: BTreeMap<u64, Option<Arc<Vec<u8>>>>,
    /// Store reads done for it so far.
    reads: u32,
}

/// At most this many store reads for one produce request: a request that
/// still needs one after them is refused (the producer retries).
const MAX_PRODUCE_READS: u32 = 8;

impl PendingProduce {
    /// A request just received.
    pub fn new(frame: ProduceFrame, reply: ProduceReply) -> Self {
        PendingProduce {
            frame,
            reply,
            batches: BTreeMap::new(),
            reads: 0,
        }
    }

    /// Answers the request with a refusal.
    pub fn refuse(self, refusal: Refusal) {
        let _ = self.reply.send(Err(refusal));
    }
}

/// A store read a produce request waits for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ProduceRead {
    /// The stored state of an idempotent producer the core has not loaded.
    Producer(ProducerId),
    /// The stored batch at this base offset: the original of a retried
    /// chunk no longer cached.
    Batch(u64),
}

/// What a [`ProduceRead`] found.
#[derive(Debug)]
pub(crate) enum ProduceReadDone {
    /// The producer's stored state (`None`: none stored).
    Producer(ProducerId, Option<ProducerState>),
    /// The stored batch at this base offset (`None`: no longer stored).
    Batch(u64, Option<Vec<u8>>),
}

impl ProduceRead {
    /// Runs the read (on the blocking pool: it may wait on the disk).
    pub fn run(
        self,
        store: &Store,
        topic: &str,
        partition: u32,
    ) -> Result<ProduceReadDone, StoreError> {
        Ok(match self {
            ProduceRead::Producer(producer) => ProduceReadDone::Producer(
                producer,
                store.producer_state(topic, partition, producer)?,
            ),
            ProduceRead::Batch(base) => {
                ProduceReadDone::Batch(base, store.batch_bytes(topic, partition, base)?)
            }
        })
    }
}

/// What became of a produce request handed to the replica.
pub(crate) enum ProduceStep {
    /// Taken (or answered at once): carry out these effects.
    Taken(Vec<Effect>),
    /// Put aside: run the read, hand its result to
    /// [`PartitionReplica::read_done`], then produce the request again.
    Read(ProduceRead, PendingProduce),
}

/// Why a proposal did not go into the log.
enum NotProposed {
    /// Refused, with this answer.
    Refused(Refusal),
    /// It needs this store read first (nothing was proposed).
    Read(ProduceRead),
}

impl From<Refusal> for NotProposed {
    fn from(refusal: Refusal) -> Self {
        NotProposed::Refused(refusal)
    }
}

/// What the partition asks its driver to do, in order.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Send a replication message (and these batches) to a peer.
    Send {
        to: NodeId,
        message: Message,
        batches: Vec<Arc<Vec<u8>>>,
    },
    /// Write to the store; report the outcome back with [`PartitionReplica::on_written`].
    Write(PartitionWrite),
    /// Send `to` an append of entries `from..upto` read from the store (see
    /// [`Action::SendStored`]).
    SendStored {
        to: NodeId,
        epoch: u64,
        from: u64,
        upto: u64,
        commit: u64,
    },
}

/// A store write a partition waits for.
#[derive(Debug)]
pub(crate) enum PartitionWrite {
    /// Cut the log at `truncate_from` and append `entries`.
    Log {
        truncate_from: u64,
        entries: Vec<ReplicatedEntry>,
    },
    /// Make the vote durable (the core holds what depends on it until then).
    Vote(VoteRow),
    /// Raise the high watermark.
    HighWatermark(u64),
    /// Store where the replica's log restarts.
    Snapshot(SnapshotRow),
    /// Drop the log and restart it at the leader's log start, with the
    /// idempotent producers' states there.
    Install {
        point: SnapshotRow,
        producers: Vec<(ProducerId, ProducerState)>,
    },
}

/// What a write was, as its outcome comes back.
#[derive(Debug)]
pub(crate) enum WriteKind {
    /// A log write.
    Log,
    /// A vote.
    Vote,
    /// The high watermark raised to this record offset.
    HighWatermark(u64),
    /// A snapshot point: nothing waits on it.
    State,
    /// The log restarted at this entry (`index`), at this record offset.
    Install { index: u64, record_end: u64 },
}

impl PartitionWrite {
    /// The store operation, and what to remember until it completes.
    pub fn into_op(self, topic: &str, partition: u32) -> (crate::store::WriteOp, WriteKind) {
        use crate::store::WriteOp;
        let (topic, partition) = (topic.to_string(), partition);
        match self {
            PartitionWrite::Log {
                truncate_from,
                entries,
            } => (
                WriteOp::ReplicateLog {
                    topic,
                    partition,
                    truncate_from,
                    entries,
                },
                WriteKind::Log,
            ),
            PartitionWrite::Vote(vote) => (
                WriteOp::SetVote {
                    topic,
                    partition,
                    vote,
                },
                WriteKind::Vote,
            ),
            PartitionWrite::HighWatermark(high_watermark) => (
                WriteOp::SetHighWatermark {
                    topic,
                    partition,
                    high_watermark,
                },
                WriteKind::HighWatermark(high_watermark),
            ),
            PartitionWrite::Snapshot(snapshot) => (
                WriteOp::SetSnapshot {
                    topic,
                    partition,
                    snapshot,
                },
                WriteKind::State,
            ),
            PartitionWrite::Install { point, producers } => {
                let (index, record_end) = (point.snapshot.index, point.record_end);
                (
                    WriteOp::InstallSnapshot {
                        topic,
                        partition,
                        point,
                        producers,
                    },
                    WriteKind::Install { index, record_end },
                )
            }
        }
    }
}

/// The settings a partition replica runs with.
#[derive(Clone, Debug)]
pub(crate) struct PartitionSettings {
    pub replication: ReplicationConfig,
    /// A follower silent for longer is out of sync (`replica.lag.time.max.ms`).
    pub replica_lag: Duration,
    /// How long a produce request may wait for its acknowledgement.
    pub produce_timeout: Duration,
    /// How long the leader remembers records' dedup keys.
    pub dedup_window: Duration,
}

/// One replica of one partition, driven by the node.
pub(crate) struct PartitionReplica {
    topic: String,
    partition: u32,
    config: TopicConfig,
    core: Partition<NodeId, u64>,
    /// Where each entry from the core's snapshot point on holds its records.
    spans: Spans,
    /// Encoded batches by entry index, kept while followers may still need them.
    payloads: BTreeMap<u64, Arc<Vec<u8>>>,
    /// Where each produce request the core holds goes, and its answer when acknowledged.
    replies: BTreeMap<u64, (ProduceReply, Produced)>,
    /// The token of the next produce request.
    next_token: u64,
    /// Entries confirmed durable on this node.
    durable: u64,
    /// Entries committed.
    committed: u64,
    /// Whether the commit point moved since the high watermark was last
    /// written. Readers do not wait for the stored high watermark (it only
    /// serves restarts), so it is written with the next log write, which
    /// shares its fsync, or at the next tick.
    high_watermark_unstored: bool,
    /// While leading: the record offset where its epoch starts (everything
    /// before it must be readable before a reader of the whole log may start).
    epoch_start_offset: Option<u64>,
    /// The replication factor: the size of the partition's first replica set.
    rf: usize,
    /// Where the core's in-memory log started at the last quiet check.
    first_at_quiet_check: u64,
    /// Which opening of this partition's replica this is (see the driver).
    generation: u64,
    /// The high watermark the store holds (readers of the whole log wait
    /// for it to reach the epoch start).
    stored_high_watermark: u64,
}

impl PartitionReplica {
    /// Starts the replica from what `store` holds for it.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        store: &Store,
        me: NodeId,
        topic: &str,
        partition: u32,
        config: TopicConfig,
        voters: Vec<NodeId>,
        settings: PartitionSettings,
        now: Duration,
        seed: u64,
    ) -> Result<Self, StoreError> {
        let log = store.replica_log(topic, partition)?;
        let state = store.partition_state(topic, partition)?;
        let vote = log.vote.unwrap_or(VoteRow {
            epoch: 0,
            voted_for: None,
        });
        let rows = log.entries.iter().map(|r| Span {
            base: r.base_offset,
            count: r.count,
            last_id: r.entry.digest,
        });
        let spans = match &log.snapshot {
            Some(point) => Spans::new(
                point.snapshot.index,
                point.record_end,
                point.record_head,
                rows.collect(),
            ),
            None => Spans::new(
                0,
                state.log_start_offset,
                state.start_prev_id,
                rows.collect(),
            ),
        };
        let entries: Vec<LogEntry> = log.entries.iter().map(|r| r.entry.clone()).collect();
        let snapshot = log.snapshot.map(|point| point.snapshot);
        let first = snapshot.as_ref().map_or(0, |s| s.index);
        let durable = first + entries.len() as u64;
        let rf = if topic == crate::meta::META_TOPIC {
            crate::meta::META_VOTERS
        } else {
            voters.len()
        };
        let mut replication = settings.replication.clone();
        replication.min_insync = config.min_insync_replicas.map_or(0, usize::from);
        if voters.first() == Some(&me) {
            // The preferred leader (first by rendezvous hash) stands first, so
            // leadership spreads over the nodes like the partitions do.
            replication.election_timeout /= 2;
            replication.election_jitter = Duration::ZERO;
        }
        let replica = Replica::new(
            me,
            voters,
            replication,
            chain::partition_genesis(topic, partition),
            DurableState {
                epoch: vote.epoch,
                voted_for: vote.voted_for,
                snapshot,
                log: entries,
            },
            now,
            seed,
        );
        #[allow(clippy::needless_update)] // the update sets the fault-injection field
        let rules = PartitionRules {
            produce_timeout: settings.produce_timeout,
            replica_lag: settings.replica_lag,
            dedup_window: settings.dedup_window,
            ..PartitionRules::default()
        };
        let core = Partition::new(replica, rules);
        Ok(PartitionReplica {
            topic: topic.to_string(),
            partition,
            config,
            core,
            spans,
            payloads: BTreeMap::new(),
            replies: BTreeMap::new(),
            next_token: 0,
            durable,
            first_at_quiet_check: first,
            committed: first,
            high_watermark_unstored: false,
            epoch_start_offset: None,
            rf,
            generation: 0,
            stored_high_watermark: state.high_watermark,
        })
    }

    /// Which opening of this partition's replica this is.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Numbers this opening.
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// The replication factor (the size of the partition's first replica set).
    pub fn rf(&self) -> usize {
        self.rf
    }

    /// The core state machine (read-only).
    pub fn core(&self) -> &Replica<NodeId> {
        self.core.replica()
    }

    /// One past the last committed record offset.
    pub fn high_watermark(&self) -> u64 {
        self.record_end(self.committed)
    }

    /// One past the last record offset both committed and durable here:
    /// what readers of this replica may see now.
    pub fn readable_end(&self) -> u64 {
        self.record_end(self.committed.min(self.durable))
    }

    /// The chain ID of the last committed record.
    pub fn committed_head(&self) -> MessageId {
        self.record_head(self.committed)
    }

    /// The replicas in sync (leader only; empty elsewhere).
    pub fn in_sync(&self, now: Duration) -> Vec<NodeId> {
        self.core.in_sync(now)
    }

    /// Record offset one past the records of the first `entries` entries.
    fn record_end(&self, entries: u64) -> u64 {
        self.spans.record_end(entries)
    }

    /// The chain ID of the last record in the first `entries` entries.
    fn record_head(&self, entries: u64) -> MessageId {
        self.spans.record_head(entries)
    }

    /// As leader, moves the replica set one step toward `target` (the top
    /// live storage nodes by rendezvous hash) once the last step is committed
    /// (see [`Replica::step_toward`]). Each step goes through the log, so old
    /// and new majorities always overlap.
    pub fn reconfigure(
        &mut self,
        target: &[NodeId],
        observers: &[NodeId],
        now: Duration,
    ) -> Vec<Effect> {
        let Some(next) = self.core().step_toward(target, observers, self.rf) else {
            return Vec::new();
        };
        let (accepted, outputs) = self.core.propose_members(next.clone(), now);
        if !accepted {
            return Vec::new();
        }
        tracing::info!(topic = %self.topic, partition = self.partition, voters = ?next.voters, learners = ?next.learners, "replica set changes");
        self.apply(outputs, None)
    }

    /// Switches a deliberate bug in the core's rules on (or off).
    #[cfg(feature = "fault-injection")]
    pub fn inject_fault(&mut self, fault: Option<crate::core::partition::PartitionFault>) {
        self.core.inject_fault(fault);
    }

    /// Drops every committed entry from memory if the replica did not
    /// compact since the last check (a quiet partition, whose entries would
    /// otherwise stay below the compaction threshold, and hold retention
    /// back, for good).
    pub fn compact_if_quiet(&mut self) -> Vec<Effect> {
        let first = self.core().first_index();
        let quiet = first == self.first_at_quiet_check;
        let effects = if quiet {
            let outputs = self.core.compact_settled();
            self.apply(outputs, None)
        } else {
            Vec::new()
        };
        self.first_at_quiet_check = self.core().first_index();
        effects
    }

    /// Time passes (and a commit point not yet stored is written).
    pub fn tick(&mut self, now: Duration) -> Vec<Effect> {
        let outputs = self.core.handle(Input::Tick, now);
        let mut effects = self.apply(outputs, None);
        effects.extend(self.store_high_watermark());
        effects
    }

    /// A replication message from `from`, with the batches an append carries.
    pub fn on_message(
        &mut self,
        from: NodeId,
        message: Message,
        batches: Vec<Vec<u8>>,
        now: Duration,
    ) -> Vec<Effect> {
        let incoming = match &message {
            Message::Append {
                prev_offset,
                entries,
                ..
            } => match self.check_batches(*prev_offset, entries, batches) {
                Ok(incoming) => Some(incoming),
                Err(reason) => {
                    warn!(topic = %self.topic, partition = self.partition, %from, reason, "refusing a replicated append");
                    return Vec::new();
                }
            },
            _ => None,
        };
        let outputs = self.core.handle(Input::Message { from, message }, now);
        self.apply(outputs, incoming.as_ref())
    }

    /// Matches an append's batches to its entries, checking each batch's
    /// header against its entry. Returns (entry index → (batch, base, count)).
    fn check_batches(
        &self,
        prev_offset: u64,
        entries: &[LogEntry],
        batches: Vec<Vec<u8>>,
    ) -> Result<BTreeMap<u64, Incoming>, String> {
        let mut batches = batches.into_iter();
        let mut out = BTreeMap::new();
        for (i, entry) in entries.iter().enumerate() {
            let index = prev_offset + i as u64;
            if !entry.has_payload() {
                out.insert(index, Incoming::Marker);
                continue;
            }
            let bytes = batches.next().ok_or("an entry has no batch")?;
            let header: StoredBatch = wire::decode_batch(&bytes).map_err(|e| e.to_string())?;
            if header.header.last_id != entry.digest || header.header.epoch != entry.epoch {
                return Err(format!("the batch of entry {index} does not match it"));
            }
            // Hash the records for the producer chain only when this
            // producer's state is tracked here.
            let producer = match header.header.producer.clone() {
                None => BatchProducer::Unstamped,
                Some(first) if !self.core.producers().tracks(first.producer) => {
                    BatchProducer::Untracked(first.producer)
                }
                Some(first) => BatchProducer::Tracked(ProducerStep {
                    after: header.producer_head().unwrap_or(first.prev),
                    newest: header
                        .records
                        .iter()
                        .map(|r| r.timestamp)
                        .max()
                        .unwrap_or(0),
                    first,
                }),
            };
            out.insert(
                index,
                Incoming::Batch {
                    base_offset: header.header.base_offset,
                    count: header.records.len() as u32,
                    bytes: Arc::new(bytes),
                    producer,
                },
            );
        }
        if batches.next().is_some() {
            return Err("more batches than entries".into());
        }
        Ok(out)
    }

    /// The outcome of a write this partition asked for: the log's new end
    /// for a log write, `None` for the others.
    pub fn on_written(
        &mut self,
        write: WriteKind,
        outcome: Result<Option<crate::store::LogEnd>, StoreError>,
        now: Duration,
    ) -> Vec<Effect> {
        match (write, outcome) {
            (WriteKind::Log, Ok(Some(end))) => {
                let last_id = end
                    .last_entry_id
                    .unwrap_or_else(|| chain::partition_genesis(&self.topic, self.partition));
                let outputs = self.core.handle(
                    Input::Persisted {
                        upto: end.entries,
                        last_id,
                    },
                    now,
                );
                self.durable = self.core().durable();
                self.apply(outputs, None)
            }
            // The messages that waited for the vote go now.
            (WriteKind::Vote, Ok(_)) => {
                let outputs = self.core.vote_persisted();
                self.apply(outputs, None)
            }
            (WriteKind::HighWatermark(high_watermark), Ok(_)) => {
                // The store raises it no further than its log end.
                let stored = high_watermark.min(self.record_end(self.durable));
                self.stored_high_watermark = self.stored_high_watermark.max(stored);
                Vec::new()
            }
            (WriteKind::Install { index, record_end }, Ok(_)) => {
                self.stored_high_watermark = record_end;
                let outputs = self.core.handle(Input::SnapshotInstalled { index }, now);
                self.apply(outputs, None)
            }
            (_, Ok(_)) => Vec::new(),
            (_, Err(error)) => {
                warn!(topic = %self.topic, partition = self.partition, %error, "replica write failed");
                Vec::new()
            }
        }
    }

    /// A produce request for this partition: taken, answered at once, or put
    /// aside until a store read it needs is done (the replica never reads
    /// the store itself).
    pub fn produce(&mut self, request: PendingProduce, now: Duration) -> ProduceStep {
        if let Err(refused) = self.core.admit(request.frame.acks, now) {
            request.refuse(match refused {
                Refused::NotLeader { hint } => Refusal::NotLeader { hint },
                Refused::NotEnoughReplicas { in_sync, required } => {
                    Refusal::NotEnoughReplicas { in_sync, required }
                }
            });
            return ProduceStep::Taken(Vec::new());
        }
        if let Some(producer) = request.frame.producer.as_ref().map(|pb| pb.producer) {
            match self.core.producers().availability(producer) {
                Availability::Loaded => {}
                Availability::Read => {
                    return self.read_for(request, ProduceRead::Producer(producer));
                }
                Availability::Wait => {
                    request.refuse(Refusal::Other(
                        "this producer's batches are still being written here; retry".into(),
                    ));
                    return ProduceStep::Taken(Vec::new());
                }
            }
        }
        let acks = request.frame.acks;
        match self.propose(&request, now) {
            Ok((produced, entries_end, mut effects)) => {
                let token = self.next_token;
                self.next_token += 1;
                self.replies.insert(token, (request.reply, produced));
                let outputs = self.core.await_ack(token, entries_end, acks, now);
                effects.extend(self.apply(outputs, None));
                ProduceStep::Taken(effects)
            }
            Err(NotProposed::Read(read)) => self.read_for(request, read),
            Err(NotProposed::Refused(refusal)) => {
                request.refuse(refusal);
                ProduceStep::Taken(Vec::new())
            }
        }
    }

    /// Puts a request aside for a store read, unless it has had its share.
    fn read_for(&self, mut request: PendingProduce, read: ProduceRead) -> ProduceStep {
        if request.reads >= MAX_PRODUCE_READS {
            request.refuse(Refusal::Other(
                "the partition's state kept moving while this batch was checked; retry".into(),
            ));
            return ProduceStep::Taken(Vec::new());
        }
        request.reads += 1;
        ProduceStep::Read(read, request)
    }

    /// A store read a request was put aside for is done: what it found is
    /// kept for the request (a batch) or loaded into the core (a producer's
    /// state, unless the core has it by now).
    pub fn read_done(&mut self, request: &mut PendingProduce, done: ProduceReadDone) {
        match done {
            ProduceReadDone::Producer(producer, stored) => {
                if self.core.producers().availability(producer) == Availability::Read {
                    self.core.load_producer(producer, stored);
                }
            }
            ProduceReadDone::Batch(base, bytes) => {
                request.batches.insert(base, bytes.map(Arc::new));
            }
        }
    }

    /// Appends the request's records as one entry per chunk. Returns where
    /// they went, the entry count after them, and what to do.
    fn propose(
        &mut self,
        request: &PendingProduce,
        now: Duration,
    ) -> Result<(Produced, u64, Vec<Effect>), NotProposed> {
        let frame = &request.frame;
        if frame.records.is_empty() {
            return Err(Refusal::Other("empty batch".into()).into());
        }
        let prepared =
            PreparedRecords::new(&frame.records).map_err(|e| Refusal::Other(e.to_string()))?;
        let max = self.config.max_message_bytes as usize;
        if prepared.largest_record() > max {
            return Err(Refusal::RecordTooLarge {
                size: prepared.largest_record(),
                max,
            }
            .into());
        }
        self.refuse_duplicates(frame)?;
        let mut producer = frame.producer.clone();
        let mut produced: Option<Produced> = None;
        let mut effects = Vec::new();
        let mut entries_end = 0;
        for chunk in prepared.chunks() {
            let part = match &producer {
                Some(pb) => match self.check_producer(pb, chunk.digests(), &request.batches) {
                    Ok(Some(retry)) => retry,
                    Ok(None) => self.append_chunk(Some(pb.clone()), chunk, now, &mut effects)?,
                    // Retried chunks come before new ones: nothing is proposed yet.
                    Err(NotProposed::Read(read)) if effects.is_empty() => {
                        return Err(NotProposed::Read(read));
                    }
                    Err(NotProposed::Read(_)) => {
                        return Err(Refusal::Other("a retried chunk after a new one".into()).into());
                    }
                    Err(refused) => return Err(refused),
                },
                None => self.append_chunk(None, chunk, now, &mut effects)?,
            };
            entries_end = entries_end.max(part.1);
            if let Some(pb) = producer.as_mut() {
                pb.prev = wire::producer_head(pb, chunk.digests());
                pb.base_seq += chunk.len() as u64;
            }
            match produced.as_mut() {
                None => produced = Some(part.0),
                Some(p) => {
                    p.ids.extend(part.0.ids);
                    p.producer_head = part.0.producer_head;
                    p.duplicate &= part.0.duplicate;
                }
            }
        }
        let produced = produced.ok_or_else(|| Refusal::Other("empty batch".into()))?;
        self.core
            .remember_dedup(&frame.records, produced.base_offset, &produced.ids);
        Ok((produced, entries_end, effects))
    }

    /// Refuses a batch with records whose dedup keys this partition stored
    /// within the window, naming each one's original (the core decides; the
    /// store is read only to tell whether a new leader may build its index).
    fn refuse_duplicates(&mut self, frame: &ProduceFrame) -> Result<(), Refusal> {
        let readable = self.whole_log_readable();
        match self
            .core
            .check_dedup(&frame.records, frame.producer.as_ref(), || readable)
        {
            Ok(()) => Ok(()),
            Err(DedupRefusal::Building) => Err(Refusal::Other(
                "the partition's new leader is still reading its recent dedup keys".into(),
            )),
            Err(DedupRefusal::Duplicates(duplicates)) => Err(Refusal::Duplicates(duplicates)),
        }
    }

    /// Whether this replica leads, and whether its store already holds (and
    /// can be read for) every record committed before its epoch — what a
    /// reader of the whole log (dedup index, group coordinator) waits for.
    pub fn leadership(&self) -> Leadership {
        let core = self.core();
        if !core.is_leader() {
            Leadership::Follower {
                hint: core.leader_hint().copied(),
            }
        } else if self.whole_log_readable() {
            Leadership::Leader {
                epoch: core.epoch(),
            }
        } else {
            Leadership::Catching
        }
    }

    /// Whether this replica leads, has committed in its own epoch, and its
    /// store holds readable everything before the epoch's start.
    fn whole_log_readable(&self) -> bool {
        self.core().is_leader()
            && self.core().has_committed_own_epoch()
            && self
                .epoch_start_offset
                .is_some_and(|start| self.stored_high_watermark >= start)
    }

    /// The dedup index to build off the task (epoch, window), once: see
    /// [`Self::install_dedup`].
    pub fn take_dedup_build(&mut self) -> Option<(u64, Duration)> {
        let epoch = self.core.take_dedup_build()?;
        Some((epoch, self.core.dedup_window()))
    }

    /// A dedup index built off the task: used if this replica still leads
    /// the epoch it was built for.
    /// One that could not be read is asked for again by the next keyed record.
    pub fn install_dedup(&mut self, asked_for: u64, index: DedupIndex) {
        self.core.install_dedup(asked_for, index);
    }

    /// Checks an idempotent chunk: `Some` is a retry's original placement.
    fn check_producer(
        &mut self,
        pb: &ProducerBatch,
        digests: &[MessageId],
        read_back: &BTreeMap<u64, Option<Arc<Vec<u8>>>>,
    ) -> Result<Option<(Produced, u64)>, NotProposed> {
        let genesis = chain::producer_genesis(pb.producer, &self.topic, self.partition);
        let original = match self.core.check_producer(pb, digests.len(), genesis) {
            ProducerCheck::Next => return Ok(None),
            ProducerCheck::Retry(original) => original,
            ProducerCheck::OutOfSequence { next_seq, head } => {
                return Err(Refusal::OutOfSequence { next_seq, head }.into());
            }
            ProducerCheck::NotLoaded => {
                return Err(NotProposed::Read(ProduceRead::Producer(pb.producer)));
            }
        };
        // A batch below the in-memory log is committed: its retry is
        // answered at once (its entries end before the first held).
        let index = match self.spans.entry_of_batch(original.base_offset) {
            Some(index) => index,
            None if original.base_offset < self.record_end(self.spans.first()) => {
                self.spans.first().saturating_sub(1)
            }
            None => {
                return Err(
                    Refusal::Other("a retried batch is no longer in the log".into()).into(),
                );
            }
        };
        // A retried batch no longer cached is read back from the store.
        let bytes = match (
            self.payloads.get(&index),
            read_back.get(&original.base_offset),
        ) {
            (Some(bytes), _) | (None, Some(Some(bytes))) => Arc::clone(bytes),
            (None, Some(None)) => {
                return Err(Refusal::Other("a retried batch is no longer stored".into()).into());
            }
            (None, None) => {
                return Err(NotProposed::Read(ProduceRead::Batch(original.base_offset)));
            }
        };
        let batch = wire::decode_batch(&bytes).map_err(|e| Refusal::Other(e.to_string()))?;
        let after = ProducerBatch {
            producer: pb.producer,
            base_seq: pb.base_seq + digests.len() as u64,
            prev: wire::producer_head(pb, digests),
        };
        if batch.producer_head() != Some(after.prev) {
            // Other records at these sequence numbers: not a retry. Say where
            // the producer's chain stands, as for any stamp that does not fit
            // (a restarted named producer starts at sequence 0 and learns its
            // place from this answer).
            let (next_seq, head) = self.core.producers().position(pb.producer, genesis);
            return Err(Refusal::OutOfSequence { next_seq, head }.into());
        }
        let produced = Produced {
            base_offset: original.base_offset,
            ids: batch.ids(),
            duplicate: true,
            producer_head: Some(after.prev),
        };
        Ok(Some((produced, index + 1)))
    }

    /// Chains one chunk onto the log and proposes it.
    fn append_chunk(
        &mut self,
        producer: Option<ProducerBatch>,
        chunk: &wire::PreparedChunk,
        now: Duration,
        effects: &mut Vec<Effect>,
    ) -> Result<(Produced, u64), Refusal> {
        let entries = self.core().log_end();
        let base_offset = self.record_end(entries);
        let prev_id = self.record_head(entries);
        let header = BatchHeader {
            epoch: self.core().epoch(),
            base_offset,
            prev_id,
            last_id: prev_id,
            producer: producer.clone(),
        };
        let ids = wire::chain_ids(&header, chunk.digests());
        let last_id = ids.last().copied().unwrap_or(prev_id);
        let header = BatchHeader { last_id, ..header };
        let bytes = Arc::new(
            wire::encode_prepared(&header, chunk).map_err(|e| Refusal::Other(e.to_string()))?,
        );
        let index = entries;
        let incoming = BTreeMap::from([(
            index,
            Incoming::Batch {
                base_offset,
                count: chunk.len() as u32,
                bytes,
                producer: match producer.clone() {
                    Some(first) => BatchProducer::Tracked(ProducerStep {
                        after: wire::producer_head(&first, chunk.digests()),
                        newest: chunk.timestamps().1,
                        first,
                    }),
                    None => BatchProducer::Unstamped,
                },
            },
        )]);
        let (proposed, outputs) = self.core.propose(last_id, now);
        if proposed != Some(index) {
            return Err(Refusal::NotLeader {
                hint: self.core().leader_hint().copied(),
            });
        }
        // The producer's state advances when the entry enters the log below
        // (`persist_log`), as on followers.
        let producer_head = match incoming.get(&index) {
            Some(Incoming::Batch {
                producer: BatchProducer::Tracked(step),
                ..
            }) => Some(step.after),
            _ => None,
        };
        effects.extend(self.apply(outputs, Some(&incoming)));
        Ok((
            Produced {
                base_offset,
                ids,
                duplicate: false,
                producer_head,
            },
            index + 1,
        ))
    }

    /// Turns the core's outputs into effects and replies. `incoming` holds
    /// the batches of the append being handled, by entry index.
    fn apply(
        &mut self,
        outputs: Vec<Output<NodeId, u64>>,
        incoming: Option<&BTreeMap<u64, Incoming>>,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        for output in outputs {
            let action = match output {
                Output::Act(action) => action,
                Output::Answer { token, answer } => {
                    self.answer(token, answer);
                    continue;
                }
            };
            let effect = match action {
                Action::Send { to, message } => {
                    let batches = self.batches_for(&message);
                    Some(Effect::Send {
                        to,
                        message,
                        batches,
                    })
                }
                Action::PersistLog { from, entries } => {
                    Some(self.persist_log(from, entries, incoming))
                }
                Action::PersistVote { epoch, voted_for } => {
                    Some(Effect::Write(PartitionWrite::Vote(VoteRow {
                        epoch,
                        voted_for,
                    })))
                }
                Action::Committed { upto } => {
                    self.committed = upto.max(self.committed);
                    self.prune_payloads();
                    self.high_watermark_unstored = true;
                    None
                }
                Action::BecameLeader { epoch } => {
                    debug!(topic = %self.topic, partition = self.partition, epoch, "leading");
                    self.epoch_start_offset = self
                        .core()
                        .epoch_start()
                        .map(|marker| self.record_end(marker));
                    None
                }
                Action::SendStored {
                    to,
                    epoch,
                    from,
                    upto,
                    commit,
                } => Some(Effect::SendStored {
                    to,
                    epoch,
                    from,
                    upto,
                    commit,
                }),
                Action::InstallSnapshot {
                    snapshot,
                    record_start,
                    producers,
                } => {
                    self.restart_at(&snapshot, record_start);
                    let point = SnapshotRow {
                        snapshot,
                        record_end: record_start.0,
                        record_head: record_start.1,
                    };
                    let producers = self.decode_producers(&producers);
                    Some(Effect::Write(PartitionWrite::Install { point, producers }))
                }
                Action::Compacted { snapshot } => {
                    self.spans.compact(snapshot.index);
                    self.payloads = self.payloads.split_off(&snapshot.index);
                    let row = SnapshotRow {
                        record_end: self.record_end(snapshot.index),
                        record_head: self.record_head(snapshot.index),
                        snapshot,
                    };
                    Some(Effect::Write(PartitionWrite::Snapshot(row)))
                }
            };
            effects.extend(effect);
        }
        let log_write = effects
            .iter()
            .any(|e| matches!(e, Effect::Write(PartitionWrite::Log { .. })));
        if log_write {
            effects.extend(self.store_high_watermark());
        }
        effects
    }

    /// The write of the high watermark, if the commit point moved since it
    /// was last written.
    fn store_high_watermark(&mut self) -> Option<Effect> {
        self.unstored_high_watermark().map(Effect::Write)
    }

    /// The high watermark's write, if the commit point moved since it was
    /// last written (a clean stop writes it, so that a restart reads it).
    pub fn unstored_high_watermark(&mut self) -> Option<PartitionWrite> {
        if !std::mem::take(&mut self.high_watermark_unstored) {
            return None;
        }
        Some(PartitionWrite::HighWatermark(self.high_watermark()))
    }

    /// The producers' states a leader sent with its log start; none (and a
    /// log line) when they do not decode: the replica then only loses the
    /// retry answers of producers that wrote before the log start.
    fn decode_producers(&self, bytes: &[u8]) -> Vec<(ProducerId, ProducerState)> {
        if bytes.is_empty() {
            return Vec::new();
        }
        wire::decode(bytes).unwrap_or_else(|error| {
            warn!(topic = %self.topic, partition = self.partition, %error, "the producers' states at the leader's log start do not decode");
            Vec::new()
        })
    }

    /// Replies to the produce request of `token`.
    fn answer(&mut self, token: u64, answer: Answer<NodeId>) {
        let Some((reply, produced)) = self.replies.remove(&token) else {
            return;
        };
        let _ = reply.send(match answer {
            Answer::Acked => Ok(produced),
            Answer::NotLeader { hint } => Err(Refusal::NotLeader { hint }),
            Answer::TimedOut => Err(Refusal::Timeout),
            Answer::Closed => Err(Refusal::Other("the partition closed".into())),
        });
    }

    fn persist_log(
        &mut self,
        from: u64,
        entries: Vec<LogEntry>,
        incoming: Option<&BTreeMap<u64, Incoming>>,
    ) -> Effect {
        if from < self.spans.end() {
            self.truncate(from);
        }
        let mut replicated = Vec::with_capacity(entries.len());
        for (i, entry) in entries.into_iter().enumerate() {
            let index = from + i as u64;
            let end = self.record_end(index);
            let (span, batch) = match incoming.and_then(|m| m.get(&index)) {
                Some(Incoming::Batch {
                    base_offset,
                    count,
                    bytes,
                    producer,
                }) => {
                    self.core
                        .batch_appended(index, *base_offset, *count, producer.clone());
                    let span = Span {
                        base: *base_offset,
                        count: *count,
                        last_id: entry.digest,
                    };
                    (span, Some(bytes.clone()))
                }
                Some(Incoming::Marker) | None => {
                    let empty = Span {
                        base: end,
                        count: 0,
                        last_id: entry.digest,
                    };
                    match (self.payloads.get(&index), self.spans.get(index)) {
                        (Some(bytes), Some(span)) => (span, Some(bytes.clone())),
                        _ => (empty, None),
                    }
                }
            };
            if index >= self.spans.end() {
                self.spans.push(span);
            }
            if let Some(bytes) = &batch {
                self.payloads.insert(index, bytes.clone());
            }
            replicated.push(ReplicatedEntry { entry, batch });
        }
        Effect::Write(PartitionWrite::Log {
            truncate_from: from,
            entries: replicated,
        })
    }

    /// Forgets the whole log: it restarts at `snapshot` (entries) and
    /// `record_start` (records), the leader's log start.
    fn restart_at(&mut self, snapshot: &Snapshot<NodeId>, record_start: (u64, MessageId)) {
        self.spans = Spans::new(snapshot.index, record_start.0, record_start.1, Vec::new());
        self.payloads.clear();
        self.durable = snapshot.index;
        self.committed = snapshot.index;
        tracing::info!(
            topic = %self.topic,
            partition = self.partition,
            entry = snapshot.index,
            offset = record_start.0,
            "restarting the replica's log at the leader's log start"
        );
    }

    /// Drops entries from `from` on (an uncommitted suffix a new leader replaced).
    fn truncate(&mut self, from: u64) {
        // (The core fails the requests whose entries are cut: the producer
        // retries at the new leader, idempotently.)
        let cut_offset = self.record_end(from);
        self.core.records_cut(from, cut_offset);
        self.spans.truncate(from);
        self.payloads.split_off(&from);
        self.durable = self.durable.min(from);
    }

    /// The encoded batches an append carries, in entry order.
    fn batches_for(&self, message: &Message) -> Vec<Arc<Vec<u8>>> {
        let Message::Append {
            prev_offset,
            entries,
            ..
        } = message
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            if !entry.has_payload() {
                continue;
            }
            let index = prev_offset + i as u64;
            match self.payloads.get(&index) {
                Some(bytes) => out.push(bytes.clone()),
                None => {
                    // Not cached: read back by the driver (see `fill_batches`).
                    out.push(Arc::new(Vec::new()));
                }
            }
        }
        out
    }

    /// The record offsets where the batches of an append's uncached entries
    /// start, in entry order (one per empty slot [`Self::batches_for`] left;
    /// `None` where this replica no longer knows it), for the driver to read
    /// them from the store.
    pub fn uncached_bases(&self, message: &Message) -> Vec<Option<u64>> {
        let Message::Append {
            prev_offset,
            entries,
            ..
        } = message
        else {
            return Vec::new();
        };
        entries
            .iter()
            .enumerate()
            .filter(|(_, entry)| entry.has_payload())
            .map(|(i, _)| prev_offset + i as u64)
            .filter(|index| !self.payloads.contains_key(index))
            .map(|index| self.spans.get(index).map(|span| span.base))
            .collect()
    }

    /// Forgets cached batches every replica has (below the commit point, with a margin).
    fn prune_payloads(&mut self) {
        // Up to 32 batches of 256 KiB: a follower further behind is served
        // from the store.
        const KEEP_COMMITTED: u64 = 32;
        let below = self.committed.saturating_sub(KEEP_COMMITTED);
        self.payloads = self.payloads.split_off(&below);
    }

    /// Fails every waiting request (the partition is going away).
    pub fn close(&mut self) {
        let outputs = self.core.close();
        self.apply(outputs, None);
    }
}

/// An entry of an append being received.
enum Incoming {
    Marker,
    Batch {
        base_offset: u64,
        count: u32,
        bytes: Arc<Vec<u8>>,
        /// Who stamped the batch, and how it moves that producer's state
        /// when the state is tracked here (computed once, where the records
        /// are at hand).
        producer: BatchProducer,
    },
}
