//! One producer's send queue for one partition, as a pure state machine:
//! batching (`batch_bytes`, `linger`), the in-flight window
//! (`max_in_flight`), and ordered, idempotent retries until
//! `delivery_timeout`.
//!
//! Records are pushed in send order and sealed into batches. With an
//! idempotent producer each batch is stamped with its first sequence number
//! and the producer-chain hash before it when it first goes out, so a
//! retried batch is the same batch and the leader answers it with its original
//! offsets. (Stamping at the first send rather than at sealing keeps the stamps
//! that a failure moves to the few batches sent so far, however long the queue.) Batches go out in sequence order, at most `max_in_flight` at a
//! time. When one fails, nothing new is sent until every batch in flight has
//! been answered ("draining"); then the queue resolves the first unanswered
//! batch and sends again from there, in order. So a partition never stores a
//! producer's records out of order or twice:
//! - a batch refused for good (too large, no such topic) fails, and the
//!   batches after it are stamped again from its place (it was never stored);
//! - a batch that ran past `delivery_timeout` fails, and the queue no longer
//!   trusts its chain position: the leader's next answer says where the chain
//!   stands;
//! - a leader that answers "out of sequence" says where the producer's chain
//!   stands in its log. A producer that has not yet heard from the leader (a
//!   named producer after a restart) continues from there; in replay mode, it
//!   skips the records the log already holds, after checking by the chain hash
//!   that they are the same records.
//!
//! The driver (the real `Producer`, or the simulation) pushes records, calls
//! [`PartitionSender::poll`] when [`PartitionSender::next_wake`] comes, and
//! feeds answers back with [`PartitionSender::answer`].

use std::collections::VecDeque;
use std::time::Duration;

use crate::chain::{self, MessageId, ProducerId};

/// What shapes a partition's batches and retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendSettings {
    /// A batch is sealed once its records reach this many bytes (`batch.size`).
    pub batch_bytes: usize,
    /// A batch is sealed this long after its first record at the latest (`linger.ms`).
    pub linger: Duration,
    /// Most batches sent and unanswered, counted from the oldest unanswered
    /// one (`max.in.flight.requests.per.connection`): a sliding window.
    pub max_in_flight: usize,
    /// Wait before sending again after a failed attempt (`retry.backoff.ms`).
    pub retry_backoff: Duration,
    /// A record fails once this long has passed since it was pushed without
    /// an answer that it is stored (`delivery.timeout.ms`).
    pub delivery_timeout: Duration,
    /// Attempts after the first before a batch fails (`retries`).
    pub retries: u32,
}

/// Who stamps the batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idempotence {
    /// No stamps: a retry may store a batch twice (at least once).
    Off,
    /// A producer with a fresh identity: its chain starts at the genesis.
    Fresh(ProducerId),
    /// A producer whose identity may already have records in the log: its
    /// chain position is learned from the leader's first answer and new
    /// records continue it.
    Resumed(ProducerId),
    /// As `Resumed`, but the records pushed are the producer's stream from
    /// its first record: those the log already holds (by sequence number) are
    /// skipped. With `verify`, the skipped records must chain to the log's
    /// producer-chain head (identical records, timestamps included), or they
    /// fail as a conflict; without, the chain continues from the log's head.
    Replay {
        /// Who.
        producer: ProducerId,
        /// Check the skipped records by the chain hash.
        verify: bool,
    },
}

/// A record to send.
#[derive(Clone, Debug)]
pub struct Item<R, T> {
    /// What the driver sends.
    pub record: R,
    /// [`chain::record_digest`] of the record.
    pub digest: MessageId,
    /// Its encoded size.
    pub bytes: usize,
    /// What the driver uses to report the record's fate.
    pub token: T,
}

/// A leader's answer to one batch.
#[derive(Clone, Debug)]
pub enum Answer<O, E> {
    /// The batch is stored (now, or earlier for a retry).
    Stored(O),
    /// Not stored this time; the same batch may be sent again.
    Retry(E),
    /// Not stored and never will be.
    Refused(E),
    /// Nothing was stored: these records (by index in the batch) repeat a
    /// dedup key the log already holds, with the original's outcome. The
    /// rest of the batch is sent again without them.
    Duplicates(Vec<(usize, O)>),
    /// The batch's stamp does not fit where the producer's chain stands in
    /// the leader's log: `next_seq` and `head`.
    OutOfSequence {
        /// The sequence the leader expects next from this producer.
        next_seq: u64,
        /// The producer-chain hash at that point.
        head: MessageId,
        /// The refusal, to report if the batch fails.
        error: E,
    },
}

/// Why records failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure<E> {
    /// The leader refused them.
    Refused(E),
    /// `delivery_timeout` passed; `last` is the last refusal, if any. The
    /// records may or may not be stored.
    Expired {
        /// The last answer before the deadline.
        last: Option<E>,
    },
    /// The log holds other records of this producer at these sequence numbers
    /// (a replay that differs from the stored stream, or records older than
    /// the leader remembers).
    Conflict {
        /// The first conflicting sequence.
        seq: u64,
    },
}

