//! [`Node`]: the handle an application embeds.
//!
//! A node owns one [`Store`] and a writer thread that performs group commit:
//! write requests (appends, topic changes, offset commits) queue on a bounded
//! channel, and the writer takes everything queued, up to
//! `NodeConfig::max_group_commit`, into one transaction. A request is answered
//! only after that transaction has committed with the configured durability.
//! Fetches do not wait for the writer: they read up to the commit point each
//! replica knows and are woken when it moves (`replica::readable`).
//!
//! Every node that stores runs the same engine: a storage node in a mesh,
//! and a node without network, which is a mesh of one (its replicas, its
//! metadata log and its group coordinators live in it alone).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::config::{ConsumerConfig, NodeConfig, ProducerConfig, TopicConfig};
use crate::consumer::Consumer;
pub use crate::description::{PartitionDescription, TopicDescription};
use crate::error::{Error, Result, StoreError};
use crate::net::{Mesh, NodeId, PeerId, identity};
use crate::producer::Producer;
use crate::replica::{Replicator, ReplicatorSetup};
use crate::store::{Store, WriteOp, WriteOutcome};

/// Write requests waiting for the writer; senders wait when it is full.
const WRITE_QUEUE_DEPTH: usize = 8192;

/// A running meshlog node. Cheap to clone; all clones are the same node.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<NodeInner>,
}

pub(crate) struct NodeInner {
    /// The log store; reads go to it directly, writes through `writes`.
    /// Taken out on shutdown so the database file closes.
    store: std::sync::RwLock<Option<Arc<Store>>>,
    /// The database file, for messages.
    database_path: PathBuf,
    /// The writer thread's queue.
    writes: mpsc::Sender<WriterMessage>,
    config: NodeConfig,
    /// This node's identity (its peer id).
    pub(crate) me: NodeId,
    /// The node's place in the mesh, when it is on the network.
    pub(crate) mesh: Option<Arc<Mesh>>,
    /// The replication task, on a storage node in a mesh.
    pub(crate) replicator: Option<Replicator>,
    /// This node's group coordinators (storage nodes in a mesh).
    pub(crate) groups: Option<mpsc::Sender<crate::coordinator::GroupCall>>,
    /// The leader last seen for each partition, for routing produce requests.
    pub(crate) leaders: Mutex<std::collections::HashMap<(String, u32), crate::net::NodeId>>,
    /// Who leads what, as the leaders gossip it (storage nodes).
    pub(crate) ownership: Arc<Mutex<crate::core::ownership::OwnershipTable<NodeId>>>,
    /// Topics learned from peers (light clients and routing), by name.
    pub(crate) remote_topics: Mutex<std::collections::HashMap<String, TopicDescription>>,
    /// Set by the writer when the store fails for good (see [`Node::store_failure`]).
    store_failure: watch::Receiver<Option<String>>,
    /// Background work to stop on shutdown; `None` once stopped.
    tasks: Mutex<Option<NodeTasks>>,
    /// Turns true once a shutdown has finished, for callers that find one under way.
    shut_down: watch::Sender<bool>,
}

struct NodeTasks {
    writer: std::thread::JoinHandle<()>,
    retention: tokio::task::JoinHandle<()>,
    replicator: Option<tokio::task::JoinHandle<()>>,
    coordinator: Option<tokio::task::JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

enum WriterMessage {
    Write {
        op: WriteOp,
        reply: oneshot::Sender<Result<WriteOutcome, StoreError>>,
    },
    Stop,
}

/// One partition of a consumer group's position, as `meshlog group describe` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupOffset {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The group's committed offset: the next record it will read.
    pub committed: u64,
    /// The first offset still stored.
    pub log_start_offset: u64,
    /// One past the last committed record.
    pub log_end_offset: u64,
    /// Records the group has yet to read.
    pub lag: u64,
}

impl GroupOffset {
    fn new(topic: String, partition: u32, committed: u64, start: u64, end: u64) -> Self {
        GroupOffset {
            lag: end.saturating_sub(committed),
            topic,
            partition,
            committed,
            log_start_offset: start,
            log_end_offset: end,
        }
    }
}

