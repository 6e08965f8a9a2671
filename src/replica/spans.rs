//! Where the records of each log entry a replica holds in memory sit.
//!
//! Replication counts entries; the store and clients count records. A
//! [`Spans`] maps the one onto the other for the entries from the core's
//! snapshot point on, and remembers the record log's end and head just
//! before that point, so it stays as small as the core's in-memory log.

use crate::chain::MessageId;

/// The records of one entry: a batch's, or none for a marker or a
/// configuration entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    /// Offset of its first record (the record log end, for an entry without records).
    pub base: u64,
    /// How many records it holds.
    pub count: u32,
    /// The chain ID of its last record (meaningless when `count` is 0).
    pub last_id: MessageId,
}

/// The spans of the entries from `first` on.
#[derive(Clone, Debug)]
pub(crate) struct Spans {
    /// The first entry described.
    first: u64,
    /// One past the last record before entry `first`.
    base_end: u64,
    /// The chain ID of the last record before entry `first`.
    base_head: MessageId,
    /// Entry `first + i` is `spans[i]`.
    spans: Vec<Span>,
}

impl Spans {
    /// Spans starting at entry `first`, after the records up to `base_end`
    /// whose last chain ID is `base_head`.
    pub fn new(first: u64, base_end: u64, base_head: MessageId, spans: Vec<Span>) -> Self {
        Spans {
            first,
            base_end,
            base_head,
            spans,
        }
    }

    /// The first entry described.
    pub fn first(&self) -> u64 {
        self.first
    }

    /// One past the last entry described.
    pub fn end(&self) -> u64 {
        self.first + self.spans.len() as u64
    }

    /// Entry `index`'s span, if it is described.
    pub fn get(&self, index: u64) -> Option<Span> {
        let at = index.checked_sub(self.first)?;
        self.spans.get(usize::try_from(at).ok()?).copied()
    }

    /// Describes the next entry.
    pub fn push(&mut self, span: Span) {
        self.spans.push(span);
    }

    /// Forgets entries from `index` on (never those before `first`).
    pub fn truncate(&mut self, index: u64) {
        let keep = index.saturating_sub(self.first);
        self.spans
            .truncate(usize::try_from(keep).unwrap_or(usize::MAX));
    }

    /// The last entry below `entries` that holds records.
    fn last_with_records(&self, entries: u64) -> Option<&Span> {
        let upto = entries
            .saturating_sub(self.first)
            .min(self.spans.len() as u64);
        self.spans[..upto as usize]
            .iter()
            .rev()
            .find(|s| s.count > 0)
    }

    /// One past the last record of the entries below `entries`.
    pub fn record_end(&self, entries: u64) -> u64 {
        self.last_with_records(entries)
            .map_or(self.base_end, |s| s.base + u64::from(s.count))
    }

    /// The chain ID of the last record of the entries below `entries`.
    pub fn record_head(&self, entries: u64) -> MessageId {
        self.last_with_records(entries)
            .map_or(self.base_head, |s| s.last_id)
    }

    /// The entry whose batch starts at record `base`, if it is described.
    pub fn entry_of_batch(&self, base: u64) -> Option<u64> {
        self.spans
            .iter()
            .position(|s| s.base == base && s.count > 0)
            .map(|i| self.first + i as u64)
    }

    /// Forgets the entries below `index` (the core compacted them).
    pub fn compact(&mut self, index: u64) {
        if index <= self.first {
            return;
        }
        let (end, head) = (self.record_end(index), self.record_head(index));
        let cut = (index - self.first).min(self.spans.len() as u64) as usize;
        self.spans.drain(..cut);
        self.first = index;
        self.base_end = end;
        self.base_head = head;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(base: u64, count: u32, id: u8) -> Span {
        Span {
            base,
            count,
            last_id: MessageId([id; 32]),
        }
    }

    #[test]
    fn record_positions_survive_compaction() {
        let start = MessageId([0; 32]);
        let mut spans = Spans::new(
            0,
            0,
            start,
            vec![span(0, 0, 0), span(0, 3, 1), span(3, 2, 2), span(5, 0, 0)],
        );
        assert_eq!(spans.record_end(4), 5);
        assert_eq!(spans.record_head(4), MessageId([2; 32]));
        assert_eq!(spans.record_head(1), start);
        spans.compact(3);
        assert_eq!((spans.first(), spans.end()), (3, 4));
        assert_eq!(spans.record_end(3), 5, "the end before the point is kept");
        assert_eq!(spans.record_head(3), MessageId([2; 32]));
        assert_eq!(spans.record_end(4), 5);
        assert_eq!(spans.entry_of_batch(3), None, "compacted");
        spans.push(span(5, 4, 3));
        assert_eq!(spans.entry_of_batch(5), Some(4));
        assert_eq!(spans.record_end(5), 9);
        spans.truncate(4);
        assert_eq!(spans.end(), 4);
        assert_eq!(spans.get(3), Some(span(5, 0, 0)));
        assert_eq!(spans.get(2), None);
    }
}
