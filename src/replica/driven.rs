//! One partition replica's whole engine — the core's `Partition` and the
//! driver code around it (batches, spans, idempotent producers' states,
//! dedup keys) — driven step by step over a real [`Store`], for the
//! simulation (feature `fault-injection` only).
//!
//! The node's replicator runs the same `PartitionReplica`; what it adds
//! (tokio, the writer thread, the blocking pool, libp2p) the simulation
//! replaces with its own event queue, disks and links: it carries out each
//! [`Step`] when it chooses, and reports store writes back with
//! [`DrivenPartition::written`].

use std::time::Duration;

use tokio::sync::oneshot;

use super::partition::{
    Effect, PartitionReplica, PartitionSettings, PendingProduce, ProduceStep, WriteKind,
};
use super::{dedup, fill_batches, stored_append};
use crate::config::{Acks, TopicConfig};
use crate::core::replication::{Message, Replica, ReplicationConfig};
use crate::error::StoreError;
use crate::peer::NodeId;
use crate::protocol::{ProduceFrame, Produced, Refusal};
use crate::record::Record;
use crate::store::{Store, WriteOp, WriteOutcome};
use crate::wire::ProducerBatch;

pub use crate::core::dedup::{DEDUP_HEADER, dedup_key};

/// What the replica asks for, in order.
#[derive(Debug)]
pub enum Step {
    /// Send a replication message, with the batches an append carries.
    Send {
        /// The receiver.
        to: NodeId,
        /// The message.
        message: Message,
        /// The encoded batches of its entries with records, in order.
        batches: Vec<Vec<u8>>,
    },
    /// Carry out a store write (writes complete in the order asked), then
    /// report its outcome with [`DrivenPartition::written`].
    Write {
        /// The write.
        op: WriteOp,
        /// What to hand back with its outcome.
        pending: PendingWrite,
    },
}

/// A write the replica waits for (opaque).
#[derive(Debug)]
pub struct PendingWrite(WriteKind);

/// The answer to a produce request, once the replica gives it.
#[derive(Debug)]
pub struct ProduceAnswer(oneshot::Receiver<Result<Produced, Refusal>>);

impl ProduceAnswer {
    /// The answer, once given (`None` while the request waits). A request
    /// its replica dropped unanswered reads as a refusal.
    pub fn try_take(&mut self) -> Option<Result<Produced, Refusal>> {
        match self.0.try_recv() {
            Ok(answer) => Some(answer),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => {
                Some(Err(Refusal::Other("the replica went away".into())))
            }
        }
    }
}

/// One partition replica over a store.
pub struct DrivenPartition {
    replica: PartitionReplica,
    key: (String, u32),
}

