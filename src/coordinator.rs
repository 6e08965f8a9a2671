//! The group coordinator driver: runs [`core::group::Coordinator`] for the
//! `__offsets` partitions this node leads.
//!
//! A group's coordinator is the leader of `__offsets` partition
//! [`offsets_partition`]`(group)`, so coordination moves with ownership and
//! needs no special node. For each request the task asks the local replica
//! whether it still leads that partition and has every record committed
//! before its epoch (otherwise the request is refused with `NotCoordinator`
//! or `CoordinatorLoading`, and the client asks again). When it starts
//! leading (a new epoch) it reads the partition's log from the store and
//! replays it into a fresh core, so generations and committed offsets
//! continue where the previous coordinator left them.
//!
//! The core's records are appended through the local replica only (never
//! forwarded to another node: a record the local core did not see must not
//! land in a log it coordinates), one append at a time per partition, so
//! their outcomes reach the core in log order.
//!
//! [`core::group::Coordinator`]: crate::core::group::Coordinator

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::config::{Acks, Retention, TopicConfig};
use crate::core::group::{
    Action, Coordinator, GroupError, GroupRequest, GroupResponse, OffsetsRecord, RequestId,
};
use crate::protocol::ProduceFrame;
use crate::record::Record;
use crate::replica::{Leadership, Replicator, Request};
use crate::store::Store;

/// The internal topic that holds committed offsets and group generations.
pub const OFFSETS_TOPIC: &str = "__offsets";

/// Partitions of `__offsets` (Kafka's `offsets.topic.num.partitions` is 50;
/// each partition is a replicated log of its own, so fewer suit small meshes).
pub const OFFSETS_PARTITIONS: u32 = 8;

/// How often coordinators check their leadership and time out sessions.
const TICK: Duration = Duration::from_millis(100);

/// The `__offsets` partition that holds `group` (its coordinator leads it).
pub fn offsets_partition(group: &str) -> u32 {
    let hash = blake3::hash(group.as_bytes());
    let mut first = [0u8; 4];
    first.copy_from_slice(&hash.as_bytes()[..4]);
    u32::from_le_bytes(first) % OFFSETS_PARTITIONS
}

/// The settings `__offsets` is created with: RF min(3, storage nodes), kept forever.
pub fn offsets_topic_config() -> TopicConfig {
    TopicConfig {
        partitions: OFFSETS_PARTITIONS,
        replication_factor: None,
        retention: Retention {
            time: None,
            bytes: None,
        },
        ..TopicConfig::default()
    }
}

/// A coordinator's answer.
pub type GroupAnswer = Result<GroupResponse, GroupError>;

/// A request to this node's coordinators, with where to answer.
pub(crate) struct GroupCall {
    pub request: GroupRequest,
    pub reply: oneshot::Sender<GroupAnswer>,
}

/// Starts the coordinator task; requests arrive on `calls`.
pub(crate) fn start(
    replicator: Replicator,
    store: Arc<Store>,
    alone: bool,
    calls: mpsc::Receiver<GroupCall>,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let task = Task {
        replicator,
        store,
        alone,
        hosted: BTreeMap::new(),
        replies: BTreeMap::new(),
        next_id: 0,
        incarnations: 0,
        start: Instant::now(),
        appends: FuturesUnordered::new(),
    };
    tokio::spawn(task.run(calls, stop))
}

/// The coordinator of one `__offsets` partition this node leads.
struct Hosted {
    /// The leader epoch its state was loaded for.
    epoch: u64,
    /// Tells this state apart from an earlier one loaded for the same epoch,
    /// so a late append outcome never reaches a core that did not send it.
    incarnation: u64,
    core: Coordinator,
    /// Records waiting for the append in flight to finish.
    queue: Vec<(u64, OffsetsRecord)>,
    /// Whether an append is in flight.
    appending: bool,
}

/// An append's outcome: partition, incarnation of its core, tokens, result.
type Appended = (u32, u64, Vec<u64>, Result<(), String>);

