//! One partition replica's decisions beyond the log itself: a pure state
//! machine around [`Replica`].
//!
//! [`Replica`] decides who leads, what is appended and what is committed.
//! [`Partition`] adds the rules a produce request meets on its way:
//! - **Admission.** Only the leader takes records; with `acks=all` it refuses
//!   while fewer replicas are in sync than a commit needs
//!   ([`Refused::NotEnoughReplicas`], Kafka's `NOT_ENOUGH_REPLICAS`).
//! - **Answers by [`Acks`].** A request waits under a reply token `T` until its
//!   last entry is acknowledgeable: at once for `Acks::None`, once durable on
//!   the leader (or committed) for `Acks::Leader`, once committed for
//!   `Acks::All`. Each token is answered exactly once: [`Answer::Acked`], or a
//!   failure the producer retries on (idempotence keeps the retry single).
//! - **Failing what can no longer commit.** A request whose entries are cut
//!   from the log (a new leader replaced them), or whose leader stops leading
//!   before they commit, or whose log restarts at a leader's log start, is
//!   answered [`Answer::NotLeader`] with the leader this replica knows of; one
//!   past its deadline [`Answer::TimedOut`].
//! - **Vote before send.** Messages that follow a vote (a promise, a
//!   candidacy, an answer in a new epoch) are held until the driver confirms
//!   the vote durable ([`Partition::vote_persisted`]): a replica that crashes
//!   before its vote reached the disk has told no one about it, so it cannot
//!   promise twice in one epoch.
//! - **Idempotent producers.** A stamped batch is checked against its
//!   producer's state as of the log end ([`ProducerTable`]): the next one is
//!   appended, a retry answered with the original's place, anything else
//!   refused with where the producer's chain stands. States follow every
//!   batch that enters the log, roll back when it is cut, and are dropped
//!   when it restarts at a leader's log start.
//! - **Dedup keys.** As leader, records whose dedup key was stored within the
//!   window are refused with their originals ([`DedupWindow`]); keyed records
//!   wait (retriably) until the index of the leader's epoch is built.
//!
//! The driver turns [`Output::Act`] into I/O (writes, sends, reads) exactly
//! as for a bare [`Replica`], and [`Output::Answer`] into a reply on the
//! channel it keeps under the token. The simulation runs the same machine.

use std::collections::VecDeque;
use std::time::Duration;

use super::dedup::{DedupIndex, DedupRefusal, DedupWindow};
use super::idempotence::{BatchProducer, ProducerCheck, ProducerState, ProducerTable};
use super::membership::PeerKey;
use super::replication::{Action, Input, Replica, ReplicaSet};
use crate::chain::{MessageId, ProducerId};
use crate::config::Acks;
use crate::record::Record;
use crate::wire::ProducerBatch;

/// The rules' settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionRules {
    /// How long a produce request may wait for its answer.
    pub produce_timeout: Duration,
    /// A follower silent for longer is out of sync (`replica.lag.time.max.ms`).
    pub replica_lag: Duration,
    /// How long the leader remembers records' dedup keys (on their timestamps).
    pub dedup_window: Duration,
    /// A deliberate bug, for proving that the simulation's checkers catch one.
    #[cfg(feature = "fault-injection")]
    pub injected_fault: Option<PartitionFault>,
}

impl Default for PartitionRules {
    fn default() -> Self {
        PartitionRules {
            produce_timeout: Duration::from_secs(30),
            replica_lag: Duration::from_secs(30),
            dedup_window: Duration::from_secs(120),
            #[cfg(feature = "fault-injection")]
            injected_fault: None,
        }
    }
}

/// Deliberate bugs in these rules the simulation can switch on (feature
/// `fault-injection` only).
#[cfg(feature = "fault-injection")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionFault {
    /// Messages after a vote go at once, before the vote is durable.
    SendBeforeVoteDurable,
    /// `acks=all` is answered once the leader holds the records durably.
    AckAllWhenLeaderDurable,
    /// Requests stay waiting when their entries are cut or their leader
    /// steps down (and are answered once their offsets commit, whatever
    /// entries committed there).
    KeepCutRequests,
    /// An idempotent producer's retry is appended again instead of being
    /// answered with the original's place.
    AppendRetries,
}

