//! [`Consumer`]: reads records from subscribed topics.
//!
//! A consumer is assigned every partition of the topics it subscribes to
//! (consumer groups that share partitions among members come with the mesh).
//! Its position in each partition starts at the group's committed offset, or,
//! without one, where `auto_offset_reset` says. `poll` is a long poll: it
//! returns as soon as records are available and otherwise waits, up to its
//! timeout, for the node to report new appends — never a polling interval.
//! Consumers read committed records only.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{ConsumerConfig, OffsetReset};
use crate::error::{Error, Result, StoreError};
use crate::node::Node;
use crate::record::ConsumerRecord;
use crate::store::{WriteOp, WriteOutcome};

/// A topic and partition.
pub type TopicPartition = (String, u32);

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
    /// Counter the node bumps after appends; a long poll waits on it.
    appends: watch::Receiver<u64>,
    /// When auto-commit last ran.
    last_auto_commit: Instant,
}

impl Consumer {
    pub(crate) fn new(node: Node, config: ConsumerConfig) -> Result<Self> {
        config.validate()?;
        let appends = node.watch_appends();
        Ok(Consumer {
            node,
            config,
            subscriptions: BTreeSet::new(),
            assignment: Vec::new(),
            positions: BTreeMap::new(),
            last_committed: BTreeMap::new(),
            next_partition: 0,
            appends,
            last_auto_commit: Instant::now(),
        })
    }

    /// Subscribes to `topics`, replacing the previous subscription, and takes
    /// every partition of them. Unknown topics are `Error::TopicNotFound`.
    pub fn subscribe(&mut self, topics: &[&str]) -> Result<()> {
        if self.node.in_mesh() {
            // The partitions are looked up in the mesh at the next poll.
            self.subscriptions = topics.iter().map(|t| t.to_string()).collect();
            self.assignment.clear();
            self.positions.clear();
            self.next_partition = 0;
            return Ok(());
        }
        let mut assignment = Vec::new();
        for topic in topics {
            let entry = self.node.store()?.topic(topic)?;
            assignment.extend((0..entry.config.partitions).map(|p| (topic.to_string(), p)));
        }
        self.subscriptions = topics.iter().map(|t| t.to_string()).collect();
        self.positions.retain(|tp, _| assignment.contains(tp));
        self.assignment = assignment;
        self.next_partition = 0;
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
        if self.node.in_mesh() {
            return self.poll_mesh(timeout).await;
        }
        self.maybe_auto_commit().await?;
        let deadline = Instant::now() + timeout;
        loop {
            // Mark the counter seen before reading, so an append that lands
            // during the read still wakes the wait below.
            self.appends.borrow_and_update();
            let (records, advanced) = self.fetch_available()?;
            if !records.is_empty() {
                self.positions.extend(advanced);
                return Ok(records);
            }
            if Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            match tokio::time::timeout_at(deadline, self.appends.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(Error::Closed),
                Err(_elapsed) => return Ok(Vec::new()),
            }
        }
    }

