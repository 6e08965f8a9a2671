//! The partition engine over the real store: three replicas of one
//! partition, each the node's own `PartitionReplica` (through
//! `meshlog::driven`) over a real `Store` on a [`CrashDisk`], so the driver
//! code the other scenarios do not run — batches and spans, the store's
//! replicated-log writes, reads of compacted entries from the store, answers
//! to produce requests — runs under the faults: a lossy, reordering network,
//! isolation, crashes that lose the writes still queued for the store, and
//! power cuts in the middle of a commit (the disk keeps a random prefix of
//! the unsynced writes, the next one torn). A quarter of the runs give the topic a
//! small `retention.bytes` and a quarter a short `retention.ms` (records carry
//! the virtual clock); retention runs on random stores as a write
//! like any other, so followers restart at a leader's log start (sent by the
//! real store). A client sends small batches of real records with `acks` all
//! or leader to whoever leads; half its records carry a dedup key, and now
//! and then it sends one of them again (a retry). Beside it an idempotent
//! producer sends stamped batches (`acks=all`, one in flight) and sends
//! each again, with the same stamp, until it is acknowledged: every refusal,
//! timeout and crash of its leader makes a retry, so the leaders' producer
//! states (loaded from the store, followed through the log, rolled back on
//! cuts, carried across restarts at a log start) answer retries all the time.
//! A third of the runs wipe one node's database (and a quarter of the
//! failed writes lose the disk for good, replaced by an empty one): the node comes back with
//! an empty store and, as a node whose database is new does, a new identity
//! (its old one is a dead member). In half of those runs a backup of that
//! node's disk was taken a while before, and the node comes back on it
//! instead: an older copy of its database, holding an old log and an old
//! vote, with a new identity as a node whose database is older than it last
//! saw takes. Every 300 ms the leader steps the replica
//! set toward the live identities (learner, promotion once caught up,
//! removal of the old one), as placement makes it do.
//!
//! Checkers:
//! - **fencing**: at most one leader per epoch;
//! - **answers**: a request answered with `acks=all` is committed at its
//!   leader (the leader's high watermark is past it);
//! - **no acknowledged loss**: after the heal, every record acknowledged with
//!   `acks=all` is in the store of every replica, at its offset, with its ID;
//! - **agreement**: any two replicas' stores hold the same records below
//!   both their high watermarks (where both still hold them), and each
//!   store's chain verifies;
//! - **dedup**: no store holds two records with one dedup key, counting
//!   from the highest log start of any store (a leader forgets the keys of
//!   records its own retention dropped, as Kafka forgets those beyond the
//!   window);
//! - **idempotence**: each store holds the idempotent producer's records
//!   from the highest log start on once each, in the order sent (unless a
//!   leader told the producer its chain restarted, which happens only when a
//!   restart at a log start could not carry the producer's state: counted);
//! - **liveness**: after the heal, a new record is acknowledged with
//!   `acks=all` within a bound.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meshlog::chain::{self, MessageId, ProducerId};
use meshlog::config::Acks;
use meshlog::core::partition::PartitionFault;
use meshlog::core::replication::{Message, ReplicationConfig, ReplicationFault};
use meshlog::core::rng::Rng;
use meshlog::driven::{DEDUP_HEADER, dedup_key};
use meshlog::driven::{DrivenPartition, PendingWrite, ProduceAnswer, Step};
use meshlog::peer::NodeId;
use meshlog::protocol::Refusal;
use meshlog::store::{Store, WriteOp};
use meshlog::wire::ProducerBatch;
use meshlog::{Record, TopicConfig};

use crate::check::Violation;
use crate::disk::CrashDisk;
use crate::net::{NetConfig, SimNet};
use crate::queue::EventQueue;

const TOPIC: &str = "sim";
/// `retention.ms` of the runs that retain by time: records (stamped with the
/// virtual clock) expire after it.
const RETENTION_TIME: Duration = Duration::from_secs(2);
const PRODUCER: ProducerId = ProducerId(0x1de0);
const REPLICAS: u32 = 3;
const FAULT_PHASE: Duration = Duration::from_secs(20);
/// After the heal, a record must be acknowledged within this.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(20);

/// Events one run may take: far above a healthy run's (about 10,000), so
/// that a storm of messages fails the run instead of never ending.
const MAX_EVENTS: u64 = 2_000_000;
const TICK: Duration = Duration::from_millis(20);
const MAX_PENDING_EVENTS: usize = 1_000_000;

/// What an engine run did.
#[derive(Clone, Debug)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Records acknowledged with `acks=all`.
    pub acked: usize,
    /// Batches of the idempotent producer acknowledged.
    pub idempotent_acked: usize,
    /// Of them, retries answered with the original's place.
    pub idempotent_duplicates: usize,
    /// Times a leader told the idempotent producer its chain restarted.
    pub producer_restarts: usize,
    /// Databases wiped.
    pub wipes: usize,
    /// Of them, replaced by an older copy (a backup).
    pub restores: usize,
    /// Leader elections won.
    pub elections: usize,
    /// Crashes (queued writes lost).
    pub crashes: usize,
    /// Power cuts in the middle of a commit.
    pub power_cuts: usize,
    /// Store writes carried out.
    pub writes: u64,
    /// Events handled.
    pub events: u64,
    /// Trace hash.
    pub trace_hash: String,
    /// Time from the heal until a record was acknowledged.
    pub recovery: Option<Duration>,
    /// The first invariant violated.
    pub violation: Option<Violation>,
    /// Wall-clock time.
    pub wall: Duration,
}

