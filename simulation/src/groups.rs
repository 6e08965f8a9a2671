//! Consumer groups under faults: the real `core::group::Coordinator` with
//! members that follow the consumer's protocol (join, sync, heartbeat,
//! consume, commit; eager or cooperative revocation), over a network that
//! delays and loses messages. Members crash and come back as new members,
//! are cut off until their session expires, and the coordinator fails over:
//! a new one is loaded from the `__offsets` log as stored (an append in
//! flight at the failover may or may not have made it), and requests to the
//! old one go unanswered. Records keep arriving in the topic's partitions.
//!
//! Checkers, on every event:
//! - **one owner per generation**: no two members are given one partition in
//!   one generation;
//! - **committed offsets never go backwards** (members never seek back, so
//!   only a stale member could move one back);
//! - **no record skipped**: every offset below a stored commit was delivered
//!   to some member of the group;
//! - **liveness**: after the faults end, every record is committed within a bound.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use meshlog::core::group::{
    Action, Assignor, Coordinator, GroupError, GroupRequest, GroupResponse, JoinRequest,
    OffsetsRecord, TopicPartition,
};
use meshlog::core::rng::Rng;

use crate::check::Violation;
use crate::queue::EventQueue;

const GROUP: &str = "g";
const TOPIC: &str = "t";
const FAULT_PHASE: Duration = Duration::from_secs(30);
/// After the faults end, every record must be committed within this.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(30);
const SESSION: Duration = Duration::from_millis(3_000);
const HEARTBEAT: Duration = Duration::from_millis(1_000);
const REQUEST_TIMEOUT: Duration = Duration::from_millis(1_500);
const CONSUME_EVERY: Duration = Duration::from_millis(50);
const COMMIT_EVERY: Duration = Duration::from_millis(400);

/// A deliberate bug for the test that shows the checkers can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupFault {
    /// The coordinator accepts commits from removed members and stale generations.
    CoordinatorIgnoresGenerations,
}

/// What a group run did.
#[derive(Clone, Debug)]
pub struct Report {
    /// Generations the group went through.
    pub generations: u64,
    /// Records appended to the topic.
    pub records: u64,
    /// Commits stored.
    pub commits: u64,
    /// Coordinator failovers.
    pub failovers: u32,
    /// Members crashed.
    pub crashes: u32,
    /// Events handled.
    pub events: u64,
    /// Time from the end of the faults until every record was committed.
    pub recovery: Option<Duration>,
    /// Trace hash.
    pub trace_hash: String,
    /// The first invariant violated.
    pub violation: Option<Violation>,
    /// Wall-clock time.
    pub wall: Duration,
}

#[derive(Debug)]
enum Event {
    /// A request reaches the coordinator of `era`.
    ToCoordinator {
        era: u32,
        sent: u64,
        request: GroupRequest,
    },
    /// An answer reaches a member.
    ToMember {
        member: usize,
        incarnation: u32,
        sent: u64,
        answer: Result<GroupResponse, GroupError>,
    },
    /// An append to the `__offsets` log finished.
    Stored {
        era: u32,
        token: u64,
        record: OffsetsRecord,
    },
    /// A member's timer.
    Timer {
        member: usize,
        incarnation: u32,
        kind: Timer,
    },
    /// The coordinator's tick.
    CoordinatorTick,
    /// Records arrive in a partition.
    Produce {
        partition: u32,
    },
    Crash(usize),
    Restart(usize),
    Cut(usize),
    Heal(usize),
    Failover,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    Heartbeat,
    Consume,
    Commit,
    /// The request numbered `sent` got no answer in time.
    Timeout(u64),
}

/// Where a member is in the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Down,
    Joining,
    Syncing(u64),
    /// Reading the group's offsets for newly assigned partitions.
    Fetching(u64),
    Active(u64),
}

struct Member {
    id: String,
    incarnation: u32,
    phase: Phase,
    /// Partitions it owns (consumes), with its position in each.
    owned: BTreeMap<u32, u64>,
    /// The generation that gave it `owned`.
    owned_generation: u64,
    /// Partitions of the last sync not yet positioned.
    pending: Vec<u32>,
    cooperative: bool,
    cut: bool,
    /// The request awaiting an answer (its number), if any.
    waiting: Option<u64>,
    rejoin: bool,
}

