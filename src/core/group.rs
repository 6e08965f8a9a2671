//! Consumer-group coordination: one coordinator's groups as a pure state machine.
//!
//! A group's coordinator is the leader of the `__offsets` partition its name
//! hashes to. The coordinator runs this machine: requests in
//! ([`Coordinator::handle`]), time in ([`Coordinator::tick`]), store outcomes
//! in ([`Coordinator::persisted`]); [`Action`]s out — replies to requests and
//! records to append to the `__offsets` partition. It never answers a join or
//! a commit before its record is stored (persist before ack), and it starts
//! from the records already in the log ([`Coordinator::load`]) when it becomes
//! the leader, so generations only grow and committed offsets survive a
//! coordinator's death like any other record.
//!
//! The protocol is Kafka's: members **join** (the coordinator waits until
//! every known member has rejoined, or the rebalance timeout), the round ends
//! in a new **generation** with an assignment computed here by the group's
//! [`Assignor`]; each member **syncs** to get its share, **heartbeats** to stay
//! in (a member silent for its session timeout is removed and the group
//! rebalances) and **leaves** when it closes. A commit names its member and
//! generation and is refused with a typed error when either is stale, or when
//! it names a partition the member does not own: at most one member owns a
//! partition in a generation, and only it can move the partition's offset.
//!
//! With the cooperative-sticky assignor a partition moving from one member to
//! another is withheld from the new owner for one generation: the old owner
//! gives it up (revokes, commits) when it syncs, the coordinator starts a
//! second round, and the partition is assigned in it — so no partition ever
//! has two owners at once, and members keep the partitions they keep.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A topic and partition.
pub type TopicPartition = (String, u32);

/// Most partitions one member may subscribe to (a bound on the work one join causes).
pub const MAX_GROUP_PARTITIONS: u64 = 100_000;

/// A member's id, chosen by the member (unique: it includes random bits).
pub type MemberId = String;

/// Correlates a request with its reply; chosen by the driver.
pub type RequestId = u64;

/// How a group's partitions are shared among its members (Kafka's
/// `partition.assignment.strategy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Assignor {
    /// Per topic, contiguous ranges of partitions to members in id order.
    Range,
    /// All partitions dealt to members in turn.
    RoundRobin,
    /// Balanced, keeping each member's partitions where it can; partitions
    /// move in two rounds so members keep consuming the rest meanwhile.
    #[default]
    CooperativeSticky,
}

impl Assignor {
    /// Whether members keep their partitions across a rebalance (and give up
    /// only those that move) instead of giving up all of them first.
    pub fn is_cooperative(self) -> bool {
        self == Assignor::CooperativeSticky
    }

    /// The name users write (`range`, `roundrobin`, `cooperative-sticky`).
    pub fn name(self) -> &'static str {
        match self {
            Assignor::Range => "range",
            Assignor::RoundRobin => "roundrobin",
            Assignor::CooperativeSticky => "cooperative-sticky",
        }
    }
}

/// What a member says when it joins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// Its id.
    pub member: MemberId,
    /// The topics it subscribes to, with their partition counts as it sees them.
    pub topics: BTreeMap<String, u32>,
    /// How it wants partitions shared; every member of a group must agree.
    pub assignor: Assignor,
    /// Removed when not heard from for this long (`session.timeout.ms`).
    pub session_timeout_ms: u64,
    /// How long a round waits for it to rejoin (`max.poll.interval.ms`).
    pub rebalance_timeout_ms: u64,
    /// How often it heartbeats: a new coordinator waits twice this for the
    /// members it does not know yet to rejoin.
    pub heartbeat_interval_ms: u64,
    /// The partitions it owns now (cooperative: it keeps consuming them).
    pub owned: Vec<TopicPartition>,
    /// The generation that gave it `owned`. Only claims of the group's
    /// current generation count: a member that missed generations (cut off,
    /// its join lost) may still claim partitions others own now.
    pub owned_generation: u64,
}

/// A request to a group's coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupRequest {
    /// Join (or rejoin) the group; answered when the round ends.
    Join {
        /// The group.
        group: String,
        /// The member and its subscription.
        join: JoinRequest,
    },
    /// A member's assignment in a generation.
    Sync {
        /// The group.
        group: String,
        /// The member.
        member: MemberId,
        /// The generation its join returned.
        generation: u64,
    },
    /// A member is alive; the answer says whether it must rejoin.
    Heartbeat {
        /// The group.
        group: String,
        /// The member.
        member: MemberId,
        /// Its generation.
        generation: u64,
    },
    /// A member leaves at once (its partitions are reassigned now, not after
    /// its session times out).
    Leave {
        /// The group.
        group: String,
        /// The member.
        member: MemberId,
    },
    /// Store committed offsets (the next offset to read, per partition).
    Commit {
        /// The group.
        group: String,
        /// The committing member and its generation; `None` for an admin
        /// commit (reset-offsets), accepted only while the group has no members.
        member: Option<(MemberId, u64)>,
        /// The offsets.
        offsets: Vec<(TopicPartition, u64)>,
    },
    /// The group's committed offsets.
    FetchOffsets {
        /// The group.
        group: String,
    },
    /// The group's state, members and offsets.
    Describe {
        /// The group.
        group: String,
    },
    /// The groups this coordinator knows.
    List {
        /// The `__offsets` partition whose coordinator is asked (for
        /// routing; a coordinator runs one partition's groups).
        partition: u32,
    },
}

