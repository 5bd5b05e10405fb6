//! [`QueueIndex`]: where the log holds each of one queue's index-entry
//! records, in about one bit per message instead of a map entry.
//!
//! A queue's first puts reach the log in sequence order (the server submits a
//! queue's publishes under its lock), so they form **runs**: consecutive
//! sequence numbers written to the same segment. A run is its first sequence
//! number, its segment and a bitset of which of its sequence numbers still
//! have a live record there (a number with no record, e.g. a transient
//! message's, never had its bit set). Anything else — a put that supersedes an
//! earlier one (a requeue rewriting the entry), a record moved by compaction,
//! a first put out of order — is kept in a small map instead. A deep backlog of
//! ten million entries costs a few megabytes here.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

/// Most sequence numbers one run spans (its bitset's size bound).
const RUN_SPAN: u64 = 1 << 16;

#[derive(Debug)]
struct Run {
    seg: u64,
    /// Bit `i` set: sequence number `first + i` has its live record in `seg`.
    bits: Vec<u64>,
    live: u32,
}

impl Run {
    fn test(&self, i: u64) -> bool {
        let (word, bit) = ((i / 64) as usize, i % 64);
        self.bits.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    fn set(&mut self, i: u64) {
        let (word, bit) = ((i / 64) as usize, i % 64);
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        if let Some(w) = self.bits.get_mut(word) {
            if *w & (1 << bit) == 0 {
                *w |= 1 << bit;
                self.live += 1;
            }
        }
    }

    fn clear(&mut self, i: u64) -> bool {
        let (word, bit) = ((i / 64) as usize, i % 64);
        match self.bits.get_mut(word) {
            Some(w) if *w & (1 << bit) != 0 => {
                *w &= !(1 << bit);
                self.live -= 1;
                true
            }
            _ => false,
        }
    }
}

/// One queue's index-entry records: sequence number → segment.
#[derive(Debug, Default)]
pub(crate) struct QueueIndex {
    /// Runs by first sequence number.
    runs: BTreeMap<u64, Run>,
    /// Records outside the runs.
    moved: FxHashMap<u64, u64>,
    /// The highest sequence number put so far (0: none; sequences start at 1).
    max_seq: u64,
}

impl QueueIndex {
    /// Records that `seq`'s entry was put in segment `seg`. Returns the
    /// segment of the record this one supersedes, if any.
    pub(crate) fn put(&mut self, seq: u64, seg: u64) -> Option<u64> {
        if seq > self.max_seq {
            self.max_seq = seq;
            if let Some((&first, run)) = self.runs.iter_mut().next_back() {
                if run.seg == seg && seq - first < RUN_SPAN {
                    run.set(seq - first);
                    return None;
                }
            }
            let mut run = Run {
                seg,
                bits: Vec::new(),
                live: 0,
            };
            run.set(0);
            self.runs.insert(seq, run);
            return None;
        }
        let old = self.remove(seq);
        self.moved.insert(seq, seg);
        old
    }

    /// The segment holding `seq`'s live record.
    pub(crate) fn get(&self, seq: u64) -> Option<u64> {
        if let Some(&seg) = self.moved.get(&seq) {
            return Some(seg);
        }
        let (&first, run) = self.runs.range(..=seq).next_back()?;
        run.test(seq - first).then_some(run.seg)
    }

    /// Forgets `seq`'s record; returns its segment (`None` if it had none).
    pub(crate) fn remove(&mut self, seq: u64) -> Option<u64> {
        if let Some(seg) = self.moved.remove(&seq) {
            return Some(seg);
        }
        let (&first, run) = self.runs.range_mut(..=seq).next_back()?;
        if !run.clear(seq - first) {
            return None;
        }
        let seg = run.seg;
        if run.live == 0 {
            self.runs.remove(&first);
        }
        Some(seg)
    }

    /// Every live record's segment with a count (the queue's whole index is
    /// being deleted).
    pub(crate) fn segments(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.runs
            .values()
            .map(|r| (r.seg, r.live))
            .chain(self.moved.values().map(|&s| (s, 1)))
    }

    /// Live records.
    pub(crate) fn len(&self) -> usize {
        self.runs.values().map(|r| r.live as usize).sum::<usize>() + self.moved.len()
    }

    /// Whether no live record is left.
    pub(crate) fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.moved.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_puts_form_runs_and_supersedes_move_out() {
        let mut q = QueueIndex::default();
        for seq in 1..=100 {
            assert_eq!(q.put(seq, 7), None);
        }
        for seq in 101..=150 {
            assert_eq!(q.put(seq, 8), None);
        }
        assert_eq!(q.runs.len(), 2);
        assert_eq!(
            (q.get(50), q.get(120), q.get(151)),
            (Some(7), Some(8), None)
        );
        // A requeue rewrites 50's entry in segment 9.
        assert_eq!(q.put(50, 9), Some(7));
        assert_eq!(q.get(50), Some(9));
        assert_eq!(q.remove(50), Some(9));
        assert_eq!(q.remove(50), None, "removed once");
        let total: u32 = q.segments().map(|(_, n)| n).sum();
        assert_eq!(total, 149);
        for seq in 101..=150 {
            q.remove(seq);
        }
        assert_eq!(q.runs.len(), 1, "an emptied run goes");
    }

    #[test]
    fn a_gap_in_sequence_numbers_is_not_a_record() {
        let mut q = QueueIndex::default();
        q.put(1, 3);
        q.put(5, 3);
        assert_eq!(q.get(3), None);
        assert_eq!(q.remove(3), None);
        assert_eq!(q.remove(1), Some(3));
        assert_eq!(q.remove(5), Some(3));
        assert!(q.is_empty());
    }

    #[test]
    fn runs_are_bounded_in_span() {
        let mut q = QueueIndex::default();
        q.put(1, 1);
        q.put(RUN_SPAN + 1, 1);
        assert_eq!(q.runs.len(), 2);
        assert_eq!(q.get(RUN_SPAN + 1), Some(1));
    }
}
