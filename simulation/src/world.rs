//! The simulated world: nodes running the real membership state machine, a
//! virtual clock with an ordered event queue, the simulated network, crashes,
//! restarts, joins and clock skew. Everything random comes from one seed, and
//! every event feeds a trace hash, so a run replays exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use meshlog::core::membership::{
    Action, GossipMessage, MemberMeta, Membership, MembershipConfig, PROTOCOL_VERSION, Role, Status,
};
use meshlog::core::rng::Rng;

use crate::check::{MembershipChecker, Violation};
use crate::net::SimNet;
use crate::queue::EventQueue;

/// Pending events beyond which a run is a message storm: a bug, reported as a
/// violation instead of exhausting memory.
const MAX_PENDING_EVENTS: usize = 2_000_000;

/// Something that happens at a virtual time.
#[derive(Clone, Debug)]
pub enum Event {
    /// A node's gossip timer fires.
    Tick(u32),
    /// A message arrives.
    Deliver {
        /// Sender.
        from: u32,
        /// Receiver.
        to: u32,
        /// The message.
        message: GossipMessage<u32>,
    },
    /// A fault or repair.
    Fault(Fault),
}

/// Faults the scenario injects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A node starts (for the first time or again after a crash), knowing `seeds`.
    Start {
        /// The node.
        node: u32,
        /// Peers it is told about (its bootstrap addresses).
        seeds: Vec<u32>,
    },
    /// A node crashes: its memory is gone.
    Crash(u32),
    /// The link from one node to another drops everything.
    Cut {
        /// Sender side.
        from: u32,
        /// Receiver side.
        to: u32,
    },
    /// Every link works again.
    Heal,
}

/// One simulated node.
struct SimNode {
    /// The state machine; `None` while crashed.
    membership: Option<Membership<u32>>,
    /// Clock rate error in parts per million (positive runs fast).
    skew_ppm: i64,
}

/// The whole simulation.
pub struct World {
    now: Duration,
    queue: EventQueue<Event>,
    rng: Rng,
    /// The network.
    pub net: SimNet,
    nodes: BTreeMap<u32, SimNode>,
    config: MembershipConfig,
    trace: blake3::Hasher,
    checker: MembershipChecker,
    violation: Option<Violation>,
    /// Events handled so far.
    pub events: u64,
    /// Gossip messages sent and their encoded bytes.
    pub messages_sent: u64,
    /// Encoded bytes of all gossip sent.
    pub bytes_sent: u64,
}

impl World {
    /// An empty world whose randomness all comes from `seed`.
    pub fn new(seed: u64, net: SimNet, config: MembershipConfig) -> Self {
        let checker = MembershipChecker::new(config.suspicion_timeout);
        World {
            now: Duration::ZERO,
            queue: EventQueue::new(MAX_PENDING_EVENTS),
            rng: Rng::new(seed),
            net,
            nodes: BTreeMap::new(),
            config,
            trace: blake3::Hasher::new(),
            checker,
            violation: None,
            events: 0,
            messages_sent: 0,
            bytes_sent: 0,
        }
    }

    /// Virtual time now.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// The seeded generator (for scenario decisions made during the run).
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// The first invariant violated, if any.
    pub fn violation(&self) -> Option<&Violation> {
        self.violation.as_ref()
    }

    /// The trace hash so far: equal for two runs of the same seed.
    pub fn trace_hash(&self) -> String {
        self.trace.finalize().to_hex()[..16].to_string()
    }

    /// Adds a node with a clock skew; it starts when a `Fault::Start` for it fires.
    pub fn add_node(&mut self, node: u32, skew_ppm: i64) {
        self.nodes.insert(
            node,
            SimNode {
                membership: None,
                skew_ppm,
            },
        );
    }

    /// Schedules `event` at virtual time `at`.
    pub fn schedule(&mut self, at: Duration, event: Event) {
        if let Err(overflow) = self.queue.push(at, event) {
            self.fail(Violation {
                at: self.now,
                invariant: "bounded work: no message storm",
                detail: format!("more than {} events pending", overflow.limit),
            });
        }
    }

    /// Nodes currently running.
    pub fn running(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.membership.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Handles events up to and including virtual time `until`. Stops early at
    /// the first violation.
    pub fn run_until(&mut self, until: Duration) {
        while self.violation.is_none() {
            let Some((at, event)) = self.queue.pop_due(until) else {
                break;
            };
            self.now = at;
            self.events += 1;
            self.handle(event);
        }
        self.now = self.now.max(until);
    }

    fn local_now(&self, node: u32) -> Duration {
        let skew = self.nodes.get(&node).map_or(0, |n| n.skew_ppm);
        let micros = self.now.as_micros() as i128;
        Duration::from_micros((micros + micros * i128::from(skew) / 1_000_000).max(0) as u64)
    }

    /// Virtual time for one local gossip interval of `node`.
    fn tick_interval(&self, node: u32) -> Duration {
        let skew = self.nodes.get(&node).map_or(0, |n| n.skew_ppm);
        let micros = self.config.gossip_interval.as_micros() as i128;
        Duration::from_micros((micros * 1_000_000 / (1_000_000 + i128::from(skew))).max(1) as u64)
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Tick(node) => {
                let local = self.local_now(node);
                let Some(m) = self
                    .nodes
                    .get_mut(&node)
                    .and_then(|n| n.membership.as_mut())
                else {
                    return;
                };
                let actions = m.tick(local);
                self.apply(node, actions);
                let next = self.now + self.tick_interval(node);
                self.schedule(next, Event::Tick(node));
            }
            Event::Deliver { from, to, message } => {
                let local = self.local_now(to);
                let Some(m) = self.nodes.get_mut(&to).and_then(|n| n.membership.as_mut()) else {
                    return;
                };
                let actions = m.handle_message(from, message, local);
                self.apply(to, actions);
            }
            Event::Fault(fault) => self.fault(fault),
        }
    }

