//! Opening and closing channels and connections as RabbitMQ 3.10 does:
//! `channel_max` limits how many channels are open (not their numbers),
//! crossing `channel.close`s, nothing on a channel after its close-ok, and
//! reading on after the connection's close-ok.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use amqp_codec::methods::*;
use amqp_codec::{
    BasicProperties, ContentHeader, Frame, Method, ShortStr, encode_body, encode_content_header,
    encode_heartbeat, encode_method,
};
use tokio::io::AsyncWriteExt;
use warren_tests::{RawClient, TestBroker};

fn s(v: &'static str) -> ShortStr {
    ShortStr::from_static(v)
}

/// A `basic.publish` of `body` to the default exchange, as raw frames.
fn publish_frames(buf: &mut bytes::BytesMut, channel: u16, exchange: &'static str, body: &[u8]) {
    encode_method(
        buf,
        channel,
        &BasicPublish {
            exchange: s(exchange),
            routing_key: s("q"),
            ..Default::default()
        }
        .into(),
    )
    .unwrap();
    let header = ContentHeader {
        class_id: 60,
        weight: 0,
        body_size: body.len() as u64,
        properties: BasicProperties::default().to_raw().unwrap(),
    };
    encode_content_header(buf, channel, &header).unwrap();
    encode_body(buf, channel, body, 131_072).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_max_limits_open_channels_not_their_numbers() {
    let broker = TestBroker::start().await;
    // channel_max 2; channel 1 is open already.
    let mut c = RawClient::open_tuned(broker.addr, &[], "/", 2).await;
    c.send(5, ChannelOpen::default().into()).await;
    assert!(
        matches!(c.method().await, Some(Method::ChannelOpenOk(_))),
        "a channel numbered above channel_max opens while fewer are open"
    );
    c.send(7, ChannelOpen::default().into()).await;
    match c.method().await {
        Some(Method::ConnectionClose(close)) => {
            assert_eq!(close.reply_code, 530);
            assert_eq!(
                close.reply_text.as_str(),
                "NOT_ALLOWED - number of channels opened (2) has reached the negotiated channel_max (2)"
            );
        }
        other => panic!("expected connection.close 530, got {other:?}"),
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossing_channel_closes_complete_without_error() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open(broker.addr).await;
    // A publish the broker refuses (404: it closes the channel), and the
    // client's own channel.close, in one write: the closes cross.
    let mut buf = bytes::BytesMut::new();
    publish_frames(&mut buf, 1, "missing", b"x");
    encode_method(
        &mut buf,
        1,
        &ChannelClose {
            reply_code: 200,
            reply_text: s("bye"),
            ..Default::default()
        }
        .into(),
    )
    .unwrap();
    c.send_raw(&buf).await;
    match c.method().await {
        Some(Method::ChannelClose(close)) => assert_eq!(close.reply_code, 404),
        other => panic!("expected the broker's channel.close, got {other:?}"),
    }
    assert!(
        matches!(c.method().await, Some(Method::ChannelCloseOk(_))),
        "the client's close is answered"
    );
    // The client's close-ok for the broker's close is expected, not a 504.
    c.send(1, ChannelCloseOk {}.into()).await;
    c.send(1, ChannelOpen::default().into()).await;
    assert!(matches!(c.method().await, Some(Method::ChannelOpenOk(_))));
    c.send(
        1,
        QueueDeclare {
            queue: s("after"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(c.method().await, Some(Method::QueueDeclareOk(_))));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_frame_follows_a_channel_close_ok() {
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
    c.send(1, ConfirmSelect::default().into()).await;
    assert!(matches!(c.method().await, Some(Method::ConfirmSelectOk(_))));
    c.send(2, ChannelOpen::default().into()).await;
    assert!(matches!(c.method().await, Some(Method::ChannelOpenOk(_))));
    // Publishes (confirmed without a disk write) and the close in one write.
    let mut buf = bytes::BytesMut::new();
    for _ in 0..5 {
        publish_frames(&mut buf, 1, "", b"transient");
    }
    encode_method(&mut buf, 1, &ChannelClose::default().into()).unwrap();
    c.send_raw(&buf).await;
    let mut closed = false;
    // A round trip on channel 2 after the close: whatever channel 1 gets
    // must come before its close-ok.
    let mut asked = false;
    loop {
        let frame = c.frame().await.expect("connection open");
        match frame {
            Frame::Method {
                channel: 1,
                method: Method::ChannelCloseOk(_),
            } => {
                closed = true;
                c.send(2, BasicQos::default().into()).await;
                asked = true;
            }
            Frame::Method { channel: 1, method } => {
                assert!(!closed, "{} after channel.close-ok", method.name());
            }
            Frame::Method {
                channel: 2,
                method: Method::BasicQosOk(_),
            } if asked => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_reads_on_after_connection_close_ok() {
    let broker = TestBroker::start().await;
    let c = RawClient::open(broker.addr).await;
    let (mut reader, mut writer) = c.split();
    let mut buf = bytes::BytesMut::new();
    encode_method(&mut buf, 0, &ConnectionClose::default().into()).unwrap();
    writer.write_all(&buf).await.unwrap();
    assert!(matches!(
        reader.frame().await,
        Some(Frame::Method {
            method: Method::ConnectionCloseOk(_),
            ..
        })
    ));
    // The broker closed its side after close-ok...
    assert!(reader.frame().await.is_none());
    // ...but still reads: frames a client sends meanwhile meet no reset.
    let mut hb = bytes::BytesMut::new();
    encode_heartbeat(&mut hb);
    for _ in 0..20 {
        writer
            .write_all(&hb)
            .await
            .expect("the broker still reads after close-ok");
        tokio::task::yield_now().await;
    }
    writer.shutdown().await.unwrap();
    broker.stop().await;
}

/// Reopening a channel the broker closed, before sending its close-ok: the
/// channel is still open as far as the broker knows (504, as RabbitMQ).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_before_the_close_ok_is_a_channel_error() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open(broker.addr).await;
    let mut buf = bytes::BytesMut::new();
    publish_frames(&mut buf, 1, "missing", b"x");
    c.send_raw(&buf).await;
    assert!(matches!(c.method().await, Some(Method::ChannelClose(_))));
    c.send(1, ChannelOpen::default().into()).await;
    match c.method().await {
        Some(Method::ConnectionClose(close)) => {
            assert_eq!(close.reply_code, 504);
            assert_eq!(
                close.reply_text.as_str(),
                "CHANNEL_ERROR - second 'channel.open' seen"
            );
            assert_eq!((close.class_id, close.method_id), (20, 10));
        }
        other => panic!("expected connection.close 504, got {other:?}"),
    }
    broker.stop().await;
}
