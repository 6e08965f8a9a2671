//! The virtual-time event queue both simulated worlds run on: events ordered
//! by time, ties in insertion order (so a run replays exactly), and a bound
//! on pending events so a message storm is reported, not an out-of-memory.

use std::collections::BTreeMap;
use std::time::Duration;

/// Pending events by (time, insertion number).
#[derive(Debug)]
pub struct EventQueue<E> {
    events: BTreeMap<(Duration, u64), E>,
    seq: u64,
    limit: usize,
}

/// The queue already holds its limit of pending events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overflow {
    /// The limit.
    pub limit: usize,
}

impl<E> EventQueue<E> {
    /// An empty queue holding at most `limit` pending events.
    pub fn new(limit: usize) -> Self {
        EventQueue {
            events: BTreeMap::new(),
            seq: 0,
            limit,
        }
    }

    /// Schedules `event` at `at`.
    pub fn push(&mut self, at: Duration, event: E) -> Result<(), Overflow> {
        if self.events.len() >= self.limit {
            return Err(Overflow { limit: self.limit });
        }
        self.seq += 1;
        self.events.insert((at, self.seq), event);
        Ok(())
    }

    /// The earliest event due at or before `until`, removed from the queue.
    pub fn pop_due(&mut self, until: Duration) -> Option<(Duration, E)> {
        let (&(at, _), _) = self.events.first_key_value()?;
        if at > until {
            return None;
        }
        self.events.pop_first().map(|((at, _), event)| (at, event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_out_by_time_then_insertion_order() {
        let mut q = EventQueue::new(10);
        q.push(Duration::from_millis(5), "late").unwrap();
        q.push(Duration::from_millis(1), "first").unwrap();
        q.push(Duration::from_millis(1), "second").unwrap();
        assert_eq!(
            q.pop_due(Duration::from_millis(3)).map(|e| e.1),
            Some("first")
        );
        assert_eq!(
            q.pop_due(Duration::from_millis(3)).map(|e| e.1),
            Some("second")
        );
        assert_eq!(q.pop_due(Duration::from_millis(3)), None);
        assert_eq!(
            q.pop_due(Duration::from_millis(5)).map(|e| e.1),
            Some("late")
        );
    }

    #[test]
    fn a_full_queue_refuses_more() {
        let mut q = EventQueue::new(1);
        q.push(Duration::ZERO, 1).unwrap();
        assert_eq!(q.push(Duration::ZERO, 2), Err(Overflow { limit: 1 }));
    }
}