/// A consumer group, as `meshlog group describe` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupInfo {
    /// The group.
    pub group: String,
    /// `Stable`, `Rebalancing`, `Empty` (no members) or `Dead` (unknown).
    pub state: String,
    /// The current generation.
    pub generation: u64,
    /// The group's assignor, once a member chose one.
    pub assignor: Option<crate::config::Assignor>,
    /// Each member with its partitions in the current generation.
    pub members: Vec<(String, Vec<(String, u32)>)>,
    /// Committed offsets with log bounds and lag.
    pub offsets: Vec<GroupOffset>,
}

/// Milliseconds since the Unix epoch by the system clock.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Node {
    /// Opens the node's store in `config.data_dir` (creating it) and starts the
    /// writer. Fails if another process has the data directory open, or if the
    /// store is corrupt.
    pub async fn open(config: NodeConfig) -> Result<Node> {
        config.validate()?;
        let dir = config.data_dir.clone();
        let fsync = config.fsync;
        let cache_bytes = config.cache_bytes;
        let store =
            tokio::task::spawn_blocking(move || Store::open_with_cache(&dir, fsync, cache_bytes))
                .await
                .map_err(|_| Error::Closed)??;
        let store = Arc::new(store);
        let (writes, queue) = mpsc::channel(WRITE_QUEUE_DEPTH);
        let (failed, store_failure) = watch::channel(None);
        let writer = {
            let store = store.clone();
            let max_group = config.max_group_commit;
            std::thread::Builder::new()
                .name("meshlog-writer".into())
                .spawn(move || {
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_writer(&store, queue, &failed, max_group)
                    }));
                    if ran.is_err() {
                        failed.send_replace(Some("the writer thread panicked".into()));
                    }
                })
                .map_err(StoreError::Io)?
        };
        let (stop, stopped) = watch::channel(false);
        let retention = tokio::spawn(run_retention(
            writes.clone(),
            config.retention_check_interval,
            stopped,
        ));
        // A storage node, or a node without network (a mesh of one), hosts
        // replicas under an identity bound to its database.
        let stores = config.network.as_ref().is_none_or(|m| m.role_is_storage());
        let keypair = if stores {
            crate::bound_identity::bind(&config.data_dir, &store)?
        } else {
            identity::load_or_create(&config.data_dir).map_err(Error::Net)?
        };
        let me = NodeId::from(keypair.public().to_peer_id());
        let mesh = match &config.network {
            Some(mesh_config) => {
                let mesh = Mesh::start(keypair, mesh_config.clone(), Some(config.data_dir.clone()))
                    .await
                    .map_err(Error::Net)?;
                info!(peer_id = %mesh.peer_id(), "joined the network");
                if let Some(mesh_id) = store.mesh_id()? {
                    mesh.set_mesh_id(mesh_id).await.map_err(Error::Net)?;
                }
                Some(Arc::new(mesh))
            }
            None => None,
        };
        let founding = match &config.network {
            None => crate::replica::Founding::Now,
            Some(m) if !m.bootstrap.is_empty() => crate::replica::Founding::Never,
            Some(m) if m.mdns => crate::replica::Founding::LowestId,
            Some(_) => crate::replica::Founding::Alone,
        };
        let ownership = Arc::new(Mutex::new(crate::core::ownership::OwnershipTable::new()));
        let (groups, group_calls) = mpsc::channel(1024);
        let (replicator, replicator_task, coordinator_task) = match stores {
            true => {
                let inbound = match &mesh {
                    Some(mesh) => mesh.take_inbound().ok_or(Error::Closed)?,
                    // No peers: nothing ever arrives.
                    None => mpsc::channel(1).1,
                };
                let (replicator, task) = Replicator::start(ReplicatorSetup {
                    me,
                    store: store.clone(),
                    writes: WriteQueue { tx: writes.clone() },
                    mesh: mesh.clone(),
                    inbound,
                    stop: stop.subscribe(),
                    founding,
                    ownership: ownership.clone(),
                    dedup_window: config.dedup_window,
                    quiet_compaction: config.retention_check_interval,
                    groups: groups.clone(),
                });
                let coordinator = crate::coordinator::start(
                    replicator.clone(),
                    store.clone(),
                    mesh.is_none(),
                    group_calls,
                    stop.subscribe(),
                );
                (Some(replicator), Some(task), Some(coordinator))
            }
            false => (None, None, None),
        };
        let groups = replicator.as_ref().map(|_| groups);
        info!(data_dir = %config.data_dir.display(), fsync, "node opened");
        let node = Node {
            inner: Arc::new(NodeInner {
                database_path: store.path().to_path_buf(),
                store: std::sync::RwLock::new(Some(store)),
                writes,
                config,
                me,
                mesh,
                replicator,
                groups,
                leaders: Mutex::new(Default::default()),
                ownership,
                remote_topics: Mutex::new(Default::default()),
                store_failure: store_failure.clone(),
                shut_down: watch::channel(false).0,
                tasks: Mutex::new(Some(NodeTasks {
                    writer,
                    retention,
                    replicator: replicator_task,
                    coordinator: coordinator_task,
                    stop,
                })),
            }),
        };
        tokio::spawn(stop_on_store_failure(
            Arc::downgrade(&node.inner),
            store_failure,
        ));
        Ok(node)
    }

    /// Waits until the node's store fails (a full disk, an I/O error, a
    /// crashed writer) and returns why; `None` once the node shut down
    /// without a failure. By then the node has stopped on its own: it leads
    /// and votes nowhere, has left the mesh (its peers re-replicate its
    /// partitions as for any dead node) and takes no more requests. A
    /// process embedding the node should exit non-zero, as `meshlog node`
    /// does.
    pub async fn store_failure(&self) -> Option<String> {
        let mut failure = self.inner.store_failure.clone();
        match failure.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            Err(_) => None,
        }
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.inner.config.data_dir
    }

    /// The node's peer id, when it is on the network.
    pub fn peer_id(&self) -> Option<PeerId> {
        self.inner.mesh.as_ref().map(|m| m.peer_id())
    }

    /// The node's place in the mesh (members, listen addresses, events), when
    /// it is on the network.
    pub fn mesh(&self) -> Option<&Mesh> {
        self.inner.mesh.as_deref()
    }

    /// The path of the node's database file.
    pub fn database_path(&self) -> PathBuf {
        self.inner.database_path.clone()
    }

    /// Creates a topic. Creating one that exists with the same config is a
    /// no-op; with a different config it is `Error::TopicExists`.
    pub async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<TopicDescription> {
        self.create_topic_in_mesh(name, config).await
    }

    /// Deletes a topic, its records and the offsets groups committed for it.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        self.delete_topic_in_mesh(name).await
    }

    /// The names of all topics, sorted.
    pub async fn list_topics(&self) -> Result<Vec<String>> {
        self.list_topics_in_mesh().await
    }

    /// A topic's config and the state of each partition.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        self.describe_topic_in_mesh(name).await
    }

    /// The consumer groups, sorted: those every `__offsets` coordinator
    /// knows (with members or committed offsets).
    pub async fn list_groups(&self) -> Result<Vec<String>> {
        self.list_groups_in_mesh().await
    }

    /// A group's state, members with their partitions, and committed offsets
    /// with each partition's log end and lag (Kafka's `--describe --group`).
    pub async fn describe_group(&self, group: &str) -> Result<GroupInfo> {
        let request = crate::core::group::GroupRequest::Describe {
            group: group.to_string(),
        };
        let described = match self.ask_group(group, request).await? {
            crate::core::group::GroupResponse::Described(d) => d,
            other => return Err(Error::Refused(format!("unexpected answer {other:?}"))),
        };
        let mut offsets = Vec::new();
        let mut topics: std::collections::BTreeMap<String, TopicDescription> = Default::default();
        for ((topic, partition), committed) in described.offsets {
            if !topics.contains_key(&topic)
                && let Ok(description) = self.describe_topic_in_mesh(&topic).await
            {
                topics.insert(topic.clone(), description);
            }
            let bounds = topics
                .get(&topic)
                .and_then(|t| t.partitions.get(partition as usize))
                .map_or((0, committed), |p| (p.log_start_offset, p.high_watermark));
            offsets.push(GroupOffset::new(
                topic, partition, committed, bounds.0, bounds.1,
            ));
        }
        Ok(GroupInfo {
            group: described.group,
            state: described.state,
            generation: described.generation,
            assignor: described.assignor,
            members: described.members,
            offsets,
        })
    }

    /// Sets a group's committed offsets (Kafka's `--reset-offsets --execute`).
    /// The group must have no active members (`Error::Group(GroupNotEmpty)`
    /// otherwise); its consumers start from these offsets when they next join.
    pub async fn commit_group_offsets(
        &self,
        group: &str,
        offsets: Vec<(String, u32, u64)>,
    ) -> Result<()> {
        let request = crate::core::group::GroupRequest::Commit {
            group: group.to_string(),
            member: None,
            offsets: offsets.into_iter().map(|(t, p, o)| ((t, p), o)).collect(),
        };
        match self.ask_group(group, request).await? {
            crate::core::group::GroupResponse::Committed => Ok(()),
            other => Err(Error::Refused(format!("unexpected answer {other:?}"))),
        }
    }

    /// Recomputes the whole hash chain of one partition from its stored records
    /// and checks it against the head; returns the number of records checked.
    pub async fn verify_partition(&self, topic: &str, partition: u32) -> Result<u64> {
        Ok(self.store()?.verify_partition(topic, partition)?.records)
    }

    /// Runs retention now instead of waiting for the next periodic check;
    /// returns the number of segments dropped.
    pub async fn enforce_retention(&self) -> Result<u64> {
        match self
            .inner
            .write(WriteOp::EnforceRetention { now_ms: now_ms() })
            .await?
        {
            WriteOutcome::RetentionApplied { segments_dropped } => Ok(segments_dropped),
            other => Err(unexpected(other)),
        }
    }

    /// A producer sending through this node.
    pub fn producer(&self, config: ProducerConfig) -> Producer {
        Producer::new(self.clone(), config)
    }

    /// A consumer reading through this node.
    pub fn consumer(&self, config: ConsumerConfig) -> Result<Consumer> {
        Consumer::new(self.clone(), config)
    }

    /// Stops the writer and background tasks after the writes already queued,
    /// and closes the database file (once reads in progress finish). Later
    /// requests, from this node or its producers and consumers, fail with
    /// `Error::Closed`.
    pub async fn shutdown(&self) {
        let tasks = self.inner.tasks.lock().ok().and_then(|mut t| t.take());
        let Some(tasks) = tasks else {
            // Another caller is shutting the node down: wait until it is done.
            let mut done = self.inner.shut_down.subscribe();
            let _ = done.wait_for(|done| *done).await;
            return;
        };
        // Set however this ends, also if the caller drops this future.
        let _finished = SignalOnDrop(&self.inner.shut_down);
        if let Some(mesh) = &self.inner.mesh {
            mesh.shutdown().await;
        }
        let _ = tasks.stop.send(true);
        let _ = tasks.retention.await;
        if let Some(replicator) = tasks.replicator {
            let _ = replicator.await;
        }
        if let Some(coordinator) = tasks.coordinator {
            let _ = coordinator.await;
        }
        if self.inner.writes.send(WriterMessage::Stop).await.is_err() {
            debug!("writer already stopped");
        }
        let joined = tokio::task::spawn_blocking(move || tasks.writer.join()).await;
        if !matches!(joined, Ok(Ok(()))) {
            warn!("the writer thread ended abnormally");
        }
        if let Ok(mut store) = self.inner.store.write() {
            store.take();
        }
        info!("node shut down");
    }

    /// The store, until the node shuts down.
    pub(crate) fn store(&self) -> Result<Arc<Store>> {
        match self.inner.store.read() {
            Ok(guard) => guard.clone().ok_or(Error::Closed),
            Err(_) => Err(Error::Closed),
        }
    }
}