struct World {
    rng: Rng,
    queue: EventQueue<Event>,
    now: Duration,
    events: u64,
    hash: blake3::Hasher,
    coordinator: Coordinator,
    era: u32,
    fault: Option<GroupFault>,
    /// The `__offsets` log as stored.
    log: Vec<OffsetsRecord>,
    members: Vec<Member>,
    partitions: u32,
    /// Each partition's log end.
    ends: Vec<u64>,
    /// Offsets delivered to some member, per partition.
    delivered: Vec<BTreeSet<u64>>,
    /// The highest stored commit per partition.
    committed: BTreeMap<u32, u64>,
    /// (generation, partition) → member given it.
    owners: BTreeMap<(u64, u32), usize>,
    next_request: u64,
    /// Who sent each request in flight: request number → (member, incarnation).
    requests: BTreeMap<u64, (usize, u32)>,
    /// Records waiting for the append in flight.
    to_store: std::collections::VecDeque<(u64, OffsetsRecord)>,
    /// Whether an append is in flight.
    storing: bool,
    /// Print every event (`SIM_DEBUG=1`).
    debug: bool,
    violation: Option<Violation>,
    report: Report,
}

/// Runs one seed.
pub fn run(seed: u64) -> Report {
    run_with(seed, None)
}

/// Runs one seed with an optional deliberate bug.
pub fn run_with(seed: u64, fault: Option<GroupFault>) -> Report {
    let started = Instant::now();
    let mut rng = Rng::new(seed ^ 0x6772_6f75_7073);
    let members = 2 + rng.below(3);
    let partitions = 3 + rng.below(6) as u32;
    let cooperative = rng.below(2) == 0;
    let mut coordinator = Coordinator::new();
    if fault == Some(GroupFault::CoordinatorIgnoresGenerations) {
        coordinator = coordinator.with_fault_ignore_generations();
    }
    let mut world = World {
        rng,
        queue: EventQueue::new(1 << 20),
        now: Duration::ZERO,
        events: 0,
        hash: blake3::Hasher::new(),
        coordinator,
        era: 0,
        fault,
        log: Vec::new(),
        members: (0..members)
            .map(|i| Member {
                id: format!("m{i}-0"),
                incarnation: 0,
                phase: Phase::Down,
                owned: BTreeMap::new(),
                owned_generation: 0,
                pending: Vec::new(),
                cooperative,
                cut: false,
                waiting: None,
                rejoin: false,
            })
            .collect(),
        partitions,
        ends: vec![0; partitions as usize],
        delivered: vec![BTreeSet::new(); partitions as usize],
        committed: BTreeMap::new(),
        owners: BTreeMap::new(),
        next_request: 0,
        requests: BTreeMap::new(),
        to_store: Default::default(),
        storing: false,
        debug: std::env::var_os("SIM_DEBUG").is_some(),
        violation: None,
        report: Report {
            generations: 0,
            records: 0,
            commits: 0,
            failovers: 0,
            crashes: 0,
            events: 0,
            recovery: None,
            trace_hash: String::new(),
            violation: None,
            wall: Duration::ZERO,
        },
    };
    world.schedule_start();
    world.run(FAULT_PHASE + LIVENESS_BOUND);
    world.report.events = world.events;
    world.report.trace_hash = world.hash.finalize().to_hex()[..16].to_string();
    world.report.violation = world.violation.clone();
    world.report.wall = started.elapsed();
    world.report.generations = world.coordinator.generation(GROUP);
    world.report
}

