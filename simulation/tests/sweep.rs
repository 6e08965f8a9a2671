//! The simulation as part of the test suite: a bounded sweep, determinism,
//! and proof that the checkers catch a deliberate bug.

use meshlog::core::membership::InjectedFault;
use meshlog::core::partition::PartitionFault;
use meshlog::core::replication::ReplicationFault;
use meshlog_sim::engine::EngineFault;
use meshlog_sim::groups::{self, GroupFault};
use meshlog_sim::producer::{self, ProducerFault};
use meshlog_sim::replication;
use meshlog_sim::scale;
use meshlog_sim::scenario::{self, Options};

#[test]
fn a_bounded_sweep_of_seeds_passes() {
    for seed in 0..100 {
        let report = scenario::run(seed, &Options::default());
        if let Some(v) = &report.violation {
            panic!("seed {seed}: {v}\nreplay: cargo run -p meshlog-sim --release -- --seed {seed}");
        }
        assert!(report.convergence.is_some(), "seed {seed} did not converge");
    }
}

#[test]
fn the_same_seed_replays_the_same_trace() {
    for seed in [3, 17, 99] {
        let a = scenario::run(seed, &Options::default());
        let b = scenario::run(seed, &Options::default());
        assert_eq!(
            (a.trace_hash.clone(), a.events),
            (b.trace_hash, b.events),
            "seed {seed}"
        );
    }
    let a = scenario::run(1, &Options::default());
    let b = scenario::run(2, &Options::default());
    assert_ne!(a.trace_hash, b.trace_hash);
}

#[test]
fn the_checkers_catch_an_injected_bug_within_a_few_seeds() {
    let options = Options {
        inject: Some(InjectedFault::SkipSuspicion),
    };
    let caught =
        (0..10).find_map(|seed| scenario::run(seed, &options).violation.map(|v| (seed, v)));
    let (seed, violation) =
        caught.expect("a core that skips suspicion must be caught within 10 seeds");
    assert!(
        violation.invariant.contains("suspicion"),
        "seed {seed}: {violation}"
    );
}

#[test]
fn placement_moves_the_least_possible() {
    let figures = scale::placement(50, 2000);
    assert_eq!(
        figures.moved_on_death, figures.min_on_death,
        "a death moves exactly the dead node's replicas"
    );
    // A join moves only what the new node takes: near its fair share.
    assert!(
        figures.moved_on_join <= figures.min_on_join * 2,
        "{figures:?}"
    );
    assert!(
        figures.max_replicas as f64 <= figures.mean_replicas * 2.0,
        "{figures:?}"
    );
}

#[test]
fn a_bounded_sweep_of_replication_seeds_passes() {
    let mut acked = 0;
    for seed in 0..100 {
        let report = replication::run(seed, None);
        if let Some(v) = &report.violation {
            panic!("seed {seed}: {v}\nreplay: cargo run -p meshlog-sim --release -- --seed {seed}");
        }
        assert!(report.recovery.is_some(), "seed {seed} did not recover");
        acked += report.acked;
    }
    assert!(
        acked > 10_000,
        "the workload must get records acknowledged ({acked})"
    );
}

#[test]
fn replication_replays_the_same_trace() {
    let (a, b) = (replication::run(42, None), replication::run(42, None));
    assert_eq!(
        (a.trace_hash, a.events, a.acked),
        (b.trace_hash, b.events, b.acked)
    );
}

#[test]
fn committing_without_a_quorum_is_caught_within_a_few_seeds() {
    let caught = (0..40).find_map(|seed| {
        replication::run(seed, Some(ReplicationFault::CommitWithoutQuorum))
            .violation
            .map(|v| (seed, v))
    });
    let (seed, violation) =
        caught.expect("a leader that commits alone must be caught within 40 seeds");
    assert!(
        violation.invariant.contains("agreement")
            || violation.invariant.contains("acknowledged")
            || violation.invariant.contains("readers"),
        "seed {seed}: {violation}"
    );
}

#[test]
fn compacting_entries_before_they_are_durable_is_caught_within_a_few_seeds() {
    let caught = (0..80).find_map(|seed| {
        replication::run(seed, Some(ReplicationFault::CompactUndurable))
            .violation
            .map(|v| (seed, v))
    });
    let (seed, violation) = caught.expect(
        "a replica that compacts what its disk has not confirmed must be caught within 80 seeds",
    );
    assert!(
        violation.invariant.contains("agreement")
            || violation.invariant.contains("acknowledged")
            || violation.invariant.contains("readers")
            || violation.invariant.contains("on disk"),
        "seed {seed}: {violation}"
    );
}

#[test]
fn a_bounded_sweep_of_producer_seeds_passes() {
    let mut acked = 0;
    for seed in 0..100 {
        let report = producer::run(seed);
        if let Some(v) = &report.violation {
            panic!("seed {seed}: {v}\nreplay: cargo run -p meshlog-sim --release -- --seed {seed}");
        }
        assert_eq!(report.acked, report.records, "seed {seed}");
        acked += report.acked;
    }
    assert!(
        acked > 10_000,
        "the workload must get records acknowledged ({acked})"
    );
}

#[test]
fn producer_runs_replay_the_same_trace() {
    let (a, b) = (producer::run(7), producer::run(7));
    assert_eq!((a.trace_hash, a.events), (b.trace_hash, b.events));
}

#[test]
fn a_leader_that_ignores_sequence_numbers_is_caught_within_a_few_seeds() {
    let caught = (0..10).find_map(|seed| {
        producer::run_with(seed, Some(ProducerFault::LeaderIgnoresSequences))
            .violation
            .map(|v| (seed, v))
    });
    let (seed, violation) =
        caught.expect("a leader storing retries twice must be caught within 10 seeds");
    assert!(
        violation.invariant.contains("duplicates"),
        "seed {seed}: {violation}"
    );
}