/// The answer to one queued write, received once its transaction commits.
pub(crate) type WriteReply = oneshot::Receiver<Result<WriteOutcome, StoreError>>;

/// The writer's queue, for tasks that write without a [`Node`] handle.
#[derive(Clone)]
pub(crate) struct WriteQueue {
    tx: mpsc::Sender<WriterMessage>,
}

impl WriteQueue {
    /// Enqueues `op` (waiting for room); await the receiver for its outcome.
    pub(crate) async fn submit(&self, op: WriteOp) -> Result<WriteReply> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(WriterMessage::Write { op, reply })
            .await
            .map_err(|_| Error::Closed)?;
        Ok(answer)
    }

    /// Enqueues `op` and waits for its outcome.
    pub(crate) async fn write(&self, op: WriteOp) -> Result<WriteOutcome> {
        await_reply(self.submit(op).await?).await
    }
}

/// Waits for a queued write's outcome.
pub(crate) async fn await_reply(answer: WriteReply) -> Result<WriteOutcome> {
    Ok(answer.await.map_err(|_| Error::Closed)??)
}

impl NodeInner {
    async fn write(&self, op: WriteOp) -> Result<WriteOutcome> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(WriterMessage::Write { op, reply })
            .await
            .map_err(|_| Error::Closed)?;
        await_reply(answer).await
    }
}

