//! Scale mode: membership with many nodes, and placement of many partitions.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meshlog::core::membership::MembershipConfig;
use meshlog::core::placement::target_replicas;
use meshlog::core::rng::Rng;

use crate::net::{NetConfig, SimNet};
use crate::world::{Event, Fault, World};

/// Figures of one membership scale run.
#[derive(Clone, Debug)]
pub struct MembershipFigures {
    /// Nodes.
    pub nodes: u32,
    /// Virtual time until every node saw every other alive with metadata.
    pub converged_after: Option<Duration>,
    /// Gossip rounds in that time.
    pub rounds: Option<u64>,
    /// Gossip bytes sent per node per second at steady state.
    pub bytes_per_node_per_sec: f64,
    /// After one node crashes: virtual time until every live node has it
    /// Dead — from then on every node places every partition the same way
    /// (placement is a pure function of the live set).
    pub death_known_after: Option<Duration>,
    /// After one node joins: virtual time until every node has it Alive.
    pub join_known_after: Option<Duration>,
    /// Simulated events handled per wall-clock second.
    pub events_per_sec: f64,
}

/// All nodes start within one round, each knowing one random node numbered
/// before it (so the bootstrap graph is connected); runs until full
/// membership (or `limit`), then measures steady-state gossip for 10 s.
pub fn membership(nodes: u32, seed: u64, limit: Duration) -> MembershipFigures {
    let mut rng = Rng::new(seed);
    let config = MembershipConfig::default();
    let interval = config.gossip_interval;
    let net = NetConfig {
        min_latency: Duration::from_millis(1),
        max_latency: Duration::from_millis(20),
        loss_ppm: 0,
        duplicate_ppm: 0,
    };
    let mut world = World::new(rng.next_u64(), SimNet::new(net), config);
    for node in 0..nodes {
        world.add_node(node, 0);
        let seeds = if node == 0 {
            vec![]
        } else {
            vec![rng.below(node as usize) as u32]
        };
        let at = Duration::from_millis(rng.below(interval.as_millis() as usize) as u64);
        world.schedule(at, Event::Fault(Fault::Start { node, seeds }));
    }
    let wall = Instant::now();
    let mut converged_after = None;
    let mut t = Duration::ZERO;
    while t <= limit {
        t += interval;
        world.run_until(t);
        if std::env::var_os("MESHLOG_SIM_PROGRESS").is_some() && (t.as_millis() % 10_000) == 0 {
            eprintln!(
                "{t:?}: (fewest known, fewest alive with meta, suspect pairs, dead pairs) = {:?}",
                world.view_summary()
            );
        }
        if world.converged() {
            converged_after = Some(t);
            break;
        }
    }
    let (bytes_before, at_before) = (world.bytes_sent, world.now());
    let window = Duration::from_secs(10);
    world.run_until(at_before + window);
    let bytes = world.bytes_sent - bytes_before;
    let until_converged = |world: &mut World, from: Duration| -> Option<Duration> {
        let mut t = from;
        while t <= from + limit {
            t += interval;
            world.run_until(t);
            if world.converged() {
                return Some(t - from);
            }
        }
        None
    };
    let crashed_at = world.now();
    world.schedule(crashed_at, Event::Fault(Fault::Crash(nodes / 2)));
    let death_known_after = until_converged(&mut world, crashed_at);
    let joined_at = world.now();
    world.add_node(nodes, 0);
    let seeds = vec![rng.below(nodes as usize) as u32];
    world.schedule(joined_at, Event::Fault(Fault::Start { node: nodes, seeds }));
    let join_known_after = until_converged(&mut world, joined_at);
    MembershipFigures {
        death_known_after,
        join_known_after,
        nodes,
        converged_after,
        rounds: converged_after.map(|d| (d.as_millis() / interval.as_millis()) as u64),
        bytes_per_node_per_sec: bytes as f64 / f64::from(nodes) / window.as_secs_f64(),
        events_per_sec: world.events as f64 / wall.elapsed().as_secs_f64(),
    }
}

/// Figures of placement over many partitions.
#[derive(Clone, Debug)]
pub struct PlacementFigures {
    /// Nodes.
    pub nodes: u32,
    /// Partitions (replication factor 3).
    pub partitions: u32,
    /// Most replicas on one node.
    pub max_replicas: usize,
    /// Mean replicas per node.
    pub mean_replicas: f64,
    /// Replicas moved when one node joins.
    pub moved_on_join: usize,
    /// The least a join can move: the new node's fair share.
    pub min_on_join: usize,
    /// Replicas moved when one node dies.
    pub moved_on_death: usize,
    /// The least a death can move: the replicas the dead node held.
    pub min_on_death: usize,
}

/// Places `partitions` partitions with RF 3 on `nodes` nodes by rendezvous
/// hashing, then adds one node and removes one, counting moved replicas.
pub fn placement(nodes: u32, partitions: u32) -> PlacementFigures {
    const RF: usize = 3;
    let members: Vec<u32> = (0..nodes).collect();
    let place = |members: &[u32]| -> Vec<Vec<u32>> {
        (0..partitions)
            .map(|p| target_replicas("scale", p, members, RF))
            .collect()
    };
    let before = place(&members);
    let mut load: BTreeMap<u32, usize> = BTreeMap::new();
    for set in &before {
        for n in set {
            *load.entry(*n).or_default() += 1;
        }
    }
    let moved = |a: &[Vec<u32>], b: &[Vec<u32>]| -> usize {
        a.iter()
            .zip(b)
            .map(|(x, y)| y.iter().filter(|n| !x.contains(n)).count())
            .sum()
    };
    let mut joined = members.clone();
    joined.push(nodes);
    let after_join = place(&joined);
    let dead = 0u32;
    let survivors: Vec<u32> = members.iter().copied().filter(|n| *n != dead).collect();
    let after_death = place(&survivors);
    PlacementFigures {
        nodes,
        partitions,
        max_replicas: load.values().copied().max().unwrap_or(0),
        mean_replicas: (partitions as usize * RF) as f64 / f64::from(nodes),
        moved_on_join: moved(&before, &after_join),
        min_on_join: (partitions as usize * RF).div_ceil(nodes as usize + 1),
        moved_on_death: moved(&before, &after_death),
        min_on_death: load.get(&dead).copied().unwrap_or(0),
    }
}