/// Who sent a produce request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Client {
    /// The plain client.
    Plain,
    /// The idempotent producer.
    Idempotent,
}

/// The idempotent producer's name in the log's value of its records.
const IDEMPOTENT_PREFIX: &str = "idem-";

/// One idempotent producer with one batch in flight.
struct IdempotentProducer {
    /// The stamp of the batch being sent.
    stamp: ProducerBatch,
    /// The batch being sent until acknowledged (empty: make a new one).
    records: Vec<Record>,
    in_flight: bool,
    /// Records made so far.
    made: u64,
    /// Batches acknowledged.
    acked: usize,
    /// Of them, retries answered with the original's place.
    duplicates: usize,
    /// Answers "out of sequence": the producer's chain restarted there.
    restarts: usize,
}

enum Event {
    Tick(u32),
    /// A message from identity `from` to node `to`, if it still has the
    /// identity `to_id` it was sent to.
    Deliver {
        from: NodeId,
        to: u32,
        to_id: NodeId,
        message: Message,
        batches: Vec<Vec<u8>>,
    },
    /// The store carries out a write (if the node has not crashed since
    /// `life`); `pending` is what the replica waits for, if it asked.
    DiskDone {
        node: u32,
        life: u64,
        op: WriteOp,
        pending: Option<PendingWrite>,
    },
    /// Retention runs on a random store.
    Retention,
    /// A backup of the node's disk is taken (what it holds durably).
    Backup(u32),
    /// The node crashes and its database is lost (replaced by its backup
    /// if one was taken).
    Wipe(u32),
    /// The leader steps the replica set toward the live identities.
    Reconfigure,
    Propose,
    Crash(u32),
    /// The power fails within the node's next commit.
    CutPower(u32),
    Restart(u32),
    Cut {
        from: u32,
        to: u32,
    },
    Heal,
}

struct Node {
    /// Its identity: a new one after its database was wiped.
    id: NodeId,
    /// Times its database was wiped.
    wipes: u8,
    disk: CrashDisk,
    /// A backup of its disk, if one was taken.
    backup: Option<CrashDisk>,
    store: Option<Store>,
    replica: Option<DrivenPartition>,
    life: u64,
    disk_busy_until: Duration,
    /// Produce requests waiting for their answer: (acks, who sent it, the answer).
    waiting: Vec<(Acks, Client, ProduceAnswer)>,
    /// The power fails within the next commit.
    power_failing: bool,
}

struct World {
    now: Duration,
    queue: EventQueue<Event>,
    rng: Rng,
    net: SimNet,
    nodes: BTreeMap<u32, Node>,
    voters: Vec<NodeId>,
    config: ReplicationConfig,
    topic: TopicConfig,
    /// Keyed records sent so far, to send again now and then.
    keyed: Vec<Record>,
    /// A deliberate bug in every replica's partition rules.
    rules_fault: Option<PartitionFault>,
    /// The injected amnesia bug: a wiped node keeps its identity.
    keep_identity: bool,
    /// Databases wiped.
    wipes: usize,
    /// Of them, replaced by an older copy (a backup).
    restores: usize,
    idempotent: IdempotentProducer,
    trace: blake3::Hasher,
    events: u64,
    violation: Option<Violation>,
    leaders: BTreeMap<u64, u32>,
    /// Records acknowledged with `acks=all`: offset → ID.
    acked: BTreeMap<u64, MessageId>,
    next_record: u64,
    crashes: usize,
    power_cuts: usize,
    writes: u64,
}

/// The identity node `node` takes after its database was wiped `wipes` times.
fn wiped_node_id(node: u32, wipes: u8) -> NodeId {
    NodeId::from_bytes(&[0, 37, node as u8 + 1, wipes]).unwrap_or_default()
}

fn node_id(node: u32) -> NodeId {
    NodeId::from_bytes(&[0, 37, node as u8 + 1]).unwrap_or_default()
}

/// Runs the engine scenario of `seed`.
pub fn run(seed: u64) -> Report {
    run_with(seed, None)
}

/// A deliberate bug, to show the checkers catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineFault {
    /// In the log's rules.
    Replication(ReplicationFault),
    /// In the partition's rules.
    Rules(PartitionFault),
    /// A node whose database was wiped comes back with its old identity
    /// (amnesia not refused): it may vote again in an epoch it voted in,
    /// and counts for a quorum with entries it no longer holds.
    KeepIdentityAfterWipe,
}

/// Runs the engine scenario of `seed` with an optional injected bug in the log.
pub fn run_with(seed: u64, inject: Option<ReplicationFault>) -> Report {
    run_injected(seed, inject.map(EngineFault::Replication))
}