impl World {
    fn at(&mut self, delay: Duration, event: Event) {
        if self.queue.push(self.now + delay, event).is_err() && self.violation.is_none() {
            self.fail("bounded event queue", "too many pending events".into());
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

    fn latency(&mut self) -> Duration {
        Duration::from_micros(200 + self.rng.below(20_000) as u64)
    }

    fn ms(&mut self, below: usize) -> Duration {
        Duration::from_millis(self.rng.below(below) as u64)
    }

    fn schedule_start(&mut self) {
        for m in 0..self.members.len() {
            let at = self.ms(3_000);
            self.at(at, Event::Restart(m));
        }
        self.at(Duration::from_millis(100), Event::CoordinatorTick);
        for p in 0..self.partitions {
            let at = self.ms(200);
            self.at(at, Event::Produce { partition: p });
        }
        // Everything heals when the faults end: the downed come back.
        for m in 0..self.members.len() {
            self.at(FAULT_PHASE, Event::Heal(m));
            self.at(FAULT_PHASE, Event::Restart(m));
        }
        for _ in 0..1 + self.rng.below(4) {
            let at = Duration::from_millis(3_000 + self.rng.below(25_000) as u64);
            let m = self.rng.below(self.members.len());
            match self.rng.below(4) {
                0 => {
                    self.at(at, Event::Crash(m));
                    if self.rng.below(3) != 0 {
                        let back = at + self.ms(5_000);
                        self.at(back, Event::Restart(m));
                    }
                }
                1 | 2 => {
                    self.at(at, Event::Cut(m));
                    let heal = at + Duration::from_millis(500 + self.rng.below(8_000) as u64);
                    self.at(heal, Event::Heal(m));
                }
                _ => self.at(at, Event::Failover),
            }
        }
    }

    fn run(&mut self, until: Duration) {
        while self.violation.is_none() {
            let Some((at, event)) = self.queue.pop_due(until) else {
                break;
            };
            self.now = at;
            self.events += 1;
            let line = format!("{at:?} {event:?}");
            if self.debug {
                eprintln!("{line}");
            }
            self.hash.update(line.as_bytes());
            self.handle(event);
            self.check_liveness();
        }
        if self.violation.is_none() && self.report.recovery.is_none() {
            let lag: Vec<(u32, u64, u64)> = (0..self.partitions)
                .map(|p| {
                    (
                        p,
                        self.committed.get(&p).copied().unwrap_or(0),
                        self.ends[p as usize],
                    )
                })
                .filter(|(_, c, e)| c < e)
                .collect();
            self.fail(
                "liveness: every record committed after the faults end",
                format!("not within {LIVENESS_BOUND:?}: (partition, committed, end) {lag:?}"),
            );
        }
    }

    fn check_liveness(&mut self) {
        if self.now < FAULT_PHASE || self.report.recovery.is_some() {
            return;
        }
        let all_committed = (0..self.partitions)
            .all(|p| self.committed.get(&p).copied().unwrap_or(0) >= self.ends[p as usize]);
        let any_member_up = self.members.iter().any(|m| m.phase != Phase::Down);
        if all_committed && any_member_up {
            self.report.recovery = Some(self.now - FAULT_PHASE);
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::ToCoordinator { era, sent, request } => {
                if era == self.era {
                    let actions = self.coordinator.handle(sent, request, self.now);
                    self.carry_out(actions);
                }
            }
            Event::ToMember {
                member,
                incarnation,
                sent,
                answer,
            } => {
                let m = &self.members[member];
                if m.incarnation == incarnation && !m.cut && m.waiting == Some(sent) {
                    self.members[member].waiting = None;
                    self.on_answer(member, answer);
                }
            }
            Event::Stored { era, token, record } => self.stored(era, token, record),
            Event::Timer {
                member,
                incarnation,
                kind,
            } => {
                if self.members[member].incarnation == incarnation
                    && self.members[member].phase != Phase::Down
                {
                    self.on_timer(member, kind);
                }
            }
            Event::CoordinatorTick => {
                let actions = self.coordinator.tick(self.now);
                self.carry_out(actions);
                self.at(Duration::from_millis(100), Event::CoordinatorTick);
            }
            Event::Produce { partition } => {
                if self.now < FAULT_PHASE {
                    let n = 1 + self.rng.below(5) as u64;
                    self.ends[partition as usize] += n;
                    self.report.records += n;
                    let next = self.ms(300);
                    self.at(next, Event::Produce { partition });
                }
            }
            Event::Crash(m) => {
                self.report.crashes += 1;
                let member = &mut self.members[m];
                member.phase = Phase::Down;
                member.incarnation += 1;
                member.owned.clear();
                member.waiting = None;
            }
            Event::Restart(m) => {
                let member = &mut self.members[m];
                if member.phase == Phase::Down {
                    // A new process: a new member id, nothing owned.
                    member.incarnation += 1;
                    member.id = format!("m{m}-{}", member.incarnation);
                    member.owned.clear();
                    self.join(m);
                    self.start_timers(m);
                }
            }
            Event::Cut(m) => self.members[m].cut = true,
            Event::Heal(m) => self.members[m].cut = false,
            Event::Failover => self.failover(),
        }
    }

    fn start_timers(&mut self, m: usize) {
        let incarnation = self.members[m].incarnation;
        for (kind, every) in [
            (Timer::Heartbeat, HEARTBEAT),
            (Timer::Consume, CONSUME_EVERY),
            (Timer::Commit, COMMIT_EVERY),
        ] {
            self.at(
                every,
                Event::Timer {
                    member: m,
                    incarnation,
                    kind,
                },
            );
        }
    }

    /// Sends `request` from member `m`; it waits for the answer (or a timeout).
    fn send(&mut self, m: usize, request: GroupRequest) {
        self.next_request += 1;
        let sent = self.next_request;
        let incarnation = self.members[m].incarnation;
        self.members[m].waiting = Some(sent);
        let timeout = if matches!(request, GroupRequest::Join { .. }) {
            SESSION * 3
        } else {
            REQUEST_TIMEOUT
        };
        self.at(
            timeout,
            Event::Timer {
                member: m,
                incarnation,
                kind: Timer::Timeout(sent),
            },
        );
        if self.members[m].cut || self.rng.below(50) == 0 {
            return; // lost
        }
        self.requests.insert(sent, (m, incarnation));
        let (era, delay) = (self.era, self.latency());
        self.at(delay, Event::ToCoordinator { era, sent, request });
    }

    fn carry_out(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Reply { id, answer } => {
                    let Some((member, incarnation)) = self.requests.remove(&id) else {
                        continue;
                    };
                    if self.rng.below(50) == 0 {
                        continue; // lost
                    }
                    let delay = self.latency();
                    self.at(
                        delay,
                        Event::ToMember {
                            member,
                            incarnation,
                            sent: id,
                            answer,
                        },
                    );
                }
                Action::Persist { token, record } => {
                    self.to_store.push_back((token, record));
                    self.store_next();
                }
            }
        }
    }

