//! Target placement: the replicas a partition should have, by rendezvous
//! (highest-random-weight) hashing.
//!
//! Every node scores each (topic, partition) with a hash of the pair and its
//! own identity; the `rf` highest-scoring live storage nodes are the target
//! replica set. Any node computes the same answer from the same membership,
//! and a join or a death moves only the partitions whose top `rf` changed:
//! about `rf × partitions / nodes` replicas, the least possible.

use super::membership::PeerKey;

/// The rendezvous score of `node` for one partition.
pub fn score<P: PeerKey>(topic: &str, partition: u32, node: &P) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(topic.len() as u64).to_le_bytes());
    hasher.update(topic.as_bytes());
    hasher.update(&partition.to_le_bytes());
    hasher.update(&postcard::to_allocvec(node).unwrap_or_default());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// The target replica set of a partition among `nodes`: the `rf` highest
/// scores, best first (fewer when there are fewer nodes).
pub fn target_replicas<P: PeerKey>(topic: &str, partition: u32, nodes: &[P], rf: usize) -> Vec<P> {
    let mut scored: Vec<(u64, &P)> = nodes
        .iter()
        .map(|n| (score(topic, partition, n), n))
        .collect();
    // Highest score first; ties (astronomically rare) broken by node order.
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored
        .into_iter()
        .take(rf)
        .map(|(_, n)| n.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_is_deterministic_and_sized() {
        let nodes: Vec<u32> = (0..10).collect();
        let a = target_replicas("t", 3, &nodes, 3);
        let mut shuffled = nodes.clone();
        shuffled.reverse();
        assert_eq!(a, target_replicas("t", 3, &shuffled, 3));
        assert_eq!(a.len(), 3);
        assert_eq!(target_replicas("t", 3, &nodes[..2], 3).len(), 2);
    }

    #[test]
    fn a_join_moves_only_partitions_the_new_node_takes() {
        let before: Vec<u32> = (0..20).collect();
        let mut after = before.clone();
        after.push(20);
        for p in 0..500 {
            let old = target_replicas("t", p, &before, 3);
            let new = target_replicas("t", p, &after, 3);
            if new.contains(&20) {
                assert_eq!(old.iter().filter(|n| !new.contains(n)).count(), 1);
            } else {
                assert_eq!(old, new, "partition {p} moved without the new node");
            }
        }
    }
}
