//! A node's requests across the mesh: topics created, deleted and described
//! on every storage node, and produce requests routed to partition leaders.
//!
//! Placement: a topic's partitions get their replicas when the topic is
//! created, the top-RF live storage nodes by rendezvous hash of (topic,
//! partition). The node that creates the topic sends it, with that
//! assignment, to every live storage node; a node that was down then learns
//! it from the first peer that replicates to it.

use std::time::Duration;

use tokio::sync::oneshot;
use tracing::{debug, info};

use crate::config::TopicConfig;
use crate::core::group::{GroupError, GroupRequest, GroupResponse};
use crate::core::membership::Status;
use crate::core::placement;
use crate::error::{Error, Result};
use crate::meta::{self, MetaCommand};
use crate::net::{NetError, NodeId};
use crate::node::{Node, TopicDescription};
use crate::protocol::{
    FetchFrame, Fetched, PeerRequest, PeerResponse, ProduceFrame, Produced, Refusal,
};
use crate::replica::Request;

/// The longest one produce attempt waits for its answer before the producer
/// tries again (the same batch, so the retry is deduplicated).
const PRODUCE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a topic change waits for the metadata log.
const META_WAIT: Duration = Duration::from_secs(15);

/// How long a topic change waits for every storage node to apply it before
/// settling for one.
const APPLY_WAIT_ALL: Duration = Duration::from_secs(5);

/// How long mesh operations wait for enough storage nodes to be known.
const DISCOVERY_WAIT: Duration = Duration::from_secs(5);

/// How long one attempt of a group request waits for its answer.
const GROUP_ATTEMPT: Duration = Duration::from_secs(5);

