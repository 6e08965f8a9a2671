//! `meshlog bench storage`: append throughput and latency of the log store
//! (`meshlog bench mesh` is in `bench_mesh`).
//!
//! Appends batches of 100-byte records straight to a [`Store`] in a fresh
//! directory, one transaction per batch, for batch sizes 1 to 10,000, with fsync
//! on and off. The machine's raw fsync rate is measured in the same directory
//! first: with fsync on, one batch costs at least one fsync, so
//! `fsync rate × batch size` is the ceiling to compare against. Records are
//! digested and encoded on a second thread ahead of the appends, as a node's
//! producers do before handing batches to the writer.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use meshlog::store::{AppendRequest, Store};
use meshlog::wire::PreparedRecords;
use meshlog::{Record, TopicConfig};

use crate::CliResult;

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Append throughput and latency of the redb log store, fsync on and off.
    Storage(StorageArgs),
    /// Produce and end-to-end throughput and latency of a local mesh of node
    /// processes, for replication factor 1 and 3, acks leader and all.
    Mesh(crate::bench_mesh::MeshArgs),
    /// Memory of three node processes under sustained load (RF 3, acks all),
    /// and how fast a node with a long log restarts.
    Soak(crate::bench_soak::SoakArgs),
}

/// Options of `bench storage`.
#[derive(Args, Debug)]
pub struct StorageArgs {
    /// Where to create the scratch directory (on the disk to measure) [default: .]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Time spent on each (fsync, batch size) case.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Most records appended in one case.
    #[arg(long, default_value_t = 5_000_000)]
    pub max_records: u64,
    /// Value size of each record in bytes.
    #[arg(long, default_value_t = 100)]
    pub record_size: usize,
    /// Which durability settings to measure: on, off or both.
    #[arg(long, default_value = "both", value_parser = ["on", "off", "both"])]
    pub fsync: String,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 10, 100, 1000, 10000])]
    pub batches: Vec<usize>,
    /// Concurrent producers in the last case, which goes through a node's
    /// group commit (fsync on, batches of 1000); 0 skips it.
    #[arg(long, default_value_t = 4)]
    pub node_producers: usize,
}

/// What one case measured.
struct CaseResult {
    records: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
}

/// Runs a benchmark; `fsync` is the global `--no-fsync` flag's opposite
/// (the mesh benchmark starts its nodes with it).
pub async fn run(command: &BenchCommand, fsync: bool) -> CliResult {
    match command {
        BenchCommand::Storage(args) => storage(args).await,
        BenchCommand::Mesh(args) => crate::bench_mesh::run(args, fsync).await,
        BenchCommand::Soak(args) => crate::bench_soak::run(args).await,
    }
}

async fn storage(args: &StorageArgs) -> CliResult {
    let parent = args.dir.clone().unwrap_or_else(|| PathBuf::from("."));
    let scratch = tempfile::Builder::new()
        .prefix("meshlog-bench-")
        .tempdir_in(&parent)?;
    let budget = Duration::from_secs_f64(args.seconds.max(0.1));
    let fsync_rate = measure_fsync_rate(scratch.path(), budget)?;
    println!(
        "meshlog storage benchmark: {}-byte records, {:.1} s per case, in {}",
        args.record_size,
        budget.as_secs_f64(),
        parent.display()
    );
    println!("raw fsync rate: {fsync_rate:.0}/s (4 KiB pwrite + fdatasync, same disk)\n");
    println!(
        "{:>5} {:>6} {:>10} {:>12} {:>8} {:>9} {:>9} {:>9} {:>14}",
        "fsync",
        "batch",
        "records",
        "records/s",
        "MB/s",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "vs fsync*batch"
    );
    let modes: &[bool] = match args.fsync.as_str() {
        "on" => &[true],
        "off" => &[false],
        _ => &[true, false],
    };
    for &fsync in modes {
        let store = Store::open(
            &scratch
                .path()
                .join(if fsync { "fsync" } else { "no-fsync" }),
            fsync,
        )?;
        for &batch in &args.batches {
            let result = run_case(&store, batch.max(1), args, budget)?;
            print_row(fsync, batch, &result, args.record_size, fsync_rate);
        }
    }
    if args.node_producers > 0 {
        let result = node_case(scratch.path(), args, budget).await?;
        println!(
            "\nthrough a node: {} producers sending batches of 1000, group commit, fsync on:",
            args.node_producers
        );
        print_row(true, 1000, &result, args.record_size, fsync_rate);
    }
    println!(
        "\nvs fsync*batch: records/s divided by (raw fsync rate x batch size), the most one fsync per batch allows."
    );
    Ok(())
}