impl GroupRequest {
    /// The group the request concerns (`None` for `List`).
    pub fn group(&self) -> Option<&str> {
        match self {
            GroupRequest::Join { group, .. }
            | GroupRequest::Sync { group, .. }
            | GroupRequest::Heartbeat { group, .. }
            | GroupRequest::Leave { group, .. }
            | GroupRequest::Commit { group, .. }
            | GroupRequest::FetchOffsets { group }
            | GroupRequest::Describe { group } => Some(group),
            GroupRequest::List { .. } => None,
        }
    }
}

/// A coordinator's successful answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupResponse {
    /// The round ended: the member is in this generation.
    Joined {
        /// The new generation.
        generation: u64,
        /// The group's assignor.
        assignor: Assignor,
    },
    /// The member's partitions in the generation.
    Synced {
        /// The generation.
        generation: u64,
        /// Its partitions, sorted.
        assignment: Vec<TopicPartition>,
    },
    /// Heartbeat accepted: nothing to do.
    Alive,
    /// The member left.
    Left,
    /// The offsets are stored.
    Committed,
    /// Committed offsets, sorted.
    Offsets(Vec<(TopicPartition, u64)>),
    /// A group's state.
    Described(GroupDescription),
    /// Group names, sorted.
    Groups(Vec<String>),
}

/// Why a coordinator refused a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum GroupError {
    /// The member is not in the group (removed after its session timed out, or never joined): rejoin.
    #[error("unknown member {0} (its session may have timed out): rejoin the group")]
    UnknownMember(MemberId),
    /// The request's generation is not the group's current one: the member was fenced.
    #[error("generation {given} is stale (the group is at generation {current}): rejoin the group")]
    IllegalGeneration {
        /// The generation the request named.
        given: u64,
        /// The group's generation.
        current: u64,
    },
    /// The group is rebalancing: rejoin.
    #[error("the group is rebalancing: rejoin")]
    RebalanceInProgress,
    /// A commit named a partition its member does not own in this generation.
    #[error("partition {0}/{1} is not assigned to this member in this generation")]
    NotAssigned(String, u32),
    /// An admin commit while the group has members.
    #[error("the group has {0} active members: stop them before resetting offsets")]
    GroupNotEmpty(usize),
    /// The member's assignor differs from the group's.
    #[error("the group uses assignor {group:?}; this member asked for {asked:?}")]
    InconsistentAssignor {
        /// The group's.
        group: Assignor,
        /// The member's.
        asked: Assignor,
    },
    /// This node does not coordinate the group (any more); ask the leader of its `__offsets` partition.
    #[error("this node is not the group's coordinator")]
    NotCoordinator,
    /// A join subscribed to more than [`MAX_GROUP_PARTITIONS`] partitions.
    #[error("a member may subscribe to at most {MAX_GROUP_PARTITIONS} partitions, not {0}")]
    TooManyPartitions(u64),
    /// The coordinator is still reading its `__offsets` partition; retry shortly.
    #[error("the group's coordinator is loading; retry")]
    CoordinatorLoading,
    /// The record could not be stored; nothing changed. Retry.
    #[error("the coordinator could not store the record: {0}")]
    NotStored(String),
}

/// One record of the `__offsets` log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OffsetsRecord {
    /// A group's committed offsets, by a member of `generation` (0: admin).
    Commit {
        /// The group.
        group: String,
        /// The committer's generation.
        generation: u64,
        /// The offsets.
        offsets: Vec<(TopicPartition, u64)>,
    },
    /// A group reached a generation (stored before any member learns it, so
    /// a new coordinator never hands out a generation twice).
    Generation {
        /// The group.
        group: String,
        /// The generation.
        generation: u64,
    },
}

impl OffsetsRecord {
    /// The group the record belongs to.
    pub fn group(&self) -> &str {
        match self {
            OffsetsRecord::Commit { group, .. } | OffsetsRecord::Generation { group, .. } => group,
        }
    }
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Answer request `id`.
    Reply {
        /// The request.
        id: RequestId,
        /// The answer.
        answer: Result<GroupResponse, GroupError>,
    },
    /// Append `record` to the group's `__offsets` partition (acks all) and
    /// report the outcome with [`Coordinator::persisted`], in append order.
    Persist {
        /// Names this append in the report.
        token: u64,
        /// The record.
        record: OffsetsRecord,
    },
}

/// A group as `describe` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupDescription {
    /// The group.
    pub group: String,
    /// `Empty`, `Stable` or `Rebalancing`.
    pub state: String,
    /// The current generation.
    pub generation: u64,
    /// The assignor, once a member chose one.
    pub assignor: Option<Assignor>,
    /// Each member with its partitions in the current generation.
    pub members: Vec<(MemberId, Vec<TopicPartition>)>,
    /// Committed offsets.
    pub offsets: Vec<(TopicPartition, u64)>,
}

