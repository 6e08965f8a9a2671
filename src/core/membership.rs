//! Membership: who is in the mesh and who is alive, as a pure state machine.
//!
//! # Protocol
//! Every member keeps an [`Entry`] per peer: `(incarnation, heartbeat, status,
//! meta)`. Each gossip interval a member
//! 1. increments its own heartbeat;
//! 2. checks every other member: one whose heartbeat has not advanced for
//!    `suspect_after` (stretched in large meshes, see
//!    [`MembershipConfig::suspect_after_for`]) becomes **Suspect**; one that stays Suspect for
//!    `suspicion_timeout` becomes **Dead**; a Dead entry is forgotten after
//!    `dead_retention` (long enough that stale gossip cannot resurrect it);
//! 3. sends its view to `fanout` random live members, and to a few *seeds*
//!    (peers found by bootstrap, mDNS or Kademlia that are not members yet),
//!    asking those for a reply.
//!
//! Merging an entry received by gossip (SWIM's rules, with heartbeats as the
//! liveness signal):
//! - a higher incarnation is progress (a restarted or refuting peer);
//! - at equal incarnation a higher heartbeat is progress and clears a local
//!   suspicion; a locally Dead member stays dead for that incarnation;
//! - suspicion and death are never adopted from others: each member judges on
//!   its own evidence and timers, so one slow link does not make a peer Suspect
//!   everywhere, and no member declares a death before its own suspicion
//!   timeout; Dead entries are gossiped so that the dead peer itself learns it;
//! - an entry about oneself that says Suspect or Dead is refuted by raising
//!   one's own incarnation above it: a false death is undone by the re-join.
//!
//! Metadata travels with a member's own entry always, and with other entries
//! for `meta_spread_rounds` rounds after it changed; a reply to a newcomer
//! carries everything. A peer speaking another protocol version is refused and
//! reported once. Light clients only listen: they ask for replies and never
//! advertise an entry of their own.
//!
//! The machine takes time as a `Duration` since an arbitrary origin and draws
//! randomness from a seeded [`Rng`]; it does no I/O. Iteration is over
//! `BTreeMap`s so that a simulation replays exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::rng::Rng;

/// Failed sends after which a seed (a peer found but not yet a member) is dropped.
pub const MAX_SEED_FAILURES: u32 = 20;

/// The membership protocol version this build speaks; peers must speak the same.
pub const PROTOCOL_VERSION: u32 = 1;

/// What identifies a peer in the core: the real node uses libp2p peer ids, the
/// simulation small integers.
pub trait PeerKey:
    Clone + Ord + Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
}
impl<T: Clone + Ord + Debug + Serialize + DeserializeOwned + Send + Sync + 'static> PeerKey for T {}

/// What a member does in the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// Stores partitions and takes part in quorums.
    Storage,
    /// Produces and consumes through storage nodes; stores nothing and is not a member.
    LightClient,
}

/// What a member says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberMeta {
    /// Its role.
    pub role: Role,
    /// The membership protocol version it speaks.
    pub protocol_version: u32,
    /// Addresses it listens on (multiaddrs as text).
    pub listen_addrs: Vec<String>,
    /// Free bytes on its data disk, when known.
    pub free_disk_bytes: Option<u64>,
    /// An optional failure zone (rack, site), for placement.
    pub zone: Option<String>,
    /// The mesh it belongs to, once it knows (set by the mesh's founder and
    /// learned by every node that joins). Members of two meshes refuse each
    /// other, so two meshes never merge silently.
    pub mesh_id: Option<u64>,
}

/// A member's liveness as seen locally.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Status {
    /// Its heartbeat advances.
    Alive,
    /// Its heartbeat stopped advancing; it may be dead or just slow.
    Suspect,
    /// Suspected for longer than the suspicion timeout.
    Dead,
}

/// One member's state as gossiped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry<P> {
    /// Who.
    pub peer: P,
    /// Raised by the member on restart and to refute a suspicion.
    pub incarnation: u64,
    /// Raised by the member every gossip interval.
    pub heartbeat: u64,
    /// Alive or Dead as the sender sees it (Suspect is sent as Alive: suspicion is local).
    pub status: Status,
    /// Its metadata, when the sender includes it.
    pub meta: Option<MemberMeta>,
}

