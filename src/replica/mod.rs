//! The replication driver: one task that runs every partition replica this
//! node hosts over the pure core (`core::replication`).
//!
//! The task owns the [`PartitionReplica`]s. It feeds them ticks, peers'
//! replication messages, produce requests and store confirmations, and
//! carries out what they return: messages go to the mesh, writes go to the
//! node's writer (group commit), and their outcomes come back in the order
//! the writer committed them. Nothing else touches a replica, so no lock is
//! needed and the core sees one input at a time.
//!
//! Peers' topic requests (create, delete, describe) arrive here too, since
//! creating a topic opens its replicas.

pub mod dedup;
#[cfg(feature = "fault-injection")]
pub mod driven;
mod partition;
mod readable;
mod spans;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::chain::MessageId;
use crate::config::TopicConfig;
use crate::core::membership::Status;
use crate::core::ownership::{OwnershipRecord, OwnershipTable};
use crate::core::placement;
use crate::core::replication::{Message, ReplicationConfig};
use crate::meta::{META_TOPIC, MetaCommand};
use crate::net::{InboundRequest, Mesh, NodeId};
use crate::node::{PartitionDescription, TopicDescription, WriteQueue, now_ms};
use crate::protocol::{
    FetchFrame, Fetched, PeerRequest, PeerResponse, ProduceFrame, Produced, Refusal, ReplicateFrame,
};
use crate::store::{Store, StoredEntries, TopicEntry, WriteOp, WriteOutcome};

pub(crate) use partition::Leadership;
use partition::{
    Effect, PartitionReplica, PartitionSettings, PendingProduce, ProduceReadDone, ProduceReply,
    ProduceStep, WriteKind,
};
use readable::Readable;

/// How often replicas get a tick (elections, heartbeats, timeouts).
const TICK: Duration = Duration::from_millis(50);

/// How often leaders move their replica sets toward their targets.
const PLACEMENT_INTERVAL: Duration = Duration::from_millis(500);

/// Requests from the node to its replicator.
pub(crate) enum Request {
    /// Produce through a local replica.
    Produce {
        frame: ProduceFrame,
        reply: ProduceReply,
    },
    /// Committed records of a partition hosted here.
    Fetch {
        frame: FetchFrame,
        reply: oneshot::Sender<Result<Fetched, Refusal>>,
    },
    /// Whether this node leads a partition with its whole log readable.
    Leadership {
        topic: String,
        partition: u32,
        reply: oneshot::Sender<Leadership>,
    },
    /// The live state of the replicas of a topic hosted here.
    Describe {
        name: String,
        reply: oneshot::Sender<BTreeMap<u32, ReplicaStatus>>,
    },
}

/// A hosted replica's state, for descriptions.
#[derive(Clone, Debug)]
pub(crate) struct ReplicaStatus {
    pub epoch: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub target: Vec<NodeId>,
    pub leader: Option<NodeId>,
    pub in_sync: Vec<NodeId>,
    pub high_watermark: u64,
    pub head: MessageId,
}

/// The handle to the replication task.
#[derive(Clone)]
pub(crate) struct Replicator {
    requests: mpsc::Sender<Request>,
}

/// What the replication task runs with.
pub(crate) struct ReplicatorSetup {
    /// This node.
    pub me: NodeId,
    /// Its store, for reads.
    pub store: Arc<Store>,
    /// Its writer's queue.
    pub writes: WriteQueue,
    /// Its place in the mesh; `None` for a node without network (a mesh of one).
    pub mesh: Option<Arc<Mesh>>,
    /// Peers' requests.
    pub inbound: mpsc::Receiver<InboundRequest>,
    /// Turns true when the node shuts down.
    pub stop: watch::Receiver<bool>,
    /// Whether it may found a mesh.
    pub founding: Founding,
    /// The ownership table it shares with the node.
    pub ownership: SharedOwnership,
    /// How long a leader remembers records' dedup keys.
    pub dedup_window: Duration,
    /// How often replicas of quiet partitions drop every committed entry
    /// from memory (the retention check interval: retention applies only
    /// below a replica's snapshot point).
    pub quiet_compaction: Duration,
    /// Where consumer-group requests from peers go.
    pub groups: mpsc::Sender<crate::coordinator::GroupCall>,
}

impl Replicator {
    /// Starts the task.
    pub fn start(setup: ReplicatorSetup) -> (Replicator, tokio::task::JoinHandle<()>) {
        let ReplicatorSetup {
            me,
            store,
            writes,
            mesh,
            inbound,
            stop,
            founding,
            ownership,
            dedup_window,
            quiet_compaction,
            groups,
        } = setup;
        let (requests, receiver) = mpsc::channel(1024);
        let (reads_done, reads) = mpsc::unbounded_channel();
        let (dedup_done, dedups) = mpsc::unbounded_channel();
        let (produce_reads_done, produce_reads) = mpsc::unbounded_channel();
        let task = Task {
            me,
            store,
            writes,
            mesh,
            replicas: BTreeMap::new(),
            start: Instant::now(),
            settings: PartitionSettings {
                replication: ReplicationConfig::default(),
                replica_lag: Duration::from_secs(5),
                produce_timeout: Duration::from_secs(30),
                dedup_window,
            },
            pending: FuturesOrdered::new(),
            unknown_topics: BTreeMap::new(),
            live: Vec::new(),
            placed_at: Instant::now(),
            quiet_compaction,
            compacted_at: Instant::now(),
            founding,
            ownership,
            readable: Arc::new(Readable::new()),
            generations: 0,
            outbox: Vec::new(),
            reading: BTreeSet::new(),
            reads_done,
            dedup_done,
            produce_reads_done,
            groups,
        };
        let done = (reads, dedups, produce_reads);
        let handle = tokio::spawn(task.run(receiver, inbound, done, stop));
        (Replicator { requests }, handle)
    }

    /// Sends a request to the task.
    pub async fn request(&self, request: Request) -> Result<(), Refusal> {
        self.requests
            .send(request)
            .await
            .map_err(|_| Refusal::Other("the node is shutting down".into()))
    }
}

type Key = (String, u32);

/// A store write in flight, with what to tell its partition when it lands.
type PendingWrite = futures::future::BoxFuture<
    'static,
    (
        Key,
        u64,
        WriteKind,
        Result<Option<crate::store::LogEnd>, crate::error::StoreError>,
    ),
>;