struct Task {
    replicator: Replicator,
    store: Arc<Store>,
    /// A node without network: its groups' members all live in its own process.
    alone: bool,
    hosted: BTreeMap<u32, Hosted>,
    /// Requests waiting for the core's answer.
    replies: BTreeMap<RequestId, oneshot::Sender<GroupAnswer>>,
    next_id: RequestId,
    /// Cores loaded so far (each gets the next number).
    incarnations: u64,
    start: Instant,
    appends: FuturesUnordered<futures::future::BoxFuture<'static, Appended>>,
}

impl Task {
    async fn run(mut self, mut calls: mpsc::Receiver<GroupCall>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                Some(call) = calls.recv() => self.on_call(call).await,
                Some(appended) = self.appends.next(), if !self.appends.is_empty() => {
                    self.on_appended(appended);
                }
                _ = tick.tick() => self.on_tick().await,
            }
        }
        debug!("group coordinator stopped");
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    async fn on_call(&mut self, call: GroupCall) {
        let GroupCall { request, reply } = call;
        let partition = match (&request, request.group()) {
            (_, Some(group)) => offsets_partition(group),
            (GroupRequest::List { partition }, None) => *partition,
            (_, None) => return,
        };
        if let Err(refusal) = self.lead(partition).await {
            let _ = reply.send(Err(refusal));
            return;
        }
        self.next_id += 1;
        let id = self.next_id;
        self.replies.insert(id, reply);
        let now = self.now();
        let actions = match self.hosted.get_mut(&partition) {
            Some(hosted) => hosted.core.handle(id, request, now),
            None => return,
        };
        self.carry_out(partition, actions);
    }

    /// Makes sure this node coordinates `partition` with up-to-date state:
    /// loads it from the log when this node starts leading a new epoch.
    async fn lead(&mut self, partition: u32) -> Result<(), GroupError> {
        match self.leadership(partition).await {
            Leadership::Leader { epoch } => {
                if self
                    .hosted
                    .get(&partition)
                    .is_some_and(|h| h.epoch == epoch)
                {
                    return Ok(());
                }
                self.abandon(partition);
                let store = self.store.clone();
                // Reading the log is blocking store work: off the async workers.
                let alone = self.alone;
                let core = tokio::task::spawn_blocking(move || load(&store, partition, alone))
                    .await
                    .map_err(|e| GroupError::NotStored(e.to_string()))??;
                self.incarnations += 1;
                info!(
                    partition,
                    epoch, "coordinating the groups of an __offsets partition"
                );
                self.hosted.insert(
                    partition,
                    Hosted {
                        epoch,
                        incarnation: self.incarnations,
                        core,
                        queue: Vec::new(),
                        appending: false,
                    },
                );
                Ok(())
            }
            Leadership::Catching => {
                self.abandon(partition);
                Err(GroupError::CoordinatorLoading)
            }
            Leadership::Follower { .. } => {
                self.abandon(partition);
                Err(GroupError::NotCoordinator)
            }
        }
    }

    async fn leadership(&mut self, partition: u32) -> Leadership {
        let (reply, answer) = oneshot::channel();
        let request = Request::Leadership {
            topic: OFFSETS_TOPIC.to_string(),
            partition,
            reply,
        };
        if self.replicator.request(request).await.is_err() {
            return Leadership::Follower { hint: None };
        }
        answer.await.unwrap_or(Leadership::Follower { hint: None })
    }
}

impl Task {
    /// Drops the state of a partition this node no longer coordinates,
    /// failing the requests that wait on it.
    fn abandon(&mut self, partition: u32) {
        if let Some(mut hosted) = self.hosted.remove(&partition) {
            let actions = hosted.core.abandon();
            self.reply_all(actions);
        }
    }

    fn reply_all(&mut self, actions: Vec<Action>) {
        for action in actions {
            if let Action::Reply { id, answer } = action
                && let Some(reply) = self.replies.remove(&id)
            {
                let _ = reply.send(answer);
            }
        }
    }

    fn carry_out(&mut self, partition: u32, actions: Vec<Action>) {
        let mut persist = Vec::new();
        let mut replies = Vec::new();
        for action in actions {
            match action {
                Action::Persist { token, record } => persist.push((token, record)),
                reply @ Action::Reply { .. } => replies.push(reply),
            }
        }
        self.reply_all(replies);
        if let Some(hosted) = self.hosted.get_mut(&partition) {
            hosted.queue.extend(persist);
        }
        self.append_queued(partition);
    }

