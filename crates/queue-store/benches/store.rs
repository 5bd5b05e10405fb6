//! Queue-store benchmarks (issue #4 goals in parentheses):
//! - transient enqueue + dequeue in memory (≥ 5 M msg/s);
//! - 100-byte persistent messages to a durable queue, enqueue + ack, with
//!   commits pipelined the way confirming publishers keep a window of
//!   outstanding confirms (≥ 200 k msg/s with fsync batching);
//! - recovery of 1 M stored messages: `Store::open` + `Queue::recover` (≤ 5 s).
//!
//! Results go in the crate README.

// A bench that meets an error should stop loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp_codec::{BasicProperties, ContentHeader, FieldTable, ShortStr, class_id};
use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use queue_store::{Effects, Message, MessageId, Queue, QueueArgs, Store};

fn message(id: MessageId, persistent: bool) -> Arc<Message> {
    let body = Bytes::from(vec![7u8; 100]);
    Message::new(
        id,
        ShortStr::from_static("amq.direct"),
        ShortStr::from_static("bench"),
        ContentHeader {
            class_id: class_id::BASIC,
            weight: 0,
            body_size: body.len() as u64,
            properties: BasicProperties {
                delivery_mode: Some(if persistent { 2 } else { 1 }),
                ..Default::default()
            }
            .to_raw()
            .unwrap(),
        },
        body,
    )
}

fn queue(durable: bool) -> Queue {
    Queue::new(
        1,
        ShortStr::from_static("q"),
        durable,
        QueueArgs::default(),
        FieldTable::new(),
        0,
    )
}

fn apply(store: &Store, fx: &mut Effects) {
    store.submit(fx.writes.drain(..));
    for id in fx.releases.drain(..) {
        store.release(id);
    }
}

fn transient(c: &mut Criterion) {
    const N: u64 = 10_000;
    let msgs: Vec<_> = (0..N).map(|i| message(MessageId(i), false)).collect();
    let mut g = c.benchmark_group("transient");
    g.throughput(Throughput::Elements(N));
    g.bench_function("enqueue+dequeue 100B (per 10k)", |b| {
        let mut q = queue(false);
        let mut fx = Effects::default();
        b.iter(|| {
            for m in &msgs {
                q.publish(m, 0, &mut fx);
            }
            for _ in 0..N {
                let d = q.deliver(0, true, &mut fx).unwrap();
                q.ack(d.seq, &mut fx);
            }
            assert!(fx.is_empty());
        })
    });
    g.finish();
}

fn persistent(c: &mut Criterion) {
    const N: u64 = 20_000;
    const BATCH: u64 = 100; // publishes between commits
    const WINDOW: usize = 16; // outstanding commits (like a confirm window)
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("persistent");
    g.throughput(Throughput::Elements(N));
    g.sample_size(10);
    g.bench_function("enqueue+ack 100B, group commit (per 20k)", |b| {
        let mut q = queue(true);
        let mut fx = Effects::default();
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let mut outstanding = VecDeque::new();
                for _ in 0..N / BATCH {
                    for _ in 0..BATCH {
                        q.publish(&message(store.next_message_id(), true), 0, &mut fx);
                    }
                    apply(&store, &mut fx);
                    outstanding.push_back(store.commit());
                    if outstanding.len() >= WINDOW {
                        rt.block_on(outstanding.pop_front().unwrap()).unwrap();
                    }
                }
                for c in outstanding {
                    rt.block_on(c).unwrap();
                }
                while let Some(d) = q.deliver(0, true, &mut fx) {
                    q.ack(d.seq, &mut fx);
                }
                apply(&store, &mut fx);
            }
            rt.block_on(store.commit()).unwrap();
            start.elapsed()
        })
    });
    g.finish();
}

fn recovery(c: &mut Criterion) {
    const N: u64 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = Store::open(dir.path()).unwrap();
        let mut q = queue(true);
        let mut fx = Effects::default();
        for i in 0..N {
            q.publish(&message(store.next_message_id(), true), 0, &mut fx);
            if i % 10_000 == 0 {
                apply(&store, &mut fx);
            }
        }
        apply(&store, &mut fx);
        store.close().unwrap();
    }
    let mut g = c.benchmark_group("recovery");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(30));
    g.bench_function("open + recover 1M stored messages", |b| {
        b.iter(|| {
            let (store, mut recovered) = Store::open(dir.path()).unwrap();
            let entries = recovered.queues.remove(&1).unwrap();
            let q = Queue::recover(
                1,
                ShortStr::from_static("q"),
                QueueArgs::default(),
                FieldTable::new(),
                entries,
                recovered.clean_shutdown,
                0,
            );
            assert_eq!(q.ready_count(), N);
            store.close().unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, transient, persistent, recovery);
criterion_main!(benches);
