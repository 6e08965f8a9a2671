//! The simulated network: latency, loss, duplication, reordering (through
//! latency jitter) and partitions, including asymmetric ones. All randomness
//! comes from the world's seeded generator.

use std::collections::BTreeSet;
use std::time::Duration;

use meshlog::core::rng::Rng;

/// How the network behaves.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Fastest delivery.
    pub min_latency: Duration,
    /// Slowest delivery; latency is uniform in between, so messages reorder.
    pub max_latency: Duration,
    /// Probability a message is lost, in parts per million.
    pub loss_ppm: u32,
    /// Probability a message is delivered twice, in parts per million.
    pub duplicate_ppm: u32,
}

/// The network's state: its config and which directed links are cut.
#[derive(Clone, Debug)]
pub struct SimNet {
    /// Behaviour of working links.
    pub config: NetConfig,
    /// Cut links, as (from, to): a message from `from` to `to` is dropped.
    cut: BTreeSet<(u32, u32)>,
}

impl SimNet {
    /// A fully connected network.
    pub fn new(config: NetConfig) -> Self {
        SimNet {
            config,
            cut: BTreeSet::new(),
        }
    }

    /// Cuts the link from `from` to `to` (one direction only).
    pub fn cut(&mut self, from: u32, to: u32) {
        self.cut.insert((from, to));
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// Whether any link is cut.
    pub fn is_partitioned(&self) -> bool {
        !self.cut.is_empty()
    }

    /// The delays after which copies of a message sent now from `from` to `to`
    /// arrive: none if lost or cut, two if duplicated.
    pub fn deliveries(&self, from: u32, to: u32, rng: &mut Rng) -> Vec<Duration> {
        if self.cut.contains(&(from, to)) || chance(rng, self.config.loss_ppm) {
            return Vec::new();
        }
        let copies = if chance(rng, self.config.duplicate_ppm) {
            2
        } else {
            1
        };
        (0..copies).map(|_| self.latency(rng)).collect()
    }

    fn latency(&self, rng: &mut Rng) -> Duration {
        let (lo, hi) = (
            self.config.min_latency.as_micros() as u64,
            self.config.max_latency.as_micros() as u64,
        );
        let spread = hi.saturating_sub(lo);
        Duration::from_micros(
            lo + if spread == 0 {
                0
            } else {
                rng.next_u64() % (spread + 1)
            },
        )
    }
}

fn chance(rng: &mut Rng, ppm: u32) -> bool {
    ppm > 0 && (rng.next_u64() % 1_000_000) < u64::from(ppm)
}