impl DrivenPartition {
    /// Opens the replica from what `store` holds for it, as a node does on
    /// start. `produce_timeout` bounds how long a request waits.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        store: &Store,
        me: NodeId,
        (topic, partition): (&str, u32),
        config: TopicConfig,
        voters: Vec<NodeId>,
        replication: ReplicationConfig,
        (replica_lag, produce_timeout): (Duration, Duration),
        now: Duration,
        seed: u64,
    ) -> Result<Self, StoreError> {
        let settings = PartitionSettings {
            replication,
            replica_lag,
            produce_timeout,
            dedup_window: Duration::from_secs(120),
        };
        let replica = PartitionReplica::open(
            store, me, topic, partition, config, voters, settings, now, seed,
        )?;
        Ok(DrivenPartition {
            replica,
            key: (topic.to_string(), partition),
        })
    }

    /// As leader, takes one step of the replica set toward `target` (see
    /// [`crate::core::replication::Replica::step_toward`]), as a node's
    /// leaders do every 500 ms toward the placement's choice.
    pub fn reconfigure(&mut self, store: &Store, target: &[NodeId], now: Duration) -> Vec<Step> {
        let effects = self.replica.reconfigure(target, &[], now);
        self.steps(store, effects)
    }

    /// Switches a deliberate bug in the partition's rules on (or off).
    pub fn inject_fault(&mut self, fault: Option<crate::core::partition::PartitionFault>) {
        self.replica.inject_fault(fault);
    }

    /// The replica's log state machine.
    pub fn core(&self) -> &Replica<NodeId> {
        self.replica.core()
    }

    /// One past the last committed record offset.
    pub fn high_watermark(&self) -> u64 {
        self.replica.high_watermark()
    }

    /// Time passes.
    pub fn tick(&mut self, store: &Store, now: Duration) -> Vec<Step> {
        let effects = self.replica.tick(now);
        self.steps(store, effects)
    }

    /// A replication message from `from`.
    pub fn on_message(
        &mut self,
        store: &Store,
        from: NodeId,
        message: Message,
        batches: Vec<Vec<u8>>,
        now: Duration,
    ) -> Vec<Step> {
        let effects = self.replica.on_message(from, message, batches, now);
        self.steps(store, effects)
    }

    /// A produce request, as the node's replicator takes it (loading the
    /// producer's state and building the dedup index first when needed).
    pub fn produce(
        &mut self,
        store: &Store,
        records: Vec<Record>,
        acks: Acks,
        producer: Option<ProducerBatch>,
        now: Duration,
    ) -> (ProduceAnswer, Vec<Step>) {
        let (reply, answer) = oneshot::channel();
        let answer = ProduceAnswer(answer);
        let frame = ProduceFrame {
            topic: self.key.0.clone(),
            partition: self.key.1,
            acks,
            producer,
            records,
        };
        // The node runs the reads a request waits for on its blocking pool
        // and hands the request back; here they run at once.
        let mut step = self.replica.produce(PendingProduce::new(frame, reply), now);
        let effects = loop {
            match step {
                ProduceStep::Taken(effects) => break effects,
                ProduceStep::Read(read, mut request) => {
                    match read.run(store, &self.key.0, self.key.1) {
                        Ok(found) => self.replica.read_done(&mut request, found),
                        Err(error) => {
                            request.refuse(Refusal::Other(error.to_string()));
                            break Vec::new();
                        }
                    }
                    step = self.replica.produce(request, now);
                }
            }
        };
        if let Some((epoch, window)) = self.replica.take_dedup_build() {
            let index = dedup::build(store, &self.key.0, self.key.1, epoch, window);
            self.replica.install_dedup(epoch, index);
        }
        (answer, self.steps(store, effects))
    }

    /// A write asked for finished with `outcome`.
    pub fn written(
        &mut self,
        store: &Store,
        pending: PendingWrite,
        outcome: Result<WriteOutcome, StoreError>,
        now: Duration,
    ) -> Vec<Step> {
        let outcome = outcome.map(|o| match o {
            WriteOutcome::LogReplicated(end) => Some(end),
            _ => None,
        });
        let effects = self.replica.on_written(pending.0, outcome, now);
        self.steps(store, effects)
    }

    /// Turns effects into steps, reading what is not cached from the store
    /// (the node reads it on its blocking pool).
    fn steps(&mut self, store: &Store, effects: Vec<Effect>) -> Vec<Step> {
        let mut steps = Vec::with_capacity(effects.len());
        for effect in effects {
            let frame = match effect {
                Effect::Send {
                    to,
                    message,
                    batches,
                } => {
                    if batches.iter().any(|b| b.is_empty()) {
                        let bases = self.replica.uncached_bases(&message);
                        fill_batches(store, &self.key, message, batches, &bases).map(|f| (to, f))
                    } else {
                        let batches = batches.iter().map(|b| b.as_ref().clone()).collect();
                        steps.push(Step::Send {
                            to,
                            message,
                            batches,
                        });
                        None
                    }
                }
                Effect::SendStored {
                    to,
                    epoch,
                    from,
                    upto,
                    commit,
                } => stored_append(store, &self.key, epoch, from, upto, commit).map(|f| (to, f)),
                Effect::Write(write) => {
                    let (op, kind) = write.into_op(&self.key.0, self.key.1);
                    steps.push(Step::Write {
                        op,
                        pending: PendingWrite(kind),
                    });
                    None
                }
            };
            if let Some((to, frame)) = frame {
                steps.push(Step::Send {
                    to,
                    message: frame.message,
                    batches: frame.batches.into_iter().map(|b| b.into_vec()).collect(),
                });
            }
        }
        steps
    }

    /// Fails what waits here (the replica goes away).
    pub fn close(&mut self) {
        self.replica.close();
    }
}
