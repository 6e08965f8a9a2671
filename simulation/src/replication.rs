//! Replication under faults: the real `core::partition` state machine (its
//! `core::replication` log and the produce and vote rules around it) for one
//! partition with 3 or 5 replicas, a simulated network, and simulated disks
//! where a write not yet confirmed (log entries, votes, restarts at a log
//! start) is lost on a crash (and the log write in progress may be torn). A
//! client sends records to whoever leads, each with `acks` all, leader or
//! none, and counts as acknowledged what the core answers. One
//! spare node runs too, and placement moves the replica set around: every
//! few seconds a new target set is drawn, and the leader walks toward it one
//! step at a time (learner, promotion, removal) while the faults go on.
//!
//! Checkers, on every event:
//! - **fencing**: at most one leader per epoch;
//! - **agreement**: every replica that commits an offset commits the same ID
//!   there (equal IDs mean equal prefixes);
//! - **readers**: a reader of any replica, at any time, sees below its commit
//!   point exactly the entries committed there (a committed entry never
//!   changes on any replica);
//! - **votes are durable before they are sent**: a promise or a candidacy
//!   leaves a replica only once its disk holds it (writes of votes are lost
//!   on a crash like any other, and the power sometimes fails mid-vote);
//! - **answers**: every produce request is answered at most once; one
//!   answered with `acks=all` is committed at its leader, one with
//!   `acks=leader` durable there;
//! - **no acknowledged loss**: after the faults heal, every record acknowledged
//!   with `acks=all` is in the log of every voter of the final replica set, at
//!   its offset;
//! - **liveness**: after the last fault heals, a new record commits on every
//!   voter within a bound, and the run reports how long it took;
//! - **bounded memory**: no replica holds more than twice `keep_committed`
//!   committed, durable entries in memory (the rest is compacted: followers
//!   that need them are sent them from the leader's disk, and a restart reads
//!   only the log after the stored snapshot point);
//! - **catch-up from the log start**: retention drops what a replica has
//!   compacted from its disk now and then, so a follower behind a leader's
//!   log start is sent the point and restarts there (its restart is a disk
//!   write like any other, lost if it crashes first); every checker above
//!   still holds, counting only what retention kept.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meshlog::chain::{self, MessageId};
use meshlog::config::Acks;
use meshlog::core::partition::{Answer, Output, Partition, PartitionFault, PartitionRules};
use meshlog::core::replication::{
    Action, DurableState, Input, LogEntry, Message, Replica, ReplicationConfig, ReplicationFault,
    Snapshot,
};
use meshlog::core::rng::Rng;

use crate::check::Violation;
use crate::net::{NetConfig, SimNet};
use crate::queue::EventQueue;

/// How long faults are injected.
pub const FAULT_PHASE: Duration = Duration::from_secs(30);
/// How long after the heal a new record must be committed everywhere.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(20);
const TICK: Duration = Duration::from_millis(20);
/// Pending events beyond which a run is a message storm: a bug, reported as a
/// violation instead of exhausting memory.
const MAX_PENDING_EVENTS: usize = 1_000_000;

/// What a replication run did.
#[derive(Clone, Debug)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Replicas.
    pub replicas: u32,
    /// Records acknowledged to the client with `acks=all`.
    pub acked: usize,
    /// Produce requests failed back to the client (not leader, timed out).
    pub failed: usize,
    /// Leader elections won.
    pub elections: usize,
    /// Replica-set changes proposed (learner added, promoted, removed).
    pub reconfigurations: usize,
    /// Compactions of a replica's in-memory log.
    pub compactions: usize,
    /// Appends a leader sent from its disk (entries it had compacted).
    pub sent_from_disk: usize,
    /// Followers restarted at a leader's log start.
    pub installs: usize,
    /// Trace hash.
    pub trace_hash: String,
    /// Events handled.
    pub events: u64,
    /// Time from the heal until a new record was committed everywhere.
    pub recovery: Option<Duration>,
    /// The first invariant violated.
    pub violation: Option<Violation>,
    /// Wall-clock time.
    pub wall: Duration,
}

#[derive(Clone, Debug)]
enum Event {
    Tick(u32),
    Deliver {
        from: u32,
        to: u32,
        message: Message,
    },
    /// A disk write finishes (if the node has not crashed since `life`).
    DiskDone {
        node: u32,
        life: u64,
        write: DiskWrite,
    },
    /// Retention drops what one node has compacted from memory from its disk.
    Retention,
    Propose,
    /// A reader reads one replica's committed entries.
    Read,
    /// The leader takes one step toward the target replica set.
    Reconfigure,
    /// Placement draws a new target replica set.
    NewTarget,
    Crash(u32),
    Restart(u32),
    Cut {
        from: u32,
        to: u32,
    },
    Heal,
}

