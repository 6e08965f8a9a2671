//! `meshlog bench mesh`: produce and end-to-end throughput and latency of a
//! real local mesh.
//!
//! Starts `--nodes` `meshlog node` processes on 127.0.0.1 (each with its own
//! data directory in a scratch directory, fsync on unless `--no-fsync`), joins them as a light
//! client in this process, and for each case (replication factor 1 and 3,
//! acks leader and all) creates a topic, runs `--producers` producers streaming
//! records (at `--rate` in all, or as fast as they are acknowledged) for
//! `--seconds`, and a consumer reading everything back. Each record carries the time it was handed to the
//! producer, so the consumer measures end-to-end latency on the same clock.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use meshlog::core::membership::Role;
use meshlog::net::{MeshConfig, Multiaddr};
use meshlog::{
    Acks, ConsumerConfig, Node, NodeConfig, OffsetReset, ProducerConfig, ProducerRecord,
    TopicConfig,
};

use crate::CliResult;

/// Options of `bench mesh`.
#[derive(Args, Debug)]
pub struct MeshArgs {
    /// Node processes to start.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Time spent producing in each case.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Value size of each record in bytes (at least 8).
    #[arg(long, default_value_t = 100)]
    pub record_size: usize,
    /// Records per second offered by all producers together; 0: as fast as
    /// they go. Latency is best read at a fixed rate below saturation.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// The producers' `batch.size` in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    pub batch_size: usize,
    /// The producers' `linger.ms`.
    #[arg(long, default_value_t = 5)]
    pub linger_ms: u64,
    /// The producers' `max.in.flight.requests.per.connection`.
    #[arg(long, default_value_t = 5)]
    pub max_in_flight: usize,
    /// Concurrent producers.
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Partitions of each case's topic.
    #[arg(long, default_value_t = 6)]
    pub partitions: u32,
}

/// A node process, killed when dropped.
struct NodeProcess(Child);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one case measured.
struct CaseResult {
    acked: u64,
    produce_secs: f64,
    ack_latency_us: Histogram<u64>,
    consumed: u64,
    consume_secs: f64,
    e2e_latency_us: Histogram<u64>,
}

