//! `meshlog bench soak`: whether a node's memory stays flat under sustained
//! load, and whether a node with a long log restarts quickly.
//!
//! Starts three `meshlog node` processes on 127.0.0.1 (fsync on), creates a
//! topic with replication factor 3, and has `--producers` producers send
//! batches of `--batch-records` records with `acks=all` as fast as they are
//! acknowledged for `--minutes`. Every minute it prints the records/s and
//! each node's resident memory (RSS). At the end it compares each node's RSS
//! with its RSS after the first minute, then stops one node (SIGTERM),
//! restarts it on its data directory and reports how long it took to open
//! and its RSS beside that of a fresh node started on an empty directory.
//! (After a crash instead, the database engine first repairs the file, which
//! takes time proportional to its size.)

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use meshlog::core::membership::Role;
use meshlog::net::{MeshConfig, Multiaddr};
use meshlog::{Acks, Node, NodeConfig, ProducerConfig, ProducerRecord, TopicConfig};

use crate::CliResult;

/// Options of `bench soak`.
#[derive(Args, Debug)]
pub struct SoakArgs {
    /// How long to produce.
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// Records per batch (one `send_batch` each).
    #[arg(long, default_value_t = 100)]
    pub batch_records: usize,
    /// Value size of each record in bytes.
    #[arg(long, default_value_t = 100)]
    pub record_size: usize,
    /// Concurrent producers.
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 6)]
    pub partitions: u32,
}