struct Task {
    me: NodeId,
    store: Arc<Store>,
    writes: WriteQueue,
    /// `None` for a node without network: it is a mesh of one.
    mesh: Option<Arc<Mesh>>,
    replicas: BTreeMap<Key, PartitionReplica>,
    start: Instant,
    settings: PartitionSettings,
    /// Writes in flight, in the order the writer commits them.
    pending: FuturesOrdered<PendingWrite>,
    /// Topics a peer replicates to us that we do not know yet, with when we
    /// last asked about them.
    unknown_topics: BTreeMap<String, Instant>,
    /// The storage nodes not known dead (this one included), as of `placed_at`.
    live: Vec<NodeId>,
    /// When leaders last moved their replica sets toward their targets.
    placed_at: Instant,
    /// How often quiet partitions are compacted, and when they last were.
    quiet_compaction: Duration,
    compacted_at: Instant,
    /// Whether this node may start the metadata log of a new mesh.
    founding: Founding,
    /// Who leads what: merged from this node's own leadership and peers' gossip.
    ownership: SharedOwnership,
    /// How far each replica knows its records committed and durable here:
    /// fetches read up to it before the high watermark is stored.
    readable: Arc<Readable>,
    /// Replicas opened so far: each opening gets the next number, so that
    /// outcomes of writes from before a restart are told apart.
    generations: u64,
    /// Replication messages of the current turn, sent at its end (appends to
    /// one follower merged): see [`Task::run`].
    outbox: Vec<(NodeId, ReplicateFrame)>,
    /// (follower, partition) pairs with a store read for an append in
    /// flight: at most one each (the core asks again on its next heartbeat).
    reading: BTreeSet<(NodeId, Key)>,
    /// Where reads on the blocking pool hand back their message.
    reads_done: mpsc::UnboundedSender<ReadDone>,
    /// Where dedup indexes built on the blocking pool come back.
    dedup_done: mpsc::UnboundedSender<DedupBuilt>,
    /// Where produce requests put aside for a store read come back.
    produce_reads_done: mpsc::UnboundedSender<ProduceReadFinished>,
    /// This node's group coordinators.
    groups: mpsc::Sender<crate::coordinator::GroupCall>,
}

/// A message to a follower read from the store off the task: (follower,
/// partition, the message if the store still held what it needs).
type ReadDone = (NodeId, Key, Option<ReplicateFrame>);

/// A store read for a produce request done off the task: (replica
/// generation, the request, what the read found).
type ProduceReadFinished = (
    u64,
    PendingProduce,
    Result<ProduceReadDone, crate::error::StoreError>,
);

/// A dedup index built off the task: (partition, replica generation, the
/// epoch it was asked for, the index).
type DedupBuilt = (Key, u64, u64, crate::core::dedup::DedupIndex);

/// The ownership table a node's tasks share.
pub(crate) type SharedOwnership = Arc<std::sync::Mutex<OwnershipTable<NodeId>>>;

/// When a storage node that has no metadata log starts one (founds a mesh)
/// instead of waiting to receive it from a peer.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Founding {
    /// Never: it joins through bootstrap peers, which hold the log.
    Never,
    /// At once: a node without network is a mesh of one.
    Now,
    /// After [`FOUNDING_WAIT`] without receiving the log.
    Alone,
    /// After [`FOUNDING_WAIT`], and only if it has the lowest peer id of the
    /// storage nodes it knows (nodes that find each other by mDNS), so that
    /// nodes started together found one mesh.
    LowestId,
}

/// How long a node without the metadata log waits for a peer to send it.
const FOUNDING_WAIT: Duration = Duration::from_secs(2);

