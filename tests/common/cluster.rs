//! A three-node cluster of `meshlog node` processes on 127.0.0.1 and a light
//! client in the test process, for the tests that kill and restart nodes.

use std::path::Path;
use std::str::FromStr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use meshlog::core::membership::Role;
use meshlog::net::{MeshConfig, Multiaddr, NodeId, PeerId};
use meshlog::{Node, NodeConfig, TopicConfig};

use super::{Line, NodeProcess};

pub fn node_args() -> Vec<String> {
    [
        "--gossip-interval-ms",
        "200",
        "--suspect-after-ms",
        "1500",
        "--suspicion-timeout-ms",
        "2000",
    ]
    .map(String::from)
    .to_vec()
}

pub fn spawn(
    index: usize,
    dir: &Path,
    bootstrap: Option<&str>,
    lines: &mpsc::Sender<Line>,
) -> NodeProcess {
    super::spawn_node(index, dir, bootstrap, lines, &node_args())
}

pub fn node_id(process: &NodeProcess) -> NodeId {
    NodeId::from(PeerId::from_str(&process.peer_id).expect("a peer id"))
}

/// A light client in the test process, joined through `bootstrap`.
pub async fn client(dir: &Path, bootstrap: &str) -> Node {
    let mut mesh = MeshConfig::loopback().with_role(Role::LightClient);
    mesh.membership.gossip_interval = Duration::from_millis(200);
    mesh.bootstrap
        .push(Multiaddr::from_str(bootstrap).expect("a multiaddr"));
    Node::open(NodeConfig::default().with_data_dir(dir).with_network(mesh))
        .await
        .expect("open the client")
}

/// Re-checks `condition` every 50 ms until it holds, or fails after `within`.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three node processes and a light client that sees them all.
pub async fn start_cluster(
    dirs: &[tempfile::TempDir],
    tx: &mpsc::Sender<Line>,
) -> (Vec<Option<NodeProcess>>, Vec<NodeId>, Node) {
    let paths: Vec<&Path> = dirs.iter().map(|d| d.path()).collect();
    start_cluster_at(&paths, tx).await
}

/// Three node processes on `dirs[0..3]` and a light client on `dirs[3]`
/// that sees them all.
pub async fn start_cluster_at(
    dirs: &[&Path],
    tx: &mpsc::Sender<Line>,
) -> (Vec<Option<NodeProcess>>, Vec<NodeId>, Node) {
    let first = spawn(0, dirs[0], None, tx);
    let bootstrap = first.address.clone();
    let nodes = vec![
        Some(first),
        Some(spawn(1, dirs[1], Some(&bootstrap), tx)),
        Some(spawn(2, dirs[2], Some(&bootstrap), tx)),
    ];
    let ids: Vec<NodeId> = nodes.iter().flatten().map(node_id).collect();
    let client = client(dirs[3], &bootstrap).await;
    wait_until(
        "the client sees 3 storage nodes",
        Duration::from_secs(30),
        || async { client.live_storage_nodes().await.map_or(0, |n| n.len()) == 3 },
    )
    .await;
    (nodes, ids, client)
}

/// Creates `topic` with RF 3 and waits until every partition has a leader.
pub async fn create_replicated(client: &Node, topic: &str, partitions: u32) {
    let config = TopicConfig::default()
        .with_partitions(partitions)
        .with_replication_factor(3);
    client
        .create_topic(topic, config)
        .await
        .expect("create the topic");
    wait_until(
        "every partition has a leader",
        Duration::from_secs(30),
        || async {
            client
                .describe_topic(topic)
                .await
                .is_ok_and(|t| t.partitions.iter().all(|p| p.leader.is_some()))
        },
    )
    .await;
}

pub fn signal(process: &NodeProcess, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &process.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal}");
}

/// Stops every node cleanly and opens each one's store.
pub async fn stop_all(client: Node, nodes: &mut [Option<NodeProcess>]) {
    client.shutdown().await;
    for process in nodes.iter_mut().flatten() {
        super::sigterm(&process.child);
        let status = super::wait_exit(&mut process.child, Duration::from_secs(20));
        assert!(status.success(), "clean exit, got {status}");
    }
}

/// Waits (up to 60 s) until every replica reports the same high watermark and
/// head for each of `partitions`, and at least `ends` (the acknowledged end
/// per partition).
pub async fn wait_for_agreement(
    client: &Node,
    ids: &[NodeId],
    topic: &str,
    partitions: u32,
    ends: &std::collections::BTreeMap<u32, u64>,
) {
    wait_until("all replicas agree", Duration::from_secs(60), || async {
        let mut views = Vec::new();
        for id in ids {
            match client.describe_topic_at(*id, topic).await {
                Ok(view) => views.push(view),
                Err(_) => return false,
            }
        }
        (0..partitions as usize).all(|p| {
            let first = &views[0].partitions[p];
            first.high_watermark >= ends.get(&(p as u32)).copied().unwrap_or(0)
                && views.iter().all(|v| {
                    v.partitions[p].high_watermark == first.high_watermark
                        && v.partitions[p].head == first.head
                })
        })
    })
    .await;
}

/// Every committed record of a partition in one store, in offset order
/// from its log start.
pub fn read_all(
    store: &meshlog::store::Store,
    topic: &str,
    partition: u32,
) -> Vec<meshlog::ConsumerRecord> {
    let mut out = Vec::new();
    let mut offset = store
        .partition_state(topic, partition)
        .expect("partition state")
        .log_start_offset;
    loop {
        let read = store.read(topic, partition, offset, 1 << 20).expect("read");
        let Some(last) = read.records.last() else {
            return out;
        };
        offset = last.offset + 1;
        out.extend(read.records);
    }
}
