//! Where each hosted partition's readable records end, as its replica knows
//! it now.
//!
//! A record is readable once it is committed (a quorum holds it durably)
//! and durable in this node's store, as the replica learns both: readers
//! see it then, without waiting for the stored high watermark, which is
//! written after the commit and only serves restarts (Raft's commit index is
//! not persisted either). The replication task raises the ends after every
//! step of a replica; fetches read up to them and wait on [`Readable::moved`].

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

use super::Key;

/// The readable end of each hosted partition, shared by the replication
/// task (which raises them) and fetches (which read up to them).
pub(crate) struct Readable {
    ends: Mutex<HashMap<Key, u64>>,
    moved: watch::Sender<u64>,
}

impl Readable {
    /// No partition known yet.
    pub fn new() -> Self {
        Readable {
            ends: Mutex::new(HashMap::new()),
            moved: watch::channel(0).0,
        }
    }

    /// Raises `key`'s readable end to `end` (one past the last readable
    /// record offset); a lower `end` changes nothing. Wakes waiting fetches
    /// when it moves.
    pub fn raise(&self, key: &Key, end: u64) {
        let raised = match self.ends.lock() {
            Ok(mut ends) => match ends.get_mut(key) {
                Some(known) if *known >= end => false,
                Some(known) => {
                    *known = end;
                    true
                }
                None => {
                    ends.insert(key.clone(), end);
                    true
                }
            },
            Err(_) => false,
        };
        if raised {
            self.moved.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Forgets `key` (its replica closed: a topic created again under the
    /// same name starts from nothing).
    pub fn forget(&self, key: &Key) {
        if let Ok(mut ends) = self.ends.lock() {
            ends.remove(key);
        }
    }

    /// `key`'s readable end as known now (0 when unknown: the stored high
    /// watermark then bounds reads alone).
    pub fn end(&self, key: &Key) -> u64 {
        self.ends
            .lock()
            .ok()
            .and_then(|ends| ends.get(key).copied())
            .unwrap_or(0)
    }

    /// Changes whenever a readable end moves.
    pub fn moved(&self) -> watch::Receiver<u64> {
        self.moved.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_only_rise_and_wake_waiters_when_they_do() {
        let readable = Readable::new();
        let key: Key = ("t".into(), 0);
        let mut moved = readable.moved();
        assert_eq!(readable.end(&key), 0);
        readable.raise(&key, 5);
        assert!(moved.has_changed().unwrap_or(false));
        moved.borrow_and_update();
        readable.raise(&key, 3);
        assert_eq!(readable.end(&key), 5, "never lowered");
        assert!(
            !moved.has_changed().unwrap_or(true),
            "no wake without a move"
        );
        readable.forget(&key);
        assert_eq!(readable.end(&key), 0);
    }
}
