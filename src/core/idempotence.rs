//! Idempotent producers, as one partition replica decides about them.
//!
//! A producer stamps each batch with its id, the sequence number of its first
//! record and the producer-chain hash before it ([`ProducerBatch`]). The log
//! keeps, per producer and partition, a [`ProducerState`]: the next sequence,
//! the chain head and its most recent batches. Against it a batch is the
//! next one ([`SequenceCheck::Next`]), a retry of a remembered one
//! ([`SequenceCheck::Retry`], answered with the original's offsets, never
//! stored twice), or refused ([`SequenceError`]).
//!
//! [`ProducerTable`] is what a replica knows of its producers as of its
//! in-memory log end, ahead of the store: states are loaded from the store on
//! a producer's first batch, then advanced by every batch that enters the log
//! (the leader's own and a follower's alike, so a retry after failover is
//! recognised), rolled back when the log is cut, and dropped when the log
//! restarts at a leader's log start. Batches in the log but not yet in the
//! store are remembered until the store confirms them, so a state loaded
//! meanwhile is brought up to the log end.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::chain::{MessageId, ProducerId};
use crate::wire::ProducerBatch;

/// How many of a producer's recent batches the log remembers for retries.
/// Kafka remembers 5; a retry older than this is refused as stale.
pub const PRODUCER_WINDOW_BATCHES: usize = 64;

/// How long the log keeps the state of a producer that stopped writing to a
/// partition: one day, Kafka's `producer.id.expiration.ms`. A producer that
/// comes back later starts its chain over (sequence 0, producer genesis).
/// Measured on record timestamps, since the store has no clock of its own: a
/// producer that writes records stamped more than a day in the past sees one
/// sequence gap after a retention run, then starts over.
pub const PRODUCER_EXPIRATION_MS: i64 = 24 * 3600 * 1000;

/// What the log knows of one idempotent producer in one partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerState {
    /// The sequence its next batch must start at.
    pub next_seq: u64,
    /// Its producer-chain head: the hash after its last appended record.
    pub head: MessageId,
    /// Its most recent batches, oldest first, to answer retries with the original offsets.
    pub recent: VecDeque<RecentBatch>,
    /// The newest record timestamp it wrote here (ms): the state expires
    /// [`PRODUCER_EXPIRATION_MS`] after it.
    pub last_timestamp: i64,
}

/// One remembered producer batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentBatch {
    /// Its first sequence.
    pub base_seq: u64,
    /// How many records it held.
    pub count: u32,
    /// Where it was appended.
    pub base_offset: u64,
    /// The producer-chain hash before it, to roll the state back to it.
    pub prev: MessageId,
}

/// What an idempotent batch is, against the producer's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceCheck {
    /// The next batch in sequence, extending the producer chain.
    Next,
    /// A retry of this remembered batch (its records still to be compared).
    Retry(RecentBatch),
}

/// Why an idempotent batch does not fit its producer's state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    /// The batch starts past the next sequence: records in between are missing.
    #[error("producer {producer}: sequence gap (expected {expected}, got {found})")]
    Gap {
        /// The producer.
        producer: ProducerId,
        /// The sequence expected next.
        expected: u64,
        /// The batch's first sequence.
        found: u64,
    },
    /// The batch is next in sequence but does not extend the producer chain.
    #[error("producer {producer}: batch at sequence {seq} does not extend the producer chain")]
    ChainMismatch {
        /// The producer.
        producer: ProducerId,
        /// The batch's first sequence.
        seq: u64,
    },
    /// The batch is below the next sequence and is not a remembered batch.
    #[error("producer {producer}: sequence {seq} is older than the batches remembered")]
    Stale {
        /// The producer.
        producer: ProducerId,
        /// The batch's first sequence.
        seq: u64,
    },
}