/// Why a produce request is not taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused<P> {
    /// This replica does not lead; `hint` is the leader it knows of.
    NotLeader {
        /// The leader this replica knows of.
        hint: Option<P>,
    },
    /// `acks=all` while fewer replicas are in sync than a commit needs.
    NotEnoughReplicas {
        /// Replicas in sync, the leader included.
        in_sync: usize,
        /// Replicas a commit needs.
        required: usize,
    },
}

/// How a produce request ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer<P> {
    /// Its records are acknowledged under its `Acks`.
    Acked,
    /// They may never commit here: retry at `hint`, the leader this replica knows of.
    NotLeader {
        /// The leader this replica knows of.
        hint: Option<P>,
    },
    /// Not acknowledgeable within the produce timeout.
    TimedOut,
    /// The partition closed here.
    Closed,
}

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output<P, T> {
    /// Carry out a replica action.
    Act(Action<P>),
    /// Answer the produce request of `token`.
    Answer {
        /// The request's token.
        token: T,
        /// Its answer.
        answer: Answer<P>,
    },
}

/// A produce request waiting for its answer.
#[derive(Clone, Debug)]
struct Waiter<T> {
    token: T,
    /// One past the request's last entry.
    entries_end: u64,
    acks: Acks,
    deadline: Duration,
}

/// One partition replica: its [`Replica`] and the produce requests it holds.
pub struct Partition<P, T> {
    replica: Replica<P>,
    rules: PartitionRules,
    waiters: Vec<Waiter<T>>,
    /// Per vote write in flight, oldest first: the messages held behind it.
    held_behind_votes: VecDeque<Vec<Action<P>>>,
    /// Whether this replica led when it last looked.
    leading: bool,
    /// Idempotent producers' states as of the log end.
    producers: ProducerTable,
    /// Recent dedup keys, while leading.
    dedup: DedupWindow,
}

impl<P: PeerKey, T> Partition<P, T> {
    /// Wraps a replica (as opened from the store, nothing in flight).
    pub fn new(replica: Replica<P>, rules: PartitionRules) -> Self {
        Partition {
            replica,
            dedup: DedupWindow::new(rules.dedup_window),
            rules,
            waiters: Vec::new(),
            held_behind_votes: VecDeque::new(),
            leading: false,
            producers: ProducerTable::default(),
        }
    }

    /// The replica (read-only).
    pub fn replica(&self) -> &Replica<P> {
        &self.replica
    }

    /// The replicas in sync (the leader only; empty elsewhere).
    pub fn in_sync(&self, now: Duration) -> Vec<P> {
        self.replica.in_sync(now, self.rules.replica_lag)
    }

    /// Produce requests waiting for their answer.
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    /// Vote writes whose confirmation is awaited.
    pub fn votes_in_flight(&self) -> usize {
        self.held_behind_votes.len()
    }

    /// When the machine next needs [`Input::Tick`]: the replica's next
    /// heartbeat or election deadline, or a request's deadline.
    pub fn next_wake(&self) -> Duration {
        let deadline = self.waiters.iter().map(|w| w.deadline).min();
        let wake = self.replica.next_wake();
        deadline.map_or(wake, |d| d.min(wake))
    }

    /// Whether a produce request with `acks` may be taken now.
    pub fn admit(&self, acks: Acks, now: Duration) -> Result<(), Refused<P>> {
        if !self.replica.is_leader() {
            return Err(Refused::NotLeader {
                hint: self.replica.leader_hint().cloned(),
            });
        }
        if acks == Acks::All {
            let in_sync = self.in_sync(now).len();
            let required = self.replica.quorum_size();
            if in_sync < required {
                return Err(Refused::NotEnoughReplicas { in_sync, required });
            }
        }
        Ok(())
    }

