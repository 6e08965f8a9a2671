//! The producer under faults: the real `core::producer` queue (batching,
//! linger, in-flight window, ordered idempotent retries) sending keyed
//! records to one partition whose leader runs the real idempotence check
//! (`store::ProducerState`: sequence numbers, chain hash, the window of recent
//! batches). The network between them loses, duplicates and reorders requests
//! and answers; the leader changes now and then, losing its uncommitted
//! suffix (what a new Raft leader without those entries does), and is
//! unreachable for a while. Acks are `all`: a batch is answered once
//! committed, and a committed entry is never lost.
//!
//! Checkers, on every event:
//! - **no duplicates**: the log never holds a record twice;
//! - **per-key order**: each key's records are in the log in send order;
//! - **no acknowledged loss**: an acknowledged record stays at its offset;
//! - **liveness**: after the faults end, every record is acknowledged within
//!   a bound (none fails: the delivery timeout is longer than the run).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meshlog::chain::{self, MessageId, ProducerId};
use meshlog::core::producer::{Answer, Idempotence, Item, Output, PartitionSender, SendSettings};
use meshlog::core::rng::Rng;
use meshlog::store::{ProducerState, SequenceCheck};
use meshlog::wire::ProducerBatch;

use crate::check::Violation;
use crate::queue::EventQueue;

const PRODUCER: ProducerId = ProducerId(42);
const FAULT_PHASE: Duration = Duration::from_secs(20);
/// After the faults end, everything must be acknowledged within this.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(30);
const KEYS: u64 = 8;

/// What a producer run did.
#[derive(Clone, Debug)]
pub struct Report {
    /// Records sent.
    pub records: u64,
    /// Records acknowledged.
    pub acked: u64,
    /// Leader changes that lost an uncommitted suffix.
    pub failovers: u32,
    /// Attempts sent (first sends and retries).
    pub attempts: u64,
    /// Events handled.
    pub events: u64,
    /// Time from the end of the faults until the last acknowledgement.
    pub recovery: Option<Duration>,
    /// Trace hash.
    pub trace_hash: String,
    /// The first invariant violated.
    pub violation: Option<Violation>,
    /// Wall-clock time.
    pub wall: Duration,
}

/// A record: its key and its number among that key's records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rec {
    key: u64,
    n: u64,
}

impl Rec {
    fn digest(self) -> MessageId {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.key.to_le_bytes());
        bytes[8..].copy_from_slice(&self.n.to_le_bytes());
        MessageId(*blake3::hash(&bytes).as_bytes())
    }
}

type Sender = PartitionSender<Rec, Rec, u64, &'static str>;

#[derive(Debug)]
enum Event {
    /// The application sends its next record.
    Send,
    /// The queue's timer.
    Wake,
    /// A request reaches the leader.
    Request {
        batch: u64,
        attempt: u32,
        stamp: ProducerBatch,
        records: Vec<Rec>,
    },
    /// The leader commits what it has.
    Commit,
    /// An answer reaches the producer.
    Answer {
        batch: u64,
        attempt: u32,
        answer: Answer<u64, &'static str>,
    },
    /// The leader changes, losing its uncommitted entries.
    Failover,
    /// The leader is unreachable until then.
    Outage(Duration),
}

/// The partition's log at its current leader.
#[derive(Default)]
struct Leader {
    log: Vec<Rec>,
    /// Entries below this are committed (never lost).
    committed: usize,
    state: Option<ProducerState>,
    /// Answers waiting for their entries to commit: (end, batch, attempt, base offset).
    waiting: Vec<(usize, u64, u32, u64)>,
    /// Each key's last record number in the log.
    last_n: BTreeMap<u64, u64>,
}

struct World {
    rng: Rng,
    now: Duration,
    queue: EventQueue<Event>,
    sender: Sender,
    leader: Leader,
    unreachable_until: Duration,
    fault: Option<ProducerFault>,
    next_n: Vec<u64>,
    sent: u64,
    to_send: u64,
    acked: BTreeMap<u64, Rec>,
    acked_count: u64,
    last_ack: Duration,
    report: Report,
    trace: blake3::Hasher,
}

/// A deliberate bug, to show the checkers catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProducerFault {
    /// The leader appends every request, retries included, without checking
    /// the producer's sequence numbers.
    LeaderIgnoresSequences,
}

/// Runs one seed.
pub fn run(seed: u64) -> Report {
    run_with(seed, None)
}