/// One gossip message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipMessage<P> {
    /// The sender's protocol version.
    pub protocol_version: u32,
    /// The sender's entries.
    pub entries: Vec<Entry<P>>,
    /// The sender wants the receiver's whole view back (it is new or a light client).
    pub want_reply: bool,
    /// Peers the sender knows of but lacks metadata for; the receiver replies
    /// with the metadata it has (pull, so that metadata reaches everyone even
    /// when the member itself rarely gossips to them directly).
    pub need_meta: Vec<P>,
}

/// Timings and sizes of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipConfig {
    /// Time between two gossip rounds (and heartbeats). Default 500 ms.
    pub gossip_interval: Duration,
    /// Members gossiped to per round. Default 3.
    pub fanout: usize,
    /// Seeds (non-members) contacted per round. Default 3.
    pub seed_fanout: usize,
    /// Heartbeat silence after which a member becomes Suspect. Default 2 s.
    pub suspect_after: Duration,
    /// Time a member stays Suspect before it is declared Dead. Default 3 s.
    pub suspicion_timeout: Duration,
    /// Time a Dead member is remembered (to ignore stale gossip about it). Default 60 s.
    pub dead_retention: Duration,
    /// Most entries in one gossip message (replies to newcomers are not capped). Default 128.
    pub max_entries_per_message: usize,
    /// Rounds during which changed metadata is forwarded by others. Default 8.
    pub meta_spread_rounds: u64,
    /// Most peers asked for in one message's `need_meta`. Default 32.
    pub max_meta_requests: usize,
    /// A deliberate bug, for proving that the simulation's checkers catch one.
    #[cfg(feature = "fault-injection")]
    pub injected_fault: Option<InjectedFault>,
}

/// Deliberate protocol bugs the simulation can switch on (feature
/// `fault-injection` only; never in a normal build).
#[cfg(feature = "fault-injection")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedFault {
    /// Declare a member dead as soon as it is suspected, skipping the suspicion timeout.
    SkipSuspicion,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            gossip_interval: Duration::from_millis(500),
            fanout: 3,
            seed_fanout: 3,
            suspect_after: Duration::from_secs(2),
            suspicion_timeout: Duration::from_secs(3),
            dead_retention: Duration::from_secs(60),
            max_entries_per_message: 128,
            meta_spread_rounds: 8,
            max_meta_requests: 32,
            #[cfg(feature = "fault-injection")]
            injected_fault: None,
        }
    }
}

impl MembershipConfig {
    /// Checks the timings.
    pub fn validate(&self) -> Result<(), crate::error::ConfigError> {
        let invalid = |name: &'static str, reason: &str| crate::error::ConfigError::Invalid {
            name,
            reason: reason.to_string(),
        };
        if self.gossip_interval.is_zero() {
            return Err(invalid("gossip_interval", "must be positive"));
        }
        if self.fanout == 0 {
            return Err(invalid("fanout", "must be at least 1"));
        }
        if self.suspect_after < self.gossip_interval * 2 {
            return Err(invalid(
                "suspect_after",
                "must be at least two gossip intervals",
            ));
        }
        if self.suspicion_timeout < self.gossip_interval {
            return Err(invalid(
                "suspicion_timeout",
                "must be at least one gossip interval",
            ));
        }
        if self.dead_retention < self.suspect_after + self.suspicion_timeout {
            return Err(invalid(
                "dead_retention",
                "must exceed suspect_after + suspicion_timeout",
            ));
        }
        if self.max_entries_per_message == 0 {
            return Err(invalid("max_entries_per_message", "must be at least 1"));
        }
        Ok(())
    }

    /// The longest time from a member's last heartbeat to its death being
    /// declared by a peer that heard it directly: `suspect_after +
    /// suspicion_timeout`, plus one gossip interval of detection granularity.
    pub fn failure_detection_time(&self) -> Duration {
        self.suspect_after + self.suspicion_timeout + self.gossip_interval
    }

    /// The heartbeat silence that makes a member Suspect in a mesh of
    /// `members` peers: `suspect_after`, or more when the mesh is so large that
    /// a heartbeat needs longer to spread. A heartbeat reaches everyone in
    /// about `log(members) / log(1 + fanout × share)` rounds, where `share` is
    /// the part of the view one message carries; allowing twice that plus two
    /// rounds keeps false suspicions rare (as memberlist scales its timeouts
    /// with log N).
    pub fn suspect_after_for(&self, members: usize) -> Duration {
        let n = members.max(2) as f64;
        let share = (self.max_entries_per_message as f64 / n).min(1.0);
        let spread = 1.0 + self.fanout as f64 * share;
        let rounds = 2.0 * (n.ln() / spread.ln()).ceil() + 2.0;
        self.suspect_after.max(self.gossip_interval.mul_f64(rounds))
    }
}