/// What the driver must do.
#[derive(Debug)]
pub enum Output<R, T, O, E> {
    /// Send batch `batch` to the partition's leader and report the answer.
    Send {
        /// Names the batch in [`PartitionSender::answer`].
        batch: u64,
        /// Names this attempt in [`PartitionSender::answer`]: only the answer
        /// to the latest attempt counts, except that "stored" always does.
        attempt: u32,
        /// The idempotent stamp, if any.
        stamp: chain::ProducerStamp,
        /// The producer-chain hash before the first record, with the stamp.
        prev: Option<MessageId>,
        /// The records, in order.
        records: Vec<R>,
        /// When the batch's delivery timeout ends: the attempt should be
        /// answered by then.
        deadline: Duration,
    },
    /// These records are stored, as `outcome` says (tokens in batch order).
    Stored {
        /// The records' tokens, in order.
        tokens: Vec<T>,
        /// The leader's answer.
        outcome: O,
        /// The producer's next sequence and chain head after them.
        chain_after: (u64, MessageId),
    },
    /// Replay: these records were already in the log; `seq` is each one's sequence.
    AlreadyStored {
        /// Tokens and sequence numbers.
        tokens: Vec<(T, u64)>,
    },
    /// These records failed.
    Failed {
        /// Their tokens.
        tokens: Vec<T>,
        /// Why.
        failure: Failure<E>,
    },
}

/// A sealed batch awaiting its answer.
#[derive(Debug)]
struct Batch<R, T, O, E> {
    id: u64,
    base_seq: u64,
    prev: MessageId,
    /// The chain after the batch: next sequence and head.
    after: (u64, MessageId),
    /// Whether `base_seq`, `prev` and `after` are set. The stamped batches
    /// are always the first ones of the queue (batches go out in order).
    stamped: bool,
    /// Sends so far.
    attempts: u32,
    items: Vec<Item<R, T>>,
    in_flight: bool,
    /// Whether the batch was first in the queue when last sent: only then does
    /// an "out of sequence" answer tell where the chain stands (answers to
    /// later batches may predate the answers to the batches before them).
    sent_as_front: bool,
    /// The latest refusal since the last settle.
    last: Option<Refusal<O, E>>,
    /// The latest refusal, reported if the batch expires.
    last_error: Option<E>,
    deadline: Duration,
}

#[derive(Clone, Debug)]
enum Refusal<O, E> {
    /// Reached the leader before a batch ahead of it: resend at once, in order.
    Reordered,
    Retry(E),
    Refused(E),
    Duplicates(Vec<(usize, O)>),
    OutOfSequence {
        next_seq: u64,
        head: MessageId,
    },
}

/// The open batch: records not sealed yet.
#[derive(Debug)]
struct Open<R, T> {
    items: Vec<(Item<R, T>, Duration)>,
    bytes: usize,
    since: Duration,
}

/// One producer's queue for one partition. See the module docs.
#[derive(Debug)]
pub struct PartitionSender<R, T, O, E> {
    settings: SendSettings,
    idempotence: Idempotence,
    genesis: MessageId,
    /// The stamp of the next batch to stamp: sequence and chain head.
    next_seq: u64,
    head: MessageId,
    /// False until a leader's answer confirms where the chain stands.
    confirmed: bool,
    /// Replay: the leader's chain position to reach by skipping.
    skip_until: Option<(u64, MessageId)>,
    open: Option<Open<R, T>>,
    batches: VecDeque<Batch<R, T, O, E>>,
    next_batch_id: u64,
    in_flight: usize,
    draining: bool,
    resume_at: Duration,
    _outcome: std::marker::PhantomData<O>,
}

impl<R: Clone, T, O, E: Clone> PartitionSender<R, T, O, E> {
    /// A queue for a partition whose producer chain starts at `genesis`.
    pub fn new(settings: SendSettings, idempotence: Idempotence, genesis: MessageId) -> Self {
        PartitionSender {
            settings,
            idempotence,
            genesis,
            next_seq: 0,
            head: genesis,
            confirmed: matches!(idempotence, Idempotence::Off | Idempotence::Fresh(_)),
            skip_until: None,
            open: None,
            batches: VecDeque::new(),
            next_batch_id: 0,
            in_flight: 0,
            draining: false,
            resume_at: Duration::ZERO,
            _outcome: std::marker::PhantomData,
        }
    }

    /// Adds a record at `now`. Returns what to do (records a replay already
    /// stored are reported at once).
    pub fn push(&mut self, item: Item<R, T>, now: Duration) -> Vec<Output<R, T, O, E>> {
        let mut out = Vec::new();
        if self.skip_until.is_some() && self.open.is_none() && self.batches.is_empty() {
            let mut skipped = Vec::new();
            match self.skip(item, &mut skipped) {
                Ok(None) => {
                    out.push(Output::AlreadyStored { tokens: skipped });
                    return out;
                }
                Ok(Some(item)) => {
                    if !skipped.is_empty() {
                        out.push(Output::AlreadyStored { tokens: skipped });
                    }
                    self.add(item, now);
                }
                Err((item, seq)) => {
                    out.push(Output::Failed {
                        tokens: vec![item.token],
                        failure: Failure::Conflict { seq },
                    });
                    return out;
                }
            }
        } else {
            self.add(item, now);
        }
        out.extend(self.poll(now));
        out
    }

    fn add(&mut self, item: Item<R, T>, now: Duration) {
        let open = self.open.get_or_insert_with(|| Open {
            items: Vec::new(),
            bytes: 0,
            since: now,
        });
        open.bytes += item.bytes;
        open.items.push((item, now));
        if open.bytes >= self.settings.batch_bytes {
            self.seal();
        }
    }

    /// Seals the open batch now (`flush`).
    pub fn seal(&mut self) {
        let Some(open) = self.open.take() else { return };
        let deadline = open
            .items
            .iter()
            .map(|(_, at)| *at)
            .min()
            .unwrap_or(open.since)
            + self.settings.delivery_timeout;
        let items: Vec<Item<R, T>> = open.items.into_iter().map(|(item, _)| item).collect();
        let id = self.next_batch_id;
        self.next_batch_id += 1;
        let batch = Batch {
            id,
            base_seq: 0,
            prev: self.genesis,
            after: (0, self.genesis),
            stamped: false,
            attempts: 0,
            items,
            in_flight: false,
            sent_as_front: false,
            last: None,
            last_error: None,
            deadline,
        };
        self.batches.push_back(batch);
    }

