//! `meshlog topic create | list | describe | delete`.

use std::time::Duration;

use clap::{Args, Subcommand};
use meshlog::{Error, Node, Retention, TopicConfig, TopicDescription};

use crate::CliResult;

/// Topic commands, as Kafka's `kafka-topics.sh` has them.
#[derive(Subcommand, Debug)]
pub enum TopicCommand {
    /// Create a topic.
    Create(CreateArgs),
    /// List topic names.
    List,
    /// Show each partition's epoch, offsets and chain head, and in a mesh its
    /// leader, replicas, in-sync replicas and target replicas (all topics
    /// when no name is given).
    Describe {
        /// The topic.
        name: Option<String>,
    },
    /// Delete a topic and its records.
    Delete {
        /// The topic.
        name: String,
    },
}

/// Settings for `topic create`, named as in Kafka.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The topic's name: 1 to 249 of a-z A-Z 0-9 . _ -
    pub name: String,
    /// Number of partitions.
    #[arg(long, default_value_t = 1)]
    pub partitions: u32,
    /// Copies of each partition [default: min(3, storage nodes)]
    #[arg(long)]
    pub replication_factor: Option<u16>,
    /// Replicas that must have a record before `acks=all` succeeds [default: a majority]
    #[arg(long)]
    pub min_insync_replicas: Option<u16>,
    /// Drop segments older than this many ms; -1 keeps records forever [default: 7 days]
    #[arg(long, allow_hyphen_values = true)]
    pub retention_ms: Option<i64>,
    /// Keep at most about this many bytes per partition; -1 for no limit [default: -1]
    #[arg(long, allow_hyphen_values = true)]
    pub retention_bytes: Option<i64>,
    /// Start a new segment at this size [default: 64 MiB]
    #[arg(long)]
    pub segment_bytes: Option<u64>,
    /// Largest record accepted, in bytes [default: 1 MiB]
    #[arg(long)]
    pub max_message_bytes: Option<u32>,
    /// Succeed quietly when the topic exists, whatever its settings.
    #[arg(long)]
    pub if_not_exists: bool,
}

impl CreateArgs {
    fn config(&self) -> TopicConfig {
        let defaults = TopicConfig::default();
        let retention = Retention {
            time: match self.retention_ms {
                None => defaults.retention.time,
                Some(ms) if ms < 0 => None,
                Some(ms) => Some(Duration::from_millis(ms.unsigned_abs())),
            },
            bytes: match self.retention_bytes {
                Some(b) if b >= 0 => Some(b.unsigned_abs()),
                _ => None,
            },
        };
        TopicConfig {
            partitions: self.partitions,
            replication_factor: self.replication_factor,
            min_insync_replicas: self.min_insync_replicas,
            retention,
            segment_bytes: self.segment_bytes.unwrap_or(defaults.segment_bytes),
            max_message_bytes: self.max_message_bytes.unwrap_or(defaults.max_message_bytes),
            ..defaults
        }
    }
}

/// Runs a topic command.
pub async fn run(node: Node, command: &TopicCommand) -> CliResult {
    match command {
        TopicCommand::Create(args) => create(&node, args).await,
        TopicCommand::List => {
            for name in node.list_topics().await? {
                println!("{name}");
            }
            Ok(())
        }
        TopicCommand::Describe { name: Some(name) } => {
            print_description(&node.describe_topic(name).await?);
            Ok(())
        }
        TopicCommand::Describe { name: None } => {
            for name in node.list_topics().await? {
                print_description(&node.describe_topic(&name).await?);
            }
            Ok(())
        }
        TopicCommand::Delete { name } => {
            node.delete_topic(name).await?;
            println!("Deleted topic {name}.");
            Ok(())
        }
    }
}

async fn create(node: &Node, args: &CreateArgs) -> CliResult {
    let existed = node.describe_topic(&args.name).await.is_ok();
    match node.create_topic(&args.name, args.config()).await {
        Ok(_) if existed => {
            println!("Topic {} already exists with these settings.", args.name);
            Ok(())
        }
        Ok(_) => {
            println!("Created topic {}.", args.name);
            Ok(())
        }
        Err(Error::TopicExists(_)) if args.if_not_exists => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The last 8 characters of a peer id: enough to tell a mesh's nodes apart.
fn short_peer(peer: &str) -> String {
    peer[peer.len().saturating_sub(8)..].to_string()
}

fn print_description(topic: &TopicDescription) {
    let config = &topic.config;
    let retention_ms = config
        .retention
        .time
        .map_or_else(|| "-1".to_string(), |d| d.as_millis().to_string());
    let retention_bytes = config
        .retention
        .bytes
        .map_or_else(|| "-1".to_string(), |b| b.to_string());
    println!(
        "Topic: {}\tPartitionCount: {}\tReplicationFactor: {}\tConfigs: retention.ms={retention_ms},retention.bytes={retention_bytes},segment.bytes={},max.message.bytes={}",
        topic.name,
        config.partitions,
        topic
            .partitions
            .first()
            .map(|p| p.replicas.len())
            .filter(|n| *n > 0)
            .unwrap_or_else(|| usize::from(config.effective_replication_factor(1))),
        config.segment_bytes,
        config.max_message_bytes,
    );
    for p in &topic.partitions {
        let mut line = format!(
            "\tTopic: {}\tPartition: {}\tEpoch: {}\tLogStartOffset: {}\tHighWatermark: {}\tHead: {}\tBytes: {}",
            topic.name, p.partition, p.epoch, p.log_start_offset, p.high_watermark, p.head, p.bytes
        );
        if !p.replicas.is_empty() {
            let ids = |peers: &[meshlog::net::NodeId]| {
                peers
                    .iter()
                    .map(|p| short_peer(&p.to_string()))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let leader = p
                .leader
                .map_or_else(|| "none".to_string(), |l| short_peer(&l.to_string()));
            line.push_str(&format!(
                "\tLeader: {leader}\tReplicas: {}\tIsr: {}",
                ids(&p.replicas),
                ids(&p.in_sync)
            ));
            if !p.learners.is_empty() {
                line.push_str(&format!("\tLearners: {}", ids(&p.learners)));
            }
            if !p.target_replicas.is_empty() {
                line.push_str(&format!("\tTarget: {}", ids(&p.target_replicas)));
            }
        }
        println!("{line}");
    }
}