/// Runs one seed, with `fault` injected.
pub fn run_with(seed: u64, fault: Option<ProducerFault>) -> Report {
    let wall = Instant::now();
    let mut rng = Rng::new(seed ^ 0x9e37_79b9_7f4a_7c15);
    let settings = SendSettings {
        batch_bytes: 40 + rng.below(400),
        linger: Duration::from_millis(rng.below(10) as u64),
        max_in_flight: 1 + rng.below(5),
        retry_backoff: Duration::from_millis(20 + rng.below(100) as u64),
        delivery_timeout: Duration::from_secs(3600),
        retries: u32::MAX,
    };
    let to_send = 500 + rng.below(1500) as u64;
    let genesis = chain::producer_genesis(PRODUCER, "sim", 0);
    let mut world = World {
        rng,
        now: Duration::ZERO,
        queue: EventQueue::new(1_000_000),
        sender: Sender::new(settings, Idempotence::Fresh(PRODUCER), genesis),
        leader: Leader::default(),
        unreachable_until: Duration::ZERO,
        fault,
        next_n: vec![0; KEYS as usize],
        sent: 0,
        to_send,
        acked: BTreeMap::new(),
        acked_count: 0,
        last_ack: Duration::ZERO,
        report: Report {
            records: to_send,
            acked: 0,
            failovers: 0,
            attempts: 0,
            events: 0,
            recovery: None,
            trace_hash: String::new(),
            violation: None,
            wall: Duration::ZERO,
        },
        trace: blake3::Hasher::new(),
    };
    world.schedule(Duration::ZERO, Event::Send);
    world.schedule_faults();
    world.run_until(FAULT_PHASE + LIVENESS_BOUND);
    if world.report.violation.is_none() {
        if world.acked_count < to_send {
            world.fail(
                "liveness",
                format!(
                    "{} of {to_send} records acknowledged {LIVENESS_BOUND:?} after the faults ended",
                    world.acked_count
                ),
            );
        } else {
            world.report.recovery = Some(world.last_ack.saturating_sub(FAULT_PHASE));
        }
    }
    world.report.acked = world.acked_count;
    world.report.trace_hash = world.trace.finalize().to_hex()[..16].to_string();
    world.report.wall = wall.elapsed();
    world.report
}

impl World {
    fn schedule(&mut self, at: Duration, event: Event) {
        if self.queue.push(at, event).is_err() {
            self.fail("no message storm", "over a million pending events".into());
        }
    }

    fn fail(&mut self, invariant: &'static str, detail: String) {
        if self.report.violation.is_none() {
            self.report.violation = Some(Violation {
                at: self.now,
                invariant,
                detail,
            });
        }
    }

    fn faulty(&self) -> bool {
        self.now < FAULT_PHASE
    }

    fn schedule_faults(&mut self) {
        let failovers = self.rng.below(8);
        for _ in 0..failovers {
            let at = Duration::from_millis(self.rng.below(FAULT_PHASE.as_millis() as usize) as u64);
            self.schedule(at, Event::Failover);
        }
        let outages = self.rng.below(4);
        for _ in 0..outages {
            let at = Duration::from_millis(self.rng.below(FAULT_PHASE.as_millis() as usize) as u64);
            let length = Duration::from_millis(100 + self.rng.below(3000) as u64);
            self.schedule(at, Event::Outage(length));
        }
    }

    fn run_until(&mut self, until: Duration) {
        while self.report.violation.is_none() {
            let Some((at, event)) = self.queue.pop_due(until) else {
                return;
            };
            self.now = at;
            self.report.events += 1;
            self.trace.update(format!("{at:?} {event:?}\n").as_bytes());
            if std::env::var_os("SIM_DEBUG").is_some() {
                eprintln!("{at:?} {event:?}");
            }
            self.handle(event);
            if self.acked_count == self.to_send && self.sent == self.to_send {
                return;
            }
        }
    }

    /// A network hop's latency: 0.1–5 ms, so messages reorder.
    fn latency(&mut self) -> Duration {
        Duration::from_micros(100 + self.rng.below(4900) as u64)
    }

