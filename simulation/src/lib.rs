//! meshlog-sim: a deterministic simulation of meshlog's protocol core.
//!
//! It runs the very state machines the real node runs (`meshlog::core`) under
//! a virtual clock, a simulated network (latency, loss, duplication,
//! reordering, partitions including one-way cuts) and node faults (crash,
//! restart, late joins, clock skew), all drawn from one `u64` seed. Checkers
//! watch every event; a liveness phase heals all faults and demands
//! convergence within a bound. A failing seed prints the one-line command
//! that replays it exactly (same trace hash).
//!
//! What it covers grows with the core: membership ([`scenario`]), the
//! replication of one partition ([`replication`]), the producer's queue
//! against an idempotent leader ([`producer`]), a consumer group's
//! coordinator and members ([`groups`]), the node's own partition replica
//! over three real stores on crashing disks ([`engine`], on [`disk`]), and
//! placement in scale mode.
//! Ownership across partitions joins as it lands.

pub mod check;
pub mod disk;
pub mod engine;
pub mod groups;
pub mod net;
pub mod producer;
pub mod queue;
pub mod replication;
pub mod scale;
pub mod scenario;
pub mod world;
