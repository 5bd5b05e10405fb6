//! Delivery semantics beyond the basics (issue #6): consumer priorities,
//! single active consumer, the consumer (acknowledgement) timeout in both its
//! RabbitMQ form and Warren's cancel-only form, and broker limits.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use warren_tests::{TestBroker, channel_with_queue, next_deliveries, publish, ready_count};

fn priority(p: i32) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-priority".into(), AMQPValue::LongInt(p));
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_consumers_are_served_first() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "q").await;
    let low_ch = conn.create_channel().await.unwrap();
    let high_ch = conn.create_channel().await.unwrap();
    high_ch
        .basic_qos(2, BasicQosOptions::default())
        .await
        .unwrap();
    let mut low = low_ch
        .basic_consume(
            "q".into(),
            "low".into(),
            BasicConsumeOptions::default(),
            priority(1),
        )
        .await
        .unwrap();
    let mut high = high_ch
        .basic_consume(
            "q".into(),
            "high".into(),
            BasicConsumeOptions::default(),
            priority(10),
        )
        .await
        .unwrap();
    for i in 0..5u8 {
        publish(&ch, "q", &[i]).await;
    }
    // The high-priority consumer takes what its prefetch allows; the rest go low.
    let h = next_deliveries(&mut high, 2).await;
    let l = next_deliveries(&mut low, 3).await;
    assert_eq!(h.iter().map(|d| d.data[0]).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(l.iter().map(|d| d.data[0]).collect::<Vec<_>>(), [2, 3, 4]);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_active_consumer_hands_over_in_registration_order() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    ch.queue_declare("sac".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    let first_ch = conn.create_channel().await.unwrap();
    let second_ch = conn.create_channel().await.unwrap();
    let mut first = first_ch
        .basic_consume(
            "sac".into(),
            "first".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut second = second_ch
        .basic_consume(
            "sac".into(),
            "second".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..4u8 {
        publish(&ch, "sac", &[i]).await;
    }
    let got = next_deliveries(&mut first, 4).await;
    got[0].ack(BasicAckOptions::default()).await.unwrap();
    // The active consumer's channel goes away: its unacked messages come back
    // first, and the next consumer takes over.
    first_ch.close(200, "bye".into()).await.unwrap();
    let taken = next_deliveries(&mut second, 3).await;
    assert_eq!(
        taken.iter().map(|d| d.data[0]).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(taken.iter().all(|d| d.redelivered));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_timeout_closes_the_channel_like_rabbitmq() {
    use amqp_codec::methods::{BasicConsume, QueueDeclare};
    use amqp_codec::{Method, ShortStr};
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(dir.path(), |c| {
        c.consumer_timeout = Duration::from_millis(200)
    })
    .await;
    let mut c = warren_tests::RawClient::open(broker.addr).await;
    c.send(
        1,
        QueueDeclare {
            queue: ShortStr::from_static("slow"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(c.method().await, Some(Method::QueueDeclareOk(_))));
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    publish(&ch, "slow", b"never acked").await;
    c.send(
        1,
        BasicConsume {
            queue: ShortStr::from_static("slow"),
            consumer_tag: ShortStr::from_static("c"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(c.method().await, Some(Method::BasicConsumeOk(_))));
    assert!(matches!(c.method().await, Some(Method::BasicDeliver(_))));
    // Never ack: the broker closes the channel.
    let close = tokio::time::timeout(Duration::from_secs(5), c.method())
        .await
        .expect("no channel.close within 5 s");
    match close {
        Some(Method::ChannelClose(close)) => {
            assert_eq!(close.reply_code, 406);
            assert_eq!(
                close.reply_text,
                "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout value used: 200 ms. This timeout value can be configured, see consumers doc guide to learn more"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        ready_count(&ch, "slow").await,
        1,
        "the message went back to the queue"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_timeout_can_cancel_only_the_consumer() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(dir.path(), |c| {
        c.consumer_timeout = Duration::from_millis(200);
        c.consumer_timeout_cancels_consumer = true;
    })
    .await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "slow").await;
    publish(&ch, "slow", b"never acked").await;
    let mut consumer = ch
        .basic_consume(
            "slow".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    next_deliveries(&mut consumer, 1).await;
    let mut requeued = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if ready_count(&ch, "slow").await == 1 {
            requeued = true;
            break;
        }
    }
    assert!(
        requeued,
        "the timed-out consumer's message was not requeued"
    );
    // The channel itself is still open and usable.
    ch.basic_qos(5, BasicQosOptions::default()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(dir.path(), |c| {
        c.max_connections = 1;
        c.max_consumers_per_channel = 1;
    })
    .await;
    let conn = broker.connect().await;
    let second =
        lapin::Connection::connect(&broker.uri(), lapin::ConnectionProperties::default()).await;
    let e = second.expect_err("over the connection limit");
    if let Some((code, text)) = warren_tests::amqp_error(&e) {
        assert_eq!(code, 530);
        assert!(text.contains("connection limit (1) is reached"), "{text}");
    }
    let ch = channel_with_queue(&conn, "q").await;
    let _c1 = ch
        .basic_consume(
            "q".into(),
            "one".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let r = ch
        .basic_consume(
            "q".into(),
            "two".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    warren_tests::assert_closed_by_broker(
        r,
        &ch,
        406,
        "reached the limit of 1 consumers per channel",
    )
    .await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_round_trip() {
    let broker = TestBroker::start().await;
    let client = broker.connect().await;
    let server = broker.connect().await;
    let cch = channel_with_queue(&client, "rpc").await;
    let mut replies = cch
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    cch.basic_publish(
        "".into(),
        "rpc".into(),
        BasicPublishOptions::default(),
        b"ping",
        lapin::BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id("42".into()),
    )
    .await
    .unwrap();
    let sch = server.create_channel().await.unwrap();
    let request = loop {
        if let Some(m) = sch
            .basic_get("rpc".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            break m;
        }
        tokio::task::yield_now().await;
    };
    let reply_to = request
        .delivery
        .properties
        .reply_to()
        .clone()
        .unwrap()
        .to_string();
    assert!(reply_to.starts_with("amq.rabbitmq.reply-to."), "{reply_to}");
    sch.basic_publish(
        "".into(),
        reply_to.as_str().into(),
        BasicPublishOptions::default(),
        b"pong",
        lapin::BasicProperties::default().with_correlation_id("42".into()),
    )
    .await
    .unwrap();
    let reply = next_deliveries(&mut replies, 1).await.remove(0);
    assert_eq!(reply.data, b"pong");
    assert_eq!(reply.routing_key.as_str(), reply_to);

    // Passive declares, as RabbitMQ answers them: the pseudo-queue and a
    // live reply address each have one consumer; a dead address is 404.
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    for name in ["amq.rabbitmq.reply-to", reply_to.as_str()] {
        let q = sch
            .queue_declare(name.into(), passive, FieldTable::default())
            .await
            .unwrap();
        assert_eq!((q.message_count(), q.consumer_count()), (0, 1), "{name}");
    }
    cch.close(200, "done".into()).await.unwrap();
    let r = sch
        .queue_declare(reply_to.as_str().into(), passive, FieldTable::default())
        .await;
    warren_tests::assert_amqp_error(r, 404, "NOT_FOUND");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_errors() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    warren_tests::assert_closed_by_broker(r, &ch, 406, "reply consumer cannot acknowledge").await;
    let ch = channel_with_queue(&conn, "rpc").await;
    ch.basic_publish(
        "".into(),
        "rpc".into(),
        BasicPublishOptions::default(),
        b"x",
        lapin::BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
    )
    .await
    .unwrap();
    warren_tests::assert_closed_by_broker(Ok(()), &ch, 406, "fast reply consumer does not exist")
        .await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_id_must_match_the_connection_user() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "q").await;
    ch.basic_publish(
        "".into(),
        "q".into(),
        BasicPublishOptions::default(),
        b"mine",
        lapin::BasicProperties::default().with_user_id("guest".into()),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "q".into(),
        BasicPublishOptions::default(),
        b"forged",
        lapin::BasicProperties::default().with_user_id("admin".into()),
    )
    .await
    .unwrap();
    warren_tests::assert_closed_by_broker(
        Ok(()),
        &ch,
        406,
        "user_id property set to 'admin' but authenticated user was 'guest'",
    )
    .await;
    let probe = conn.create_channel().await.unwrap();
    assert_eq!(
        ready_count(&probe, "q").await,
        1,
        "only the honest message was enqueued"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_secret_is_acknowledged() {
    use amqp_codec::Method;
    use amqp_codec::methods::ConnectionUpdateSecret;
    let broker = TestBroker::start().await;
    let mut c = warren_tests::RawClient::open(broker.addr).await;
    c.send(
        0,
        ConnectionUpdateSecret {
            new_secret: bytes::Bytes::from_static(b"token"),
            reason: amqp_codec::ShortStr::from_static("refresh"),
        }
        .into(),
    )
    .await;
    assert!(matches!(
        c.method().await,
        Some(Method::ConnectionUpdateSecretOk(_))
    ));
    broker.stop().await;
}