    /// The first batch's place in the chain (first sequence, chain hash
    /// before it), stamped or not.
    fn front_place(&self) -> Option<(u64, MessageId)> {
        let front = self.batches.front()?;
        Some(if front.stamped {
            (front.base_seq, front.prev)
        } else {
            (self.next_seq, self.head)
        })
    }

    fn producer(&self) -> Option<ProducerId> {
        match self.idempotence {
            Idempotence::Off => None,
            Idempotence::Fresh(p)
            | Idempotence::Resumed(p)
            | Idempotence::Replay { producer: p, .. } => Some(p),
        }
    }

    /// Seals batches whose linger ended, resolves a drained failure, fails
    /// expired batches, and sends what the window allows.
    pub fn poll(&mut self, now: Duration) -> Vec<Output<R, T, O, E>> {
        let mut out = Vec::new();
        if self.draining && self.in_flight == 0 {
            self.draining = false;
            self.settle(now, &mut out);
        }
        if !self.draining {
            self.expire(now, &mut out);
            if now >= self.resume_at {
                self.send(&mut out);
                // A lingered batch is sealed only when it can go out at once;
                // until then records keep joining it (up to `batch_bytes`), so
                // a busy partition sends fewer, fuller batches.
                if self
                    .open
                    .as_ref()
                    .is_some_and(|o| now >= o.since + self.settings.linger)
                    && self.window_has_room()
                {
                    self.seal();
                    self.send(&mut out);
                }
            }
        }
        out
    }

    /// Whether a newly sealed batch could be sent now: every sealed batch is
    /// in flight and the window has room for one more.
    fn window_has_room(&self) -> bool {
        let oldest = self.batches.front().map_or(self.next_batch_id, |b| b.id);
        self.batches.iter().all(|b| b.in_flight)
            && self.next_batch_id < oldest + self.settings.max_in_flight as u64
    }

    /// The earliest time at which [`Self::poll`] has something to do, if any.
    pub fn next_wake(&self) -> Option<Duration> {
        // The open batch's linger matters only while it could be sent;
        // otherwise an answer (or the first batch's deadline) comes first.
        let linger = self
            .open
            .as_ref()
            .filter(|_| !self.draining && self.window_has_room())
            .map(|o| (o.since + self.settings.linger).max(self.resume_at));
        let front = self
            .batches
            .front()
            .filter(|b| !b.in_flight && !self.draining)
            .map(|b| b.deadline.min(self.resume_at));
        [linger, front].into_iter().flatten().min()
    }

    /// True when no record is waiting or in flight.
    pub fn is_idle(&self) -> bool {
        self.open.is_none() && self.batches.is_empty()
    }

    /// Records pushed and not yet reported.
    pub fn pending_records(&self) -> usize {
        self.open.as_ref().map_or(0, |o| o.items.len())
            + self.batches.iter().map(|b| b.items.len()).sum::<usize>()
    }

    fn send(&mut self, out: &mut Vec<Output<R, T, O, E>>) {
        let producer = self.producer();
        // A sliding window from the oldest unanswered batch, as Kafka's: a
        // batch is never more than `max_in_flight` batches ahead of one still
        // unanswered, so the leader still remembers the older one when it is
        // retried (it keeps the last batches of each producer).
        let Some(oldest) = self.batches.front().map(|b| b.id) else {
            return;
        };
        let window_end = oldest + self.settings.max_in_flight as u64;
        let (next_seq, head) = (&mut self.next_seq, &mut self.head);
        for (index, batch) in self.batches.iter_mut().enumerate() {
            if batch.id >= window_end {
                break;
            }
            if batch.in_flight {
                continue;
            }
            if !batch.stamped {
                stamp(next_seq, head, producer, batch);
            }
            batch.in_flight = true;
            batch.sent_as_front = index == 0;
            batch.attempts += 1;
            self.in_flight += 1;
            out.push(Output::Send {
                batch: batch.id,
                attempt: batch.attempts,
                stamp: producer.map(|p| (p, batch.base_seq)),
                prev: producer.map(|_| batch.prev),
                records: batch.items.iter().map(|i| i.record.clone()).collect(),
                deadline: batch.deadline,
            });
        }
    }

    /// The leader's answer to attempt `attempt` of batch `batch`. Answers
    /// to batches already answered, and refusals of earlier attempts (a
    /// network that delivered a request twice), are ignored.
    pub fn answer(
        &mut self,
        batch: u64,
        attempt: u32,
        answer: Answer<O, E>,
        now: Duration,
    ) -> Vec<Output<R, T, O, E>> {
        let mut out = Vec::new();
        let Some(index) = self.batches.iter().position(|b| b.id == batch) else {
            return out;
        };
        let current = self.batches[index].in_flight && self.batches[index].attempts == attempt;
        if !current && !matches!(answer, Answer::Stored(_)) {
            return out;
        }
        if self.batches[index].in_flight {
            self.batches[index].in_flight = false;
            self.in_flight -= 1;
        }
        match answer {
            Answer::Stored(outcome) => {
                if let Some(done) = self.batches.remove(index) {
                    self.confirmed = true;
                    out.push(Output::Stored {
                        tokens: done.items.into_iter().map(|i| i.token).collect(),
                        outcome,
                        chain_after: done.after,
                    });
                }
            }
            Answer::Retry(e) => self.refused(index, Refusal::Retry(e)),
            Answer::Duplicates(duplicates) => {
                let refusal = if self.batches[index].sent_as_front {
                    Refusal::Duplicates(duplicates)
                } else {
                    Refusal::Reordered
                };
                self.refused(index, refusal);
            }
            Answer::Refused(e) => self.refused(index, Refusal::Refused(e)),
            Answer::OutOfSequence {
                next_seq,
                head,
                error,
            } => {
                if self.producer().is_none() {
                    self.refused(index, Refusal::Refused(error));
                } else if !self.batches[index].sent_as_front {
                    // Overtook a batch ahead of it (or its answer predates
                    // theirs): nothing is wrong with the leader.
                    self.refused(index, Refusal::Reordered);
                } else {
                    self.refused(index, Refusal::OutOfSequence { next_seq, head });
                }
            }
        }
        out.extend(self.poll(now));
        out
    }

