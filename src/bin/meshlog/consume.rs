//! `meshlog consume TOPIC`: print records, one per line.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use meshlog::{Assignor, ConsumerConfig, ConsumerRecord, Node, OffsetReset};

use crate::CliResult;

/// Options of `consume`, following `kafka-console-consumer.sh`.
#[derive(Args, Debug)]
pub struct ConsumeArgs {
    /// The topic to read.
    pub topic: String,
    /// Consumer group: where the position is committed, so the next run continues.
    #[arg(long)]
    pub group: Option<String>,
    /// Start at the oldest record when the group has no committed offset
    /// (otherwise only new records are printed).
    #[arg(long)]
    pub from_beginning: bool,
    /// Exit after this many records.
    #[arg(long)]
    pub max_messages: Option<u64>,
    /// Exit when no record arrives for this many milliseconds.
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Print the key before the value, separated by a tab.
    #[arg(long)]
    pub print_key: bool,
    /// Print partition, offset and ID before each record, separated by tabs.
    #[arg(long)]
    pub print_metadata: bool,
    /// With --group: the member is dropped from the group when silent this long.
    #[arg(long, value_name = "MS", default_value_t = 45_000)]
    pub session_timeout_ms: u64,
    /// With --group: how partitions are shared (all members must agree).
    #[arg(long, value_enum, default_value_t = AssignorArg::CooperativeSticky)]
    pub assignor: AssignorArg,
}

/// `partition.assignment.strategy`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum AssignorArg {
    /// Contiguous ranges per topic.
    Range,
    /// Partitions dealt in turn.
    Roundrobin,
    /// Balanced and sticky; partitions move without stopping the others.
    CooperativeSticky,
}

impl From<AssignorArg> for Assignor {
    fn from(arg: AssignorArg) -> Self {
        match arg {
            AssignorArg::Range => Assignor::Range,
            AssignorArg::Roundrobin => Assignor::RoundRobin,
            AssignorArg::CooperativeSticky => Assignor::CooperativeSticky,
        }
    }
}

/// Polls until `--max-messages`, `--timeout-ms`, Ctrl-C or SIGTERM, committing after
/// each batch; with `--group`, shares the topic's partitions with the
/// group's other members.
pub async fn run(node: Node, args: &ConsumeArgs) -> CliResult {
    let reset = if args.from_beginning {
        OffsetReset::Earliest
    } else {
        OffsetReset::Latest
    };
    let mut config = ConsumerConfig::default()
        .with_auto_offset_reset(reset)
        .with_auto_commit(false)
        .with_assignor(args.assignor.into())
        .with_session_timeout(Duration::from_millis(args.session_timeout_ms));
    config.group_id = args.group.clone();
    let mut consumer = node.consumer(config)?;
    consumer.subscribe(&[args.topic.as_str()])?;
    let limit = args.max_messages.unwrap_or(u64::MAX);
    let idle = args
        .timeout_ms
        .map_or(Duration::from_secs(3600), Duration::from_millis);
    let mut printed = 0u64;
    let mut membership = (None, Vec::new());
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut last_record = tokio::time::Instant::now();
    while printed < limit {
        // Short polls, so membership changes are reported while idle.
        let records = tokio::select! {
            _ = &mut ctrl_c => break,
            _ = terminate.recv() => break,
            polled = consumer.poll(idle.min(Duration::from_secs(1))) => polled?,
        };
        if args.print_metadata && args.group.is_some() {
            let now = (consumer.generation(), consumer.assignment().to_vec());
            if now != membership {
                report_membership(&consumer);
                membership = now;
            }
        }
        if !records.is_empty() {
            last_record = tokio::time::Instant::now();
        } else if last_record.elapsed() >= idle {
            break;
        }
        let take = records.len().min((limit - printed) as usize);
        print_records(args, &records[..take])?;
        printed += take as u64;
        // Records past the limit were not printed: move back before them.
        let mut rewound = std::collections::BTreeSet::new();
        for r in &records[take..] {
            if rewound.insert((&r.topic, r.partition)) {
                consumer.seek(&r.topic, r.partition, r.offset)?;
            }
        }
        if args.group.is_some() {
            match consumer.commit().await {
                Ok(()) => {}
                // Refused during a rebalance or after being fenced: the
                // records stay uncommitted and the consumer rejoins.
                Err(meshlog::Error::Group(error)) => eprintln!("commit refused: {error}"),
                Err(error) => return Err(error.into()),
            }
        }
    }
    // Leave the group at once, so the others take the partitions now.
    consumer.close().await?;
    eprintln!("Processed a total of {printed} messages");
    Ok(())
}

/// Says on stderr which partitions this member holds in which generation.
fn report_membership(consumer: &meshlog::Consumer) {
    let partitions: Vec<String> = consumer
        .assignment()
        .iter()
        .map(|(t, p)| format!("{t}/{p}"))
        .collect();
    eprintln!(
        "member {} generation {}: {}",
        consumer.member_id(),
        consumer.generation().unwrap_or(0),
        partitions.join(" ")
    );
}

fn print_records(args: &ConsumeArgs, records: &[ConsumerRecord]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    for r in records {
        if args.print_metadata {
            write!(out, "{}\t{}\t{}\t", r.partition, r.offset, r.id)?;
        }
        if args.print_key {
            let key = r.key().map(String::from_utf8_lossy).unwrap_or_default();
            write!(out, "{key}\t")?;
        }
        out.write_all(r.value())?;
        out.write_all(b"\n")?;
    }
    out.flush()
}
