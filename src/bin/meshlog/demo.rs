//! `meshlog demo`: the Kafka quick-start on a real local mesh.
//!
//! Starts three storage nodes in this process, on 127.0.0.1 with their own
//! data directories in a temporary directory; creates topic `test` with 3
//! partitions and replication factor 3; sends 100 records keyed `message_i`
//! with `Acks::All`; reads them back as a consumer group; stops one node; and
//! shows that every record is still readable and that the live replicas of
//! each partition agree on the chain head.
//!
//! Replication factor 3, not 2: quorums are majorities, so a partition with
//! two replicas cannot elect a new leader when one of them is gone.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use meshlog::net::{MeshConfig, Multiaddr, NodeId};
use meshlog::{Acks, ConsumerConfig, Node, NodeConfig, OffsetReset, ProducerConfig, TopicConfig};

use crate::CliResult;

const TOPIC: &str = "test";
const PARTITIONS: u32 = 3;
const REPLICATION_FACTOR: u16 = 3;
const RECORDS: usize = 100;
/// How long the demo waits for the mesh at each step before giving up.
const PATIENCE: Duration = Duration::from_secs(30);

/// Runs the demo in a temporary directory that is removed at the end.
pub async fn run() -> CliResult {
    let dir = tempfile::Builder::new().prefix("meshlog-demo-").tempdir()?;
    println!(
        "== meshlog demo: three nodes on 127.0.0.1, data in {}\n",
        dir.path().display()
    );
    let nodes = start_mesh(dir.path()).await?;
    let names = ["a", "b", "c"];
    for (name, node) in names.iter().zip(&nodes) {
        println!("  node {name}: {}", peer(node));
    }

    let config = TopicConfig::default()
        .with_partitions(PARTITIONS)
        .with_replication_factor(REPLICATION_FACTOR);
    nodes[0].create_topic(TOPIC, config).await?;
    println!(
        "\nCreated topic '{TOPIC}': {PARTITIONS} partitions, replication factor {REPLICATION_FACTOR}."
    );
    print_placement(&nodes[0], &nodes, &names).await?;

    println!(
        "\nSending {RECORDS} records keyed message_i with acks=all (each on a quorum of replicas, fsync'd):"
    );
    println!(
        "  {:<6} {:<11} {:>9} {:>6}  id",
        "topic", "key", "partition", "offset"
    );
    let producer = nodes[0].producer(ProducerConfig::default().with_acks(Acks::All));
    for i in 0..RECORDS {
        let key = format!("message_{i}");
        let m = producer
            .send(TOPIC, Some(key.as_bytes()), format!("hello {i}").as_bytes())
            .await?;
        println!(
            "  {:<6} {:<11} {:>9} {:>6}  {}",
            m.topic, key, m.partition, m.offset, m.id
        );
    }

    let read = consume_all(&nodes[1], "demo").await?;
    println!("\nRead back on node b as group 'demo', fetched from the replicas:");
    print_counts(&read);
    check(
        total(&read) == RECORDS,
        format!("read {} of {RECORDS}", total(&read)),
    )?;

    let mut nodes = nodes;
    let stopped = nodes.pop().ok_or("no node to stop")?;
    let stopped_id = peer(&stopped);
    stopped.shutdown().await;
    println!("\nStopped node c ({stopped_id}).");

    let read = consume_all(&nodes[0], "after-stop").await?;
    println!("Read everything again on node a, without node c:");
    print_counts(&read);
    check(
        total(&read) == RECORDS,
        format!("read {} of {RECORDS} after stopping a node", total(&read)),
    )?;
    agree_on_heads(&nodes, &names).await?;
    for node in &nodes {
        node.shutdown().await;
    }

    println!(
        "\n== All {RECORDS} records were replicated, survived the loss of a node, and the replicas agree."
    );
    println!("\nTry it yourself (each in its own terminal):");
    println!(
        "  meshlog node --data-dir a --listen /ip4/127.0.0.1/tcp/4001        # prints its address A"
    );
    println!("  meshlog node --data-dir b --listen /ip4/127.0.0.1/tcp/4002 --bootstrap A");
    println!("  meshlog node --data-dir c --listen /ip4/127.0.0.1/tcp/4003 --bootstrap A");
    println!(
        "  meshlog --bootstrap-server A topic create test --partitions 3 --replication-factor 3"
    );
    println!(
        "  printf 'a\\nb\\nc\\n' | meshlog --bootstrap-server A produce test --acks all --print-metadata"
    );
    println!("  meshlog --bootstrap-server A consume test --from-beginning --max-messages 3");
    println!("  meshlog --bootstrap-server A topic describe test");
    Ok(())
}

