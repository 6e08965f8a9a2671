//! One run drawn from a seed (TigerBeetle's VOPR shape): the seed picks the
//! node count, network quality, clock skews, join times and faults; a safety
//! phase runs with faults, then a liveness phase heals everything and demands
//! that membership converges within a bound, reporting how long it took.

use std::time::{Duration, Instant};

use meshlog::core::membership::MembershipConfig;
use meshlog::core::rng::Rng;

use crate::check::Violation;
use crate::net::{NetConfig, SimNet};
use crate::world::{Event, Fault, World};

/// How long faults are injected.
pub const FAULT_PHASE: Duration = Duration::from_secs(60);
/// How long after the last fault heals membership must have converged.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(30);
/// How often convergence is checked in the liveness phase.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// Switches for a run.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// A deliberate core bug to switch on.
    pub inject: Option<meshlog::core::membership::InjectedFault>,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Nodes in the run.
    pub nodes: u32,
    /// Faults injected.
    pub faults: usize,
    /// Hash of the event trace: equal for two runs of one seed.
    pub trace_hash: String,
    /// Events handled.
    pub events: u64,
    /// Time from the heal to full convergence.
    pub convergence: Option<Duration>,
    /// The first invariant violated.
    pub violation: Option<Violation>,
    /// Wall-clock time of the run.
    pub wall: Duration,
}

/// Runs the scenario of `seed`.
pub fn run(seed: u64, options: &Options) -> Report {
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let nodes = 4 + rng.below(7) as u32;
    let net = NetConfig {
        min_latency: Duration::from_millis(1),
        max_latency: Duration::from_millis(1 + rng.below(150) as u64),
        loss_ppm: rng.below(50_000) as u32,
        duplicate_ppm: rng.below(20_000) as u32,
    };
    #[allow(clippy::needless_update)]
    let config = MembershipConfig {
        injected_fault: options.inject,
        ..MembershipConfig::default()
    };
    let mut world = World::new(rng.next_u64(), SimNet::new(net), config);
    for node in 0..nodes {
        world.add_node(node, rng.below(4001) as i64 - 2000);
    }
    schedule_joins(&mut world, &mut rng, nodes);
    let (faults, down_at_end) = schedule_faults(&mut world, &mut rng, nodes);

    world.run_until(FAULT_PHASE);
    // Liveness phase: heal every link, restart every node meant to come back.
    world.schedule(FAULT_PHASE, Event::Fault(Fault::Heal));
    let running = world.running();
    for node in (0..nodes).filter(|n| !running.contains(n) && !down_at_end.contains(n)) {
        let seeds = pick_seeds(&mut rng, node, nodes);
        world.schedule(FAULT_PHASE, Event::Fault(Fault::Start { node, seeds }));
    }
    let mut convergence = None;
    let mut t = FAULT_PHASE;
    while world.violation().is_none() && t <= FAULT_PHASE + LIVENESS_BOUND {
        world.run_until(t);
        if world.converged() {
            convergence = Some(t - FAULT_PHASE);
            break;
        }
        t += CHECK_EVERY;
    }
    if convergence.is_none() && world.violation().is_none() {
        world.fail(Violation {
            at: world.now(),
            invariant: "liveness: membership converges after the faults heal",
            detail: format!("not converged {LIVENESS_BOUND:?} after the heal"),
        });
    }
    Report {
        seed,
        nodes,
        faults,
        trace_hash: world.trace_hash(),
        events: world.events,
        convergence,
        violation: world.violation().cloned(),
        wall: started.elapsed(),
    }
}

/// Two bootstrap peers other than `node`.
fn pick_seeds(rng: &mut Rng, node: u32, nodes: u32) -> Vec<u32> {
    let mut others: Vec<u32> = (0..nodes).filter(|n| *n != node).collect();
    rng.choose(&mut others, 2).to_vec()
}

/// Node 0 starts at once, the others within the first 10 s, each knowing up to two earlier nodes.
fn schedule_joins(world: &mut World, rng: &mut Rng, nodes: u32) {
    for node in 0..nodes {
        let at = if node == 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(rng.below(10_000) as u64)
        };
        // Bootstrap peers numbered below the node keep the bootstrap graph connected.
        let mut earlier: Vec<u32> = (0..node).collect();
        let seeds = rng.choose(&mut earlier, 2).to_vec();
        world.schedule(at, Event::Fault(Fault::Start { node, seeds }));
    }
}

/// Crashes (at least one; some restart), one-way link cuts and two-sided
/// partitions during the fault phase. Returns the number of faults and the
/// nodes that stay down at the end.
fn schedule_faults(world: &mut World, rng: &mut Rng, nodes: u32) -> (usize, Vec<u32>) {
    let count = 1 + rng.below(5);
    let mut down_at_end = Vec::new();
    for i in 0..count {
        let at = Duration::from_millis(15_000 + rng.below(40_000) as u64);
        let kind = if i == 0 { 0 } else { rng.below(3) };
        match kind {
            0 => {
                let node = rng.below(nodes as usize) as u32;
                world.schedule(at, Event::Fault(Fault::Crash(node)));
                if rng.below(3) == 0 {
                    down_at_end.push(node);
                } else {
                    let back = at + Duration::from_millis(500 + rng.below(4_000) as u64);
                    let seeds = pick_seeds(rng, node, nodes);
                    world.schedule(back, Event::Fault(Fault::Start { node, seeds }));
                }
            }
            1 => {
                let from = rng.below(nodes as usize) as u32;
                let to = (from + 1 + rng.below(nodes as usize - 1) as u32) % nodes;
                world.schedule(at, Event::Fault(Fault::Cut { from, to }));
            }
            _ => {
                let mut all: Vec<u32> = (0..nodes).collect();
                let side: Vec<u32> = rng.choose(&mut all, (nodes / 2) as usize).to_vec();
                for a in &side {
                    for b in (0..nodes).filter(|b| !side.contains(b)) {
                        world.schedule(at, Event::Fault(Fault::Cut { from: *a, to: b }));
                        world.schedule(at, Event::Fault(Fault::Cut { from: b, to: *a }));
                    }
                }
                let heal = at + Duration::from_millis(2_000 + rng.below(18_000) as u64);
                world.schedule(heal, Event::Fault(Fault::Heal));
            }
        }
    }
    down_at_end.sort_unstable();
    down_at_end.dedup();
    (count, down_at_end)
}