impl Task {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut inbound: mpsc::Receiver<InboundRequest>,
        (mut reads, mut dedups, mut produce_reads): (
            mpsc::UnboundedReceiver<ReadDone>,
            mpsc::UnboundedReceiver<DedupBuilt>,
            mpsc::UnboundedReceiver<ProduceReadFinished>,
        ),
        mut stop: watch::Receiver<bool>,
    ) {
        self.open_hosted();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            // One turn: the event that woke the task, then whatever else is
            // already queued (up to a bound), then the replication messages
            // they produced, with consecutive appends to a follower merged.
            // Under load many produce requests share one append per follower
            // (and so one follower write and one reply).
            tokio::select! {
                _ = stop.changed() => break,
                Some(request) = requests.recv() => self.on_request(request).await,
                Some(request) = inbound.recv() => self.on_inbound(request).await,
                Some((key, generation, kind, outcome)) = self.pending.next(), if !self.pending.is_empty() => {
                    self.on_written(key, generation, kind, outcome).await;
                }
                Some((key, generation, epoch, index)) = dedups.recv() => {
                    if let Some(replica) = self.replicas.get_mut(&key)
                        && replica.generation() == generation
                    {
                        replica.install_dedup(epoch, index);
                    }
                }
                Some(done) = produce_reads.recv() => self.on_produce_read(done).await,
                Some((to, key, frame)) = reads.recv() => {
                    self.reading.remove(&(to, key));
                    self.outbox.extend(frame.map(|frame| (to, frame)));
                }
                _ = tick.tick() => self.on_tick().await,
            }
            for _ in 0..TURN_EVENTS {
                if let Ok(request) = requests.try_recv() {
                    self.on_request(request).await;
                } else if let Ok(request) = inbound.try_recv() {
                    self.on_inbound(request).await;
                } else {
                    break;
                }
            }
            self.flush_outbox().await;
        }
        self.close_replicas().await;
        debug!("replicator stopped");
    }

    /// A clean stop: every replica stores its commit point (all in one group
    /// commit) and closes.
    async fn close_replicas(&mut self) {
        let mut answers = Vec::new();
        for (key, replica) in self.replicas.iter_mut() {
            if let Some(write) = replica.unstored_high_watermark() {
                let (op, _) = write.into_op(&key.0, key.1);
                match self.writes.submit(op).await {
                    Ok(answer) => answers.push(answer),
                    Err(error) => warn!(%error, "the writer is gone"),
                }
            }
            replica.close();
        }
        for answer in answers {
            if let Err(error) = crate::node::await_reply(answer).await {
                warn!(%error, "a commit point was not stored at the stop");
            }
        }
    }

    /// Opens a replica for every partition of every stored topic this node hosts.
    fn open_hosted(&mut self) {
        let topics = match self.store.list_topics() {
            Ok(topics) => topics,
            Err(error) => {
                warn!(%error, "cannot list topics to replicate");
                return;
            }
        };
        for topic in topics {
            self.open_topic(&topic);
        }
    }

    /// Opens the replicas of `topic` this node hosts: those of its first
    /// replica sets, and those it joined later (it holds their log).
    fn open_topic(&mut self, topic: &TopicEntry) {
        for (partition, voters) in topic.replicas.iter().enumerate() {
            let partition = partition as u32;
            let joined_later = || {
                self.store
                    .replica_log(&topic.name, partition)
                    .is_ok_and(|log| log.snapshot.is_some() || !log.entries.is_empty())
            };
            if voters.contains(&self.me) || joined_later() {
                self.open_partition(topic, partition);
            }
        }
    }

    /// A store write of a partition finished. A log write the store refused
    /// (a batch that does not extend the log, a full disk) leaves the replica
    /// believing in entries its disk does not hold: it restarts from what
    /// the disk holds, as after a crash, and catches up again.
    async fn on_written(
        &mut self,
        key: Key,
        generation: u64,
        kind: WriteKind,
        outcome: Result<Option<crate::store::LogEnd>, crate::error::StoreError>,
    ) {
        let now = self.now();
        let failed_log = matches!(kind, WriteKind::Log) && outcome.is_err();
        let Some(replica) = self.replicas.get_mut(&key) else {
            return;
        };
        if replica.generation() != generation {
            // A write of the replica before it restarted: its outcome is void.
            return;
        }
        let effects = replica.on_written(kind, outcome, now);
        self.run_effects(&key, effects).await;
        if failed_log && let Some(mut replica) = self.replicas.remove(&key) {
            warn!(topic = %key.0, partition = key.1, "restarting the replica from its durable log");
            replica.close();
            if let Ok(topic) = self.store.topic(&key.0) {
                self.open_partition(&topic, key.1);
            }
        }
    }

    /// Opens one replica (a no-op when it is open). The replica starts with
    /// the partition's first replica set and learns later ones from its log.
    fn open_partition(&mut self, topic: &TopicEntry, partition: u32) {
        let key = (topic.name.clone(), partition);
        let Some(voters) = topic.replicas.get(partition as usize) else {
            return;
        };
        if self.replicas.contains_key(&key) {
            return;
        }
        let seed = seed_for(&self.me, &topic.name, partition);
        match PartitionReplica::open(
            &self.store,
            self.me,
            &topic.name,
            partition,
            topic.config.clone(),
            voters.clone(),
            self.settings.clone(),
            self.now(),
            seed,
        ) {
            Ok(mut replica) => {
                self.generations += 1;
                replica.set_generation(self.generations);
                self.replicas.insert(key, replica);
            }
            Err(error) => {
                warn!(topic = %topic.name, partition, %error, "cannot open replica");
            }
        }
    }

    async fn on_tick(&mut self) {
        if self.placed_at.elapsed() >= PLACEMENT_INTERVAL {
            self.placed_at = Instant::now();
            self.refresh_live().await;
            self.found_mesh().await;
            self.place().await;
            self.announce_ownership().await;
        }
        self.apply_meta().await;
        let now = self.now();
        let compact = self.compacted_at.elapsed() >= self.quiet_compaction;
        if compact {
            self.compacted_at = Instant::now();
        }
        let keys: Vec<Key> = self.replicas.keys().cloned().collect();
        for key in keys {
            let Some(replica) = self.replicas.get_mut(&key) else {
                continue;
            };
            let mut effects = replica.tick(now);
            if compact {
                effects.extend(replica.compact_if_quiet());
            }
            self.run_effects(&key, effects).await;
        }
    }

    /// Learns which storage nodes are not dead, from the membership.
    async fn refresh_live(&mut self) {
        let Some(mesh) = &self.mesh else {
            self.live = vec![self.me];
            return;
        };
        let Ok(members) = mesh.members().await else {
            return;
        };
        let mut live: Vec<NodeId> = members
            .into_iter()
            .filter(|m| m.status != Status::Dead)
            .filter(|m| m.is_storage())
            .map(|m| m.peer)
            .collect();
        live.push(self.me);
        live.sort();
        live.dedup();
        self.live = live;
    }

    /// The partition's target replicas: the top-RF live storage nodes by
    /// rendezvous hash.
    fn target(&self, topic: &str, partition: u32, rf: usize) -> Vec<NodeId> {
        placement::target_replicas(topic, partition, &self.live, rf)
    }

    /// Nodes that should hold a partition's log without voting: every other
    /// live storage node, for the metadata log; nobody, for other topics.
    fn observers(&self, topic: &str, target: &[NodeId]) -> Vec<NodeId> {
        if topic != META_TOPIC {
            return Vec::new();
        }
        self.live
            .iter()
            .filter(|n| !target.contains(n))
            .copied()
            .collect()
    }

    /// Starts the metadata log of a new mesh, when this node may (see
    /// [`Founding`]) and has not received one.
    async fn found_mesh(&mut self) {
        let waited = self.start.elapsed() >= FOUNDING_WAIT;
        if self.store.topic(META_TOPIC).is_ok() {
            return;
        }
        let may = match self.founding {
            Founding::Never => false,
            Founding::Now => true,
            Founding::Alone => waited,
            Founding::LowestId => waited && self.live.first() == Some(&self.me),
        };
        if !may {
            return;
        }
        let mesh_id = {
            use std::hash::BuildHasher;
            std::hash::RandomState::new().hash_one((self.me, now_ms()))
        };
        info!(mesh = %format!("{mesh_id:016x}"), "no mesh found: starting a new one (this node holds its metadata log)");
        if let Err(error) = self.adopt_mesh(mesh_id).await {
            warn!(%error, "cannot record the new mesh");
            return;
        }
        // The metadata log is kept whole: a node that joins later replays it all.
        let config = TopicConfig::default().with_retention(crate::config::Retention {
            time: None,
            bytes: None,
        });
        if let Err(refusal) = self
            .create_topic(META_TOPIC.to_string(), config, vec![vec![self.me]])
            .await
        {
            warn!(?refusal, "cannot start the metadata log");
        }
    }

    /// Joins the mesh of `peer`, which sends us the metadata log: adopts its
    /// mesh id unless this node belongs to another mesh already (then
    /// refuses, and says so).
    async fn join_mesh_of(&mut self, peer: NodeId) -> bool {
        let Some(mesh) = &self.mesh else {
            return false;
        };
        let theirs = match mesh.members().await {
            Ok(members) => members
                .into_iter()
                .find(|m| m.peer == peer)
                .and_then(|m| m.meta)
                .and_then(|meta| meta.mesh_id),
            Err(_) => None,
        };
        let ours = self.store.mesh_id().ok().flatten();
        match (theirs, ours) {
            (Some(theirs), Some(ours)) if theirs != ours => {
                warn!(%peer, "refusing the metadata log of mesh {theirs:016x}: this node belongs to mesh {ours:016x}");
                false
            }
            (Some(theirs), None) => {
                info!(mesh = %format!("{theirs:016x}"), %peer, "joining the mesh");
                self.adopt_mesh(theirs).await.is_ok()
            }
            (Some(_), Some(_)) => true,
            // The peer's mesh id has not reached us yet: ask again later.
            (None, _) => false,
        }
    }

    /// Records the mesh this node belongs to and announces it in its gossip.
    async fn adopt_mesh(&mut self, mesh_id: u64) -> Result<(), crate::error::Error> {
        self.writes.write(WriteOp::SetMeshId { mesh_id }).await?;
        match &self.mesh {
            Some(mesh) => mesh
                .set_mesh_id(mesh_id)
                .await
                .map_err(crate::error::Error::Net),
            None => Ok(()),
        }
    }

    /// Applies newly committed records of the metadata log to the topic table,
    /// in offset order, and opens or closes the replicas they concern.
    async fn apply_meta(&mut self) {
        let key = (META_TOPIC.to_string(), 0);
        let Some(committed) = self
            .replicas
            .get(&key)
            .map(PartitionReplica::high_watermark)
        else {
            return;
        };
        let Ok(applied) = self.store.meta_applied() else {
            return;
        };
        if committed <= applied {
            return;
        }
        let Ok(read) = self.store.read(META_TOPIC, 0, applied, 1 << 20) else {
            return;
        };
        for record in read.records {
            let command: Option<MetaCommand> = crate::wire::decode(record.value()).ok();
            if command.is_none() {
                warn!(
                    offset = record.offset,
                    "skipping an unreadable metadata record"
                );
            }
            let op = WriteOp::ApplyMeta {
                offset: record.offset,
                command: command.clone(),
                now_ms: now_ms(),
            };
            if let Err(error) = self.writes.write(op).await {
                warn!(%error, "cannot apply a metadata record");
                return;
            }
            match command {
                Some(MetaCommand::CreateTopic { name, .. }) => {
                    if let Ok(topic) = self.store.topic(&name) {
                        info!(topic = %name, partitions = topic.config.partitions, "topic created");
                        self.open_topic(&topic);
                    }
                }
                Some(MetaCommand::DeleteTopic { name }) if self.store.topic(&name).is_err() => {
                    info!(topic = %name, "topic deleted");
                    self.close_topic(&name);
                    if let Ok(mut table) = self.ownership.lock() {
                        table.forget_topic(&name);
                    }
                }
                Some(MetaCommand::DeleteTopic { .. }) | None => {}
            }
        }
    }

    fn close_topic(&mut self, name: &str) {
        let keys: Vec<Key> = self
            .replicas
            .keys()
            .filter(|(t, _)| t == name)
            .cloned()
            .collect();
        for key in keys {
            if let Some(mut replica) = self.replicas.remove(&key) {
                replica.close();
            }
            self.readable.forget(&key);
        }
    }

    /// Tells every other live storage node which partitions this node leads
    /// (epoch, replicas, committed offset, head); they keep the highest epoch.
    async fn announce_ownership(&mut self) {
        let records: Vec<OwnershipRecord<NodeId>> = self
            .replicas
            .iter()
            .filter(|(_, r)| r.core().is_leader())
            .map(|((topic, partition), r)| OwnershipRecord {
                topic: topic.clone(),
                partition: *partition,
                epoch: r.core().epoch(),
                leader: self.me,
                replicas: r.core().voters().to_vec(),
                committed: r.high_watermark(),
                head: r.committed_head(),
            })
            .collect();
        if records.is_empty() {
            return;
        }
        self.merge_ownership(records.clone());
        let peers: Vec<NodeId> = self
            .live
            .iter()
            .filter(|p| **p != self.me)
            .copied()
            .collect();
        for peer in peers {
            let request = PeerRequest::Ownership(records.clone());
            send_to(self.mesh.clone(), peer, request).await;
        }
    }

    fn merge_ownership(&self, records: Vec<OwnershipRecord<NodeId>>) {
        if let Ok(mut table) = self.ownership.lock() {
            for record in records {
                table.merge(record);
            }
        }
    }

    /// Each partition this node leads takes one step toward its target.
    async fn place(&mut self) {
        let now = self.now();
        let keys: Vec<Key> = self
            .replicas
            .iter()
            .filter(|(_, r)| r.core().is_leader())
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            let Some(rf) = self.replicas.get(&key).map(PartitionReplica::rf) else {
                continue;
            };
            let target = self.target(&key.0, key.1, rf);
            let observers = self.observers(&key.0, &target);
            let Some(replica) = self.replicas.get_mut(&key) else {
                continue;
            };
            let effects = replica.reconfigure(&target, &observers, now);
            self.run_effects(&key, effects).await;
        }
    }

    async fn on_request(&mut self, request: Request) {
        match request {
            Request::Produce { frame, reply } => {
                self.produce(PendingProduce::new(frame, reply)).await
            }
            Request::Fetch { frame, reply } => self.fetch(frame, reply),
            Request::Leadership {
                topic,
                partition,
                reply,
            } => {
                let answer = match self.replicas.get(&(topic, partition)) {
                    Some(replica) => replica.leadership(),
                    None => Leadership::Follower { hint: None },
                };
                let _ = reply.send(answer);
            }
            Request::Describe { name, reply } => {
                let _ = reply.send(self.statuses(&name));
            }
        }
    }

    /// The state of a topic's partitions as this node knows it: its own
    /// replicas' live state, and for the partitions it does not host, what
    /// their leaders gossiped.
    fn statuses(&self, name: &str) -> BTreeMap<u32, ReplicaStatus> {
        let now = self.now();
        let mut out: BTreeMap<u32, ReplicaStatus> = self
            .replicas
            .iter()
            .filter(|((topic, _), _)| topic == name)
            .map(|((topic, partition), r)| {
                let status = ReplicaStatus {
                    epoch: r.core().epoch(),
                    voters: r.core().members().voters.clone(),
                    learners: r.core().members().learners.clone(),
                    target: self.target(topic, *partition, r.rf()),
                    leader: r.core().leader_hint().copied(),
                    in_sync: r.in_sync(now),
                    high_watermark: r.high_watermark(),
                    head: r.committed_head(),
                };
                (*partition, status)
            })
            .collect();
        let partitions = self.store.topic(name).map_or(0, |t| t.config.partitions);
        if let Ok(table) = self.ownership.lock() {
            for partition in 0..partitions {
                if out.contains_key(&partition) {
                    continue;
                }
                if let Some(record) = table.get(name, partition) {
                    let status = ReplicaStatus {
                        epoch: record.epoch,
                        voters: record.replicas.clone(),
                        learners: Vec::new(),
                        target: Vec::new(),
                        leader: Some(record.leader),
                        in_sync: Vec::new(),
                        high_watermark: record.committed,
                        head: record.head,
                    };
                    out.insert(partition, status);
                }
            }
        }
        out
    }

    /// Serves a fetch from this node's replica: committed records only, and
    /// with none yet, waits up to the frame's `max_wait_ms` for some (on its
    /// own task, so the replicas keep running). A partition not hosted here is
    /// `NotLeader` with the leader as hint.
    fn fetch(&self, frame: FetchFrame, reply: oneshot::Sender<Result<Fetched, Refusal>>) {
        let key = (frame.topic.clone(), frame.partition);
        if !self.replicas.contains_key(&key) {
            let hint = self
                .ownership
                .lock()
                .ok()
                .and_then(|t| t.leader(&frame.topic, frame.partition).copied());
            let _ = reply.send(Err(Refusal::NotLeader { hint }));
            return;
        }
        let store = self.store.clone();
        let mut readable_end = self.readable.watch(&key);
        tokio::spawn(async move {
            let wait = Duration::from_millis(u64::from(frame.max_wait_ms).min(MAX_FETCH_WAIT_MS));
            let deadline = Instant::now() + wait;
            loop {
                let known_committed = *readable_end.borrow_and_update();
                let (reader, request) = (store.clone(), frame.clone());
                let answer = tokio::task::spawn_blocking(move || {
                    read_committed(&reader, &request, known_committed)
                })
                .await
                .unwrap_or_else(|e| Err(Refusal::Other(format!("the read failed: {e}"))));
                let short = matches!(&answer, Ok(f) if fetched_bytes(f) < (frame.min_bytes as usize).max(1));
                if !short || frame.offset.is_none() || Instant::now() >= deadline {
                    let _ = reply.send(answer);
                    return;
                }
                let woken = async {
                    if readable_end.changed().await.is_err() {
                        // The replica closed: nothing more comes.
                        tokio::time::sleep_until(deadline).await;
                    }
                };
                let _ = tokio::time::timeout_at(deadline, woken).await;
            }
        });
    }

    async fn produce(&mut self, request: PendingProduce) {
        let key = (request.frame.topic.clone(), request.frame.partition);
        let now = self.now();
        let Some(replica) = self.replicas.get_mut(&key) else {
            let refusal = self.not_hosted(&request.frame);
            request.refuse(refusal);
            return;
        };
        let effects = match replica.produce(request, now) {
            ProduceStep::Taken(effects) => effects,
            ProduceStep::Read(read, request) => {
                let (store, done) = (self.store.clone(), self.produce_reads_done.clone());
                let generation = replica.generation();
                tokio::task::spawn_blocking(move || {
                    let (topic, partition) = (&request.frame.topic, request.frame.partition);
                    let result = read.run(&store, topic, partition);
                    let _ = done.send((generation, request, result));
                });
                return;
            }
        };
        if let Some((epoch, window)) = replica.take_dedup_build() {
            let (store, done, generation) = (
                self.store.clone(),
                self.dedup_done.clone(),
                replica.generation(),
            );
            let key = key.clone();
            tokio::task::spawn_blocking(move || {
                let index = dedup::build(&store, &key.0, key.1, epoch, window);
                let _ = done.send((key, generation, epoch, index));
            });
        }
        self.run_effects(&key, effects).await;
    }

    /// A store read a produce request was put aside for is done: the request
    /// goes to its replica again (a reopened replica decides afresh).
    async fn on_produce_read(&mut self, done: ProduceReadFinished) {
        let (generation, mut request, result) = done;
        let key = (request.frame.topic.clone(), request.frame.partition);
        match result {
            Err(error) => request.refuse(Refusal::Other(error.to_string())),
            Ok(found) => {
                if let Some(replica) = self.replicas.get_mut(&key)
                    && replica.generation() == generation
                {
                    replica.read_done(&mut request, found);
                }
                self.produce(request).await;
            }
        }
    }

    /// Why a produce request for a partition not hosted here is refused.
    fn not_hosted(&self, frame: &ProduceFrame) -> Refusal {
        match self.store.topic(&frame.topic) {
            Ok(t) if frame.partition >= t.config.partitions => {
                Refusal::PartitionNotFound(frame.topic.clone(), frame.partition)
            }
            Ok(t) => Refusal::NotLeader {
                hint: t
                    .replicas
                    .get(frame.partition as usize)
                    .and_then(|r| r.first().copied()),
            },
            Err(_) => Refusal::TopicNotFound(frame.topic.clone()),
        }
    }

    async fn on_inbound(&mut self, inbound: InboundRequest) {
        let InboundRequest {
            from,
            request,
            reply,
        } = inbound;
        match request {
            PeerRequest::Replicate(frame) => {
                let _ = reply.send(PeerResponse::Ack);
                self.on_replicate(from, frame).await;
            }
            PeerRequest::ReplicateMany(frames) => {
                let _ = reply.send(PeerResponse::Ack);
                for frame in frames {
                    self.on_replicate(from, frame).await;
                }
            }
            PeerRequest::Produce(frame) => {
                let (tx, rx) = oneshot::channel();
                self.produce(PendingProduce::new(frame, tx)).await;
                tokio::spawn(async move {
                    let outcome = rx
                        .await
                        .unwrap_or(Err(Refusal::Other("the node is shutting down".into())));
                    let _ = reply.send(PeerResponse::Produced(outcome));
                });
            }
            PeerRequest::Fetch(frame) => {
                let (tx, rx) = oneshot::channel();
                self.fetch(frame, tx);
                tokio::spawn(async move {
                    let outcome = rx
                        .await
                        .unwrap_or(Err(Refusal::Other("the node is shutting down".into())));
                    let _ = reply.send(PeerResponse::Fetched(outcome));
                });
            }
            PeerRequest::Group(request) => {
                // On a task of its own: the coordinator waits on this task
                // (leadership, appends), so this task must never wait on it.
                let (tx, rx) = oneshot::channel();
                let call = crate::coordinator::GroupCall { request, reply: tx };
                let groups = self.groups.clone();
                tokio::spawn(async move {
                    let _ = groups.send(call).await;
                    let outcome = rx
                        .await
                        .unwrap_or(Err(crate::core::group::GroupError::NotCoordinator));
                    let _ = reply.send(PeerResponse::Group(outcome));
                });
            }
            PeerRequest::Ownership(records) => {
                let _ = reply.send(PeerResponse::Ack);
                self.merge_ownership(records);
            }
            PeerRequest::ListTopics => {
                let names = self
                    .store
                    .list_topics()
                    .map(|t| {
                        t.into_iter()
                            .map(|t| t.name)
                            .filter(|n| !crate::meta::is_internal(n))
                            .collect()
                    })
                    .unwrap_or_default();
                let _ = reply.send(PeerResponse::Topics(names));
            }
            PeerRequest::DescribeTopic { name } => {
                let answer = self.describe(&name);
                let _ = reply.send(PeerResponse::Topic(answer));
            }
        }
    }

    /// This node's view of a topic: stored metadata plus its replicas' live state.
    fn describe(&self, name: &str) -> Result<TopicDescription, Refusal> {
        let topic = self
            .store
            .topic(name)
            .map_err(|_| Refusal::TopicNotFound(name.to_string()))?;
        Ok(describe_entry(&self.store, &topic, &self.statuses(name)))
    }

    async fn on_replicate(&mut self, from: NodeId, frame: ReplicateFrame) {
        let key = (frame.topic.clone(), frame.partition);
        if !self.replicas.contains_key(&key) {
            self.learn_topic(from, &frame.topic).await;
            // A leader replicates to us: we are a new replica (a learner) of it.
            if let Ok(topic) = self.store.topic(&frame.topic) {
                self.open_partition(&topic, frame.partition);
            }
        }
        let now = self.now();
        let Some(replica) = self.replicas.get_mut(&key) else {
            return;
        };
        let batches = frame.batches.into_iter().map(|b| b.into_vec()).collect();
        let effects = replica.on_message(from, frame.message, batches, now);
        self.run_effects(&key, effects).await;
    }

    /// A peer replicates a topic we do not know. Topics come only from the
    /// metadata log, so for any other topic we wait until our copy of the log
    /// has it (the leader retries). The metadata log itself is how a node
    /// joins a mesh: ask the peer for it, at most once a second.
    async fn learn_topic(&mut self, from: NodeId, name: &str) {
        if name != META_TOPIC || self.store.topic(name).is_ok() {
            return;
        }
        if let Some(at) = self.unknown_topics.get(name)
            && at.elapsed() < Duration::from_secs(1)
        {
            return;
        }
        self.unknown_topics.insert(name.to_string(), Instant::now());
        let request = PeerRequest::DescribeTopic {
            name: name.to_string(),
        };
        let Some(mesh) = &self.mesh else {
            return;
        };
        let answer =
            tokio::time::timeout(Duration::from_secs(5), mesh.request(from, request)).await;
        if let Ok(Ok(PeerResponse::Topic(Ok(description)))) = answer {
            if name == META_TOPIC && !self.join_mesh_of(from).await {
                return;
            }
            let replicas = description
                .partitions
                .iter()
                .map(|p| p.replicas.clone())
                .collect();
            info!(topic = name, %from, "learned a topic from a peer");
            if let Err(refusal) = self
                .create_topic(description.name, description.config, replicas)
                .await
            {
                warn!(
                    topic = name,
                    ?refusal,
                    "cannot store a topic learned from a peer"
                );
            }
        }
    }

    async fn create_topic(
        &mut self,
        name: String,
        config: TopicConfig,
        replicas: Vec<Vec<NodeId>>,
    ) -> Result<(), Refusal> {
        let op = WriteOp::CreateTopic {
            name: name.clone(),
            config,
            now_ms: now_ms(),
            replicas,
        };
        match self.writes.write(op).await {
            Ok(WriteOutcome::TopicCreated { topic, created }) => {
                if created {
                    debug!(topic = %name, "topic stored");
                }
                self.open_topic(&topic);
                Ok(())
            }
            Ok(_) => Err(Refusal::Other("unexpected write outcome".into())),
            Err(e) => Err(Refusal::Other(e.to_string())),
        }
    }

    /// Carries out a partition's effects in order.
    async fn run_effects(&mut self, key: &Key, effects: Vec<Effect>) {
        if let Some(replica) = self.replicas.get(key) {
            self.readable.raise(key, replica.readable_end());
        }
        for effect in effects {
            match effect {
                Effect::Send {
                    to,
                    message,
                    batches,
                } => {
                    if batches.iter().any(|b| b.is_empty()) {
                        // Batches no longer cached: read on the blocking pool.
                        let bases = self
                            .replicas
                            .get(key)
                            .map(|r| r.uncached_bases(&message))
                            .unwrap_or_default();
                        self.read_off_task(to, key, move |store, key| {
                            fill_batches(store, key, message, batches, &bases)
                        });
                        continue;
                    }
                    let frame = ReplicateFrame {
                        topic: key.0.clone(),
                        partition: key.1,
                        message,
                        batches: batches
                            .iter()
                            .map(|b| serde_bytes::ByteBuf::from(b.as_ref().clone()))
                            .collect(),
                    };
                    self.outbox.push((to, frame));
                }
                Effect::SendStored {
                    to,
                    epoch,
                    from,
                    upto,
                    commit,
                } => self.read_off_task(to, key, move |store, key| {
                    stored_append(store, key, epoch, from, upto, commit)
                }),
                Effect::Write(write) => {
                    let (op, kind) = write.into_op(&key.0, key.1);
                    let answer = match self.writes.submit(op).await {
                        Ok(answer) => answer,
                        Err(error) => {
                            warn!(%error, "the writer is gone");
                            continue;
                        }
                    };
                    let key = key.clone();
                    let generation = self
                        .replicas
                        .get(&key)
                        .map_or(0, PartitionReplica::generation);
                    self.pending.push_back(Box::pin(async move {
                        let outcome = match answer.await {
                            Ok(Ok(WriteOutcome::LogReplicated(end))) => Ok(Some(end)),
                            Ok(Ok(_)) => Ok(None),
                            Ok(Err(e)) => Err(e),
                            Err(_) => Err(crate::error::StoreError::CommitFailed(
                                "the writer stopped".into(),
                            )),
                        };
                        (key, generation, kind, outcome)
                    }));
                }
            }
        }
    }
}