    fn refused(&mut self, index: usize, refusal: Refusal<O, E>) {
        if let Refusal::Retry(e) | Refusal::Refused(e) = &refusal {
            self.batches[index].last_error = Some(e.clone());
        }
        self.batches[index].last = Some(refusal);
        self.draining = true;
    }

    /// Nothing is in flight after a refusal: decide from the first batch's
    /// last answer what happens to it and to the batches after it.
    fn settle(&mut self, now: Duration, out: &mut Vec<Output<R, T, O, E>>) {
        let Some(front) = self.batches.front_mut() else {
            return;
        };
        let last = front.last.take();
        let attempts = front.attempts;
        for batch in self.batches.iter_mut() {
            batch.last.take();
        }
        match last {
            Some(Refusal::Refused(error)) => {
                let Some((seq, head)) = self.front_place() else {
                    return;
                };
                let Some(front) = self.batches.pop_front() else {
                    return;
                };
                out.push(Output::Failed {
                    tokens: front.items.into_iter().map(|i| i.token).collect(),
                    failure: Failure::Refused(error),
                });
                self.restamp_from(seq, head);
            }
            Some(Refusal::OutOfSequence { next_seq, head }) => {
                self.resync(next_seq, head, out);
            }
            Some(Refusal::Duplicates(duplicates)) => self.drop_duplicates(duplicates, out),
            Some(Refusal::Retry(_)) => {
                if attempts > self.settings.retries {
                    self.give_up_front(out);
                }
                self.resume_at = now + self.settings.retry_backoff;
            }
            // The first batch was not refused (only batches after it were
            // reordered, or it never went out): send again at once.
            Some(Refusal::Reordered) | None => {}
        }
    }

    /// Reports the first batch's duplicates as stored (where the originals
    /// are), and stamps the rest of it and the batches after it again from
    /// its place: nothing of it was stored.
    fn drop_duplicates(
        &mut self,
        mut duplicates: Vec<(usize, O)>,
        out: &mut Vec<Output<R, T, O, E>>,
    ) {
        let Some((seq, head)) = self.front_place() else {
            return;
        };
        let Some(front) = self.batches.front_mut() else {
            return;
        };
        duplicates.sort_by_key(|(index, _)| std::cmp::Reverse(*index));
        duplicates.dedup_by_key(|(index, _)| *index);
        let mut reported = Vec::new();
        for (index, outcome) in duplicates {
            if index < front.items.len() {
                let item = front.items.remove(index);
                reported.push(Output::Stored {
                    tokens: vec![item.token],
                    outcome,
                    chain_after: (seq, head),
                });
            }
        }
        reported.reverse();
        out.extend(reported);
        if front.items.is_empty() {
            self.batches.pop_front();
        }
        self.restamp_from(seq, head);
    }

    /// The leader's log says the producer's chain stands at (`next_seq`, `head`).
    fn resync(&mut self, next_seq: u64, head: MessageId, out: &mut Vec<Output<R, T, O, E>>) {
        let Some((base_seq, prev)) = self.front_place() else {
            return;
        };
        if next_seq == base_seq && head == prev {
            // It fits after all (the log moved on since): just send again.
            return;
        }
        let replay = matches!(self.idempotence, Idempotence::Replay { .. });
        if replay && next_seq > base_seq {
            self.skip_stored(next_seq, head, out);
            return;
        }
        if next_seq > base_seq && self.confirmed {
            // The log holds records of ours this queue thinks unsent, older
            // than the leader remembers batches: fail the batch instead of
            // guessing.
            if let Some(front) = self.batches.pop_front() {
                out.push(Output::Failed {
                    tokens: front.items.into_iter().map(|i| i.token).collect(),
                    failure: Failure::Conflict { seq: base_seq },
                });
            }
        }
        // Continue the chain where the log has it (a resumed identity, a
        // chain that expired, or acknowledged records the log lost).
        self.confirmed = true;
        self.restamp_from(next_seq, head);
    }