fn unexpected(outcome: WriteOutcome) -> Error {
    Error::Store(StoreError::CommitFailed(format!(
        "unexpected outcome {outcome:?}"
    )))
}

/// The writer thread: takes every queued request (up to `max_group`) into one
/// transaction, commits, then answers each request.
///
/// The first transaction that fails (a full disk, an I/O error, a corrupt
/// page) or panics ends the store's writing for good: redb takes no writes
/// after a failed commit, and a log that silently stops growing would leave
/// the node voting and leading on a disk it cannot use. The writer reports
/// the failure on `failed` (the node then stops) and answers every later
/// write with [`StoreError::Failed`] until it is told to stop.
fn run_writer(
    store: &Store,
    mut queue: mpsc::Receiver<WriterMessage>,
    failed: &watch::Sender<Option<String>>,
    max_group: usize,
) {
    while let Some(first) = queue.blocking_recv() {
        let mut ops = Vec::new();
        let mut replies = Vec::new();
        let mut stop = false;
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                WriterMessage::Write { op, reply } => {
                    ops.push(op);
                    replies.push(reply);
                }
                WriterMessage::Stop => {
                    stop = true;
                    break;
                }
            }
            if ops.len() < max_group {
                next = queue.try_recv().ok();
            }
        }
        if let Some(reason) = failed.borrow().clone() {
            for reply in replies {
                let _ = reply.send(Err(StoreError::Failed(reason.clone())));
            }
        } else if !ops.is_empty() {
            let committed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                commit_group(store, ops, replies)
            }));
            let failure = match committed {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(error.to_string()),
                Err(_) => Some("the writer thread panicked".to_string()),
            };
            if let Some(reason) = failure {
                failed.send_replace(Some(reason));
            }
        }
        if stop {
            break;
        }
    }
}