impl ProducerState {
    /// Checks a batch of `count` records stamped `pb` against `state` (`None`:
    /// the producer has written nothing here; its chain starts at `genesis`).
    /// Gaps, chain mismatches and retries too old to look up are errors.
    pub fn check(
        state: Option<&ProducerState>,
        genesis: MessageId,
        pb: &ProducerBatch,
        count: usize,
    ) -> Result<SequenceCheck, SequenceError> {
        let (next_seq, head) = state.map_or((0, genesis), |s| (s.next_seq, s.head));
        if pb.base_seq > next_seq {
            return Err(SequenceError::Gap {
                producer: pb.producer,
                expected: next_seq,
                found: pb.base_seq,
            });
        }
        if pb.base_seq == next_seq {
            if pb.prev != head {
                return Err(SequenceError::ChainMismatch {
                    producer: pb.producer,
                    seq: pb.base_seq,
                });
            }
            return Ok(SequenceCheck::Next);
        }
        state
            .and_then(|s| {
                s.recent
                    .iter()
                    .find(|b| b.base_seq == pb.base_seq && b.count as usize == count)
            })
            .map(|b| SequenceCheck::Retry(*b))
            .ok_or(SequenceError::Stale {
                producer: pb.producer,
                seq: pb.base_seq,
            })
    }

    /// The state after a batch of `count` records that started as `first`, was
    /// stored at `base_offset`, and left the producer chain at `after`.
    pub fn advanced(
        state: Option<ProducerState>,
        first: &ProducerBatch,
        after: &ProducerBatch,
        base_offset: u64,
        count: u32,
        newest_timestamp: i64,
    ) -> ProducerState {
        let mut state = state.unwrap_or(ProducerState {
            next_seq: 0,
            head: after.prev,
            recent: VecDeque::new(),
            last_timestamp: newest_timestamp,
        });
        state.next_seq = after.base_seq;
        state.head = after.prev;
        state.last_timestamp = state.last_timestamp.max(newest_timestamp);
        state.recent.push_back(RecentBatch {
            base_seq: first.base_seq,
            count,
            base_offset,
            prev: first.prev,
        });
        if state.recent.len() > PRODUCER_WINDOW_BATCHES {
            state.recent.pop_front();
        }
        state
    }

    /// The state as it was before any batch at or after `offset`; `None` when
    /// that is before everything remembered (the producer starts over).
    pub fn rolled_back_to(&self, offset: u64) -> Option<ProducerState> {
        let keep = self
            .recent
            .iter()
            .take_while(|b| b.base_offset < offset)
            .count();
        if keep == self.recent.len() {
            return Some(self.clone());
        }
        let first_cut = self.recent[keep];
        if keep == 0 && first_cut.base_seq > 0 {
            // Batches before the first cut one are not remembered: the state
            // before it is unknown, except that a producer at sequence 0 had none.
            return None;
        }
        Some(ProducerState {
            next_seq: first_cut.base_seq,
            head: first_cut.prev,
            recent: self.recent.iter().take(keep).copied().collect(),
            last_timestamp: self.last_timestamp,
        })
    }
}

/// How one batch moves its idempotent producer's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerStep {
    /// The batch's stamp.
    pub first: ProducerBatch,
    /// The producer-chain hash after it.
    pub after: MessageId,
    /// Its newest record timestamp.
    pub newest: i64,
}

impl ProducerStep {
    /// The state after this step, from `state`, for a batch of `count`
    /// records stored at `base_offset`.
    fn apply(&self, state: Option<ProducerState>, base_offset: u64, count: u32) -> ProducerState {
        let after = ProducerBatch {
            producer: self.first.producer,
            base_seq: self.first.base_seq + u64::from(count),
            prev: self.after,
        };
        ProducerState::advanced(state, &self.first, &after, base_offset, count, self.newest)
    }
}

/// A batch entering the log, as the producer table sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchProducer {
    /// Written without a producer stamp.
    Unstamped,
    /// Stamped by a producer this table does not track (its step was not computed).
    Untracked(ProducerId),
    /// Stamped by a tracked producer, moving it by this step.
    Tracked(ProducerStep),
}