    /// Replay: reports the pending records below `next_seq` as already stored,
    /// checking that they chain to `head`, and stamps the rest after them.
    fn skip_stored(&mut self, next_seq: u64, head: MessageId, out: &mut Vec<Output<R, T, O, E>>) {
        self.confirmed = true;
        self.seal();
        // Rewind the chain to the front batch and walk forward item by item.
        if let Some((seq, head)) = self.front_place() {
            self.next_seq = seq;
            self.head = head;
        }
        self.skip_until = Some((next_seq, head));
        let mut skipped = Vec::new();
        let mut kept: VecDeque<Batch<R, T, O, E>> = VecDeque::new();
        let batches = std::mem::take(&mut self.batches);
        let mut conflict: Option<(Vec<T>, u64)> = None;
        for mut batch in batches {
            if let Some((tokens, _)) = conflict.as_mut() {
                tokens.extend(batch.items.into_iter().map(|i| i.token));
                continue;
            }
            let mut rest = Vec::new();
            for item in batch.items.drain(..) {
                if let Some((tokens, _)) = conflict.as_mut() {
                    tokens.push(item.token);
                    continue;
                }
                if !rest.is_empty() || self.skip_until.is_none() {
                    rest.push(item);
                    continue;
                }
                match self.skip(item, &mut skipped) {
                    Ok(None) => {}
                    Ok(Some(item)) => rest.push(item),
                    Err((item, seq)) => conflict = Some((vec![item.token], seq)),
                }
            }
            if !rest.is_empty() {
                batch.items = rest;
                kept.push_back(batch);
            }
        }
        if !skipped.is_empty() {
            out.push(Output::AlreadyStored { tokens: skipped });
        }
        if let Some((mut tokens, seq)) = conflict {
            tokens.extend(kept.into_iter().flat_map(|b| b.items).map(|i| i.token));
            if let Some(open) = self.open.take() {
                tokens.extend(open.items.into_iter().map(|(i, _)| i.token));
            }
            out.push(Output::Failed {
                tokens,
                failure: Failure::Conflict { seq },
            });
            // The stream differs from the log's: later records continue the log's chain.
            self.skip_until = None;
            (self.next_seq, self.head) = (next_seq, head);
            return;
        }
        self.batches = kept;
        let (seq, head) = (self.next_seq, self.head);
        self.restamp_from(seq, head);
    }

    /// Replay: `Ok(None)` when `item` is below the log's chain position
    /// (reported in `skipped`), `Ok(Some(item))` once the position is reached
    /// and matches, `Err` when the chain there differs.
    #[allow(clippy::type_complexity)]
    fn skip(
        &mut self,
        item: Item<R, T>,
        skipped: &mut Vec<(T, u64)>,
    ) -> Result<Option<Item<R, T>>, (Item<R, T>, u64)> {
        let Some((until, head)) = self.skip_until else {
            return Ok(Some(item));
        };
        let Some(producer) = self.producer() else {
            return Ok(Some(item));
        };
        if self.next_seq >= until {
            self.skip_until = None;
            return Ok(Some(item));
        }
        let verify = matches!(self.idempotence, Idempotence::Replay { verify: true, .. });
        let mut after = chain::producer_link(&self.head, producer, self.next_seq, &item.digest);
        if self.next_seq + 1 == until && after != head {
            if verify {
                // The records skipped up to here are not the ones the log holds.
                return Err((item, self.next_seq));
            }
            after = head;
        }
        self.head = after;
        skipped.push((item.token, self.next_seq));
        self.next_seq += 1;
        Ok(None)
    }

    /// Stamps the stamped batches again from (`seq`, `head`), in order, and
    /// the chain continues after them (the others are stamped when they go out).
    fn restamp_from(&mut self, seq: u64, head: MessageId) {
        self.next_seq = seq;
        self.head = head;
        let producer = self.producer();
        let (next_seq, head) = (&mut self.next_seq, &mut self.head);
        for batch in self.batches.iter_mut().take_while(|b| b.stamped) {
            stamp(next_seq, head, producer, batch);
        }
    }

    /// Fails the first batch (out of retries or time); the batches after it
    /// take its place in the chain.
    fn give_up_front(&mut self, out: &mut Vec<Output<R, T, O, E>>) {
        if let Some(place) = self.fail_front(out) {
            self.restamp_after_failure(place);
        }
    }

    /// Fails the first batches while their delivery timeout has passed.
    /// The batches after them are stamped again once, from the first failed
    /// one's place: stamping again after each would cost the whole queue per
    /// failed batch, and a long queue expiring would take minutes.
    fn expire(&mut self, now: Duration, out: &mut Vec<Output<R, T, O, E>>) {
        let mut first_place = None;
        while self
            .batches
            .front()
            .is_some_and(|front| !front.in_flight && now >= front.deadline)
        {
            let place = self.fail_front(out);
            first_place = first_place.or(place);
        }
        if let Some(place) = first_place {
            self.restamp_after_failure(place);
        }
    }

    /// Removes the first batch and fails its records; returns its place in
    /// the chain (first sequence, chain hash before it).
    fn fail_front(&mut self, out: &mut Vec<Output<R, T, O, E>>) -> Option<(u64, MessageId)> {
        let place = self.front_place()?;
        let front = self.batches.pop_front()?;
        out.push(Output::Failed {
            tokens: front.items.into_iter().map(|i| i.token).collect(),
            failure: Failure::Expired {
                last: front.last_error,
            },
        });
        Some(place)
    }

    /// The batches left take the failed ones' place, from `(seq, head)`.
    fn restamp_after_failure(&mut self, (seq, head): (u64, MessageId)) {
        // The failed batches may have been stored: the next answer says
        // where the chain is.
        if self.producer().is_some() {
            self.confirmed = false;
        }
        self.restamp_from(seq, head);
    }
}