impl Task {
    /// Runs a store read for a message to follower `to` on the blocking
    /// pool, so that the task never waits on the disk; the message joins the
    /// outbox of the turn in which the read finishes. A pair with a read in
    /// flight skips this one (the core asks again on its next heartbeat).
    fn read_off_task(
        &mut self,
        to: NodeId,
        key: &Key,
        read: impl FnOnce(&Store, &Key) -> Option<ReplicateFrame> + Send + 'static,
    ) {
        if !self.reading.insert((to, key.clone())) {
            return;
        }
        let (store, key, done) = (self.store.clone(), key.clone(), self.reads_done.clone());
        tokio::task::spawn_blocking(move || {
            let frame = read(&store, &key);
            let _ = done.send((to, key, frame));
        });
    }

    /// Sends the turn's replication messages in order, merging an append to
    /// a follower into the previous append of the same partition to it when
    /// it continues it (same epoch, next offset): one append with the
    /// entries of both, which a follower handles as it would the two.
    async fn flush_outbox(&mut self) {
        let outbox = std::mem::take(&mut self.outbox);
        let mut merged: Vec<(NodeId, ReplicateFrame)> = Vec::with_capacity(outbox.len());
        let mut last_append: BTreeMap<(NodeId, Key), usize> = BTreeMap::new();
        for (to, frame) in outbox {
            let key = (to, (frame.topic.clone(), frame.partition));
            let target = last_append.get(&key).copied();
            if let Some(index) = target
                && let Some((_, previous)) = merged.get_mut(index)
                && merge_append(previous, &frame)
            {
                continue;
            }
            if matches!(frame.message, Message::Append { .. }) {
                last_append.insert(key, merged.len());
            } else {
                last_append.remove(&key);
            }
            merged.push((to, frame));
        }
        // One message per peer, carrying every partition's frames in order.
        let mut by_peer: BTreeMap<NodeId, Vec<(usize, Vec<ReplicateFrame>)>> = BTreeMap::new();
        for (to, frame) in merged {
            let bytes = frame_bytes(&frame.batches);
            let groups = by_peer.entry(to).or_default();
            match groups.last_mut() {
                Some((size, frames)) if *size + bytes <= MAX_MESSAGE_BYTES => {
                    *size += bytes;
                    frames.push(frame);
                }
                _ => groups.push((bytes, vec![frame])),
            }
        }
        let messages = by_peer
            .into_iter()
            .flat_map(|(to, groups)| groups.into_iter().map(move |(_, frames)| (to, frames)));
        for (to, mut frames) in messages {
            let request = if frames.len() == 1 {
                match frames.pop() {
                    Some(frame) => PeerRequest::Replicate(frame),
                    None => continue,
                }
            } else {
                PeerRequest::ReplicateMany(frames)
            };
            send_to(self.mesh.clone(), to, request).await;
        }
    }
}

