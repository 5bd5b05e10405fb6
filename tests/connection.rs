//! The connection handshake and its refusals, heartbeats, and graceful
//! shutdown (320 CONNECTION_FORCED to every client).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use amqp_codec::methods::*;
use amqp_codec::{FieldValue, Method, PROTOCOL_HEADER, ShortStr};
use lapin::{Connection, ConnectionProperties};
use warren_tests::{RawClient, TestBroker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_protocol_header_gets_ours_and_a_close() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::connect(broker.addr).await;
    c.send_raw(b"GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(c.read_to_end().await, PROTOCOL_HEADER);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_advertises_rabbitmq_capabilities() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::connect(broker.addr).await;
    c.send_raw(&PROTOCOL_HEADER).await;
    let Some(Method::ConnectionStart(start)) = c.method().await else {
        panic!()
    };
    assert_eq!((start.version_major, start.version_minor), (0, 9));
    assert_eq!(&start.mechanisms[..], b"PLAIN AMQPLAIN");
    let Some(FieldValue::Table(caps)) = start.server_properties.get("capabilities") else {
        panic!()
    };
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
        "consumer_priorities",
    ] {
        assert_eq!(caps.get(cap), Some(&FieldValue::Bool(true)), "{cap}");
    }
    assert_eq!(caps.len(), 9, "RabbitMQ 3.10's capabilities, no more");
    // What clients read of the rest (docs/rabbitmq-compatibility.md): the
    // product is Warren, the version numeric and dotted.
    let text = |k: &str| {
        start
            .server_properties
            .get(k)
            .and_then(FieldValue::as_str)
            .unwrap_or_else(|| panic!("{k} is not a long string"))
            .to_owned()
    };
    assert_eq!(text("product"), "Warren");
    let version = text("version");
    assert!(
        version.split('.').count() == 3 && version.split('.').all(|n| n.parse::<u32>().is_ok()),
        "{version}"
    );
    for k in ["platform", "copyright", "information", "cluster_name"] {
        assert!(!text(k).is_empty(), "{k}");
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_vhost_are_refused() {
    let broker = TestBroker::start().await;
    let bad = Connection::connect(
        &format!("amqp://guest:wrong@{}/%2f", broker.addr),
        ConnectionProperties::default(),
    )
    .await;
    assert!(bad.is_err());
    let bad = Connection::connect(
        &format!("amqp://guest:guest@{}/nope", broker.addr),
        ConnectionProperties::default(),
    )
    .await;
    let e = bad.expect_err("unknown vhost");
    if let Some((code, text)) = warren_tests::amqp_error(&e) {
        assert_eq!(code, 530);
        assert!(text.contains("vhost 'nope' not found"), "{text}");
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_login_closes_with_403_for_clients_that_ask() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::connect(broker.addr).await;
    c.send_raw(&PROTOCOL_HEADER).await;
    assert!(matches!(c.method().await, Some(Method::ConnectionStart(_))));
    let mut caps = amqp_codec::FieldTable::new();
    caps.insert(
        ShortStr::from_static("authentication_failure_close"),
        FieldValue::Bool(true),
    );
    let mut props = amqp_codec::FieldTable::new();
    props.insert(
        ShortStr::from_static("capabilities"),
        FieldValue::Table(caps),
    );
    c.send(
        0,
        ConnectionStartOk {
            client_properties: props,
            mechanism: ShortStr::from_static("PLAIN"),
            response: bytes::Bytes::from_static(b"\0guest\0nope"),
            locale: ShortStr::from_static("en_US"),
        }
        .into(),
    )
    .await;
    match c.method().await {
        Some(Method::ConnectionClose(close)) => {
            assert_eq!(close.reply_code, 403);
            assert!(close.reply_text.starts_with(
                "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN"
            ));
        }
        other => panic!("{other:?}"),
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_clients_with_320() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::open(broker.addr).await;
    let stop = tokio::spawn(broker.stop());
    match c.method().await {
        Some(Method::ConnectionClose(close)) => {
            assert_eq!(close.reply_code, 320);
            assert!(close.reply_text.starts_with("CONNECTION_FORCED"));
        }
        other => panic!("{other:?}"),
    }
    c.send(0, ConnectionCloseOk {}.into()).await;
    stop.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_sent_at_half_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(dir.path(), |c| c.heartbeat = 1).await;
    let mut c = RawClient::connect(broker.addr).await;
    c.send_raw(&PROTOCOL_HEADER).await;
    assert!(matches!(c.method().await, Some(Method::ConnectionStart(_))));
    c.send(
        0,
        ConnectionStartOk {
            client_properties: Default::default(),
            mechanism: ShortStr::from_static("PLAIN"),
            response: bytes::Bytes::from_static(b"\0guest\0guest"),
            locale: ShortStr::from_static("en_US"),
        }
        .into(),
    )
    .await;
    assert!(matches!(
        c.method().await,
        Some(Method::ConnectionTune(ConnectionTune { heartbeat: 1, .. }))
    ));
    c.send(
        0,
        ConnectionTuneOk {
            channel_max: 10,
            frame_max: 131_072,
            heartbeat: 1,
        }
        .into(),
    )
    .await;
    c.send(
        0,
        ConnectionOpen {
            virtual_host: ShortStr::from_static("/"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(
        c.method().await,
        Some(Method::ConnectionOpenOk(_))
    ));
    let hb = tokio::time::timeout(std::time::Duration::from_secs(3), async {
        loop {
            if let Some(amqp_codec::Frame::Heartbeat) = c.frame().await {
                return;
            }
        }
    })
    .await;
    assert!(hb.is_ok(), "no heartbeat within 3 s at a 1 s interval");
    // A client that stays silent is dropped after two missed intervals.
    let dropped = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while c.frame().await.is_some() {}
    })
    .await;
    assert!(dropped.is_ok(), "silent client not disconnected");
    broker.stop().await;
}

/// A `tune-ok` outside the server's offer (frame_max above it or below the
/// 4096 minimum, channel_max above it) gets the socket closed, without a
/// `connection.close`: the spec's rule, and RabbitMQ 3.10's behaviour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tune_ok_outside_the_offer_closes_the_socket() {
    let broker = TestBroker::start().await;
    for (channel_max, frame_max) in [(10, 1_000_000u32), (10, 1024), (10, 0), (4000, 131_072)] {
        let mut c = RawClient::connect(broker.addr).await;
        c.send_raw(&PROTOCOL_HEADER).await;
        assert!(matches!(c.method().await, Some(Method::ConnectionStart(_))));
        c.send(
            0,
            ConnectionStartOk {
                client_properties: amqp_codec::FieldTable::new(),
                mechanism: ShortStr::from_static("PLAIN"),
                response: bytes::Bytes::from_static(b"\0guest\0guest"),
                locale: ShortStr::from_static("en_US"),
            }
            .into(),
        )
        .await;
        assert!(matches!(c.method().await, Some(Method::ConnectionTune(_))));
        c.send(
            0,
            ConnectionTuneOk {
                channel_max,
                frame_max,
                heartbeat: 0,
            }
            .into(),
        )
        .await;
        assert_eq!(
            c.read_to_end().await,
            b"",
            "channel_max {channel_max}, frame_max {frame_max}: closed without a reply"
        );
    }
    broker.stop().await;
}
