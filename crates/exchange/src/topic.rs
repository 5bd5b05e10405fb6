//! Topic exchange matching with a trie of binding-pattern words.
//!
//! Keys and patterns are split on `.` into words; the empty string has zero
//! words, and dots make empty words (`a..b` is `a`, ``, `b`). In a pattern the
//! whole word `*` matches exactly one word and `#` zero or more; `*` or `#`
//! inside a longer word is a literal. This is RabbitMQ 3.10's behaviour, checked
//! against `tests/data/topic_rabbitmq_3_10.tsv`.
//!
//! Each node has literal-word children, a `*` child and a `#` child; a binding's
//! targets sit on the node where its pattern ends. Matching walks the key's
//! words down the literal and `*` edges and lets each `#` edge swallow any
//! number of words, so cost follows the key's length and the patterns that
//! share its prefixes, not the number of bindings. A `(node, position)` visited
//! set on `#` nodes bounds the work by nodes × words even when patterns stack
//! several `#` (`#.#.#`).

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::binding::{Target, Targets};

type NodeId = u32;
const ROOT: NodeId = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Edge {
    Root,
    Word(Box<str>),
    Star,
    Hash,
}

#[derive(Debug)]
struct Node {
    words: HashMap<Box<str>, NodeId>,
    star: Option<NodeId>,
    hash: Option<NodeId>,
    targets: Targets,
    parent: NodeId,
    edge: Edge,
}

impl Node {
    fn new(parent: NodeId, edge: Edge) -> Node {
        Node {
            words: HashMap::default(),
            star: None,
            hash: None,
            targets: Targets::default(),
            parent,
            edge,
        }
    }

    fn is_unused(&self) -> bool {
        self.words.is_empty()
            && self.star.is_none()
            && self.hash.is_none()
            && self.targets.is_empty()
    }
}

/// Splits a key or pattern into words: `""` has none.
pub(crate) fn words(s: &str) -> impl Iterator<Item = &str> {
    let mut it = s.split('.');
    if s.is_empty() {
        it.next();
    }
    it
}

/// Scratch space reused across matches so that routing does not allocate.
#[derive(Debug, Default)]
pub(crate) struct TopicScratch {
    words: Vec<(usize, usize)>,
    visited: HashSet<(NodeId, usize)>,
}

/// The topic trie of one exchange.
#[derive(Debug)]
pub(crate) struct TopicTrie {
    nodes: Vec<Node>,
    free: Vec<NodeId>,
}

impl Default for TopicTrie {
    fn default() -> Self {
        TopicTrie {
            nodes: vec![Node::new(ROOT, Edge::Root)],
            free: Vec::new(),
        }
    }
}