/// A member as the coordinator knows it.
#[derive(Clone, Debug)]
struct Member {
    join: JoinRequest,
    last_heard: Duration,
    /// Joined the round in progress (only meaningful while rebalancing).
    joined_round: bool,
}

impl Member {
    fn session_timeout(&self) -> Duration {
        Duration::from_millis(self.join.session_timeout_ms)
    }
}

/// Where a group is in its protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Members consume; heartbeats are answered `Alive`.
    Stable,
    /// A round is open until every member rejoined or `deadline`.
    Joining { deadline: Duration },
    /// The round ended; its generation record is being stored.
    Persisting {
        token: u64,
        generation: u64,
        assignment: BTreeMap<MemberId, Vec<TopicPartition>>,
        /// Joins answered when the record is stored.
        joins: Vec<(RequestId, MemberId)>,
        /// Partitions were withheld (cooperative): start another round after.
        follow_up: bool,
    },
}

#[derive(Clone, Debug)]
struct Group {
    generation: u64,
    assignor: Option<Assignor>,
    members: BTreeMap<MemberId, Member>,
    phase: Phase,
    /// Each member's partitions in the current generation.
    assignment: BTreeMap<MemberId, Vec<TopicPartition>>,
    /// Each member's partitions in the generation before: a cooperative
    /// member gives up a moving partition (and commits it) only after it
    /// learns the new generation, in which nobody owns it yet.
    previous: BTreeMap<MemberId, Vec<TopicPartition>>,
    offsets: BTreeMap<TopicPartition, u64>,
    /// Joins waiting for the round to end.
    joins: Vec<(RequestId, MemberId)>,
    /// Loaded from the log by a new coordinator, which does not know the
    /// members yet: the first round waits two heartbeat intervals for them.
    recovering: bool,
}

impl Group {
    fn new() -> Self {
        Group {
            generation: 0,
            assignor: None,
            members: BTreeMap::new(),
            phase: Phase::Stable,
            assignment: BTreeMap::new(),
            previous: BTreeMap::new(),
            offsets: BTreeMap::new(),
            joins: Vec::new(),
            recovering: false,
        }
    }

    fn rebalancing(&self) -> bool {
        self.phase != Phase::Stable
    }
}

/// A commit waiting for its record.
#[derive(Clone, Debug)]
enum Waiting {
    Commit {
        id: RequestId,
        group: String,
        offsets: Vec<(TopicPartition, u64)>,
    },
    Generation {
        group: String,
    },
}

/// The groups one coordinator runs. See the module doc.
#[derive(Clone, Debug, Default)]
pub struct Coordinator {
    groups: BTreeMap<String, Group>,
    next_token: u64,
    /// Appends in flight, by token.
    waiting: BTreeMap<u64, Waiting>,
    /// Test-only fault: accept commits from any member of any generation.
    ignore_generations: bool,
    /// Whether no member of a loaded group can have survived the previous
    /// coordinator (see [`Coordinator::with_no_surviving_members`]).
    no_survivors: bool,
}

impl Coordinator {
    /// A coordinator with no groups.
    pub fn new() -> Self {
        Self::default()
    }

    /// A coordinator whose loaded groups start without waiting for members
    /// it has not heard of: on a node without network every member lives in
    /// the node's own process, so none outlived the previous coordinator.
    pub fn with_no_surviving_members(mut self) -> Self {
        self.no_survivors = true;
        self
    }

    /// Test-only fault switch: a coordinator that does not fence commits
    /// (from removed members or stale generations); the simulation must catch it.
    pub fn with_fault_ignore_generations(mut self) -> Self {
        self.ignore_generations = true;
        self
    }

    /// Replays one record of the `__offsets` log (oldest first) when this
    /// coordinator takes over.
    pub fn load(&mut self, record: &OffsetsRecord) {
        let recovering = !self.no_survivors;
        let group = self.group_mut(record.group());
        group.recovering = recovering;
        match record {
            OffsetsRecord::Commit {
                generation,
                offsets,
                ..
            } => {
                group.generation = group.generation.max(*generation);
                group.offsets.extend(offsets.iter().cloned());
            }
            OffsetsRecord::Generation { generation, .. } => {
                group.generation = group.generation.max(*generation);
            }
        }
    }

    /// A group's committed offset of a partition.
    pub fn committed(&self, group: &str, tp: &TopicPartition) -> Option<u64> {
        self.groups.get(group)?.offsets.get(tp).copied()
    }

    /// A group's current generation (0 before the first).
    pub fn generation(&self, group: &str) -> u64 {
        self.groups.get(group).map_or(0, |g| g.generation)
    }

    fn group_mut(&mut self, name: &str) -> &mut Group {
        self.groups
            .entry(name.to_string())
            .or_insert_with(Group::new)
    }

