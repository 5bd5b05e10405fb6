//! Publishing and consuming through lapin: the default exchange and every
//! exchange type, consumers with acks and prefetch, redelivery, `basic.get`,
//! mandatory returns, large multi-frame bodies, properties passing through.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use warren_tests::{TestBroker, channel_with_queue, next_deliveries, publish};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_get_and_get_empty() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "q").await;
    assert!(
        ch.basic_get("q".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .is_none()
    );
    publish(&ch, "q", b"one").await;
    publish(&ch, "q", b"two").await;
    let got = ch
        .basic_get("q".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.delivery.data, b"one");
    assert_eq!(got.message_count, 1);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_receives_in_order_and_acks() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "q").await;
    let mut consumer = ch
        .basic_consume(
            "q".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..100u32 {
        publish(&ch, "q", &i.to_be_bytes()).await;
    }
    let ds = next_deliveries(&mut consumer, 100).await;
    for (i, d) in ds.iter().enumerate() {
        assert_eq!(d.data, (i as u32).to_be_bytes());
        assert!(!d.redelivered);
    }
    ds.last()
        .unwrap()
        .ack(BasicAckOptions { multiple: true })
        .await
        .unwrap();
    let q = ch
        .queue_declare(
            "q".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 0);
    assert_eq!(q.consumer_count(), 1);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_limits_unacked_deliveries() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "q").await;
    for i in 0..10u8 {
        publish(&ch, "q", &[i]).await;
    }
    ch.basic_qos(3, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            "q".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let first = next_deliveries(&mut consumer, 3).await;
    // Nothing more arrives until an ack: the queue still holds 7.
    let q = ch
        .queue_declare(
            "q".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 7);
    first[2]
        .ack(BasicAckOptions { multiple: true })
        .await
        .unwrap();
    let next = next_deliveries(&mut consumer, 3).await;
    assert_eq!(next[0].data, [3]);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_requeues_to_the_original_position_and_close_redelivers() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let setup = channel_with_queue(&conn, "q").await;
    for i in 1..=3u8 {
        publish(&setup, "q", &[i]).await;
    }
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            "q".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let ds = next_deliveries(&mut consumer, 3).await;
    ds[1]
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let again = next_deliveries(&mut consumer, 1).await;
    assert_eq!(again[0].data, [2]);
    assert!(again[0].redelivered);
    // Closing the channel returns the rest, in order, marked redelivered.
    ch.close(200, "bye".into()).await.unwrap();
    let a = setup
        .basic_get("q".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    let b = setup
        .basic_get("q".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    let c = setup
        .basic_get("q".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        [a.delivery.data[0], b.delivery.data[0], c.delivery.data[0]],
        [1, 2, 3]
    );
    assert!(a.delivery.redelivered && b.delivery.redelivered && c.delivery.redelivered);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_through_every_exchange_type() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    for q in ["direct", "topic", "fanout1", "fanout2", "headers"] {
        ch.queue_declare(
            q.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    ch.queue_bind(
        "direct".into(),
        "amq.direct".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "topic".into(),
        "amq.topic".into(),
        "stock.*.nyse".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_declare(
        "fan".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "fanout1".into(),
        "fan".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "fanout2".into(),
        "fan".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut args = FieldTable::default();
    args.insert("x-match".into(), AMQPValue::LongString("any".into()));
    args.insert("region".into(), AMQPValue::LongString("eu".into()));
    ch.queue_bind(
        "headers".into(),
        "amq.headers".into(),
        "".into(),
        QueueBindOptions::default(),
        args,
    )
    .await
    .unwrap();

    let p = |ex: &'static str, rk: &'static str, props: BasicProperties| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                ex.into(),
                rk.into(),
                BasicPublishOptions::default(),
                b"m",
                props,
            )
            .await
            .unwrap();
        }
    };
    p("amq.direct", "k", BasicProperties::default()).await;
    p("amq.direct", "other", BasicProperties::default()).await;
    p("amq.topic", "stock.ibm.nyse", BasicProperties::default()).await;
    p("amq.topic", "stock.ibm.lse", BasicProperties::default()).await;
    p("fan", "whatever", BasicProperties::default()).await;
    let mut h = FieldTable::default();
    h.insert("region".into(), AMQPValue::LongString("eu".into()));
    p(
        "amq.headers",
        "",
        BasicProperties::default().with_headers(h),
    )
    .await;

    for (q, n) in [
        ("direct", 1),
        ("topic", 1),
        ("fanout1", 1),
        ("fanout2", 1),
        ("headers", 1),
    ] {
        let d = ch
            .queue_declare(
                q.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        assert_eq!(d.message_count(), n, "queue {q}");
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mandatory_unroutable_message_is_returned() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            "amq.direct".into(),
            "nowhere".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"lost",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    match confirm {
        lapin::Confirmation::Ack(Some(ret)) => {
            assert_eq!(ret.reply_code, 312);
            assert_eq!(ret.reply_text.as_str(), "NO_ROUTE");
            assert_eq!(ret.delivery.data, b"lost");
        }
        other => panic!("expected an ack carrying the returned message, got {other:?}"),
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_and_properties_pass_through() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "big").await;
    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut headers = FieldTable::default();
    headers.insert("n".into(), AMQPValue::LongLongInt(-5));
    let props = BasicProperties::default()
        .with_content_type("application/octet-stream".into())
        .with_correlation_id("c-1".into())
        .with_priority(3)
        .with_headers(headers.clone());
    ch.basic_publish(
        "".into(),
        "big".into(),
        BasicPublishOptions::default(),
        &body,
        props,
    )
    .await
    .unwrap();
    let got = ch
        .basic_get("big".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.delivery.data.len(), body.len());
    assert!(got.delivery.data == body);
    let p = &got.delivery.properties;
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/octet-stream")
    );
    assert_eq!(p.correlation_id().as_ref().map(|s| s.as_str()), Some("c-1"));
    assert_eq!(*p.priority(), Some(3));
    assert_eq!(p.headers().as_ref(), Some(&headers));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_to_exchange_bindings_route_until_unbound() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "q").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for name in ["src", "dst"] {
        ch.exchange_declare(
            name.into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    ch.queue_bind(
        "q".into(),
        "dst".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_bind(
        "dst".into(),
        "src".into(),
        "".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let publish_to_src = |body: &'static [u8]| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                "src".into(),
                "".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    };
    publish_to_src(b"bound").await;
    let got = ch
        .basic_get("q".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("message routed through the e2e binding");
    assert_eq!(got.delivery.data, b"bound");

    ch.exchange_unbind(
        "dst".into(),
        "src".into(),
        "".into(),
        ExchangeUnbindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish_to_src(b"unbound").await;
    let got = ch
        .basic_get("q".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap();
    assert!(got.is_none(), "unbound exchange still routed: {got:?}");
    broker.stop().await;
}
