//! Who leads which partition, as gossiped: a table of ownership records
//! merged by epoch.
//!
//! Each leader announces, for every partition it leads, an
//! [`OwnershipRecord`]: its epoch, itself, the replica set, the committed
//! offset and the chain head there. Every node keeps, per partition, the
//! record of the highest epoch it has heard of and routes requests by it.
//! The table only *suggests*: authority stays in each partition's quorum
//! (epoch fencing), and a stale route is answered with `NotLeader { hint }`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::membership::PeerKey;
use crate::chain::MessageId;

/// A leader's announcement for one partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnershipRecord<P> {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The leader's epoch.
    pub epoch: u64,
    /// The leader.
    pub leader: P,
    /// The voters of the replica set.
    pub replicas: Vec<P>,
    /// One past the last committed offset.
    pub committed: u64,
    /// The chain ID of the last committed record.
    pub head: MessageId,
}

/// The highest-epoch record known per partition.
#[derive(Clone, Debug, Default)]
pub struct OwnershipTable<P> {
    records: BTreeMap<(String, u32), OwnershipRecord<P>>,
}

impl<P: PeerKey> OwnershipTable<P> {
    /// An empty table.
    pub fn new() -> Self {
        OwnershipTable {
            records: BTreeMap::new(),
        }
    }

    /// Merges one record: a higher epoch replaces what is known; within one
    /// epoch (one leader, by fencing) a higher committed offset does. Returns
    /// whether the table changed.
    pub fn merge(&mut self, record: OwnershipRecord<P>) -> bool {
        let key = (record.topic.clone(), record.partition);
        let newer = match self.records.get(&key) {
            None => true,
            Some(known) => (record.epoch, record.committed) > (known.epoch, known.committed),
        };
        if newer {
            self.records.insert(key, record);
        }
        newer
    }

    /// The leader of a partition, as last heard.
    pub fn leader(&self, topic: &str, partition: u32) -> Option<&P> {
        self.records
            .get(&(topic.to_string(), partition))
            .map(|r| &r.leader)
    }

    /// The record of a partition, as last heard.
    pub fn get(&self, topic: &str, partition: u32) -> Option<&OwnershipRecord<P>> {
        self.records.get(&(topic.to_string(), partition))
    }

    /// Forgets every partition of a topic (it was deleted).
    pub fn forget_topic(&mut self, topic: &str) {
        self.records.retain(|(t, _), _| t != topic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(epoch: u64, leader: u32, committed: u64) -> OwnershipRecord<u32> {
        OwnershipRecord {
            topic: "t".into(),
            partition: 0,
            epoch,
            leader,
            replicas: vec![1, 2, 3],
            committed,
            head: MessageId([0; 32]),
        }
    }

    #[test]
    fn the_highest_epoch_wins_whatever_the_order_of_arrival() {
        let records = [record(3, 2, 10), record(5, 1, 4), record(4, 3, 20)];
        let mut forward = OwnershipTable::new();
        let mut backward = OwnershipTable::new();
        for r in &records {
            forward.merge(r.clone());
        }
        for r in records.iter().rev() {
            backward.merge(r.clone());
        }
        assert_eq!(forward.leader("t", 0), Some(&1));
        assert_eq!(backward.leader("t", 0), Some(&1));
        assert!(
            !forward.merge(record(4, 3, 99)),
            "an older epoch never replaces a newer one"
        );
    }

    #[test]
    fn within_an_epoch_the_later_commit_point_wins() {
        let mut table = OwnershipTable::new();
        table.merge(record(2, 1, 5));
        assert!(table.merge(record(2, 1, 9)));
        assert!(!table.merge(record(2, 1, 7)));
        assert_eq!(table.get("t", 0).map(|r| r.committed), Some(9));
        table.forget_topic("t");
        assert_eq!(table.leader("t", 0), None);
    }
}