    /// The leader appends an entry with this payload digest: its index, or
    /// `None` when this replica does not lead.
    pub fn propose(
        &mut self,
        digest: MessageId,
        now: Duration,
    ) -> (Option<u64>, Vec<Output<P, T>>) {
        let (index, actions) = self.replica.propose(digest, now);
        (index, self.finish(actions))
    }

    /// As leader, proposes the next replica set (see [`Replica::propose_members`]).
    pub fn propose_members(
        &mut self,
        next: ReplicaSet<P>,
        now: Duration,
    ) -> (bool, Vec<Output<P, T>>) {
        let (accepted, actions) = self.replica.propose_members(next, now);
        (accepted, self.finish(actions))
    }

    /// Drops every committed, durable entry from memory (see
    /// [`Replica::compact_settled`]).
    pub fn compact_settled(&mut self) -> Vec<Output<P, T>> {
        let actions = self.replica.compact_settled();
        self.finish(actions)
    }

    /// Holds the request `token` until the entries before `entries_end` are
    /// acknowledgeable under `acks` (answered at once if they already are).
    pub fn await_ack(
        &mut self,
        token: T,
        entries_end: u64,
        acks: Acks,
        now: Duration,
    ) -> Vec<Output<P, T>> {
        self.waiters.push(Waiter {
            token,
            entries_end,
            acks,
            deadline: now + self.rules.produce_timeout,
        });
        let mut outputs = Vec::new();
        self.answer_acknowledged(&mut outputs);
        outputs
    }

    /// One input for the replica; a tick also times out requests.
    pub fn handle(&mut self, input: Input<P>, now: Duration) -> Vec<Output<P, T>> {
        let tick = matches!(input, Input::Tick);
        let persisted = matches!(input, Input::Persisted { .. });
        let actions = self.replica.handle(input, now);
        if persisted {
            self.producers.persisted(self.replica.durable());
        }
        let mut outputs = self.finish(actions);
        if tick {
            self.time_out(now, &mut outputs);
        }
        outputs
    }

    /// The idempotent producers' states (read-only).
    pub fn producers(&self) -> &ProducerTable {
        &self.producers
    }

    /// The state of `producer` as the store holds it.
    pub fn load_producer(&mut self, producer: ProducerId, stored: Option<ProducerState>) {
        self.producers.loaded(producer, stored);
    }

    /// Checks an idempotent batch of `count` records stamped `pb` against
    /// its producer's state; `genesis` starts the producer's chain here.
    pub fn check_producer(
        &self,
        pb: &ProducerBatch,
        count: usize,
        genesis: MessageId,
    ) -> ProducerCheck {
        let check = self.producers.check(pb, count, genesis);
        #[cfg(feature = "fault-injection")]
        if self.rules.injected_fault == Some(PartitionFault::AppendRetries)
            && matches!(check, ProducerCheck::Retry(_))
        {
            return ProducerCheck::Next;
        }
        check
    }

    /// Switches a deliberate bug on (or off).
    #[cfg(feature = "fault-injection")]
    pub fn inject_fault(&mut self, fault: Option<PartitionFault>) {
        self.rules.injected_fault = fault;
    }

    /// A batch of `count` records at record offset `base_offset` entered the
    /// log as entry `index` (proposed here or received from the leader).
    pub fn batch_appended(
        &mut self,
        index: u64,
        base_offset: u64,
        count: u32,
        producer: BatchProducer,
    ) {
        self.producers.appended(index, base_offset, count, producer);
    }

    /// The log is cut from entry `from` on, whose records start at
    /// `cut_offset`: producers' states roll back, dedup keys are forgotten.
    pub fn records_cut(&mut self, from: u64, cut_offset: u64) {
        self.producers.cut(from, cut_offset);
        self.dedup.invalidate();
    }