    /// `poll` in a mesh: every assigned partition is fetched from one of its
    /// replicas, all at once; with nothing available, each fetch waits at
    /// the replica (long poll, up to a second per round) and the first
    /// records to arrive are returned.
    async fn poll_mesh(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>> {
        self.maybe_auto_commit().await?;
        self.resolve_assignment().await?;
        let deadline = Instant::now() + timeout;
        let mut wait = Duration::ZERO;
        loop {
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
            if failures == self.assignment.len() && failures > 0 {
                // No replica answered: back off before the next round.
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
        for tp in &self.assignment {
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
            fetches.push(async move { (tp, node.fetch_in_mesh(frame).await) });
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
        let position = match self.committed(&tp.0, tp.1)? {
            Some(offset) if (start..=end).contains(&offset) => offset,
            _ => self.reset_offset(tp, start, end)?,
        };
        self.positions.insert(tp.clone(), position);
        Ok(())
    }

    /// Reads from each assigned partition in turn, up to `max_poll_records`.
    /// Returns the records and the positions after them, which the caller
    /// applies only once the whole poll has succeeded.
    fn fetch_available(&mut self) -> Result<(Vec<ConsumerRecord>, Positions)> {
        let mut out = Vec::new();
        let mut advanced = Vec::new();
        let n = self.assignment.len();
        for i in 0..n {
            if out.len() >= self.config.max_poll_records {
                break;
            }
            let tp = self.assignment[(self.next_partition + i) % n].clone();
            let mut records = self.fetch_partition(&tp)?;
            records.truncate(self.config.max_poll_records - out.len());
            if let Some(last) = records.last() {
                advanced.push((tp, last.offset + 1));
            }
            out.append(&mut records);
        }
        if n > 0 {
            self.next_partition = (self.next_partition + 1) % n;
        }
        Ok((out, advanced))
    }

    fn fetch_partition(&mut self, tp: &TopicPartition) -> Result<Vec<ConsumerRecord>> {
        let position = self.position_or_reset(tp)?;
        let max_bytes = self.config.max_partition_fetch_bytes;
        match self.node.store()?.read(&tp.0, tp.1, position, max_bytes) {
            Ok(read) => Ok(read.records),
            Err(StoreError::OffsetOutOfRange { start, end, .. }) => {
                let reset = self.reset_offset(tp, start, end)?;
                tracing::info!(topic = %tp.0, partition = tp.1, from = position, to = reset, "position out of range; reset");
                self.positions.insert(tp.clone(), reset);
                Ok(Vec::new())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The position in `tp`, starting from the committed offset or the reset policy.
    fn position_or_reset(&mut self, tp: &TopicPartition) -> Result<u64> {
        if let Some(position) = self.positions.get(tp) {
            return Ok(*position);
        }
        let state = self.node.store()?.partition_state(&tp.0, tp.1)?;
        let committed = self.committed(&tp.0, tp.1)?;
        let position = match committed {
            Some(offset) if (state.log_start_offset..=state.high_watermark).contains(&offset) => {
                offset
            }
            _ => self.reset_offset(tp, state.log_start_offset, state.high_watermark)?,
        };
        self.positions.insert(tp.clone(), position);
        Ok(position)
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

    /// The group's committed offset for a partition (`None` without a group or commit).
    pub fn committed(&self, topic: &str, partition: u32) -> Result<Option<u64>> {
        let Some(group) = &self.config.group_id else {
            return Ok(None);
        };
        Ok(self
            .node
            .store()?
            .committed_offset(group, topic, partition)?)
    }

    /// Commits the current positions for the group: the offsets after the
    /// records `poll` has returned. Returns once they are stored.
    pub async fn commit(&mut self) -> Result<()> {
        let group = self.config.group_id.clone().ok_or(Error::NoGroup)?;
        let changed: Vec<(String, u32, u64)> = self
            .positions
            .iter()
            .filter(|(tp, pos)| self.last_committed.get(*tp) != Some(*pos))
            .map(|((t, p), pos)| (t.clone(), *p, *pos))
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        match self
            .node
            .write(WriteOp::CommitOffsets {
                group,
                offsets: changed.clone(),
            })
            .await?
        {
            WriteOutcome::OffsetsCommitted => {
                for (t, p, pos) in changed {
                    self.last_committed.insert((t, p), pos);
                }
                Ok(())
            }
            _ => Err(Error::Closed),
        }
    }

    async fn maybe_auto_commit(&mut self) -> Result<()> {
        let due = self.last_auto_commit.elapsed() >= self.config.auto_commit_interval;
        if self.config.enable_auto_commit && self.config.group_id.is_some() && due {
            self.last_auto_commit = Instant::now();
            self.commit().await?;
        }
        Ok(())
    }

    /// Leaves: commits the positions first when auto-commit is on.
    pub async fn close(mut self) -> Result<()> {
        if self.config.enable_auto_commit && self.config.group_id.is_some() {
            self.commit().await?;
        }
        Ok(())
    }
}