/// What the membership tells its driver about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipEvent<P> {
    /// A peer became a live member (first seen, or back after death).
    Joined {
        /// Who.
        peer: P,
    },
    /// A member's heartbeat stopped.
    Suspected {
        /// Who.
        peer: P,
    },
    /// A suspected member's heartbeat advanced again.
    Recovered {
        /// Who.
        peer: P,
    },
    /// A member was declared dead here (after `suspicion_timeout` as Suspect).
    Died {
        /// Who.
        peer: P,
    },
    /// A peer speaks another protocol version and was refused.
    Refused {
        /// Who.
        peer: P,
        /// The version it speaks.
        version: u32,
    },
    /// A peer belongs to another mesh and was refused.
    ForeignMesh {
        /// Who.
        peer: P,
        /// Its mesh.
        mesh_id: u64,
    },
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action<P> {
    /// Send `message` to `to`.
    Send {
        /// The receiver.
        to: P,
        /// The message.
        message: GossipMessage<P>,
    },
    /// Answer the message being handled with `message` (as the response to
    /// it, so that a light client that cannot be dialled still gets it).
    Reply {
        /// The sender of the message being answered.
        to: P,
        /// The reply.
        message: GossipMessage<P>,
    },
    /// Report an event (log it, update routing).
    Event(MembershipEvent<P>),
}

/// A member as the local view has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView<P> {
    /// Who.
    pub peer: P,
    /// Its liveness here.
    pub status: Status,
    /// Its incarnation.
    pub incarnation: u64,
    /// Its last heartbeat seen.
    pub heartbeat: u64,
    /// Its metadata, once known.
    pub meta: Option<MemberMeta>,
}

impl<P> MemberView<P> {
    /// Whether the member announced itself as a storage node.
    pub fn is_storage(&self) -> bool {
        self.meta.as_ref().is_some_and(|m| m.role == Role::Storage)
    }
}

/// The local state of one other member.
#[derive(Clone, Debug)]
struct Member {
    incarnation: u64,
    heartbeat: u64,
    status: Status,
    meta: Option<MemberMeta>,
    /// When the heartbeat or incarnation last advanced, or the status last changed.
    since: Duration,
    /// Round until which this member's metadata is forwarded to others.
    meta_fresh_until: u64,
}

/// The membership state machine of one peer.
pub struct Membership<P> {
    me: P,
    config: MembershipConfig,
    my_meta: MemberMeta,
    incarnation: u64,
    heartbeat: u64,
    round: u64,
    members: BTreeMap<P, Member>,
    /// Peers heard of that are not members yet.
    seeds: BTreeSet<P>,
    /// Failed sends per seed since it was last found; a seed is dropped after
    /// `MAX_SEED_FAILURES` of them (it is re-added when found again).
    seed_failures: BTreeMap<P, u32>,
    /// Peers refused for their protocol version (reported once).
    refused: BTreeSet<P>,
    rng: Rng,
}

impl<P: PeerKey> Membership<P> {
    /// A membership for `me` with its metadata. `incarnation` must be higher
    /// than any earlier run of the same peer used (the driver passes the start
    /// time in ms); `seed` fixes the random choices.
    pub fn new(
        me: P,
        my_meta: MemberMeta,
        incarnation: u64,
        config: MembershipConfig,
        seed: u64,
    ) -> Self {
        Membership {
            me,
            config,
            my_meta,
            incarnation,
            heartbeat: 0,
            round: 0,
            members: BTreeMap::new(),
            seeds: BTreeSet::new(),
            seed_failures: BTreeMap::new(),
            refused: BTreeSet::new(),
            rng: Rng::new(seed),
        }
    }

    /// This peer.
    pub fn me(&self) -> &P {
        &self.me
    }

    /// The config.
    pub fn config(&self) -> &MembershipConfig {
        &self.config
    }

    /// This peer's incarnation (raised when it refutes a suspicion).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Updates this peer's metadata (listen addresses, free disk); it is
    /// gossiped from the next round on.
    pub fn set_meta(&mut self, meta: MemberMeta) {
        self.my_meta = meta;
    }