    /// Checks a batch for dedup keys stored within the window, as the leader
    /// is about to append it. A producer's retry is answered by its chain
    /// instead (its own keys would be found). `readable` tells whether
    /// everything committed before this epoch is readable from the store, so
    /// the index can be built (asked only when it must be).
    pub fn check_dedup(
        &mut self,
        records: &[Record],
        producer: Option<&ProducerBatch>,
        readable: impl FnOnce() -> bool,
    ) -> Result<(), DedupRefusal> {
        if producer.is_some_and(|pb| self.producers.is_retry(pb)) {
            return Ok(());
        }
        let epoch = self.replica.epoch();
        self.dedup.check(records, epoch, readable)
    }

    /// The epoch to build a dedup index for off the driver's task, once
    /// (see [`DedupWindow::take_build`]); the driver hands the result to
    /// [`Self::install_dedup`].
    pub fn take_dedup_build(&mut self) -> Option<u64> {
        self.dedup.take_build()
    }

    /// A dedup index built for `asked_for`, used if this replica still leads it.
    pub fn install_dedup(&mut self, asked_for: u64, index: DedupIndex) {
        let (epoch, leading) = (self.replica.epoch(), self.replica.is_leader());
        self.dedup.install(asked_for, index, epoch, leading);
    }

    /// Indexes the dedup keys of records this leader just appended.
    pub fn remember_dedup(&mut self, records: &[Record], base_offset: u64, ids: &[MessageId]) {
        let epoch = self.replica.epoch();
        self.dedup.remember(records, base_offset, ids, epoch);
    }

    /// The dedup window's length.
    pub fn dedup_window(&self) -> Duration {
        self.dedup.window()
    }

    /// The oldest vote write in flight is durable: the messages held behind it go.
    pub fn vote_persisted(&mut self) -> Vec<Output<P, T>> {
        self.held_behind_votes
            .pop_front()
            .unwrap_or_default()
            .into_iter()
            .map(Output::Act)
            .collect()
    }

    /// Fails every waiting request: the partition is going away here.
    pub fn close(&mut self) -> Vec<Output<P, T>> {
        self.waiters
            .drain(..)
            .map(|w| Output::Answer {
                token: w.token,
                answer: Answer::Closed,
            })
            .collect()
    }

    /// Applies the rules to the replica's actions: holds sends behind votes,
    /// fails requests that can no longer commit, answers those acknowledged.
    fn finish(&mut self, actions: Vec<Action<P>>) -> Vec<Output<P, T>> {
        let mut outputs = Vec::with_capacity(actions.len());
        for action in actions {
            match &action {
                Action::PersistLog { from, .. } => self.fail_cut(*from, &mut outputs),
                Action::InstallSnapshot { .. } => {
                    self.fail_cut(0, &mut outputs);
                    // The log restarts: producers are read again from the
                    // states the restart stores, keys from the new log.
                    self.producers.clear();
                    self.dedup.invalidate();
                }
                _ => {}
            }
            self.route(action, &mut outputs);
        }
        self.notice_role(&mut outputs);
        self.answer_acknowledged(&mut outputs);
        outputs
    }

    /// Sends wait behind the newest vote in flight; a vote starts a new hold.
    fn route(&mut self, action: Action<P>, outputs: &mut Vec<Output<P, T>>) {
        #[cfg(feature = "fault-injection")]
        if self.rules.injected_fault == Some(PartitionFault::SendBeforeVoteDurable) {
            outputs.push(Output::Act(action));
            return;
        }
        match action {
            Action::PersistVote { .. } => {
                self.held_behind_votes.push_back(Vec::new());
                outputs.push(Output::Act(action));
            }
            send @ (Action::Send { .. } | Action::SendStored { .. }) => {
                match self.held_behind_votes.back_mut() {
                    Some(held) => held.push(send),
                    None => outputs.push(Output::Act(send)),
                }
            }
            other => outputs.push(Output::Act(other)),
        }
    }

