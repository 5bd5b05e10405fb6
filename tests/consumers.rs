//! Consumer-side protocol details: exclusive consumers, broker-initiated
//! `basic.cancel` when a queue is deleted, `channel.flow` (refused as RabbitMQ
//! does), channel-wide
//! prefetch (`basic.qos` global), consumer tag reuse.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use amqp_codec::methods::*;
use amqp_codec::{Method, ShortStr};
use lapin::options::*;
use lapin::types::FieldTable;
use warren_tests::{RawClient, TestBroker, channel_with_queue, next_deliveries, publish};

fn s(v: &'static str) -> ShortStr {
    ShortStr::from_static(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_consumer_locks_out_others() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "q").await;
    let _first = ch
        .basic_consume(
            "q".into(),
            "first".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let other = conn.create_channel().await.unwrap();
    // lapin may hand back the consumer before it processes the channel.close
    // that answers it; the next synchronous call on the channel surfaces it.
    let r = other
        .basic_consume(
            "q".into(),
            "second".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    warren_tests::assert_closed_by_broker(
        r,
        &other,
        403,
        "queue 'q' in vhost '/' in exclusive use",
    )
    .await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_queue_cancels_its_consumers() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open_with(broker.addr, &["consumer_cancel_notify"], "/").await;
    c.send(
        1,
        QueueDeclare {
            queue: s("doomed"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(c.method().await, Some(Method::QueueDeclareOk(_))));
    c.send(
        1,
        BasicConsume {
            queue: s("doomed"),
            consumer_tag: s("ctag"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(c.method().await, Some(Method::BasicConsumeOk(_))));

    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete("doomed".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    match c.method().await {
        Some(Method::BasicCancel(cancel)) => assert_eq!(cancel.consumer_tag, "ctag"),
        other => panic!("expected basic.cancel, got {other:?}"),
    }
    broker.stop().await;
}

/// RabbitMQ 3.x answers a client's `channel.flow(active=false)` with 540
/// NOT_IMPLEMENTED, closing the connection (the spec's pause is not
/// offered); `active=true` is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_flow_inactive_is_not_implemented() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open(broker.addr).await;
    c.send(1, ChannelFlow { active: true }.into()).await;
    assert!(matches!(
        c.method().await,
        Some(Method::ChannelFlowOk(ChannelFlowOk { active: true }))
    ));
    c.send(1, ChannelFlow { active: false }.into()).await;
    match c.method().await {
        Some(Method::ConnectionClose(close)) => {
            assert_eq!(close.reply_code, 540);
            assert_eq!(close.reply_text.as_str(), "NOT_IMPLEMENTED - active=false");
            assert_eq!((close.class_id, close.method_id), (20, 20));
        }
        other => panic!("expected connection.close 540, got {other:?}"),
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_prefetch_is_shared_by_the_channel() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    for q in ["a", "b"] {
        ch.queue_declare(
            q.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        for _ in 0..5 {
            publish(&ch, q, b"m").await;
        }
    }
    ch.basic_qos(4, BasicQosOptions { global: true })
        .await
        .unwrap();
    let mut ca = ch
        .basic_consume(
            "a".into(),
            "ca".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut cb = ch
        .basic_consume(
            "b".into(),
            "cb".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let da = next_deliveries(&mut ca, 4).await;
    let probe = conn.create_channel().await.unwrap();
    let qb = probe
        .queue_declare(
            "b".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        qb.message_count(),
        5,
        "the channel's 4 slots went to the first consumer"
    );
    da[3].ack(BasicAckOptions { multiple: true }).await.unwrap();
    let db = next_deliveries(&mut cb, 1).await;
    assert_eq!(db.len(), 1);
    broker.stop().await;
}

/// One channel, a channel-wide prefetch of 1, consumers on two queues that
/// both hold plenty: acking each delivery must not hand the credit back to
/// the same queue every time (the other queue would starve).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_prefetch_serves_every_queue_in_turn() {
    use futures_util::StreamExt;
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    for q in ["a", "b"] {
        ch.queue_declare(
            q.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        for _ in 0..20 {
            publish(&ch, q, b"m").await;
        }
    }
    ch.basic_qos(1, BasicQosOptions { global: true })
        .await
        .unwrap();
    let mut consumers = Vec::new();
    for q in ["a", "b"] {
        consumers.push(
            ch.basic_consume(
                q.into(),
                format!("c-{q}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap(),
        );
    }
    let mut merged = futures_util::stream::select_all(consumers);
    let mut from = std::collections::HashMap::<String, usize>::new();
    for _ in 0..20 {
        let d = tokio::time::timeout(std::time::Duration::from_secs(10), merged.next())
            .await
            .expect("a delivery")
            .expect("consumers open")
            .unwrap();
        *from.entry(d.routing_key.to_string()).or_default() += 1;
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let (a, b) = (from.get("a").copied(), from.get("b").copied());
    assert!(
        a.unwrap_or(0) >= 5 && b.unwrap_or(0) >= 5,
        "each queue gets a fair share of 20 deliveries: a {a:?}, b {b:?}"
    );
    broker.stop().await;
}
