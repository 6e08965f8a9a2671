//! Real libp2p meshes in one process, on 127.0.0.1 with ephemeral ports.

use std::time::Duration;

use meshlog::core::membership::{MembershipConfig, Role, Status};
use meshlog::net::{Keypair, Mesh, MeshConfig, Multiaddr, NodeId};
use tokio::time::Instant;

/// Gossip timings for tests: fast rounds, generous failure detection.
fn test_timings() -> MembershipConfig {
    MembershipConfig {
        gossip_interval: Duration::from_millis(200),
        suspect_after: Duration::from_secs(3),
        suspicion_timeout: Duration::from_secs(3),
        ..MembershipConfig::default()
    }
}

async fn start(bootstrap: Option<&Multiaddr>, role: Role) -> Mesh {
    let mut config = MeshConfig::loopback().with_role(role);
    config.membership = test_timings();
    config.bootstrap.extend(bootstrap.cloned());
    Mesh::start(Keypair::generate_ed25519(), config, None)
        .await
        .expect("start mesh")
}

async fn address_of(mesh: &Mesh) -> Multiaddr {
    let addrs = mesh
        .wait_listening(Duration::from_secs(10))
        .await
        .expect("listening");
    addrs
        .into_iter()
        .next()
        .expect("a listen address within 10 s")
}

/// Whether `mesh` sees every peer in `expected` alive with metadata.
async fn sees_all(mesh: &Mesh, expected: &[NodeId]) -> bool {
    let members = mesh.members().await.expect("members");
    expected
        .iter()
        .filter(|p| p.0 != mesh.peer_id())
        .all(|peer| {
            members
                .iter()
                .any(|m| m.peer == *peer && m.status == Status::Alive && m.meta.is_some())
        })
}

/// Re-checks until every mesh sees all the others, or fails at the deadline.
async fn wait_for_full_membership(meshes: &[Mesh], deadline: Duration) -> Duration {
    let started = Instant::now();
    let ids: Vec<NodeId> = meshes.iter().map(|m| NodeId(m.peer_id())).collect();
    loop {
        let mut all = true;
        for mesh in meshes {
            if !sees_all(mesh, &ids).await {
                all = false;
                break;
            }
        }
        if all {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < deadline,
            "no full membership after {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_that_each_know_one_bootstrap_see_each_other() {
    let mut meshes = vec![start(None, Role::Storage).await];
    for i in 1..5 {
        // Each node knows only the address of the node started before it.
        let bootstrap = address_of(&meshes[i - 1]).await;
        meshes.push(start(Some(&bootstrap), Role::Storage).await);
    }
    let took = wait_for_full_membership(&meshes, Duration::from_secs(30)).await;
    println!("5 nodes converged in {took:?}");
    for mesh in &meshes {
        let members = mesh.members().await.unwrap();
        assert_eq!(members.len(), 4);
        assert!(members.iter().all(|m| {
            m.meta
                .as_ref()
                .is_some_and(|meta| meta.role == Role::Storage && !meta.listen_addrs.is_empty())
        }));
        mesh.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_light_client_lists_the_members_without_becoming_one() {
    let storage = start(None, Role::Storage).await;
    let bootstrap = address_of(&storage).await;
    let client = start(Some(&bootstrap), Role::LightClient).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .members()
        .await
        .unwrap()
        .iter()
        .all(|m| m.status != Status::Alive)
    {
        assert!(
            Instant::now() < deadline,
            "the light client never heard from the storage node"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = client.members().await.unwrap();
    assert_eq!(
        seen.iter().map(|m| m.peer.0).collect::<Vec<_>>(),
        vec![storage.peer_id()]
    );
    // The storage node has handled the client's gossip (the client holds its
    // reply), and did not make the client a member.
    assert!(
        storage
            .members()
            .await
            .unwrap()
            .iter()
            .all(|m| m.peer.0 != client.peer_id())
    );
}