/// Sends a one-way message to a peer (nowhere, on a mesh of one).
async fn send_to(mesh: Option<Arc<Mesh>>, to: NodeId, request: PeerRequest) {
    let Some(mesh) = mesh else {
        return;
    };
    if let Err(error) = mesh.send(to, request).await {
        debug!(%to, %error, "message to a peer not sent");
    }
}

/// Appends `next` to `previous` when both are appends of one epoch and `next`
/// starts where `previous` ends. Returns whether it did.
fn merge_append(previous: &mut ReplicateFrame, next: &ReplicateFrame) -> bool {
    let (
        Message::Append {
            epoch,
            prev_offset,
            entries,
            commit,
            ..
        },
        Message::Append {
            epoch: next_epoch,
            prev_offset: next_offset,
            entries: next_entries,
            commit: next_commit,
            ..
        },
    ) = (&mut previous.message, &next.message)
    else {
        return false;
    };
    let fits = *epoch == *next_epoch
        && *prev_offset + entries.len() as u64 == *next_offset
        && entries.len() + next_entries.len() <= MAX_MERGED_ENTRIES
        && frame_bytes(&previous.batches) + frame_bytes(&next.batches) <= MAX_MESSAGE_BYTES;
    if !fits {
        return false;
    }
    entries.extend(next_entries.iter().cloned());
    *commit = (*commit).max(*next_commit);
    previous.batches.extend(next.batches.iter().cloned());
    true
}