/// Whether a producer's state is at hand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Availability {
    /// It is: its batches can be checked.
    Loaded,
    /// Read it from the store and hand it to [`ProducerTable::loaded`].
    Read,
    /// Not yet: batches of it this replica took without following its state
    /// are still being written (retry once the store confirms them).
    Wait,
}

/// The answer to an idempotent batch, as far as the table can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProducerCheck {
    /// Its state is not loaded (see [`ProducerTable::availability`]).
    NotLoaded,
    /// The next batch: append it.
    Next,
    /// A retry of this remembered batch, if its records are the same ones.
    Retry(RecentBatch),
    /// It does not fit: the producer's chain stands at `next_seq`, `head`
    /// (where a restarted named producer continues).
    OutOfSequence {
        /// The next sequence the log expects.
        next_seq: u64,
        /// The producer-chain head there.
        head: MessageId,
    },
}

/// A batch in the log but not yet confirmed in the store.
#[derive(Clone, Debug)]
struct Unwritten {
    base_offset: u64,
    count: u32,
    producer: BatchProducer,
}

/// One partition replica's idempotent producers, as of its in-memory log end.
#[derive(Clone, Debug, Default)]
pub struct ProducerTable {
    /// Loaded producers' states (`None`: it has written nothing here).
    states: BTreeMap<ProducerId, Option<ProducerState>>,
    /// Stamped batches the store has not confirmed yet, by entry index.
    unwritten: BTreeMap<u64, Unwritten>,
}

impl ProducerTable {
    /// Whether `producer`'s state is loaded (so a batch of it must have its step computed).
    pub fn tracks(&self, producer: ProducerId) -> bool {
        self.states.contains_key(&producer)
    }

    /// Whether the state of `producer` can be checked against now.
    pub fn availability(&self, producer: ProducerId) -> Availability {
        if self.tracks(producer) {
            Availability::Loaded
        } else if self
            .unwritten
            .values()
            .any(|u| u.producer == BatchProducer::Untracked(producer))
        {
            Availability::Wait
        } else {
            Availability::Read
        }
    }

    /// The state of `producer` as read from the store (`stored`), brought up
    /// to the log end with the batches the store does not hold yet.
    pub fn loaded(&mut self, producer: ProducerId, stored: Option<ProducerState>) {
        if self.tracks(producer) {
            return;
        }
        let mut state = stored;
        for unwritten in self.unwritten.values() {
            let BatchProducer::Tracked(step) = &unwritten.producer else {
                continue;
            };
            // Only steps that continue the stored state: the store already
            // holds the others.
            let next_seq = state.as_ref().map_or(0, |s| s.next_seq);
            if step.first.producer == producer && step.first.base_seq == next_seq {
                state = Some(step.apply(state, unwritten.base_offset, unwritten.count));
            }
        }
        self.states.insert(producer, state);
    }

    /// Whether `pb` claims to be a retry (its sequence is below the next one):
    /// such a batch is answered by the producer chain, before dedup keys,
    /// which would otherwise find the batch's own keys.
    pub fn is_retry(&self, pb: &ProducerBatch) -> bool {
        self.states
            .get(&pb.producer)
            .and_then(Option::as_ref)
            .is_some_and(|state| pb.base_seq < state.next_seq)
    }

    /// Checks a batch of `count` records stamped `pb`; `genesis` is where the
    /// producer's chain starts in this partition.
    pub fn check(&self, pb: &ProducerBatch, count: usize, genesis: MessageId) -> ProducerCheck {
        let Some(state) = self.states.get(&pb.producer) else {
            return ProducerCheck::NotLoaded;
        };
        match ProducerState::check(state.as_ref(), genesis, pb, count) {
            Ok(SequenceCheck::Next) => ProducerCheck::Next,
            Ok(SequenceCheck::Retry(original)) => ProducerCheck::Retry(original),
            Err(_) => {
                let (next_seq, head) = self.position(pb.producer, genesis);
                ProducerCheck::OutOfSequence { next_seq, head }
            }
        }
    }

