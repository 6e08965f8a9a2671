//! A consumer's membership in its group: join, sync, and the background
//! heartbeat that keeps it in (and tells it when to rejoin).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::debug;

use crate::config::ConsumerConfig;
use crate::core::group::{GroupError, GroupRequest, GroupResponse, JoinRequest, MemberId};
use crate::error::{Error, Result};
use crate::node::Node;

use super::TopicPartition;

/// How long a coordinator request (other than a join) may keep trying.
pub(super) const COORDINATOR_TIMEOUT: Duration = Duration::from_secs(30);

/// One attempt of a join waits at most this long before it is sent again.
const JOIN_PATIENCE: Duration = Duration::from_secs(30);

/// One attempt of a coordinator request waits at most this long.
const ATTEMPT_PATIENCE: Duration = Duration::from_secs(5);

/// A member id: unique across processes and restarts.
pub(super) fn new_member_id() -> MemberId {
    use std::hash::BuildHasher;
    let random = std::hash::RandomState::new().hash_one(std::time::SystemTime::now());
    format!("consumer-{random:016x}")
}

/// The member's place in the current generation.
pub(super) struct Membership {
    pub generation: u64,
    /// Set by the heartbeat when the coordinator asks the member to rejoin.
    pub rejoin: Arc<AtomicBool>,
    /// Set when the coordinator no longer counts the member in its
    /// generation (unknown member, stale generation): its partitions may be
    /// someone else's now, so it must stop reading them at once.
    pub fenced: Arc<AtomicBool>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Membership {
    /// Whether the member must rejoin before its next fetch.
    pub fn must_rejoin(&self) -> bool {
        self.rejoin.load(Ordering::Acquire)
    }

    /// Whether the member was fenced (see `fenced`).
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Marks the member fenced (and so due to rejoin).
    pub fn fence(&self) {
        self.fenced.store(true, Ordering::Release);
        self.rejoin.store(true, Ordering::Release);
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// Joins `group` and syncs: returns the generation and this member's partitions.
pub(super) async fn join_and_sync(
    node: Node,
    group: String,
    join: JoinRequest,
    max_poll_interval: Duration,
) -> Result<(u64, Vec<TopicPartition>)> {
    let (node, group) = (&node, group.as_str());
    let member = join.member.clone();
    // A join waits at the coordinator until every member has rejoined; a
    // join sent again (after a lost answer) replaces the first.
    let patience = (max_poll_interval + Duration::from_secs(5)).min(JOIN_PATIENCE);
    let request = GroupRequest::Join {
        group: group.to_string(),
        join,
    };
    let generation = match node
        .ask_coordinator(
            group,
            request,
            patience,
            max_poll_interval + COORDINATOR_TIMEOUT,
        )
        .await?
    {
        GroupResponse::Joined { generation, .. } => generation,
        other => return Err(unexpected(other)),
    };
    let sync = GroupRequest::Sync {
        group: group.to_string(),
        member,
        generation,
    };
    match node.ask_group(group, sync).await? {
        GroupResponse::Synced { assignment, .. } => Ok((generation, assignment)),
        other => Err(unexpected(other)),
    }
}

/// Starts heartbeating for `member` in `generation`.
pub(super) fn start(
    node: Node,
    group: String,
    member: MemberId,
    generation: u64,
    config: &ConsumerConfig,
) -> Membership {
    let rejoin = Arc::new(AtomicBool::new(false));
    let fenced = Arc::new(AtomicBool::new(false));
    let fenced_flag = fenced.clone();
    let interval = config.heartbeat_interval;
    let flag = rejoin.clone();
    let heartbeat = tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let request = GroupRequest::Heartbeat {
                group: group.clone(),
                member: member.clone(),
                generation,
            };
            let patience = interval.max(Duration::from_millis(500));
            match node
                .ask_coordinator(&group, request, patience, interval * 2)
                .await
            {
                Ok(_) => {}
                // Keep heartbeating until the member has rejoined, so the
                // coordinator does not take it for dead meanwhile.
                Err(Error::Group(GroupError::RebalanceInProgress)) => {
                    flag.store(true, Ordering::Release);
                }
                Err(Error::Group(
                    GroupError::IllegalGeneration { .. } | GroupError::UnknownMember(_),
                )) => {
                    fenced_flag.store(true, Ordering::Release);
                    flag.store(true, Ordering::Release);
                    return;
                }
                Err(error) => debug!(%error, "heartbeat failed; trying again"),
            }
        }
    });
    Membership {
        generation,
        rejoin,
        fenced,
        heartbeat,
    }
}

/// Leaves `group` at once.
pub(super) async fn leave(node: &Node, group: &str, member: &MemberId) -> Result<()> {
    let request = GroupRequest::Leave {
        group: group.to_string(),
        member: member.clone(),
    };
    node.ask_coordinator(group, request, ATTEMPT_PATIENCE, ATTEMPT_PATIENCE * 2)
        .await
        .map(|_| ())
}

/// Stores `offsets` for `group` as `member` of `generation` (`None`: admin).
pub(super) async fn commit(
    node: &Node,
    group: &str,
    member: Option<(MemberId, u64)>,
    offsets: Vec<(TopicPartition, u64)>,
) -> Result<()> {
    let request = GroupRequest::Commit {
        group: group.to_string(),
        member,
        offsets,
    };
    match node.ask_group(group, request).await? {
        GroupResponse::Committed => Ok(()),
        other => Err(unexpected(other)),
    }
}

/// The group's committed offsets.
pub(super) async fn fetch_offsets(
    node: &Node,
    group: &str,
) -> Result<BTreeMap<TopicPartition, u64>> {
    let request = GroupRequest::FetchOffsets {
        group: group.to_string(),
    };
    match node.ask_group(group, request).await? {
        GroupResponse::Offsets(offsets) => Ok(offsets.into_iter().collect()),
        other => Err(unexpected(other)),
    }
}

fn unexpected(answer: GroupResponse) -> Error {
    Error::Refused(format!(
        "unexpected answer from the coordinator: {answer:?}"
    ))
}
