//! Publisher confirms: acks for routed and unroutable messages, acks for
//! persistent messages only after the store's fsync, nacks for messages a full
//! queue refuses (`x-overflow: reject-publish`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation};
use warren_tests::TestBroker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_publish_is_confirmed() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    warren_tests::declare_durable_queue(&ch, "durable").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut pending = Vec::new();
    for i in 0..500u32 {
        let props = BasicProperties::default().with_delivery_mode(if i % 2 == 0 { 2 } else { 1 });
        pending.push(
            ch.basic_publish(
                "".into(),
                "durable".into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                props,
            )
            .await
            .unwrap(),
        );
    }
    // Unroutable ones are confirmed too.
    pending.push(
        ch.basic_publish(
            "amq.direct".into(),
            "nobody".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap(),
    );
    for p in pending {
        assert!(matches!(p.await.unwrap(), Confirmation::Ack(None)));
    }
    let syncs = warren_tests::store_syncs(&broker);
    assert!(
        syncs >= 1,
        "persistent messages were synced before their confirms"
    );
    assert!(
        syncs < 250,
        "group commit: {syncs} fsyncs for 250 persistent publishes"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_publishes_are_nacked() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(2));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare("small".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut results = Vec::new();
    for i in 0..4u8 {
        let c = ch
            .basic_publish(
                "".into(),
                "small".into(),
                BasicPublishOptions::default(),
                &[i],
                BasicProperties::default(),
            )
            .await
            .unwrap();
        results.push(c.await.unwrap());
    }
    assert!(matches!(results[0], Confirmation::Ack(_)));
    assert!(matches!(results[1], Confirmation::Ack(_)));
    assert!(matches!(results[2], Confirmation::Nack(_)));
    assert!(matches!(results[3], Confirmation::Nack(_)));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_and_tx_do_not_mix() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    warren_tests::assert_amqp_error(
        ch.tx_select().await,
        406,
        "cannot switch from confirm to tx mode",
    );
    let ch = conn.create_channel().await.unwrap();
    ch.tx_select().await.unwrap();
    warren_tests::assert_amqp_error(
        ch.confirm_select(ConfirmSelectOptions::default()).await,
        406,
        "cannot switch from tx to confirm mode",
    );
    broker.stop().await;
}
