//! Replicated partitions between real nodes in one process: real libp2p on
//! 127.0.0.1, real redb files, the real replication driver.

use std::time::Duration;

use meshlog::core::membership::{MembershipConfig, Role};
use meshlog::net::{MeshConfig, Multiaddr};
use meshlog::{Acks, Error, Node, NodeConfig, ProducerConfig, ProducerRecord, TopicConfig};
use tempfile::TempDir;
use tokio::time::Instant;

/// Logs to the test's output, filtered by `RUST_LOG`.
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn timings() -> MembershipConfig {
    MembershipConfig {
        gossip_interval: Duration::from_millis(200),
        suspect_after: Duration::from_secs(2),
        suspicion_timeout: Duration::from_secs(2),
        ..MembershipConfig::default()
    }
}

async fn start(dir: &TempDir, bootstrap: Option<&Multiaddr>, role: Role) -> Node {
    let mut mesh = MeshConfig::loopback().with_role(role);
    mesh.membership = timings();
    mesh.bootstrap.extend(bootstrap.cloned());
    Node::open(
        NodeConfig::default()
            .with_data_dir(dir.path())
            .with_network(mesh),
    )
    .await
    .expect("open node")
}

async fn address(node: &Node) -> Multiaddr {
    let mesh = node.mesh().expect("on the network");
    mesh.wait_listening(Duration::from_secs(10))
        .await
        .expect("listening")
        .into_iter()
        .next()
        .expect("an address within 10 s")
}