/// The bytes of the batches a frame carries.
fn frame_bytes(batches: &[serde_bytes::ByteBuf]) -> usize {
    batches.iter().map(|b| b.len()).sum()
}

/// Most batch bytes one merged replication message carries (the peer
/// protocol refuses frames over 32 MiB).
const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// Most events handled in one turn before its messages go out.
const TURN_EVENTS: usize = 256;

/// Most entries one merged append carries.
const MAX_MERGED_ENTRIES: usize = 256;

/// A topic as this node sees it: stored metadata, stored partition state, and
/// the live state of the replicas it hosts.
pub(crate) fn describe_entry(
    store: &Store,
    topic: &TopicEntry,
    live: &BTreeMap<u32, ReplicaStatus>,
) -> TopicDescription {
    let partitions = (0..topic.config.partitions)
        .map(|partition| {
            let state = store.partition_state(&topic.name, partition).ok();
            let status = live.get(&partition);
            let stored_high_watermark = state.as_ref().map_or(0, |s| s.high_watermark);
            let live_high_watermark = status.map_or(0, |s| s.high_watermark);
            let stored_head = state.as_ref().map_or(MessageId([0; 32]), |s| s.head);
            let replicas = status.map_or_else(
                || {
                    topic
                        .replicas
                        .get(partition as usize)
                        .cloned()
                        .unwrap_or_default()
                },
                |s| s.voters.clone(),
            );
            PartitionDescription {
                partition,
                epoch: status.map_or_else(|| state.as_ref().map_or(0, |s| s.epoch), |s| s.epoch),
                log_start_offset: state.as_ref().map_or(0, |s| s.log_start_offset),
                // A replica that just opened has not learned its commit point
                // yet: what the store holds committed is never less.
                high_watermark: live_high_watermark.max(stored_high_watermark),
                log_end_offset: state.as_ref().map_or(0, |s| s.log_end_offset),
                head: match status {
                    Some(s) if s.high_watermark >= stored_high_watermark => s.head,
                    _ => stored_head,
                },
                bytes: state.as_ref().map_or(0, |s| s.bytes),
                leader: status.and_then(|s| s.leader),
                replicas,
                in_sync: status.map(|s| s.in_sync.clone()).unwrap_or_default(),
                learners: status.map(|s| s.learners.clone()).unwrap_or_default(),
                target_replicas: status.map(|s| s.target.clone()).unwrap_or_default(),
            }
        })
        .collect();
    TopicDescription {
        name: topic.name.clone(),
        config: topic.config.clone(),
        partitions,
    }
}