/// Runs the benchmark, with node processes that fsync before acknowledging
/// unless `fsync` is false (`meshlog --no-fsync bench mesh`).
pub async fn run(args: &MeshArgs, fsync: bool) -> CliResult {
    if args.record_size < 8 || args.nodes == 0 || args.producers == 0 {
        return Err(
            "--record-size must be at least 8, and --nodes and --producers at least 1".into(),
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("meshlog-bench-")
        .tempdir()?;
    println!(
        "starting {} node processes (fsync {}) in {}",
        args.nodes,
        if fsync { "on" } else { "off" },
        dir.path().display()
    );
    let (processes, address) = start_nodes(dir.path(), args.nodes, fsync)?;
    let client = join(dir.path(), &address, args.nodes).await?;
    println!(
        "{:>2} {:>6} {:>12} {:>8} {:>9} {:>9} {:>12} {:>9} {:>9} {:>10}",
        "rf",
        "acks",
        "produce/s",
        "MB/s",
        "ack p50",
        "ack p99",
        "e2e rec/s",
        "e2e p50",
        "e2e p99",
        "e2e p99.9"
    );
    let mut cases = vec![(1u16, Acks::Leader), (1, Acks::All)];
    if args.nodes >= 3 {
        cases.extend([(3, Acks::Leader), (3, Acks::All)]);
    }
    for (rf, acks) in cases {
        let r = run_case(&client, args, rf, acks).await?;
        print_row(rf, acks, &r, args.record_size);
    }
    client.shutdown().await;
    drop(processes);
    Ok(())
}

/// Starts the node processes; returns them and the first one's address.
fn start_nodes(
    dir: &Path,
    count: usize,
    fsync: bool,
) -> Result<(Vec<NodeProcess>, Multiaddr), Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let mut processes = Vec::new();
    let mut address: Option<Multiaddr> = None;
    for i in 0..count {
        let mut command = Command::new(&exe);
        command.arg("--data-dir").arg(dir.join(format!("node{i}")));
        if !fsync {
            command.arg("--no-fsync");
        }
        command
            .args(["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
            .args(["--gossip-interval-ms", "200"])
            .env("RUST_LOG", "error")
            .stderr(Stdio::null());
        match &address {
            Some(a) => {
                command
                    .arg("--bootstrap")
                    .arg(a.to_string())
                    .stdout(Stdio::null());
                processes.push(NodeProcess(command.spawn()?));
            }
            None => {
                // The first node prints its address; the rest of its output is
                // drained so that its writes never fail.
                let mut child = command.stdout(Stdio::piped()).spawn()?;
                let stdout = child.stdout.take().ok_or("no stdout from a node")?;
                processes.push(NodeProcess(child));
                let mut lines = BufReader::new(stdout).lines();
                for line in lines.by_ref() {
                    if let Some(a) = line?.strip_prefix("listening on ") {
                        address = Some(a.parse()?);
                        break;
                    }
                }
                std::thread::spawn(move || lines.for_each(drop));
            }
        }
    }
    let address = address.ok_or("the first node printed no address")?;
    Ok((processes, address))
}

/// Joins the mesh as a light client and waits until it sees every node.
async fn join(
    dir: &Path,
    address: &Multiaddr,
    nodes: usize,
) -> Result<Node, Box<dyn std::error::Error>> {
    let mut mesh = MeshConfig::loopback().with_role(Role::LightClient);
    mesh.bootstrap.push(address.clone());
    mesh.membership.gossip_interval = Duration::from_millis(200);
    let client = Node::open(
        NodeConfig::default()
            .with_data_dir(dir.join("client"))
            .with_network(mesh),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.live_storage_nodes().await?.len() < nodes {
        if Instant::now() > deadline {
            return Err("the node processes did not form a mesh in 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(client)
}

async fn run_case(
    client: &Node,
    args: &MeshArgs,
    rf: u16,
    acks: Acks,
) -> Result<CaseResult, Box<dyn std::error::Error>> {
    let topic = format!("bench-rf{rf}-{}", format!("{acks:?}").to_lowercase());
    let config = TopicConfig::default()
        .with_partitions(args.partitions)
        .with_replication_factor(rf);
    client.create_topic(&topic, config).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client
        .describe_topic(&topic)
        .await?
        .partitions
        .iter()
        .all(|p| p.leader.is_some())
    {
        if Instant::now() > deadline {
            return Err(format!("{topic}: no leader for every partition in 30 s").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let clock = Instant::now();
    let acked = Arc::new(AtomicU64::new(0));
    let (done, total_rx) = tokio::sync::watch::channel(None::<u64>);
    let (ready, assigned) = tokio::sync::oneshot::channel();
    let consumer = tokio::spawn(consume(
        client.clone(),
        topic.clone(),
        clock,
        ready,
        total_rx,
    ));
    // Producing starts once the consumer holds its partitions, so that the
    // end-to-end figures measure the data path, not the group's first join.
    if assigned.await.is_err() {
        return Err(consumer
            .await?
            .err()
            .map_or_else(
                || format!("{topic}: the consumer stopped before it was assigned"),
                |e| e.to_string(),
            )
            .into());
    }
    let produce_for = Duration::from_secs_f64(args.seconds);
    let mut producers = Vec::new();
    for p in 0..args.producers {
        let mut config = ProducerConfig::default()
            .with_acks(acks)
            .with_linger(Duration::from_millis(args.linger_ms));
        config.batch_size = args.batch_size;
        config.max_in_flight = args.max_in_flight;
        let producer = client.producer(config);
        let (topic, acked) = (topic.clone(), acked.clone());
        let size = args.record_size;
        let rate = args.rate as f64 / args.producers as f64;
        producers.push(tokio::spawn(async move {
            // Acknowledgements are timed by a task of their own, woken as each
            // arrives, so that the sending loop's pace does not delay them.
            let (deliveries, collected) = tokio::sync::mpsc::unbounded_channel();
            let collector = tokio::spawn(collect_acks(collected, clock, acked));
            let mut n = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            while clock.elapsed() < produce_for {
                // At a fixed rate, send what is due by now, once per millisecond.
                let due = if rate > 0.0 {
                    tick.tick().await;
                    (clock.elapsed().as_secs_f64() * rate) as u64
                } else {
                    n + 1
                };
                while n < due {
                    let sent_at = clock.elapsed().as_micros() as u64;
                    let mut value = vec![0u8; size];
                    value[..8].copy_from_slice(&sent_at.to_le_bytes());
                    let record = ProducerRecord::new(value).with_key(format!("p{p}-k{}", n % 64));
                    let delivery = producer.enqueue(&topic, record).await?;
                    if deliveries.send((sent_at, delivery)).is_err() {
                        break;
                    }
                    n += 1;
                }
            }
            producer.flush().await?;
            drop(deliveries);
            collector.await?
        }));
    }
    let (bar, ticker) = progress_bar(&topic, produce_for, acked.clone());
    let mut ack_latency_us = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    for p in producers {
        let h = p.await?.map_err(|e| e.to_string())?;
        ack_latency_us.add(&h)?;
    }
    let produce_secs = clock.elapsed().as_secs_f64();
    ticker.abort();
    bar.finish_and_clear();
    let total = acked.load(Ordering::Relaxed);
    let _ = done.send(Some(total));
    let (consumed, consume_secs, e2e_latency_us) = consumer.await?.map_err(|e| e.to_string())?;
    Ok(CaseResult {
        acked: total,
        produce_secs,
        ack_latency_us,
        consumed,
        consume_secs,
        e2e_latency_us,
    })
}

/// Shows the case's progress on stderr (when it is a terminal) until aborted:
/// time spent producing and records acknowledged so far.
fn progress_bar(
    topic: &str,
    produce_for: Duration,
    acked: Arc<AtomicU64>,
) -> (indicatif::ProgressBar, tokio::task::JoinHandle<()>) {
    let bar = indicatif::ProgressBar::new(produce_for.as_millis() as u64);
    let style = indicatif::ProgressStyle::with_template("{prefix:>18} [{bar:30}] {msg}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(topic.to_string());
    let started = Instant::now();
    let shown = bar.clone();
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            bar.set_position(started.elapsed().as_millis() as u64);
            bar.set_message(format!("{} acknowledged", acked.load(Ordering::Relaxed)));
            if started.elapsed() > produce_for + Duration::from_secs(60) {
                break;
            }
        }
    });
    (shown, ticker)
}

/// Counts an acknowledged record and its latency.
/// Times each delivery (sent at µs on `clock`) as it is answered, until the
/// sender is done and every delivery is answered; fails on the first error.
async fn collect_acks(
    mut deliveries: tokio::sync::mpsc::UnboundedReceiver<(u64, meshlog::Delivery)>,
    clock: Instant,
    acked: Arc<AtomicU64>,
) -> Result<Histogram<u64>, Box<dyn std::error::Error + Send + Sync>> {
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut pending = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            next = deliveries.recv(), if open => match next {
                Some((sent_at, delivery)) => pending.push(async move {
                    let answer = delivery.await;
                    (sent_at, clock.elapsed().as_micros() as u64, answer)
                }),
                None => open = false,
            },
            Some((sent_at, answered_at, answer)) = pending.next(), if !pending.is_empty() => {
                answer?;
                latency.record(answered_at.saturating_sub(sent_at).max(1))?;
                acked.fetch_add(1, Ordering::Relaxed);
            }
            else => return Ok(latency),
        }
    }
}

/// Reads the case's topic until it has seen every acknowledged record (whose
/// count arrives on `total` once the producers are done), or 30 s pass
/// without progress.
async fn consume(
    client: Node,
    topic: String,
    clock: Instant,
    ready: tokio::sync::oneshot::Sender<()>,
    total: tokio::sync::watch::Receiver<Option<u64>>,
) -> Result<(u64, f64, Histogram<u64>), Box<dyn std::error::Error + Send + Sync>> {
    // One consumer group of one member (committing every 5 s, as a Kafka
    // consumer does); large polls, so that it keeps up with several producers.
    let mut config = ConsumerConfig::default()
        .with_group_id(format!("bench-{topic}"))
        .with_auto_offset_reset(OffsetReset::Earliest);
    config.max_poll_records = 100_000;
    let mut consumer = client.consumer(config)?;
    consumer.subscribe(&[&topic])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while consumer.assignment().is_empty() {
        if Instant::now() > deadline {
            return Err(format!("{topic}: no partitions assigned to the consumer in 30 s").into());
        }
        // Nothing is produced yet, so these polls return no records.
        consumer.poll(Duration::from_millis(50)).await?;
    }
    let _ = ready.send(());
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let (mut consumed, mut last_progress, mut last_at) = (0u64, Instant::now(), 0.0);
    loop {
        let done = total.borrow().is_some_and(|t| consumed >= t);
        if done || last_progress.elapsed() > Duration::from_secs(30) {
            return Ok((consumed, last_at, latency));
        }
        let records = consumer.poll(Duration::from_millis(200)).await?;
        if records.is_empty() {
            continue;
        }
        let now = clock.elapsed().as_micros() as u64;
        for r in &records {
            let mut stamp = [0u8; 8];
            stamp.copy_from_slice(r.value().get(..8).unwrap_or(&[0; 8]));
            latency.record(now.saturating_sub(u64::from_le_bytes(stamp)).max(1))?;
        }
        consumed += records.len() as u64;
        last_progress = Instant::now();
        last_at = clock.elapsed().as_secs_f64();
    }
}

fn print_row(rf: u16, acks: Acks, r: &CaseResult, record_size: usize) {
    let rate = r.acked as f64 / r.produce_secs.max(1e-9);
    let e2e_rate = r.consumed as f64 / r.consume_secs.max(1e-9);
    let ms = |us: u64| format!("{:.1}ms", us as f64 / 1000.0);
    println!(
        "{:>2} {:>6} {:>12.0} {:>8.1} {:>9} {:>9} {:>12.0} {:>9} {:>9} {:>10}",
        rf,
        format!("{acks:?}").to_lowercase(),
        rate,
        rate * record_size as f64 / 1e6,
        ms(r.ack_latency_us.value_at_quantile(0.5)),
        ms(r.ack_latency_us.value_at_quantile(0.99)),
        e2e_rate,
        ms(r.e2e_latency_us.value_at_quantile(0.5)),
        ms(r.e2e_latency_us.value_at_quantile(0.99)),
        ms(r.e2e_latency_us.value_at_quantile(0.999)),
    );
    if r.consumed < r.acked {
        println!(
            "   (consumed {} of {} acknowledged records)",
            r.consumed, r.acked
        );
    }
}
