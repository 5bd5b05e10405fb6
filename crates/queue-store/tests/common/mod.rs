//! Helpers shared by the queue-store integration tests: building messages and
//! applying a queue's effects to a store the way the server does.
#![allow(dead_code)] // each test binary uses a different subset
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use amqp_codec::{BasicProperties, ContentHeader, FieldTable, ShortStr, class_id};
use bytes::Bytes;
use queue_store::{Effects, Message, MessageId, Queue, QueueArgs, Store};

/// A message whose body names its id, so recovery can check it.
pub(crate) fn message(store: &Store, persistent: bool, expiration: Option<u64>) -> Arc<Message> {
    let id = store.next_message_id();
    build(
        id,
        Bytes::from(format!("message {}", id.0)),
        persistent,
        expiration,
    )
}

/// A message with the given id and body.
pub(crate) fn build(
    id: MessageId,
    body: Bytes,
    persistent: bool,
    expiration: Option<u64>,
) -> Arc<Message> {
    Message::new(
        id,
        ShortStr::from_static("amq.direct"),
        ShortStr::from_static("k"),
        ContentHeader {
            class_id: class_id::BASIC,
            weight: 0,
            body_size: body.len() as u64,
            properties: BasicProperties {
                delivery_mode: Some(if persistent { 2 } else { 1 }),
                expiration: expiration.map(|e| ShortStr::try_from(e.to_string()).unwrap()),
                ..Default::default()
            }
            .to_raw()
            .unwrap(),
        },
        body,
    )
}

/// Checks that a stored message is the one its id says.
pub(crate) fn assert_intact(store: &Store, id: MessageId) {
    let m = store
        .load(id)
        .unwrap()
        .unwrap_or_else(|| panic!("message {id:?} missing"));
    assert_eq!(m.body, Bytes::from(format!("message {}", id.0)));
}

/// Submits a queue's writes and releases, as the server does.
pub(crate) fn apply(store: &Store, fx: &mut Effects) {
    store.submit(fx.writes.drain(..));
    for id in fx.releases.drain(..) {
        store.release(id);
    }
    fx.dead_letters.clear();
    fx.discarded.clear();
}

/// A durable queue named "q" with storage id 1.
pub(crate) fn durable_queue(args: FieldTable) -> Queue {
    let parsed = QueueArgs::parse(&args, "q", "/").unwrap();
    Queue::new(1, ShortStr::from_static("q"), true, parsed, args, 0)
}

/// Rebuilds queue 1 from what the store recovered.
pub(crate) fn recover_queue(recovered: &mut queue_store::Recovered, args: FieldTable) -> Queue {
    let parsed = QueueArgs::parse(&args, "q", "/").unwrap();
    let entries = recovered.queues.remove(&1).unwrap_or_default();
    Queue::recover(
        1,
        ShortStr::from_static("q"),
        parsed,
        args,
        entries,
        recovered.clean_shutdown,
        0,
    )
}

/// A current-thread runtime for awaiting commits.
pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}