    /// Starts the next append unless one is in flight: like the real
    /// driver, one at a time, so outcomes come back in append order.
    fn store_next(&mut self) {
        if self.storing {
            return;
        }
        if let Some((token, record)) = self.to_store.pop_front() {
            self.storing = true;
            let era = self.era;
            let delay = Duration::from_millis(1 + self.rng.below(10) as u64);
            self.at(delay, Event::Stored { era, token, record });
        }
    }

    /// An append finished: stored in the log, and reported to its coordinator
    /// if that one is still in charge.
    fn stored(&mut self, era: u32, token: u64, record: OffsetsRecord) {
        if era != self.era {
            return; // handled at the failover
        }
        self.storing = false;
        self.append(record);
        let actions = self.coordinator.persisted(token, Ok(()), self.now);
        self.carry_out(actions);
        self.store_next();
    }

    /// A record enters the `__offsets` log: check commits as they are stored.
    fn append(&mut self, record: OffsetsRecord) {
        if let OffsetsRecord::Commit { offsets, .. } = &record {
            self.report.commits += 1;
            for ((_, partition), offset) in offsets {
                let previous = self.committed.get(partition).copied().unwrap_or(0);
                if *offset < previous {
                    self.fail(
                        "committed offsets never go backwards",
                        format!("partition {partition}: {previous} then {offset}"),
                    );
                }
                let skipped =
                    (previous..*offset).find(|o| !self.delivered[*partition as usize].contains(o));
                if let Some(o) = skipped.filter(|_| *offset > previous) {
                    self.fail(
                        "no record skipped by the group",
                        format!("partition {partition}: committed {offset} but offset {o} was never delivered"),
                    );
                }
                self.committed.insert(*partition, previous.max(*offset));
            }
        }
        self.log.push(record);
    }

