//! Queue behaviour through the broker: exclusive and auto-delete queues,
//! server-named queues, purge and delete, TTL with dead-lettering to a DLX,
//! max-length, priorities, `x-expires`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use warren_tests::{
    TestBroker, assert_amqp_error, channel_with_queue, next_deliveries, publish, ready_count,
};

fn args(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert((*k).into(), v.clone());
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_named_exclusive_queues_belong_to_their_connection() {
    let broker = TestBroker::start().await;
    let owner = broker.connect().await;
    let ch = owner.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let name = q.name().to_string();
    assert!(name.starts_with("amq.gen-"), "{name}");

    let other = broker.connect().await;
    let och = other.create_channel().await.unwrap();
    let r = och
        .basic_consume(
            name.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_amqp_error(r, 405, "cannot obtain exclusive access to locked queue");

    // Nor may another connection bind or unbind it; its owner may.
    ch.queue_bind(
        name.as_str().into(),
        "amq.direct".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let och = other.create_channel().await.unwrap();
    let r = och
        .queue_bind(
            name.as_str().into(),
            "amq.direct".into(),
            "k2".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_amqp_error(r, 405, "cannot obtain exclusive access to locked queue");
    let och = other.create_channel().await.unwrap();
    let r = och
        .queue_unbind(
            name.as_str().into(),
            "amq.direct".into(),
            "k".into(),
            FieldTable::default(),
        )
        .await;
    assert_amqp_error(r, 405, "cannot obtain exclusive access to locked queue");
    // The binding survived the attempt: a message routed through it arrives.
    ch.basic_publish(
        "amq.direct".into(),
        "k".into(),
        BasicPublishOptions::default(),
        b"still bound",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    assert_eq!(ready_count(&ch, &name).await, 1);
    ch.queue_unbind(
        name.as_str().into(),
        "amq.direct".into(),
        "k".into(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    owner.close(200, "bye".into()).await.unwrap();
    let och = other.create_channel().await.unwrap();
    let r = och
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert_amqp_error(r, 404, "no queue");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_queues_are_never_durable() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let declare = |durable| QueueDeclareOptions {
        durable,
        exclusive: true,
        ..Default::default()
    };
    ch.queue_declare("mine".into(), declare(true), FieldTable::default())
        .await
        .unwrap();
    // RabbitMQ 3.10 ignores `durable` on exclusive queues: either redeclare
    // is equivalent, and the queue is not durable.
    ch.queue_declare("mine".into(), declare(false), FieldTable::default())
        .await
        .unwrap();
    ch.queue_declare("mine".into(), declare(true), FieldTable::default())
        .await
        .unwrap();
    let vhost = broker.broker().vhost("/").unwrap();
    assert!(!vhost.find_queue("mine").unwrap().durable);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_delete_queue_goes_with_its_last_consumer() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "ad".into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let consumer = ch
        .basic_consume(
            "ad".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    drop(consumer);
    ch.basic_cancel("c".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    // Deletion is asynchronous; a passive declare eventually reports 404.
    let mut gone = false;
    for _ in 0..100 {
        let probe = conn.create_channel().await.unwrap();
        let r = probe
            .queue_declare(
                "ad".into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        if r.is_err() {
            gone = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(gone, "auto-delete queue survived its last consumer");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_and_conditional_delete() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "q").await;
    for _ in 0..3 {
        publish(&ch, "q", b"x").await;
    }
    let r = ch
        .queue_delete(
            "q".into(),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        )
        .await;
    assert_amqp_error(r, 406, "queue 'q' in vhost '/' not empty");
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(
        ch.queue_purge("q".into(), QueuePurgeOptions::default())
            .await
            .unwrap(),
        3
    );
    let _c = ch
        .basic_consume(
            "q".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let ch2 = conn.create_channel().await.unwrap();
    let r = ch2
        .queue_delete(
            "q".into(),
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await;
    assert_amqp_error(r, 406, "queue 'q' in vhost '/' in use");
    let ch3 = conn.create_channel().await.unwrap();
    assert_eq!(
        ch3.queue_delete("q".into(), QueueDeleteOptions::default())
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        ch3.queue_delete("never-existed".into(), QueueDeleteOptions::default())
            .await
            .unwrap(),
        0
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_dead_lettered_with_x_death() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "dlx".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "dead".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "dead".into(),
        "dlx".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "short".into(),
        QueueDeclareOptions::default(),
        args(&[
            ("x-message-ttl", AMQPValue::LongInt(50)),
            (
                "x-dead-letter-exchange",
                AMQPValue::LongString("dlx".into()),
            ),
        ]),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            "dead".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    publish(&ch, "short", b"soon dead").await;
    // No consumer on "short": the queue's timer expires it.
    let d = next_deliveries(&mut consumer, 1).await.remove(0);
    assert_eq!(d.data, b"soon dead");
    assert_eq!(d.exchange.as_str(), "dlx");
    assert_eq!(d.routing_key.as_str(), "short");
    let headers = d.properties.headers().clone().unwrap();
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("{headers:?}")
    };
    let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() else {
        panic!()
    };
    let get = |k: &str| death.inner().get(k).cloned();
    assert_eq!(get("reason"), Some(AMQPValue::LongString("expired".into())));
    assert_eq!(get("queue"), Some(AMQPValue::LongString("short".into())));
    assert_eq!(get("count"), Some(AMQPValue::LongLongInt(1)));
    assert!(matches!(get("time"), Some(AMQPValue::Timestamp(_))));
    assert_eq!(
        headers.inner().get("x-first-death-reason"),
        Some(&AMQPValue::LongString("expired".into()))
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_and_overflowing_messages_are_dead_lettered() {
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
    ch.queue_declare(
        "bounded".into(),
        QueueDeclareOptions::default(),
        args(&[
            ("x-max-length", AMQPValue::LongInt(2)),
            ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString("dlq".into()),
            ),
        ]),
    )
    .await
    .unwrap();
    for i in 1..=3u8 {
        publish(&ch, "bounded", &[i]).await;
    }
    assert_eq!(ready_count(&ch, "bounded").await, 2);
    assert_eq!(
        ready_count(&ch, "dlq").await,
        1,
        "the head was dropped to the DLX"
    );
    let got = ch
        .basic_get("bounded".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    got.delivery
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    assert_eq!(ready_count(&ch, "dlq").await, 2);
    let first = ch
        .basic_get("dlq".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.delivery.data, [1]);
    broker.stop().await;
}

/// `x-max-length` holds when deliveries are requeued too: with drop-head,
/// the oldest messages over the limit go (to the DLX), as RabbitMQ drops
/// heads after a requeue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn length_limit_holds_when_messages_are_requeued() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "dlq").await;
    ch.queue_declare(
        "bounded".into(),
        QueueDeclareOptions::default(),
        args(&[
            ("x-max-length", AMQPValue::LongInt(2)),
            ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString("dlq".into()),
            ),
        ]),
    )
    .await
    .unwrap();
    publish(&ch, "bounded", b"1").await;
    publish(&ch, "bounded", b"2").await;
    let consumer = conn.create_channel().await.unwrap();
    for _ in 0..2 {
        consumer
            .basic_get("bounded".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap();
    }
    publish(&ch, "bounded", b"3").await;
    publish(&ch, "bounded", b"4").await;
    assert_eq!(ready_count(&ch, "bounded").await, 2);
    consumer
        .basic_nack(
            0,
            BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        ready_count(&ch, "bounded").await,
        2,
        "still at most x-max-length after the requeue"
    );
    assert_eq!(
        ready_count(&ch, "dlq").await,
        2,
        "the two oldest were dropped to the DLX"
    );
    let mut left = Vec::new();
    while let Some(m) = ch
        .basic_get("bounded".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        left.push(m.delivery.data);
    }
    assert_eq!(left, [b"3".to_vec(), b"4".to_vec()]);
    broker.stop().await;
}

/// A TTL of 0 (the queue's or the message's): a message no consumer takes
/// at once expires (and is dead-lettered) right away; one a consumer is
/// waiting for is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_zero_expires_what_cannot_be_delivered_at_once() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "dlq").await;
    ch.queue_declare(
        "instant".into(),
        QueueDeclareOptions::default(),
        args(&[
            ("x-message-ttl", AMQPValue::LongInt(0)),
            ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString("dlq".into()),
            ),
        ]),
    )
    .await
    .unwrap();
    publish(&ch, "instant", b"nobody waits").await;
    assert_eq!(ready_count(&ch, "instant").await, 0);
    assert_eq!(ready_count(&ch, "dlq").await, 1, "dead-lettered at once");

    // Per-message expiration "0" on a queue without a TTL.
    ch.queue_declare(
        "plain".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "plain".into(),
        BasicPublishOptions::default(),
        b"gone",
        BasicProperties::default().with_expiration("0".into()),
    )
    .await
    .unwrap();
    assert_eq!(ready_count(&ch, "plain").await, 0);

    // With a consumer ready, it is delivered.
    let sub = conn.create_channel().await.unwrap();
    let mut consumer = sub
        .basic_consume(
            "instant".into(),
            "c".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    publish(&ch, "instant", b"taken").await;
    let got = next_deliveries(&mut consumer, 1).await;
    assert_eq!(got[0].data, b"taken");
    assert_eq!(
        ready_count(&ch, "dlq").await,
        1,
        "nothing more dead-lettered"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_queue_delivers_highest_first() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "prio".into(),
        QueueDeclareOptions::default(),
        args(&[("x-max-priority", AMQPValue::LongInt(5))]),
    )
    .await
    .unwrap();
    for (body, p) in [(b"low", 1u8), (b"top", 5), (b"mid", 3)] {
        ch.basic_publish(
            "".into(),
            "prio".into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_priority(p),
        )
        .await
        .unwrap();
    }
    let mut order = Vec::new();
    while let Some(m) = ch
        .basic_get("prio".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        order.push(String::from_utf8(m.delivery.data.clone()).unwrap());
    }
    assert_eq!(order, ["top", "mid", "low"]);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_queue_expires() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "fleeting".into(),
        QueueDeclareOptions::default(),
        args(&[("x-expires", AMQPValue::LongInt(100))]),
    )
    .await
    .unwrap();
    // (Looked at from inside: a passive declare would renew the lease.)
    assert!(
        queue_goes_within(&broker, "fleeting", 1000).await,
        "queue with x-expires 100 ms still exists after a second"
    );
    broker.stop().await;
}

/// Whether queue `name` of vhost `/` is deleted within `ms` milliseconds.
async fn queue_goes_within(broker: &TestBroker, name: &str, ms: u64) -> bool {
    let vhost = broker.broker().vhost("/").unwrap();
    for _ in 0..ms / 20 {
        if vhost.find_queue(name).is_none() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    vhost.find_queue(name).is_none()
}

/// A passive `queue.declare` is a use of the queue: it renews the
/// `x-expires` lease (as in RabbitMQ).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_declare_renews_the_expiry_lease() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "leased".into(),
        QueueDeclareOptions::default(),
        args(&[("x-expires", AMQPValue::LongInt(400))]),
    )
    .await
    .unwrap();
    // Three lease lengths of passive declares, one every 100 ms.
    for _ in 0..12 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        ch.queue_declare(
            "leased".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the lease was renewed by the last passive declare");
    }
    assert!(
        queue_goes_within(&broker, "leased", 2000).await,
        "unused again, the queue expires"
    );
    broker.stop().await;
}

/// Redeclaring a queue with a different `exclusive` flag, on its own
/// connection or another, is RabbitMQ's 405 RESOURCE_LOCKED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_flag_must_match_on_redeclare() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let other = broker.connect().await;
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    let locked = |q: &str| {
        format!(
            "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{q}' in vhost '/'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration."
        )
    };
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("ex".into(), exclusive, FieldTable::default())
        .await
        .unwrap();
    // Same connection, not exclusive now.
    let r = ch
        .queue_declare(
            "ex".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_amqp_error(r, 405, &locked("ex"));
    // Another connection, exclusive too.
    let ch = other.create_channel().await.unwrap();
    let r = ch
        .queue_declare("ex".into(), exclusive, FieldTable::default())
        .await;
    assert_amqp_error(r, 405, &locked("ex"));
    // A shared queue redeclared exclusive.
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "shared".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let r = ch
        .queue_declare("shared".into(), exclusive, FieldTable::default())
        .await;
    assert_amqp_error(r, 405, &locked("shared"));
    // The same flags again are fine.
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("ex".into(), exclusive, FieldTable::default())
        .await
        .unwrap();
    broker.stop().await;
}

/// A raw client's next method on `channel`, skipping content frames.
async fn next_on(c: &mut warren_tests::RawClient, channel: u16) -> amqp_codec::Method {
    loop {
        match c.frame().await.expect("connection open") {
            amqp_codec::Frame::Method {
                channel: ch,
                method,
            } if ch == channel => return method,
            _ => continue,
        }
    }
}

/// An empty queue name means the channel's last declared queue (the spec's
/// rule, as RabbitMQ implements it): bind (with the queue's name as the
/// routing key when that is empty too), get, consume, purge and delete.
/// Without a declared queue it is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_queue_name_is_the_last_declared_queue() {
    use amqp_codec::methods::*;
    use amqp_codec::{Method, ShortStr};
    let e = ShortStr::default;
    let broker = TestBroker::start().await;
    let mut c = warren_tests::RawClient::open(broker.addr).await;
    c.send(
        1,
        QueuePurge {
            queue: e(),
            ..Default::default()
        }
        .into(),
    )
    .await;
    match next_on(&mut c, 1).await {
        Method::ChannelClose(close) => {
            assert_eq!(close.reply_code, 404);
            assert_eq!(
                close.reply_text.as_str(),
                "NOT_FOUND - no previously declared queue"
            );
            assert_eq!((close.class_id, close.method_id), (50, 30));
        }
        other => panic!("{other:?}"),
    }
    c.send(1, ChannelCloseOk {}.into()).await;

    c.send(2, ChannelOpen::default().into()).await;
    assert!(matches!(next_on(&mut c, 2).await, Method::ChannelOpenOk(_)));
    c.send(
        2,
        QueueDeclare {
            queue: ShortStr::from_static("latest"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(
        next_on(&mut c, 2).await,
        Method::QueueDeclareOk(_)
    ));
    c.send(
        2,
        QueueBind {
            queue: e(),
            exchange: ShortStr::from_static("amq.direct"),
            routing_key: e(),
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(next_on(&mut c, 2).await, Method::QueueBindOk(_)));
    // Bound with routing key "latest".
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "amq.direct".into(),
        "latest".into(),
        BasicPublishOptions::default(),
        b"via the shortcut",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    assert_eq!(ready_count(&ch, "latest").await, 1);
    c.send(
        2,
        BasicGet {
            queue: e(),
            no_ack: true,
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(next_on(&mut c, 2).await, Method::BasicGetOk(_)));
    c.send(
        2,
        BasicConsume {
            queue: e(),
            consumer_tag: ShortStr::from_static("c"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(
        next_on(&mut c, 2).await,
        Method::BasicConsumeOk(_)
    ));
    c.send(
        2,
        BasicCancel {
            consumer_tag: ShortStr::from_static("c"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(next_on(&mut c, 2).await, Method::BasicCancelOk(_)));
    c.send(
        2,
        QueueDelete {
            queue: e(),
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(next_on(&mut c, 2).await, Method::QueueDeleteOk(_)));
    let vhost = broker.broker().vhost("/").unwrap();
    assert!(
        vhost.find_queue("latest").is_none(),
        "deleted by the shortcut"
    );
    broker.stop().await;
}

/// `\r` and `\n` are stripped from the names of declares, binds and deletes
/// (RabbitMQ's rule), not from those of publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cr_and_lf_are_stripped_from_declared_names() {
    use amqp_codec::methods::*;
    use amqp_codec::{Method, ShortStr};
    let broker = TestBroker::start().await;
    let mut c = warren_tests::RawClient::open(broker.addr).await;
    c.send(
        1,
        QueueDeclare {
            queue: ShortStr::from_static("a\r\nb"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    match next_on(&mut c, 1).await {
        Method::QueueDeclareOk(ok) => assert_eq!(ok.queue.as_str(), "ab"),
        other => panic!("{other:?}"),
    }
    c.send(
        1,
        ExchangeDeclare {
            exchange: ShortStr::from_static("x\ny"),
            kind: ShortStr::from_static("fanout"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(
        next_on(&mut c, 1).await,
        Method::ExchangeDeclareOk(_)
    ));
    c.send(
        1,
        QueueBind {
            queue: ShortStr::from_static("a\nb"),
            exchange: ShortStr::from_static("x\ry"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(next_on(&mut c, 1).await, Method::QueueBindOk(_)));
    let vhost = broker.broker().vhost("/").unwrap();
    assert!(vhost.router.read().exchange("xy").is_some());
    c.send(
        1,
        QueueDelete {
            queue: ShortStr::from_static("a\nb"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(next_on(&mut c, 1).await, Method::QueueDeleteOk(_)));
    assert!(vhost.find_queue("ab").is_none());
    broker.stop().await;
}

/// An old-style `x-death` (an entry per death, without `count`) is merged
/// into one entry for the queue and reason: a dead-letter cycle does not
/// grow the header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_style_x_death_entries_are_merged() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "dlq").await;
    ch.queue_declare(
        "src".into(),
        QueueDeclareOptions::default(),
        args(&[
            ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString("dlq".into()),
            ),
        ]),
    )
    .await
    .unwrap();
    let old = || {
        let mut t = FieldTable::default();
        t.insert("queue".into(), AMQPValue::LongString("src".into()));
        t.insert("reason".into(), AMQPValue::LongString("rejected".into()));
        AMQPValue::FieldTable(t)
    };
    let mut headers = FieldTable::default();
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(vec![old(), old()].into()),
    );
    ch.basic_publish(
        "".into(),
        "src".into(),
        BasicPublishOptions::default(),
        b"again",
        BasicProperties::default().with_headers(headers),
    )
    .await
    .unwrap();
    let got = ch
        .basic_get("src".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    got.delivery
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    assert_eq!(ready_count(&ch, "dlq").await, 1);
    let dead = ch
        .basic_get("dlq".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    let headers = dead.delivery.properties.headers().clone().unwrap();
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("no x-death")
    };
    assert_eq!(deaths.as_slice().len(), 1, "{deaths:?}");
    let AMQPValue::FieldTable(entry) = &deaths.as_slice()[0] else {
        panic!()
    };
    assert_eq!(entry.inner().get("count"), Some(&AMQPValue::LongLongInt(3)));
    broker.stop().await;
}