    /// Handles one request at time `now`.
    pub fn handle(&mut self, id: RequestId, request: GroupRequest, now: Duration) -> Vec<Action> {
        let mut actions = Vec::new();
        match request {
            GroupRequest::Join { group, join } => self.join(id, &group, join, now, &mut actions),
            GroupRequest::Sync {
                group,
                member,
                generation,
            } => {
                let answer = self.sync(&group, &member, generation, now);
                actions.push(Action::Reply { id, answer });
            }
            GroupRequest::Heartbeat {
                group,
                member,
                generation,
            } => {
                let answer = self.heartbeat(&group, &member, generation, now);
                actions.push(Action::Reply { id, answer });
            }
            GroupRequest::Leave { group, member } => {
                self.remove_member(&group, &member, now, &mut actions);
                actions.push(Action::Reply {
                    id,
                    answer: Ok(GroupResponse::Left),
                });
            }
            GroupRequest::Commit {
                group,
                member,
                offsets,
            } => self.commit(id, group, member, offsets, now, &mut actions),
            GroupRequest::FetchOffsets { group } => {
                let offsets = self.groups.get(&group).map_or(Vec::new(), |g| {
                    g.offsets.iter().map(|(tp, o)| (tp.clone(), *o)).collect()
                });
                actions.push(Action::Reply {
                    id,
                    answer: Ok(GroupResponse::Offsets(offsets)),
                });
            }
            GroupRequest::Describe { group } => {
                let description = self.describe(&group);
                actions.push(Action::Reply {
                    id,
                    answer: Ok(GroupResponse::Described(description)),
                });
            }
            GroupRequest::List { .. } => {
                let names = self
                    .groups
                    .iter()
                    .filter(|(_, g)| !g.members.is_empty() || !g.offsets.is_empty())
                    .map(|(name, _)| name.clone())
                    .collect();
                actions.push(Action::Reply {
                    id,
                    answer: Ok(GroupResponse::Groups(names)),
                });
            }
        }
        actions
    }

    fn join(
        &mut self,
        id: RequestId,
        name: &str,
        join: JoinRequest,
        now: Duration,
        actions: &mut Vec<Action>,
    ) {
        let partitions: u64 = join.topics.values().map(|n| u64::from(*n)).sum();
        if partitions > MAX_GROUP_PARTITIONS {
            actions.push(Action::Reply {
                id,
                answer: Err(GroupError::TooManyPartitions(partitions)),
            });
            return;
        }
        let group = self.group_mut(name);
        let others_assignor = group
            .members
            .iter()
            .find(|(m, _)| **m != join.member)
            .map(|(_, m)| m.join.assignor);
        if let Some(assignor) = others_assignor
            && assignor != join.assignor
        {
            actions.push(Action::Reply {
                id,
                answer: Err(GroupError::InconsistentAssignor {
                    group: assignor,
                    asked: join.assignor,
                }),
            });
            return;
        }
        // An earlier join of the same member still waiting is superseded.
        if let Some(at) = group.joins.iter().position(|(_, m)| *m == join.member) {
            let (old, _) = group.joins.remove(at);
            actions.push(Action::Reply {
                id: old,
                answer: Err(GroupError::RebalanceInProgress),
            });
        }
        let member = join.member.clone();
        group.assignor = Some(join.assignor);
        group.members.insert(
            member.clone(),
            Member {
                join,
                last_heard: now,
                joined_round: true,
            },
        );
        group.joins.push((id, member.clone()));
        if group.phase == Phase::Stable {
            open_round(group, now, Some(&member));
        }
        self.try_complete(name, now, actions);
    }

    fn sync(
        &mut self,
        name: &str,
        member: &MemberId,
        generation: u64,
        now: Duration,
    ) -> Result<GroupResponse, GroupError> {
        let group = self.heard_from(name, member, now)?;
        check_generation(group, generation)?;
        Ok(GroupResponse::Synced {
            generation,
            assignment: group.assignment.get(member).cloned().unwrap_or_default(),
        })
    }

    fn heartbeat(
        &mut self,
        name: &str,
        member: &MemberId,
        generation: u64,
        now: Duration,
    ) -> Result<GroupResponse, GroupError> {
        let group = self.heard_from(name, member, now)?;
        if group.rebalancing() {
            return Err(GroupError::RebalanceInProgress);
        }
        check_generation(group, generation)?;
        Ok(GroupResponse::Alive)
    }

    /// The group of a member it knows, noting that the member was heard from.
    fn heard_from(
        &mut self,
        name: &str,
        member: &MemberId,
        now: Duration,
    ) -> Result<&mut Group, GroupError> {
        let unknown = || GroupError::UnknownMember(member.clone());
        let group = self.groups.get_mut(name).ok_or_else(unknown)?;
        group
            .members
            .get_mut(member)
            .ok_or_else(unknown)?
            .last_heard = now;
        Ok(group)
    }

