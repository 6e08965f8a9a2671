//! [`Consumer`]: reads records from subscribed topics.
//!
//! With a `group_id` in a mesh, a consumer is a member of its consumer group:
//! it joins through the group's coordinator (the leader of the group's
//! `__offsets` partition), is given a share of the subscribed partitions,
//! heartbeats from a background task, and rejoins when the group rebalances
//! (a member joined, left or timed out, or a subscribed topic changed). Its
//! position in each assigned partition starts at the group's committed
//! offset, or, without one, where `auto_offset_reset` says. Commits name the
//! member's generation, so a member fenced by a rebalance cannot move an
//! offset of a partition it lost ([`GroupError::IllegalGeneration`]).
//! Without a group — or on a node with no network — a consumer reads every
//! partition of its topics.
//!
//! `poll` is a long poll: it returns as soon as records are available and
//! otherwise waits, up to its timeout, at the partitions' replicas — never a
//! polling interval. Consumers read committed records only.
//!
//! [`GroupError::IllegalGeneration`]: crate::core::group::GroupError::IllegalGeneration

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::{ConsumerConfig, OffsetReset};
use crate::core::group::{GroupError, JoinRequest, MemberId};
use crate::error::{Error, Result, StoreError};
use crate::node::Node;
use crate::record::ConsumerRecord;

mod membership;

use membership::Membership;

/// A topic and partition.
pub type TopicPartition = (String, u32);

/// How often a group member checks whether its topics' partitions changed.
const METADATA_REFRESH: Duration = Duration::from_secs(5);

/// Join attempts in one `poll` before it reports the group unsettled.
const MAX_JOIN_ATTEMPTS: usize = 20;

/// Told when the group gives this consumer partitions or takes them away
/// (Kafka's `ConsumerRebalanceListener`).
pub trait RebalanceListener: Send {
    /// Partitions are about to be taken away. `commits` holds what will be
    /// committed for them before they go (with auto-commit, the current
    /// positions; otherwise nothing): add, change or remove entries to
    /// commit what the application has finished with.
    fn on_partitions_revoked(
        &mut self,
        revoked: &[TopicPartition],
        commits: &mut BTreeMap<TopicPartition, u64>,
    ) {
        let _ = (revoked, commits);
    }

    /// Partitions were given to this consumer; reading starts at the group's
    /// committed offsets.
    fn on_partitions_assigned(&mut self, assigned: &[TopicPartition]) {
        let _ = assigned;
    }
}

/// New positions per partition, applied once a poll succeeds.
type Positions = Vec<(TopicPartition, u64)>;

/// Reads records. Not shared between tasks: methods take `&mut self`.
pub struct Consumer {
    node: Node,
    config: ConsumerConfig,
    /// Subscribed topic names.
    subscriptions: BTreeSet<String>,
    /// The partitions this consumer reads, in a fixed order.
    assignment: Vec<TopicPartition>,
    /// The next offset to return per partition, once known.
    positions: BTreeMap<TopicPartition, u64>,
    /// Positions as last committed, to skip commits that change nothing.
    last_committed: BTreeMap<TopicPartition, u64>,
    /// Where the next poll starts in `assignment`, so every partition gets its turn.
    next_partition: usize,
    /// When auto-commit last ran.
    last_auto_commit: Instant,
    /// This consumer's id in its group.
    member: MemberId,
    /// Its generation and heartbeat, while it is a member.
    membership: Option<Membership>,
    /// The group's committed offsets, as fetched when partitions were assigned.
    committed_at_assignment: BTreeMap<TopicPartition, u64>,
    /// Assigned partitions not fetched until resumed.
    paused: BTreeSet<TopicPartition>,
    /// Told about assignments and revocations.
    /// (In a mutex only so that the consumer is `Sync`, as futures that
    /// borrow it across awaits must be `Send`.)
    listener: Option<std::sync::Mutex<Box<dyn RebalanceListener>>>,
    /// Partition counts of the subscribed topics at the last join.
    joined_topics: BTreeMap<String, u32>,
    /// When the subscribed topics were last described.
    metadata_checked: Instant,
    /// A join (and sync) in progress, kept across polls: a join waits for
    /// every member to rejoin, which may take longer than one poll.
    pending_join: Option<PendingJoin>,
    /// Sends commits, one at a time in the order they were made (so an
    /// asynchronous commit never lands after a later one); started on first use.
    committer: Option<mpsc::UnboundedSender<CommitJob>>,
}