    /// Requests whose last entry is at or past `from` are cut from the log.
    fn fail_cut(&mut self, from: u64, outputs: &mut Vec<Output<P, T>>) {
        #[cfg(feature = "fault-injection")]
        if self.rules.injected_fault == Some(PartitionFault::KeepCutRequests) {
            return;
        }
        let hint = self.replica.leader_hint().cloned();
        self.answer_where(
            |w| w.entries_end > from,
            outputs,
            || Answer::NotLeader { hint: hint.clone() },
        );
    }

    /// A leader that stops leading fails what waits on it and is not committed.
    fn notice_role(&mut self, outputs: &mut Vec<Output<P, T>>) {
        let leading = self.replica.is_leader();
        #[cfg(feature = "fault-injection")]
        if self.rules.injected_fault == Some(PartitionFault::KeepCutRequests) {
            self.leading = leading;
            return;
        }
        if self.leading && !leading {
            self.answer_acknowledged(outputs);
            let hint = self.replica.leader_hint().cloned();
            self.answer_where(
                |_| true,
                outputs,
                || Answer::NotLeader { hint: hint.clone() },
            );
        }
        self.leading = leading;
    }

    fn answer_acknowledged(&mut self, outputs: &mut Vec<Output<P, T>>) {
        let (committed, durable) = (self.replica.commit(), self.replica.durable());
        #[allow(unused_mut)]
        let mut all_at = committed;
        #[cfg(feature = "fault-injection")]
        if self.rules.injected_fault == Some(PartitionFault::AckAllWhenLeaderDurable) {
            all_at = committed.max(durable);
        }
        self.answer_where(
            |w| match w.acks {
                Acks::None => true,
                Acks::Leader => durable >= w.entries_end || committed >= w.entries_end,
                Acks::All => all_at >= w.entries_end,
            },
            outputs,
            || Answer::Acked,
        );
    }

    fn time_out(&mut self, now: Duration, outputs: &mut Vec<Output<P, T>>) {
        self.answer_where(|w| w.deadline <= now, outputs, || Answer::TimedOut);
    }