    /// The coordinator's node dies: appends in flight land or not, and a new
    /// coordinator loads the log as stored.
    fn failover(&mut self) {
        self.report.failovers += 1;
        self.era += 1;
        // Appends of the old era still queued are dropped by `stored`; a coin
        // decides for each whether it made it into the log first.
        let mut queued = Vec::new();
        while let Some((at, event)) = self.queue.pop_due(Duration::MAX) {
            queued.push((at, event));
        }
        for (at, event) in queued {
            match event {
                Event::Stored { record, .. } => {
                    if self.rng.below(2) == 0 {
                        self.append(record);
                    }
                }
                other => {
                    let _ = self.queue.push(at, other);
                }
            }
        }
        self.requests.clear();
        self.to_store.clear();
        self.storing = false;
        let mut next = Coordinator::new();
        if self.fault == Some(GroupFault::CoordinatorIgnoresGenerations) {
            next = next.with_fault_ignore_generations();
        }
        for record in &self.log {
            next.load(record);
        }
        self.coordinator = next;
    }

    fn join(&mut self, m: usize) {
        let member = &mut self.members[m];
        if !member.cooperative {
            // Eager: give everything up (committing it) before joining.
            let offsets = positions(&member.owned);
            member.owned.clear();
            if let Phase::Active(generation) = member.phase
                && !offsets.is_empty()
            {
                let request = commit_request(&member.id, generation, offsets);
                self.fire_and_forget(request);
            }
        }
        let member = &mut self.members[m];
        member.phase = Phase::Joining;
        member.rejoin = false;
        let join = JoinRequest {
            member: member.id.clone(),
            topics: BTreeMap::from([(TOPIC.to_string(), self.partitions)]),
            assignor: if member.cooperative {
                Assignor::CooperativeSticky
            } else {
                Assignor::RoundRobin
            },
            session_timeout_ms: SESSION.as_millis() as u64,
            rebalance_timeout_ms: SESSION.as_millis() as u64 * 2,
            heartbeat_interval_ms: HEARTBEAT.as_millis() as u64,
            owned: member
                .owned
                .keys()
                .map(|p| (TOPIC.to_string(), *p))
                .collect(),
            owned_generation: member.owned_generation,
        };
        self.send(
            m,
            GroupRequest::Join {
                group: GROUP.into(),
                join,
            },
        );
    }

    /// A request whose answer nobody waits for (a commit before rejoining).
    fn fire_and_forget(&mut self, request: GroupRequest) {
        self.next_request += 1;
        let sent = self.next_request;
        if self.rng.below(50) != 0 {
            let (era, delay) = (self.era, self.latency());
            self.at(delay, Event::ToCoordinator { era, sent, request });
        }
    }

    fn on_answer(&mut self, m: usize, answer: Result<GroupResponse, GroupError>) {
        let phase = self.members[m].phase.clone();
        match (phase, answer) {
            (Phase::Joining, Ok(GroupResponse::Joined { generation, .. })) => {
                self.members[m].phase = Phase::Syncing(generation);
                let id = self.members[m].id.clone();
                self.send(
                    m,
                    GroupRequest::Sync {
                        group: GROUP.into(),
                        member: id,
                        generation,
                    },
                );
            }
            (Phase::Syncing(generation), Ok(GroupResponse::Synced { assignment, .. })) => {
                self.synced(m, generation, assignment);
            }
            (Phase::Fetching(generation), Ok(GroupResponse::Offsets(offsets))) => {
                let committed: BTreeMap<u32, u64> =
                    offsets.into_iter().map(|((_, p), o)| (p, o)).collect();
                let member = &mut self.members[m];
                for p in std::mem::take(&mut member.pending) {
                    member
                        .owned
                        .insert(p, committed.get(&p).copied().unwrap_or(0));
                }
                member.phase = Phase::Active(generation);
            }
            (Phase::Active(_), Ok(GroupResponse::Alive | GroupResponse::Committed)) => {}
            (Phase::Active(_), Err(GroupError::RebalanceInProgress)) => {
                self.members[m].rejoin = true;
            }
            (phase, Err(GroupError::UnknownMember(_) | GroupError::IllegalGeneration { .. })) => {
                // Fenced: its partitions are someone else's now; drop them uncommitted.
                self.members[m].owned.clear();
                self.members[m].rejoin = true;
                if !matches!(phase, Phase::Active(_)) {
                    self.join(m);
                }
            }
            (Phase::Active(_), Err(_)) => {}
            // Anything else while joining (superseded, not stored, a
            // coordinator that moved, an answer out of turn): join again.
            _ => self.join(m),
        }
    }