/// A write to a simulated disk.
#[derive(Clone, Debug)]
enum DiskWrite {
    /// Cut the log at `from`, then append `entries`.
    Log { from: u64, entries: Vec<LogEntry> },
    /// Drop the log and restart it at the point.
    Install(Snapshot<u32>),
    /// Make the epoch and the promise in it durable.
    Vote { epoch: u64, voted_for: Option<u32> },
}

struct Node {
    replica: Option<Partition<u32, u64>>,
    /// What survives a crash; `disk.log` holds the entries from `disk_first` on.
    disk: DurableState<u32>,
    /// The first entry on disk (retention and restarts at a log start move it).
    disk_first: u64,
    /// The ID of the entry before `disk_first`.
    disk_first_prev: MessageId,
    /// Where retention let the disk's log start, once it dropped entries.
    log_start: Option<Snapshot<u32>>,
    /// A restart at a leader's log start in flight: until it is on disk, the
    /// entries before it on disk are the old log's, not what the replica
    /// holds committed.
    installing: Option<u64>,
    /// Bumped on every crash: completions of older writes are void.
    life: u64,
    /// When the disk is next free (writes complete in order).
    disk_busy_until: Duration,
    /// Writes issued and not yet complete: the first may be torn by a crash.
    in_flight: Vec<DiskWrite>,
}

impl Node {
    /// The running replica's log state machine.
    fn core(&self) -> Option<&Replica<u32>> {
        self.replica.as_ref().map(Partition::replica)
    }

    /// The ID of the durable entry at `index`, if the disk holds it.
    fn disk_id(&self, index: u64) -> Option<MessageId> {
        if self.installing.is_some_and(|point| index < point) {
            return None;
        }
        let at = index.checked_sub(self.disk_first)?;
        self.disk.log.get(at as usize).map(|e| e.id)
    }

    /// One past the last durable entry.
    fn disk_end(&self) -> u64 {
        self.disk_first + self.disk.log.len() as u64
    }

    /// Cuts the durable log at `from`, then appends `entries`.
    fn disk_write(&mut self, from: u64, entries: &[LogEntry]) {
        let keep = from.saturating_sub(self.disk_first) as usize;
        self.disk.log.truncate(keep);
        self.disk.log.extend_from_slice(entries);
    }
}

struct World {
    now: Duration,
    queue: EventQueue<Event>,
    rng: Rng,
    net: SimNet,
    nodes: BTreeMap<u32, Node>,
    /// The partition's first replica set.
    voters: Vec<u32>,
    /// Where placement wants the replicas now.
    target: Vec<u32>,
    /// Replicas the partition should have.
    rf: usize,
    config: ReplicationConfig,
    rules: PartitionRules,
    genesis: MessageId,
    trace: blake3::Hasher,
    events: u64,
    violation: Option<Violation>,
    /// Epoch → its leader.
    leaders: BTreeMap<u64, u32>,
    /// Offset → the ID committed there (by anyone).
    committed: BTreeMap<u64, MessageId>,
    /// Per node, how far it has reported commits.
    commit_seen: BTreeMap<u32, u64>,
    /// Produce requests waiting for their answer, by token.
    proposals: BTreeMap<u64, Proposal>,
    /// Records acknowledged with `acks=all`: offset → ID.
    acked: BTreeMap<u64, MessageId>,
    /// Produce requests failed back to the client.
    failed: usize,
    next_record: u64,
    reconfigurations: usize,
    compactions: usize,
    sent_from_disk: usize,
    installs: usize,
}

/// A produce request the client waits on.
#[derive(Clone, Copy, Debug)]
struct Proposal {
    leader: u32,
    offset: u64,
    id: MessageId,
    acks: Acks,
}

/// Runs the replication scenario of `seed`, with an optional injected bug.
pub fn run(seed: u64, inject: Option<ReplicationFault>) -> Report {
    run_with(seed, inject, None)
}

