//! Flow control: a publisher flooding a queue nobody drains trips the memory
//! alarm; it is sent `connection.blocked` and no longer read; once a consumer
//! drains the queue it gets `connection.unblocked`, and every message it
//! published is confirmed and delivered — none lost.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use amqp_codec::methods::*;
use amqp_codec::{
    BasicProperties, ContentHeader, Frame, Method, ShortStr, encode_body, encode_content_header,
    encode_method,
};
use lapin::options::*;
use tokio::io::AsyncWriteExt;
use warren_tests::{RawClient, TestBroker};

fn s(v: &'static str) -> ShortStr {
    ShortStr::from_static(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_are_blocked_under_the_memory_alarm_and_lose_nothing() {
    const N: u64 = 2000;
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(dir.path(), |c| c.memory_high_watermark = 256 * 1024).await;

    // A publisher that understands connection.blocked.
    let mut c = RawClient::open_with(broker.addr, &["connection.blocked"], "/").await;
    c.send(
        1,
        QueueDeclare {
            queue: s("flood"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(c.method().await, Some(Method::QueueDeclareOk(_))));
    c.send(1, ConfirmSelect::default().into()).await;
    assert!(matches!(c.method().await, Some(Method::ConfirmSelectOk(_))));
    let (mut reader, mut writer) = c.split();

    // Publish 2000 x 1 KiB (8x the watermark) from another task: the broker
    // will stop reading, and this write will wait on TCP.
    let flood = tokio::spawn(async move {
        let header = ContentHeader {
            class_id: 60,
            weight: 0,
            body_size: 1024,
            properties: BasicProperties::default().to_raw().unwrap(),
        };
        for _ in 0..N / 100 {
            let mut buf = bytes::BytesMut::new();
            for _ in 0..100 {
                encode_method(
                    &mut buf,
                    1,
                    &BasicPublish {
                        routing_key: s("flood"),
                        ..Default::default()
                    }
                    .into(),
                )
                .unwrap();
                encode_content_header(&mut buf, 1, &header).unwrap();
                encode_body(&mut buf, 1, &[7u8; 1024], 131_072).unwrap();
            }
            writer.write_all(&buf).await.unwrap();
        }
        writer
    });

    let mut acked = 0;
    let mut blocked_at = None;
    let wait = Duration::from_secs(10);
    while blocked_at.is_none() {
        match tokio::time::timeout(wait, reader.frame())
            .await
            .expect("no connection.blocked")
        {
            Some(Frame::Method {
                method: Method::ConnectionBlocked(b),
                ..
            }) => {
                assert_eq!(b.reason, "low on memory");
                blocked_at = Some(acked);
            }
            Some(Frame::Method {
                method: Method::BasicAck(a),
                ..
            }) => acked = a.delivery_tag,
            Some(_) => {}
            None => panic!("socket closed"),
        }
    }
    assert!(acked < N, "blocked before everything was taken");

    // Drain with a consumer: the alarm clears, the publisher resumes.
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            "flood".into(),
            "drain".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let drained = tokio::spawn(async move {
        warren_tests::next_deliveries(&mut consumer, N as usize)
            .await
            .len()
    });

    let mut unblocked = false;
    while acked < N {
        match tokio::time::timeout(wait, reader.frame())
            .await
            .expect("publisher never resumed")
        {
            Some(Frame::Method {
                method: Method::ConnectionUnblocked(_),
                ..
            }) => unblocked = true,
            Some(Frame::Method {
                method: Method::BasicAck(a),
                ..
            }) => acked = a.delivery_tag,
            Some(Frame::Method {
                method: Method::BasicNack(n),
                ..
            }) => panic!("nacked {}", n.delivery_tag),
            Some(_) => {}
            None => panic!("socket closed"),
        }
    }
    assert!(unblocked, "connection.unblocked was not sent");
    assert_eq!(
        drained.await.unwrap(),
        N as usize,
        "every published message was delivered"
    );
    let _writer = flood.await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_alarm_blocks_publishers_too() {
    let dir = tempfile::tempdir().unwrap();
    // A limit no disk satisfies: the alarm is raised at the first sample.
    let broker = TestBroker::start_with(dir.path(), |c| c.disk_free_limit = u64::MAX).await;
    let mut c = RawClient::open_with(broker.addr, &["connection.blocked"], "/").await;
    let header = ContentHeader {
        class_id: 60,
        weight: 0,
        body_size: 1,
        properties: BasicProperties::default().to_raw().unwrap(),
    };
    let mut buf = bytes::BytesMut::new();
    encode_method(
        &mut buf,
        1,
        &BasicPublish {
            routing_key: s("nowhere"),
            ..Default::default()
        }
        .into(),
    )
    .unwrap();
    encode_content_header(&mut buf, 1, &header).unwrap();
    encode_body(&mut buf, 1, b"x", 131_072).unwrap();
    c.send_raw(&buf).await;
    let blocked = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match c.method().await {
                Some(Method::ConnectionBlocked(b)) => return b.reason,
                Some(_) => continue,
                None => panic!("socket closed"),
            }
        }
    })
    .await
    .expect("no connection.blocked under the disk alarm");
    assert_eq!(blocked, "low on disk");
    broker.stop().await;
}
