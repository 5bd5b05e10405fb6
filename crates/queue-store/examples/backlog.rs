//! Backlog measurement: publish N 100-byte persistent messages into one
//! durable queue with no consumer, then drain it, reporting both rates and the
//! process's peak RSS. Paged bodies are loaded back from the store while
//! draining, as the broker does.
//!
//! ```sh
//! cargo run --release -p queue-store --example backlog -- 10000000
//! ```

// An example that meets an error should stop loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use amqp_codec::{BasicProperties, ContentHeader, FieldTable, ShortStr, class_id};
use bytes::Bytes;
use queue_store::{Effects, Message, MessageRef, Queue, QueueArgs, Store};

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map_or(1_000_000, |a| a.parse().expect("a count"));
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut q = Queue::new(
        1,
        ShortStr::from_static("backlog"),
        true,
        QueueArgs::default(),
        FieldTable::new(),
        0,
    );
    // Entries behind the in-memory window go to spill files, as in the broker.
    let spill = dir.path().join("spill");
    std::fs::create_dir_all(&spill).unwrap();
    q.set_spill_dir(Some(std::sync::Arc::from(spill.as_path())));
    let mut fx = Effects::default();
    let header = ContentHeader {
        class_id: class_id::BASIC,
        weight: 0,
        body_size: 100,
        properties: BasicProperties {
            delivery_mode: Some(2),
            ..Default::default()
        }
        .to_raw()
        .unwrap(),
    };
    let body = Bytes::from(vec![7u8; 100]);
    let rss_before = rss_kib("VmRSS:");

    let start = Instant::now();
    for i in 0..n {
        let m = Message::new(
            store.next_message_id(),
            ShortStr::from_static(""),
            ShortStr::from_static("backlog"),
            header.clone(),
            body.clone(),
        );
        q.publish(&m, 0, &mut fx);
        if i % 1000 == 999 {
            store.submit(fx.writes.drain(..));
            // Keep a bounded amount of unsynced work, as confirms would.
            if i % 100_000 == 99_999 {
                rt.block_on(store.commit()).unwrap();
            }
        }
    }
    store.submit(fx.writes.drain(..));
    rt.block_on(store.commit()).unwrap();
    let publish = start.elapsed();
    let rss_full = rss_kib("VmRSS:");

    let start = Instant::now();
    let mut drained = 0u64;
    while let Some(d) = q.deliver(0, false, &mut fx) {
        let m = match d.message {
            MessageRef::Loaded(m) => m,
            MessageRef::Paged(id) => store.load(id).unwrap().expect("paged body in the store"),
        };
        assert_eq!(m.body.len(), 100);
        drained += 1;
        if drained % 1000 == 0 {
            store.submit(fx.writes.drain(..));
            for id in fx.releases.drain(..) {
                store.release(id);
            }
        }
    }
    store.submit(fx.writes.drain(..));
    for id in fx.releases.drain(..) {
        store.release(id);
    }
    rt.block_on(store.commit()).unwrap();
    let drain = start.elapsed();
    assert_eq!(drained, n);
    println!(
        "{{\"messages\":{n},\"publish_per_s\":{:.0},\"drain_per_s\":{:.0},\"rss_before_mib\":{},\"rss_full_mib\":{},\"peak_rss_mib\":{},\"rss_bytes_per_message\":{:.1}}}",
        n as f64 / publish.as_secs_f64(),
        n as f64 / drain.as_secs_f64(),
        rss_before / 1024,
        rss_full / 1024,
        rss_kib("VmHWM:") / 1024,
        (rss_full.saturating_sub(rss_before) * 1024) as f64 / n as f64,
    );
}