    /// Where the chain of `producer` stands (next sequence, chain head), as
    /// the answer to a batch that does not fit it (a "retry" with other
    /// records included).
    pub fn position(&self, producer: ProducerId, genesis: MessageId) -> (u64, MessageId) {
        let state = self.states.get(&producer).and_then(Option::as_ref);
        state.map_or((0, genesis), |s| (s.next_seq, s.head))
    }

    /// A batch of `count` records at `base_offset` entered the log as entry
    /// `index` (appended by this leader, or received as a follower).
    pub fn appended(&mut self, index: u64, base_offset: u64, count: u32, producer: BatchProducer) {
        if let BatchProducer::Tracked(step) = &producer
            && let Some(state) = self.states.get_mut(&step.first.producer)
        {
            *state = Some(step.apply(state.take(), base_offset, count));
        }
        if producer != BatchProducer::Unstamped {
            self.unwritten.insert(
                index,
                Unwritten {
                    base_offset,
                    count,
                    producer,
                },
            );
        }
    }

    /// The store holds the log's first `upto` entries.
    pub fn persisted(&mut self, upto: u64) {
        self.unwritten = self.unwritten.split_off(&upto);
    }

    /// The log is cut from entry `from` on, whose records start at
    /// `cut_offset`. States roll back to before the cut; a state that cannot
    /// be rolled back (every batch it remembers was cut) is dropped, to be
    /// loaded again, rather than taken for "never wrote here", which would
    /// restart the producer's chain.
    pub fn cut(&mut self, from: u64, cut_offset: u64) {
        self.unwritten.split_off(&from);
        let states = std::mem::take(&mut self.states);
        self.states = states
            .into_iter()
            .filter_map(|(producer, state)| {
                let rolled = state?.rolled_back_to(cut_offset)?;
                Some((producer, Some(rolled)))
            })
            .collect();
    }

