//! Transactions: publishes and acknowledgements take effect at commit and are
//! discarded by rollback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use lapin::options::*;
use warren_tests::{TestBroker, channel_with_queue, publish, ready_count};

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