/// A node process and its data directory; killed when dropped.
struct NodeProcess {
    child: Child,
    dir: PathBuf,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeProcess {
    /// Starts `meshlog node` on `dir`; returns it once it listens, with its
    /// address and how long it took to get there.
    fn start(
        dir: &Path,
        bootstrap: Option<&Multiaddr>,
    ) -> Result<(NodeProcess, Multiaddr, Duration), Box<dyn std::error::Error>> {
        let started = Instant::now();
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg("--data-dir")
            .arg(dir)
            .args(["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
            .args(["--gossip-interval-ms", "200"])
            .env("RUST_LOG", "error")
            .stderr(Stdio::null())
            .stdout(Stdio::piped());
        if let Some(address) = bootstrap {
            command.arg("--bootstrap").arg(address.to_string());
        }
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout from a node")?;
        let process = NodeProcess {
            child,
            dir: dir.to_path_buf(),
        };
        let mut lines = BufReader::new(stdout).lines();
        let mut address = None;
        for line in lines.by_ref() {
            if let Some(a) = line?.strip_prefix("listening on ") {
                address = Some(a.parse()?);
                break;
            }
        }
        let opened = started.elapsed();
        // The rest of its output is drained so that its writes never fail.
        std::thread::spawn(move || lines.for_each(drop));
        let address = address.ok_or("a node printed no address")?;
        Ok((process, address, opened))
    }

    /// Its resident memory in bytes, from /proc.
    fn rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "?".into(), |b| format!("{:.1}", b as f64 / 1048576.0))
}

/// Runs the soak.
pub async fn run(args: &SoakArgs) -> CliResult {
    if args.batch_records == 0 || args.producers == 0 || args.minutes <= 0.0 {
        return Err("--batch-records, --producers and --minutes must be positive".into());
    }
    let scratch = tempfile::Builder::new().prefix("meshlog-soak-").tempdir()?;
    let (first, address, _) = NodeProcess::start(&scratch.path().join("node0"), None)?;
    let mut nodes = vec![first];
    for i in 1..3 {
        let dir = scratch.path().join(format!("node{i}"));
        nodes.push(NodeProcess::start(&dir, Some(&address))?.0);
    }
    let client = join(scratch.path(), &address).await?;
    let topic = "soak";
    let config = TopicConfig::default()
        .with_partitions(args.partitions)
        .with_replication_factor(3);
    client.create_topic(topic, config).await?;
    wait_for_leaders(&client, topic).await?;
    println!(
        "3 node processes (fsync on), topic {topic}: {} partitions, RF 3, acks all; \
         {} producers sending batches of {} records of {} bytes for {} min",
        args.partitions, args.producers, args.batch_records, args.record_size, args.minutes
    );
    println!(
        "{:>6} {:>10} {:>10} {:>10} {:>10}",
        "minute", "records/s", "node0 MiB", "node1 MiB", "node2 MiB"
    );
    let acked = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(args.minutes * 60.0);
    let mut producers = Vec::new();
    for p in 0..args.producers {
        let producer = client.producer(
            ProducerConfig::default()
                .with_acks(Acks::All)
                .with_linger(Duration::ZERO),
        );
        let (acked, batch, size) = (acked.clone(), args.batch_records, args.record_size);
        producers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                let records: Vec<ProducerRecord> = (0..batch)
                    .map(|i| {
                        ProducerRecord::new(vec![b'x'; size]).with_key(format!("p{p}-{}", i % 16))
                    })
                    .collect();
                if producer.send_batch(topic, records).await.is_ok() {
                    acked.fetch_add(batch as u64, Ordering::Relaxed);
                }
                n += 1;
            }
            n
        }));
    }
    let mut first_minute: Vec<Option<u64>> = Vec::new();
    let mut minute = 0;
    let mut last = (Instant::now(), 0u64);
    while Instant::now() < until {
        let next = last.0 + Duration::from_secs(60);
        tokio::time::sleep_until(next.min(until).into()).await;
        minute += 1;
        let now_acked = acked.load(Ordering::Relaxed);
        let rate = (now_acked - last.1) as f64 / last.0.elapsed().as_secs_f64();
        last = (Instant::now(), now_acked);
        let rss: Vec<Option<u64>> = nodes.iter().map(NodeProcess::rss).collect();
        if minute == 1 {
            first_minute = rss.clone();
        }
        println!(
            "{minute:>6} {rate:>10.0} {:>10} {:>10} {:>10}",
            mib(rss[0]),
            mib(rss[1]),
            mib(rss[2])
        );
    }
    for producer in producers {
        let _ = producer.await;
    }
    let end: Vec<Option<u64>> = nodes.iter().map(NodeProcess::rss).collect();
    println!("{} records acknowledged", acked.load(Ordering::Relaxed));
    for (i, (a, b)) in first_minute.iter().zip(&end).enumerate() {
        let ratio = match (a, b) {
            (Some(a), Some(b)) if *a > 0 => format!("{:.2}", *b as f64 / *a as f64),
            _ => "?".into(),
        };
        println!(
            "node{i}: RSS {} MiB after the first minute, {} MiB at the end: ratio {ratio}",
            mib(*a),
            mib(*b)
        );
    }

    // Restart node 2 on its long log (stopped cleanly, with SIGTERM),
    // beside a fresh node on an empty directory.
    let mut stopped = nodes.pop().ok_or("no node to restart")?;
    let dir = stopped.dir.clone();
    Command::new("kill")
        .args(["-TERM", &stopped.child.id().to_string()])
        .status()?;
    let _ = stopped.child.wait();
    let size = std::fs::metadata(dir.join("meshlog.redb")).map_or(0, |m| m.len());
    println!(
        "node2 stopped (SIGTERM); its database holds {:.0} MiB",
        size as f64 / 1048576.0
    );
    drop(stopped);
    let (restarted, _, opened) = NodeProcess::start(&dir, Some(&address))?;
    let (fresh, _, fresh_opened) = NodeProcess::start(&scratch.path().join("fresh"), None)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "restart on the long log: listening after {opened:?}, RSS {} MiB 3 s later; \
         a fresh node: listening after {fresh_opened:?}, RSS {} MiB",
        mib(restarted.rss()),
        mib(fresh.rss())
    );
    client.shutdown().await;
    Ok(())
}

/// Joins the mesh as a light client and waits until it sees the three nodes.
async fn join(dir: &Path, address: &Multiaddr) -> Result<Node, Box<dyn std::error::Error>> {
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
    while client.live_storage_nodes().await?.len() < 3 {
        if Instant::now() > deadline {
            return Err("the node processes did not form a mesh in 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(client)
}

async fn wait_for_leaders(client: &Node, topic: &str) -> CliResult {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client
        .describe_topic(topic)
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
    Ok(())
}