    /// Whether the network drops this message (2% during the fault phase).
    fn lost(&mut self) -> bool {
        self.faulty() && self.rng.below(50) == 0
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Send => self.send_next(),
            Event::Wake => {
                let outputs = self.sender.poll(self.now);
                self.apply(outputs);
            }
            Event::Request {
                batch,
                attempt,
                stamp,
                records,
            } => self.on_request((batch, attempt), stamp, records),
            Event::Commit => self.commit(),
            Event::Answer {
                batch,
                attempt,
                answer,
            } => {
                let outputs = self.sender.answer(batch, attempt, answer, self.now);
                self.apply(outputs);
            }
            Event::Failover => self.failover(),
            Event::Outage(length) => self.unreachable_until = self.now + length,
        }
    }

    fn send_next(&mut self) {
        if self.sent >= self.to_send {
            return;
        }
        let key = self.rng.below(KEYS as usize) as u64;
        let rec = Rec {
            key,
            n: self.next_n[key as usize],
        };
        self.next_n[key as usize] += 1;
        self.sent += 1;
        let item = Item {
            record: rec,
            digest: rec.digest(),
            bytes: 20,
            token: rec,
        };
        let outputs = self.sender.push(item, self.now);
        self.apply(outputs);
        let gap = Duration::from_micros(self.rng.below(2000) as u64);
        self.schedule(self.now + gap, Event::Send);
    }

    fn apply(&mut self, outputs: Vec<Output<Rec, Rec, u64, &'static str>>) {
        for output in outputs {
            match output {
                Output::Send {
                    batch,
                    attempt,
                    stamp,
                    prev,
                    records,
                    ..
                } => {
                    self.report.attempts += 1;
                    let (Some((producer, base_seq)), Some(prev)) = (stamp, prev) else {
                        self.fail("idempotence", "an unstamped batch".into());
                        return;
                    };
                    let stamp = ProducerBatch {
                        producer,
                        base_seq,
                        prev,
                    };
                    if self.lost() {
                        // The request is lost: the attempt times out.
                        let at = self.now + Duration::from_millis(500);
                        let answer = Answer::Retry("timeout");
                        self.schedule(
                            at,
                            Event::Answer {
                                batch,
                                attempt,
                                answer,
                            },
                        );
                        continue;
                    }
                    let at = self.now + self.latency();
                    let copies = if self.faulty() && self.rng.below(50) == 0 {
                        2
                    } else {
                        1
                    };
                    for _ in 0..copies {
                        let event = Event::Request {
                            batch,
                            attempt,
                            stamp: stamp.clone(),
                            records: records.clone(),
                        };
                        let jitter = Duration::from_micros(self.rng.below(3000) as u64);
                        self.schedule(at + jitter, event);
                    }
                }
                Output::Stored {
                    tokens, outcome, ..
                } => self.acknowledged(tokens, outcome),
                Output::Failed { tokens, failure } => {
                    self.fail(
                        "liveness",
                        format!("{} records failed: {failure:?}", tokens.len()),
                    );
                }
                Output::AlreadyStored { .. } => {
                    self.fail("idempotence", "a fresh producer replayed".into());
                }
            }
        }
        if let Some(at) = self.sender.next_wake() {
            self.schedule(at.max(self.now), Event::Wake);
        }
    }

    fn acknowledged(&mut self, tokens: Vec<Rec>, base_offset: u64) {
        for (i, rec) in tokens.into_iter().enumerate() {
            let offset = base_offset + i as u64;
            if self.leader.log.get(offset as usize) != Some(&rec) {
                self.fail(
                    "no acknowledged loss",
                    format!(
                        "{rec:?} acknowledged at {offset}, the log holds {:?}",
                        self.leader.log.get(offset as usize)
                    ),
                );
            }
            self.acked.insert(offset, rec);
            self.acked_count += 1;
        }
        self.last_ack = self.now;
    }

    /// The leader handles a produce request as the real leader does.
    fn on_request(
        &mut self,
        (batch, attempt): (u64, u32),
        stamp: ProducerBatch,
        records: Vec<Rec>,
    ) {
        if self.now < self.unreachable_until {
            let at = self.now + Duration::from_millis(500);
            self.schedule(
                at,
                Event::Answer {
                    batch,
                    attempt,
                    answer: Answer::Retry("timeout"),
                },
            );
            return;
        }
        let genesis = chain::producer_genesis(PRODUCER, "sim", 0);
        let check = match self.fault {
            Some(ProducerFault::LeaderIgnoresSequences) => Ok(SequenceCheck::Next),
            None => {
                ProducerState::check(self.leader.state.as_ref(), genesis, &stamp, records.len())
            }
        };
        let answer = match check {
            Ok(SequenceCheck::Next) => {
                let base_offset = self.leader.log.len() as u64;
                let digests: Vec<MessageId> = records.iter().map(|r| r.digest()).collect();
                let after = ProducerBatch {
                    producer: PRODUCER,
                    base_seq: stamp.base_seq + records.len() as u64,
                    prev: meshlog::wire::producer_head(&stamp, &digests),
                };
                self.leader.state = Some(ProducerState::advanced(
                    self.leader.state.take(),
                    &stamp,
                    &after,
                    base_offset,
                    records.len() as u32,
                    0,
                ));
                self.append(&records);
                let end = self.leader.log.len();
                self.leader.waiting.push((end, batch, attempt, base_offset));
                let at = self.now + Duration::from_micros(200 + self.rng.below(3000) as u64);
                self.schedule(at, Event::Commit);
                return;
            }
            Ok(SequenceCheck::Retry(original)) => {
                let start = original.base_offset as usize;
                let stored = self.leader.log.get(start..start + records.len());
                if stored != Some(&records[..]) {
                    // As the real leader: other records at these sequence
                    // numbers are answered with where the chain stands.
                    self.out_of_sequence(genesis)
                } else if start + records.len() > self.leader.committed {
                    // Stored, not committed yet: answer once it is.
                    self.leader.waiting.push((
                        start + records.len(),
                        batch,
                        attempt,
                        original.base_offset,
                    ));
                    return;
                } else {
                    Answer::Stored(original.base_offset)
                }
            }
            Err(_) => self.out_of_sequence(genesis),
        };
        self.answer(batch, attempt, answer);
    }

    /// The answer to a stamp that does not fit: where the producer's chain stands.
    fn out_of_sequence(&self, genesis: MessageId) -> Answer<u64, &'static str> {
        let (next_seq, head) = self
            .leader
            .state
            .as_ref()
            .map_or((0, genesis), |s| (s.next_seq, s.head));
        Answer::OutOfSequence {
            next_seq,
            head,
            error: "out of sequence",
        }
    }

    fn answer(&mut self, batch: u64, attempt: u32, answer: Answer<u64, &'static str>) {
        if self.lost() {
            let at = self.now + Duration::from_millis(500);
            self.schedule(
                at,
                Event::Answer {
                    batch,
                    attempt,
                    answer: Answer::Retry("answer lost"),
                },
            );
            return;
        }
        let at = self.now + self.latency();
        self.schedule(
            at,
            Event::Answer {
                batch,
                attempt,
                answer,
            },
        );
    }

    fn commit(&mut self) {
        self.leader.committed = self.leader.log.len();
        let committed = self.leader.committed;
        let (ready, waiting): (Vec<_>, Vec<_>) = self
            .leader
            .waiting
            .drain(..)
            .partition(|(end, ..)| *end <= committed);
        self.leader.waiting = waiting;
        for (_, batch, attempt, base_offset) in ready {
            self.answer(batch, attempt, Answer::Stored(base_offset));
        }
    }

    /// A new leader without the uncommitted suffix.
    fn failover(&mut self) {
        self.report.failovers += 1;
        let cut = self.leader.committed;
        self.leader.log.truncate(cut);
        self.leader.state = self
            .leader
            .state
            .as_ref()
            .and_then(|s| s.rolled_back_to(cut as u64));
        if self.leader.state.is_none() && cut > 0 {
            self.fail(
                "idempotence",
                "the producer state could not be rolled back".into(),
            );
        }
        self.leader.last_n.clear();
        for rec in &self.leader.log {
            self.leader.last_n.insert(rec.key, rec.n);
        }
        let lost = self
            .acked
            .iter()
            .find(|(offset, rec)| self.leader.log.get(**offset as usize) != Some(rec))
            .map(|(offset, rec)| (*offset, *rec));
        if let Some((offset, rec)) = lost {
            self.fail(
                "no acknowledged loss",
                format!("{rec:?} at {offset} lost in a failover"),
            );
        }
        for (_, batch, attempt, _) in std::mem::take(&mut self.leader.waiting) {
            self.answer(batch, attempt, Answer::Retry("not leader"));
        }
    }

    /// Appends records, checking no duplicates and per-key order.
    fn append(&mut self, records: &[Rec]) {
        for rec in records {
            let offset = self.leader.log.len();
            if let Some(previous) = self.leader.last_n.insert(rec.key, rec.n)
                && previous >= rec.n
            {
                let detail = format!(
                    "key {} record {} at offset {offset} after record {previous}",
                    rec.key, rec.n
                );
                self.fail("no duplicates, per-key order", detail);
            }
            self.leader.log.push(*rec);
        }
    }
}