/// An append from the leader's memory whose batches are not all cached,
/// with the missing ones (at record offsets `bases`, one per empty slot)
/// read from the store. `None` (and a log line) when one is no longer stored.
fn fill_batches(
    store: &Store,
    key: &Key,
    message: Message,
    batches: Vec<Arc<Vec<u8>>>,
    bases: &[Option<u64>],
) -> Option<ReplicateFrame> {
    let (topic, partition) = (key.0.as_str(), key.1);
    let mut bases = bases.iter();
    let mut filled = Vec::with_capacity(batches.len());
    for batch in batches {
        if !batch.is_empty() {
            filled.push(serde_bytes::ByteBuf::from(batch.as_ref().clone()));
            continue;
        }
        let Some(base) = bases.next().copied().flatten() else {
            warn!(
                topic,
                partition, "a batch to replicate is no longer known here"
            );
            return None;
        };
        match store.batch_bytes(topic, partition, base) {
            Ok(Some(bytes)) => filled.push(serde_bytes::ByteBuf::from(bytes)),
            Ok(None) => {
                warn!(topic, partition, base, "a batch to replicate is not stored");
                return None;
            }
            Err(error) => {
                warn!(topic, partition, %error, "cannot read a batch to replicate");
                return None;
            }
        }
    }
    Some(ReplicateFrame {
        topic: topic.to_string(),
        partition,
        message,
        batches: filled,
    })
}