/// Runs the engine scenario of `seed` with an optional injected bug.
pub fn run_injected(seed: u64, fault: Option<EngineFault>) -> Report {
    let inject = match fault {
        Some(EngineFault::Replication(f)) => Some(f),
        _ => None,
    };
    let rules_fault = match fault {
        Some(EngineFault::Rules(f)) => Some(f),
        _ => None,
    };
    let keep_identity = fault == Some(EngineFault::KeepIdentityAfterWipe);
    let started = Instant::now();
    let mut rng = Rng::new(seed ^ 0x0e9e_11e5_70fe_5ea1);
    let net = NetConfig {
        min_latency: Duration::from_micros(200),
        max_latency: Duration::from_millis(1 + rng.below(20) as u64),
        loss_ppm: rng.below(20_000) as u32,
        duplicate_ppm: rng.below(10_000) as u32,
    };
    let config = ReplicationConfig {
        election_timeout: Duration::from_millis(300),
        election_jitter: Duration::from_millis(300),
        heartbeat_interval: Duration::from_millis(60),
        max_append_entries: 8 + rng.below(57),
        keep_committed: 2 + rng.below(15) as u64,
        injected_fault: inject,
        ..ReplicationConfig::default()
    };
    let mut world = World {
        now: Duration::ZERO,
        queue: EventQueue::new(MAX_PENDING_EVENTS),
        rng: Rng::new(rng.next_u64()),
        net: SimNet::new(net),
        nodes: BTreeMap::new(),
        voters: (0..REPLICAS).map(node_id).collect(),
        config,
        topic: match rng.below(4) {
            0 | 1 => TopicConfig::default(),
            2 => TopicConfig::default()
                .with_segment_bytes(2 * 1024)
                .with_retention(meshlog::Retention {
                    time: None,
                    bytes: Some(8 * 1024),
                }),
            _ => TopicConfig::default()
                .with_segment_bytes(2 * 1024)
                .with_retention(meshlog::Retention {
                    time: Some(RETENTION_TIME),
                    bytes: None,
                }),
        },
        keyed: Vec::new(),
        rules_fault,
        keep_identity,
        wipes: 0,
        restores: 0,
        idempotent: IdempotentProducer {
            stamp: ProducerBatch {
                producer: PRODUCER,
                base_seq: 0,
                prev: chain::producer_genesis(PRODUCER, TOPIC, 0),
            },
            records: Vec::new(),
            in_flight: false,
            made: 0,
            acked: 0,
            duplicates: 0,
            restarts: 0,
        },
        trace: blake3::Hasher::new(),
        events: 0,
        violation: None,
        leaders: BTreeMap::new(),
        acked: BTreeMap::new(),
        next_record: 0,
        crashes: 0,
        power_cuts: 0,
        writes: 0,
    };
    for node in 0..REPLICAS {
        let disk = match new_disk(&world.topic, &world.voters) {
            Ok(disk) => disk,
            Err(error) => {
                world.fail("the store opens", format!("node {node}: {error}"));
                CrashDisk::new()
            }
        };
        world.nodes.insert(
            node,
            Node {
                id: node_id(node),
                wipes: 0,
                disk,
                backup: None,
                store: None,
                replica: None,
                life: 0,
                disk_busy_until: Duration::ZERO,
                waiting: Vec::new(),
                power_failing: false,
            },
        );
        world.schedule(Duration::ZERO, Event::Restart(node));
    }
    world.schedule(Duration::from_millis(10), Event::Propose);
    world.schedule(Duration::from_millis(500), Event::Retention);
    world.schedule(Duration::from_millis(300), Event::Reconfigure);
    schedule_faults(&mut world, &mut rng);

    world.run_until(FAULT_PHASE);
    world.schedule(FAULT_PHASE, Event::Heal);
    for node in 0..REPLICAS {
        if world.nodes.get(&node).is_some_and(|n| n.replica.is_none()) {
            world.schedule(FAULT_PHASE, Event::Restart(node));
        }
    }
    let recovery = world.liveness();
    world.check_stores();
    Report {
        seed,
        acked: world.acked.len(),
        idempotent_acked: world.idempotent.acked,
        idempotent_duplicates: world.idempotent.duplicates,
        producer_restarts: world.idempotent.restarts,
        wipes: world.wipes,
        restores: world.restores,
        elections: world.leaders.len(),
        crashes: world.crashes,
        power_cuts: world.power_cuts,
        writes: world.writes,
        events: world.events,
        trace_hash: world.trace.finalize().to_hex()[..16].to_string(),
        recovery,
        violation: world.violation,
        wall: started.elapsed(),
    }
}

/// A disk holding a fresh database with the topic, as a node whose database
/// is new gets it (from the metadata log, in the real node).
fn new_disk(
    topic: &TopicConfig,
    voters: &[NodeId],
) -> Result<CrashDisk, meshlog::error::StoreError> {
    let disk = CrashDisk::new();
    let store = Store::open_on_backend(disk.clone(), "sim-disk", true)?;
    let op = WriteOp::CreateTopic {
        name: TOPIC.into(),
        config: topic.clone(),
        now_ms: 0,
        replicas: vec![voters.to_vec()],
    };
    store.write(vec![op])?;
    Ok(disk)
}