/// Commits one group and answers its requests; the error is the failed
/// transaction's (every request in it is answered with it too).
fn commit_group(
    store: &Store,
    ops: Vec<WriteOp>,
    replies: Vec<oneshot::Sender<Result<WriteOutcome, StoreError>>>,
) -> Result<(), StoreError> {
    match store.write(ops) {
        Ok(results) => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
            Ok(())
        }
        Err(e) => {
            let message = e.to_string();
            for reply in replies {
                let _ = reply.send(Err(StoreError::CommitFailed(message.clone())));
            }
            Err(e)
        }
    }
}

/// Sets a flag when dropped.
struct SignalOnDrop<'a>(&'a watch::Sender<bool>);

impl Drop for SignalOnDrop<'_> {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

/// Stops the node when its store fails: one line says why, then the node
/// shuts down (replicas and coordinators stop, so it leads and votes nowhere,
/// and it leaves the mesh). Ends with the node.
async fn stop_on_store_failure(
    node: std::sync::Weak<NodeInner>,
    mut failure: watch::Receiver<Option<String>>,
) {
    let Ok(reason) = failure.wait_for(Option::is_some).await.map(|r| r.clone()) else {
        return;
    };
    let Some(inner) = node.upgrade() else { return };
    tracing::error!(
        reason = reason.as_deref().unwrap_or_default(),
        "the store failed: this node steps down from every partition, leaves the mesh and stops"
    );
    Node { inner }.shutdown().await;
}

/// Runs retention every `interval` until told to stop.
async fn run_retention(
    writes: mpsc::Sender<WriterMessage>,
    interval: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            _ = ticks.tick() => {}
        }
        let (reply, answer) = oneshot::channel();
        let op = WriteOp::EnforceRetention { now_ms: now_ms() };
        if writes
            .send(WriterMessage::Write { op, reply })
            .await
            .is_err()
        {
            return;
        }
        match answer.await {
            Ok(Ok(WriteOutcome::RetentionApplied { segments_dropped })) if segments_dropped > 0 => {
                info!(segments_dropped, "retention dropped segments");
            }
            Ok(Err(e)) => warn!(error = %e, "retention failed"),
            _ => {}
        }
    }
}