    /// Starts appending the queued records of `partition` as one batch,
    /// unless an append is in flight.
    fn append_queued(&mut self, partition: u32) {
        let Some(hosted) = self.hosted.get_mut(&partition) else {
            return;
        };
        if hosted.appending || hosted.queue.is_empty() {
            return;
        }
        let queued = std::mem::take(&mut hosted.queue);
        hosted.appending = true;
        let incarnation = hosted.incarnation;
        let now_ms = crate::node::now_ms();
        let mut tokens = Vec::with_capacity(queued.len());
        let mut records = Vec::with_capacity(queued.len());
        let mut encode_error = None;
        for (token, record) in queued {
            tokens.push(token);
            match crate::wire::encode(&record) {
                Ok(value) => {
                    records.push(Record::new(value, now_ms).with_key(record.group().as_bytes()))
                }
                Err(error) => encode_error = Some(error.to_string()),
            }
        }
        let frame = ProduceFrame {
            topic: OFFSETS_TOPIC.to_string(),
            partition,
            acks: Acks::All,
            producer: None,
            records,
        };
        let replicator = self.replicator.clone();
        self.appends.push(Box::pin(async move {
            if let Some(error) = encode_error {
                return (partition, incarnation, tokens, Err(error));
            }
            let (reply, answer) = oneshot::channel();
            let outcome = match replicator.request(Request::Produce { frame, reply }).await {
                Ok(()) => crate::replica::await_produce(answer)
                    .await
                    .map(|_| ())
                    .map_err(|r| format!("{r:?}")),
                Err(refusal) => Err(format!("{refusal:?}")),
            };
            (partition, incarnation, tokens, outcome)
        }));
    }

    fn on_appended(&mut self, (partition, incarnation, tokens, outcome): Appended) {
        let now = self.now();
        let Some(hosted) = self
            .hosted
            .get_mut(&partition)
            .filter(|h| h.incarnation == incarnation)
        else {
            return;
        };
        hosted.appending = false;
        let mut actions = Vec::new();
        for token in tokens {
            actions.extend(hosted.core.persisted(token, outcome.clone(), now));
        }
        self.carry_out(partition, actions);
    }

    /// Checks leadership of every hosted partition and advances time.
    async fn on_tick(&mut self) {
        let partitions: Vec<u32> = self.hosted.keys().copied().collect();
        for partition in partitions {
            let epoch = self.hosted.get(&partition).map(|h| h.epoch);
            match self.leadership(partition).await {
                Leadership::Leader { epoch: now_leading } if Some(now_leading) == epoch => {}
                _ => {
                    info!(partition, "no longer coordinating an __offsets partition");
                    self.abandon(partition);
                    continue;
                }
            }
            let now = self.now();
            let actions = match self.hosted.get_mut(&partition) {
                Some(hosted) => hosted.core.tick(now),
                None => continue,
            };
            self.carry_out(partition, actions);
        }
    }
}

/// Replays an `__offsets` partition's committed log into a new core.
fn load(store: &Store, partition: u32, alone: bool) -> Result<Coordinator, GroupError> {
    let unreadable = |e: crate::error::StoreError| GroupError::NotStored(e.to_string());
    let state = store
        .partition_state(OFFSETS_TOPIC, partition)
        .map_err(unreadable)?;
    let mut core = Coordinator::new();
    if alone {
        core = core.with_no_surviving_members();
    }
    let mut offset = state.log_start_offset;
    let mut records = 0u64;
    while offset < state.high_watermark {
        let read = store
            .read(OFFSETS_TOPIC, partition, offset, 4 << 20)
            .map_err(unreadable)?;
        let Some(last) = read.records.last() else {
            break;
        };
        offset = last.offset + 1;
        for record in &read.records {
            match crate::wire::decode::<OffsetsRecord>(record.value()) {
                Ok(decoded) => core.load(&decoded),
                // The leader's epoch marker and anything unreadable.
                Err(_) if record.value().is_empty() => {}
                Err(error) => {
                    warn!(partition, offset = record.offset, %error, "skipping an unreadable __offsets record");
                }
            }
            records += 1;
        }
    }
    debug!(partition, records, "loaded an __offsets partition");
    Ok(core)
}
