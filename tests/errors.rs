//! Error paths: soft errors close the channel, hard errors the connection,
//! with RabbitMQ's reply codes and texts — through lapin for what a client can
//! provoke, and through a raw-frame client for what only a broken client sends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use amqp_codec::methods::*;
use amqp_codec::{
    BasicProperties, ContentHeader, Method, ShortStr, encode_body, encode_content_header,
};
use lapin::BasicProperties as LapinProperties;
use lapin::options::*;
use lapin::types::FieldTable;
use warren_tests::{RawClient, TestBroker, assert_amqp_error, channel_with_queue};

fn s(v: &'static str) -> ShortStr {
    ShortStr::from_static(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_errors_close_only_the_channel() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;

    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .queue_declare(
            "missing".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert_amqp_error(r, 404, "NOT_FOUND - no queue 'missing' in vhost '/'");

    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "nope".into(),
        "k".into(),
        BasicPublishOptions::default(),
        b"x",
        LapinProperties::default(),
    )
    .await
    .unwrap();
    // The error arrives asynchronously; the next synchronous call sees it.
    warren_tests::assert_closed_by_broker(Ok(()), &ch, 404, "no exchange 'nope' in vhost '/'")
        .await;

    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .exchange_declare(
            "amq.custom".into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_amqp_error(r, 403, "contains reserved prefix 'amq.*'");

    let ch = channel_with_queue(&conn, "q").await;
    let r = ch
        .queue_declare(
            "q".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert_amqp_error(
        r,
        406,
        "inequivalent arg 'durable' for queue 'q' in vhost '/': received 'true' but current is 'false'",
    );

    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), lapin::types::AMQPValue::LongInt(-1));
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .queue_declare("ttl".into(), QueueDeclareOptions::default(), args)
        .await;
    assert_amqp_error(
        r,
        406,
        "invalid arg 'x-message-ttl' for queue 'ttl' in vhost '/': {value_negative,-1}",
    );

    // The connection survived all of that.
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "still-fine".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_delivery_tag_is_a_channel_error() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open(broker.addr).await;
    c.send(
        1,
        BasicAck {
            delivery_tag: 99,
            multiple: false,
        }
        .into(),
    )
    .await;
    match c.method().await {
        Some(Method::ChannelClose(close)) => {
            assert_eq!(close.reply_code, 406);
            assert_eq!(
                close.reply_text,
                "PRECONDITION_FAILED - unknown delivery tag 99"
            );
            assert_eq!((close.class_id, close.method_id), (60, 80));
        }
        other => panic!("{other:?}"),
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_exchange_type_closes_the_connection() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open(broker.addr).await;
    c.send(
        1,
        ExchangeDeclare {
            exchange: s("x"),
            kind: s("x-foo"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    match c.method().await {
        Some(Method::ConnectionClose(close)) => {
            assert_eq!(close.reply_code, 503);
            assert_eq!(
                close.reply_text,
                "COMMAND_INVALID - unknown exchange type 'x-foo'"
            );
            assert_eq!((close.class_id, close.method_id), (40, 10));
        }
        other => panic!("{other:?}"),
    }
    broker.stop().await;
}

async fn expect_connection_close(c: &mut RawClient, code: u16, text: &str) -> ConnectionClose {
    loop {
        match c.method().await {
            Some(Method::ConnectionClose(close)) => {
                assert_eq!(close.reply_code, code, "{}", close.reply_text);
                assert!(close.reply_text.contains(text), "{:?}", close.reply_text);
                return close;
            }
            Some(_) => continue,
            None => panic!("socket closed without connection.close"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_order_and_unopened_channels() {
    let broker = TestBroker::start().await;

    // A method on a channel that was never opened.
    let mut c = RawClient::open(broker.addr).await;
    c.send(
        5,
        QueueDeclare {
            queue: s("q"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    expect_connection_close(&mut c, 504, "expected 'channel.open'").await;

    // A body frame where the content header belongs.
    let mut c = RawClient::open(broker.addr).await;
    c.send(
        1,
        BasicPublish {
            routing_key: s("q"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    let mut buf = bytes::BytesMut::new();
    encode_body(&mut buf, 1, b"body", 0).unwrap();
    c.send_raw(&buf).await;
    let close = expect_connection_close(
        &mut c,
        505,
        "expected content header for class 60, got non content header frame instead",
    )
    .await;
    assert_eq!((close.class_id, close.method_id), (60, 40));

    // A method frame between a content header and its body: 505 naming the
    // interrupted basic.publish, as RabbitMQ.
    let mut c = RawClient::open(broker.addr).await;
    c.send(
        1,
        BasicPublish {
            routing_key: s("q"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    let mut buf = bytes::BytesMut::new();
    let header = ContentHeader {
        class_id: 60,
        weight: 0,
        body_size: 10,
        properties: BasicProperties::default().to_raw().unwrap(),
    };
    encode_content_header(&mut buf, 1, &header).unwrap();
    encode_body(&mut buf, 1, b"part", 0).unwrap();
    c.send_raw(&buf).await;
    c.send(1, ChannelFlow { active: true }.into()).await;
    let close = expect_connection_close(
        &mut c,
        505,
        "expected content body, got non content body frame instead",
    )
    .await;
    assert_eq!((close.class_id, close.method_id), (60, 40));

    // A content header without a method.
    let mut c = RawClient::open(broker.addr).await;
    let mut buf = bytes::BytesMut::new();
    let header = ContentHeader {
        class_id: 60,
        weight: 0,
        body_size: 1,
        properties: BasicProperties::default().to_raw().unwrap(),
    };
    encode_content_header(&mut buf, 1, &header).unwrap();
    c.send_raw(&buf).await;
    expect_connection_close(
        &mut c,
        505,
        "expected method frame, got non method frame instead",
    )
    .await;

    // A frame larger than frame_max.
    let mut c = RawClient::open(broker.addr).await;
    c.send_raw(&[1, 0, 1, 0, 3, 0x0d, 0x40]).await;
    expect_connection_close(&mut c, 501, "exceeds frame_max").await;

    // A malformed method payload.
    let mut c = RawClient::open(broker.addr).await;
    c.send_raw(&[1, 0, 1, 0, 0, 0, 7, 0, 60, 0, 40, 0, 0, 20, 0xce])
        .await;
    // (501 with the method's ids, as RabbitMQ; the spec would say 502.)
    let close = expect_connection_close(&mut c, 501, "cannot decode basic.publish").await;
    assert_eq!((close.class_id, close.method_id), (60, 40));

    // An unknown method.
    let mut c = RawClient::open(broker.addr).await;
    c.send_raw(&[1, 0, 1, 0, 0, 0, 4, 0, 99, 0, 10, 0xce]).await;
    expect_connection_close(&mut c, 540, "unknown method 99.10").await;

    // The broker is still serving others.
    let conn = broker.connect().await;
    channel_with_queue(&conn, "alive").await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_refused_before_it_is_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(dir.path(), |c| c.max_message_size = 1000).await;
    let mut c = RawClient::open(broker.addr).await;
    c.send(
        1,
        BasicPublish {
            routing_key: s("q"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    let mut buf = bytes::BytesMut::new();
    let header = ContentHeader {
        class_id: 60,
        weight: 0,
        body_size: 1 << 40,
        properties: BasicProperties::default().to_raw().unwrap(),
    };
    encode_content_header(&mut buf, 1, &header).unwrap();
    c.send_raw(&buf).await;
    match c.method().await {
        Some(Method::ChannelClose(close)) => {
            assert_eq!(close.reply_code, 406);
            assert!(
                close
                    .reply_text
                    .contains("larger than configured max size 1000"),
                "{:?}",
                close.reply_text
            );
        }
        other => panic!("{other:?}"),
    }
    // Body frames that follow on the closing channel are ignored; close-ok ends it.
    let mut buf = bytes::BytesMut::new();
    encode_body(&mut buf, 1, &[0u8; 100], 0).unwrap();
    c.send_raw(&buf).await;
    c.send(1, ChannelCloseOk {}.into()).await;
    c.send(1, ChannelOpen::default().into()).await;
    assert!(matches!(c.method().await, Some(Method::ChannelOpenOk(_))));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_without_requeue_is_not_implemented() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open(broker.addr).await;
    c.send(1, BasicRecover { requeue: false }.into()).await;
    expect_connection_close(&mut c, 540, "requeue=false").await;

    let mut c = RawClient::open(broker.addr).await;
    c.send(1, BasicRecoverAsync { requeue: false }.into()).await;
    expect_connection_close(&mut c, 540, "requeue=false").await;

    // With requeue the asynchronous form is accepted silently; the channel
    // still answers afterwards.
    let mut c = RawClient::open(broker.addr).await;
    c.send(1, BasicRecoverAsync { requeue: true }.into()).await;
    c.send(1, BasicRecover { requeue: true }.into()).await;
    assert!(matches!(c.method().await, Some(Method::BasicRecoverOk(_))));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_is_not_implemented() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open(broker.addr).await;
    c.send(
        1,
        BasicPublish {
            routing_key: s("q"),
            immediate: true,
            ..Default::default()
        }
        .into(),
    )
    .await;
    let mut buf = bytes::BytesMut::new();
    let header = ContentHeader {
        class_id: 60,
        weight: 0,
        body_size: 0,
        properties: BasicProperties::default().to_raw().unwrap(),
    };
    encode_content_header(&mut buf, 1, &header).unwrap();
    c.send_raw(&buf).await;
    expect_connection_close(&mut c, 540, "immediate=true").await;
    broker.stop().await;
}

/// `basic.ack` with `multiple` as RabbitMQ 3.10 reads it: delivery tag 0
/// acks every outstanding delivery of the channel (Warren used to settle
/// none), and a tag that was never delivered is 406 even when lower tags are
/// outstanding (Warren used to ack those and say nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiple_acks_follow_rabbitmq() {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = warren_tests::channel_with_queue(&conn, "acks").await;
    for _ in 0..3 {
        warren_tests::publish(&ch, "acks", b"m").await;
    }
    for _ in 0..3 {
        ch.basic_get("acks".into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("a message");
    }
    ch.basic_ack(0, BasicAckOptions { multiple: true })
        .await
        .unwrap();
    ch.close(200, "bye".into()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(
        warren_tests::ready_count(&ch, "acks").await,
        0,
        "tag 0 with multiple acked all three (none came back on close)"
    );

    for _ in 0..2 {
        warren_tests::publish(&ch, "acks", b"m").await;
    }
    // (Raw frames: lapin may see the channel.close before it sends the
    // next method, and then reports its own state instead of the reply.)
    let mut raw = RawClient::open(broker.addr).await;
    for _ in 0..2 {
        raw.send(
            1,
            BasicGet {
                queue: s("acks"),
                ..Default::default()
            }
            .into(),
        )
        .await;
        assert!(matches!(raw.method().await, Some(Method::BasicGetOk(_))));
    }
    raw.send(
        1,
        BasicAck {
            delivery_tag: 5,
            multiple: true,
        }
        .into(),
    )
    .await;
    match raw.method().await {
        Some(Method::ChannelClose(close)) => {
            assert_eq!(close.reply_code, 406);
            assert_eq!(
                close.reply_text.as_str(),
                "PRECONDITION_FAILED - unknown delivery tag 5"
            );
        }
        other => panic!("expected channel.close 406, got {other:?}"),
    }
    raw.send(1, ChannelCloseOk {}.into()).await;
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(
        warren_tests::ready_count(&ch, "acks").await,
        2,
        "nothing was acked; both came back when the channel closed"
    );
    broker.stop().await;
}

/// `CC` / `BCC` headers must be arrays: another type is 406 naming it as
/// RabbitMQ does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_selected_headers_must_be_arrays() {
    use lapin::types::{AMQPValue, FieldTable};
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    for (name, value, type_name) in [
        ("CC", AMQPValue::LongString("q".into()), "longstr"),
        ("BCC", AMQPValue::LongInt(5), "signedint"),
    ] {
        let ch = channel_with_queue(&conn, "q").await;
        let mut headers = FieldTable::default();
        headers.insert(name.into(), value);
        ch.basic_publish(
            "".into(),
            "q".into(),
            lapin::options::BasicPublishOptions::default(),
            b"x",
            lapin::BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap();
        warren_tests::assert_closed_by_broker(
            Ok(()),
            &ch,
            406,
            &format!(
                "PRECONDITION_FAILED - invalid message: {{unacceptable_type_in_header,\"{name}\",{type_name}}}"
            ),
        )
        .await;
    }
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(warren_tests::ready_count(&ch, "q").await, 0);
    broker.stop().await;
}