    /// The member's partitions in `generation`: give up what moved (committing
    /// it), then read the group's offsets for what is new.
    fn synced(&mut self, m: usize, generation: u64, assignment: Vec<TopicPartition>) {
        let new: BTreeSet<u32> = assignment.iter().map(|tp| tp.1).collect();
        for p in &new {
            let owner = *self.owners.entry((generation, *p)).or_insert(m);
            if owner != m {
                self.fail(
                    "one owner per partition per generation",
                    format!(
                        "partition {p} given to members {owner} and {m} in generation {generation}"
                    ),
                );
            }
        }
        let member = &mut self.members[m];
        if member.owned_generation + 1 != generation {
            // It missed a generation: what it owned may have moved since;
            // its positions are stale (Kafka's "partitions lost").
            member.owned.clear();
        }
        member.owned_generation = generation;
        let revoked: BTreeMap<u32, u64> = member
            .owned
            .iter()
            .filter(|(p, _)| !new.contains(p))
            .map(|(p, o)| (*p, *o))
            .collect();
        member.owned.retain(|p, _| new.contains(p));
        member.pending = new
            .iter()
            .filter(|p| !member.owned.contains_key(p))
            .copied()
            .collect();
        if !revoked.is_empty() {
            let request = commit_request(&member.id, generation, positions(&revoked));
            self.fire_and_forget(request);
            self.members[m].rejoin = true;
        }
        if self.members[m].pending.is_empty() {
            self.members[m].phase = Phase::Active(generation);
        } else {
            self.members[m].phase = Phase::Fetching(generation);
            self.send(
                m,
                GroupRequest::FetchOffsets {
                    group: GROUP.into(),
                },
            );
        }
    }

    fn on_timer(&mut self, m: usize, kind: Timer) {
        let incarnation = self.members[m].incarnation;
        match kind {
            Timer::Timeout(sent) => {
                if self.members[m].waiting == Some(sent) {
                    self.members[m].waiting = None;
                    // An active member tries again at its next heartbeat or
                    // commit; one joining starts over.
                    if !matches!(self.members[m].phase, Phase::Active(_)) {
                        self.join(m);
                    }
                }
            }
            Timer::Heartbeat => {
                let member = &self.members[m];
                if let Phase::Active(generation) = member.phase {
                    if member.rejoin && member.waiting.is_none() {
                        self.join(m);
                    } else if member.waiting.is_none() {
                        let id = member.id.clone();
                        self.send(
                            m,
                            GroupRequest::Heartbeat {
                                group: GROUP.into(),
                                member: id,
                                generation,
                            },
                        );
                    }
                }
                self.at(
                    HEARTBEAT,
                    Event::Timer {
                        member: m,
                        incarnation,
                        kind,
                    },
                );
            }
            Timer::Consume => {
                if let Phase::Active(_) = self.members[m].phase
                    && !self.members[m].cut
                {
                    let owned: Vec<(u32, u64)> = self.members[m]
                        .owned
                        .iter()
                        .map(|(p, o)| (*p, *o))
                        .collect();
                    for (p, position) in owned {
                        let end = self.ends[p as usize];
                        self.delivered[p as usize].extend(position..end);
                        self.members[m].owned.insert(p, end.max(position));
                    }
                }
                self.at(
                    CONSUME_EVERY,
                    Event::Timer {
                        member: m,
                        incarnation,
                        kind,
                    },
                );
            }
            Timer::Commit => {
                // Asynchronous commits (`commit_async`): not waited for.
                let member = &self.members[m];
                if let Phase::Active(generation) = member.phase
                    && !member.owned.is_empty()
                    && !member.cut
                {
                    let request = commit_request(&member.id, generation, positions(&member.owned));
                    self.fire_and_forget(request);
                }
                self.at(
                    COMMIT_EVERY,
                    Event::Timer {
                        member: m,
                        incarnation,
                        kind,
                    },
                );
            }
        }
    }
}

fn positions(owned: &BTreeMap<u32, u64>) -> Vec<(TopicPartition, u64)> {
    owned
        .iter()
        .map(|(p, o)| ((TOPIC.to_string(), *p), *o))
        .collect()
}

fn commit_request(
    member: &str,
    generation: u64,
    offsets: Vec<(TopicPartition, u64)>,
) -> GroupRequest {
    GroupRequest::Commit {
        group: GROUP.into(),
        member: Some((member.to_string(), generation)),
        offsets,
    }
}
