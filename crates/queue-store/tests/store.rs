//! The store on a real sled directory: commit points, recovery, reference
//! counts, orphans, schema checks, definitions.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::sync::Arc;

use amqp_codec::{FieldTable, FieldValue, ShortStr};
use bytes::Bytes;
use common::{apply, assert_intact, block_on, durable_queue, message, recover_queue};
use queue_store::{
    DefKind, Effects, SegmentLogStorage, Storage, Store, StoreError, Write, scoped_name,
};

#[test]
fn committed_messages_survive_reopen_and_acked_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let (kept, acked);
    {
        let (store, _) = Store::open(dir.path()).unwrap();
        let mut q = durable_queue(FieldTable::new());
        let mut fx = Effects::default();
        let a = message(&store, true, None);
        let b = message(&store, true, None);
        let transient = message(&store, false, None);
        q.publish(&a, 0, &mut fx);
        q.publish(&b, 0, &mut fx);
        q.publish(&transient, 0, &mut fx);
        apply(&store, &mut fx);
        block_on(store.commit()).unwrap();
        let d = q.deliver(0, true, &mut fx).unwrap();
        q.ack(d.seq, &mut fx);
        apply(&store, &mut fx);
        block_on(store.commit()).unwrap();
        (kept, acked) = (b.id, a.id);
        store.close().unwrap();
    }
    let (store, mut recovered) = Store::open(dir.path()).unwrap();
    assert!(recovered.clean_shutdown);
    assert_eq!(recovered.orphans_removed, 0);
    let mut q = recover_queue(&mut recovered, FieldTable::new());
    assert_eq!(
        q.ready_count(),
        1,
        "transient message in a durable queue is not kept"
    );
    let mut fx = Effects::default();
    let d = q.deliver(0, true, &mut fx).unwrap();
    assert_eq!(d.message.id(), kept);
    assert_intact(&store, kept);
    assert!(store.load(acked).unwrap().is_none());
    assert!(store.next_message_id().0 > kept.0, "ids are not reused");
}

#[test]
fn a_body_shared_by_two_queues_is_stored_once_and_deleted_with_the_last_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    // A body large enough to see in the log's size if it were written twice.
    let m = common::build(
        store.next_message_id(),
        Bytes::from(vec![7u8; 64 * 1024]),
        true,
        None,
    );
    let mut fx = Effects::default();
    let mut q1 = durable_queue(FieldTable::new());
    let parsed = queue_store::QueueArgs::default();
    let mut q2 = queue_store::Queue::new(
        2,
        ShortStr::from_static("q2"),
        true,
        parsed,
        FieldTable::new(),
        0,
    );
    q1.publish(&m, 0, &mut fx);
    q2.publish(&m, 0, &mut fx);
    apply(&store, &mut fx);
    block_on(store.commit()).unwrap();
    let writes_after_publish = store
        .stats()
        .writes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        writes_after_publish, 4,
        "a reference and two index entries each"
    );
    let log_octets: u64 = std::fs::read_dir(dir.path().join("log"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        (64 * 1024..96 * 1024).contains(&log_octets),
        "the body is written once: {log_octets} octets in the log"
    );

    let d = q1.deliver(0, true, &mut fx).unwrap();
    q1.ack(d.seq, &mut fx);
    apply(&store, &mut fx);
    block_on(store.commit()).unwrap();
    let kept = store.load(m.id).unwrap().expect("still referenced by q2");
    assert_eq!(kept.body, m.body);
    let d = q2.deliver(0, true, &mut fx).unwrap();
    q2.ack(d.seq, &mut fx);
    apply(&store, &mut fx);
    block_on(store.commit()).unwrap();
    assert!(store.load(m.id).unwrap().is_none());
}

#[test]
fn unreferenced_messages_are_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = Store::open(dir.path()).unwrap();
        let m = message(&store, true, None);
        // A body without any index entry: what a crash between an ack's index
        // delete and the body delete leaves behind.
        store.submit([Write::PutMessage(m)]);
        block_on(store.commit()).unwrap();
    }
    let (_store, recovered) = Store::open(dir.path()).unwrap();
    assert_eq!(recovered.orphans_removed, 1);
}

