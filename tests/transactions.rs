//! Transactions: publishes and acknowledgements take effect at commit and are
//! discarded by rollback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use amqp_codec::methods::{BasicAck, BasicGet, TxSelect};
use amqp_codec::{Method, ShortStr};
use lapin::options::*;
use warren_tests::{RawClient, TestBroker, channel_with_queue, publish, ready_count};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_appear_at_commit_and_vanish_at_rollback() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let observer = channel_with_queue(&conn, "q").await;
    let tx = conn.create_channel().await.unwrap();
    tx.tx_select().await.unwrap();
    publish(&tx, "q", b"a").await;
    publish(&tx, "q", b"b").await;
    assert_eq!(
        ready_count(&observer, "q").await,
        0,
        "nothing before commit"
    );
    tx.tx_commit().await.unwrap();
    assert_eq!(ready_count(&observer, "q").await, 2);
    publish(&tx, "q", b"c").await;
    tx.tx_rollback().await.unwrap();
    tx.tx_commit().await.unwrap();
    assert_eq!(
        ready_count(&observer, "q").await,
        2,
        "rolled-back publish never arrives"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_take_effect_at_commit() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "q").await;
    publish(&ch, "q", b"a").await;
    publish(&ch, "q", b"b").await;
    let tx = conn.create_channel().await.unwrap();
    tx.tx_select().await.unwrap();
    let a = tx
        .basic_get("q".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    let b = tx
        .basic_get("q".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    a.delivery.ack(BasicAckOptions::default()).await.unwrap();
    tx.tx_rollback().await.unwrap();
    b.delivery.ack(BasicAckOptions::default()).await.unwrap();
    tx.tx_commit().await.unwrap();
    // b is gone; a is still unacked and returns when the channel closes.
    tx.close(200, "done".into()).await.unwrap();
    assert_eq!(ready_count(&ch, "q").await, 1);
    let left = ch
        .basic_get("q".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(left.delivery.data, b"a");
    assert!(left.delivery.redelivered);
    broker.stop().await;
}

/// As RabbitMQ: a delivery acknowledged inside a transaction is no longer
/// outstanding for the channel before the commit. `basic.recover` leaves it
/// alone, a second ack of it is 406, and rollback makes it outstanding again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_in_a_transaction_settle_the_tag_for_the_channel() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "q").await;
    publish(&ch, "q", b"a").await;
    publish(&ch, "q", b"b").await;
    let tx = conn.create_channel().await.unwrap();
    tx.tx_select().await.unwrap();
    let get = |tx: lapin::Channel| async move {
        tx.basic_get("q".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap()
            .delivery
    };
    let a = get(tx.clone()).await;
    let _b = get(tx.clone()).await;
    tx.basic_ack(a.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    // recover requeues b only: a is acknowledged, pending the commit.
    tx.basic_recover(BasicRecoverOptions { requeue: true })
        .await
        .unwrap();
    assert_eq!(ready_count(&ch, "q").await, 1, "only b was requeued");
    tx.tx_commit().await.unwrap();
    assert_eq!(ready_count(&ch, "q").await, 1, "a is gone at commit");

    // Rollback: the acked delivery is outstanding again, and acks fine.
    let b = get(tx.clone()).await;
    tx.basic_ack(b.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    tx.tx_rollback().await.unwrap();
    tx.basic_ack(b.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    tx.tx_commit().await.unwrap();
    assert_eq!(ready_count(&ch, "q").await, 0);

    // A second ack of the same delivery in one transaction: 406.
    publish(&ch, "q", b"c").await;
    let mut raw = RawClient::open(broker.addr).await;
    raw.send(1, TxSelect {}.into()).await;
    assert!(matches!(raw.method().await, Some(Method::TxSelectOk(_))));
    raw.send(
        1,
        BasicGet {
            queue: ShortStr::from_static("q"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    let Some(Method::BasicGetOk(got)) = raw.method().await else {
        panic!("expected basic.get-ok")
    };
    let ack = BasicAck {
        delivery_tag: got.delivery_tag,
        multiple: false,
    };
    raw.send(1, ack.clone().into()).await;
    raw.send(1, ack.into()).await;
    match raw.method().await {
        Some(Method::ChannelClose(close)) => {
            assert_eq!(close.reply_code, 406);
            assert_eq!(
                close.reply_text.as_str(),
                format!(
                    "PRECONDITION_FAILED - unknown delivery tag {}",
                    got.delivery_tag
                )
            );
        }
        other => panic!("expected channel.close 406, got {other:?}"),
    }
    broker.stop().await;
}