/// Waits until `node` sees `count` live storage nodes (itself included).
async fn wait_for_storage_nodes(node: &Node, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let nodes = node.live_storage_nodes().await.expect("members");
        if nodes.len() >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {} storage nodes seen",
            nodes.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three storage nodes that all see each other.
async fn three_nodes(dirs: &[TempDir]) -> Vec<Node> {
    let first = start(&dirs[0], None, Role::Storage).await;
    let addr = address(&first).await;
    let mut nodes = vec![first];
    for dir in &dirs[1..3] {
        nodes.push(start(dir, Some(&addr), Role::Storage).await);
    }
    for node in &nodes {
        wait_for_storage_nodes(node, 3).await;
    }
    nodes
}

/// Waits until every partition of `topic` has a leader that the mesh reports.
async fn wait_for_leaders(node: &Node, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let description = node.describe_topic(topic).await.expect("describe");
        if description.partitions.iter().all(|p| p.leader.is_some()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no leader for every partition: {description:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_sent_with_acks_all_reach_every_replica() {
    init_logs();
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new().unwrap()).collect();
    let nodes = three_nodes(&dirs).await;
    let config = TopicConfig::default()
        .with_partitions(6)
        .with_replication_factor(3);
    nodes[0]
        .create_topic("orders", config)
        .await
        .expect("create");
    wait_for_leaders(&nodes[1], "orders").await;

    let producer = nodes[2].producer(ProducerConfig::default().with_acks(Acks::All));
    let mut sent = Vec::new();
    for i in 0..60u32 {
        let key = format!("key-{}", i % 7);
        let meta = producer
            .send("orders", Some(key.as_bytes()), format!("v{i}").as_bytes())
            .await
            .expect("send with acks all");
        sent.push(meta);
    }

    // Every replica of every partition reaches the same committed offset and head.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut views = Vec::new();
        for node in &nodes {
            let mesh_view = node.describe_topic_here("orders").await.expect("describe");
            views.push(mesh_view);
        }
        let expected: Vec<u64> = (0..6)
            .map(|p| sent.iter().filter(|m| m.partition == p).count() as u64)
            .collect();
        let all_committed = views.iter().all(|v| {
            v.partitions
                .iter()
                .all(|p| p.high_watermark == expected[p.partition as usize])
        });
        let heads_agree = (0..6).all(|p| {
            let heads: Vec<_> = views.iter().map(|v| v.partitions[p].head).collect();
            heads.windows(2).all(|w| w[0] == w[1])
        });
        if all_committed && heads_agree {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas did not converge: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in &nodes {
        node.shutdown().await;
    }
    // Each store holds every acknowledged record at its offset with its ID.
    for dir in &dirs {
        let store = meshlog::store::Store::open(dir.path(), true).expect("reopen store");
        for meta in &sent {
            let read = store
                .read("orders", meta.partition, meta.offset, 1)
                .expect("read");
            let state = store
                .partition_state("orders", meta.partition)
                .expect("state");
            assert!(
                !read.records.is_empty(),
                "no record at {meta:?} in {}: {state:?}",
                dir.path().display()
            );
            assert_eq!(read.records[0].id, meta.id, "record at {meta:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_of_two_replicas_down_acks_all_fails_fast_and_acks_leader_succeeds() {
    init_logs();
    // Two storage nodes: with one down there is nowhere to re-replicate to.
    let dirs: Vec<TempDir> = (0..2).map(|_| TempDir::new().unwrap()).collect();
    let first = start(&dirs[0], None, Role::Storage).await;
    let addr = address(&first).await;
    let nodes = vec![first, start(&dirs[1], Some(&addr), Role::Storage).await];
    for node in &nodes {
        wait_for_storage_nodes(node, 2).await;
    }
    let mut config = TopicConfig::default()
        .with_partitions(1)
        .with_replication_factor(2);
    config.min_insync_replicas = Some(2);
    nodes[0]
        .create_topic("pairs", config)
        .await
        .expect("create");
    wait_for_leaders(&nodes[0], "pairs").await;
    let all = nodes[0].producer(ProducerConfig::default().with_acks(Acks::All));
    all.send("pairs", None, b"both up")
        .await
        .expect("acks all with both replicas");

    // Stop the follower.
    let described = nodes[0].describe_topic("pairs").await.expect("describe");
    let partition = &described.partitions[0];
    let leader = partition.leader.expect("a leader");
    let follower = partition
        .replicas
        .iter()
        .find(|r| **r != leader)
        .copied()
        .expect("a follower");
    let index_of = |id| {
        nodes
            .iter()
            .position(|n| n.peer_id().map(meshlog::net::NodeId::from) == Some(id))
            .expect("a node")
    };
    let (leader_node, follower_node) = (index_of(leader), index_of(follower));
    nodes[follower_node].shutdown().await;
    // Once the leader counts the follower out of sync, acks=all fails at once.
    let via = &nodes[leader_node];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = via.describe_topic_here("pairs").await.expect("describe");
        if view.partitions[0].in_sync == vec![leader] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the follower stays in sync: {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = via.producer(ProducerConfig::default().with_acks(Acks::All));
    let started = Instant::now();
    let refused = all.send("pairs", None, b"needs two").await;
    let took = started.elapsed();
    assert!(
        matches!(
            refused,
            Err(meshlog::Error::NotEnoughReplicas {
                in_sync: 1,
                required: 2,
                ..
            })
        ),
        "{refused:?}"
    );
    // Fast: no wait for the 30 s delivery timeout.
    assert!(took < Duration::from_secs(5), "fails fast, took {took:?}");
    let leader_only = via.producer(ProducerConfig::default().with_acks(Acks::Leader));
    let sent = leader_only
        .send("pairs", None, b"the leader has it")
        .await
        .expect("acks=leader succeeds with one replica");
    assert_eq!(sent.offset, 1);
    for (i, node) in nodes.iter().enumerate() {
        if i != follower_node {
            node.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_takes_over_only_the_partitions_whose_target_changed() {
    init_logs();
    const PARTITIONS: u32 = 12;
    let dirs: Vec<TempDir> = (0..4).map(|_| TempDir::new().unwrap()).collect();
    let mut nodes = three_nodes(&dirs[..3]).await;
    let config = TopicConfig::default()
        .with_partitions(PARTITIONS)
        .with_replication_factor(3);
    nodes[0]
        .create_topic("spread", config)
        .await
        .expect("create");
    wait_for_leaders(&nodes[0], "spread").await;
    let producer = nodes[0].producer(ProducerConfig::default());
    for p in 0..PARTITIONS {
        for i in 0..5 {
            let record = meshlog::ProducerRecord::new(format!("p{p}-{i}")).with_partition(p);
            producer.send_record("spread", record).await.expect("send");
        }
    }
    let before = nodes[0].describe_topic("spread").await.expect("describe");
    let sorted = |mut v: Vec<meshlog::net::NodeId>| {
        v.sort();
        v
    };

    // A fourth storage node joins.
    let addr = address(&nodes[0]).await;
    nodes.push(start(&dirs[3], Some(&addr), Role::Storage).await);
    for node in &nodes {
        wait_for_storage_nodes(node, 4).await;
    }
    let all: Vec<meshlog::net::NodeId> = nodes
        .iter()
        .map(|n| meshlog::net::NodeId::from(n.peer_id().expect("on the network")))
        .collect();
    let expected_moves = (0..PARTITIONS)
        .filter(|p| {
            let target = meshlog::core::placement::target_replicas("spread", *p, &all, 3);
            sorted(target) != sorted(before.partitions[*p as usize].replicas.clone())
        })
        .count();

    // Every partition's actual replica set reaches its target.
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let view = nodes[0].describe_topic("spread").await.expect("describe");
        let settled = view.partitions.iter().all(|p| {
            let target = meshlog::core::placement::target_replicas("spread", p.partition, &all, 3);
            p.learners.is_empty() && sorted(p.replicas.clone()) == sorted(target)
        });
        if settled {
            break view;
        }
        assert!(
            Instant::now() < deadline,
            "replica sets did not reach their targets: {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let moved: Vec<u32> = (0..PARTITIONS)
        .filter(|p| {
            sorted(after.partitions[*p as usize].replicas.clone())
                != sorted(before.partitions[*p as usize].replicas.clone())
        })
        .collect();
    println!(
        "a fourth node joined: {} of {PARTITIONS} partitions moved, {expected_moves} expected",
        moved.len()
    );
    assert_eq!(moved.len(), expected_moves);
    // The new node holds every moved partition's committed log.
    let newcomer = nodes[3]
        .describe_topic_here("spread")
        .await
        .expect("describe");
    for p in &moved {
        let leader_view = &after.partitions[*p as usize];
        let mine = &newcomer.partitions[*p as usize];
        assert_eq!(mine.high_watermark, 5, "partition {p} on the new node");
        assert_eq!(mine.head, leader_view.head, "partition {p} on the new node");
    }
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_name_get_one_answer_and_late_joiners_learn_it() {
    init_logs();
    let dirs: Vec<TempDir> = (0..4).map(|_| TempDir::new().unwrap()).collect();
    let mut nodes = three_nodes(&dirs[..3]).await;
    let two = TopicConfig::default()
        .with_partitions(2)
        .with_replication_factor(3);
    let four = TopicConfig::default()
        .with_partitions(4)
        .with_replication_factor(3);
    let (a, b) = tokio::join!(
        nodes[0].create_topic("contested", two.clone()),
        nodes[1].create_topic("contested", four.clone())
    );
    let winner = match (&a, &b) {
        (Ok(_), Err(Error::TopicExists(_))) => two,
        (Err(Error::TopicExists(_)), Ok(_)) => four,
        other => panic!("exactly one create must win: {other:?}"),
    };
    // Every storage node applied the same, single answer.
    let deadline = Instant::now() + Duration::from_secs(20);
    for node in &nodes {
        loop {
            match node.describe_topic_here("contested").await {
                Ok(view) => {
                    assert_eq!(view.config, winner);
                    break;
                }
                Err(_) => {
                    assert!(Instant::now() < deadline, "a node never applied the create");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    // A node that joins later receives the metadata log and applies it.
    let addr = address(&nodes[0]).await;
    nodes.push(start(&dirs[3], Some(&addr), Role::Storage).await);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(view) = nodes[3].describe_topic_here("contested").await {
            assert_eq!(view.config, winner);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the late joiner never learned the topic"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !nodes[3]
            .list_topics()
            .await
            .expect("list")
            .contains(&"__meta".to_string()),
        "internal topics are not listed"
    );
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_meshes_refuse_each_other_instead_of_merging() {
    init_logs();
    let (dir_a, dir_b) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let a = start(&dir_a, None, Role::Storage).await;
    let b = start(&dir_b, None, Role::Storage).await;
    let one = TopicConfig::default().with_replication_factor(1);
    a.create_topic("only-in-a", one.clone())
        .await
        .expect("mesh A founded");
    b.create_topic("only-in-b", one)
        .await
        .expect("mesh B founded");
    b.shutdown().await;

    // B comes back pointed at A: each refuses the other.
    let mut events = a.mesh().expect("on the network").subscribe();
    let addr = address(&a).await;
    let b = start(&dir_b, Some(&addr), Role::Storage).await;
    let b_id = meshlog::net::NodeId::from(b.peer_id().expect("on the network"));
    let refused = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match events.recv().await {
                Ok(meshlog::core::membership::MembershipEvent::ForeignMesh { peer, .. })
                    if peer == b_id =>
                {
                    return true;
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    assert_eq!(refused, Ok(true), "A refuses B's mesh");
    // Neither counts the other as a storage node, and their topics stay apart.
    assert_eq!(a.live_storage_nodes().await.expect("members").len(), 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.live_storage_nodes().await.expect("members").len() != 1 {
        assert!(Instant::now() < deadline, "B never refused A");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        a.list_topics().await.expect("list"),
        vec!["only-in-a".to_string()]
    );
    assert_eq!(
        b.list_topics().await.expect("list"),
        vec!["only-in-b".to_string()]
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_dedup_key_is_stored_once_and_answered_with_the_original() {
    init_logs();
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new().unwrap()).collect();
    let nodes = three_nodes(&dirs).await;
    let config = TopicConfig::default()
        .with_partitions(2)
        .with_replication_factor(3);
    nodes[0]
        .create_topic("payments", config)
        .await
        .expect("create");
    wait_for_leaders(&nodes[1], "payments").await;
    let record = |i: usize| {
        ProducerRecord::new(format!("payment {i}"))
            .with_key(format!("account-{}", i % 3))
            .with_dedup_key(format!("pay-{i}"))
    };

    // The first application instance sends 20 payments.
    let first = nodes[1].producer(ProducerConfig::default());
    let originals = first
        .send_batch("payments", (0..20).map(record).collect())
        .await
        .expect("first send");
    // Another instance (a restart, a second sender) sends them again with 5
    // new ones, in one batch call: the 20 are answered with the originals.
    let second = nodes[2].producer(ProducerConfig::default());
    let again = second
        .send_batch("payments", (0..25).map(record).collect())
        .await
        .expect("second send");
    assert_eq!(
        &again[..20],
        &originals[..],
        "repeats answered with the originals"
    );
    for meta in &again[20..] {
        assert!(
            !originals
                .iter()
                .any(|o| (o.partition, o.offset) == (meta.partition, meta.offset)),
            "new payments get new offsets: {meta:?}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = nodes[0].describe_topic("payments").await.expect("describe");
        let stored: u64 = view.partitions.iter().map(|p| p.high_watermark).sum();
        if stored == 25 {
            break;
        }
        assert!(stored <= 25, "duplicates were stored: {stored} records");
        assert!(Instant::now() < deadline, "only {stored} of 25 committed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_with_fetch_from_nearest_on_a_follower_reads_every_record_in_order() {
    init_logs();
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new().unwrap()).collect();
    let nodes = three_nodes(&dirs).await;
    let config = TopicConfig::default()
        .with_partitions(1)
        .with_replication_factor(3);
    nodes[0].create_topic("near", config).await.expect("create");
    wait_for_leaders(&nodes[0], "near").await;
    let leader = nodes[0]
        .describe_topic("near")
        .await
        .expect("describe")
        .partitions[0]
        .leader
        .expect("a leader");
    let follower = nodes
        .iter()
        .position(|n| n.peer_id().map(meshlog::net::NodeId::from) != Some(leader))
        .expect("a follower");

    let mut consumer_config =
        meshlog::ConsumerConfig::default().with_auto_offset_reset(meshlog::OffsetReset::Earliest);
    consumer_config.fetch_from_nearest = true;
    let mut consumer = nodes[follower].consumer(consumer_config).expect("consumer");
    consumer.subscribe(&["near"]).expect("subscribe");
    // The first records are there before it polls; the rest arrive while it
    // waits at its own replica (a long poll woken by the follower's commit point).
    let producer =
        nodes[(follower + 1) % 3].producer(ProducerConfig::default().with_acks(Acks::All));
    let mut sent = Vec::new();
    for i in 0..40u32 {
        let meta = producer
            .send("near", None, format!("v{i}").as_bytes())
            .await
            .expect("send");
        sent.push((meta.offset, meta.id));
    }
    let more = {
        let producer = producer.clone();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in 40..80u32 {
                let meta = producer
                    .send("near", None, format!("v{i}").as_bytes())
                    .await
                    .expect("send");
                sent.push((meta.offset, meta.id));
            }
            sent
        })
    };
    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.len() < 80 {
        assert!(Instant::now() < deadline, "read {} of 80", received.len());
        let records = consumer
            .poll(Duration::from_millis(500))
            .await
            .expect("poll");
        received.extend(records.iter().map(|r| (r.offset, r.id)));
    }
    sent.extend(more.await.expect("the producer task"));
    assert_eq!(received, sent, "every record, in offset order, with its ID");
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_log_is_compacted_and_a_restarted_follower_catches_up_from_the_leaders_store() {
    init_logs();
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new().unwrap()).collect();
    let mut nodes = three_nodes(&dirs).await;
    let config = TopicConfig::default()
        .with_partitions(1)
        .with_replication_factor(3);
    nodes[0].create_topic("long", config).await.expect("create");
    wait_for_leaders(&nodes[0], "long").await;
    // One record per send and no linger: one log entry each.
    let send_many = |node: &Node, from: u32, count: u32| {
        let producer = node.producer(
            ProducerConfig::default()
                .with_acks(Acks::All)
                .with_linger(Duration::ZERO),
        );
        async move {
            let mut sent = Vec::new();
            for i in from..from + count {
                let meta = producer
                    .send("long", None, format!("v{i}").as_bytes())
                    .await
                    .expect("send with acks all");
                sent.push(meta);
            }
            sent
        }
    };
    let mut sent = send_many(&nodes[0], 0, 300).await;

    // Stop a follower; the others go on far past what they keep in memory.
    let leader = nodes[0]
        .describe_topic("long")
        .await
        .expect("describe")
        .partitions[0]
        .leader
        .expect("a leader");
    let stopped = (0..3)
        .find(|i| nodes[*i].peer_id().map(meshlog::net::NodeId::from) != Some(leader))
        .expect("a follower");
    let live = (0..3).find(|i| *i != stopped).expect("a live node");
    nodes[stopped].shutdown().await;
    sent.extend(send_many(&nodes[live], 300, 400).await);

    // Restarted, it reads its log's tail and is sent the entries the leader
    // no longer holds in memory from the leader's store.
    let bootstrap = address(&nodes[live]).await;
    nodes[stopped] = start(&dirs[stopped], Some(&bootstrap), Role::Storage).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut views = Vec::new();
        for node in &nodes {
            views.push(node.describe_topic_here("long").await.expect("describe"));
        }
        let caught_up = views.iter().all(|v| {
            v.partitions[0].high_watermark == 700
                && v.partitions[0].head == views[0].partitions[0].head
        });
        if caught_up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted follower did not catch up: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in &nodes {
        node.shutdown().await;
    }
    for dir in &dirs {
        let store = meshlog::store::Store::open(dir.path(), true).expect("reopen store");
        let log = store.replica_log("long", 0).expect("the replica's log");
        let point = log.snapshot.as_ref().expect("a snapshot point is stored");
        assert!(
            point.snapshot.index > 500,
            "compacted up to entry {} of about 700",
            point.snapshot.index
        );
        assert!(
            log.entries.len() < 200,
            "a restart reads {} entries, not the whole log",
            log.entries.len()
        );
        for meta in &sent {
            let read = store.read("long", 0, meta.offset, 1).expect("read");
            assert_eq!(
                read.records.first().map(|r| r.id),
                Some(meta.id),
                "{meta:?}"
            );
        }
    }
}
