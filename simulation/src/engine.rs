//! The partition engine over the real store: three replicas of one
//! partition, each the node's own `PartitionReplica` (through
//! `meshlog::driven`) over a real `Store` on a [`CrashDisk`], so the driver
//! code the other scenarios do not run — batches and spans, the store's
//! replicated-log writes, reads of compacted entries from the store, answers
//! to produce requests — runs under the faults: a lossy, reordering network,
//! isolation, crashes that lose the writes still queued for the store, and
//! power cuts in the middle of a commit (the disk keeps a random prefix of
//! the unsynced writes, the next one torn). A client sends small batches of
//! real records with `acks` all or leader to whoever leads.
//!
//! Checkers:
//! - **fencing**: at most one leader per epoch;
//! - **answers**: a request answered with `acks=all` is committed at its
//!   leader (the leader's high watermark is past it);
//! - **no acknowledged loss**: after the heal, every record acknowledged with
//!   `acks=all` is in the store of every replica, at its offset, with its ID;
//! - **agreement**: any two replicas' stores hold the same records below
//!   both their high watermarks, and each store's chain verifies;
//! - **liveness**: after the heal, a new record is acknowledged with
//!   `acks=all` within a bound.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meshlog::chain::MessageId;
use meshlog::config::Acks;
use meshlog::core::replication::{Message, ReplicationConfig, ReplicationFault};
use meshlog::core::rng::Rng;
use meshlog::driven::{DrivenPartition, PendingWrite, ProduceAnswer, Step};
use meshlog::peer::NodeId;
use meshlog::store::{Store, WriteOp};
use meshlog::{Record, TopicConfig};

use crate::check::Violation;
use crate::disk::CrashDisk;
use crate::net::{NetConfig, SimNet};
use crate::queue::EventQueue;

const TOPIC: &str = "sim";
const REPLICAS: u32 = 3;
const FAULT_PHASE: Duration = Duration::from_secs(20);
/// After the heal, a record must be acknowledged within this.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(20);
const TICK: Duration = Duration::from_millis(20);
const MAX_PENDING_EVENTS: usize = 1_000_000;

/// What an engine run did.
#[derive(Clone, Debug)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Records acknowledged with `acks=all`.
    pub acked: usize,
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

