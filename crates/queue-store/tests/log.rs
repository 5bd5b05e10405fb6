//! Model-based test of the log engine itself ([`SegmentLogStorage`]): random batches
//! of message and index-entry puts, supersedes, messages shared by several
//! queues (reference counts), deletes and whole-queue index deletes, with
//! reopens, checked against a map. Long runs with a few records
//! that live for ever make segments get removed, stripped and compacted; what
//! replay rebuilds must always equal the model, and the log must not grow
//! with traffic that was acknowledged.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::BTreeMap;
use std::sync::Arc;

mod common;

use bytes::Bytes;
use proptest::prelude::*;
use queue_store::{IndexEntry, Message, MessageId, SegmentLogStorage, Storage, Write};

fn message(id: u64) -> Arc<Message> {
    common::build(
        MessageId(id),
        Bytes::from(format!("body of {id}")),
        true,
        None,
    )
}

#[derive(Debug, Clone)]
enum Op {
    /// Publish a message to queue `q % 3`.
    Put(u8),
    /// Acknowledge the `n % len`-th stored entry.
    Ack(usize),
    /// Requeue it (rewrite its index entry).
    Requeue(usize),
    /// Route its message to the next queue as well (a second reference).
    Share(usize),
    /// Delete queue `q % 2 + 1`'s whole index, and its messages.
    DeleteQueue(u8),
    /// End the batch (apply it).
    Commit,
    /// Close and reopen.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => any::<u8>().prop_map(Op::Put),
        5 => any::<usize>().prop_map(Op::Ack),
        2 => any::<usize>().prop_map(Op::Requeue),
        2 => any::<usize>().prop_map(Op::Share),
        1 => any::<u8>().prop_map(Op::DeleteQueue),
        6 => Just(Op::Commit),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    /// (queue, seq) -> entry.
    index: BTreeMap<(u64, u64), IndexEntry>,
    /// Stored message ids, with the index entries referencing each.
    messages: BTreeMap<u64, u32>,
    next: u64,
}

/// Opens the engine with small segments: a few batches fill one, so records
/// are removed, stripped and compacted within a short run.
fn open(dir: &std::path::Path) -> SegmentLogStorage {
    let s = SegmentLogStorage::open(dir).unwrap();
    s.set_segment_target(400);
    s
}

/// Drops a reference; the last one removes the message.
fn release(model: &mut Model, id: u64) {
    let refs = model.messages.get_mut(&id).unwrap();
    *refs -= 1;
    if *refs == 0 {
        model.messages.remove(&id);
    }
}

fn check(s: &SegmentLogStorage, model: &Model) {
    let mut ids = s.message_ids().unwrap();
    ids.sort();
    let expected: Vec<MessageId> = model.messages.keys().map(|&i| MessageId(i)).collect();
    assert_eq!(ids, expected, "stored messages");
    for &id in model.messages.keys() {
        let m = s
            .message(MessageId(id))
            .unwrap()
            .expect("stored message readable");
        assert_eq!(m.body, Bytes::from(format!("body of {id}")));
    }
}