/// An append of entries `from..upto` of a partition, read from the store for
/// a follower that needs entries its leader no longer holds in memory.
/// `None` (and a log line) when the store no longer holds them.
fn stored_append(
    store: &Store,
    key: &Key,
    epoch: u64,
    from: u64,
    upto: u64,
    commit: u64,
) -> Option<ReplicateFrame> {
    let (topic, partition) = (key.0.as_str(), key.1);
    let read = || -> Result<Option<ReplicateFrame>, crate::error::StoreError> {
        let (message, rows) = match store.stored_entries(topic, partition, from, upto)? {
            StoredEntries::Entries(prev_id, rows) => {
                let message = Message::Append {
                    epoch,
                    prev_offset: from,
                    prev_id,
                    entries: rows.iter().map(|r| r.entry.clone()).collect(),
                    commit,
                };
                (message, rows)
            }
            StoredEntries::Dropped(point) => {
                // Retention dropped them: the follower restarts where the
                // stored log starts.
                let Ok(members) = postcard::to_stdvec(&point.snapshot.members) else {
                    return Ok(None);
                };
                // The idempotent producers' states there, so that their
                // retries are still answered once the follower leads.
                let producers = store.producers_at(topic, partition, point.record_end)?;
                let producers = crate::wire::encode(&producers).unwrap_or_else(|error| {
                    warn!(topic, partition, %error, "the producers' states at the log start are not sent");
                    Vec::new()
                });
                let message = Message::InstallSnapshot {
                    epoch,
                    index: point.snapshot.index,
                    last_id: point.snapshot.last_id,
                    last_epoch: point.snapshot.last_epoch,
                    members,
                    record_start: (point.record_end, point.record_head),
                    producers,
                    commit,
                };
                (message, Vec::new())
            }
            StoredEntries::Missing => return Ok(None),
        };
        let mut batches = Vec::new();
        for row in rows.iter().filter(|r| r.entry.has_payload()) {
            match store.batch_bytes(topic, partition, row.base_offset)? {
                Some(bytes) => batches.push(serde_bytes::ByteBuf::from(bytes)),
                None => return Ok(None),
            }
        }
        Ok(Some(ReplicateFrame {
            topic: topic.to_string(),
            partition,
            message,
            batches,
        }))
    };
    match read() {
        Ok(Some(frame)) => Some(frame),
        Ok(None) => {
            warn!(
                topic,
                partition, from, upto, "entries to replicate are no longer stored"
            );
            None
        }
        Err(error) => {
            warn!(topic, partition, %error, "cannot read entries to replicate");
            None
        }
    }
}

/// Longest server-side wait of one fetch.
const MAX_FETCH_WAIT_MS: u64 = 30_000;

/// Reads committed records of a fetch from the store.
fn read_committed(
    store: &Store,
    frame: &FetchFrame,
    known_committed: u64,
) -> Result<Fetched, Refusal> {
    let Some(offset) = frame.offset else {
        let state = store
            .partition_state(&frame.topic, frame.partition)
            .map_err(|e| Refusal::Other(e.to_string()))?;
        return Ok(Fetched {
            records: Vec::new(),
            log_start_offset: state.log_start_offset,
            high_watermark: state.readable_end(known_committed),
        });
    };
    match store.read_committed(
        &frame.topic,
        frame.partition,
        offset,
        frame.max_bytes as usize,
        known_committed,
    ) {
        Ok(read) => Ok(Fetched {
            records: read.records,
            log_start_offset: read.log_start_offset,
            high_watermark: read.high_watermark,
        }),
        Err(crate::error::StoreError::OffsetOutOfRange { start, end, .. }) => {
            Err(Refusal::OffsetOutOfRange { start, end })
        }
        Err(crate::error::StoreError::TopicNotFound(t)) => Err(Refusal::TopicNotFound(t)),
        Err(e) => Err(Refusal::Other(e.to_string())),
    }
}

/// The bytes of keys and values a fetch answer carries (what `fetch_min_bytes` counts).
fn fetched_bytes(fetched: &Fetched) -> usize {
    fetched
        .records
        .iter()
        .map(|r| r.value().len() + r.key().map_or(0, <[u8]>::len))
        .sum()
}

/// Hands out produce results to a waiting caller.
pub(crate) async fn await_produce(
    reply: oneshot::Receiver<Result<Produced, Refusal>>,
) -> Result<Produced, Refusal> {
    reply
        .await
        .unwrap_or(Err(Refusal::Other("the node is shutting down".into())))
}

/// A replica's random seed: distinct per node and partition, fresh per run.
fn seed_for(me: &NodeId, topic: &str, partition: u32) -> u64 {
    use std::hash::BuildHasher;
    std::hash::RandomState::new().hash_one((me, topic, partition))
}