/// How long a group request keeps trying coordinators.
const GROUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one request to a peer may take before it is retried elsewhere.
const PEER_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Node {
    /// Whether this node is part of a mesh (topics are replicated).
    fn me(&self) -> Option<NodeId> {
        Some(self.inner.me)
    }

    /// The live storage nodes this node knows of, itself included when it is one.
    pub async fn live_storage_nodes(&self) -> Result<Vec<NodeId>> {
        let Some(mesh) = self.inner.mesh.as_ref() else {
            // A node without network is a mesh of one.
            return Ok(vec![self.inner.me]);
        };
        let members = mesh.members().await.map_err(Error::Net)?;
        let mut nodes: Vec<NodeId> = members
            .into_iter()
            .filter(|m| m.status == Status::Alive)
            .filter(|m| m.is_storage())
            .map(|m| m.peer)
            .collect();
        if let Some(me) = self.me()
            && self.inner.replicator.is_some()
            && !nodes.contains(&me)
        {
            nodes.push(me);
        }
        nodes.sort();
        Ok(nodes)
    }

    /// The live storage nodes, waiting up to [`DISCOVERY_WAIT`] until there
    /// are at least `want` (a light client that just joined knows of none yet).
    async fn storage_nodes(&self, want: usize) -> Result<Vec<NodeId>> {
        let deadline = tokio::time::Instant::now() + DISCOVERY_WAIT;
        loop {
            let nodes = self.live_storage_nodes().await?;
            if nodes.len() >= want || tokio::time::Instant::now() >= deadline {
                return Ok(nodes);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks `peer` (or this node, when it is `peer`) one request.
    async fn ask(&self, peer: NodeId, request: PeerRequest) -> Result<PeerResponse> {
        self.ask_within(peer, request, PEER_REQUEST_TIMEOUT).await
    }

    /// [`Node::ask`], waiting up to `patience` for the answer.
    async fn ask_within(
        &self,
        peer: NodeId,
        request: PeerRequest,
        patience: Duration,
    ) -> Result<PeerResponse> {
        // A node that shut down answers nothing, its own requests included.
        self.store()?;
        if Some(peer) == self.me()
            && let Some(replicator) = &self.inner.replicator
        {
            return match tokio::time::timeout(patience, self.ask_local(replicator, request)).await {
                Ok(answer) => answer,
                Err(_) => Err(Error::Net(NetError::Request {
                    peer,
                    reason: "timed out".into(),
                })),
            };
        }
        let mesh = self.inner.mesh.as_ref().ok_or(Error::Closed)?;
        match tokio::time::timeout(patience, mesh.request(peer, request)).await {
            Ok(answer) => answer.map_err(Error::Net),
            Err(_) => Err(Error::Net(NetError::Request {
                peer,
                reason: "timed out".into(),
            })),
        }
    }

    async fn ask_local(
        &self,
        replicator: &crate::replica::Replicator,
        request: PeerRequest,
    ) -> Result<PeerResponse> {
        let refused = |r: Refusal| Error::Refused(format!("{r:?}"));
        match request {
            PeerRequest::Produce(frame) => {
                let (reply, answer) = oneshot::channel();
                replicator
                    .request(Request::Produce { frame, reply })
                    .await
                    .map_err(refused)?;
                Ok(PeerResponse::Produced(
                    crate::replica::await_produce(answer).await,
                ))
            }
            PeerRequest::DescribeTopic { name } => Ok(PeerResponse::Topic(
                self.describe_topic_here(&name)
                    .await
                    .map_err(|e| Refusal::Other(e.to_string())),
            )),
            PeerRequest::ListTopics => Ok(PeerResponse::Topics(
                self.store()?
                    .list_topics()?
                    .into_iter()
                    .map(|t| t.name)
                    .filter(|n| !meta::is_internal(n))
                    .collect(),
            )),
            PeerRequest::Fetch(frame) => {
                let (reply, answer) = oneshot::channel();
                replicator
                    .request(Request::Fetch { frame, reply })
                    .await
                    .map_err(refused)?;
                Ok(PeerResponse::Fetched(answer.await.unwrap_or(Err(
                    Refusal::Other("the node is shutting down".into()),
                ))))
            }
            PeerRequest::Group(request) => {
                let groups = self.inner.groups.as_ref().ok_or(Error::Closed)?;
                let (reply, answer) = oneshot::channel();
                let call = crate::coordinator::GroupCall { request, reply };
                groups.send(call).await.map_err(|_| Error::Closed)?;
                Ok(PeerResponse::Group(answer.await.unwrap_or(Err(
                    crate::core::group::GroupError::NotCoordinator,
                ))))
            }
            PeerRequest::Replicate(_)
            | PeerRequest::ReplicateMany(_)
            | PeerRequest::Ownership(_) => Ok(PeerResponse::Ack),
        }
    }

    /// This node's own view of a topic it stores: for the partitions it
    /// hosts, its replica's epoch, leader, committed offset and head (which
    /// lag the leader's until the next append or heartbeat reaches it).
    pub async fn describe_topic_here(&self, name: &str) -> Result<TopicDescription> {
        let store = self.store()?;
        let entry = store.topic(name)?;
        let live = match &self.inner.replicator {
            Some(replicator) => {
                let (reply, answer) = oneshot::channel();
                let request = Request::Describe {
                    name: name.to_string(),
                    reply,
                };
                if replicator.request(request).await.is_ok() {
                    answer.await.unwrap_or_default()
                } else {
                    Default::default()
                }
            }
            None => Default::default(),
        };
        Ok(crate::replica::describe_entry(&store, &entry, &live))
    }

    /// Creates a topic through the metadata log, with replicas placed by
    /// rendezvous hash over the live storage nodes. The log decides between
    /// concurrent creates: creating an existing topic with the same config is
    /// a no-op; with another config, `TopicExists`.
    pub(crate) async fn create_topic_in_mesh(
        &self,
        name: &str,
        config: TopicConfig,
    ) -> Result<TopicDescription> {
        config.validate()?;
        crate::store::validate_topic_name(name)?;
        if meta::is_internal(name) {
            return Err(Error::Config(crate::error::ConfigError::Invalid {
                name: "topic",
                reason: format!("'{name}' is reserved: names starting with __ are internal"),
            }));
        }
        if let Ok(existing) = self.describe_topic_in_mesh(name).await {
            return same_config(existing, &config, name);
        }
        let wanted = usize::from(config.replication_factor.unwrap_or(1));
        let nodes = self.storage_nodes(wanted).await?;
        let rf = config.effective_replication_factor(nodes.len()) as usize;
        if rf > nodes.len() || nodes.is_empty() {
            return Err(Error::NotEnoughNodes(format!(
                "replication factor {rf} needs {rf} live storage nodes, the mesh has {}",
                nodes.len()
            )));
        }
        let replicas: Vec<Vec<NodeId>> = (0..config.partitions)
            .map(|p| placement::target_replicas(name, p, &nodes, rf))
            .collect();
        let command = MetaCommand::CreateTopic {
            name: name.to_string(),
            config: config.clone(),
            replicas,
        };
        self.append_meta(command).await?;
        let created = self.wait_for_topic(name, true).await?;
        info!(
            topic = name,
            partitions = config.partitions,
            rf,
            "topic created in the mesh"
        );
        same_config(created, &config, name)
    }

    /// Deletes a topic through the metadata log.
    pub(crate) async fn delete_topic_in_mesh(&self, name: &str) -> Result<()> {
        self.describe_topic_in_mesh(name).await?;
        self.append_meta(MetaCommand::DeleteTopic {
            name: name.to_string(),
        })
        .await?;
        if let Ok(mut topics) = self.inner.remote_topics.lock() {
            topics.remove(name);
        }
        self.wait_for_topic(name, false).await?;
        Ok(())
    }

    /// Appends a command to the metadata log and waits until it is committed.
    async fn append_meta(&self, command: MetaCommand) -> Result<()> {
        let deadline = tokio::time::Instant::now() + META_WAIT;
        // A mesh that was just founded may not have elected its metadata leader yet.
        loop {
            let ready = self
                .describe_topic_in_mesh(meta::META_TOPIC)
                .await
                .is_ok_and(|t| t.partitions.iter().all(|p| p.leader.is_some()));
            if ready {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::NotEnoughNodes(
                    "no storage node holds the mesh's metadata log yet".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let value = crate::wire::encode(&command).map_err(crate::error::StoreError::Wire)?;
        // An idempotent producer of its own, so that retries of this command
        // (after a timeout or a failover) are stored once.
        let producer = crate::producer::random_producer_id();
        let frame = ProduceFrame {
            topic: meta::META_TOPIC.to_string(),
            partition: 0,
            acks: crate::config::Acks::All,
            producer: Some(crate::wire::ProducerBatch {
                producer,
                base_seq: 0,
                prev: crate::chain::producer_genesis(producer, meta::META_TOPIC, 0),
            }),
            records: vec![crate::record::Record::new(value, crate::node::now_ms())],
        };
        self.produce_in_mesh(frame, META_WAIT).await?;
        Ok(())
    }

    /// Waits until the storage nodes have applied a topic change: the topic
    /// exists (when `exists`) or is gone on every one of them, or, after
    /// [`APPLY_WAIT_ALL`], on at least one. Returns the topic as described.
    async fn wait_for_topic(&self, name: &str, exists: bool) -> Result<TopicDescription> {
        let started = tokio::time::Instant::now();
        let deadline = started + META_WAIT;
        loop {
            let nodes = self.storage_nodes(1).await?;
            let mut applied = 0;
            for node in &nodes {
                let request = PeerRequest::DescribeTopic {
                    name: name.to_string(),
                };
                let has = matches!(
                    self.ask(*node, request).await,
                    Ok(PeerResponse::Topic(Ok(_)))
                );
                applied += usize::from(has == exists);
            }
            let enough = if started.elapsed() < APPLY_WAIT_ALL {
                applied == nodes.len()
            } else {
                applied > 0
            };
            if enough && !nodes.is_empty() {
                return match self.describe_topic_in_mesh(name).await {
                    Ok(description) => Ok(description),
                    Err(_) if !exists => Ok(TopicDescription {
                        name: name.to_string(),
                        config: TopicConfig::default(),
                        partitions: Vec::new(),
                    }),
                    Err(e) => Err(e),
                };
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Refused(format!(
                    "the metadata change to '{name}' committed but was not applied within {META_WAIT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Topic names known to the mesh: this node's, or the first storage node's that answers.
    pub(crate) async fn list_topics_in_mesh(&self) -> Result<Vec<String>> {
        if self.inner.replicator.is_some() {
            return Ok(self
                .store()?
                .list_topics()?
                .into_iter()
                .map(|t| t.name)
                .filter(|n| !meta::is_internal(n))
                .collect());
        }
        for node in self.storage_nodes(1).await? {
            if let Ok(PeerResponse::Topics(names)) = self.ask(node, PeerRequest::ListTopics).await {
                return Ok(names);
            }
        }
        Err(Error::NotEnoughNodes("no storage node answered".into()))
    }

    /// A topic as the mesh describes it: for each partition, the view of a
    /// node that leads it when one answers, else of any replica.
    pub(crate) async fn describe_topic_in_mesh(&self, name: &str) -> Result<TopicDescription> {
        let nodes = self.storage_nodes(1).await?;
        let mut views = Vec::new();
        for node in &nodes {
            let request = PeerRequest::DescribeTopic {
                name: name.to_string(),
            };
            if let Ok(PeerResponse::Topic(Ok(view))) = self.ask(*node, request).await {
                views.push((*node, view));
            }
        }
        let Some((_, mut merged)) = views.first().cloned() else {
            return Err(Error::TopicNotFound(name.to_string()));
        };
        for partition in &mut merged.partitions {
            let leading = views.iter().find_map(|(node, view)| {
                view.partitions
                    .iter()
                    .find(|p| p.partition == partition.partition && p.leader == Some(*node))
            });
            if let Some(view) = leading {
                *partition = view.clone();
            }
        }
        if let Ok(mut topics) = self.inner.remote_topics.lock() {
            topics.insert(name.to_string(), merged.clone());
        }
        Ok(merged)
    }

    /// A topic as the node `peer` sees it (see [`Node::describe_topic_here`]).
    pub async fn describe_topic_at(&self, peer: NodeId, name: &str) -> Result<TopicDescription> {
        let request = PeerRequest::DescribeTopic {
            name: name.to_string(),
        };
        match self.ask(peer, request).await? {
            PeerResponse::Topic(Ok(description)) => Ok(description),
            PeerResponse::Topic(Err(refusal)) => Err(refusal_error(refusal, name, 0)),
            other => Err(Error::Refused(format!("unexpected answer {other:?}"))),
        }
    }

    /// The topic's description as last learned (asking the mesh the first time).
    pub(crate) async fn topic_metadata(&self, name: &str) -> Result<TopicDescription> {
        let known = self
            .inner
            .remote_topics
            .lock()
            .ok()
            .and_then(|t| t.get(name).cloned());
        if let Some(description) = known {
            return Ok(description);
        }
        if let Ok(entry) = self.store()?.topic(name)
            && !entry.replicas.is_empty()
        {
            let store = self.store()?;
            let description = crate::replica::describe_entry(&store, &entry, &Default::default());
            return Ok(description);
        }
        self.describe_topic_in_mesh(name).await
    }

    /// The replicas of a partition: as its leader last gossiped them, else as
    /// the mesh last described them.
    async fn partition_replicas(&self, topic: &str, partition: u32) -> Result<Vec<NodeId>> {
        let gossiped = self.inner.ownership.lock().ok().and_then(|t| {
            t.get(topic, partition)
                .map(|r| r.replicas.clone())
                .filter(|r| !r.is_empty())
        });
        if let Some(replicas) = gossiped {
            return Ok(replicas);
        }
        let replicas = self
            .topic_metadata(topic)
            .await?
            .partitions
            .get(partition as usize)
            .map(|p| p.replicas.clone())
            .unwrap_or_default();
        if replicas.is_empty() {
            return Err(Error::Store(crate::error::StoreError::PartitionNotFound {
                topic: topic.to_string(),
                partition,
            }));
        }
        Ok(replicas)
    }

    /// The leader of a partition as its leader last gossiped it.
    fn gossiped_leader(&self, topic: &str, partition: u32) -> Option<NodeId> {
        self.inner
            .ownership
            .lock()
            .ok()
            .and_then(|t| t.leader(topic, partition).copied())
    }

    /// Sends a produce request to the partition's leader, following
    /// `NotLeader` hints and retrying other replicas until `timeout`.
    /// Retries of an idempotent batch are safe: the leader answers a batch it
    /// already has with its original offsets.
    pub(crate) async fn produce_in_mesh(
        &self,
        frame: ProduceFrame,
        timeout: Duration,
    ) -> Result<Produced> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (topic, partition) = (frame.topic.clone(), frame.partition);
        let mut replicas = self.partition_replicas(&topic, partition).await?;
        let key = (topic.clone(), partition);
        // Route by the gossiped ownership first, then by the last leader that
        // answered here, then to the first replica (which redirects).
        let gossiped = self.gossiped_leader(&topic, partition);
        let answered = || {
            self.inner
                .leaders
                .lock()
                .ok()
                .and_then(|l| l.get(&key).copied())
        };
        let mut target = gossiped.or_else(answered).unwrap_or(replicas[0]);
        let mut attempt = 0usize;
        let mut backoff = Duration::from_millis(20);
        loop {
            attempt += 1;
            // A leader that stopped answering (frozen, cut off) must not hold the
            // producer for long: each attempt gets at most a few seconds.
            let left = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .min(PRODUCE_ATTEMPT_TIMEOUT);
            let ask = self.ask(target, PeerRequest::Produce(frame.clone()));
            let answer = match tokio::time::timeout(left, ask).await {
                Ok(answer) => answer,
                Err(_) => Ok(PeerResponse::Produced(Err(Refusal::Timeout))),
            };
            let refusal = match answer {
                Ok(PeerResponse::Produced(Ok(produced))) => {
                    if let Ok(mut leaders) = self.inner.leaders.lock() {
                        leaders.insert(key, target);
                    }
                    return Ok(produced);
                }
                Ok(PeerResponse::Produced(Err(refusal))) => refusal,
                Ok(other) => Refusal::Other(format!("unexpected answer {other:?}")),
                Err(Error::Closed) => return Err(Error::Closed),
                Err(e) => Refusal::Other(e.to_string()),
            };
            let next = match refusal {
                Refusal::NotLeader { hint: Some(hint) } if hint != target => Some(hint),
                // A replica that has not applied the topic's creation yet
                // answers TopicNotFound: the mesh knows the topic (above).
                Refusal::NotLeader { .. }
                | Refusal::Timeout
                | Refusal::Other(_)
                | Refusal::TopicNotFound(_)
                | Refusal::PartitionNotFound(..) => None,
                other => return Err(refusal_error(other, &topic, partition)),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout { topic, partition });
            }
            match next {
                Some(hint) => target = hint,
                None => {
                    debug!(%topic, partition, attempt, "produce retry");
                    if attempt % replicas.len() == 0 {
                        // A full round without a leader: the replica set may
                        // have moved since it was last described.
                        if let Ok(mut topics) = self.inner.remote_topics.lock() {
                            topics.remove(&topic);
                        }
                        if let Ok(fresh) = self.partition_replicas(&topic, partition).await {
                            replicas = fresh;
                        }
                    }
                    target = replicas[attempt % replicas.len()];
                    tokio::time::sleep(backoff.min(deadline - tokio::time::Instant::now())).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }
}

impl Node {
    /// Creates the internal `__offsets` topic unless the mesh has it.
    async fn ensure_offsets_topic(&self) -> Result<()> {
        let topic = crate::coordinator::OFFSETS_TOPIC;
        match self.topic_metadata(topic).await {
            Ok(_) => return Ok(()),
            Err(Error::TopicNotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let config = crate::coordinator::offsets_topic_config();
        let nodes = self.storage_nodes(1).await?;
        if nodes.is_empty() {
            return Err(Error::NotEnoughNodes(
                "no storage node to hold committed offsets".into(),
            ));
        }
        let rf = config.effective_replication_factor(nodes.len()) as usize;
        let replicas: Vec<Vec<NodeId>> = (0..config.partitions)
            .map(|p| placement::target_replicas(topic, p, &nodes, rf))
            .collect();
        self.append_meta(MetaCommand::CreateTopic {
            name: topic.to_string(),
            config,
            replicas,
        })
        .await?;
        self.wait_for_topic(topic, true).await?;
        info!(rf, "created the __offsets topic");
        Ok(())
    }

    /// Asks the coordinator of the request's group — the leader of the
    /// group's `__offsets` partition — following its moves until `timeout`.
    /// Each attempt waits up to `patience` (a join waits for its round).
    pub(crate) async fn ask_coordinator(
        &self,
        group: &str,
        request: GroupRequest,
        patience: Duration,
        timeout: Duration,
    ) -> Result<GroupResponse> {
        let partition = crate::coordinator::offsets_partition(group);
        self.ask_offsets_leader(partition, request, patience, timeout)
            .await
    }

    /// Asks the leader of `__offsets` partition `partition`, following its
    /// moves until `timeout`; each attempt waits up to `patience`.
    async fn ask_offsets_leader(
        &self,
        partition: u32,
        request: GroupRequest,
        patience: Duration,
        timeout: Duration,
    ) -> Result<GroupResponse> {
        self.ensure_offsets_topic().await?;
        let topic = crate::coordinator::OFFSETS_TOPIC;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut backoff = Duration::from_millis(20);
        for attempt in 0usize.. {
            let replicas = self.partition_replicas(topic, partition).await?;
            let target = match self.gossiped_leader(topic, partition) {
                Some(leader) if attempt % 2 == 0 => leader,
                _ => replicas[attempt % replicas.len()],
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let asked = self
                .ask_within(
                    target,
                    PeerRequest::Group(request.clone()),
                    patience.min(left),
                )
                .await;
            match asked {
                Ok(PeerResponse::Group(Ok(answer))) => return Ok(answer),
                Ok(PeerResponse::Group(Err(
                    GroupError::NotCoordinator
                    | GroupError::CoordinatorLoading
                    | GroupError::NotStored(_),
                ))) => {}
                Ok(PeerResponse::Group(Err(refusal))) => return Err(Error::Group(refusal)),
                Ok(other) => debug!(?other, "unexpected answer from a coordinator"),
                Err(error) => debug!(%error, "coordinator request failed"),
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            if attempt % replicas.len() == replicas.len() - 1 {
                if let Ok(mut topics) = self.inner.remote_topics.lock() {
                    topics.remove(topic);
                }
                tokio::time::sleep(backoff.min(deadline - tokio::time::Instant::now())).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
        Err(Error::Group(GroupError::NotCoordinator))
    }

    /// [`Node::ask_coordinator`] for a request the coordinator answers at
    /// once: each attempt waits up to 5 s, all of them up to 30 s.
    pub(crate) async fn ask_group(
        &self,
        group: &str,
        request: GroupRequest,
    ) -> Result<GroupResponse> {
        self.ask_coordinator(group, request, GROUP_ATTEMPT, GROUP_TIMEOUT)
            .await
    }

    /// Asks every `__offsets` partition's coordinator for its groups.
    pub(crate) async fn list_groups_in_mesh(&self) -> Result<Vec<String>> {
        let mut names = std::collections::BTreeSet::new();
        for partition in 0..crate::coordinator::OFFSETS_PARTITIONS {
            let answer = self
                .ask_offsets_leader(
                    partition,
                    GroupRequest::List { partition },
                    PEER_REQUEST_TIMEOUT,
                    META_WAIT,
                )
                .await?;
            if let GroupResponse::Groups(groups) = answer {
                names.extend(groups);
            }
        }
        Ok(names.into_iter().collect())
    }
}

impl Node {
    /// Reads committed records of a partition from one of its replicas: the
    /// leader as gossiped, else the first replica, following `NotLeader`
    /// hints. The replica waits up to `frame.max_wait_ms` for records to
    /// arrive (long poll).
    pub(crate) async fn fetch_in_mesh(&self, frame: FetchFrame) -> Result<Fetched> {
        self.fetch_in_mesh_from(frame, false).await
    }

    /// [`Node::fetch_in_mesh`]; with `nearest`, from this node's own replica
    /// when it holds one (no network hop; its commit point trails the
    /// leader's by up to a heartbeat).
    pub(crate) async fn fetch_in_mesh_from(
        &self,
        frame: FetchFrame,
        nearest: bool,
    ) -> Result<Fetched> {
        let (topic, partition) = (frame.topic.clone(), frame.partition);
        let replicas = self.partition_replicas(&topic, partition).await?;
        let local = self
            .me()
            .filter(|me| nearest && self.inner.replicator.is_some() && replicas.contains(me));
        let mut target = local
            .or_else(|| self.gossiped_leader(&topic, partition))
            .unwrap_or(replicas[0]);
        let patience = Duration::from_millis(u64::from(frame.max_wait_ms)) + PEER_REQUEST_TIMEOUT;
        let mut last = Refusal::Other("no replica answered".into());
        for attempt in 0..replicas.len() + 3 {
            let ask = self.ask(target, PeerRequest::Fetch(frame.clone()));
            let refusal = match tokio::time::timeout(patience, ask).await {
                Ok(Ok(PeerResponse::Fetched(Ok(fetched)))) => return Ok(fetched),
                Ok(Ok(PeerResponse::Fetched(Err(refusal)))) => refusal,
                Ok(Ok(other)) => Refusal::Other(format!("unexpected answer {other:?}")),
                Ok(Err(e)) => Refusal::Other(e.to_string()),
                Err(_) => Refusal::Timeout,
            };
            target = match &refusal {
                Refusal::NotLeader { hint: Some(hint) } if *hint != target => *hint,
                Refusal::OffsetOutOfRange { .. } => {
                    return Err(refusal_error(refusal, &topic, partition));
                }
                _ => replicas[attempt % replicas.len()],
            };
            last = refusal;
        }
        Err(refusal_error(last, &topic, partition))
    }
}

/// The existing topic when its config is `config`; otherwise `TopicExists`.
fn same_config(
    existing: TopicDescription,
    config: &TopicConfig,
    name: &str,
) -> Result<TopicDescription> {
    if existing.config == *config {
        Ok(existing)
    } else {
        Err(Error::TopicExists(name.to_string()))
    }
}

/// The API error for a refusal a producer cannot retry its way out of.
fn refusal_error(refusal: Refusal, topic: &str, partition: u32) -> Error {
    let topic = topic.to_string();
    match refusal {
        Refusal::NotLeader { hint } => Error::NotLeader {
            topic,
            partition,
            hint,
        },
        Refusal::NotEnoughReplicas { in_sync, required } => Error::NotEnoughReplicas {
            topic,
            partition,
            in_sync,
            required,
        },
        Refusal::TopicNotFound(t) => Error::TopicNotFound(t),
        Refusal::PartitionNotFound(t, p) => {
            Error::Store(crate::error::StoreError::PartitionNotFound {
                topic: t,
                partition: p,
            })
        }
        Refusal::RecordTooLarge { size, max } => Error::RecordTooLarge { size, max },
        Refusal::Timeout => Error::Timeout { topic, partition },
        Refusal::OffsetOutOfRange { start, end } => {
            Error::Store(crate::error::StoreError::OffsetOutOfRange {
                topic,
                partition,
                offset: 0,
                start,
                end,
            })
        }
        Refusal::Other(text) => Error::Refused(text),
        Refusal::OutOfSequence { next_seq, head } => Error::OutOfSequence {
            topic,
            partition,
            next_seq,
            head,
        },
        Refusal::Duplicates(originals) => Error::Duplicates {
            topic,
            partition,
            originals,
        },
    }
}
