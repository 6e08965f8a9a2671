//! Invariant checkers, evaluated on every event as the run goes, not only at
//! the end. Each violation names the invariant and when it broke.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use meshlog::core::membership::MembershipEvent;

/// A broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Virtual time of the violation.
    pub at: Duration,
    /// Which invariant.
    pub invariant: &'static str,
    /// What happened.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:?}] {}: {}", self.at, self.invariant, self.detail)
    }
}

/// Membership safety: a member is declared dead only after it has been
/// suspected, without recovering, for the whole suspicion timeout, measured
/// on the observer's own clock. (Guarantee: a slow link is not a dead node.)
#[derive(Debug)]
pub struct MembershipChecker {
    suspicion_timeout: Duration,
    /// (observer, peer) → the observer's local time when it suspected the peer.
    suspected: BTreeMap<(u32, u32), Duration>,
}

impl MembershipChecker {
    /// A checker for the given timeout.
    pub fn new(suspicion_timeout: Duration) -> Self {
        MembershipChecker {
            suspicion_timeout,
            suspected: BTreeMap::new(),
        }
    }

    /// The observer crashed: its suspicions are gone with it.
    pub fn forget_observer(&mut self, observer: u32) {
        self.suspected.retain(|(o, _), _| *o != observer);
    }

    /// Checks one event reported by `observer` at its local time `local_now`.
    pub fn on_event(
        &mut self,
        observer: u32,
        event: &MembershipEvent<u32>,
        local_now: Duration,
        at: Duration,
    ) -> Result<(), Violation> {
        match event {
            MembershipEvent::Suspected { peer } => {
                self.suspected.insert((observer, *peer), local_now);
            }
            MembershipEvent::Recovered { peer } | MembershipEvent::Joined { peer } => {
                self.suspected.remove(&(observer, *peer));
            }
            MembershipEvent::Died { peer } => match self.suspected.remove(&(observer, *peer)) {
                None => {
                    return Err(Violation {
                        at,
                        invariant: "death only after suspicion",
                        detail: format!(
                            "node {observer} declared {peer} dead without suspecting it"
                        ),
                    });
                }
                Some(since) if local_now.saturating_sub(since) < self.suspicion_timeout => {
                    return Err(Violation {
                        at,
                        invariant: "death only after the suspicion timeout",
                        detail: format!(
                            "node {observer} declared {peer} dead {:?} after suspecting it (timeout {:?})",
                            local_now.saturating_sub(since),
                            self.suspicion_timeout
                        ),
                    });
                }
                Some(_) => {}
            },
            MembershipEvent::Refused { peer, version } => {
                return Err(Violation {
                    at,
                    invariant: "one protocol version",
                    detail: format!("node {observer} refused {peer} speaking version {version}"),
                });
            }
            MembershipEvent::ForeignMesh { peer, mesh_id } => {
                return Err(Violation {
                    at,
                    invariant: "one mesh",
                    detail: format!("node {observer} refused {peer} of mesh {mesh_id:x}"),
                });
            }
        }
        Ok(())
    }
}