    fn commit(
        &mut self,
        id: RequestId,
        name: String,
        member: Option<(MemberId, u64)>,
        offsets: Vec<(TopicPartition, u64)>,
        now: Duration,
        actions: &mut Vec<Action>,
    ) {
        let ignore_generations = self.ignore_generations;
        let group = self.group_mut(&name);
        let checked = match &member {
            None if group.members.is_empty() => Ok(0),
            None => Err(GroupError::GroupNotEmpty(group.members.len())),
            Some((member, generation)) => check_commit(
                group,
                member,
                *generation,
                &offsets,
                now,
                ignore_generations,
            ),
        };
        let generation = match checked {
            Ok(generation) => generation,
            Err(error) => {
                actions.push(Action::Reply {
                    id,
                    answer: Err(error),
                });
                return;
            }
        };
        let token = self.take_token();
        let record = OffsetsRecord::Commit {
            group: name.clone(),
            generation,
            offsets: offsets.clone(),
        };
        self.waiting.insert(
            token,
            Waiting::Commit {
                id,
                group: name,
                offsets,
            },
        );
        actions.push(Action::Persist { token, record });
    }

    fn take_token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// Reports the outcome of the append named `token`, in append order.
    pub fn persisted(
        &mut self,
        token: u64,
        stored: Result<(), String>,
        now: Duration,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        match self.waiting.remove(&token) {
            Some(Waiting::Commit { id, group, offsets }) => {
                let answer = match stored {
                    Ok(()) => {
                        self.group_mut(&group).offsets.extend(offsets);
                        Ok(GroupResponse::Committed)
                    }
                    Err(reason) => Err(GroupError::NotStored(reason)),
                };
                actions.push(Action::Reply { id, answer });
            }
            Some(Waiting::Generation { group }) => {
                self.generation_persisted(&group, token, stored, now, &mut actions);
            }
            None => {}
        }
        actions
    }

    fn generation_persisted(
        &mut self,
        name: &str,
        token: u64,
        stored: Result<(), String>,
        now: Duration,
        actions: &mut Vec<Action>,
    ) {
        let group = self.group_mut(name);
        let Phase::Persisting {
            token: expected,
            generation,
            assignment,
            joins,
            follow_up,
        } = std::mem::replace(&mut group.phase, Phase::Stable)
        else {
            return;
        };
        debug_assert_eq!(expected, token);
        match stored {
            Ok(()) => {
                group.generation = generation;
                group.previous = std::mem::replace(&mut group.assignment, assignment);
                // Sessions restart with the generation (members were busy
                // rejoining); members that left meanwhile lose their share.
                for member in group.members.values_mut() {
                    member.last_heard = now;
                }
                let departed: Vec<MemberId> = group
                    .assignment
                    .keys()
                    .filter(|m| !group.members.contains_key(*m))
                    .cloned()
                    .collect();
                for member in &departed {
                    group.assignment.remove(member);
                }
                let follow_up = follow_up || !departed.is_empty();
                group.recovering = false;
                for (id, member) in joins {
                    let answer = if group.members.contains_key(&member) {
                        Ok(GroupResponse::Joined {
                            generation,
                            assignor: group.assignor.unwrap_or_default(),
                        })
                    } else {
                        Err(GroupError::UnknownMember(member))
                    };
                    actions.push(Action::Reply { id, answer });
                }
                // Joins that arrived while the record was stored, and
                // partitions withheld for a second round, open the next one.
                if !group.joins.is_empty() || follow_up {
                    let joined: BTreeSet<MemberId> =
                        group.joins.iter().map(|(_, m)| m.clone()).collect();
                    open_round(group, now, None);
                    for member in joined {
                        if let Some(m) = group.members.get_mut(&member) {
                            m.joined_round = true;
                        }
                    }
                }
            }
            Err(reason) => {
                group.generation = group.generation.max(generation);
                for (id, _) in joins {
                    actions.push(Action::Reply {
                        id,
                        answer: Err(GroupError::NotStored(reason.clone())),
                    });
                }
                group.assignment.clear();
                open_round(group, now, None);
            }
        }
        self.try_complete(name, now, actions);
    }

    /// Advances time: removes members whose session timed out and ends
    /// rounds whose deadline passed.
    pub fn tick(&mut self, now: Duration) -> Vec<Action> {
        let mut actions = Vec::new();
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for name in names {
            let Some(group) = self.groups.get(&name) else {
                continue;
            };
            let waiting_on_round = |m: &Member| m.joined_round && group.rebalancing();
            let expired: Vec<MemberId> = group
                .members
                .iter()
                .filter(|(_, m)| !waiting_on_round(m))
                .filter(|(_, m)| now.saturating_sub(m.last_heard) > m.session_timeout())
                .map(|(id, _)| id.clone())
                .collect();
            for member in expired {
                self.remove_member(&name, &member, now, &mut actions);
            }
            self.try_complete(&name, now, &mut actions);
        }
        actions
    }

    /// The earliest time `tick` has something to do.
    pub fn next_wake(&self) -> Option<Duration> {
        let mut wake: Option<Duration> = None;
        for group in self.groups.values() {
            for m in group.members.values() {
                let at = m.last_heard + m.session_timeout();
                wake = Some(wake.map_or(at, |w| w.min(at)));
            }
            if let Phase::Joining { deadline } = group.phase {
                wake = Some(wake.map_or(deadline, |w| w.min(deadline)));
            }
        }
        wake
    }

