//! Model-based test: random sequences of publish / deliver / ack / requeue /
//! reject / clock advances / close-and-reopen against a durable queue on a
//! real sled store, checked against a simple in-memory model after every step
//! and across every reopen. A small memory budget makes bodies page out too.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::collections::BTreeMap;

use amqp_codec::FieldTable;
use common::{apply, assert_intact, block_on, durable_queue, message, recover_queue};
use proptest::prelude::*;
use queue_store::{Delivery, Effects, MessageId, MessageRef, Queue, Store};

/// Small enough that a few messages page out, so paging is exercised too.
const MEMORY_BUDGET: u64 = 48;

#[derive(Debug, Clone)]
enum Op {
    Publish { persistent: bool, ttl: Option<u64> },
    Deliver,
    Ack(usize),
    Requeue(usize),
    Reject(usize),
    Advance(u64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<bool>(), prop::option::weighted(0.3, 0u64..50))
            .prop_map(|(persistent, ttl)| Op::Publish { persistent, ttl }),
        3 => Just(Op::Deliver),
        2 => any::<usize>().prop_map(Op::Ack),
        1 => any::<usize>().prop_map(Op::Requeue),
        1 => any::<usize>().prop_map(Op::Reject),
        1 => (1u64..40).prop_map(Op::Advance),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Clone, Copy)]
struct Expected {
    id: MessageId,
    persistent: bool,
    expires_at: u64,
    redelivered: bool,
}

#[derive(Default)]
struct Model {
    /// Ready messages by sequence number: FIFO, and requeues go back in place.
    ready: BTreeMap<u64, Expected>,
    /// Delivered, unacknowledged: (seq, message) in delivery order.
    unacked: Vec<(u64, Expected)>,
    now: u64,
}

impl Model {
    fn expire_heads(&mut self) {
        while let Some((&seq, m)) = self.ready.iter().next() {
            if m.expires_at != 0 && m.expires_at < self.now {
                self.ready.remove(&seq);
            } else {
                break;
            }
        }
    }
}

fn reopen(store: Store, dir: &std::path::Path) -> (Store, Queue) {
    store.close().unwrap();
    drop(store);
    let (store, mut recovered) = Store::open(dir).unwrap();
    assert!(recovered.clean_shutdown);
    let q = recover_queue(&mut recovered, FieldTable::new());
    (store, q)
}

/// Spill settings for the queue under test: none, or a spill directory with
/// a two-entry window and chunks of two, so a handful of messages spill.
fn configure(q: &mut Queue, spill: Option<&std::path::Path>) {
    q.set_memory_budget(MEMORY_BUDGET);
    if let Some(dir) = spill {
        q.set_spill_window(2, 2);
        q.set_spill_dir(Some(std::sync::Arc::from(dir)));
    }
}

/// Runs the spill I/O the queue asks for, as its owner's housekeeping task
/// does between operations; whether there was any.
fn run_spill_io(q: &mut Queue) -> bool {
    if !q.take_spill_io_wanted() {
        return false;
    }
    let io = q.spill_io();
    q.spill_io_done(io.run());
    true
}