fn check_index(s: &SegmentLogStorage, model: &Model) {
    let index: Vec<(u64, u64, IndexEntry)> = s.index().unwrap();
    let expected: Vec<(u64, u64, IndexEntry)> = model
        .index
        .iter()
        .map(|(&(q, seq), &e)| (q, seq, e))
        .collect();
    assert_eq!(index, expected, "replayed index");
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    let mut model = Model::default();
    let mut batch: Vec<Write> = Vec::new();
    // Two messages that stay for the whole run pin their first segment.
    let mut ops = ops;
    ops.insert(0, Op::Put(0));
    ops.insert(0, Op::Put(0));
    for op in ops {
        match op {
            Op::Put(q) => {
                model.next += 1;
                let id = model.next;
                let entry = IndexEntry {
                    message: MessageId(id),
                    size: 7,
                    ..IndexEntry::default()
                };
                batch.push(Write::PutMessage(message(id)));
                batch.push(Write::PutIndex {
                    queue: u64::from(q % 3),
                    seq: id,
                    entry,
                });
                model.index.insert((u64::from(q % 3), id), entry);
                model.messages.insert(id, 1);
            }
            Op::Share(n) if model.index.len() > 2 => {
                let k = *model
                    .index
                    .keys()
                    .nth(2 + n % (model.index.len() - 2))
                    .unwrap();
                let message_id = model.index[&k].message;
                model.next += 1;
                let (queue, seq) = ((k.0 + 1) % 3, model.next);
                let entry = IndexEntry {
                    message: message_id,
                    size: 7,
                    ..IndexEntry::default()
                };
                batch.push(Write::PutMessage(message(message_id.0)));
                batch.push(Write::PutIndex { queue, seq, entry });
                model.index.insert((queue, seq), entry);
                *model.messages.get_mut(&message_id.0).unwrap() += 1;
            }
            Op::Share(_) => {}
            Op::Ack(n) | Op::Requeue(n) if model.index.len() > 2 => {
                // The two oldest, (0, 1) and (0, 2), stay for ever.
                let k = *model
                    .index
                    .keys()
                    .nth(2 + n % (model.index.len() - 2))
                    .unwrap();
                if matches!(op, Op::Ack(_)) {
                    let e = model.index.remove(&k).unwrap();
                    batch.push(Write::DeleteIndex {
                        queue: k.0,
                        seq: k.1,
                    });
                    release(&mut model, e.message.0);
                    batch.push(Write::DeleteMessage(e.message));
                } else {
                    let e = model.index.get_mut(&k).unwrap();
                    e.delivered = true;
                    e.delivery_count += 1;
                    batch.push(Write::PutIndex {
                        queue: k.0,
                        seq: k.1,
                        entry: *e,
                    });
                }
            }
            Op::Ack(_) | Op::Requeue(_) => {}
            Op::DeleteQueue(q) => {
                let q = u64::from(q % 2) + 1; // never queue 0, which has the pinned ones
                batch.push(Write::DeleteQueueIndex { queue: q });
                let gone: Vec<(u64, u64)> =
                    model.index.keys().filter(|k| k.0 == q).copied().collect();
                for k in gone {
                    let e = model.index.remove(&k).unwrap();
                    release(&mut model, e.message.0);
                    batch.push(Write::DeleteMessage(e.message));
                }
            }
            Op::Commit => {
                s.apply(&batch).unwrap();
                batch.clear();
                check(&s, &model);
            }
            Op::Reopen => {
                s.apply(&batch).unwrap();
                batch.clear();
                s.sync().unwrap();
                drop(s);
                s = open(dir.path());
                check_index(&s, &model);
                check(&s, &model);
            }
        }
    }
    s.apply(&batch).unwrap();
    // Acknowledge everything but the two pinned messages, then push traffic
    // through: the log must shrink to a handful of segments.
    let rest: Vec<(u64, u64)> = model.index.keys().skip(2).copied().collect();
    for k in rest {
        let e = model.index.remove(&k).unwrap();
        release(&mut model, e.message.0);
        s.apply(&[
            Write::DeleteIndex {
                queue: k.0,
                seq: k.1,
            },
            Write::DeleteMessage(e.message),
        ])
        .unwrap();
    }
    for i in 0..200u64 {
        let id = 1_000_000 + i;
        s.apply(&[
            Write::PutMessage(message(id)),
            Write::DeleteMessage(MessageId(id)),
        ])
        .unwrap();
    }
    // A handful, and the one being filled.
    assert!(s.segments() <= 5, "{} segments left: {s:?}", s.segments());
    drop(s);
    let s = open(dir.path());
    check_index(&s, &model);
    check(&s, &model);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_log_replays_to_the_model(ops in prop::collection::vec(op(), 1..400)) {
        run(ops);
    }
}
