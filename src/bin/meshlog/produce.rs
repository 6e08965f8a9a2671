//! `meshlog produce TOPIC`: one record per line of standard input.

use clap::Args;
use meshlog::{Acks, Node, ProducerConfig, ProducerRecord};
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
    /// Most lines sent as one batch.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
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

/// Reads stdin line by line; lines already waiting go out together as one
/// batch, and each batch is acknowledged before the next is sent.
pub async fn run(node: Node, args: &ProduceArgs) -> CliResult {
    node.describe_topic(&args.topic).await?;
    let producer = node.producer(ProducerConfig::default().with_acks(args.acks.into()));
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut batch = Vec::new();
    let mut sent = 0u64;
    loop {
        // Wait for one line, then take what else is already buffered.
        let Some(line) = lines.next_line().await? else {
            break;
        };
        batch.push(to_record(args, line));
        while batch.len() < args.batch_size.max(1) && lines.get_ref().buffer().contains(&b'\n') {
            match lines.next_line().await? {
                Some(line) => batch.push(to_record(args, line)),
                None => break,
            }
        }
        sent += send(&producer, args, std::mem::take(&mut batch)).await?;
    }
    eprintln!("Sent {sent} records to {}.", args.topic);
    Ok(())
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

async fn send(
    producer: &meshlog::Producer,
    args: &ProduceArgs,
    batch: Vec<ProducerRecord>,
) -> Result<u64, Box<dyn std::error::Error>> {
    let count = batch.len() as u64;
    let sent = producer.send_batch(&args.topic, batch).await?;
    if args.print_metadata {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for m in &sent {
            writeln!(
                out,
                "{}\t{}\t{}\t{}",
                m.topic,
                m.partition,
                m.offset,
                m.id.to_hex()
            )?;
        }
        out.flush()?;
    }
    Ok(count)
}
