//! Tests for defects found in review, each named after what it guards.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use amqp_codec::methods::*;
use amqp_codec::{
    BasicProperties, ContentHeader, Method, ShortStr, encode_body, encode_content_header,
    encode_method,
};
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use warren_tests::{
    RawClient, TestBroker, channel_with_queue, consume_no_ack, next_deliveries, publish,
};

fn s(v: &'static str) -> ShortStr {
    ShortStr::from_static(v)
}

fn publish_frames(
    exchange: &'static str,
    key: &'static str,
    body: &[u8],
    props: BasicProperties,
) -> bytes::BytesMut {
    let mut buf = bytes::BytesMut::new();
    encode_method(
        &mut buf,
        1,
        &BasicPublish {
            exchange: s(exchange),
            routing_key: s(key),
            ..Default::default()
        }
        .into(),
    )
    .unwrap();
    let header = ContentHeader {
        class_id: 60,
        weight: 0,
        body_size: body.len() as u64,
        properties: props.to_raw().unwrap(),
    };
    encode_content_header(&mut buf, 1, &header).unwrap();
    encode_body(&mut buf, 1, body, 131_072).unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_pipelined_after_a_channel_error_do_not_kill_the_connection() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open(broker.addr).await;
    // Two publishes in one write: the first fails (no such exchange), the
    // second's frames arrive while the channel is closing.
    let mut both = publish_frames("nope", "k", b"a", BasicProperties::default());
    both.extend_from_slice(&publish_frames(
        "nope",
        "k",
        b"b",
        BasicProperties::default(),
    ));
    c.send_raw(&both).await;
    assert!(matches!(
        c.method().await,
        Some(Method::ChannelClose(ChannelClose {
            reply_code: 404,
            ..
        }))
    ));
    c.send(1, ChannelCloseOk {}.into()).await;
    c.send(1, ChannelOpen::default().into()).await;
    assert!(
        matches!(c.method().await, Some(Method::ChannelOpenOk(_))),
        "connection survived"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_expiration_is_refused() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open(broker.addr).await;
    c.send(
        1,
        QueueDeclare {
            queue: s("q"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(c.method().await, Some(Method::QueueDeclareOk(_))));
    let props = BasicProperties {
        expiration: Some(s("18446744073709551615")),
        ..Default::default()
    };
    c.send_raw(&publish_frames("", "q", b"x", props)).await;
    match c.method().await {
        Some(Method::ChannelClose(close)) => {
            assert_eq!(close.reply_code, 406);
            assert!(
                close.reply_text.contains("invalid expiration"),
                "{}",
                close.reply_text
            );
        }
        other => panic!("{other:?}"),
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_out_messages_reach_a_waiting_consumer() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(dir.path(), |c| c.queue_memory_budget = 1024).await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "paged").await;
    let mut consumer = consume_no_ack(&ch, "paged").await;
    for i in 0..20u8 {
        publish(&ch, "paged", &[i; 1000]).await;
    }
    let got = next_deliveries(&mut consumer, 20).await;
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d.data, vec![i as u8; 1000]);
    }
    broker.stop().await;
}

/// A backlog whose bodies are paged out (the queue keeps 1 KiB in memory)
/// is loaded back a batch at a time off the queue's lock: `basic.get` and a
/// consumer with a prefetch get every message, whole and in order, across
/// many page-in batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_backlog_comes_back_whole_and_in_order() {
    const N: u32 = 300;
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(dir.path(), |c| c.queue_memory_budget = 1024).await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "backlog").await;
    let body = |i: u32| [&i.to_be_bytes()[..], &[(i % 251) as u8; 996]].concat();
    for i in 0..N {
        publish(&ch, "backlog", &body(i)).await;
    }
    for i in 0..5 {
        let got = ch
            .basic_get("backlog".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("a message");
        assert_eq!(got.delivery.data, body(i), "get {i}");
    }
    ch.basic_qos(7, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            "backlog".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 5..N {
        let d = next_deliveries(&mut consumer, 1).await.remove(0);
        assert_eq!(d.data, body(i), "delivery {i}");
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    broker.stop().await;
}

/// Dead letters whose bodies are paged out (the queue keeps 1 KiB in
/// memory) are read off the runtime's workers and published whole, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_out_messages_are_dead_lettered_whole() {
    const N: u32 = 60;
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(dir.path(), |c| c.queue_memory_budget = 1024).await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "dead").await;
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString("dead".into()),
    );
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(300));
    ch.queue_declare("expiring".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    let body = |i: u32| [&i.to_be_bytes()[..], &[(i % 251) as u8; 996]].concat();
    for i in 0..N {
        publish(&ch, "expiring", &body(i)).await;
    }
    let mut consumer = consume_no_ack(&ch, "dead").await;
    let got = next_deliveries(&mut consumer, N as usize).await;
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d.data, body(i as u32), "dead letter {i}");
        let headers = d.properties.headers().as_ref().expect("headers");
        assert!(
            headers.inner().contains_key("x-death"),
            "dead letter {i} has x-death"
        );
    }
    assert_eq!(warren_tests::ready_count(&ch, "expiring").await, 0);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_reach_a_headers_exchange_by_their_headers() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "dlq".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut bind = FieldTable::default();
    bind.insert("x-match".into(), AMQPValue::LongString("all".into()));
    bind.insert("kind".into(), AMQPValue::LongString("order".into()));
    ch.queue_bind(
        "dlq".into(),
        "amq.headers".into(),
        "".into(),
        QueueBindOptions::default(),
        bind,
    )
    .await
    .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("amq.headers".into()),
    );
    ch.queue_declare("work".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    let mut headers = FieldTable::default();
    headers.insert("kind".into(), AMQPValue::LongString("order".into()));
    ch.basic_publish(
        "".into(),
        "work".into(),
        BasicPublishOptions::default(),
        b"x",
        lapin::BasicProperties::default().with_headers(headers),
    )
    .await
    .unwrap();
    let got = ch
        .basic_get("work".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    got.delivery
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    let dead = ch
        .basic_get("dlq".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap();
    assert!(dead.is_some(), "the dead letter was routed by its headers");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_tag_can_be_reused_after_the_broker_cancelled_it() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "a").await;
    let _c = ch
        .basic_consume(
            "a".into(),
            "tag".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let other = broker.connect().await;
    other
        .create_channel()
        .await
        .unwrap()
        .queue_delete("a".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    // Same channel, same tag, another queue: accepted (the broker forgot the
    // cancelled consumer).
    ch.queue_declare(
        "b".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let _again = ch
        .basic_consume(
            "b".into(),
            "tag".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("tag reuse refused");
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    broker.stop().await;
}