/// Runs the replication scenario of `seed`, with optional injected bugs in
/// the log and in the rules around it.
pub fn run_with(
    seed: u64,
    inject: Option<ReplicationFault>,
    inject_rule: Option<PartitionFault>,
) -> Report {
    let started = Instant::now();
    let mut rng = Rng::new(seed ^ 0x005e_ed0f_5e91_1ca5);
    let replicas = if rng.below(2) == 0 { 3 } else { 5 };
    let net = NetConfig {
        min_latency: Duration::from_micros(200),
        max_latency: Duration::from_millis(1 + rng.below(40) as u64),
        loss_ppm: rng.below(30_000) as u32,
        duplicate_ppm: rng.below(20_000) as u32,
    };
    #[allow(clippy::needless_update)]
    let config = ReplicationConfig {
        election_timeout: Duration::from_millis(300),
        election_jitter: Duration::from_millis(300),
        heartbeat_interval: Duration::from_millis(60),
        // Small chunks, so that catching up takes many appends.
        max_append_entries: 16 + rng.below(49),
        // Few entries kept, so that compaction, restarts from a snapshot
        // point and followers served from the leader's disk happen often.
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
        voters: (0..replicas).collect(),
        target: (0..replicas).collect(),
        rf: replicas as usize,
        config,
        rules: PartitionRules {
            produce_timeout: Duration::from_secs(3),
            replica_lag: Duration::from_secs(2),
            dedup_window: Duration::from_secs(120),
            injected_fault: inject_rule,
        },
        genesis: chain::partition_genesis("sim", 0),
        trace: blake3::Hasher::new(),
        events: 0,
        violation: None,
        leaders: BTreeMap::new(),
        committed: BTreeMap::new(),
        commit_seen: BTreeMap::new(),
        proposals: BTreeMap::new(),
        acked: BTreeMap::new(),
        failed: 0,
        next_record: 0,
        reconfigurations: 0,
        compactions: 0,
        sent_from_disk: 0,
        installs: 0,
    };
    // The replicas, and one spare that placement may move the partition to.
    for node in 0..=replicas {
        world.nodes.insert(
            node,
            Node {
                replica: None,
                disk: DurableState::default(),
                disk_first: 0,
                disk_first_prev: world.genesis,
                log_start: None,
                installing: None,
                life: 0,
                disk_busy_until: Duration::ZERO,
                in_flight: Vec::new(),
            },
        );
        world.schedule(Duration::ZERO, Event::Restart(node));
    }
    world.schedule(Duration::from_millis(10), Event::Propose);
    world.schedule(Duration::from_millis(50), Event::Read);
    world.schedule(Duration::from_millis(1_000), Event::Retention);
    world.schedule(Duration::from_millis(500), Event::Reconfigure);
    world.schedule(Duration::from_secs(2), Event::NewTarget);
    schedule_faults(&mut world, &mut rng, replicas);

    world.run_until(FAULT_PHASE);
    world.schedule(FAULT_PHASE, Event::Heal);
    for node in 0..=replicas {
        if world.nodes.get(&node).is_some_and(|n| n.replica.is_none()) {
            world.schedule(FAULT_PHASE, Event::Restart(node));
        }
    }
    let recovery = world.liveness();
    world.check_acked_everywhere();
    Report {
        seed,
        replicas,
        acked: world.acked.len(),
        failed: world.failed,
        elections: world.leaders.len(),
        reconfigurations: world.reconfigurations,
        compactions: world.compactions,
        sent_from_disk: world.sent_from_disk,
        installs: world.installs,
        trace_hash: world.trace.finalize().to_hex()[..16].to_string(),
        events: world.events,
        recovery,
        violation: world.violation,
        wall: started.elapsed(),
    }
}

