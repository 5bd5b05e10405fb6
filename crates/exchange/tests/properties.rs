//! Property tests of the router against naive reference implementations:
//! topic matching after random bind/unbind sequences, and exchange graphs with
//! e2e bindings, alternate exchanges and cycles.
// Test code: a panic here is a failed assertion.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::{BTreeSet, HashSet};

use amqp_codec::{FieldTable, FieldValue, ShortStr};
use exchange::{BindingDef, Destination, ExchangeDeclare, QueueId, Routed, Router};
use proptest::prelude::*;

fn s(v: &str) -> ShortStr {
    ShortStr::try_from(v).unwrap()
}

/// Topic matching by the book: recursion over word lists. Words of keys come
/// from the same alphabet, so `*` and `#` also appear literally in keys.
fn naive_topic(pattern: &[&str], key: &[&str]) -> bool {
    match (pattern.split_first(), key.split_first()) {
        (None, None) => true,
        (Some((&"#", rest)), _) => {
            naive_topic(rest, key) || (!key.is_empty() && naive_topic(pattern, &key[1..]))
        }
        (Some((&"*", rest)), Some((_, krest))) => naive_topic(rest, krest),
        (Some((p, rest)), Some((k, krest))) => p == k && naive_topic(rest, krest),
        _ => false,
    }
}

fn split(s: &str) -> Vec<&str> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split('.').collect()
    }
}

fn word() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("a"),
        Just("b"),
        Just(""),
        Just("*"),
        Just("#"),
        Just("a*")
    ]
}

fn dotted(words: impl Strategy<Value = &'static str>, max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(words, 0..max).prop_map(|w| w.join("."))
}

fn declare(r: &mut Router, name: &str, kind: &str, args: &FieldTable) {
    r.declare_exchange(
        ExchangeDeclare {
            name,
            kind,
            durable: false,
            auto_delete: false,
            internal: false,
            arguments: args,
        },
        false,
    )
    .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn topic_matches_the_naive_reference_after_binds_and_unbinds(
        ops in prop::collection::vec((any::<bool>(), dotted(word(), 5), 0u64..4), 1..30),
        keys in prop::collection::vec(dotted(word(), 5), 1..10),
    ) {
        let mut r = Router::new(s("/"));
        declare(&mut r, "t", "topic", &FieldTable::new());
        for q in 0..4 {
            r.add_queue(s(&format!("q{q}")), QueueId(q));
        }
        // The model: the set of live (pattern, queue) bindings.
        let mut model: HashSet<(String, u64)> = HashSet::new();
        for (bind, pattern, q) in &ops {
            let def = BindingDef {
                source: s("t"),
                destination: Destination::Queue(s(&format!("q{q}"))),
                routing_key: s(pattern),
                arguments: FieldTable::new(),
            };
            if *bind {
                prop_assert_eq!(r.bind(&def).unwrap(), model.insert((pattern.clone(), *q)));
            } else {
                r.unbind(&def).unwrap();
                model.remove(&(pattern.clone(), *q));
            }
        }
        prop_assert_eq!(r.bindings().count(), model.len());
        let mut out = Routed::default();
        for key in &keys {
            r.route("t", key, None, &mut out).unwrap();
            let mut got: Vec<u64> = out.queues().iter().map(|q| q.0).collect();
            got.sort_unstable();
            let want: BTreeSet<u64> = model
                .iter()
                .filter(|(p, _)| naive_topic(&split(p), &split(key)))
                .map(|(_, q)| *q)
                .collect();
            prop_assert_eq!(got, want.into_iter().collect::<Vec<_>>(), "key {:?}", key);
        }
    }

    #[test]
    fn exchange_graphs_terminate_and_deliver_each_queue_once(
        n in 1usize..7,
        kinds in prop::collection::vec(any::<bool>(), 7),
        e2e in prop::collection::vec((0usize..7, 0usize..7, 0u8..2), 0..14),
        to_queue in prop::collection::vec((0usize..7, 0u64..5, 0u8..2), 0..14),
        ae in prop::collection::vec(prop::option::of(0usize..7), 7),
        key in 0u8..2,
    ) {
        let mut r = Router::new(s("/"));
        for q in 0..5 {
            r.add_queue(s(&format!("q{q}")), QueueId(q));
        }
        let name = |i: usize| format!("x{i}");
        // Exchange i: fanout or direct, with an optional alternate exchange.
        for i in 0..n {
            let mut args = FieldTable::new();
            if let Some(a) = ae[i].filter(|a| *a < n) {
                args.insert(s("alternate-exchange"), FieldValue::from(name(a).as_str()));
            }
            declare(&mut r, &name(i), if kinds[i] { "fanout" } else { "direct" }, &args);
        }
        let mut edges: Vec<(usize, usize, u8)> = Vec::new();
        for &(a, b, k) in e2e.iter().filter(|(a, b, _)| *a < n && *b < n) {
            r.bind(&BindingDef { source: s(&name(a)), destination: Destination::Exchange(s(&name(b))), routing_key: s(&k.to_string()), arguments: FieldTable::new() }).unwrap();
            edges.push((a, b, k));
        }
        let mut qedges: Vec<(usize, u64, u8)> = Vec::new();
        for &(a, q, k) in to_queue.iter().filter(|(a, _, _)| *a < n) {
            r.bind(&BindingDef { source: s(&name(a)), destination: Destination::Queue(s(&format!("q{q}"))), routing_key: s(&k.to_string()), arguments: FieldTable::new() }).unwrap();
            qedges.push((a, q, k));
        }
        // Reference: the closure of "exchange reached", where an exchange
        // whose own bindings match nothing passes the message to its AE.
        let matches = |kind_fanout: bool, k: u8| kind_fanout || k == key;
        let mut reached: BTreeSet<usize> = BTreeSet::from([0]);
        loop {
            let mut next = reached.clone();
            for &x in &reached {
                let outs: Vec<usize> = edges.iter().filter(|(a, _, k)| *a == x && matches(kinds[x], *k)).map(|(_, b, _)| *b).collect();
                let any_queue = qedges.iter().any(|(a, _, k)| *a == x && matches(kinds[x], *k));
                next.extend(outs.iter().copied());
                if outs.is_empty() && !any_queue {
                    if let Some(a) = ae[x].filter(|a| *a < n) {
                        next.insert(a);
                    }
                }
            }
            if next == reached { break; }
            reached = next;
        }
        let want: BTreeSet<u64> = qedges.iter().filter(|(a, _, k)| reached.contains(a) && matches(kinds[*a], *k)).map(|(_, q, _)| *q).collect();

        let mut out = Routed::default();
        r.route(&name(0), &key.to_string(), None, &mut out).unwrap();
        let got: Vec<u64> = out.queues().iter().map(|q| q.0).collect();
        let unique: BTreeSet<u64> = got.iter().copied().collect();
        prop_assert_eq!(unique.len(), got.len(), "a queue appears twice: {:?}", got);
        prop_assert_eq!(unique, want);
    }
}