    fn fault(&mut self, fault: Fault) {
        self.trace
            .update(format!("{:?} fault {fault:?}\n", self.now).as_bytes());
        match fault {
            Fault::Start { node, seeds } => {
                // A restart must use a higher incarnation than any before: the
                // real node uses its start time in ms.
                let incarnation = self.now.as_millis() as u64 + 1;
                let seed = self.rng.next_u64();
                let meta = MemberMeta {
                    role: Role::Storage,
                    protocol_version: PROTOCOL_VERSION,
                    listen_addrs: vec![format!("sim://{node}")],
                    free_disk_bytes: Some(1 << 30),
                    zone: None,
                    mesh_id: None,
                };
                let mut membership =
                    Membership::new(node, meta, incarnation, self.config.clone(), seed);
                for s in seeds {
                    membership.add_seed(s);
                }
                if let Some(n) = self.nodes.get_mut(&node) {
                    n.membership = Some(membership);
                }
                let first = self.now + self.tick_interval(node);
                self.schedule(first, Event::Tick(node));
            }
            Fault::Crash(node) => {
                if let Some(n) = self.nodes.get_mut(&node) {
                    n.membership = None;
                }
                self.checker.forget_observer(node);
            }
            Fault::Cut { from, to } => self.net.cut(from, to),
            Fault::Heal => self.net.heal(),
        }
    }

    fn apply(&mut self, node: u32, actions: Vec<Action<u32>>) {
        for action in actions {
            match action {
                Action::Send { to, message } | Action::Reply { to, message } => {
                    self.messages_sent += 1;
                    self.bytes_sent +=
                        postcard::to_allocvec(&message).map_or(0, |b| b.len() as u64);
                    for delay in self.net.deliveries(node, to, &mut self.rng) {
                        let at = self.now + delay;
                        self.schedule(
                            at,
                            Event::Deliver {
                                from: node,
                                to,
                                message: message.clone(),
                            },
                        );
                    }
                }
                Action::Event(event) => {
                    self.trace
                        .update(format!("{:?} {node} {event:?}\n", self.now).as_bytes());
                    let local = self.local_now(node);
                    if let Err(v) = self.checker.on_event(node, &event, local, self.now)
                        && self.violation.is_none()
                    {
                        self.violation = Some(v);
                    }
                }
            }
        }
    }

    /// Whether every running node sees every other running node Alive with
    /// metadata, and no stopped node as Alive or Suspect.
    pub fn converged(&self) -> bool {
        let running: BTreeSet<u32> = self.running().into_iter().collect();
        self.nodes
            .iter()
            .filter_map(|(id, n)| Some((*id, n.membership.as_ref()?)))
            .all(|(id, m)| {
                let members = m.members();
                let seen_alive: BTreeSet<u32> = members
                    .iter()
                    .filter(|v| v.status == Status::Alive && v.meta.is_some())
                    .map(|v| v.peer)
                    .collect();
                let sees_running = running.iter().all(|p| *p == id || seen_alive.contains(p));
                let stopped_not_live = members
                    .iter()
                    .all(|v| running.contains(&v.peer) || v.status == Status::Dead);
                sees_running && stopped_not_live && !members.iter().any(|v| v.peer == id)
            })
    }

    /// Across running nodes: the fewest members known, the fewest seen Alive
    /// with metadata, and the (observer, peer) pairs currently Suspect and Dead.
    pub fn view_summary(&self) -> (usize, usize, usize, usize) {
        let mut summary = (usize::MAX, usize::MAX, 0, 0);
        for m in self.nodes.values().filter_map(|n| n.membership.as_ref()) {
            let members = m.members();
            let alive = members
                .iter()
                .filter(|v| v.status == Status::Alive && v.meta.is_some())
                .count();
            summary.0 = summary.0.min(members.len());
            summary.1 = summary.1.min(alive);
            summary.2 += members
                .iter()
                .filter(|v| v.status == Status::Suspect)
                .count();
            summary.3 += members.iter().filter(|v| v.status == Status::Dead).count();
        }
        summary
    }

    /// Records `violation` unless one is already recorded.
    pub fn fail(&mut self, violation: Violation) {
        if self.violation.is_none() {
            self.violation = Some(violation);
        }
    }
}