impl TopicTrie {
    fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id as usize)
    }

    fn node_mut(&mut self, id: NodeId) -> Option<&mut Node> {
        self.nodes.get_mut(id as usize)
    }

    fn alloc(&mut self, parent: NodeId, edge: Edge) -> NodeId {
        let node = Node::new(parent, edge);
        match self.free.pop() {
            Some(id) => {
                if let Some(slot) = self.node_mut(id) {
                    *slot = node;
                }
                id
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as NodeId
            }
        }
    }

    fn child(&self, id: NodeId, word: &str) -> Option<NodeId> {
        let node = self.node(id)?;
        match word {
            "*" => node.star,
            "#" => node.hash,
            w => node.words.get(w).copied(),
        }
    }

    fn child_or_insert(&mut self, id: NodeId, word: &str) -> NodeId {
        if let Some(c) = self.child(id, word) {
            return c;
        }
        let edge = match word {
            "*" => Edge::Star,
            "#" => Edge::Hash,
            w => Edge::Word(w.into()),
        };
        let c = self.alloc(id, edge.clone());
        if let Some(node) = self.node_mut(id) {
            match edge {
                Edge::Star => node.star = Some(c),
                Edge::Hash => node.hash = Some(c),
                Edge::Word(w) => {
                    node.words.insert(w, c);
                }
                Edge::Root => {}
            }
        }
        c
    }

    /// Adds one binding of `pattern` to `target`.
    pub(crate) fn bind(&mut self, pattern: &str, target: Target) {
        let mut id = ROOT;
        for word in words(pattern) {
            id = self.child_or_insert(id, word);
        }
        if let Some(node) = self.node_mut(id) {
            node.targets.add(target);
        }
    }

    /// Removes one binding of `pattern` to `target`, pruning nodes left unused.
    pub(crate) fn unbind(&mut self, pattern: &str, target: Target) {
        let mut id = ROOT;
        for word in words(pattern) {
            match self.child(id, word) {
                Some(c) => id = c,
                None => return,
            }
        }
        if let Some(node) = self.node_mut(id) {
            node.targets.remove(target);
        }
        self.prune(id);
    }

    fn prune(&mut self, mut id: NodeId) {
        while id != ROOT {
            let Some(node) = self.node(id) else { return };
            if !node.is_unused() {
                return;
            }
            let (parent, edge) = (node.parent, node.edge.clone());
            if let Some(p) = self.node_mut(parent) {
                match edge {
                    Edge::Star => p.star = None,
                    Edge::Hash => p.hash = None,
                    Edge::Word(w) => {
                        p.words.remove(&w);
                    }
                    Edge::Root => {}
                }
            }
            if let Some(node) = self.node_mut(id) {
                *node = Node::new(ROOT, Edge::Root);
            }
            self.free.push(id);
            id = parent;
        }
    }

    /// Appends the targets of every pattern matching `key` to `out` (a target
    /// bound by several matching patterns appears once per pattern).
    pub(crate) fn route(&self, key: &str, out: &mut Vec<Target>, scratch: &mut TopicScratch) {
        scratch.words.clear();
        let mut start = 0;
        for w in words(key) {
            scratch.words.push((start, start + w.len()));
            start += w.len() + 1;
        }
        scratch.visited.clear();
        let TopicScratch { words, visited } = scratch;
        self.walk(ROOT, key, words, 0, out, visited);
    }

    fn walk(
        &self,
        id: NodeId,
        key: &str,
        words: &[(usize, usize)],
        i: usize,
        out: &mut Vec<Target>,
        visited: &mut HashSet<(NodeId, usize)>,
    ) {
        let Some(node) = self.node(id) else { return };
        match words.get(i) {
            None => node.targets.emit(out),
            Some(&(from, to)) => {
                let word = key.get(from..to).unwrap_or_default();
                if let Some(&c) = node.words.get(word) {
                    self.walk(c, key, words, i + 1, out, visited);
                }
                if let Some(c) = node.star {
                    self.walk(c, key, words, i + 1, out, visited);
                }
            }
        }
        // `#` swallows zero or more words: enter its node without consuming a
        // word, and at a `#` node, stay on it while consuming one more.
        if let Some(c) = node.hash {
            if visited.insert((c, i)) {
                self.walk(c, key, words, i, out, visited);
            }
        }
        if matches!(node.edge, Edge::Hash) && i < words.len() && visited.insert((id, i + 1)) {
            self.walk(id, key, words, i + 1, out, visited);
        }
    }

    /// Number of live nodes (for tests: pruning leaves only the root).
    #[cfg(test)]
    fn live_nodes(&self) -> usize {
        self.nodes.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binding::QueueId;

    fn q(n: u64) -> Target {
        Target::Queue(QueueId(n))
    }

    fn matches(trie: &TopicTrie, key: &str) -> Vec<Target> {
        let mut out = Vec::new();
        trie.route(key, &mut out, &mut TopicScratch::default());
        out.sort();
        out.dedup();
        out
    }

    #[test]
    fn words_of_empty_and_dotted_strings() {
        assert_eq!(words("").count(), 0);
        assert_eq!(words(".").collect::<Vec<_>>(), ["", ""]);
        assert_eq!(words("a..b").collect::<Vec<_>>(), ["a", "", "b"]);
    }

    #[test]
    fn wildcards() {
        let mut t = TopicTrie::default();
        t.bind("stock.*.nyse", q(1));
        t.bind("stock.#", q(2));
        t.bind("#", q(3));
        t.bind("*.usd.*", q(4));
        assert_eq!(matches(&t, "stock.ibm.nyse"), [q(1), q(2), q(3)]);
        assert_eq!(matches(&t, "stock"), [q(2), q(3)]);
        assert_eq!(matches(&t, "fx.usd.eur"), [q(3), q(4)]);
        assert_eq!(matches(&t, ""), [q(3)]);
    }

    #[test]
    fn unbind_prunes_back_to_the_root() {
        let mut t = TopicTrie::default();
        t.bind("a.*.#.b", q(1));
        t.bind("a.*.#.b", q(1));
        t.bind("a.x", q(2));
        t.unbind("a.*.#.b", q(1));
        assert_eq!(
            matches(&t, "a.y.b"),
            [q(1)],
            "one of two identical bindings remains"
        );
        t.unbind("a.*.#.b", q(1));
        t.unbind("a.x", q(2));
        t.unbind("never.bound", q(9));
        assert_eq!(t.live_nodes(), 1);
        assert!(matches(&t, "a.y.b").is_empty());
    }

    #[test]
    fn stacked_hashes_stay_bounded() {
        let mut t = TopicTrie::default();
        let pattern = vec!["#"; 40].join(".");
        t.bind(&pattern, q(1));
        let key = vec!["w"; 200].join(".");
        assert_eq!(matches(&t, &key), [q(1)]);
    }
}