    /// Every other member known, with its status, sorted by peer.
    pub fn members(&self) -> Vec<MemberView<P>> {
        self.members
            .iter()
            .map(|(peer, m)| MemberView {
                peer: peer.clone(),
                status: m.status,
                incarnation: m.incarnation,
                heartbeat: m.heartbeat,
                meta: m.meta.clone(),
            })
            .collect()
    }

    /// Members currently Alive or Suspect (not Dead).
    pub fn live_members(&self) -> impl Iterator<Item = &P> {
        self.members
            .iter()
            .filter(|(_, m)| m.status != Status::Dead)
            .map(|(p, _)| p)
    }

    /// The status of one peer, if it is a member.
    pub fn status(&self, peer: &P) -> Option<Status> {
        self.members.get(peer).map(|m| m.status)
    }

    /// A peer was found (bootstrap address, mDNS, Kademlia): gossip with it
    /// until it becomes a member.
    pub fn add_seed(&mut self, peer: P) {
        let live = self
            .members
            .get(&peer)
            .is_some_and(|m| m.status != Status::Dead);
        if peer != self.me && !live && !self.refused.contains(&peer) {
            // Found again: its failures start over.
            self.seed_failures.remove(&peer);
            self.seeds.insert(peer);
        }
    }

    /// Advances time: heartbeat, failure detection, and one gossip round.
    pub fn tick(&mut self, now: Duration) -> Vec<Action<P>> {
        self.round += 1;
        self.heartbeat += 1;
        let mut actions = Vec::new();
        self.detect_failures(now, &mut actions);
        self.gossip_round(&mut actions);
        actions
    }

    fn detect_failures(&mut self, now: Duration, actions: &mut Vec<Action<P>>) {
        let mut forgotten = Vec::new();
        let suspicion_timeout = self.suspicion_timeout();
        let suspect_after = self.config.suspect_after_for(self.members.len() + 1);
        for (peer, m) in self.members.iter_mut() {
            let quiet = now.saturating_sub(m.since);
            match m.status {
                Status::Alive if quiet >= suspect_after => {
                    m.status = Status::Suspect;
                    m.since = now;
                    actions.push(Action::Event(MembershipEvent::Suspected {
                        peer: peer.clone(),
                    }));
                }
                Status::Suspect if quiet >= suspicion_timeout => {
                    m.status = Status::Dead;
                    m.since = now;
                    // Keep knocking: after a partition heals, each side must
                    // tell the other it was declared dead so that it re-joins.
                    self.seeds.insert(peer.clone());
                    actions.push(Action::Event(MembershipEvent::Died { peer: peer.clone() }));
                }
                Status::Dead if quiet >= self.config.dead_retention => forgotten.push(peer.clone()),
                _ => {}
            }
        }
        for peer in forgotten {
            self.members.remove(&peer);
            self.forget_seed(&peer);
        }
    }

    /// The suspicion timeout in force (zero under the injected fault).
    fn suspicion_timeout(&self) -> Duration {
        #[cfg(feature = "fault-injection")]
        if self.config.injected_fault == Some(InjectedFault::SkipSuspicion) {
            return Duration::ZERO;
        }
        self.config.suspicion_timeout
    }

    fn gossip_round(&mut self, actions: &mut Vec<Action<P>>) {
        let mut live: Vec<P> = self.live_members().cloned().collect();
        let targets: Vec<P> = self.rng.choose(&mut live, self.config.fanout).to_vec();
        let mut seeds: Vec<P> = self.seeds.iter().cloned().collect();
        let seed_targets: Vec<P> = self
            .rng
            .choose(&mut seeds, self.config.seed_fanout)
            .to_vec();
        let is_client = self.my_meta.role == Role::LightClient;
        if !targets.is_empty() {
            let message = self.message(false, is_client);
            for to in targets {
                actions.push(Action::Send {
                    to,
                    message: message.clone(),
                });
            }
        }
        if !seed_targets.is_empty() {
            let message = self.message(false, true);
            for to in seed_targets {
                actions.push(Action::Send {
                    to,
                    message: message.clone(),
                });
            }
        }
    }

