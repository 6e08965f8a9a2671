//! `meshlog group list | describe | reset-offsets`, as Kafka's
//! `kafka-consumer-groups.sh` has them: members and their partitions,
//! committed offsets, log end and lag, asked of the group's coordinator.

use clap::{Args, Subcommand};
use meshlog::Node;

use crate::CliResult;

/// Consumer group commands.
#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// List the groups the mesh's coordinators know.
    List,
    /// Show a group's state, members and, per partition, owner, committed offset, log end and lag.
    Describe {
        /// The group.
        group: String,
    },
    /// Move a group's committed offsets for one topic.
    ResetOffsets(ResetArgs),
}

/// Options of `group reset-offsets`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to_earliest", "to_latest", "to_offset"])))]
pub struct ResetArgs {
    /// The group.
    pub group: String,
    /// The topic whose partitions move.
    #[arg(long)]
    pub topic: String,
    /// To the oldest record still stored.
    #[arg(long)]
    pub to_earliest: bool,
    /// To the end of each partition (skip everything so far).
    #[arg(long)]
    pub to_latest: bool,
    /// To this offset in every partition (clamped to what is stored).
    #[arg(long, value_name = "N")]
    pub to_offset: Option<u64>,
    /// Apply the plan; without it the plan is only printed (as Kafka does).
    #[arg(long)]
    pub execute: bool,
}

/// Runs a group command.
pub async fn run(node: Node, command: &GroupCommand) -> CliResult {
    match command {
        GroupCommand::List => {
            for group in node.list_groups().await? {
                println!("{group}");
            }
            Ok(())
        }
        GroupCommand::Describe { group } => describe(&node, group).await,
        GroupCommand::ResetOffsets(args) => reset(&node, args).await,
    }
}

async fn describe(node: &Node, group: &str) -> CliResult {
    let info = node.describe_group(group).await?;
    if info.members.is_empty() && info.offsets.is_empty() {
        return Err(format!("consumer group '{group}' does not exist").into());
    }
    let assignor = info.assignor.map_or("-", |a| a.name());
    eprintln!(
        "Group {group}: state {}, generation {}, assignor {assignor}, {} members",
        info.state,
        info.generation,
        info.members.len()
    );
    let owner = |topic: &str, partition: u32| {
        info.members
            .iter()
            .find(|(_, tps)| tps.iter().any(|(t, p)| t == topic && *p == partition))
            .map_or("-", |(m, _)| m.as_str())
    };
    println!(
        "{:<20} {:<20} {:>9} {:>15} {:>15} {:>10}  CONSUMER-ID",
        "GROUP", "TOPIC", "PARTITION", "CURRENT-OFFSET", "LOG-END-OFFSET", "LAG"
    );
    for o in &info.offsets {
        println!(
            "{:<20} {:<20} {:>9} {:>15} {:>15} {:>10}  {}",
            group,
            o.topic,
            o.partition,
            o.committed,
            o.log_end_offset,
            o.lag,
            owner(&o.topic, o.partition)
        );
    }
    for (member, partitions) in &info.members {
        let uncommitted: Vec<String> = partitions
            .iter()
            .filter(|(t, p)| {
                !info
                    .offsets
                    .iter()
                    .any(|o| o.topic == *t && o.partition == *p)
            })
            .map(|(t, p)| format!("{t}/{p}"))
            .collect();
        if !uncommitted.is_empty() {
            println!(
                "{member} owns (nothing committed yet): {}",
                uncommitted.join(" ")
            );
        }
    }
    Ok(())
}

async fn reset(node: &Node, args: &ResetArgs) -> CliResult {
    let topic = node.describe_topic(&args.topic).await?;
    let plan: Vec<(String, u32, u64)> = topic
        .partitions
        .iter()
        .map(|p| {
            let offset = match (args.to_earliest, args.to_latest, args.to_offset) {
                (true, _, _) => p.log_start_offset,
                (_, true, _) => p.high_watermark,
                (_, _, Some(n)) => n.clamp(p.log_start_offset, p.high_watermark),
                _ => p.high_watermark,
            };
            (args.topic.clone(), p.partition, offset)
        })
        .collect();
    println!(
        "{:<20} {:<20} {:>9} {:>12}",
        "GROUP", "TOPIC", "PARTITION", "NEW-OFFSET"
    );
    for (topic, partition, offset) in &plan {
        println!(
            "{:<20} {:<20} {:>9} {:>12}",
            args.group, topic, partition, offset
        );
    }
    if args.execute {
        node.commit_group_offsets(&args.group, plan).await?;
    } else {
        eprintln!("Dry run: nothing changed. Add --execute to apply.");
    }
    Ok(())
}
