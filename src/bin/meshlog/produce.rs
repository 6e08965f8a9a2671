//! `meshlog produce TOPIC`: one record per line of standard input.

use clap::Args;
use futures::FutureExt;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use meshlog::{Acks, Node, ProducerConfig, ProducerRecord, RecordMetadata};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::CliResult;

/// Options of `produce`, following `kafka-console-producer.sh`.
#[derive(Args, Debug)]
pub struct ProduceArgs {
    /// The topic to send to.
    pub topic: String,
    /// Give every record this key.
    #[arg(long, conflicts_with = "key_separator")]
    pub key: Option<String>,
    /// Read `KEY<SEP>VALUE` lines (Kafka's `parse.key` with `key.separator`).
    #[arg(long, value_name = "SEP")]
    pub key_separator: Option<String>,
    /// Print partition, offset and ID of each record once it is acknowledged.
    #[arg(long)]
    pub print_metadata: bool,
    /// When a record counts as sent: all (a quorum of replicas has it), leader, none.
    #[arg(long, value_enum, default_value_t = AcksArg::All)]
    pub acks: AcksArg,
    /// A partition's batch is sent once it holds this many bytes (`batch.size`).
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024)]
    pub batch_size: usize,
    /// How long a batch waits for more lines (`linger.ms`).
    #[arg(long, value_name = "MS", default_value_t = 5)]
    pub linger_ms: u64,
    /// A stable producer identity. The input is then this producer's whole
    /// stream: run the same input again after a crash and only the lines not
    /// yet stored are sent; the others are skipped by their sequence number
    /// in each partition (lines are stamped with the time they are read, so
    /// the producer chain cannot tell a rerun's lines from the first run's).
    #[arg(long, value_name = "NAME")]
    pub producer_id: Option<String>,
}

/// Kafka's `acks` values, as the command line spells them.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum AcksArg {
    /// A quorum of replicas (at least `min.insync.replicas`) has the records.
    All,
    /// The partition's leader has them.
    Leader,
    /// Sent; nothing waited for.
    None,
}

impl From<AcksArg> for Acks {
    fn from(acks: AcksArg) -> Acks {
        match acks {
            AcksArg::All => Acks::All,
            AcksArg::Leader => Acks::Leader,
            AcksArg::None => Acks::None,
        }
    }
}

/// Streams stdin, one record per line, through the batching producer;
/// acknowledgements are printed (with `--print-metadata`) in input order.
pub async fn run(node: Node, args: &ProduceArgs) -> CliResult {
    node.describe_topic(&args.topic).await?;
    let mut config = ProducerConfig::default()
        .with_acks(args.acks.into())
        .with_linger(std::time::Duration::from_millis(args.linger_ms));
    config.batch_size = args.batch_size.max(1);
    if let Some(name) = &args.producer_id {
        config = config.with_producer_id(name.as_str()).with_replay(true);
        config.replay_verify = false;
    }
    let producer = node.producer(config);
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut pending = FuturesOrdered::new();
    let mut tally = Tally::default();
    while let Some(line) = lines.next_line().await? {
        pending.push_back(producer.enqueue(&args.topic, to_record(args, line)).await?);
        // Report what is already answered without waiting.
        while let Some(Some(answer)) = pending.next().now_or_never() {
            tally.report(args, answer)?;
        }
    }
    producer.flush().await?;
    while let Some(answer) = pending.next().await {
        tally.report(args, answer)?;
    }
    match tally.already_stored {
        0 => eprintln!("Sent {} records to {}.", tally.sent, args.topic),
        n => eprintln!(
            "Sent {} records to {} ({n} were already stored).",
            tally.sent, args.topic
        ),
    }
    Ok(())
}

/// What the acknowledgements said so far.
#[derive(Default)]
struct Tally {
    sent: u64,
    already_stored: u64,
}

impl Tally {
    fn report(&mut self, args: &ProduceArgs, answer: meshlog::Result<RecordMetadata>) -> CliResult {
        use std::io::Write;
        match answer {
            Ok(m) => {
                self.sent += 1;
                if args.print_metadata {
                    let mut out = std::io::stdout().lock();
                    writeln!(
                        out,
                        "{}\t{}\t{}\t{}",
                        m.topic,
                        m.partition,
                        m.offset,
                        m.id.to_hex()
                    )?;
                }
            }
            Err(meshlog::Error::AlreadyStored {
                topic,
                partition,
                seq,
            }) => {
                self.already_stored += 1;
                if args.print_metadata {
                    let mut out = std::io::stdout().lock();
                    writeln!(
                        out,
                        "{topic}\t{partition}\t-\talready stored (sequence {seq})"
                    )?;
                }
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
}

fn to_record(args: &ProduceArgs, line: String) -> ProducerRecord {
    if let Some(sep) = &args.key_separator
        && let Some((key, value)) = line.split_once(sep.as_str())
    {
        return ProducerRecord::new(value).with_key(key);
    }
    let record = ProducerRecord::new(line);
    match &args.key {
        Some(key) => record.with_key(key.as_str()),
        None => record,
    }
}