    /// A gossip message: our own entry (unless a light client), then other
    /// entries up to the cap (all of them, with metadata, when `full`).
    fn message(&mut self, full: bool, want_reply: bool) -> GossipMessage<P> {
        let cap = if full {
            usize::MAX
        } else {
            self.config.max_entries_per_message
        };
        let mut entries = Vec::new();
        if self.my_meta.role == Role::Storage {
            entries.push(self.own_entry());
        }
        let mut others: Vec<(&P, &Member)> = self.members.iter().collect();
        let room = cap.saturating_sub(entries.len());
        if others.len() > room {
            self.rng.choose(&mut others, room);
            others.truncate(room);
        }
        for (peer, m) in others {
            let fresh = full || m.meta_fresh_until >= self.round;
            entries.push(Entry {
                peer: peer.clone(),
                incarnation: m.incarnation,
                heartbeat: m.heartbeat,
                status: if m.status == Status::Dead {
                    Status::Dead
                } else {
                    Status::Alive
                },
                meta: if fresh { m.meta.clone() } else { None },
            });
        }
        let need_meta = if want_reply {
            Vec::new()
        } else {
            self.members
                .iter()
                .filter(|(_, m)| m.meta.is_none() && m.status != Status::Dead)
                .map(|(p, _)| p.clone())
                .take(self.config.max_meta_requests)
                .collect()
        };
        GossipMessage {
            protocol_version: PROTOCOL_VERSION,
            entries,
            want_reply,
            need_meta,
        }
    }

    /// The entries, with metadata, of the requested peers we have metadata for.
    fn meta_reply(&self, wanted: &[P]) -> Option<GossipMessage<P>> {
        let entries: Vec<Entry<P>> = wanted
            .iter()
            .take(self.config.max_meta_requests)
            .filter_map(|peer| {
                let m = self.members.get(peer)?;
                Some(Entry {
                    peer: peer.clone(),
                    incarnation: m.incarnation,
                    heartbeat: m.heartbeat,
                    status: if m.status == Status::Dead {
                        Status::Dead
                    } else {
                        Status::Alive
                    },
                    meta: Some(m.meta.clone()?),
                })
            })
            .collect();
        (!entries.is_empty()).then_some(GossipMessage {
            protocol_version: PROTOCOL_VERSION,
            entries,
            want_reply: false,
            need_meta: Vec::new(),
        })
    }

    fn own_entry(&self) -> Entry<P> {
        Entry {
            peer: self.me.clone(),
            incarnation: self.incarnation,
            heartbeat: self.heartbeat,
            status: Status::Alive,
            meta: Some(self.my_meta.clone()),
        }
    }

    /// Handles a gossip message from `from`.
    pub fn handle_message(
        &mut self,
        from: P,
        message: GossipMessage<P>,
        now: Duration,
    ) -> Vec<Action<P>> {
        let mut actions = Vec::new();
        if message.protocol_version != PROTOCOL_VERSION {
            self.refuse(from, message.protocol_version, &mut actions);
            return actions;
        }
        for entry in message.entries {
            self.merge(entry, now, &mut actions);
        }
        // A peer we hear from needs no more knocking, unless we hold it dead:
        // then it must still learn that, to re-join.
        if self
            .members
            .get(&from)
            .is_none_or(|m| m.status != Status::Dead)
        {
            self.forget_seed(&from);
        }
        if message.want_reply {
            let reply = self.message(true, false);
            actions.push(Action::Reply {
                to: from,
                message: reply,
            });
        } else if let Some(reply) = self.meta_reply(&message.need_meta) {
            actions.push(Action::Reply {
                to: from,
                message: reply,
            });
        }
        actions
    }

    fn refuse(&mut self, peer: P, version: u32, actions: &mut Vec<Action<P>>) {
        self.forget_seed(&peer);
        if self.members.remove(&peer).is_some() || self.refused.insert(peer.clone()) {
            actions.push(Action::Event(MembershipEvent::Refused { peer, version }));
        }
    }

    fn forget_seed(&mut self, peer: &P) {
        self.seeds.remove(peer);
        self.seed_failures.remove(peer);
    }

    /// Sending to `peer` failed. A seed that keeps failing is dropped after
    /// [`MAX_SEED_FAILURES`] attempts (it is re-added when found again); one
    /// failure is not enough, since two nodes that dial each other at once can
    /// both fail the handshake, and mDNS reports a peer only once. A member
    /// held dead stays a seed: after a partition heals it must still hear that
    /// it was declared dead, to re-join. Members are judged by heartbeats only.
    pub fn unreachable(&mut self, peer: &P) {
        if self
            .members
            .get(peer)
            .is_some_and(|m| m.status == Status::Dead)
        {
            return;
        }
        let failures = self.seed_failures.entry(peer.clone()).or_default();
        *failures += 1;
        if *failures >= MAX_SEED_FAILURES {
            self.forget_seed(peer);
        }
    }

