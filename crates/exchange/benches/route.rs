//! Routing benchmarks (issue #3 goals in parentheses): direct with 10k bindings
//! (≤ 100 ns), topic with 10k and 100k mixed `*`/`#` bindings and 3–5 word keys
//! (≤ 2 µs), fanout to 100 queues (≤ 1 µs), headers with 100 bindings, and
//! binding insert + remove (≥ 100k ops/s). Results go in the crate README.

// A bench that meets an error should stop loudly.
#![allow(clippy::unwrap_used, missing_docs)]

use amqp_codec::{FieldTable, FieldValue, ShortStr};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use exchange::{BindingDef, Destination, ExchangeDeclare, QueueId, Routed, Router};
use std::hint::black_box;

const REGIONS: [&str; 8] = ["eu", "us", "apac", "latam", "mea", "uk", "cn", "jp"];

/// A small deterministic generator, so runs are comparable. Keys are
/// hierarchical, like most topic schemes (`region.service.entity.event[.detail]`):
/// 3–5 words, each level drawn from its own vocabulary.
struct Lcg(u64);
impl Lcg {
    const LEVELS: [usize; 5] = [20, 200, 200, 50, 10];

    fn next(&mut self) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as usize
    }
    fn word(&mut self, level: usize) -> String {
        format!("w{level}x{}", self.next() % Self::LEVELS[level])
    }
    fn key(&mut self) -> String {
        let n = 3 + self.next() % 3;
        (0..n).map(|l| self.word(l)).collect::<Vec<_>>().join(".")
    }
    /// A pattern: literal words with about one in six replaced by `*` and
    /// one in ten patterns ending in `#`.
    fn pattern(&mut self) -> String {
        let n = 2 + self.next() % 4;
        let mut words: Vec<String> = (0..n)
            .map(|l| {
                if self.next() % 6 == 0 {
                    "*".to_owned()
                } else {
                    self.word(l)
                }
            })
            .collect();
        if self.next() % 10 == 0 {
            words.push("#".to_owned());
        }
        words.join(".")
    }
}

fn router_with(kind: &str, n_queues: u64) -> Router {
    let mut r = Router::new(ShortStr::from_static("/"));
    r.declare_exchange(
        ExchangeDeclare {
            name: "x",
            kind,
            durable: false,
            auto_delete: false,
            internal: false,
            arguments: &FieldTable::new(),
        },
        false,
    )
    .unwrap();
    for q in 0..n_queues {
        r.add_queue(ShortStr::try_from(format!("q{q}")).unwrap(), QueueId(q));
    }
    r
}

fn bind(r: &mut Router, queue: u64, key: &str, args: FieldTable) {
    r.bind(&BindingDef {
        source: ShortStr::from_static("x"),
        destination: Destination::Queue(ShortStr::try_from(format!("q{queue}")).unwrap()),
        routing_key: ShortStr::try_from(key).unwrap(),
        arguments: args,
    })
    .unwrap();
}

fn direct(c: &mut Criterion) {
    let mut r = router_with("direct", 10_000);
    for q in 0..10_000 {
        bind(&mut r, q, &format!("key.{q}"), FieldTable::new());
    }
    let mut out = Routed::default();
    c.bench_function("direct, 10k bindings", |b| {
        b.iter(|| {
            r.route("x", black_box("key.4242"), None, &mut out).unwrap();
            assert_eq!(out.queues().len(), 1);
        })
    });
}

fn topic(c: &mut Criterion) {
    for n in [10_000u64, 100_000] {
        let mut r = router_with("topic", 1000);
        let mut g = Lcg(42);
        for i in 0..n {
            let p = g.pattern();
            bind(&mut r, i % 1000, &p, FieldTable::new());
        }
        let keys: Vec<String> = (0..1024).map(|_| g.key()).collect();
        let mut out = Routed::default();
        let matched: usize = keys
            .iter()
            .map(|k| {
                r.route("x", k, None, &mut out).unwrap();
                out.queues().len()
            })
            .sum();
        eprintln!(
            "topic {n}: {:.2} queues matched per key on average",
            matched as f64 / keys.len() as f64
        );
        let mut i = 0;
        c.bench_function(&format!("topic, {}k bindings", n / 1000), |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                r.route("x", &keys[i], None, &mut out).unwrap();
                black_box(out.queues().len());
            })
        });
    }
}

fn fanout(c: &mut Criterion) {
    let mut r = router_with("fanout", 100);
    for q in 0..100 {
        bind(&mut r, q, "", FieldTable::new());
    }
    let mut out = Routed::default();
    c.bench_function("fanout, 100 queues", |b| {
        b.iter(|| {
            r.route("x", "", None, &mut out).unwrap();
            assert_eq!(out.queues().len(), 100);
        })
    });
}

fn headers(c: &mut Criterion) {
    let mut r = router_with("headers", 100);
    for q in 0..100 {
        let args: FieldTable = [
            (
                ShortStr::from_static("x-match"),
                FieldValue::from(if q % 2 == 0 { "all" } else { "any" }),
            ),
            (
                ShortStr::from_static("region"),
                FieldValue::from(REGIONS[q as usize % 8]),
            ),
            (
                ShortStr::from_static("level"),
                FieldValue::I32((q % 5) as i32),
            ),
        ]
        .into_iter()
        .collect();
        bind(&mut r, q, "", args);
    }
    let msg: FieldTable = [
        (ShortStr::from_static("region"), FieldValue::from("eu")),
        (ShortStr::from_static("level"), FieldValue::I64(3)),
        (ShortStr::from_static("trace"), FieldValue::from("abc")),
    ]
    .into_iter()
    .collect();
    let mut out = Routed::default();
    c.bench_function("headers, 100 bindings", |b| {
        b.iter(|| {
            r.route("x", "", Some(&msg), &mut out).unwrap();
            black_box(out.queues().len());
        })
    });
}

fn bind_unbind(c: &mut Criterion) {
    let mut g = Lcg(7);
    let defs: Vec<BindingDef> = (0..10_000u64)
        .map(|i| BindingDef {
            source: ShortStr::from_static("x"),
            destination: Destination::Queue(ShortStr::try_from(format!("q{}", i % 1000)).unwrap()),
            routing_key: ShortStr::try_from(g.pattern()).unwrap(),
            arguments: FieldTable::new(),
        })
        .collect();
    c.bench_function("topic bind+unbind, 10k bindings (per binding)", |b| {
        b.iter_batched_ref(
            || router_with("topic", 1000),
            |r| {
                for d in &defs {
                    r.bind(d).unwrap();
                }
                for d in &defs {
                    r.unbind(d).unwrap();
                }
            },
            BatchSize::LargeInput,
        )
    });
}

criterion_group!(benches, direct, topic, fanout, headers, bind_unbind);
criterion_main!(benches);