#[test]
fn a_bounded_sweep_of_group_seeds_passes() {
    let (mut generations, mut commits) = (0, 0);
    for seed in 0..100 {
        let report = groups::run(seed);
        if let Some(v) = &report.violation {
            panic!("seed {seed}: {v}\nreplay: cargo run -p meshlog-sim --release -- --seed {seed}");
        }
        assert!(
            report.recovery.is_some(),
            "seed {seed}: everything committed in the end"
        );
        generations += report.generations;
        commits += report.commits;
    }
    assert!(
        generations > 200 && commits > 1_000,
        "the workload must rebalance and commit ({generations} generations, {commits} commits)"
    );
}

#[test]
fn group_runs_replay_the_same_trace() {
    let (a, b) = (groups::run(11), groups::run(11));
    assert_eq!((a.trace_hash, a.events), (b.trace_hash, b.events));
}

#[test]
fn a_coordinator_that_ignores_generations_is_caught_within_a_few_seeds() {
    let caught = (0..20).find_map(|seed| {
        groups::run_with(seed, Some(GroupFault::CoordinatorIgnoresGenerations))
            .violation
            .map(|v| (seed, v))
    });
    let (seed, violation) = caught
        .expect("a coordinator that lets fenced members commit must be caught within 20 seeds");
    assert!(
        violation.invariant.contains("backwards") || violation.invariant.contains("skipped"),
        "seed {seed}: {violation}"
    );
}

/// The first seed of `0..within` at which the replication checkers catch
/// `fault` in the rules around the log, with the invariant they name.
fn catch_rule_fault(fault: PartitionFault, within: u64) -> (u64, String) {
    let caught = (0..within).find_map(|seed| {
        replication::run_with(seed, None, Some(fault))
            .violation
            .map(|v| (seed, v.to_string()))
    });
    caught.unwrap_or_else(|| panic!("{fault:?} must be caught within {within} seeds"))
}

#[test]
fn sending_before_a_vote_is_durable_is_caught_within_a_few_seeds() {
    let (seed, violation) = catch_rule_fault(PartitionFault::SendBeforeVoteDurable, 10);
    assert!(
        violation.contains("votes are durable before they are sent"),
        "seed {seed}: {violation}"
    );
}

#[test]
fn acknowledging_acks_all_before_the_commit_is_caught_within_a_few_seeds() {
    let (seed, violation) = catch_rule_fault(PartitionFault::AckAllWhenLeaderDurable, 10);
    assert!(
        violation.contains("acknowledged as its acks promise")
            || violation.contains("no acknowledged record lost"),
        "seed {seed}: {violation}"
    );
}

#[test]
fn keeping_requests_whose_entries_were_cut_is_caught_within_a_few_seeds() {
    let (seed, violation) = catch_rule_fault(PartitionFault::KeepCutRequests, 40);
    assert!(
        violation.contains("acknowledged as its acks promise")
            || violation.contains("no acknowledged record lost"),
        "seed {seed}: {violation}"
    );
}

#[test]
fn a_bounded_sweep_of_engine_seeds_passes() {
    for seed in 0..ENGINE_SEEDS {
        let report = meshlog_sim::engine::run(seed);
        if let Some(v) = &report.violation {
            panic!(
                "engine seed {seed}: {v}\nreplay: cargo run -p meshlog-sim --release -- --seed {seed}"
            );
        }
        assert!(report.acked > 0, "engine seed {seed} acknowledged nothing");
    }
}

/// Engine seeds the test suite sweeps (each runs three real stores).
const ENGINE_SEEDS: u64 = 10;

#[test]
fn the_engine_scenario_catches_a_leader_that_commits_alone() {
    let caught = (0..30).find_map(|seed| {
        meshlog_sim::engine::run_with(seed, Some(ReplicationFault::CommitWithoutQuorum))
            .violation
            .map(|v| (seed, v))
    });
    let (seed, violation) =
        caught.expect("a leader that commits alone must be caught within 30 engine seeds");
    assert!(
        violation.invariant.contains("acknowledged") || violation.invariant.contains("agreement"),
        "engine seed {seed}: {violation}"
    );
}

#[test]
fn the_engine_scenario_catches_a_leader_that_appends_retries_again() {
    let caught = (0..10).find_map(|seed| {
        meshlog_sim::engine::run_injected(
            seed,
            Some(EngineFault::Rules(PartitionFault::AppendRetries)),
        )
        .violation
        .map(|v| (seed, v))
    });
    let (seed, violation) =
        caught.expect("a leader that appends retries again must be caught within 10 engine seeds");
    assert!(
        violation.invariant.contains("idempotence"),
        "engine seed {seed}: {violation}"
    );
}

#[test]
fn the_engine_scenario_catches_a_wiped_node_that_keeps_its_identity() {
    let caught = (0..10).find_map(|seed| {
        meshlog_sim::engine::run_injected(seed, Some(EngineFault::KeepIdentityAfterWipe))
            .violation
            .map(|v| (seed, v))
    });
    let (seed, violation) = caught
        .expect("a wiped node voting under its old identity must be caught within 10 engine seeds");
    assert!(
        violation.invariant.contains("acknowledged") || violation.invariant.contains("fencing"),
        "engine seed {seed}: {violation}"
    );
}

#[test]
fn engine_runs_replay_the_same_trace() {
    let (a, b) = (meshlog_sim::engine::run(3), meshlog_sim::engine::run(3));
    assert_eq!(
        (a.trace_hash, a.events, a.writes),
        (b.trace_hash, b.events, b.writes)
    );
}