    fn merge(&mut self, entry: Entry<P>, now: Duration, actions: &mut Vec<Action<P>>) {
        if entry.peer == self.me {
            // Someone believes we are dead at our current incarnation: re-join above it.
            if entry.status != Status::Alive && entry.incarnation >= self.incarnation {
                // An absurd incarnation from a lying peer cannot wrap ours around.
                if let Some(next) = entry.incarnation.checked_add(1) {
                    self.incarnation = next;
                }
            }
            return;
        }
        if let Some(meta) = &entry.meta
            && meta.protocol_version != PROTOCOL_VERSION
        {
            self.refuse(entry.peer, meta.protocol_version, actions);
            return;
        }
        if let (Some(theirs), Some(ours)) = (
            entry.meta.as_ref().and_then(|m| m.mesh_id),
            self.my_meta.mesh_id,
        ) && theirs != ours
        {
            self.forget_seed(&entry.peer);
            let peer = entry.peer;
            let was_member = self.members.remove(&peer).is_some();
            if self.refused.insert(peer.clone()) || was_member {
                actions.push(Action::Event(MembershipEvent::ForeignMesh {
                    peer,
                    mesh_id: theirs,
                }));
            }
            return;
        }
        if self.refused.contains(&entry.peer) {
            return;
        }
        let fresh_until = self.round + self.config.meta_spread_rounds;
        let Some(m) = self.members.get_mut(&entry.peer) else {
            if entry.status != Status::Dead {
                self.forget_seed(&entry.peer);
                let peer = entry.peer.clone();
                self.members.insert(
                    entry.peer,
                    Member {
                        incarnation: entry.incarnation,
                        heartbeat: entry.heartbeat,
                        status: Status::Alive,
                        meta: entry.meta,
                        since: now,
                        meta_fresh_until: fresh_until,
                    },
                );
                actions.push(Action::Event(MembershipEvent::Joined { peer }));
            }
            return;
        };
        if entry.incarnation > m.incarnation {
            // A restarted or refuting member: progress, whatever the sender
            // thinks of it; our own timers judge it from here.
            let was = m.status;
            m.incarnation = entry.incarnation;
            m.heartbeat = entry.heartbeat;
            m.since = now;
            m.status = Status::Alive;
            if entry.meta.is_some() {
                m.meta = entry.meta;
                m.meta_fresh_until = fresh_until;
            }
            let event = match was {
                Status::Dead => Some(MembershipEvent::Joined { peer: entry.peer }),
                Status::Suspect => Some(MembershipEvent::Recovered { peer: entry.peer }),
                Status::Alive => None,
            };
            actions.extend(event.map(Action::Event));
            return;
        }
        if entry.incarnation < m.incarnation
            || m.status == Status::Dead
            || entry.status == Status::Dead
        {
            return;
        }
        // Metadata older than what we hold (a relay's stale copy) is ignored.
        if let Some(meta) = entry.meta
            && entry.heartbeat >= m.heartbeat
            && m.meta.as_ref() != Some(&meta)
        {
            m.meta = Some(meta);
            m.meta_fresh_until = fresh_until;
        }
        if entry.heartbeat > m.heartbeat {
            m.heartbeat = entry.heartbeat;
            m.since = now;
            if m.status == Status::Suspect {
                m.status = Status::Alive;
                actions.push(Action::Event(MembershipEvent::Recovered {
                    peer: entry.peer,
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(role: Role) -> MemberMeta {
        MemberMeta {
            mesh_id: None,
            role,
            protocol_version: PROTOCOL_VERSION,
            listen_addrs: vec![],
            free_disk_bytes: None,
            zone: None,
        }
    }

    fn config() -> MembershipConfig {
        MembershipConfig {
            gossip_interval: Duration::from_millis(100),
            suspect_after: Duration::from_millis(400),
            suspicion_timeout: Duration::from_millis(600),
            dead_retention: Duration::from_secs(5),
            ..MembershipConfig::default()
        }
    }

    fn node(id: u32) -> Membership<u32> {
        Membership::new(id, meta(Role::Storage), 1, config(), u64::from(id))
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Delivers every Send among `nodes` (except to/from `down`) until quiet; returns events.
    fn deliver(
        nodes: &mut BTreeMap<u32, Membership<u32>>,
        mut pending: Vec<(u32, Action<u32>)>,
        now: Duration,
        down: &BTreeSet<u32>,
    ) -> Vec<(u32, MembershipEvent<u32>)> {
        let mut events = Vec::new();
        while let Some((from, action)) = pending.pop() {
            match action {
                Action::Event(e) => events.push((from, e)),
                Action::Send { to, message } | Action::Reply { to, message } => {
                    if down.contains(&to) || down.contains(&from) {
                        continue;
                    }
                    if let Some(n) = nodes.get_mut(&to) {
                        pending.extend(
                            n.handle_message(from, message, now)
                                .into_iter()
                                .map(|a| (to, a)),
                        );
                    }
                }
            }
        }
        events
    }

    fn run(
        nodes: &mut BTreeMap<u32, Membership<u32>>,
        from: u64,
        to: u64,
        down: &BTreeSet<u32>,
    ) -> Vec<(Duration, u32, MembershipEvent<u32>)> {
        let mut all = Vec::new();
        let mut t = from;
        while t <= to {
            let now = ms(t);
            let mut pending = Vec::new();
            for (id, n) in nodes.iter_mut() {
                if !down.contains(id) {
                    pending.extend(n.tick(now).into_iter().map(|a| (*id, a)));
                }
            }
            all.extend(
                deliver(nodes, pending, now, down)
                    .into_iter()
                    .map(|(n, e)| (now, n, e)),
            );
            t += 100;
        }
        all
    }

    fn chain_of(n: u32) -> BTreeMap<u32, Membership<u32>> {
        let mut nodes: BTreeMap<u32, Membership<u32>> = (0..n).map(|i| (i, node(i))).collect();
        for i in 1..n {
            nodes.get_mut(&i).unwrap().add_seed(i - 1);
        }
        nodes
    }

    #[test]
    fn a_chain_of_bootstraps_converges_to_full_membership() {
        let mut nodes = chain_of(8);
        run(&mut nodes, 0, 3000, &BTreeSet::new());
        for (id, n) in &nodes {
            let alive: Vec<u32> = n
                .members()
                .iter()
                .filter(|m| m.status == Status::Alive)
                .map(|m| m.peer)
                .collect();
            let expected: Vec<u32> = (0..8).filter(|i| i != id).collect();
            assert_eq!(alive, expected, "node {id}");
            assert!(
                n.members().iter().all(|m| m.meta.is_some()),
                "node {id} lacks metadata"
            );
        }
    }

    #[test]
    fn a_silent_member_is_suspected_then_dead_never_early() {
        let mut nodes = chain_of(4);
        run(&mut nodes, 0, 2000, &BTreeSet::new());
        let down: BTreeSet<u32> = [3].into();
        let events = run(&mut nodes, 2100, 5000, &down);
        for observer in 0..3 {
            let at = |want: fn(&MembershipEvent<u32>) -> bool| {
                events
                    .iter()
                    .find(|(_, n, e)| *n == observer && want(e))
                    .map(|(t, _, _)| *t)
            };
            let suspected =
                at(|e| matches!(e, MembershipEvent::Suspected { peer: 3 })).expect("suspected");
            let died = at(|e| matches!(e, MembershipEvent::Died { peer: 3 })).expect("died");
            assert!(
                died - suspected >= config().suspicion_timeout,
                "observer {observer} declared death early"
            );
            assert!(
                died <= ms(2000) + config().failure_detection_time() + ms(200),
                "observer {observer} too slow: {died:?}"
            );
        }
    }

    #[test]
    fn a_falsely_suspected_member_rejoins_with_a_higher_incarnation() {
        let mut nodes = chain_of(3);
        run(&mut nodes, 0, 2000, &BTreeSet::new());
        // Node 2 is cut off long enough to be declared dead, then heals.
        let down: BTreeSet<u32> = [2].into();
        run(&mut nodes, 2100, 4000, &down);
        assert_eq!(nodes[&0].status(&2), Some(Status::Dead));
        let before = nodes[&2].incarnation();
        let events = run(&mut nodes, 4100, 6000, &BTreeSet::new());
        assert!(
            nodes[&2].incarnation() > before,
            "node 2 must refute its death"
        );
        assert_eq!(nodes[&0].status(&2), Some(Status::Alive));
        assert_eq!(nodes[&2].status(&0), Some(Status::Alive));
        assert!(
            events
                .iter()
                .any(|(_, n, e)| *n == 0 && *e == MembershipEvent::Joined { peer: 2 })
        );
    }

    #[test]
    fn missing_metadata_is_pulled_from_whoever_has_it() {
        let mut a = node(0);
        let mut b = node(1);
        // `a` hears of peer 7 without metadata; `b` has it.
        let seven = Entry {
            peer: 7,
            incarnation: 1,
            heartbeat: 1,
            status: Status::Alive,
            meta: None,
        };
        let with_meta = Entry {
            meta: Some(meta(Role::Storage)),
            ..seven.clone()
        };
        let hearsay = |entry| GossipMessage {
            protocol_version: PROTOCOL_VERSION,
            entries: vec![entry],
            want_reply: false,
            need_meta: vec![],
        };
        a.handle_message(2, hearsay(seven), ms(0));
        b.handle_message(2, hearsay(with_meta), ms(0));
        let sends = a.tick(ms(100));
        let Some(Action::Send { message, .. }) =
            sends.iter().find(|a| matches!(a, Action::Send { .. }))
        else {
            panic!("a gossips: {sends:?}")
        };
        assert_eq!(message.need_meta, vec![7]);
        let replies = b.handle_message(0, message.clone(), ms(100));
        let Some(Action::Reply { message: reply, .. }) =
            replies.iter().find(|a| matches!(a, Action::Reply { .. }))
        else {
            panic!("b answers: {replies:?}")
        };
        a.handle_message(1, reply.clone(), ms(100));
        assert!(a.members().iter().any(|m| m.peer == 7 && m.meta.is_some()));
    }

    #[test]
    fn a_dead_member_stays_a_seed_when_unreachable() {
        let mut nodes = chain_of(2);
        run(&mut nodes, 0, 1000, &BTreeSet::new());
        run(&mut nodes, 1100, 3000, &[1].into());
        assert_eq!(nodes[&0].status(&1), Some(Status::Dead));
        let a = nodes.get_mut(&0).unwrap();
        a.unreachable(&1);
        let sends = a.tick(ms(3100));
        assert!(
            sends
                .iter()
                .any(|x| matches!(x, Action::Send { to: 1, message } if message.want_reply)),
            "node 0 must keep knocking on the dead node: {sends:?}"
        );
    }

    #[test]
    fn a_seed_survives_a_few_failed_sends() {
        let mut a = node(0);
        a.add_seed(5);
        for _ in 0..MAX_SEED_FAILURES - 1 {
            a.unreachable(&5);
        }
        let knocks = |a: &mut Membership<u32>, t| {
            a.tick(ms(t))
                .iter()
                .any(|x| matches!(x, Action::Send { to: 5, .. }))
        };
        assert!(knocks(&mut a, 100), "a seed is retried after failed sends");
        a.unreachable(&5);
        assert!(!knocks(&mut a, 200), "a seed that keeps failing is dropped");
        a.add_seed(5);
        assert!(knocks(&mut a, 300), "found again, it is retried");
    }

    #[test]
    fn another_protocol_version_is_refused_once() {
        let mut a = node(0);
        let mut stranger = meta(Role::Storage);
        stranger.protocol_version = PROTOCOL_VERSION + 1;
        let message = GossipMessage {
            protocol_version: PROTOCOL_VERSION + 1,
            entries: vec![Entry {
                peer: 9,
                incarnation: 1,
                heartbeat: 1,
                status: Status::Alive,
                meta: Some(stranger),
            }],
            want_reply: true,
            need_meta: vec![],
        };
        let first = a.handle_message(9, message.clone(), ms(0));
        assert_eq!(
            first,
            vec![Action::Event(MembershipEvent::Refused {
                peer: 9,
                version: PROTOCOL_VERSION + 1
            })]
        );
        assert!(a.handle_message(9, message, ms(1)).is_empty());
        assert!(a.members().is_empty());
        a.add_seed(9);
        assert!(
            a.tick(ms(100)).is_empty(),
            "a refused peer is not gossiped to"
        );
    }

    #[test]
    fn light_clients_learn_everyone_but_are_never_members() {
        let mut nodes = chain_of(3);
        nodes.insert(
            10,
            Membership::new(10, meta(Role::LightClient), 1, config(), 10),
        );
        nodes.get_mut(&10).unwrap().add_seed(0);
        run(&mut nodes, 0, 1500, &BTreeSet::new());
        let seen: Vec<u32> = nodes[&10].members().iter().map(|m| m.peer).collect();
        assert_eq!(seen, vec![0, 1, 2]);
        for id in 0..3 {
            assert!(
                nodes[&id].status(&10).is_none(),
                "node {id} lists the light client"
            );
        }
    }
}