    /// Fails every request waiting on this coordinator (it stopped leading).
    pub fn abandon(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        for (_, waiting) in std::mem::take(&mut self.waiting) {
            if let Waiting::Commit { id, .. } = waiting {
                actions.push(Action::Reply {
                    id,
                    answer: Err(GroupError::NotCoordinator),
                });
            }
        }
        for group in self.groups.values_mut() {
            let mut joins = std::mem::take(&mut group.joins);
            if let Phase::Persisting { joins: more, .. } = &mut group.phase {
                joins.append(more);
            }
            for (id, _) in joins {
                actions.push(Action::Reply {
                    id,
                    answer: Err(GroupError::NotCoordinator),
                });
            }
        }
        self.groups.clear();
        actions
    }

    fn remove_member(
        &mut self,
        name: &str,
        member: &MemberId,
        now: Duration,
        actions: &mut Vec<Action>,
    ) {
        let Some(group) = self.groups.get_mut(name) else {
            return;
        };
        if group.members.remove(member).is_none() {
            return;
        }
        group.assignment.remove(member);
        if let Some(at) = group.joins.iter().position(|(_, m)| m == member) {
            let (id, _) = group.joins.remove(at);
            actions.push(Action::Reply {
                id,
                answer: Err(GroupError::UnknownMember(member.clone())),
            });
        }
        if group.members.is_empty() {
            group.assignment.clear();
            if matches!(group.phase, Phase::Joining { .. }) {
                group.phase = Phase::Stable;
            }
        } else if group.phase == Phase::Stable {
            // The others share the member's partitions in a new generation.
            open_round(group, now, None);
        }
        self.try_complete(name, now, actions);
    }

    /// Ends the open round of `name` if every member rejoined or its deadline passed.
    fn try_complete(&mut self, name: &str, now: Duration, actions: &mut Vec<Action>) {
        let Some(group) = self.groups.get_mut(name) else {
            return;
        };
        let Phase::Joining { deadline } = group.phase else {
            return;
        };
        let all_joined = group.members.values().all(|m| m.joined_round) && !group.recovering;
        if !all_joined && now < deadline {
            return;
        }
        group.members.retain(|_, m| m.joined_round);
        group.recovering = false;
        if group.members.is_empty() {
            group.phase = Phase::Stable;
            group.assignment.clear();
            return;
        }
        let assignor = group.assignor.unwrap_or_default();
        let (assignment, follow_up) = assign(assignor, &group.members, group.generation);
        let generation = group.generation + 1;
        let joins = std::mem::take(&mut group.joins);
        self.next_token += 1;
        let token = self.next_token;
        let group = self.group_mut(name);
        group.phase = Phase::Persisting {
            token,
            generation,
            assignment,
            joins,
            follow_up,
        };
        self.waiting.insert(
            token,
            Waiting::Generation {
                group: name.to_string(),
            },
        );
        actions.push(Action::Persist {
            token,
            record: OffsetsRecord::Generation {
                group: name.to_string(),
                generation,
            },
        });
    }

    fn describe(&self, name: &str) -> GroupDescription {
        let Some(group) = self.groups.get(name) else {
            return GroupDescription {
                group: name.to_string(),
                state: "Dead".into(),
                ..Default::default()
            };
        };
        let state = if group.members.is_empty() {
            "Empty"
        } else if group.rebalancing() {
            "Rebalancing"
        } else {
            "Stable"
        };
        GroupDescription {
            group: name.to_string(),
            state: state.into(),
            generation: group.generation,
            assignor: group.assignor,
            members: group
                .members
                .keys()
                .map(|m| {
                    (
                        m.clone(),
                        group.assignment.get(m).cloned().unwrap_or_default(),
                    )
                })
                .collect(),
            offsets: group
                .offsets
                .iter()
                .map(|(tp, o)| (tp.clone(), *o))
                .collect(),
        }
    }
}

/// Opens a round: every member must rejoin, except `joined` (whose join opened it).
/// A recovering group's round lasts two heartbeat intervals: members the new
/// coordinator has not heard of yet learn of it at their next heartbeat.
fn open_round(group: &mut Group, now: Duration, joined: Option<&MemberId>) {
    let timeout = if group.recovering {
        group
            .members
            .values()
            .map(|m| {
                let heartbeat = Duration::from_millis(m.join.heartbeat_interval_ms);
                (heartbeat * 2 + Duration::from_millis(500)).min(m.session_timeout())
            })
            .max()
            .unwrap_or_default()
    } else {
        group
            .members
            .values()
            .map(|m| Duration::from_millis(m.join.rebalance_timeout_ms))
            .max()
            .unwrap_or_default()
    };
    for (id, member) in group.members.iter_mut() {
        member.joined_round = Some(id) == joined;
    }
    group.phase = Phase::Joining {
        deadline: now + timeout,
    };
}