fn schedule_faults(world: &mut World, rng: &mut Rng) {
    // With the amnesia bug injected every run wipes three times (a wiped
    // node that keeps its identity is what is under test; with a new
    // identity only one loss per run keeps a quorum of the replica set).
    let wipes = if world.keep_identity {
        3
    } else {
        usize::from(rng.below(3) == 0)
    };
    for _ in 0..wipes {
        let at = Duration::from_millis(2_000 + rng.below(14_000) as u64);
        let node = rng.below(REPLICAS as usize) as u32;
        world.schedule(at, Event::Wipe(node));
        // The injected amnesia bug is looked for on plain wipes: its draws
        // stay those it was first caught with.
        if !world.keep_identity && rng.below(2) == 0 {
            let before = Duration::from_millis(500 + rng.below(1_500) as u64);
            world.schedule(at - before, Event::Backup(node));
        }
    }
    for _ in 0..1 + rng.below(5) {
        let at = Duration::from_millis(1_000 + rng.below(17_000) as u64);
        let node = rng.below(REPLICAS as usize) as u32;
        match rng.below(3) {
            0 => world.schedule(at, Event::Crash(node)),
            1 => world.schedule(at, Event::CutPower(node)),
            _ => {
                for other in (0..REPLICAS).filter(|o| *o != node) {
                    world.schedule(
                        at,
                        Event::Cut {
                            from: node,
                            to: other,
                        },
                    );
                    world.schedule(
                        at,
                        Event::Cut {
                            from: other,
                            to: node,
                        },
                    );
                }
                let heal = at + Duration::from_millis(300 + rng.below(3_000) as u64);
                world.schedule(heal, Event::Heal);
            }
        }
    }
}

impl World {
    fn schedule(&mut self, at: Duration, event: Event) {
        if let Err(overflow) = self.queue.push(at, event) {
            self.fail(
                "bounded work: no message storm",
                format!("more than {} events pending", overflow.limit),
            );
        }
    }

    fn fail(&mut self, invariant: &'static str, detail: String) {
        if self.violation.is_none() {
            self.violation = Some(Violation {
                at: self.now,
                invariant,
                detail,
            });
        }
    }