fn schedule_faults(world: &mut World, rng: &mut Rng, replicas: u32) {
    for _ in 0..1 + rng.below(6) {
        let at = Duration::from_millis(2_000 + rng.below(25_000) as u64);
        let node = rng.below(replicas as usize) as u32;
        match rng.below(3) {
            0 => {
                world.schedule(at, Event::Crash(node));
                let back = at + Duration::from_millis(100 + rng.below(3_000) as u64);
                world.schedule(back, Event::Restart(node));
            }
            1 => {
                // Isolate one node (often the leader) both ways for a while.
                for other in (0..replicas).filter(|o| *o != node) {
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
                let heal = at + Duration::from_millis(500 + rng.below(5_000) as u64);
                world.schedule(heal, Event::Heal);
            }
            _ => {
                let to = (node + 1 + rng.below(replicas as usize - 1) as u32) % replicas;
                world.schedule(at, Event::Cut { from: node, to });
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
                if self.input(node, Input::Tick) {
                    let next = self.now + TICK;
                    self.schedule(next, Event::Tick(node));
                }
            }
            Event::Deliver { from, to, message } => {
                self.input(to, Input::Message { from, message });
            }
            Event::DiskDone { node, life, write } => self.disk_done(node, life, write),
            Event::Retention => {
                self.retention();
                let next = self.now + Duration::from_millis(500 + self.rng.below(3_000) as u64);
                if next < FAULT_PHASE {
                    self.schedule(next, Event::Retention);
                }
            }
            Event::Propose => {
                self.propose();
                let next = self.now + Duration::from_millis(20 + self.rng.below(60) as u64);
                if next < FAULT_PHASE {
                    self.schedule(next, Event::Propose);
                }
            }
            Event::Read => {
                self.read();
                let next = self.now + Duration::from_millis(50 + self.rng.below(100) as u64);
                if next < FAULT_PHASE + LIVENESS_BOUND {
                    self.schedule(next, Event::Read);
                }
            }
            Event::Reconfigure => {
                self.reconfigure();
                let next = self.now + Duration::from_millis(100 + self.rng.below(900) as u64);
                if next < FAULT_PHASE {
                    self.schedule(next, Event::Reconfigure);
                }
            }
            Event::NewTarget => {
                self.new_target();
                let next = self.now + Duration::from_millis(2_000 + self.rng.below(6_000) as u64);
                if next < FAULT_PHASE {
                    self.schedule(next, Event::NewTarget);
                }
            }
            Event::Crash(node) => self.crash(node),
            Event::Restart(node) => self.restart(node),
            Event::Cut { from, to } => self.net.cut(from, to),
            Event::Heal => self.net.heal(),
        }
    }

    /// Feeds an input to a running node; false if it is down.
    fn input(&mut self, node: u32, input: Input<u32>) -> bool {
        let now = self.now;
        let Some(replica) = self.nodes.get_mut(&node).and_then(|n| n.replica.as_mut()) else {
            return false;
        };
        let outputs = replica.handle(input, now);
        let core = replica.replica();
        let held = core
            .commit()
            .min(core.durable())
            .saturating_sub(core.first_index());
        let bound = 2 * self.config.keep_committed.max(1);
        self.apply(node, outputs);
        if held > bound {
            self.fail(
                "bounded memory: committed entries are compacted",
                format!("node {node} holds {held} committed, durable entries (at most {bound})"),
            );
        }
        true
    }

    /// The ID at `offset` on `node`: from memory, or from its disk below
    /// what it holds in memory.
    fn held(&self, node: u32, offset: u64) -> Option<MessageId> {
        let n = self.nodes.get(&node)?;
        let replica = n.core()?;
        match replica.entry(offset) {
            Some(entry) => Some(entry.id),
            None if offset < replica.first_index() => n.disk_id(offset),
            None => None,
        }
    }

    /// Draws a new target: the replica set with one member swapped for the
    /// node outside it.
    fn new_target(&mut self) {
        let all: Vec<u32> = self.nodes.keys().copied().collect();
        let out = all[self.rng.below(all.len())];
        self.target = all.into_iter().filter(|n| *n != out).collect();
        self.trace
            .update(format!("{:?} target {:?}\n", self.now, self.target).as_bytes());
    }

    /// The current leader (the one of the highest epoch, if several think so).
    fn leader(&self) -> Option<u32> {
        self.nodes
            .iter()
            .filter_map(|(id, n)| n.core().filter(|r| r.is_leader()).map(|r| (r.epoch(), *id)))
            .max()
            .map(|(_, id)| id)
    }

    fn reconfigure(&mut self) {
        let Some(leader) = self.leader() else { return };
        let (target, rf, now) = (self.target.clone(), self.rf, self.now);
        let Some(replica) = self.nodes.get_mut(&leader).and_then(|n| n.replica.as_mut()) else {
            return;
        };
        let Some(next) = replica.replica().step_toward(&target, &[], rf) else {
            return;
        };
        let (accepted, actions) = replica.propose_members(next.clone(), now);
        if accepted {
            self.reconfigurations += 1;
            self.trace.update(
                format!(
                    "{now:?} {leader} reconfigures to {:?} + {:?}\n",
                    next.voters, next.learners
                )
                .as_bytes(),
            );
            self.apply(leader, actions);
        }
    }

    /// The voters of the replica set in force at the most advanced replica.
    fn final_voters(&self) -> Vec<u32> {
        self.nodes
            .values()
            .filter_map(Node::core)
            .max_by_key(|r| (r.is_leader(), r.epoch(), r.commit()))
            .map(|r| r.voters().to_vec())
            .unwrap_or_default()
    }

    /// The client sends one record to a replica that leads, with `acks`
    /// mostly all, sometimes leader or none. Returns its token if it was taken.
    fn propose(&mut self) -> Option<u64> {
        let leader = self
            .nodes
            .iter()
            .find(|(_, n)| n.core().is_some_and(|r| r.is_leader()))
            .map(|(id, _)| *id)?;
        let acks = match self.rng.below(20) {
            0 => Acks::None,
            1..=3 => Acks::Leader,
            _ => Acks::All,
        };
        self.next_record += 1;
        let token = self.next_record;
        let digest = MessageId(*blake3::hash(&token.to_le_bytes()).as_bytes());
        let now = self.now;
        let replica = self.nodes.get_mut(&leader)?.replica.as_mut()?;
        if replica.admit(acks, now).is_err() {
            self.failed += 1;
            return None;
        }
        let (offset, mut outputs) = replica.propose(digest, now);
        let offset = offset?;
        let id = replica.replica().entry(offset)?.id;
        self.proposals.insert(
            token,
            Proposal {
                leader,
                offset,
                id,
                acks,
            },
        );
        outputs.extend(replica.await_ack(token, offset + 1, acks, now));
        self.apply(leader, outputs);
        Some(token)
    }

    /// The core answered the produce request `token`: check the answer
    /// against the rule for its `acks`, and count what it acknowledged.
    fn answered(&mut self, node: u32, token: u64, answer: Answer<u32>) {
        let Some(p) = self.proposals.remove(&token) else {
            self.fail(
                "answers: each produce request is answered once",
                format!("node {node} answered request {token} again ({answer:?})"),
            );
            return;
        };
        if answer != Answer::Acked {
            self.failed += 1;
            return;
        }
        self.trace
            .update(format!("{:?} ack {} {} {:?}\n", self.now, p.offset, p.id, p.acks).as_bytes());
        let held = self.held(node, p.offset);
        let Some(core) = self.nodes.get(&node).and_then(Node::core) else {
            return;
        };
        let (commit, durable) = (core.commit(), core.durable());
        let rule_holds = match p.acks {
            Acks::None => true,
            Acks::Leader => held == Some(p.id) && (durable > p.offset || commit > p.offset),
            Acks::All => held == Some(p.id) && commit > p.offset,
        };
        if !rule_holds {
            self.fail(
                "answers: acknowledged as its acks promise",
                format!(
                    "node {node} acknowledged {} at offset {} with acks {:?}, holding {held:?} there, durable to {durable}, committed to {commit}",
                    p.id, p.offset, p.acks
                ),
            );
            return;
        }
        if p.acks == Acks::All {
            self.acked.insert(p.offset, p.id);
        }
    }

    fn apply(&mut self, node: u32, outputs: Vec<Output<u32, u64>>) {
        for output in outputs {
            let action = match output {
                Output::Act(action) => action,
                Output::Answer { token, answer } => {
                    self.answered(node, token, answer);
                    continue;
                }
            };
            match action {
                Action::Send { to, message } => {
                    self.check_vote_durable(node, to, &message);
                    for delay in self.net.deliveries(node, to, &mut self.rng) {
                        let at = self.now + delay;
                        self.schedule(
                            at,
                            Event::Deliver {
                                from: node,
                                to,
                                message: message.clone(),
                            },
                        );
                    }
                }
                Action::PersistVote { epoch, voted_for } => {
                    self.schedule_write(node, DiskWrite::Vote { epoch, voted_for })
                }
                Action::PersistLog { from, entries } => self.write(node, from, entries),
                Action::SendStored {
                    to,
                    epoch,
                    from,
                    upto,
                    commit,
                } => self.send_stored(node, to, epoch, (from, upto), commit),
                Action::InstallSnapshot { snapshot, .. } => {
                    if let Some(n) = self.nodes.get_mut(&node) {
                        n.installing = Some(snapshot.index);
                    }
                    self.schedule_write(node, DiskWrite::Install(snapshot));
                }
                Action::Compacted { snapshot } => {
                    // Stored at once (the node queues a write for it, after the
                    // entries it names are durable): an older point would
                    // only mean reading more of the log on restart.
                    self.compactions += 1;
                    if let Some(n) = self.nodes.get_mut(&node) {
                        n.disk.snapshot = Some(snapshot);
                    }
                }
                Action::Committed { upto } => self.committed(node, upto),
                Action::BecameLeader { epoch } => {
                    self.trace
                        .update(format!("{:?} {node} leads {epoch}\n", self.now).as_bytes());
                    if let Some(other) = self.leaders.insert(epoch, node)
                        && other != node
                    {
                        self.fail(
                            "fencing: one leader per epoch",
                            format!("nodes {other} and {node} both lead epoch {epoch}"),
                        );
                    }
                }
            }
        }
    }

    /// A promise (or a candidacy) goes out only once it is on the sender's
    /// disk: a replica that crashed before could otherwise promise twice.
    fn check_vote_durable(&mut self, node: u32, to: u32, message: &Message) {
        let promised = match message {
            Message::Vote {
                epoch,
                granted: true,
            } => (*epoch, to),
            Message::RequestVote { epoch, .. } => (*epoch, node),
            _ => return,
        };
        let Some(disk) = self
            .nodes
            .get(&node)
            .map(|n| (n.disk.epoch, n.disk.voted_for))
        else {
            return;
        };
        if disk != (promised.0, Some(promised.1)) {
            self.fail(
                "votes are durable before they are sent",
                format!(
                    "node {node} sends {message:?} to {to} with its disk at epoch {} voted for {:?}",
                    disk.0, disk.1
                ),
            );
        }
    }

    /// The leader sends entries it holds only on disk, as the node's driver
    /// reads them from its store.
    fn send_stored(&mut self, node: u32, to: u32, epoch: u64, range: (u64, u64), commit: u64) {
        let Some(n) = self.nodes.get(&node) else {
            return;
        };
        let (from, upto) = range;
        let message = match &n.log_start {
            // Retention dropped them: the follower restarts at the log start.
            Some(start) if from < start.index => Message::InstallSnapshot {
                epoch,
                index: start.index,
                last_id: start.last_id,
                last_epoch: start.last_epoch,
                members: postcard::to_stdvec(&start.members).unwrap_or_default(),
                record_start: (0, self.genesis),
                producers: Vec::new(),
                commit,
            },
            _ => {
                let (lo, hi) = (
                    from.saturating_sub(n.disk_first) as usize,
                    upto.saturating_sub(n.disk_first) as usize,
                );
                let Some(entries) = n.disk.log.get(lo..hi).filter(|_| from >= n.disk_first) else {
                    self.fail(
                        "compacted entries are on disk",
                        format!("node {node} has no entries {from}..{upto} on disk to send"),
                    );
                    return;
                };
                let prev_id = match from {
                    f if f == n.disk_first => n.disk_first_prev,
                    f => n.disk.log[(f - n.disk_first) as usize - 1].id,
                };
                Message::Append {
                    epoch,
                    prev_offset: from,
                    prev_id,
                    entries: entries.to_vec(),
                    commit,
                }
            }
        };
        self.sent_from_disk += 1;
        self.apply(node, vec![Output::Act(Action::Send { to, message })]);
    }

    fn write(&mut self, node: u32, from: u64, entries: Vec<LogEntry>) {
        self.schedule_write(node, DiskWrite::Log { from, entries });
    }

    /// Queues a disk write: writes complete in order, after a random latency.
    fn schedule_write(&mut self, node: u32, write: DiskWrite) {
        let mut latency = Duration::from_micros(100 + self.rng.below(3_000) as u64);
        if matches!(write, DiskWrite::Install(_)) {
            // Dropping a whole log takes long: heartbeats and more restart
            // points arrive meanwhile.
            latency += Duration::from_millis(self.rng.below(400) as u64);
        }
        if matches!(write, DiskWrite::Vote { .. }) && self.now < FAULT_PHASE {
            // Now and then the power fails while a vote is being synced.
            if self.rng.below(40) == 0 {
                let back = self.now + Duration::from_millis(50 + self.rng.below(500) as u64);
                self.schedule(self.now + latency / 2, Event::Crash(node));
                self.schedule(back, Event::Restart(node));
            }
        }
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        let done = (self.now + latency).max(n.disk_busy_until);
        n.disk_busy_until = done;
        n.in_flight.push(write.clone());
        let life = n.life;
        self.schedule(done, Event::DiskDone { node, life, write });
    }

    fn disk_done(&mut self, node: u32, life: u64, write: DiskWrite) {
        let genesis = self.genesis;
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        if n.life != life {
            return;
        }
        if !n.in_flight.is_empty() {
            n.in_flight.remove(0);
        }
        match write {
            DiskWrite::Log { from, entries } => {
                n.disk_write(from, &entries);
                let upto = n.disk_end();
                let last_id = match upto.checked_sub(1) {
                    Some(last) => n.disk_id(last).unwrap_or(n.disk_first_prev),
                    None => genesis,
                };
                self.input(node, Input::Persisted { upto, last_id });
            }
            DiskWrite::Install(point) => {
                let index = point.index;
                n.disk.log.clear();
                n.disk_first = index;
                n.disk_first_prev = point.last_id;
                n.disk.snapshot = Some(point.clone());
                n.log_start = Some(point);
                n.installing = None;
                self.installs += 1;
                self.input(node, Input::SnapshotInstalled { index });
            }
            DiskWrite::Vote { epoch, voted_for } => {
                n.disk.epoch = epoch;
                n.disk.voted_for = voted_for;
                let released = n
                    .replica
                    .as_mut()
                    .map(Partition::vote_persisted)
                    .unwrap_or_default();
                self.apply(node, released);
            }
        }
    }

    /// Retention on a random node: drops the entries on disk before its
    /// snapshot point (committed and compacted from memory). Half the time
    /// the node first compacts everything committed, as a quiet partition's
    /// node does before its retention check.
    fn retention(&mut self) {
        let ids: Vec<u32> = self.nodes.keys().copied().collect();
        let node = ids[self.rng.below(ids.len())];
        if self.rng.below(2) == 0 {
            let outputs = self
                .nodes
                .get_mut(&node)
                .and_then(|n| n.replica.as_mut())
                .map(Partition::compact_settled)
                .unwrap_or_default();
            self.apply(node, outputs);
        }
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        let Some(point) = n.disk.snapshot.clone() else {
            return;
        };
        if point.index <= n.disk_first || point.index > n.disk_end() {
            return;
        }
        let cut = (point.index - n.disk_first) as usize;
        n.disk.log.drain(..cut);
        n.disk_first = point.index;
        n.disk_first_prev = point.last_id;
        n.log_start = Some(point);
        self.trace
            .update(format!("{:?} retention {node}\n", self.now).as_bytes());
    }

    /// A reader of a random running replica: every entry below its commit
    /// point must be the one committed there, now and forever (a committed
    /// entry never changes on any replica, whatever happened since).
    fn read(&mut self) {
        let running: Vec<u32> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.replica.is_some())
            .map(|(id, _)| *id)
            .collect();
        if running.is_empty() {
            return;
        }
        let node = running[self.rng.below(running.len())];
        let Some(replica) = self.nodes.get(&node).and_then(Node::core) else {
            return;
        };
        let upto = replica.commit().min(replica.log_end());
        let changed = (0..upto).find_map(|offset| {
            let id = self.held(node, offset)?;
            let committed = self.committed.get(&offset)?;
            (*committed != id).then_some((offset, id, *committed))
        });
        if let Some((offset, id, committed)) = changed {
            self.fail(
                "readers see committed entries unchanged",
                format!("node {node} serves {id} at committed offset {offset}, where {committed} was committed"),
            );
        }
    }

    fn committed(&mut self, node: u32, upto: u64) {
        let seen = self.commit_seen.get(&node).copied().unwrap_or(0);
        let Some(replica) = self.nodes.get(&node).and_then(Node::core) else {
            return;
        };
        let upto = upto.min(replica.log_end());
        for offset in seen..upto {
            let Some(id) = self.held(node, offset) else {
                continue;
            };
            match self.committed.get(&offset) {
                Some(other) if *other != id => {
                    self.fail(
                        "agreement on the committed prefix",
                        format!(
                            "node {node} committed {id} at offset {offset}, another replica {other}"
                        ),
                    );
                    return;
                }
                Some(_) => {}
                None => {
                    self.committed.insert(offset, id);
                }
            }
        }
        self.commit_seen.insert(node, upto.max(seen));
    }

    fn crash(&mut self, node: u32) {
        self.trace
            .update(format!("{:?} crash {node}\n", self.now).as_bytes());
        let tear = self.rng.below(2) == 0;
        let cut = self.rng.next_u64();
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        n.replica = None;
        n.life += 1;
        n.disk_busy_until = self.now;
        // The write in progress may have reached the disk in part.
        if tear && let Some(DiskWrite::Log { from, entries }) = n.in_flight.first().cloned() {
            let keep = (cut % (entries.len() as u64 + 1)) as usize;
            n.disk_write(from, &entries[..keep]);
        }
        n.in_flight.clear();
        n.installing = None;
        self.commit_seen.remove(&node);
        // The client's connection to it broke: what it waited for is not answered.
        self.proposals.retain(|_, p| p.leader != node);
    }

    fn restart(&mut self, node: u32) {
        self.trace
            .update(format!("{:?} start {node}\n", self.now).as_bytes());
        let seed = self.rng.next_u64();
        let (voters, config, rules, genesis, now) = (
            self.voters.clone(),
            self.config.clone(),
            self.rules.clone(),
            self.genesis,
            self.now,
        );
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        if n.replica.is_some() {
            return;
        }
        // A restart reads the log from the stored snapshot point on.
        let mut disk = n.disk.clone();
        let first = disk.snapshot.as_ref().map_or(0, |s| s.index);
        let skip = first.saturating_sub(n.disk_first) as usize;
        disk.log = disk
            .log
            .get(skip..)
            .map(<[LogEntry]>::to_vec)
            .unwrap_or_default();
        let replica = Replica::new(node, voters, config, genesis, disk, now, seed);
        n.replica = Some(Partition::new(replica, rules));
        let next = self.now + TICK;
        self.schedule(next, Event::Tick(node));
    }

    /// After the heal: proposes until one record is committed on every replica.
    fn liveness(&mut self) -> Option<Duration> {
        let healed = FAULT_PHASE;
        let mut t = healed;
        let mut marker: Option<(u64, MessageId)> = None;
        while self.violation.is_none() && t <= healed + LIVENESS_BOUND {
            t += Duration::from_millis(50);
            self.run_until(t);
            if marker.is_none_or(|(offset, id)| self.committed.get(&offset) != Some(&id))
                && let Some(token) = self.propose()
                && let Some(p) = self.proposals.get(&token)
            {
                marker = Some((p.offset, p.id));
            }
            if let Some((offset, id)) = marker
                && self.committed_everywhere(offset, id)
            {
                return Some(t - healed);
            }
        }
        if std::env::var_os("SIM_DEBUG").is_some() {
            for (id, n) in &self.nodes {
                if let Some(r) = n.core() {
                    eprintln!(
                        "node {id}: voters {:?} learners {:?} epoch {} leader {} hint {:?} log {} durable {} commit {} last {:?} disk {}",
                        r.members().voters,
                        r.members().learners,
                        r.epoch(),
                        r.is_leader(),
                        r.leader_hint(),
                        r.log().len(),
                        r.durable(),
                        r.commit(),
                        r.log().last().map(|e| e.epoch),
                        n.disk.log.len()
                    );
                } else {
                    eprintln!("node {id}: down");
                }
            }
        }
        if self.violation.is_none() {
            self.fail(
                "liveness: a record commits after the heal",
                format!("nothing committed everywhere {LIVENESS_BOUND:?} after the heal"),
            );
        }
        None
    }

    fn committed_everywhere(&self, offset: u64, id: MessageId) -> bool {
        let voters = self.final_voters();
        !voters.is_empty()
            && voters.iter().all(|v| {
                self.nodes
                    .get(v)
                    .and_then(Node::core)
                    .is_some_and(|r| r.commit() > offset && self.held(*v, offset) == Some(id))
            })
    }

    fn check_acked_everywhere(&mut self) {
        if self.violation.is_some() {
            return;
        }
        let mut lost = None;
        let voters = self.final_voters();
        for (offset, id) in &self.acked {
            for (node, n) in self.nodes.iter().filter(|(id, _)| voters.contains(id)) {
                if *offset < n.disk_first || n.installing.is_some_and(|point| *offset < point) {
                    continue; // dropped by retention (here, or at the leader it restarts from)
                }
                let held = n.replica.as_ref().and(self.held(*node, *offset));
                if held != Some(*id) {
                    let (first, end) = n.core().map_or((0, 0), |r| (r.first_index(), r.log_end()));
                    lost = Some(format!(
                        "acknowledged {id} at offset {offset} is not on node {node} (it has {held:?}; in memory {first}..{end}, on disk from {}, restarting at {:?})",
                        n.disk_first, n.installing
                    ));
                }
            }
        }
        if let Some(detail) = lost {
            self.fail("no acknowledged record lost", detail);
        }
    }
}