/// A commit for the committer task.
struct CommitJob {
    group: String,
    member: Option<(MemberId, u64)>,
    offsets: Vec<(TopicPartition, u64)>,
    reply: oneshot::Sender<Result<()>>,
}

/// A join and sync in progress, with the partition counts it joined with.
struct PendingJoin {
    topics: BTreeMap<String, u32>,
    /// The join, on a task of its own (aborted if the consumer is dropped).
    outcome: tokio::task::JoinHandle<Result<(u64, Vec<TopicPartition>)>>,
}

impl Drop for PendingJoin {
    fn drop(&mut self) {
        self.outcome.abort();
    }
}

impl Consumer {
    pub(crate) fn new(node: Node, config: ConsumerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Consumer {
            node,
            config,
            subscriptions: BTreeSet::new(),
            assignment: Vec::new(),
            positions: BTreeMap::new(),
            last_committed: BTreeMap::new(),
            next_partition: 0,
            last_auto_commit: Instant::now(),
            member: membership::new_member_id(),
            membership: None,
            committed_at_assignment: BTreeMap::new(),
            paused: BTreeSet::new(),
            listener: None,
            joined_topics: BTreeMap::new(),
            metadata_checked: Instant::now(),
            pending_join: None,
            committer: None,
        })
    }

    /// Sets the listener told about partitions assigned and revoked.
    pub fn set_rebalance_listener(&mut self, listener: Box<dyn RebalanceListener>) {
        self.listener = Some(std::sync::Mutex::new(listener));
    }

    /// Whether this consumer shares its topics' partitions with a group.
    fn in_group(&self) -> bool {
        self.config.group_id.is_some() && !self.subscriptions.is_empty()
    }

    /// This consumer's id in its group.
    pub fn member_id(&self) -> &str {
        &self.member
    }

    /// The group generation this consumer is in, while it is a member.
    pub fn generation(&self) -> Option<u64> {
        self.membership.as_ref().map(|m| m.generation)
    }

    /// Subscribes to `topics`, replacing the previous subscription, and takes
    /// every partition of them. Unknown topics are `Error::TopicNotFound`.
    pub fn subscribe(&mut self, topics: &[&str]) -> Result<()> {
        // The partitions are looked up (and the group joined) at the next poll.
        let subscriptions: BTreeSet<String> = topics.iter().map(|t| t.to_string()).collect();
        if subscriptions != self.subscriptions {
            self.subscriptions = subscriptions;
            if let Some(membership) = &self.membership {
                membership
                    .rejoin
                    .store(true, std::sync::atomic::Ordering::Release);
            } else {
                self.assignment.clear();
                self.positions.clear();
            }
            self.next_partition = 0;
        }
        Ok(())
    }

    /// The subscribed topics.
    pub fn subscription(&self) -> Vec<String> {
        self.subscriptions.iter().cloned().collect()
    }

    /// The partitions this consumer reads.
    pub fn assignment(&self) -> &[TopicPartition] {
        &self.assignment
    }

    /// Returns the records available now, or waits up to `timeout` for some.
    /// An empty result means none arrived in time.
    ///
    /// With auto-commit, a poll first commits the positions after the records
    /// earlier polls returned (as Kafka does), so a crash while handling a
    /// batch re-delivers it. If the poll fails, no position moves past a
    /// record it did not return.
    pub async fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>> {
        self.poll_mesh(timeout).await
    }

    /// `poll` in a mesh: every assigned partition is fetched from one of its
    /// replicas, all at once; with nothing available, each fetch waits at
    /// the replica (long poll, up to a second per round) and the first
    /// records to arrive are returned.
    async fn poll_mesh(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>> {
        self.maybe_auto_commit().await?;
        if !self.in_group() {
            self.resolve_assignment().await?;
        }
        let deadline = Instant::now() + timeout;
        let mut wait = Duration::ZERO;
        if self.config.group_id.is_some()
            && self.subscriptions.is_empty()
            && (self.membership.is_some() || self.pending_join.is_some())
        {
            self.leave_group().await?;
        }
        loop {
            if self.membership.as_ref().is_some_and(Membership::is_fenced) {
                // Its partitions may be someone else's now: stop at once.
                self.lose_all();
            }
            if self.in_group() {
                // A cooperative member keeps reading what it owns while it
                // rejoins; an eager one gave everything up and waits.
                let keep_reading = self.config.assignor.is_cooperative()
                    && self.membership.is_some()
                    && !self.assignment.is_empty();
                let join_deadline = if keep_reading {
                    Instant::now()
                } else {
                    deadline
                };
                if !self.ensure_membership(join_deadline).await? && !keep_reading {
                    // Still joining: the next poll goes on with it.
                    return Ok(Vec::new());
                }
            }
            for tp in self.assignment.clone() {
                if !self.positions.contains_key(&tp) {
                    self.init_position_in_mesh(&tp).await?;
                }
            }
            let (records, advanced, failures) = self.fetch_round(wait).await?;
            if !records.is_empty() {
                self.positions.extend(advanced);
                return Ok(records);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            if (failures == self.assignment.len() && failures > 0) || self.assignment.is_empty() {
                // No replica answered, or nothing to read: back off before the next round.
                tokio::time::sleep((deadline - now).min(Duration::from_millis(100))).await;
            }
            wait = (deadline - Instant::now()).min(self.config.fetch_max_wait);
        }
    }

    /// One fetch of every assigned partition at once, each waiting up to
    /// `wait` at its replica. With `wait` zero, all answers are gathered; with
    /// a wait, the first partition to return records ends the round.
    async fn fetch_round(
        &mut self,
        wait: Duration,
    ) -> Result<(Vec<ConsumerRecord>, Positions, usize)> {
        use futures::StreamExt;
        let mut fetches = futures::stream::FuturesUnordered::new();
        for tp in self
            .assignment
            .iter()
            .filter(|tp| !self.paused.contains(*tp))
        {
            let frame = crate::protocol::FetchFrame {
                topic: tp.0.clone(),
                partition: tp.1,
                offset: self.positions.get(tp).copied(),
                max_bytes: u32::try_from(self.config.max_partition_fetch_bytes).unwrap_or(u32::MAX),
                max_wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
                min_bytes: u32::try_from(self.config.fetch_min_bytes).unwrap_or(u32::MAX),
            };
            let node = self.node.clone();
            let tp = tp.clone();
            let nearest = self.config.fetch_from_nearest;
            fetches.push(async move { (tp, node.fetch_in_mesh_from(frame, nearest).await) });
        }
        let (mut out, mut advanced, mut failures) = (Vec::new(), Vec::new(), 0);
        while let Some((tp, result)) = fetches.next().await {
            match result {
                Ok(fetched) if !fetched.records.is_empty() => {
                    let mut records = fetched.records;
                    records.truncate(self.config.max_poll_records.saturating_sub(out.len()));
                    if let Some(last) = records.last() {
                        advanced.push((tp, last.offset + 1));
                    }
                    out.append(&mut records);
                    if !wait.is_zero() || out.len() >= self.config.max_poll_records {
                        break;
                    }
                }
                Ok(_) => {}
                Err(Error::Store(StoreError::OffsetOutOfRange { start, end, .. })) => {
                    let reset = self.reset_offset(&tp, start, end)?;
                    tracing::info!(topic = %tp.0, partition = tp.1, to = reset, "position out of range; reset");
                    self.positions.insert(tp, reset);
                }
                Err(e) => {
                    tracing::debug!(topic = %tp.0, partition = tp.1, error = %e, "fetch failed");
                    failures += 1;
                }
            }
        }
        Ok((out, advanced, failures))
    }

    /// Looks up the partitions of the subscribed topics in the mesh, once.
    async fn resolve_assignment(&mut self) -> Result<()> {
        if !self.assignment.is_empty() || self.subscriptions.is_empty() {
            return Ok(());
        }
        let mut assignment = Vec::new();
        for topic in &self.subscriptions {
            let description = self.node.topic_metadata(topic).await?;
            assignment.extend((0..description.config.partitions).map(|p| (topic.clone(), p)));
        }
        self.assignment = assignment;
        Ok(())
    }

    /// The starting position of a partition read through the mesh: the
    /// committed offset when it is in the log, else `auto_offset_reset`.
    async fn init_position_in_mesh(&mut self, tp: &TopicPartition) -> Result<()> {
        let bounds = self
            .node
            .fetch_in_mesh(crate::protocol::FetchFrame {
                topic: tp.0.clone(),
                partition: tp.1,
                offset: None,
                max_bytes: 0,
                max_wait_ms: 0,
                min_bytes: 0,
            })
            .await?;
        let (start, end) = (bounds.log_start_offset, bounds.high_watermark);
        let position = match self.committed_at_assignment.get(tp) {
            Some(offset) if (start..=end).contains(offset) => *offset,
            _ => self.reset_offset(tp, start, end)?,
        };
        self.positions.insert(tp.clone(), position);
        Ok(())
    }

    fn reset_offset(&self, tp: &TopicPartition, start: u64, end: u64) -> Result<u64> {
        match self.config.auto_offset_reset {
            OffsetReset::Earliest => Ok(start),
            OffsetReset::Latest => Ok(end),
            OffsetReset::None => Err(Error::NoOffset {
                topic: tp.0.clone(),
                partition: tp.1,
            }),
        }
    }

    /// Moves the position in an assigned partition; the next poll reads from
    /// `offset`. An offset outside the log is reset by `auto_offset_reset` then.
    pub fn seek(&mut self, topic: &str, partition: u32, offset: u64) -> Result<()> {
        let tp = (topic.to_string(), partition);
        if !self.assignment.contains(&tp) {
            return Err(Error::NotAssigned {
                topic: topic.to_string(),
                partition,
            });
        }
        self.positions.insert(tp, offset);
        Ok(())
    }

    /// The next offset this consumer will return from a partition, once known.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.positions.get(&(topic.to_string(), partition)).copied()
    }

    /// Stops fetching from assigned partitions until [`Consumer::resume`];
    /// the consumer stays in its group. Partitions not assigned are ignored.
    pub fn pause(&mut self, partitions: &[TopicPartition]) {
        self.paused.extend(
            partitions
                .iter()
                .filter(|tp| self.assignment.contains(tp))
                .cloned(),
        );
    }

    /// Fetches from paused partitions again.
    pub fn resume(&mut self, partitions: &[TopicPartition]) {
        for tp in partitions {
            self.paused.remove(tp);
        }
    }

    /// The paused partitions.
    pub fn paused(&self) -> Vec<TopicPartition> {
        self.paused.iter().cloned().collect()
    }

    /// The group's committed offset for a partition (`None` without a group
    /// or commit). In a mesh this asks the group's coordinator.
    pub async fn committed(&self, topic: &str, partition: u32) -> Result<Option<u64>> {
        let Some(group) = &self.config.group_id else {
            return Ok(None);
        };
        let offsets = membership::fetch_offsets(&self.node, group).await?;
        Ok(offsets.get(&(topic.to_string(), partition)).copied())
    }

    /// Positions that differ from what was last committed.
    fn uncommitted(&self) -> Vec<(TopicPartition, u64)> {
        self.positions
            .iter()
            .filter(|(tp, pos)| self.last_committed.get(*tp) != Some(*pos))
            .map(|(tp, pos)| (tp.clone(), *pos))
            .collect()
    }

    /// Commits the current positions for the group: the offsets after the
    /// records `poll` has returned. Returns once they are stored (replicated
    /// in `__offsets` with acks all). A member fenced by a rebalance gets
    /// `Error::Group(IllegalGeneration | UnknownMember | NotAssigned)` and
    /// rejoins at its next poll.
    pub async fn commit(&mut self) -> Result<()> {
        let changed = self.uncommitted();
        self.commit_offsets(changed).await
    }

    /// Commits the current positions without waiting: the commit proceeds in
    /// the background; await the returned future for its outcome.
    pub fn commit_async(
        &mut self,
    ) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
        let offsets = self.uncommitted();
        let sent = self.send_commit(offsets);
        async move {
            match sent {
                Ok(answer) => answer.await.unwrap_or(Err(Error::Closed)),
                Err(error) => Err(error),
            }
        }
    }

    /// Queues a commit of `offsets` as this member for the committer task,
    /// which sends commits one at a time in the order they were made.
    fn send_commit(
        &mut self,
        offsets: Vec<(TopicPartition, u64)>,
    ) -> Result<oneshot::Receiver<Result<()>>> {
        let group = self.config.group_id.clone().ok_or(Error::NoGroup)?;
        let member = self.member_and_generation();
        let (reply, answer) = oneshot::channel();
        if offsets.is_empty() {
            let _ = reply.send(Ok(()));
            return Ok(answer);
        }
        let committer = self.committer.get_or_insert_with(|| {
            let (jobs, mut queue) = mpsc::unbounded_channel::<CommitJob>();
            let node = self.node.clone();
            tokio::spawn(async move {
                while let Some(first) = queue.recv().await {
                    // Commits queued behind one in flight are merged (the
                    // latest offset per partition wins) and sent as one.
                    let mut batch = vec![first];
                    while let Ok(next) = queue.try_recv() {
                        batch.push(next);
                    }
                    for jobs in merge_runs(batch) {
                        run_commit(&node, jobs).await;
                    }
                }
            });
            jobs
        });
        let job = CommitJob {
            group,
            member,
            offsets,
            reply,
        };
        if committer.send(job).is_err() {
            // The committer stopped (its runtime shut down): start a new one next time.
            self.committer = None;
            return Err(Error::Closed);
        }
        Ok(answer)
    }

    fn member_and_generation(&self) -> Option<(MemberId, u64)> {
        self.membership
            .as_ref()
            .map(|m| (self.member.clone(), m.generation))
    }

    /// Commits `offsets` as this member (or, outside a group's membership,
    /// as an admin commit, which the coordinator accepts only while the
    /// group has no members).
    async fn commit_offsets(&mut self, offsets: Vec<(TopicPartition, u64)>) -> Result<()> {
        self.config.group_id.as_ref().ok_or(Error::NoGroup)?;
        if offsets.is_empty() {
            return Ok(());
        }
        let answer = self.send_commit(offsets.clone())?;
        match answer.await.unwrap_or(Err(Error::Closed)) {
            Ok(()) => {
                self.last_committed.extend(offsets);
                Ok(())
            }
            Err(error) => {
                if let (Error::Group(refusal), Some(membership)) = (&error, &self.membership) {
                    match refusal {
                        GroupError::UnknownMember(_) | GroupError::IllegalGeneration { .. } => {
                            membership.fence();
                        }
                        _ => membership
                            .rejoin
                            .store(true, std::sync::atomic::Ordering::Release),
                    }
                }
                Err(error)
            }
        }
    }

    async fn maybe_auto_commit(&mut self) -> Result<()> {
        let due = self.last_auto_commit.elapsed() >= self.config.auto_commit_interval;
        if self.config.enable_auto_commit && self.config.group_id.is_some() && due {
            self.last_auto_commit = Instant::now();
            match self.commit().await {
                Ok(()) => {}
                // Fenced: the rebalance at the next join decides what is ours.
                Err(Error::Group(error)) => {
                    tracing::info!(%error, "auto-commit refused; rejoining the group");
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Joins (or rejoins) the group when needed, until this consumer holds
    /// an assignment of the current generation. Returns false if the join
    /// has not ended by `deadline` (it goes on at the next poll).
    async fn ensure_membership(&mut self, deadline: Instant) -> Result<bool> {
        for _ in 0..MAX_JOIN_ATTEMPTS {
            if self.pending_join.is_none() {
                if !self.needs_rejoin().await? {
                    return Ok(true);
                }
                self.start_join().await?;
            }
            let Some(pending) = self.pending_join.as_mut() else {
                continue;
            };
            let Ok(joined) = tokio::time::timeout_at(deadline, &mut pending.outcome).await else {
                return Ok(false);
            };
            let outcome = joined.unwrap_or(Err(Error::Closed));
            let topics = self
                .pending_join
                .take()
                .map(|mut p| std::mem::take(&mut p.topics))
                .unwrap_or_default();
            let group = self.config.group_id.clone().ok_or(Error::NoGroup)?;
            match outcome {
                Ok((generation, assignment)) => {
                    tracing::debug!(group = %group, generation, partitions = assignment.len(), "joined");
                    if self.generation().is_none_or(|g| g + 1 != generation) {
                        // A generation passed without this member: its
                        // partitions may have moved and its positions are stale.
                        self.lose_all();
                    }
                    self.joined_topics = topics;
                    self.membership = Some(membership::start(
                        self.node.clone(),
                        group,
                        self.member.clone(),
                        generation,
                        &self.config,
                    ));
                    self.apply_assignment(assignment).await?;
                }
                Err(Error::Group(
                    GroupError::IllegalGeneration { .. }
                    | GroupError::RebalanceInProgress
                    | GroupError::UnknownMember(_),
                )) => continue,
                Err(error) => return Err(error),
            }
        }
        Ok(false)
    }

    /// Sends a join: with an eager assignor, after giving up every partition.
    async fn start_join(&mut self) -> Result<()> {
        if !self.config.assignor.is_cooperative() {
            let all = self.assignment.clone();
            self.revoke(&all).await;
        }
        let group = self.config.group_id.clone().ok_or(Error::NoGroup)?;
        let topics = self.subscribed_partitions().await?;
        let join = JoinRequest {
            member: self.member.clone(),
            topics: topics.clone(),
            assignor: self.config.assignor,
            session_timeout_ms: millis(self.config.session_timeout),
            rebalance_timeout_ms: millis(self.config.max_poll_interval),
            heartbeat_interval_ms: millis(self.config.heartbeat_interval),
            owned: self.assignment.clone(),
            owned_generation: self.generation().unwrap_or(0),
        };
        let outcome = membership::join_and_sync(
            self.node.clone(),
            group,
            join,
            self.config.max_poll_interval,
        );
        self.pending_join = Some(PendingJoin {
            topics,
            outcome: tokio::spawn(outcome),
        });
        Ok(())
    }

    /// Whether the member must (re)join: not a member, told to rejoin, or its
    /// subscribed topics' partitions changed since it joined.
    async fn needs_rejoin(&mut self) -> Result<bool> {
        let Some(membership) = &self.membership else {
            return Ok(true);
        };
        if membership.must_rejoin() {
            return Ok(true);
        }
        if self.metadata_checked.elapsed() >= METADATA_REFRESH {
            self.metadata_checked = Instant::now();
            return Ok(self.subscribed_partitions().await? != self.joined_topics);
        }
        Ok(false)
    }

    /// The subscribed topics that exist, with their partition counts.
    async fn subscribed_partitions(&self) -> Result<BTreeMap<String, u32>> {
        let mut out = BTreeMap::new();
        for topic in &self.subscriptions {
            match self.node.describe_topic_in_mesh(topic).await {
                Ok(description) => {
                    out.insert(topic.clone(), description.config.partitions);
                }
                Err(Error::TopicNotFound(_)) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(out)
    }

    /// Takes a new assignment: revokes what is no longer ours (cooperative),
    /// reads the group's offsets for what is new, and tells the listener.
    async fn apply_assignment(&mut self, assignment: Vec<TopicPartition>) -> Result<()> {
        let revoked: Vec<TopicPartition> = self
            .assignment
            .iter()
            .filter(|tp| !assignment.contains(tp))
            .cloned()
            .collect();
        self.revoke(&revoked).await;
        let added: Vec<TopicPartition> = assignment
            .iter()
            .filter(|tp| !self.assignment.contains(tp))
            .cloned()
            .collect();
        if !added.is_empty()
            && let Some(group) = &self.config.group_id
        {
            match membership::fetch_offsets(&self.node, group).await {
                Ok(offsets) => self.committed_at_assignment = offsets,
                Err(error) => {
                    // Without the group's offsets the new partitions cannot
                    // start; rejoin rather than hold them unread.
                    if let Some(membership) = &self.membership {
                        membership
                            .rejoin
                            .store(true, std::sync::atomic::Ordering::Release);
                    }
                    return Err(error);
                }
            }
            for tp in &added {
                self.positions.remove(tp);
            }
        }
        self.assignment = assignment;
        self.next_partition = 0;
        if !added.is_empty()
            && let Some(Ok(listener)) = self.listener.as_mut().map(|l| l.get_mut())
        {
            listener.on_partitions_assigned(&added);
        }
        Ok(())
    }

    /// Forgets every partition without committing (they were lost, not
    /// given up: another member may own them now). The listener hears of them
    /// as revoked; what it asks to commit is dropped.
    fn lose_all(&mut self) {
        let lost = std::mem::take(&mut self.assignment);
        if !lost.is_empty()
            && let Some(Ok(listener)) = self.listener.as_mut().map(|l| l.get_mut())
        {
            listener.on_partitions_revoked(&lost, &mut BTreeMap::new());
        }
        self.positions.clear();
        self.paused.clear();
    }

    /// Gives partitions up: commits their positions (auto-commit) or what the
    /// listener says, then forgets them.
    async fn revoke(&mut self, partitions: &[TopicPartition]) {
        if partitions.is_empty() {
            return;
        }
        let mut commits: BTreeMap<TopicPartition, u64> = if self.config.enable_auto_commit {
            partitions
                .iter()
                .filter_map(|tp| Some((tp.clone(), *self.positions.get(tp)?)))
                .filter(|(tp, pos)| self.last_committed.get(tp) != Some(pos))
                .collect()
        } else {
            BTreeMap::new()
        };
        if let Some(Ok(listener)) = self.listener.as_mut().map(|l| l.get_mut()) {
            listener.on_partitions_revoked(partitions, &mut commits);
        }
        if !commits.is_empty()
            && let Err(error) = self.commit_offsets(commits.into_iter().collect()).await
        {
            tracing::warn!(%error, "could not commit the offsets of partitions given up");
        }
        self.assignment.retain(|tp| !partitions.contains(tp));
        for tp in partitions {
            self.positions.remove(tp);
            self.paused.remove(tp);
        }
    }

    /// Leaves: commits the positions first when auto-commit is on, and in a
    /// group leaves it at once, so its partitions are reassigned now rather
    /// than after its session times out.
    pub async fn close(mut self) -> Result<()> {
        if self.membership.is_some() || self.pending_join.is_some() {
            return self.leave_group().await;
        }
        if self.config.enable_auto_commit && self.config.group_id.is_some() {
            self.commit().await?;
        }
        Ok(())
    }
}

impl Consumer {
    /// Gives every partition up (committing as `revoke` does) and leaves the group.
    async fn leave_group(&mut self) -> Result<()> {
        let all = self.assignment.clone();
        self.revoke(&all).await;
        self.membership = None;
        self.pending_join = None;
        if let Some(group) = self.config.group_id.clone() {
            membership::leave(&self.node, &group, &self.member).await?;
        }
        Ok(())
    }
}

/// Splits queued commits into runs of consecutive jobs of one group and member.
fn merge_runs(batch: Vec<CommitJob>) -> Vec<Vec<CommitJob>> {
    let mut runs: Vec<Vec<CommitJob>> = Vec::new();
    for job in batch {
        match runs.last_mut() {
            Some(run) if run[0].group == job.group && run[0].member == job.member => run.push(job),
            _ => runs.push(vec![job]),
        }
    }
    runs
}

/// Sends one run of commits as one request and answers each of them.
async fn run_commit(node: &Node, jobs: Vec<CommitJob>) {
    let mut offsets: BTreeMap<TopicPartition, u64> = BTreeMap::new();
    for job in &jobs {
        offsets.extend(job.offsets.iter().cloned());
    }
    let (group, member) = (jobs[0].group.clone(), jobs[0].member.clone());
    let result = commit_request(node, &group, member, offsets.into_iter().collect()).await;
    let mut jobs = jobs;
    let last = jobs.pop();
    // Errors are not `Clone`: the earlier jobs get a copy, the last the original.
    for job in jobs {
        let answer = match &result {
            Ok(()) => Ok(()),
            Err(Error::Group(refusal)) => Err(Error::Group(refusal.clone())),
            Err(other) => Err(Error::Refused(other.to_string())),
        };
        let _ = job.reply.send(answer);
    }
    if let Some(job) = last {
        let _ = job.reply.send(result);
    }
}

/// Stores a group's offsets through its coordinator.
async fn commit_request(
    node: &Node,
    group: &str,
    member: Option<(MemberId, u64)>,
    offsets: Vec<(TopicPartition, u64)>,
) -> Result<()> {
    if offsets.is_empty() {
        return Ok(());
    }
    membership::commit(node, group, member, offsets).await
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