    fn run_until(&mut self, until: Duration) {
        while self.violation.is_none() {
            let Some((at, event)) = self.queue.pop_due(until) else {
                break;
            };
            self.now = at;
            self.events += 1;
            if self.events > MAX_EVENTS {
                let detail = format!("more than {MAX_EVENTS} events by {at:?} (a message storm?)");
                self.fail("the run stays bounded", detail);
                break;
            }
            self.handle(event);
        }
        self.now = self.now.max(until);
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Tick(node) => {
                let now = self.now;
                if self.drive(node, |r, s| r.tick(s, now)) {
                    self.schedule(now + TICK, Event::Tick(node));
                }
            }
            Event::Deliver {
                from,
                to,
                to_id,
                message,
                batches,
            } => {
                if self.nodes.get(&to).is_some_and(|n| n.id == to_id) {
                    let now = self.now;
                    self.drive(to, |r, s| r.on_message(s, from, message, batches, now));
                }
            }
            Event::Backup(node) => {
                if let Some(n) = self.nodes.get_mut(&node) {
                    n.backup = Some(n.disk.backup());
                }
                self.trace
                    .update(format!("{:?} backup {node}\n", self.now).as_bytes());
            }
            Event::Wipe(node) => {
                self.wipe(node);
                let back = self.now + Duration::from_millis(100 + self.rng.below(2_000) as u64);
                self.schedule(back, Event::Restart(node));
            }
            Event::Reconfigure => {
                self.reconfigure();
                let next = self.now + Duration::from_millis(300);
                if next < FAULT_PHASE + LIVENESS_BOUND + Duration::from_secs(10) {
                    self.schedule(next, Event::Reconfigure);
                }
            }
            Event::DiskDone {
                node,
                life,
                op,
                pending,
            } => self.disk_done(node, life, op, pending),
            Event::Propose => {
                self.propose();
                let next = self.now + Duration::from_millis(10 + self.rng.below(40) as u64);
                if next < FAULT_PHASE {
                    self.schedule(next, Event::Propose);
                }
            }
            Event::Retention => {
                let node = self.rng.below(REPLICAS as usize) as u32;
                let now_ms = self.now_ms();
                self.schedule_write(node, WriteOp::EnforceRetention { now_ms }, None);
                let next = self.now + Duration::from_millis(300 + self.rng.below(2_000) as u64);
                if next < FAULT_PHASE {
                    self.schedule(next, Event::Retention);
                }
            }
            Event::Crash(node) => {
                self.crash(node, false);
                let back = self.now + Duration::from_millis(100 + self.rng.below(2_000) as u64);
                self.schedule(back, Event::Restart(node));
            }
            Event::CutPower(node) => {
                if let Some(n) = self.nodes.get_mut(&node) {
                    n.power_failing = true;
                }
            }
            Event::Restart(node) => self.restart(node),
            Event::Cut { from, to } => self.net.cut(from, to),
            Event::Heal => self.net.heal(),
        }
    }

    /// Feeds a running node's replica; false if it is down.
    fn drive(
        &mut self,
        node: u32,
        input: impl FnOnce(&mut DrivenPartition, &Store) -> Vec<Step>,
    ) -> bool {
        let Some(n) = self.nodes.get_mut(&node) else {
            return false;
        };
        let (Some(replica), Some(store)) = (n.replica.as_mut(), n.store.as_ref()) else {
            return false;
        };
        let steps = input(replica, store);
        self.after_input(node, steps);
        true
    }

    /// Carries out a node's steps and checks what its replica now claims.
    fn after_input(&mut self, node: u32, steps: Vec<Step>) {
        for step in steps {
            match step {
                Step::Send {
                    to,
                    message,
                    batches,
                } => {
                    let to_id = to;
                    let Some(to) = self.nodes.iter().find(|(_, n)| n.id == to).map(|(i, _)| *i)
                    else {
                        continue;
                    };
                    let Some(from) = self.nodes.get(&node).map(|n| n.id) else {
                        continue;
                    };
                    for delay in self.net.deliveries(node, to, &mut self.rng) {
                        let at = self.now + delay;
                        let (message, batches) = (message.clone(), batches.clone());
                        self.schedule(
                            at,
                            Event::Deliver {
                                from,
                                to,
                                to_id,
                                message,
                                batches,
                            },
                        );
                    }
                }
                Step::Write { op, pending } => self.schedule_write(node, op, Some(pending)),
            }
        }
        self.check_leader(node);
        self.collect_answers(node);
    }

    fn check_leader(&mut self, node: u32) {
        let Some(core) = self
            .nodes
            .get(&node)
            .and_then(|n| n.replica.as_ref())
            .map(DrivenPartition::core)
        else {
            return;
        };
        if !core.is_leader() {
            return;
        }
        let epoch = core.epoch();
        match self.leaders.insert(epoch, node) {
            Some(other) if other != node => self.fail(
                "fencing: one leader per epoch",
                format!("nodes {other} and {node} both lead epoch {epoch}"),
            ),
            None => {
                self.trace
                    .update(format!("{:?} {node} leads {epoch}\n", self.now).as_bytes());
            }
            Some(_) => {}
        }
    }

    /// Takes the answers the node's replica gave and checks them.
    fn collect_answers(&mut self, node: u32) {
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        let high_watermark = n
            .replica
            .as_ref()
            .map_or(0, DrivenPartition::high_watermark);
        let mut answered = Vec::new();
        n.waiting
            .retain_mut(|(acks, client, answer)| match answer.try_take() {
                Some(result) => {
                    answered.push((*acks, *client, result));
                    false
                }
                None => true,
            });
        for (acks, client, result) in answered {
            if client == Client::Idempotent {
                self.idempotent_answered(&result);
            }
            let Ok(produced) = result else { continue };
            if acks != Acks::All {
                continue;
            }
            let end = produced.base_offset + produced.ids.len() as u64;
            if high_watermark < end {
                self.fail(
                    "answers: acks=all is committed at its leader",
                    format!(
                        "node {node} acknowledged offsets {}..{end} with its high watermark at {high_watermark}",
                        produced.base_offset
                    ),
                );
            }
            for (i, id) in produced.ids.iter().enumerate() {
                self.acked.insert(produced.base_offset + i as u64, *id);
            }
            self.trace
                .update(format!("{:?} ack {}..{end}\n", self.now, produced.base_offset).as_bytes());
        }
    }

    fn leader(&self) -> Option<u32> {
        self.nodes
            .iter()
            .filter_map(|(id, n)| {
                let core = n.replica.as_ref()?.core();
                core.is_leader().then_some((core.epoch(), *id))
            })
            .max()
            .map(|(_, id)| id)
    }

    /// The plain client sends 1–4 records to the leader, mostly with
    /// `acks=all`; or, half the time while it has nothing in flight, the
    /// idempotent producer sends its batch.
    fn propose(&mut self) -> bool {
        let Some(leader) = self.leader() else {
            return false;
        };
        let (acks, client, records, stamp) = if !self.idempotent.in_flight && self.rng.below(2) == 0
        {
            let (records, stamp) = self.idempotent_batch();
            (Acks::All, Client::Idempotent, records, Some(stamp))
        } else {
            let acks = if self.rng.below(5) == 0 {
                Acks::Leader
            } else {
                Acks::All
            };
            (acks, Client::Plain, self.records_to_send(), None)
        };
        let now = self.now;
        let Some(n) = self.nodes.get_mut(&leader) else {
            return false;
        };
        let (Some(replica), Some(store)) = (n.replica.as_mut(), n.store.as_ref()) else {
            return false;
        };
        let (answer, steps) = replica.produce(store, records, acks, stamp, now);
        n.waiting.push((acks, client, answer));
        if client == Client::Idempotent {
            self.idempotent.in_flight = true;
        }
        self.after_input(leader, steps);
        true
    }

    /// The idempotent producer's batch: the one not yet acknowledged, or
    /// 1–4 new records.
    fn idempotent_batch(&mut self) -> (Vec<Record>, ProducerBatch) {
        let now_ms = self.now_ms();
        let p = &mut self.idempotent;
        if p.records.is_empty() {
            let count = 1 + self.rng.below(4);
            p.records = (0..count)
                .map(|_| {
                    p.made += 1;
                    Record::new(format!("{IDEMPOTENT_PREFIX}{}", p.made), now_ms)
                })
                .collect();
        }
        (p.records.clone(), p.stamp.clone())
    }

    /// The idempotent producer's batch was answered: acknowledged (the next
    /// batch follows on the chain the leader reports), told where the chain
    /// stands (the same records are stamped from there), or refused (the
    /// same batch goes again).
    fn idempotent_answered(&mut self, result: &Result<meshlog::protocol::Produced, Refusal>) {
        let p = &mut self.idempotent;
        p.in_flight = false;
        match result {
            Ok(produced) => {
                let count = p.records.len() as u64;
                if produced.ids.len() as u64 != count {
                    let detail = format!(
                        "a batch of {count} was answered with {} IDs",
                        produced.ids.len()
                    );
                    self.fail("idempotence: an answer covers its batch", detail);
                    return;
                }
                p.stamp.base_seq += count;
                p.stamp.prev = produced.producer_head.unwrap_or(p.stamp.prev);
                p.records.clear();
                p.acked += 1;
                p.duplicates += usize::from(produced.duplicate);
            }
            Err(Refusal::OutOfSequence { next_seq, head }) => {
                p.restarts += 1;
                p.stamp.base_seq = *next_seq;
                p.stamp.prev = *head;
            }
            Err(_) => {}
        }
    }

    /// 1–4 new records, half of them with a dedup key; or, one time in
    /// eight, a keyed record sent before.
    fn records_to_send(&mut self) -> Vec<Record> {
        let now_ms = self.now_ms();
        if !self.keyed.is_empty() && self.rng.below(8) == 0 {
            let again = self.keyed[self.rng.below(self.keyed.len())].clone();
            return vec![again];
        }
        let count = 1 + self.rng.below(4);
        (0..count)
            .map(|_| {
                self.next_record += 1;
                let record = Record::new(format!("record-{}", self.next_record), now_ms);
                if self.rng.below(2) == 0 {
                    let key = format!("msg-{}", self.next_record);
                    let record = record.with_header(DEDUP_HEADER, key.into_bytes());
                    self.keyed.push(record.clone());
                    record
                } else {
                    record
                }
            })
            .collect()
    }

    /// Queues a store write: they complete in order, after a random latency.
    fn schedule_write(&mut self, node: u32, op: WriteOp, pending: Option<PendingWrite>) {
        let latency = Duration::from_micros(100 + self.rng.below(2_000) as u64);
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        let done = (self.now + latency).max(n.disk_busy_until);
        n.disk_busy_until = done;
        let life = n.life;
        self.schedule(
            done,
            Event::DiskDone {
                node,
                life,
                op,
                pending,
            },
        );
    }

    fn disk_done(&mut self, node: u32, life: u64, op: WriteOp, pending: Option<PendingWrite>) {
        let cut_after = self.rng.below(14) as u64;
        let disk_lost = self.rng.below(4) == 0;
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        if n.life != life {
            return;
        }
        let Some(store) = n.store.as_ref() else {
            return;
        };
        if std::mem::take(&mut n.power_failing) {
            n.disk.cut_power_after(cut_after);
            self.power_cuts += 1;
        }
        self.writes += 1;
        let outcome = match store.write(vec![op]) {
            Ok(mut results) => results.pop().unwrap_or_else(|| {
                Err(meshlog::error::StoreError::CommitFailed(
                    "no outcome".into(),
                ))
            }),
            Err(error) => Err(error),
        };
        if outcome.is_err() {
            // A failed store stops the node, as the real one does (and a
            // log write the store refuses makes the node reopen its replica
            // from what the disk holds; a restart covers that too). After a
            // power cut the disk keeps what the cut left; one time in four
            // the disk failed for good and is replaced by an empty one.
            self.crash(node, true);
            if disk_lost {
                self.wipe(node);
            }
            let back = self.now + Duration::from_millis(100 + self.rng.below(1_000) as u64);
            self.schedule(back, Event::Restart(node));
            return;
        }
        let now = self.now;
        if let Some(pending) = pending {
            self.drive(node, |r, s| r.written(s, pending, outcome, now));
        }
    }

    /// The node stops: what was queued for its store is lost; after a power
    /// cut, the disk keeps a random prefix of the unsynced writes.
    fn crash(&mut self, node: u32, power_cut: bool) {
        self.trace
            .update(format!("{:?} crash {node} {power_cut}\n", self.now).as_bytes());
        let draw = self.rng.next_u64();
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        if n.store.is_none() {
            return;
        }
        self.crashes += 1;
        let unsynced = n.disk.unsynced_writes();
        let kept = (draw % (unsynced as u64 + 1)) as usize;
        let torn = ((draw >> 32) % 4096) as usize;
        n.disk.crash(kept, torn);
        // Dropped after the crash: nothing it writes on the way out lands.
        n.replica = None;
        n.store = None;
        if n.waiting
            .iter()
            .any(|(_, client, _)| *client == Client::Idempotent)
        {
            self.idempotent.in_flight = false;
        }
        n.waiting.clear();
        n.power_failing = false;
        n.life += 1;
        n.disk_busy_until = self.now;
    }

    /// The node crashes and comes back (at its restart) with an empty
    /// database, or its backup if one was taken, and, unless the amnesia bug
    /// is injected, a new identity.
    ///
    /// At most one database per run is lost: a second loss could leave
    /// fewer live voters than a quorum of the replica set (a majority of
    /// disks lost loses the partition, as in Raft), so it is a crash only.
    fn wipe(&mut self, node: u32) {
        self.crash(node, false);
        if self.wipes > 0 && !self.keep_identity {
            return;
        }
        let backup = self.nodes.get_mut(&node).and_then(|n| n.backup.take());
        let restored = backup.is_some();
        let disk = match backup.map_or_else(|| new_disk(&self.topic, &self.voters), Ok) {
            Ok(disk) => disk,
            Err(error) => {
                self.fail("the store opens", format!("node {node}: {error}"));
                return;
            }
        };
        let keep_identity = self.keep_identity;
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        n.disk = disk;
        self.restores += usize::from(restored);
        n.wipes = n.wipes.saturating_add(1);
        if !keep_identity {
            n.id = wiped_node_id(node, n.wipes);
        }
        self.wipes += 1;
        self.trace
            .update(format!("{:?} wipe {node} {restored}\n", self.now).as_bytes());
    }

    /// The leader takes one step of the replica set toward the nodes'
    /// current identities.
    fn reconfigure(&mut self) {
        let Some(leader) = self.leader() else {
            return;
        };
        let target: Vec<NodeId> = self.nodes.values().map(|n| n.id).collect();
        let now = self.now;
        let steps = match self.nodes.get_mut(&leader) {
            Some(Node {
                replica: Some(replica),
                store: Some(store),
                ..
            }) => replica.reconfigure(store, &target, now),
            _ => return,
        };
        self.after_input(leader, steps);
    }

    /// The virtual clock in milliseconds, as records' timestamps and
    /// retention's clock.
    fn now_ms(&self) -> i64 {
        i64::try_from(self.now.as_millis()).unwrap_or(i64::MAX)
    }

    /// Each node's identity and replica state, for a failure's detail.
    fn replica_states(&self) -> String {
        let states: Vec<String> = self
            .nodes
            .iter()
            .map(|(node, n)| match n.replica.as_ref().map(DrivenPartition::core) {
                Some(r) => format!(
                    "node {node} {}: epoch {} leader {} voters {:?} learners {:?} commit {} log end {}",
                    n.id,
                    r.epoch(),
                    r.is_leader(),
                    r.voters(),
                    r.members().learners,
                    r.commit(),
                    r.log_end()
                ),
                None => format!("node {node} {}: down", n.id),
            })
            .collect();
        states.join("; ")
    }

    /// The voters of the replica set in force at the most advanced replica.
    fn final_voters(&self) -> Vec<NodeId> {
        self.nodes
            .values()
            .filter_map(|n| n.replica.as_ref().map(DrivenPartition::core))
            .max_by_key(|r| (r.is_leader(), r.epoch(), r.commit()))
            .map(|r| r.voters().to_vec())
            .unwrap_or_default()
    }

    fn restart(&mut self, node: u32) {
        let (seed, now) = (self.rng.next_u64(), self.now);
        let (voters, config) = (self.voters.clone(), self.config.clone());
        let topic_config = self.topic.clone();
        let rules_fault = self.rules_fault;
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        if n.replica.is_some() {
            return;
        }
        self.trace
            .update(format!("{now:?} start {node}\n").as_bytes());
        let opened =
            Store::open_on_backend(n.disk.after_crash(), "sim-disk", true).and_then(|store| {
                let timings = (Duration::from_secs(2), Duration::from_secs(3));
                let topic = (TOPIC, 0);
                let replica = DrivenPartition::open(
                    &store,
                    n.id,
                    topic,
                    topic_config,
                    voters,
                    config,
                    timings,
                    now,
                    seed,
                )?;
                Ok((store, replica))
            });
        match opened {
            Ok((store, mut replica)) => {
                replica.inject_fault(rules_fault);
                n.store = Some(store);
                n.replica = Some(replica);
                self.schedule(now + TICK, Event::Tick(node));
            }
            Err(error) => self.fail(
                "a store reopens after a crash",
                format!("node {node}: {error}"),
            ),
        }
    }

    /// After the heal: proposes until a record is acknowledged with acks=all.
    fn liveness(&mut self) -> Option<Duration> {
        let healed = FAULT_PHASE;
        let before = self.acked.len();
        let mut t = healed;
        while self.violation.is_none() && t <= healed + LIVENESS_BOUND {
            t += Duration::from_millis(50);
            self.run_until(t);
            if self.acked.len() > before {
                // Let the followers catch up before the stores are compared.
                self.run_until(t + Duration::from_secs(2));
                return Some(t - healed);
            }
            self.propose();
        }
        if self.violation.is_none() {
            self.fail(
                "liveness: a record is acknowledged after the heal",
                format!(
                    "nothing acknowledged {LIVENESS_BOUND:?} after the heal; replicas: {}",
                    self.replica_states()
                ),
            );
        }
        None
    }

    /// Every store: its chain verifies, it holds every acknowledged record
    /// it has not dropped by retention, it agrees with every other below
    /// both high watermarks, and it holds no dedup key twice.
    fn check_stores(&mut self) {
        if self.violation.is_some() {
            return;
        }
        let mut logs: BTreeMap<u32, (u64, StoredLog)> = BTreeMap::new();
        for (node, n) in &self.nodes {
            let Some(store) = n.store.as_ref() else {
                continue;
            };
            let high_watermark = n
                .replica
                .as_ref()
                .map_or(0, DrivenPartition::high_watermark);
            match read_log(store) {
                Ok(log) => {
                    logs.insert(*node, (high_watermark, log));
                }
                Err(error) => {
                    self.fail("stores verify", format!("node {node}: {error}"));
                    return;
                }
            }
        }
        // Every leader held the records from here on when it indexed them.
        let indexed_from = logs.values().map(|(_, log)| log.start).max().unwrap_or(0);
        // A wiped node still catching up as a learner need not hold
        // everything yet; a voter does (it was promoted once caught up).
        let voters = self.final_voters();
        let left_out = self
            .nodes
            .iter()
            .find(|(_, n)| n.wipes > 0 && !voters.contains(&n.id));
        if let Some((node, n)) = left_out {
            let detail = format!(
                "node {node} (now {}) is not a voter after the heal; voters {voters:?}",
                n.id
            );
            self.fail("a wiped node rejoins as a voter", detail);
            return;
        }
        for (node, (_, log)) in &logs {
            let voter = self.nodes.get(node).is_some_and(|n| voters.contains(&n.id));
            let lost = self.acked.iter().find(|(offset, id)| {
                voter && **offset >= log.start && log.id(**offset) != Some(**id)
            });
            if let Some((offset, id)) = lost {
                let detail = format!(
                    "acknowledged {id} at offset {offset} is not in node {node}'s store (it holds {:?}, from {})",
                    log.id(*offset),
                    log.start
                );
                self.fail("no acknowledged record lost", detail);
                return;
            }
            if let Some(key) = log.repeated_dedup_key(indexed_from) {
                let at: Vec<u64> = log
                    .records
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.1.as_deref() == Some(key.as_bytes()))
                    .map(|(i, _)| log.start + i as u64)
                    .collect();
                let detail = format!(
                    "node {node} stores dedup key {key} twice, at offsets {at:?} (its log starts at {})",
                    log.start
                );
                self.fail("dedup: one record per dedup key", detail);
                return;
            }
            if self.idempotent.restarts == 0
                && let Some((offset, seq)) = log.idempotent_out_of_order(indexed_from)
            {
                let detail = format!(
                    "node {node} stores the idempotent producer's record {seq} at offset {offset} after a record at or past it (its log starts at {})",
                    log.start
                );
                self.fail("idempotence: each record once, in order", detail);
                return;
            }
        }
        for (a, (hw_a, log_a)) in &logs {
            for (b, (hw_b, log_b)) in logs.range(a + 1..) {
                let from = log_a.start.max(log_b.start);
                let below = (*hw_a).min(*hw_b);
                if let Some(offset) = (from..below).find(|o| log_a.id(*o) != log_b.id(*o)) {
                    let detail = format!(
                        "nodes {a} and {b} store different records at committed offset {offset}"
                    );
                    self.fail("agreement on the committed prefix", detail);
                    return;
                }
            }
        }
    }
}

