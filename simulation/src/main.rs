//! `meshlog-sim`: run one seed, sweep a range, or print the scale table.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use meshlog::core::membership::InjectedFault;
use meshlog::core::membership::MembershipConfig;
use meshlog::core::partition::PartitionFault;
use meshlog::core::replication::ReplicationFault;
use meshlog_sim::engine::{self, EngineFault};
use meshlog_sim::groups::{self, GroupFault};
use meshlog_sim::producer;
use meshlog_sim::replication;
use meshlog_sim::scale;
use meshlog_sim::scenario::{self, Options, Report};

/// Deterministic simulation of meshlog's protocol core.
#[derive(Parser, Debug)]
#[command(name = "meshlog-sim")]
struct Args {
    /// Run this one seed and print its report.
    #[arg(long, conflicts_with_all = ["seeds", "scale"])]
    seed: Option<u64>,
    /// Sweep seeds A..B (end exclusive).
    #[arg(long, value_name = "A..B")]
    seeds: Option<String>,
    /// Print the scale table: membership with many nodes, placement of many partitions.
    #[arg(long)]
    scale: bool,
    /// Nodes in scale mode.
    #[arg(long, default_value_t = 1000)]
    nodes: u32,
    /// Partitions in scale mode.
    #[arg(long, default_value_t = 10_000)]
    partitions: u32,
    /// Run only the engine scenario (the node's partition replica over three
    /// real stores on crashing disks) for the seed or seeds.
    #[arg(long)]
    engine: bool,
    /// Switch on a deliberate core bug (to see the checkers catch it).
    #[arg(long, value_parser = ["skip-suspicion", "commit-without-quorum", "compact-undurable", "send-before-vote-durable", "ack-all-when-leader-durable", "keep-cut-requests", "append-retries", "keep-identity-after-wipe", "ignore-generations"])]
    inject_fault: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let options = Options {
        inject: (args.inject_fault.as_deref() == Some("skip-suspicion"))
            .then_some(InjectedFault::SkipSuspicion),
    };
    let replication_fault = match args.inject_fault.as_deref() {
        Some("commit-without-quorum") => Some(ReplicationFault::CommitWithoutQuorum),
        Some("compact-undurable") => Some(ReplicationFault::CompactUndurable),
        _ => None,
    };
    let partition_fault = match args.inject_fault.as_deref() {
        Some("send-before-vote-durable") => Some(PartitionFault::SendBeforeVoteDurable),
        Some("ack-all-when-leader-durable") => Some(PartitionFault::AckAllWhenLeaderDurable),
        Some("keep-cut-requests") => Some(PartitionFault::KeepCutRequests),
        Some("append-retries") => Some(PartitionFault::AppendRetries),
        _ => None,
    };
    let replication_faults = (replication_fault, partition_fault);
    let group_fault = (args.inject_fault.as_deref() == Some("ignore-generations"))
        .then_some(GroupFault::CoordinatorIgnoresGenerations);
    if args.scale {
        print_scale(args.nodes, args.partitions);
        return ExitCode::SUCCESS;
    }
    if args.engine {
        let range = match (args.seed, args.seeds.as_deref().map(parse_range)) {
            (Some(seed), _) => (seed, seed + 1),
            (None, Some(Ok(range))) => range,
            (None, Some(Err(e))) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            (None, None) => (0, 100),
        };
        let fault = match (replication_fault, partition_fault) {
            _ if args.inject_fault.as_deref() == Some("keep-identity-after-wipe") => {
                Some(EngineFault::KeepIdentityAfterWipe)
            }
            (Some(f), _) => Some(EngineFault::Replication(f)),
            (None, Some(f)) => Some(EngineFault::Rules(f)),
            (None, None) => None,
        };
        return engine_sweep(range, fault, args.inject_fault.as_deref());
    }
    if let Some(seed) = args.seed {
        let report = scenario::run(seed, &options);
        print_report(&report);
        let rep = replication::run_with(seed, replication_fault, partition_fault);
        print_replication_report(&rep);
        let prod = producer::run(seed);
        print_producer_report(&prod);
        let group = groups::run_with(seed, group_fault);
        print_group_report(&group);
        let failed = report.violation.is_some()
            || rep.violation.is_some()
            || prod.violation.is_some()
            || group.violation.is_some();
        return if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    let (start, end) = match args.seeds.as_deref().map(parse_range) {
        Some(Ok(range)) => range,
        Some(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
        None => (0, 100),
    };
    sweep(
        start,
        end,
        &options,
        (replication_faults, group_fault),
        args.inject_fault.as_deref(),
    )
}

fn parse_range(text: &str) -> Result<(u64, u64), String> {
    let (a, b) = text.split_once("..").ok_or("--seeds takes A..B")?;
    let a: u64 = a.parse().map_err(|_| format!("bad seed {a}"))?;
    let b: u64 = b.parse().map_err(|_| format!("bad seed {b}"))?;
    if a >= b {
        return Err("--seeds A..B needs A < B".into());
    }
    Ok((a, b))
}

/// Deliberate bugs in the partition's log and in the rules around it.
type ReplicationFaults = (Option<ReplicationFault>, Option<PartitionFault>);

fn sweep(
    start: u64,
    end: u64,
    options: &Options,
    (replication_faults, group_fault): (ReplicationFaults, Option<GroupFault>),
    inject: Option<&str>,
) -> ExitCode {
    let wall = Instant::now();
    let (mut events, mut worst, mut worst_recovery, mut acked) =
        (0u64, Duration::ZERO, Duration::ZERO, 0usize);
    let (mut compactions, mut sent_from_disk, mut installs) = (0usize, 0usize, 0usize);
    let (mut produced, mut failovers, mut worst_producer) = (0u64, 0u64, Duration::ZERO);
    let (mut generations, mut commits, mut worst_group) = (0u64, 0u64, Duration::ZERO);
    for seed in start..end {
        let report = scenario::run(seed, options);
        let rep = replication::run_with(seed, replication_faults.0, replication_faults.1);
        let prod = producer::run(seed);
        let group = groups::run_with(seed, group_fault);
        events += report.events + rep.events + prod.events + group.events;
        (generations, commits) = (generations + group.generations, commits + group.commits);
        worst_group = worst_group.max(group.recovery.unwrap_or_default());
        acked += rep.acked;
        compactions += rep.compactions;
        sent_from_disk += rep.sent_from_disk;
        installs += rep.installs;
        produced += prod.acked;
        failovers += u64::from(prod.failovers);
        worst_producer = worst_producer.max(prod.recovery.unwrap_or_default());
        let violation = report
            .violation
            .as_ref()
            .or(rep.violation.as_ref())
            .or(prod.violation.as_ref())
            .or(group.violation.as_ref());
        if let Some(v) = violation {
            let flag = inject.map_or(String::new(), |f| format!(" --inject-fault {f}"));
            println!("seed {seed}: FAILED {v}");
            println!("replay: cargo run -p meshlog-sim --release -- --seed {seed}{flag}");
            return ExitCode::FAILURE;
        }
        worst = worst.max(report.convergence.unwrap_or_default());
        worst_recovery = worst_recovery.max(rep.recovery.unwrap_or_default());
    }
    let secs = wall.elapsed().as_secs_f64();
    println!(
        "{} seeds passed in {secs:.1} s ({:.0} events/s); membership converged at most {worst:?} after the heal; \
         replication: {acked} records acknowledged with acks=all, {compactions} compactions, {sent_from_disk} appends sent from disk, {installs} restarts at a leader's log start, a new record committed everywhere at most {worst_recovery:?} after the heal; \
         producer: {produced} records acknowledged through {failovers} leader failovers, each once and in key order, all at most {worst_producer:?} after the faults ended; \
         groups: {generations} generations, {commits} commits, one owner per partition per generation, no offset backwards or skipped, all committed at most {worst_group:?} after the faults ended",
        end - start,
        events as f64 / secs
    );
    ExitCode::SUCCESS
}

fn engine_sweep(
    (start, end): (u64, u64),
    fault: Option<EngineFault>,
    inject: Option<&str>,
) -> ExitCode {
    let wall = Instant::now();
    let (mut acked, mut writes, mut crashes, mut power_cuts, mut worst) =
        (0usize, 0u64, 0usize, 0usize, Duration::ZERO);
    let (mut idempotent, mut duplicates, mut restarts, mut wipes, mut restores) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    for seed in start..end {
        let r = engine::run_injected(seed, fault);
        if end - start == 1 {
            println!(
                "engine: {} records acknowledged with acks=all, {} idempotent batches acknowledged ({} retries answered with the original, {} chain restarts), {} elections, {} store writes, {} crashes, {} power cuts mid-commit, {} events, trace {}",
                r.acked,
                r.idempotent_acked,
                r.idempotent_duplicates,
                r.producer_restarts,
                r.elections,
                r.writes,
                r.crashes,
                r.power_cuts,
                r.events,
                r.trace_hash
            );
        }
        if let Some(v) = &r.violation {
            let flag = inject.map_or(String::new(), |f| format!(" --inject-fault {f}"));
            println!("engine seed {seed}: FAILED {v}");
            println!("replay: cargo run -p meshlog-sim --release -- --engine --seed {seed}{flag}");
            return ExitCode::FAILURE;
        }
        acked += r.acked;
        idempotent += r.idempotent_acked;
        duplicates += r.idempotent_duplicates;
        restarts += r.producer_restarts;
        wipes += r.wipes;
        restores += r.restores;
        writes += r.writes;
        crashes += r.crashes;
        power_cuts += r.power_cuts;
        worst = worst.max(r.recovery.unwrap_or_default());
    }
    println!(
        "{} engine seeds passed in {:.1} s: {acked} records acknowledged with acks=all ({idempotent} idempotent batches, {duplicates} of them retries answered with the original, {restarts} producer chain restarts), {writes} real store writes, {crashes} crashes, {power_cuts} power cuts mid-commit, {wipes} databases lost ({restores} of them replaced by an older backup), every store verified and agreeing, a record acknowledged at most {worst:?} after the heal",
        end - start,
        wall.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}

fn print_replication_report(r: &replication::Report) {
    println!(
        "replication: {} replicas, {} elections, {} replica-set changes, {} records acknowledged with acks=all, {} requests failed back, {} compactions, {} appends sent from disk, {} restarts at a leader's log start, {} events, trace {}",
        r.replicas,
        r.elections,
        r.reconfigurations,
        r.acked,
        r.failed,
        r.compactions,
        r.sent_from_disk,
        r.installs,
        r.events,
        r.trace_hash
    );
    match (&r.violation, r.recovery) {
        (Some(v), _) => println!("FAILED {v}"),
        (None, Some(t)) => println!(
            "ok: a new record committed everywhere {t:?} after the heal ({:?} wall)",
            r.wall
        ),
        (None, None) => println!("ok"),
    }
}

fn print_group_report(r: &groups::Report) {
    println!(
        "groups: {} generations, {} records, {} commits, {} coordinator failovers, {} member crashes, {} events, trace {}",
        r.generations, r.records, r.commits, r.failovers, r.crashes, r.events, r.trace_hash
    );
    match (&r.violation, r.recovery) {
        (Some(v), _) => println!("FAILED {v}"),
        (None, Some(t)) => println!(
            "ok: every record committed {t:?} after the faults ended ({:?} wall)",
            r.wall
        ),
        (None, None) => println!("ok"),
    }
}

fn print_producer_report(r: &producer::Report) {
    println!(
        "producer: {} records, {} attempts, {} leader failovers, {} events, trace {}",
        r.records, r.attempts, r.failovers, r.events, r.trace_hash
    );
    match (&r.violation, r.recovery) {
        (Some(v), _) => println!("FAILED {v}"),
        (None, Some(t)) => println!(
            "ok: all {} acknowledged, each once and in key order, {t:?} after the faults ended ({:?} wall)",
            r.acked, r.wall
        ),
        (None, None) => println!("ok"),
    }
}

fn print_report(r: &Report) {
    println!(
        "seed {}: {} nodes, {} faults, {} events, trace {}",
        r.seed, r.nodes, r.faults, r.events, r.trace_hash
    );
    match (&r.violation, r.convergence) {
        (Some(v), _) => println!("FAILED {v}"),
        (None, Some(c)) => println!(
            "ok: converged {c:?} after the last fault healed ({:?} wall)",
            r.wall
        ),
        (None, None) => println!("ok"),
    }
}

fn print_scale(nodes: u32, partitions: u32) {
    let placement = scale::placement(nodes, partitions);
    println!(
        "placement: {} partitions x RF 3 on {} nodes (rendezvous hashing)",
        placement.partitions, placement.nodes
    );
    println!(
        "  replicas per node: max {} / mean {:.1}",
        placement.max_replicas, placement.mean_replicas
    );
    println!(
        "  one join moves {} replicas (minimum possible {})",
        placement.moved_on_join, placement.min_on_join
    );
    println!(
        "  one death moves {} replicas (minimum possible {})",
        placement.moved_on_death, placement.min_on_death
    );
    let m = scale::membership(nodes, 1, Duration::from_secs(600));
    match m.converged_after {
        Some(t) => println!(
            "membership: {} nodes converged after {t:?} virtual ({} gossip rounds)",
            m.nodes,
            m.rounds.unwrap_or(0)
        ),
        None => println!(
            "membership: {} nodes did NOT converge within 600 s virtual",
            m.nodes
        ),
    }
    println!(
        "  gossip at steady state: {:.0} bytes per node per second",
        m.bytes_per_node_per_sec
    );
    let rounds =
        |d: Duration| d.as_millis() / MembershipConfig::default().gossip_interval.as_millis();
    match m.death_known_after {
        Some(t) => println!(
            "  one death: every live node has it dead (and places all partitions alike) after {t:?} virtual ({} rounds)",
            rounds(t)
        ),
        None => println!("  one death: NOT known everywhere within 600 s virtual"),
    }
    match m.join_known_after {
        Some(t) => println!(
            "  one join: every node has it alive (and places all partitions alike) after {t:?} virtual ({} rounds)",
            rounds(t)
        ),
        None => println!("  one join: NOT known everywhere within 600 s virtual"),
    }
    println!(
        "  simulator speed: {:.0} events per second",
        m.events_per_sec
    );
}