    /// The log restarts at a leader's log start: everything is loaded again
    /// (from the states the leader sent, which the store keeps with the restart).
    pub fn clear(&mut self) {
        self.states.clear();
        self.unwritten.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GENESIS: MessageId = MessageId([9; 32]);

    fn producer() -> ProducerId {
        ProducerId(7)
    }

    fn stamp(base_seq: u64, prev: u8) -> ProducerBatch {
        ProducerBatch {
            producer: producer(),
            base_seq,
            prev: MessageId([prev; 32]),
        }
    }

    /// A step from sequence `base_seq` (chain hash `prev`) to chain hash `after`.
    fn step(base_seq: u64, prev: u8, after: u8) -> BatchProducer {
        BatchProducer::Tracked(ProducerStep {
            first: stamp(base_seq, prev),
            after: MessageId([after; 32]),
            newest: 1,
        })
    }

    fn genesis_stamp() -> ProducerBatch {
        ProducerBatch {
            producer: producer(),
            base_seq: 0,
            prev: GENESIS,
        }
    }

    #[test]
    fn a_new_producer_is_read_once_then_followed_through_the_log() {
        let mut table = ProducerTable::default();
        assert_eq!(table.availability(producer()), Availability::Read);
        assert_eq!(
            table.check(&genesis_stamp(), 2, GENESIS),
            ProducerCheck::NotLoaded
        );
        table.loaded(producer(), None);
        assert_eq!(
            table.check(&genesis_stamp(), 2, GENESIS),
            ProducerCheck::Next
        );
        let first = ProducerBatch {
            prev: GENESIS,
            ..stamp(0, 0)
        };
        table.appended(
            0,
            0,
            2,
            BatchProducer::Tracked(ProducerStep {
                first: first.clone(),
                after: MessageId([1; 32]),
                newest: 1,
            }),
        );
        assert!(table.is_retry(&first));
        assert!(matches!(
            table.check(&first, 2, GENESIS),
            ProducerCheck::Retry(RecentBatch {
                base_offset: 0,
                count: 2,
                ..
            })
        ));
        assert_eq!(table.check(&stamp(2, 1), 3, GENESIS), ProducerCheck::Next);
        assert_eq!(
            table.check(&stamp(5, 1), 1, GENESIS),
            ProducerCheck::OutOfSequence {
                next_seq: 2,
                head: MessageId([1; 32])
            },
            "a gap says where the chain stands"
        );
        assert_eq!(
            table.check(&stamp(2, 4), 1, GENESIS),
            ProducerCheck::OutOfSequence {
                next_seq: 2,
                head: MessageId([1; 32])
            },
            "a batch that does not extend the chain is refused"
        );
    }

    #[test]
    fn a_state_read_while_batches_are_unwritten_is_brought_to_the_log_end() {
        let mut table = ProducerTable::default();
        table.loaded(producer(), None);
        // Two batches enter the log; the store confirms only the first.
        table.appended(0, 0, 2, step(0, 9, 1));
        table.appended(1, 2, 3, step(2, 1, 2));
        table.persisted(1);
        // Loaded again (say after a cut dropped it) from a store that holds
        // the first batch only.
        let forgotten = || ProducerTable {
            states: BTreeMap::new(),
            unwritten: table.unwritten.clone(),
        };
        let first = ProducerState::advanced(None, &stamp(0, 9), &stamp(2, 1), 0, 2, 1);
        let mut fresh = forgotten();
        fresh.loaded(producer(), Some(first.clone()));
        assert_eq!(fresh.check(&stamp(5, 2), 1, GENESIS), ProducerCheck::Next);
        // A store that already holds both is not advanced twice.
        let both = ProducerState::advanced(Some(first), &stamp(2, 1), &stamp(5, 2), 2, 3, 1);
        let mut fresh = forgotten();
        fresh.loaded(producer(), Some(both.clone()));
        assert_eq!(fresh.states.get(&producer()), Some(&Some(both)));
    }

    #[test]
    fn an_untracked_producer_waits_until_its_batches_are_written() {
        let mut table = ProducerTable::default();
        table.appended(4, 10, 1, BatchProducer::Untracked(producer()));
        assert_eq!(table.availability(producer()), Availability::Wait);
        table.persisted(5);
        assert_eq!(table.availability(producer()), Availability::Read);
    }

    #[test]
    fn a_cut_rolls_states_back_and_drops_what_cannot_be_rolled_back() {
        let mut table = ProducerTable::default();
        table.loaded(producer(), None);
        table.appended(0, 0, 2, step(0, 9, 1));
        table.appended(1, 2, 3, step(2, 1, 2));
        table.cut(1, 2);
        assert_eq!(
            table.check(&stamp(2, 1), 3, GENESIS),
            ProducerCheck::Next,
            "the cut batch is expected again"
        );
        assert!(table.unwritten.contains_key(&0) && !table.unwritten.contains_key(&1));

        // A state whose only remembered batch (not its first) is cut cannot
        // be rolled back: it is loaded again.
        let mut table = ProducerTable::default();
        let stored = ProducerState::advanced(None, &stamp(8, 3), &stamp(10, 4), 40, 2, 1);
        table.loaded(producer(), Some(stored));
        table.cut(0, 40);
        assert_eq!(table.availability(producer()), Availability::Read);
    }

    #[test]
    fn a_restart_at_a_log_start_forgets_everything() {
        let mut table = ProducerTable::default();
        table.loaded(producer(), None);
        table.appended(0, 0, 2, step(0, 9, 1));
        table.clear();
        assert_eq!(table.availability(producer()), Availability::Read);
    }
}