/// Checks a member's commit; returns the generation to record.
fn check_commit(
    group: &mut Group,
    member: &MemberId,
    generation: u64,
    offsets: &[(TopicPartition, u64)],
    now: Duration,
    ignore_generations: bool,
) -> Result<u64, GroupError> {
    if ignore_generations {
        return Ok(generation);
    }
    let persisting = matches!(group.phase, Phase::Persisting { .. });
    if group.recovering && !persisting && generation == group.generation {
        // A new coordinator does not know who owns what in the generation it
        // loaded; its members (the only owners there are until the next
        // generation is stored) may still commit, e.g. before they rejoin.
        return Ok(generation);
    }
    let Some(known) = group.members.get_mut(member) else {
        return Err(GroupError::UnknownMember(member.clone()));
    };
    known.last_heard = now;
    check_generation(group, generation)?;
    for (tp, _) in offsets {
        if !may_commit(group, member, tp) {
            return Err(GroupError::NotAssigned(tp.0.clone(), tp.1));
        }
        if moving_to_another(group, member, tp) {
            // Stored after the next generation's record, it could land after
            // the new owner read the offsets (Kafka: REBALANCE_IN_PROGRESS).
            return Err(GroupError::RebalanceInProgress);
        }
    }
    Ok(generation)
}

/// Refuses a request that names another generation than the group's.
fn check_generation(group: &Group, generation: u64) -> Result<(), GroupError> {
    if generation == group.generation {
        Ok(())
    } else {
        Err(GroupError::IllegalGeneration {
            given: generation,
            current: group.generation,
        })
    }
}

/// Whether the generation being stored gives `tp` to a member other than `member`.
fn moving_to_another(group: &Group, member: &MemberId, tp: &TopicPartition) -> bool {
    let Phase::Persisting { assignment, .. } = &group.phase else {
        return false;
    };
    assignment
        .iter()
        .any(|(m, tps)| m != member && tps.contains(tp))
}

/// Whether `member` may move the offset of `tp` in the current generation:
/// it owns it, or it owned it in the generation before and nobody owns it
/// now (a cooperative member committing a partition it is giving up).
fn may_commit(group: &Group, member: &MemberId, tp: &TopicPartition) -> bool {
    let owns = |assignment: &BTreeMap<MemberId, Vec<TopicPartition>>, m: &MemberId| {
        assignment.get(m).is_some_and(|tps| tps.contains(tp))
    };
    if owns(&group.assignment, member) {
        return true;
    }
    let owned_before = owns(&group.previous, member);
    owned_before && !group.assignment.keys().any(|m| owns(&group.assignment, m))
}

/// Shares the subscribed partitions among `members` with `assignor`.
/// Returns each member's partitions (sorted) and whether partitions were
/// withheld for a second round (cooperative).
fn assign(
    assignor: Assignor,
    members: &BTreeMap<MemberId, Member>,
    generation: u64,
) -> (BTreeMap<MemberId, Vec<TopicPartition>>, bool) {
    let subscriptions: BTreeMap<MemberId, BTreeSet<String>> = members
        .iter()
        .map(|(id, m)| (id.clone(), m.join.topics.keys().cloned().collect()))
        .collect();
    let mut partition_counts: BTreeMap<String, u32> = BTreeMap::new();
    for m in members.values() {
        for (topic, count) in &m.join.topics {
            let known = partition_counts.entry(topic.clone()).or_default();
            *known = (*known).max(*count);
        }
    }
    let owned: BTreeMap<MemberId, Vec<TopicPartition>> = members
        .iter()
        .filter(|(_, m)| m.join.owned_generation == generation)
        .map(|(id, m)| (id.clone(), m.join.owned.clone()))
        .collect();
    let mut assignment = match assignor {
        Assignor::Range => assign_range(&subscriptions, &partition_counts),
        Assignor::RoundRobin => assign_round_robin(&subscriptions, &partition_counts),
        Assignor::CooperativeSticky => assign_sticky(&subscriptions, &partition_counts, &owned),
    };
    let mut withheld = false;
    if assignor.is_cooperative() {
        // A partition another member still owns goes to its new owner only
        // in the next round, once the old owner has given it up.
        let owner_of: BTreeMap<&TopicPartition, &MemberId> = owned
            .iter()
            .flat_map(|(m, tps)| tps.iter().map(move |tp| (tp, m)))
            .collect();
        for (member, tps) in assignment.iter_mut() {
            tps.retain(|tp| {
                let keep = owner_of.get(tp).is_none_or(|owner| *owner == member);
                withheld |= !keep;
                keep
            });
        }
    }
    for tps in assignment.values_mut() {
        tps.sort();
    }
    (assignment, withheld)
}

/// Every partition of the subscribed topics, sorted.
fn all_partitions(counts: &BTreeMap<String, u32>) -> Vec<TopicPartition> {
    counts
        .iter()
        .flat_map(|(t, n)| (0..*n).map(move |p| (t.clone(), p)))
        .collect()
}

fn empty_assignment(
    subscriptions: &BTreeMap<MemberId, BTreeSet<String>>,
) -> BTreeMap<MemberId, Vec<TopicPartition>> {
    subscriptions
        .keys()
        .map(|m| (m.clone(), Vec::new()))
        .collect()
}

