//! Per-exchange-type binding sets behind one enum: direct and fanout are small
//! enough to live here; topic and headers have their own files.

use rustc_hash::FxHashMap as HashMap;

use amqp_codec::{FieldTable, ShortStr};

use crate::binding::{ExchangeKind, Target, Targets};
use crate::error::ExchangeError;
use crate::headers::HeadersMatcher;
use crate::topic::{TopicScratch, TopicTrie};

/// The bindings of one exchange, organised for its type's matching.
#[derive(Debug)]
pub(crate) enum Matcher {
    /// Routing key → targets: one hash lookup per key.
    Direct(HashMap<ShortStr, Targets>),
    /// Every target, whatever the key.
    Fanout(Targets),
    Topic(TopicTrie),
    Headers(HeadersMatcher),
}

impl Matcher {
    pub(crate) fn new(kind: ExchangeKind) -> Matcher {
        match kind {
            ExchangeKind::Direct => Matcher::Direct(HashMap::default()),
            ExchangeKind::Fanout => Matcher::Fanout(Targets::default()),
            ExchangeKind::Topic => Matcher::Topic(TopicTrie::default()),
            ExchangeKind::Headers => Matcher::Headers(HeadersMatcher::default()),
        }
    }

    /// Checks arguments the exchange type interprets, before anything changes.
    pub(crate) fn validate(&self, args: &FieldTable) -> Result<(), ExchangeError> {
        match self {
            Matcher::Headers(_) => crate::headers::validate(args),
            _ => Ok(()),
        }
    }

    pub(crate) fn bind(
        &mut self,
        key: &ShortStr,
        args: &FieldTable,
        target: Target,
    ) -> Result<(), ExchangeError> {
        match self {
            Matcher::Direct(map) => map.entry(key.clone()).or_default().add(target),
            Matcher::Fanout(targets) => targets.add(target),
            Matcher::Topic(trie) => trie.bind(key, target),
            Matcher::Headers(h) => h.bind(args, target)?,
        }
        Ok(())
    }

    pub(crate) fn unbind(&mut self, key: &str, args: &FieldTable, target: Target) {
        match self {
            Matcher::Direct(map) => {
                if map.get_mut(key).is_some_and(|t| t.remove(target)) {
                    map.remove(key);
                }
            }
            Matcher::Fanout(targets) => {
                targets.remove(target);
            }
            Matcher::Topic(trie) => trie.unbind(key, target),
            Matcher::Headers(h) => h.unbind(args, target),
        }
    }

    /// Whether routing with several keys or through this type may yield the
    /// same target twice.
    pub(crate) fn may_duplicate(&self) -> bool {
        matches!(self, Matcher::Topic(_) | Matcher::Headers(_))
    }

    /// Whether the routing keys take part (fanout and headers ignore them).
    pub(crate) fn uses_keys(&self) -> bool {
        matches!(self, Matcher::Direct(_) | Matcher::Topic(_))
    }

    pub(crate) fn route(
        &self,
        key: &str,
        headers: Option<&FieldTable>,
        out: &mut Vec<Target>,
        scratch: &mut TopicScratch,
    ) {
        match self {
            Matcher::Direct(map) => {
                if let Some(targets) = map.get(key) {
                    targets.emit(out);
                }
            }
            Matcher::Fanout(targets) => targets.emit(out),
            Matcher::Topic(trie) => trie.route(key, out, scratch),
            Matcher::Headers(h) => h.route(headers, out),
        }
    }
}
