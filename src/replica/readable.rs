//! Where each hosted partition's readable records end, as its replica knows
//! it now.
//!
//! A record is readable once it is committed (a quorum holds it durably)
//! and durable in this node's store, as the replica learns both: readers
//! see it then, without waiting for the stored high watermark, which is
//! written after the commit and only serves restarts (Raft's commit index is
//! not persisted either). The replication task raises the ends after every
//! step of a replica; fetches read up to them and wait on [`Readable::watch`].

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

use super::Key;

/// The readable end of each hosted partition, shared by the replication
/// task (which raises them) and fetches (which read up to them, each woken
/// only by its own partition).
pub(crate) struct Readable {
    ends: Mutex<HashMap<Key, watch::Sender<u64>>>,
}

impl Readable {
    /// No partition known yet.
    pub fn new() -> Self {
        Readable {
            ends: Mutex::new(HashMap::new()),
        }
    }

    /// Raises `key`'s readable end to `end` (one past the last readable
    /// record offset); a lower `end` changes nothing. Wakes the partition's
    /// waiting fetches when it moves.
    pub fn raise(&self, key: &Key, end: u64) {
        let Ok(mut ends) = self.ends.lock() else {
            return;
        };
        // Looked up before inserting: this runs after every replica step,
        // and an insert would clone the key each time.
        match ends.get(key) {
            Some(known) => {
                known.send_if_modified(|known| {
                    let raised = end > *known;
                    if raised {
                        *known = end;
                    }
                    raised
                });
            }
            None => {
                ends.insert(key.clone(), watch::channel(end).0);
            }
        }
    }

    /// Forgets `key` (its replica closed: a topic created again under the
    /// same name starts from nothing). Its waiting fetches see the end closed.
    pub fn forget(&self, key: &Key) {
        if let Ok(mut ends) = self.ends.lock() {
            ends.remove(key);
        }
    }

    /// `key`'s readable end from now on: the current value (0 when unknown:
    /// the stored high watermark then bounds reads alone), changing when it
    /// moves, closed when the partition is forgotten.
    pub fn watch(&self, key: &Key) -> watch::Receiver<u64> {
        match self.ends.lock() {
            Ok(mut ends) => ends
                .entry(key.clone())
                .or_insert_with(|| watch::channel(0).0)
                .subscribe(),
            // A poisoned map: an end that never moves (reads fall back to
            // the stored high watermark).
            Err(_) => watch::channel(0).1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_only_rise_and_wake_only_their_partition() {
        let readable = Readable::new();
        let (a, b): (Key, Key) = (("t".into(), 0), ("t".into(), 1));
        let (mut end_a, end_b) = (readable.watch(&a), readable.watch(&b));
        assert_eq!(*end_a.borrow_and_update(), 0);
        readable.raise(&a, 5);
        assert!(end_a.has_changed().unwrap_or(false));
        assert!(!end_b.has_changed().unwrap_or(true), "another partition");
        assert_eq!(*end_a.borrow_and_update(), 5);
        readable.raise(&a, 3);
        assert!(!end_a.has_changed().unwrap_or(true), "never lowered");
        assert_eq!(*readable.watch(&a).borrow(), 5);
        readable.forget(&a);
        assert!(end_a.has_changed().is_err(), "closed once forgotten");
        assert_eq!(*readable.watch(&a).borrow(), 0);
    }
}