/// Kafka's range assignor: per topic, members in id order get contiguous
/// ranges, the first `n % m` one partition more.
pub fn assign_range(
    subscriptions: &BTreeMap<MemberId, BTreeSet<String>>,
    counts: &BTreeMap<String, u32>,
) -> BTreeMap<MemberId, Vec<TopicPartition>> {
    let mut out = empty_assignment(subscriptions);
    for (topic, n) in counts {
        let subscribers: Vec<&MemberId> = subscriptions
            .iter()
            .filter(|(_, t)| t.contains(topic))
            .map(|(m, _)| m)
            .collect();
        if subscribers.is_empty() {
            continue;
        }
        let (per, extra) = (
            *n as usize / subscribers.len(),
            *n as usize % subscribers.len(),
        );
        let mut next = 0u32;
        for (i, member) in subscribers.iter().enumerate() {
            let take = per + usize::from(i < extra);
            for _ in 0..take {
                out.entry((*member).clone())
                    .or_default()
                    .push((topic.clone(), next));
                next += 1;
            }
        }
    }
    out
}

/// Kafka's round-robin assignor: all partitions in order, dealt to the
/// subscribed members in turn.
pub fn assign_round_robin(
    subscriptions: &BTreeMap<MemberId, BTreeSet<String>>,
    counts: &BTreeMap<String, u32>,
) -> BTreeMap<MemberId, Vec<TopicPartition>> {
    let mut out = empty_assignment(subscriptions);
    let members: Vec<&MemberId> = subscriptions.keys().collect();
    if members.is_empty() {
        return out;
    }
    let mut turn = 0usize;
    for tp in all_partitions(counts) {
        for _ in 0..members.len() {
            let member = members[turn % members.len()];
            turn += 1;
            if subscriptions[member].contains(&tp.0) {
                out.entry(member.clone()).or_default().push(tp);
                break;
            }
        }
    }
    out
}

/// A balanced assignment that keeps each member's owned partitions where
/// balance allows: keep, shed the excess of the most loaded, give the rest to
/// the least loaded subscribers, then even out.
pub fn assign_sticky(
    subscriptions: &BTreeMap<MemberId, BTreeSet<String>>,
    counts: &BTreeMap<String, u32>,
    owned: &BTreeMap<MemberId, Vec<TopicPartition>>,
) -> BTreeMap<MemberId, Vec<TopicPartition>> {
    let mut out = empty_assignment(subscriptions);
    let partitions = all_partitions(counts);
    let exists: BTreeSet<&TopicPartition> = partitions.iter().collect();
    let max_per_member = partitions.len().div_ceil(subscriptions.len().max(1));
    let mut taken: BTreeSet<TopicPartition> = BTreeSet::new();
    for (member, tps) in owned {
        let Some(topics) = subscriptions.get(member) else {
            continue;
        };
        let mut kept: Vec<TopicPartition> = tps
            .iter()
            .filter(|tp| exists.contains(tp) && topics.contains(&tp.0) && !taken.contains(*tp))
            .cloned()
            .collect();
        kept.sort();
        kept.dedup();
        kept.truncate(max_per_member);
        taken.extend(kept.iter().cloned());
        out.insert(member.clone(), kept);
    }
    for tp in partitions.iter().filter(|tp| !taken.contains(*tp)) {
        let least = out
            .iter()
            .filter(|(m, _)| subscriptions[*m].contains(&tp.0))
            .min_by_key(|(m, tps)| (tps.len(), (*m).clone()))
            .map(|(m, _)| m.clone());
        if let Some(member) = least {
            out.entry(member).or_default().push(tp.clone());
        }
    }
    even_out(&mut out, subscriptions);
    out
}

/// Moves partitions from the most to the least loaded member (that
/// subscribes to their topic) until counts differ by at most one.
fn even_out(
    out: &mut BTreeMap<MemberId, Vec<TopicPartition>>,
    subscriptions: &BTreeMap<MemberId, BTreeSet<String>>,
) {
    let total: usize = out.values().map(Vec::len).sum();
    for _ in 0..=total {
        let Some((most, least)) = imbalance(out) else {
            return;
        };
        let movable = out[&most]
            .iter()
            .rposition(|tp| subscriptions[&least].contains(&tp.0));
        let Some(at) = movable else {
            return;
        };
        let tp = out.entry(most).or_default().remove(at);
        out.entry(least).or_default().push(tp);
    }
}

/// The most and least loaded members, when they differ by more than one.
fn imbalance(out: &BTreeMap<MemberId, Vec<TopicPartition>>) -> Option<(MemberId, MemberId)> {
    let most = out
        .iter()
        .max_by_key(|(m, t)| (t.len(), std::cmp::Reverse((*m).clone())))?;
    let least = out.iter().min_by_key(|(m, t)| (t.len(), (*m).clone()))?;
    (most.1.len() > least.1.len() + 1).then(|| (most.0.clone(), least.0.clone()))
}

#[cfg(test)]
mod tests;