/// The produce path as an application gets it: several producers on one
/// node, each sending batches of 1000 and waiting for each acknowledgement;
/// the node's writer commits what is queued together, one fsync per group.
async fn node_case(
    dir: &Path,
    args: &StorageArgs,
    budget: Duration,
) -> Result<CaseResult, Box<dyn std::error::Error>> {
    {
        let config = meshlog::NodeConfig::default()
            .with_data_dir(dir.join("node"))
            .with_fsync(true)
            .without_network();
        let node = meshlog::Node::open(config).await?;
        let partitions = args.node_producers as u32;
        node.create_topic("bench", TopicConfig::default().with_partitions(partitions))
            .await?;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for p in 0..partitions {
            let producer = node.producer(meshlog::ProducerConfig::default());
            let size = args.record_size;
            let max = args.max_records / u64::from(partitions);
            tasks.push(tokio::spawn(async move {
                let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
                let mut sent = 0u64;
                while start.elapsed() < budget && sent < max {
                    let batch: Vec<meshlog::ProducerRecord> = (0..1000)
                        .map(|i| {
                            meshlog::ProducerRecord::new(vec![(i % 251) as u8; size])
                                .with_partition(p)
                        })
                        .collect();
                    let began = Instant::now();
                    producer.send_batch("bench", batch).await?;
                    latency.saturating_record(began.elapsed().as_micros().max(1) as u64);
                    sent += 1000;
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((sent, latency))
            }));
        }
        let mut result = CaseResult {
            records: 0,
            elapsed: Duration::ZERO,
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        };
        for task in tasks {
            let (sent, latency) = task.await?.map_err(|e| e.to_string())?;
            result.records += sent;
            result.latency_us.add(&latency)?;
        }
        result.elapsed = start.elapsed();
        node.shutdown().await;
        Ok(result)
    }
}

/// Appends `batch`-record batches for `budget`. A second thread digests and
/// encodes the batches ahead of the appender, as producers do on their own
/// tasks, so the append path does only what the log's writer does.
fn run_case(
    store: &Store,
    batch: usize,
    args: &StorageArgs,
    budget: Duration,
) -> Result<CaseResult, Box<dyn std::error::Error>> {
    let topic = format!("bench-{batch}");
    store.create_topic(&topic, TopicConfig::default(), 0)?;
    let template: Vec<Record> = (0..batch)
        .map(|i| Record::new(vec![(i % 251) as u8; args.record_size], i as i64))
        .collect();
    let (prepared_tx, prepared_rx) = std::sync::mpsc::sync_channel::<PreparedRecords>(4);
    let batches_wanted = args.max_records.div_ceil(batch as u64);
    let preparer = std::thread::spawn(move || {
        for _ in 0..batches_wanted {
            let Ok(prepared) = PreparedRecords::new(&template) else {
                return;
            };
            if prepared_tx.send(prepared).is_err() {
                return;
            }
        }
    });
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut records = 0u64;
    let start = Instant::now();
    while start.elapsed() < budget {
        let Ok(prepared) = prepared_rx.recv() else {
            break;
        };
        let request = AppendRequest {
            topic: topic.clone(),
            partition: 0,
            producer: None,
            records: prepared,
        };
        let sent = Instant::now();
        store.append(request)?;
        latency_us.saturating_record(sent.elapsed().as_micros().max(1) as u64);
        records += batch as u64;
    }
    let elapsed = start.elapsed();
    drop(prepared_rx);
    let _ = preparer.join();
    Ok(CaseResult {
        records,
        elapsed,
        latency_us,
    })
}

fn print_row(fsync: bool, batch: usize, r: &CaseResult, record_size: usize, fsync_rate: f64) {
    let secs = r.elapsed.as_secs_f64();
    let rate = r.records as f64 / secs;
    let mb = rate * record_size as f64 / 1e6;
    let vs = if fsync {
        format!("{:.2}", rate / (fsync_rate * batch as f64))
    } else {
        "-".to_string()
    };
    println!(
        "{:>5} {:>6} {:>10} {:>12.0} {:>8.1} {:>9} {:>9} {:>9} {:>14}",
        if fsync { "on" } else { "off" },
        batch,
        r.records,
        rate,
        mb,
        r.latency_us.value_at_quantile(0.5),
        r.latency_us.value_at_quantile(0.99),
        r.latency_us.value_at_quantile(0.999),
        vs
    );
}

/// Rewrites one 4 KiB block and fdatasyncs it, as often as it can in `budget`.
fn measure_fsync_rate(dir: &Path, budget: Duration) -> std::io::Result<f64> {
    let path = dir.join("fsync-probe");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let block = vec![0xA5u8; 4096];
    file.write_all(&block)?;
    file.sync_all()?;
    let start = Instant::now();
    let mut syncs = 0u64;
    while start.elapsed() < budget {
        file.write_at(&block, 0)?;
        file.sync_data()?;
        syncs += 1;
    }
    let rate = syncs as f64 / start.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(rate)
}
