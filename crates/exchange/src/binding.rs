//! The vocabulary shared by the exchange types: what a binding points at
//! ([`Target`]), the caller's queue identity ([`QueueId`]), exchange types
//! ([`ExchangeKind`]), and [`Targets`], the reference-counted destination list
//! the direct, fanout and topic matchers keep per key.

use std::collections::HashMap;
use std::fmt;

use crate::error::ExchangeError;

/// A queue, as the caller identifies it. The router never interprets it, so
/// queues can live anywhere (another task, another node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueId(pub u64);

/// Index of an exchange in its router's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ExchangeIdx(pub(crate) u32);

/// Where a binding delivers: a queue, or another exchange (e2e binding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Target {
    Queue(QueueId),
    Exchange(ExchangeIdx),
}

/// The four exchange types of AMQP 0-9-1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExchangeKind {
    /// Routing key equals binding key.
    Direct,
    /// Every binding, whatever the key.
    Fanout,
    /// Dot-separated words with `*` (one word) and `#` (zero or more words).
    Topic,
    /// Message headers against binding arguments (`x-match`).
    Headers,
}

impl ExchangeKind {
    /// Parses the `type` field of `exchange.declare`.
    pub fn parse(s: &str) -> Result<ExchangeKind, ExchangeError> {
        match s {
            "direct" => Ok(ExchangeKind::Direct),
            "fanout" => Ok(ExchangeKind::Fanout),
            "topic" => Ok(ExchangeKind::Topic),
            "headers" => Ok(ExchangeKind::Headers),
            "" => Err(ExchangeError::EmptyType),
            other => Err(ExchangeError::UnknownType(other.to_owned())),
        }
    }

    /// The name clients use.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

impl fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Destinations with a count of the bindings that lead to each, so that two
/// bindings differing only in arguments deliver once and unbinding one of them
/// keeps the other. A plain vector while short (most keys have a handful of
/// queues); past [`Targets::INDEXED`] entries a position index keeps add and
/// remove O(1) for a fanout to many thousands of queues.
#[derive(Debug, Default, Clone)]
pub(crate) struct Targets {
    list: Vec<(Target, u32)>,
    index: Option<HashMap<Target, usize>>,
}

impl Targets {
    const INDEXED: usize = 32;

    fn position(&self, target: Target) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(&target).copied(),
            None => self.list.iter().position(|(t, _)| *t == target),
        }
    }

    pub(crate) fn add(&mut self, target: Target) {
        if let Some((_, n)) = self.position(target).and_then(|p| self.list.get_mut(p)) {
            *n += 1;
            return;
        }
        self.list.push((target, 1));
        match &mut self.index {
            Some(index) => {
                index.insert(target, self.list.len() - 1);
            }
            None if self.list.len() > Self::INDEXED => {
                let index = self
                    .list
                    .iter()
                    .enumerate()
                    .map(|(i, (t, _))| (*t, i))
                    .collect();
                self.index = Some(index);
            }
            None => {}
        }
    }

    /// Drops one reference; returns whether the list is now empty.
    pub(crate) fn remove(&mut self, target: Target) -> bool {
        let Some(pos) = self.position(target) else {
            return self.list.is_empty();
        };
        let Some((_, n)) = self.list.get_mut(pos) else {
            return self.list.is_empty();
        };
        *n -= 1;
        if *n == 0 {
            self.list.swap_remove(pos);
            if let Some(index) = &mut self.index {
                index.remove(&target);
                if let Some((moved, _)) = self.list.get(pos) {
                    index.insert(*moved, pos);
                }
            }
        }
        self.list.is_empty()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub(crate) fn emit(&self, out: &mut Vec<Target>) {
        out.extend(self.list.iter().map(|(t, _)| *t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_references_and_survives_indexing() {
        let mut t = Targets::default();
        for i in 0..100 {
            t.add(Target::Queue(QueueId(i)));
        }
        t.add(Target::Queue(QueueId(5)));
        assert!(t.index.is_some());
        assert!(!t.remove(Target::Queue(QueueId(5))));
        for i in 0..100 {
            t.remove(Target::Queue(QueueId(i)));
        }
        assert!(t.is_empty());
        // Removing what is not there is harmless.
        assert!(t.remove(Target::Queue(QueueId(7))));
    }
}
