//! The protocol core: pure state machines, no I/O, no clock, no randomness of
//! their own.
//!
//! Each machine takes events (a message from a peer, `tick(now)`) and returns
//! actions (send this, report that). Time is passed in as a `Duration` since
//! an origin the driver picks; randomness comes from a seeded [`rng::Rng`].
//! Two drivers run the same machines: the real node (tokio + libp2p + redb,
//! in `net` and `node`) and the deterministic simulation in `simulation/`.
//!
//! - [`membership`]: who is in the mesh and alive (gossip heartbeats with
//!   SWIM-style suspicion and refutation).
//! - [`placement`]: target replica sets by rendezvous hashing.
//! - [`group`]: consumer-group coordination (join, sync, heartbeat, commit, assignors).
//! - [`producer`]: one producer's batching, in-flight window and ordered retries.
//! - [`replication`]: one partition's log among its replicas (Raft rules, hash-chained).
//! - [`partition`]: one partition replica's produce answers by `acks`,
//!   idempotent producers and dedup keys, and the rule that nothing
//!   depending on a vote is sent before it is durable.
//! - [`idempotence`]: idempotent producers' states and their checks.
//! - [`dedup`]: the leader's window of recent dedup keys.

pub mod dedup;
pub mod group;
pub mod idempotence;
pub mod membership;
pub mod ownership;
pub mod partition;
pub mod placement;
pub mod producer;
pub mod replication;
pub mod rng;