/// What a store holds of the partition: from its log start, each record's
/// ID, dedup key and, for the idempotent producer's, its number.
struct StoredLog {
    start: u64,
    records: Vec<(MessageId, Option<Vec<u8>>, Option<u64>)>,
}

impl StoredLog {
    fn id(&self, offset: u64) -> Option<MessageId> {
        let at = usize::try_from(offset.checked_sub(self.start)?).ok()?;
        self.records.get(at).map(|r| r.0)
    }

    /// The first of the idempotent producer's records, from record `from`
    /// on, that does not come after every one before it: (offset, number).
    fn idempotent_out_of_order(&self, from: u64) -> Option<(u64, u64)> {
        let skip = usize::try_from(from.saturating_sub(self.start)).unwrap_or(usize::MAX);
        let mut last = None;
        for (i, record) in self.records.iter().enumerate().skip(skip) {
            let Some(seq) = record.2 else { continue };
            if last.is_some_and(|last| seq <= last) {
                return Some((self.start + i as u64, seq));
            }
            last = Some(seq);
        }
        None
    }

    /// A dedup key held twice from record `from` on.
    fn repeated_dedup_key(&self, from: u64) -> Option<String> {
        let mut seen = std::collections::BTreeSet::new();
        let skip = usize::try_from(from.saturating_sub(self.start)).unwrap_or(usize::MAX);
        self.records
            .iter()
            .skip(skip)
            .filter_map(|r| r.1.as_ref())
            .find(|key| !seen.insert(*key))
            .map(|key| String::from_utf8_lossy(key).into_owned())
    }
}

/// Every committed record a store holds, after checking its whole chain.
fn read_log(store: &Store) -> Result<StoredLog, meshlog::error::StoreError> {
    store.verify_partition(TOPIC, 0)?;
    let start = store.partition_state(TOPIC, 0)?.log_start_offset;
    let mut log = StoredLog {
        start,
        records: Vec::new(),
    };
    let mut offset = start;
    loop {
        let read = store.read(TOPIC, 0, offset, 1 << 20)?;
        let Some(last) = read.records.last() else {
            return Ok(log);
        };
        offset = last.offset + 1;
        log.records.extend(read.records.iter().map(|r| {
            let key = dedup_key(&r.record).map(<[u8]>::to_vec);
            let idempotent = std::str::from_utf8(&r.record.value)
                .ok()
                .and_then(|v| v.strip_prefix(IDEMPOTENT_PREFIX))
                .and_then(|n| n.parse().ok());
            (r.id, key, idempotent)
        }));
    }
}