enum Event {
    Tick(u32),
    Deliver {
        from: u32,
        to: u32,
        message: Message,
        batches: Vec<Vec<u8>>,
    },
    /// The store carries out a write (if the node has not crashed since `life`).
    DiskDone {
        node: u32,
        life: u64,
        op: WriteOp,
        pending: PendingWrite,
    },
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
    id: NodeId,
    disk: CrashDisk,
    store: Option<Store>,
    replica: Option<DrivenPartition>,
    life: u64,
    disk_busy_until: Duration,
    /// Produce requests waiting for their answer: (acks, the answer).
    waiting: Vec<(Acks, ProduceAnswer)>,
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

fn node_id(node: u32) -> NodeId {
    NodeId::from_bytes(&[0, 37, node as u8 + 1]).unwrap_or_default()
}

/// Runs the engine scenario of `seed`.
pub fn run(seed: u64) -> Report {
    run_with(seed, None)
}

/// Runs the engine scenario of `seed` with an optional injected bug in the log.
pub fn run_with(seed: u64, inject: Option<ReplicationFault>) -> Report {
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
        let disk = CrashDisk::new();
        let created = Store::open_on_backend(disk.clone(), "sim-disk", true).and_then(|store| {
            let op = WriteOp::CreateTopic {
                name: TOPIC.into(),
                config: TopicConfig::default(),
                now_ms: 0,
                replicas: vec![world.voters.clone()],
            };
            store.write(vec![op]).map(|_| ())
        });
        if let Err(error) = created {
            world.fail("the store opens", format!("node {node}: {error}"));
        }
        world.nodes.insert(
            node,
            Node {
                id: node_id(node),
                disk,
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

fn schedule_faults(world: &mut World, rng: &mut Rng) {
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
                message,
                batches,
            } => {
                let (now, from) = (self.now, node_id(from));
                self.drive(to, |r, s| r.on_message(s, from, message, batches, now));
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
                    let Some(to) = self.nodes.iter().find(|(_, n)| n.id == to).map(|(i, _)| *i)
                    else {
                        continue;
                    };
                    for delay in self.net.deliveries(node, to, &mut self.rng) {
                        let at = self.now + delay;
                        let (message, batches) = (message.clone(), batches.clone());
                        self.schedule(
                            at,
                            Event::Deliver {
                                from: node,
                                to,
                                message,
                                batches,
                            },
                        );
                    }
                }
                Step::Write { op, pending } => self.schedule_write(node, op, pending),
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
            .retain_mut(|(acks, answer)| match answer.try_take() {
                Some(result) => {
                    answered.push((*acks, result));
                    false
                }
                None => true,
            });
        for (acks, result) in answered {
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

    /// The client sends 1–4 records to the leader, mostly with `acks=all`.
    fn propose(&mut self) -> bool {
        let Some(leader) = self.leader() else {
            return false;
        };
        let acks = if self.rng.below(5) == 0 {
            Acks::Leader
        } else {
            Acks::All
        };
        let count = 1 + self.rng.below(4);
        let records: Vec<Record> = (0..count)
            .map(|_| {
                self.next_record += 1;
                Record::new(format!("record-{}", self.next_record), 1)
            })
            .collect();
        let now = self.now;
        let Some(n) = self.nodes.get_mut(&leader) else {
            return false;
        };
        let (Some(replica), Some(store)) = (n.replica.as_mut(), n.store.as_ref()) else {
            return false;
        };
        let (answer, steps) = replica.produce(store, records, acks, None, now);
        n.waiting.push((acks, answer));
        self.after_input(leader, steps);
        true
    }

    /// Queues a store write: they complete in order, after a random latency.
    fn schedule_write(&mut self, node: u32, op: WriteOp, pending: PendingWrite) {
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

    fn disk_done(&mut self, node: u32, life: u64, op: WriteOp, pending: PendingWrite) {
        let cut_after = self.rng.below(14) as u64;
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
            // power cut the disk keeps what the cut left.
            self.crash(node, true);
            let back = self.now + Duration::from_millis(100 + self.rng.below(1_000) as u64);
            self.schedule(back, Event::Restart(node));
            return;
        }
        let now = self.now;
        self.drive(node, |r, s| r.written(s, pending, outcome, now));
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
        n.waiting.clear();
        n.power_failing = false;
        n.life += 1;
        n.disk_busy_until = self.now;
    }

    fn restart(&mut self, node: u32) {
        let (seed, now) = (self.rng.next_u64(), self.now);
        let (voters, config) = (self.voters.clone(), self.config.clone());
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
                    TopicConfig::default(),
                    voters,
                    config,
                    timings,
                    now,
                    seed,
                )?;
                Ok((store, replica))
            });
        match opened {
            Ok((store, replica)) => {
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
                format!("nothing acknowledged {LIVENESS_BOUND:?} after the heal"),
            );
        }
        None
    }

    /// Every store: its chain verifies, it holds every acknowledged record,
    /// and it agrees with every other below both high watermarks.
    fn check_stores(&mut self) {
        if self.violation.is_some() {
            return;
        }
        let mut logs: BTreeMap<u32, (u64, Vec<MessageId>)> = BTreeMap::new();
        for (node, n) in &self.nodes {
            let Some(store) = n.store.as_ref() else {
                continue;
            };
            let high_watermark = n
                .replica
                .as_ref()
                .map_or(0, DrivenPartition::high_watermark);
            match read_log(store) {
                Ok(ids) => {
                    logs.insert(*node, (high_watermark, ids));
                }
                Err(error) => {
                    self.fail("stores verify", format!("node {node}: {error}"));
                    return;
                }
            }
        }
        for (node, (_, ids)) in &logs {
            if let Some((offset, id)) = self
                .acked
                .iter()
                .find(|(offset, id)| ids.get(**offset as usize) != Some(*id))
            {
                let detail = format!(
                    "acknowledged {id} at offset {offset} is not in node {node}'s store (it holds {:?})",
                    ids.get(*offset as usize)
                );
                self.fail("no acknowledged record lost", detail);
                return;
            }
        }
        for (a, (hw_a, ids_a)) in &logs {
            for (b, (hw_b, ids_b)) in logs.range(a + 1..) {
                let below = (*hw_a).min(*hw_b) as usize;
                if let Some(offset) = (0..below).find(|o| ids_a.get(*o) != ids_b.get(*o)) {
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

/// The IDs of every record a store holds, after checking its whole chain.
fn read_log(store: &Store) -> Result<Vec<MessageId>, meshlog::error::StoreError> {
    store.verify_partition(TOPIC, 0)?;
    let mut ids = Vec::new();
    let mut offset = 0;
    loop {
        let read = store.read(TOPIC, 0, offset, 1 << 20)?;
        let Some(last) = read.records.last() else {
            return Ok(ids);
        };
        offset = last.offset + 1;
        ids.extend(read.records.iter().map(|r| r.id));
    }
}