    /// Answers (in arrival order) and drops the requests that `pick` selects.
    fn answer_where(
        &mut self,
        pick: impl Fn(&Waiter<T>) -> bool,
        outputs: &mut Vec<Output<P, T>>,
        answer: impl Fn() -> Answer<P>,
    ) {
        let (picked, kept): (Vec<_>, Vec<_>) = self.waiters.drain(..).partition(|w| pick(w));
        self.waiters = kept;
        outputs.extend(picked.into_iter().map(|w| Output::Answer {
            token: w.token,
            answer: answer(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain;
    use crate::core::replication::{DurableState, Message, ReplicationConfig};

    type Machine = Partition<u32, &'static str>;

    fn config() -> ReplicationConfig {
        ReplicationConfig {
            election_timeout: Duration::from_millis(100),
            election_jitter: Duration::ZERO,
            ..ReplicationConfig::default()
        }
    }

    fn machine(me: u32, voters: Vec<u32>) -> Machine {
        let replica = Replica::new(
            me,
            voters,
            config(),
            chain::partition_genesis("t", 0),
            DurableState::default(),
            Duration::ZERO,
            7,
        );
        Partition::new(replica, PartitionRules::default())
    }

    fn acts(outputs: &[Output<u32, &'static str>]) -> Vec<Action<u32>> {
        outputs
            .iter()
            .filter_map(|o| match o {
                Output::Act(a) => Some(a.clone()),
                Output::Answer { .. } => None,
            })
            .collect()
    }

    fn answers(outputs: &[Output<u32, &'static str>]) -> Vec<(&'static str, Answer<u32>)> {
        outputs
            .iter()
            .filter_map(|o| match o {
                Output::Answer { token, answer } => Some((*token, answer.clone())),
                Output::Act(_) => None,
            })
            .collect()
    }

    /// Confirms every log write of `outputs` durable at once.
    fn persist_all(
        m: &mut Machine,
        outputs: &[Output<u32, &'static str>],
        now: Duration,
    ) -> Vec<Output<u32, &'static str>> {
        let mut out = Vec::new();
        for action in acts(outputs) {
            match action {
                Action::PersistVote { .. } => out.extend(m.vote_persisted()),
                Action::PersistLog { from, entries } => {
                    let Some(last) = entries.last() else { continue };
                    let upto = from + entries.len() as u64;
                    let last_id = last.id;
                    out.extend(m.handle(Input::Persisted { upto, last_id }, now));
                }
                _ => {}
            }
        }
        out
    }

    /// A single voter that leads, its marker committed.
    fn leader_alone() -> Machine {
        let mut m = machine(1, vec![1]);
        let now = Duration::from_millis(200);
        let out = m.handle(Input::Tick, now);
        assert!(m.replica().is_leader());
        let out = persist_all(&mut m, &out, now);
        assert!(answers(&out).is_empty());
        m
    }

    fn digest(n: u8) -> MessageId {
        MessageId([n; 32])
    }

    #[test]
    fn a_candidate_asks_for_votes_only_once_its_own_vote_is_durable() {
        let mut m = machine(1, vec![1, 2, 3]);
        let out = m.handle(Input::Tick, Duration::from_millis(200));
        let first = acts(&out);
        assert!(matches!(
            first.first(),
            Some(Action::PersistVote { epoch: 1, .. })
        ));
        assert!(
            !first.iter().any(|a| matches!(a, Action::Send { .. })),
            "nothing is sent before the vote is durable: {first:?}"
        );
        assert_eq!(m.votes_in_flight(), 1);
        let released = acts(&m.vote_persisted());
        let asked: Vec<u32> = released
            .iter()
            .filter_map(|a| match a {
                Action::Send {
                    to,
                    message: Message::RequestVote { epoch: 1, .. },
                } => Some(*to),
                _ => None,
            })
            .collect();
        assert_eq!(asked, vec![2, 3]);
        assert_eq!(m.votes_in_flight(), 0);
    }

    #[test]
    fn a_voter_answers_a_candidate_only_once_its_promise_is_durable() {
        let mut m = machine(2, vec![1, 2, 3]);
        let request = Message::RequestVote {
            epoch: 1,
            last_epoch: 0,
            log_end: 0,
        };
        let out = m.handle(
            Input::Message {
                from: 1,
                message: request,
            },
            Duration::from_millis(10),
        );
        assert!(
            acts(&out)
                .iter()
                .all(|a| matches!(a, Action::PersistVote { .. }))
        );
        // The new epoch and the promise in it: the answer waits for both.
        let mut released = Vec::new();
        while m.votes_in_flight() > 0 {
            assert!(
                released.is_empty(),
                "answered before the promise was durable"
            );
            released = acts(&m.vote_persisted());
        }
        assert!(released.iter().any(|a| matches!(
            a,
            Action::Send {
                to: 1,
                message: Message::Vote { granted: true, .. }
            }
        )));
    }

    #[test]
    fn acks_decide_when_a_request_is_answered() {
        let mut m = machine(1, vec![1, 2, 3]);
        let now = Duration::from_millis(200);
        let out = m.handle(Input::Tick, now);
        persist_all(&mut m, &out, now);
        let vote = Message::Vote {
            epoch: 1,
            granted: true,
        };
        let out = m.handle(
            Input::Message {
                from: 2,
                message: vote,
            },
            now,
        );
        assert!(m.replica().is_leader());
        persist_all(&mut m, &out, now);

        let (index, out) = m.propose(digest(1), now);
        let end = index.expect("the leader proposes") + 1;
        let mut all = m.await_ack("all", end, Acks::All, now);
        all.extend(m.await_ack("leader", end, Acks::Leader, now));
        all.extend(m.await_ack("none", end, Acks::None, now));
        assert_eq!(answers(&all), vec![("none", Answer::Acked)]);

        let durable = persist_all(&mut m, &out, now);
        assert_eq!(
            answers(&durable),
            vec![("leader", Answer::Acked)],
            "acks=leader once durable here"
        );

        let reply = Message::AppendReply {
            epoch: 1,
            success: true,
            log_end: end,
        };
        let committed = m.handle(
            Input::Message {
                from: 2,
                message: reply,
            },
            now,
        );
        assert_eq!(
            answers(&committed),
            vec![("all", Answer::Acked)],
            "acks=all once committed"
        );
        assert_eq!(m.waiting(), 0);
    }

    #[test]
    fn a_leader_that_loses_its_epoch_fails_what_is_not_committed() {
        let mut m = machine(1, vec![1, 2, 3]);
        let now = Duration::from_millis(200);
        let out = m.handle(Input::Tick, now);
        persist_all(&mut m, &out, now);
        let vote = Message::Vote {
            epoch: 1,
            granted: true,
        };
        let out = m.handle(
            Input::Message {
                from: 2,
                message: vote,
            },
            now,
        );
        persist_all(&mut m, &out, now);
        let (index, out) = m.propose(digest(1), now);
        let end = index.expect("the leader proposes") + 1;
        persist_all(&mut m, &out, now);
        assert!(answers(&m.await_ack("all", end, Acks::All, now)).is_empty());

        let newer = Message::Append {
            epoch: 2,
            prev_offset: 0,
            prev_id: chain::partition_genesis("t", 0),
            entries: Vec::new(),
            commit: 0,
        };
        let out = m.handle(
            Input::Message {
                from: 3,
                message: newer,
            },
            now,
        );
        assert!(!m.replica().is_leader());
        assert_eq!(
            answers(&out),
            vec![("all", Answer::NotLeader { hint: Some(3) })]
        );
    }

    #[test]
    fn a_request_is_timed_out_once_and_never_answered_again() {
        let mut m = leader_alone();
        let now = Duration::from_millis(300);
        let (index, _unpersisted) = m.propose(digest(2), now);
        let end = index.expect("the leader proposes") + 1;
        assert!(m.await_ack("slow", end, Acks::All, now).is_empty());
        assert_eq!(
            m.next_wake(),
            (now + PartitionRules::default().produce_timeout).min(m.replica().next_wake())
        );
        let late = now + PartitionRules::default().produce_timeout;
        let out = m.handle(Input::Tick, late);
        assert_eq!(answers(&out), vec![("slow", Answer::TimedOut)]);
        assert!(answers(&m.handle(Input::Tick, late * 2)).is_empty());
        assert!(answers(&m.close()).is_empty());
    }

    #[test]
    fn a_follower_refuses_produce_and_names_its_leader() {
        let mut m = machine(2, vec![1, 2, 3]);
        let heartbeat = Message::Append {
            epoch: 1,
            prev_offset: 0,
            prev_id: chain::partition_genesis("t", 0),
            entries: Vec::new(),
            commit: 0,
        };
        m.handle(
            Input::Message {
                from: 1,
                message: heartbeat,
            },
            Duration::from_millis(5),
        );
        assert_eq!(
            m.admit(Acks::Leader, Duration::from_millis(5)),
            Err(Refused::NotLeader { hint: Some(1) })
        );
    }

    #[test]
    fn acks_all_is_refused_while_too_few_replicas_are_in_sync() {
        let mut m = machine(1, vec![1, 2, 3]);
        let now = Duration::from_millis(200);
        let out = m.handle(Input::Tick, now);
        persist_all(&mut m, &out, now);
        let vote = Message::Vote {
            epoch: 1,
            granted: true,
        };
        m.handle(
            Input::Message {
                from: 2,
                message: vote,
            },
            now,
        );
        assert!(m.replica().is_leader());
        let later = now + PartitionRules::default().replica_lag * 2;
        assert_eq!(
            m.admit(Acks::All, later),
            Err(Refused::NotEnoughReplicas {
                in_sync: 1,
                required: 2
            })
        );
        assert_eq!(m.admit(Acks::Leader, later), Ok(()));
    }
}
