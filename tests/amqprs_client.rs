//! amqprs, another Rust client, against the broker: handshake, declare,
//! bind, publish, get and consume with acks — the client must work unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use amqprs::BasicProperties;
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicGetArguments, BasicPublishArguments,
    QueueBindArguments, QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use warren_tests::TestBroker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_publishes_gets_and_consumes() {
    let broker = TestBroker::start().await;
    let args = OpenConnectionArguments::new("127.0.0.1", broker.addr.port(), "guest", "guest");
    let conn = Connection::open(&args).await.unwrap();
    let ch = conn.open_channel(None).await.unwrap();
    let (queue, _, _) = ch
        .queue_declare(QueueDeclareArguments::new("amqprs-q"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(queue, "amqprs-q");
    ch.queue_bind(QueueBindArguments::new("amqprs-q", "amq.direct", "k"))
        .await
        .unwrap();
    let props = BasicProperties::default()
        .with_content_type("text/plain")
        .finish();
    ch.basic_publish(
        props,
        b"via amq.direct".to_vec(),
        BasicPublishArguments::new("amq.direct", "k"),
    )
    .await
    .unwrap();
    let (_, got_props, body) = loop {
        if let Some(m) = ch
            .basic_get(BasicGetArguments::new("amqprs-q").no_ack(true).finish())
            .await
            .unwrap()
        {
            break m;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(body, b"via amq.direct");
    assert_eq!(
        got_props.content_type().map(String::as_str),
        Some("text/plain")
    );

    let (_tag, mut rx) = ch
        .basic_consume_rx(BasicConsumeArguments::new("amqprs-q", "c1"))
        .await
        .unwrap();
    for i in 0..10u8 {
        ch.basic_publish(
            BasicProperties::default(),
            vec![i],
            BasicPublishArguments::new("", "amqprs-q"),
        )
        .await
        .unwrap();
    }
    for i in 0..10u8 {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(msg.content.unwrap(), vec![i]);
        let tag = msg.deliver.unwrap().delivery_tag();
        ch.basic_ack(BasicAckArguments::new(tag, false))
            .await
            .unwrap();
    }
    ch.close().await.unwrap();
    conn.close().await.unwrap();
    broker.stop().await;
}