/// `deliver`, waiting (here: running the read) when the head stalls on a
/// spilled chunk still on disk. A delivery that left the head stalled could
/// not expire what waits behind it: that happens once the chunk is read, as
/// the owner's housekeeping does.
fn deliver(q: &mut Queue, now: u64, ack: bool, fx: &mut Effects) -> Option<Delivery> {
    loop {
        match q.deliver(now, ack, fx) {
            None if run_spill_io(q) => continue,
            got => {
                while got.is_some() && run_spill_io(q) {
                    q.expire(now, fx);
                }
                return got;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn queue_and_store_match_the_model(ops in prop::collection::vec(op(), 1..60)) {
        check_model(ops, false)?;
    }

    #[test]
    fn a_queue_spilling_its_entries_matches_the_model(ops in prop::collection::vec(op(), 1..80)) {
        check_model(ops, true)?;
    }
}

fn check_model(ops: Vec<Op>, spill: bool) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let spill_dir = tempfile::tempdir().unwrap();
    let spill = spill.then(|| spill_dir.path());
    let (mut store, _) = Store::open(dir.path()).unwrap();
    let mut q = durable_queue(FieldTable::new());
    configure(&mut q, spill);
    let mut model = Model::default();
    let mut fx = Effects::default();
    let mut next_seq = 1;
    let (mut saw_spill, mut most_ready) = (false, 0);

    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Publish { persistent, ttl } => {
                let m = message(&store, persistent, ttl);
                q.publish(&m, model.now, &mut fx);
                model.ready.insert(
                    next_seq,
                    Expected {
                        id: m.id,
                        persistent,
                        expires_at: ttl.map_or(0, |t| model.now + t),
                        redelivered: false,
                    },
                );
                next_seq += 1;
            }
            Op::Deliver => {
                model.expire_heads();
                let got = deliver(&mut q, model.now, true, &mut fx);
                let want = model.ready.pop_first();
                // What expired behind the delivered message goes at once.
                model.expire_heads();
                match (got, want) {
                    (None, None) => {}
                    (Some(d), Some((seq, m))) => {
                        prop_assert_eq!(d.seq, seq);
                        prop_assert_eq!(d.message.id(), m.id);
                        prop_assert_eq!(d.redelivered, m.redelivered);
                        // Persistent and paged-out bodies are in the store.
                        if m.persistent || matches!(d.message, MessageRef::Paged(_)) {
                            assert_intact(&store, m.id);
                        }
                        model.unacked.push((seq, m));
                    }
                    (got, want) => prop_assert!(false, "queue gave {:?}, model {:?}", got, want),
                }
            }
            Op::Ack(i) | Op::Requeue(i) | Op::Reject(i) if !model.unacked.is_empty() => {
                let (seq, mut m) = model.unacked.remove(i % model.unacked.len());
                match op {
                    Op::Ack(_) => prop_assert!(q.ack(seq, &mut fx)),
                    Op::Reject(_) => prop_assert!(q.reject(seq, &mut fx)),
                    _ => {
                        prop_assert!(q.requeue(seq, &mut fx));
                        m.redelivered = true;
                        model.ready.insert(seq, m);
                    }
                }
            }
            Op::Ack(_) | Op::Requeue(_) | Op::Reject(_) => {}
            Op::Advance(ms) => model.now += ms,
            Op::Reopen => {
                // A clean shutdown: channels close, unacked messages return.
                for (seq, mut m) in model.unacked.drain(..) {
                    prop_assert!(q.requeue(seq, &mut fx));
                    m.redelivered = true;
                    model.ready.insert(seq, m);
                }
                apply(&store, &mut fx);
                (store, q) = reopen(store, dir.path());
                configure(&mut q, spill);
                // Only persistent messages survive a restart; sequence
                // numbers continue after the last survivor.
                model.ready.retain(|_, m| m.persistent);
                next_seq = model.ready.keys().next_back().map_or(1, |s| s + 1);
            }
        }
        apply(&store, &mut fx);
        // The owner catches up with the spill I/O between operations (every
        // other one, so that some deliveries find the head stalled).
        if step % 2 == 0 {
            run_spill_io(&mut q);
        }
        prop_assert_eq!(q.ready_count(), model.ready.len() as u64);
        saw_spill |= q.spilled_count() > 0;
        most_ready = most_ready.max(model.ready.len());
        prop_assert_eq!(q.unacked_count(), model.unacked.len() as u64);
    }
    // Finally everything left comes out in the model's order.
    block_on(store.commit()).unwrap();
    model.expire_heads();
    loop {
        model.expire_heads();
        let got =
            deliver(&mut q, model.now, false, &mut fx).map(|d| (d.message.id(), d.redelivered));
        let want = model.ready.pop_first().map(|(_, m)| (m.id, m.redelivered));
        model.expire_heads();
        prop_assert_eq!(got, want);
        if got.is_none() {
            break;
        }
    }
    if spill.is_some() && most_ready >= 6 {
        prop_assert!(
            saw_spill,
            "{} ready messages and nothing spilled",
            most_ready
        );
    }
    Ok(())
}
