//! Metadata commits as the channels see them: a command that waits for its
//! commit (a durable declare, bind, delete, `tx.commit`) holds up only its
//! own channel, which keeps its order; the connection's other channels go
//! on. The broker is started with a commit delay standing in for the
//! network round trip a replicated log will add.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use amqp_codec::methods::*;
use amqp_codec::{Frame, Method, ShortStr};
use warren_tests::{RawClient, TestBroker};

fn s(v: &'static str) -> ShortStr {
    ShortStr::from_static(v)
}

/// The next method frame as (channel, method).
async fn next(c: &mut RawClient) -> (u16, Method) {
    loop {
        match c.frame().await.expect("the broker answers") {
            Frame::Method { channel, method } => return (channel, method),
            Frame::Heartbeat => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

fn declared(m: &Method) -> &str {
    match m {
        Method::QueueDeclareOk(ok) => ok.queue.as_str(),
        Method::ExchangeDeclareOk(_) => "(exchange)",
        Method::QueueBindOk(_) => "(bind)",
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_commit_stalls_only_its_own_channel() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(dir.path(), |c| {
        c.metadata_commit_delay = Duration::from_secs(1);
    })
    .await;
    // Channel 1 is open; open 2.
    let mut c = RawClient::open(broker.addr).await;
    c.send(2, ChannelOpen::default().into()).await;
    assert!(matches!(next(&mut c).await, (2, Method::ChannelOpenOk(_))));

    // Channel 1: a durable declare (waits for its commit), then, pipelined
    // behind it, a passive declare of the same queue (must see it) and a
    // durable bind. Channel 2: a transient declare.
    c.send(
        1,
        QueueDeclare {
            queue: s("slow"),
            durable: true,
            ..Default::default()
        }
        .into(),
    )
    .await;
    c.send(
        1,
        QueueDeclare {
            queue: s("slow"),
            passive: true,
            ..Default::default()
        }
        .into(),
    )
    .await;
    c.send(
        1,
        QueueBind {
            queue: s("slow"),
            exchange: s("amq.direct"),
            routing_key: s("k"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    c.send(
        2,
        QueueDeclare {
            queue: s("fast"),
            ..Default::default()
        }
        .into(),
    )
    .await;

    let mut replies = Vec::new();
    for _ in 0..4 {
        let (channel, method) = next(&mut c).await;
        replies.push((channel, declared(&method).to_owned()));
    }
    assert_eq!(
        replies,
        vec![
            (2, "fast".to_owned()),
            (1, "slow".to_owned()),
            (1, "slow".to_owned()),
            (1, "(bind)".to_owned()),
        ],
        "channel 2 is answered while channel 1 waits; channel 1 keeps its order"
    );

    // The other way round: channel 2's transient exchange does not wait
    // for channel 1's durable queue.
    c.send(
        1,
        QueueDeclare {
            queue: s("slow2"),
            durable: true,
            ..Default::default()
        }
        .into(),
    )
    .await;
    c.send(
        2,
        ExchangeDeclare {
            exchange: s("fast-x"),
            kind: s("direct"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    let first = next(&mut c).await;
    assert_eq!(
        (first.0, declared(&first.1)),
        (2, "(exchange)"),
        "a transient exchange on channel 2 does not wait for channel 1's durable queue"
    );
    let second = next(&mut c).await;
    assert_eq!((second.0, declared(&second.1)), (1, "slow2"));
    broker.stop().await;
}