/// Starts three storage nodes: `a` founds the mesh, `b` and `c` join through it.
async fn start_mesh(dir: &Path) -> Result<Vec<Node>, Box<dyn std::error::Error>> {
    let first = open_node(&dir.join("a"), None).await?;
    let address = first
        .mesh()
        .ok_or("node a is not on the network")?
        .wait_listening(PATIENCE)
        .await?
        .into_iter()
        .next()
        .ok_or("node a does not listen")?;
    let mut nodes = vec![first];
    for name in ["b", "c"] {
        nodes.push(open_node(&dir.join(name), Some(address.clone())).await?);
    }
    let deadline = Instant::now() + PATIENCE;
    for node in &nodes {
        while node.live_storage_nodes().await?.len() < nodes.len() {
            check(
                Instant::now() < deadline,
                "the nodes did not find each other".into(),
            )?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(nodes)
}

async fn open_node(dir: &Path, bootstrap: Option<Multiaddr>) -> meshlog::Result<Node> {
    let mut mesh = MeshConfig::loopback();
    mesh.bootstrap.extend(bootstrap);
    mesh.membership.gossip_interval = Duration::from_millis(200);
    Node::open(NodeConfig::default().with_data_dir(dir).with_network(mesh)).await
}

fn peer(node: &Node) -> String {
    node.peer_id().map_or_else(|| "?".into(), |p| p.to_string())
}

fn name_of(id: &NodeId, nodes: &[Node], names: &[&str]) -> String {
    nodes
        .iter()
        .position(|n| n.peer_id().map(NodeId::from) == Some(*id))
        .and_then(|i| names.get(i))
        .map_or_else(|| "?".into(), |n| (*n).to_string())
}

/// Shows where each partition's replicas are, once every partition has a leader.
async fn print_placement(node: &Node, nodes: &[Node], names: &[&str]) -> CliResult {
    let deadline = Instant::now() + PATIENCE;
    let description = loop {
        let d = node.describe_topic(TOPIC).await?;
        if d.partitions.iter().all(|p| p.leader.is_some()) {
            break d;
        }
        check(Instant::now() < deadline, "no leader was elected".into())?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for p in &description.partitions {
        let replicas: Vec<String> = p
            .replicas
            .iter()
            .map(|r| name_of(r, nodes, names))
            .collect();
        let leader = p
            .leader
            .map_or_else(|| "?".into(), |l| name_of(&l, nodes, names));
        println!(
            "  partition {}: replicas on {}, leader {leader} (epoch {})",
            p.partition,
            replicas.join(", "),
            p.epoch
        );
    }
    Ok(())
}

/// Reads every record of the topic from the beginning as `group`.
async fn consume_all(
    node: &Node,
    group: &str,
) -> Result<BTreeMap<u32, usize>, Box<dyn std::error::Error>> {
    let config = ConsumerConfig::default()
        .with_group_id(group)
        .with_auto_offset_reset(OffsetReset::Earliest);
    let mut consumer = node.consumer(config)?;
    consumer.subscribe(&[TOPIC])?;
    let mut per_partition = BTreeMap::new();
    let deadline = Instant::now() + PATIENCE;
    while total(&per_partition) < RECORDS && Instant::now() < deadline {
        for r in consumer.poll(Duration::from_secs(1)).await? {
            *per_partition.entry(r.partition).or_insert(0) += 1;
        }
    }
    consumer.commit().await?;
    Ok(per_partition)
}

fn total(counts: &BTreeMap<u32, usize>) -> usize {
    counts.values().sum()
}

fn print_counts(counts: &BTreeMap<u32, usize>) {
    for (partition, count) in counts {
        println!("  partition {partition}: {count} records");
    }
}

/// Waits until the live replicas of every partition report the same
/// committed offset and chain head, and prints them.
async fn agree_on_heads(nodes: &[Node], names: &[&str]) -> CliResult {
    println!("Committed offset and chain head on each live replica:");
    let deadline = Instant::now() + PATIENCE;
    // A node's view of a partition it holds: its replica's own state.
    let holds = |node: &Node, d: &meshlog::PartitionDescription| {
        node.peer_id()
            .is_some_and(|id| d.replicas.contains(&NodeId::from(id)))
    };
    let views = loop {
        let mut views = Vec::new();
        for node in nodes {
            views.push(node.describe_topic_here(TOPIC).await?);
        }
        let agree = (0..PARTITIONS as usize).all(|p| {
            let mut seen = views
                .iter()
                .zip(nodes)
                .map(|(v, node)| (&v.partitions[p], node))
                .filter(|(d, node)| holds(node, d))
                .map(|(d, _)| (d.high_watermark, d.head));
            let first = seen.next();
            first.is_some() && seen.all(|s| Some(s) == first)
        });
        if agree {
            break views;
        }
        check(
            Instant::now() < deadline,
            "the replicas do not agree".into(),
        )?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for p in 0..PARTITIONS as usize {
        let holders: Vec<String> = views
            .iter()
            .zip(names)
            .zip(nodes)
            .filter(|((v, _), node)| holds(node, &v.partitions[p]))
            .map(|((v, name), _)| {
                let d = &v.partitions[p];
                format!("{name}: {} records, head {}", d.high_watermark, d.head)
            })
            .collect();
        println!("  partition {p}: {}", holders.join("   "));
    }
    Ok(())
}

fn check(ok: bool, failure: String) -> CliResult {
    if ok { Ok(()) } else { Err(failure.into()) }
}