/// Gives `batch` the stamp at (`next_seq`, `head`) and advances them past it.
fn stamp<R, T, O, E>(
    next_seq: &mut u64,
    head: &mut MessageId,
    producer: Option<ProducerId>,
    batch: &mut Batch<R, T, O, E>,
) {
    batch.base_seq = *next_seq;
    batch.prev = *head;
    if let Some(producer) = producer {
        for item in &batch.items {
            *head = chain::producer_link(head, producer, *next_seq, &item.digest);
            *next_seq += 1;
        }
    } else {
        *next_seq += batch.items.len() as u64;
    }
    batch.after = (*next_seq, *head);
    batch.stamped = true;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::rng::Rng;

    type Sender = PartitionSender<u64, u64, u64, &'static str>;
    type Out = Output<u64, u64, u64, &'static str>;

    const PRODUCER: ProducerId = ProducerId(7);

    fn settings() -> SendSettings {
        SendSettings {
            batch_bytes: 30,
            linger: Duration::from_millis(5),
            max_in_flight: 3,
            retry_backoff: Duration::from_millis(10),
            delivery_timeout: Duration::from_secs(60),
            retries: u32::MAX,
        }
    }

    fn digest(value: u64) -> MessageId {
        MessageId(*blake3::hash(&value.to_le_bytes()).as_bytes())
    }

    fn item(value: u64) -> Item<u64, u64> {
        Item {
            record: value,
            digest: digest(value),
            bytes: 10,
            token: value,
        }
    }

    fn genesis() -> MessageId {
        MessageId([0; 32])
    }

    fn sends(out: &[Out]) -> Vec<(u64, u64, Vec<u64>)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send {
                    batch,
                    stamp,
                    records,
                    ..
                } => Some((*batch, stamp.map_or(0, |s| s.1), records.clone())),
                _ => None,
            })
            .collect()
    }

    /// A partition leader as the store models it: idempotent producer state
    /// with the last batches remembered, and a log of (seq, value).
    #[derive(Default)]
    struct Leader {
        log: Vec<(u64, u64)>,
        next_seq: u64,
        head: Option<MessageId>,
        recent: Vec<(u64, usize, u64)>,
    }

    impl Leader {
        fn handle(
            &mut self,
            stamp: (ProducerId, u64),
            prev: MessageId,
            records: &[u64],
        ) -> Answer<u64, &'static str> {
            let head = self.head.unwrap_or_else(genesis);
            let (_, base) = stamp;
            if base == self.next_seq && prev == head {
                let offset = self.log.len() as u64;
                let mut h = head;
                for (i, v) in records.iter().enumerate() {
                    h = chain::producer_link(&h, PRODUCER, base + i as u64, &digest(*v));
                    self.log.push((base + i as u64, *v));
                }
                self.head = Some(h);
                self.next_seq += records.len() as u64;
                self.recent.push((base, records.len(), offset));
                return Answer::Stored(offset);
            }
            if base < self.next_seq
                && let Some(r) = self
                    .recent
                    .iter()
                    .find(|r| r.0 == base && r.1 == records.len())
            {
                // As the real leader: the retry must end at the same
                // producer-chain hash as the stored batch.
                let end = r.2 as usize + r.1;
                let stored_after = self.log[..end].iter().fold(genesis(), |h, (seq, v)| {
                    chain::producer_link(&h, PRODUCER, *seq, &digest(*v))
                });
                let retry_after = records.iter().enumerate().fold(prev, |h, (i, v)| {
                    chain::producer_link(&h, PRODUCER, base + i as u64, &digest(*v))
                });
                if stored_after != retry_after {
                    // As the real leader: where the chain stands.
                    return Answer::OutOfSequence {
                        next_seq: self.next_seq,
                        head,
                        error: "out of sequence",
                    };
                }
                return Answer::Stored(r.2);
            }
            Answer::OutOfSequence {
                next_seq: self.next_seq,
                head,
                error: "out of sequence",
            }
        }

        /// Drops the log from `len` on (a new leader without the suffix).
        fn truncate(&mut self, len: usize) {
            self.recent.retain(|r| r.2 as usize + r.1 <= len);
            let len = self
                .recent
                .iter()
                .map(|r| r.2 as usize + r.1)
                .max()
                .unwrap_or(0);
            self.log.truncate(len);
            self.next_seq = self.log.last().map_or(0, |l| l.0 + 1);
            let mut h = genesis();
            for (seq, v) in &self.log {
                h = chain::producer_link(&h, PRODUCER, *seq, &digest(*v));
            }
            self.head = Some(h);
        }
    }

    #[test]
    fn batches_seal_by_size_and_by_linger() {
        let mut q = Sender::new(settings(), Idempotence::Fresh(PRODUCER), genesis());
        let t0 = Duration::ZERO;
        assert!(sends(&q.push(item(1), t0)).is_empty());
        assert!(sends(&q.push(item(2), t0)).is_empty());
        let out = q.push(item(3), t0);
        assert_eq!(
            sends(&out),
            vec![(0, 0, vec![1, 2, 3])],
            "30 bytes seal a batch"
        );
        q.push(item(4), t0);
        assert_eq!(q.next_wake(), Some(Duration::from_millis(5)));
        assert!(sends(&q.poll(Duration::from_millis(4))).is_empty());
        let out = q.poll(Duration::from_millis(5));
        assert_eq!(sends(&out), vec![(1, 3, vec![4])], "linger seals the rest");
    }

    #[test]
    fn the_window_bounds_batches_in_flight() {
        let mut q = Sender::new(settings(), Idempotence::Fresh(PRODUCER), genesis());
        let mut sent = Vec::new();
        for v in 0..15 {
            sent.extend(sends(&q.push(item(v), Duration::ZERO)));
        }
        assert_eq!(sent.len(), 3, "max_in_flight = 3");
        let out = q.answer(sent[0].0, 1, Answer::Stored(0), Duration::ZERO);
        assert_eq!(sends(&out).len(), 1, "one answer frees one slot");
        assert!(matches!(&out[0], Output::Stored { tokens, .. } if tokens == &vec![0, 1, 2]));
    }

    #[test]
    fn a_retry_resends_the_same_batches_in_order_after_draining() {
        let mut q = Sender::new(settings(), Idempotence::Fresh(PRODUCER), genesis());
        let mut sent = Vec::new();
        for v in 0..9 {
            sent.extend(sends(&q.push(item(v), Duration::ZERO)));
        }
        let t = Duration::from_millis(1);
        assert!(sends(&q.answer(sent[0].0, 1, Answer::Retry("timeout"), t)).is_empty());
        assert!(
            sends(&q.answer(sent[2].0, 1, Answer::Stored(6), t)).is_empty(),
            "draining"
        );
        let wake = q.answer(sent[1].0, 1, Answer::Retry("not leader"), t);
        assert!(sends(&wake).is_empty(), "backoff first");
        let again = sends(&q.poll(t + Duration::from_millis(10)));
        assert_eq!(
            again,
            vec![sent[0].clone(), sent[1].clone()],
            "same stamps, same order"
        );
    }

    #[test]
    fn a_refused_batch_fails_and_the_next_takes_its_place_in_the_chain() {
        let mut q = Sender::new(settings(), Idempotence::Fresh(PRODUCER), genesis());
        let mut sent = Vec::new();
        for v in 0..6 {
            sent.extend(sends(&q.push(item(v), Duration::ZERO)));
        }
        let t = Duration::from_millis(1);
        q.answer(
            sent[1].0,
            1,
            Answer::OutOfSequence {
                next_seq: 0,
                head: genesis(),
                error: "gap",
            },
            t,
        );
        let out = q.answer(sent[0].0, 1, Answer::Refused("too large"), t);
        assert!(
            matches!(&out[0], Output::Failed { tokens, failure: Failure::Refused("too large") } if tokens == &vec![0, 1, 2])
        );
        let again = sends(&out);
        assert_eq!(
            again,
            vec![(sent[1].0, 0, vec![3, 4, 5])],
            "restamped at sequence 0"
        );
    }

    #[test]
    fn duplicates_are_reported_where_the_originals_are_and_the_rest_is_sent_again() {
        let mut q = Sender::new(settings(), Idempotence::Fresh(PRODUCER), genesis());
        let mut sent = Vec::new();
        for v in 0..3 {
            sent.extend(sends(&q.push(item(v), Duration::ZERO)));
        }
        let t = Duration::from_millis(1);
        let out = q.answer(sent[0].0, 1, Answer::Duplicates(vec![(1, 42)]), t);
        assert!(
            matches!(&out[0], Output::Stored { tokens, outcome: 42, .. } if tokens == &vec![1]),
            "{out:?}"
        );
        assert_eq!(
            sends(&out),
            vec![(sent[0].0, 0, vec![0, 2])],
            "the rest, from sequence 0"
        );
    }

    #[test]
    fn records_expire_after_the_delivery_timeout() {
        let mut s = settings();
        s.delivery_timeout = Duration::from_millis(100);
        let mut q = Sender::new(s, Idempotence::Fresh(PRODUCER), genesis());
        let sent = sends(&q.push(item(1), Duration::ZERO));
        let sent = [sent, sends(&q.poll(Duration::from_millis(5)))].concat();
        let mut out = q.answer(
            sent[0].0,
            1,
            Answer::Retry("timeout"),
            Duration::from_millis(100),
        );
        out.extend(q.poll(Duration::from_millis(100)));
        assert!(
            matches!(&out[0], Output::Failed { tokens, failure: Failure::Expired { last: Some("timeout") } } if tokens == &vec![1])
        );
        assert!(q.is_idle());
    }

    #[test]
    fn a_long_queue_expires_at_once_and_the_next_record_takes_the_first_place() {
        let mut s = settings();
        s.delivery_timeout = Duration::from_millis(100);
        let mut q = Sender::new(s, Idempotence::Fresh(PRODUCER), genesis());
        // 10,000 batches of 3: the window sends 3, the rest wait unstamped.
        let mut sent = Vec::new();
        for v in 0..30_000 {
            sent.extend(sends(&q.push(item(v), Duration::ZERO)));
        }
        assert_eq!(sent.len(), 3);
        let late = Duration::from_millis(200);
        let mut out = Vec::new();
        for (batch, _, _) in &sent {
            out.extend(q.answer(*batch, 1, Answer::Retry("timeout"), late));
        }
        out.extend(q.poll(late));
        let failed: usize = out
            .iter()
            .map(|o| match o {
                Output::Failed {
                    tokens,
                    failure: Failure::Expired { .. },
                } => tokens.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(failed, 30_000, "every queued record expired");
        assert!(q.is_idle());
        let next = sends(&q.push(item(7), late + Duration::from_millis(10)));
        let next = [next, sends(&q.poll(late + Duration::from_millis(20)))].concat();
        assert_eq!(
            next,
            vec![(next[0].0, 0, vec![7])],
            "from the first failed place"
        );
    }

    #[test]
    fn a_resumed_identity_continues_the_chain_the_log_holds() {
        let mut leader = Leader::default();
        let mut first = Sender::new(settings(), Idempotence::Fresh(PRODUCER), genesis());
        let sent = sends(&first.push(item(1), Duration::ZERO));
        let sent = [sent, sends(&first.poll(Duration::from_millis(5)))].concat();
        let (_, seq, records) = &sent[0];
        assert!(matches!(
            leader.handle((PRODUCER, *seq), genesis(), records),
            Answer::Stored(0)
        ));

        let mut resumed = Sender::new(settings(), Idempotence::Resumed(PRODUCER), genesis());
        drive(&mut resumed, &mut leader, &[2, 3], &mut Rng::new(1), false);
        assert_eq!(leader.log, vec![(0, 1), (1, 2), (2, 3)]);
    }

    #[test]
    fn a_replay_skips_what_the_log_holds_and_sends_the_rest() {
        let mut leader = Leader::default();
        let mut first = Sender::new(
            settings(),
            Idempotence::Replay {
                producer: PRODUCER,
                verify: true,
            },
            genesis(),
        );
        let done = drive(
            &mut first,
            &mut leader,
            &[1, 2, 3, 4, 5],
            &mut Rng::new(2),
            false,
        );
        assert_eq!(done.stored.len(), 5);
        let mut again = Sender::new(
            settings(),
            Idempotence::Replay {
                producer: PRODUCER,
                verify: true,
            },
            genesis(),
        );
        let done = drive(
            &mut again,
            &mut leader,
            &(1..=12).collect::<Vec<_>>(),
            &mut Rng::new(3),
            false,
        );
        let values: Vec<u64> = leader.log.iter().map(|l| l.1).collect();
        assert_eq!(values, (1..=12).collect::<Vec<_>>());
        assert_eq!(done.stored.len() + done.skipped.len(), 12);
        assert!(
            done.skipped.len() >= 2,
            "at least the records beyond the leader's window were skipped"
        );

        // A replay that differs is caught where it reaches the log's
        // position (records before it were already reported, unverified).
        let mut differs = Sender::new(
            settings(),
            Idempotence::Replay {
                producer: PRODUCER,
                verify: true,
            },
            genesis(),
        );
        let mut input: Vec<u64> = (1..=14).collect();
        input[2] = 99;
        let done = drive(&mut differs, &mut leader, &input, &mut Rng::new(4), false);
        assert!(
            done.failed.contains(&12) && done.failed.contains(&14),
            "a replay that differs is refused: {:?}",
            done.failed
        );
        let values: Vec<u64> = leader.log.iter().map(|l| l.1).collect();
        assert_eq!(values, (1..=12).collect::<Vec<_>>(), "and stores nothing");
    }

    #[derive(Default, Debug)]
    struct Done {
        stored: Vec<u64>,
        skipped: Vec<u64>,
        failed: Vec<u64>,
    }

    /// Pushes `values` and runs the queue against `leader` until it is idle:
    /// answers come back in random order, and with `faults` some are lost
    /// (stored or not), and the leader sometimes loses its unacknowledged suffix.
    fn drive(
        q: &mut Sender,
        leader: &mut Leader,
        values: &[u64],
        rng: &mut Rng,
        faults: bool,
    ) -> Done {
        let mut now = Duration::ZERO;
        let mut wire: Vec<Wire> = Vec::new();
        let mut done = Done::default();
        let mut acked_len = 0usize;
        let mut outputs = Vec::new();
        for v in values {
            outputs.extend(q.push(item(*v), now));
            now += Duration::from_micros(rng.below(3000) as u64);
            outputs.extend(q.poll(now));
            absorb(&mut outputs, &mut wire, &mut done);
        }
        for _ in 0..100_000 {
            absorb(&mut outputs, &mut wire, &mut done);
            if q.is_idle() {
                break;
            }
            if wire.is_empty() {
                now = q.next_wake().unwrap_or(now).max(now);
                outputs.extend(q.poll(now));
                continue;
            }
            let (batch, attempt, seq, prev, records) = wire.remove(rng.below(wire.len()));
            now += Duration::from_micros(200);
            if faults && rng.below(10) == 0 {
                if rng.below(2) == 0 {
                    leader.handle((PRODUCER, seq), prev.unwrap_or_else(genesis), &records);
                }
                outputs.extend(q.answer(batch, attempt, Answer::Retry("lost"), now));
                continue;
            }
            if faults && rng.below(20) == 0 {
                leader.truncate(acked_len.max(leader.log.len().saturating_sub(rng.below(4))));
            }
            let answer = leader.handle((PRODUCER, seq), prev.unwrap_or_else(genesis), &records);
            if let Answer::Stored(offset) = answer {
                acked_len = acked_len.max(offset as usize + records.len());
            }
            outputs.extend(q.answer(batch, attempt, answer, now));
        }
        absorb(&mut outputs, &mut wire, &mut done);
        assert!(q.is_idle(), "the queue finishes");
        done
    }

    /// A request on the wire: batch, attempt, first sequence, prev, records.
    type Wire = (u64, u32, u64, Option<MessageId>, Vec<u64>);

    fn absorb(outputs: &mut Vec<Out>, wire: &mut Vec<Wire>, done: &mut Done) {
        for o in outputs.drain(..) {
            match o {
                Output::Send {
                    batch,
                    attempt,
                    stamp,
                    prev,
                    records,
                    ..
                } => wire.push((batch, attempt, stamp.map_or(0, |s| s.1), prev, records)),
                Output::Stored { tokens, .. } => done.stored.extend(tokens),
                Output::AlreadyStored { tokens } => {
                    done.skipped.extend(tokens.into_iter().map(|t| t.0))
                }
                Output::Failed { tokens, .. } => done.failed.extend(tokens),
            }
        }
    }

    #[test]
    fn under_lost_answers_reordering_and_lost_suffixes_the_log_never_duplicates_or_reorders() {
        for seed in 0..300 {
            let mut rng = Rng::new(seed);
            let mut leader = Leader::default();
            let mut q = Sender::new(settings(), Idempotence::Fresh(PRODUCER), genesis());
            let values: Vec<u64> = (0..200).collect();
            let done = drive(&mut q, &mut leader, &values, &mut rng, true);
            let stored: Vec<u64> = leader.log.iter().map(|l| l.1).collect();
            let mut sorted = stored.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(
                stored, sorted,
                "seed {seed}: the log holds each record once, in send order"
            );
            for (i, (seq, _)) in leader.log.iter().enumerate() {
                assert_eq!(*seq, i as u64, "seed {seed}: sequences run on");
            }
            assert_eq!(
                done.stored.len() + done.failed.len(),
                values.len(),
                "seed {seed}: every record reported"
            );
            for v in &done.stored {
                assert!(
                    stored.contains(v),
                    "seed {seed}: acknowledged record {v} is in the log"
                );
            }
            assert!(
                done.failed.len() < values.len() / 2,
                "seed {seed}: faults are retried, not failed"
            );
        }
    }
}