#[test]
fn a_data_dir_from_another_schema_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let storage = SegmentLogStorage::open(dir.path()).unwrap();
        storage
            .set_meta("schema", Some(&99u32.to_be_bytes()))
            .unwrap();
        storage.sync().unwrap();
    }
    match Store::open(dir.path()) {
        Err(StoreError::SchemaMismatch {
            found: 99,
            expected: queue_store::storage::SCHEMA_VERSION,
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn definitions_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let key = scoped_name("/", &[b"orders"]);
    let mut record = FieldTable::new();
    record.insert(ShortStr::from_static("durable"), FieldValue::Bool(true));
    record.insert(ShortStr::from_static("type"), FieldValue::from("topic"));
    {
        let (store, _) = Store::open(dir.path()).unwrap();
        store.submit([
            Write::PutDefinition {
                kind: DefKind::Exchange,
                key: key.clone(),
                value: record.clone(),
            },
            Write::PutDefinition {
                kind: DefKind::Vhost,
                key: Bytes::from_static(b"/"),
                value: FieldTable::new(),
            },
            Write::PutDefinition {
                kind: DefKind::Vhost,
                key: Bytes::from_static(b"gone"),
                value: FieldTable::new(),
            },
            Write::DeleteDefinition {
                kind: DefKind::Vhost,
                key: Bytes::from_static(b"gone"),
            },
        ]);
        block_on(store.commit()).unwrap();
    }
    let (_store, recovered) = Store::open(dir.path()).unwrap();
    let mut defs = recovered.definitions;
    defs.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    assert_eq!(
        defs,
        vec![
            (DefKind::Vhost, Bytes::from_static(b"/"), FieldTable::new()),
            (DefKind::Exchange, key, record),
        ]
    );
}

#[test]
fn many_concurrent_commits_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let store = Arc::new(store);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let m = message(&store, true, None);
                store.submit([Write::PutMessage(m)]);
                store.commit().await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    });
    let stats = store.stats();
    let syncs = stats.syncs.load(std::sync::atomic::Ordering::Relaxed);
    let commits = stats.commits.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(commits, 200);
    assert!(
        syncs < 200,
        "{syncs} fsyncs for 200 commits: no group commit"
    );
}

#[test]
fn a_locked_directory_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _) = Store::open(dir.path()).unwrap();
    let path = dir.path().to_path_buf();
    // Release the lock a little later, from another thread.
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        first.close().unwrap();
        drop(first);
    });
    let reopened = Store::open(&path);
    releaser.join().unwrap();
    assert!(reopened.is_ok(), "{:?}", reopened.err());
}

#[test]
fn the_flow_gate_rises_past_the_backlog_limit_and_lowers_when_written() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    store.set_backlog_limit(1000);
    let mut q = durable_queue(FieldTable::new());
    let mut fx = Effects::default();
    q.publish(&message(&store, true, None), 0, &mut fx);
    apply(&store, &mut fx);
    // One small message is within the limit (unless the writer took it already).
    let before = store.flow().raises();
    for _ in 0..100 {
        q.publish(&message(&store, true, None), 0, &mut fx);
    }
    // 100 messages at once: 100 × (body + 64) > 1000 octets behind.
    apply(&store, &mut fx);
    assert_eq!(store.flow().raises(), before + 1, "raised by the submit");
    block_on(store.commit()).unwrap();
    assert!(
        !store.flow().is_raised(),
        "lowered once the writer caught up"
    );
}

/// Message ids carry the store's node tag (so two nodes' stores never hand
/// out the same id); the tag is kept across reopens, and ids go on after
/// the highest stored one.
#[test]
fn message_ids_carry_the_stores_node_tag() {
    let dir = tempfile::tempdir().unwrap();
    let (tag, last) = {
        let (store, _) = Store::open(dir.path()).unwrap();
        let tag = store.node_tag();
        assert_ne!(tag, 0);
        let mut q = durable_queue(FieldTable::new());
        let mut fx = Effects::default();
        let m = message(&store, true, None);
        assert_eq!(m.id.node_tag(), tag);
        q.publish(&m, 0, &mut fx);
        apply(&store, &mut fx);
        block_on(store.commit()).unwrap();
        store.close().unwrap();
        (tag, m.id)
    };
    let (store, _) = Store::open(dir.path()).unwrap();
    assert_eq!(store.node_tag(), tag, "kept across a reopen");
    let next = store.next_message_id();
    assert_eq!(next.node_tag(), tag);
    assert!(next.counter() > last.counter(), "ids are not reused");
}
