//! Restart tests: durable definitions and confirmed persistent messages come
//! back after a graceful restart and after the broker process is `kill -9`'d.
//! The killed broker is this test binary re-run as a child process in broker
//! mode, so the test needs nothing but itself.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use warren_tests::{ChildBroker, TestBroker};

/// Broker mode: run a broker on the given data dir, print its address, serve until killed.
#[test]
fn broker_child() {
    warren_tests::serve_if_child();
}

fn spawn_broker(dir: &std::path::Path) -> ChildBroker {
    ChildBroker::spawn("broker_child", dir, None)
}

async fn declare_durable(ch: &lapin::Channel) {
    ch.exchange_declare(
        "orders".into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "durable-q".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "durable-q".into(),
        "orders".into(),
        "order.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let child = spawn_broker(dir.path());
    let conn = Connection::connect(&child.uri(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    declare_durable(&ch).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirmed = Vec::new();
    for i in 0..200u32 {
        let persistent = BasicProperties::default().with_delivery_mode(2);
        let c = ch
            .basic_publish(
                "orders".into(),
                "order.created".into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                persistent,
            )
            .await
            .unwrap();
        if let Confirmation::Ack(None) = c.await.unwrap() {
            confirmed.push(i);
        }
    }
    assert_eq!(confirmed.len(), 200);
    // A transient message is not expected back.
    ch.basic_publish(
        "orders".into(),
        "order.created".into(),
        BasicPublishOptions::default(),
        b"transient",
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    child.kill(); // SIGKILL
    drop(conn);

    let child = spawn_broker(dir.path());
    let conn = Connection::connect(&child.uri(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get("durable-q".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        assert!(
            m.delivery.redelivered,
            "after a crash recovered messages are marked redelivered"
        );
        got.push(u32::from_be_bytes(
            m.delivery.data.as_slice().try_into().unwrap(),
        ));
    }
    assert_eq!(got, confirmed);
    // The binding came back too: routing still works.
    ch.basic_publish(
        "orders".into(),
        "order.paid".into(),
        BasicPublishOptions::default(),
        b"after",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let after = ch
        .basic_get("durable-q".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.delivery.data, b"after");
    child.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_keeps_definitions_and_drops_non_durable_ones() {
    let mut broker = TestBroker::start().await;
    let dir = broker.keep_dir();
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_durable(&ch).await;
    ch.queue_declare(
        "transient-q".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "durable-q".into(),
        BasicPublishOptions::default(),
        b"kept",
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap();
    let got = ch
        .basic_get("durable-q".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    // Unacked at shutdown: it comes back, redelivered.
    let _ = got;
    drop(conn);
    broker.stop().await;

    let broker = TestBroker::start_in(dir.path()).await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "durable-q".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 1);
    let m = ch
        .basic_get("durable-q".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.delivery.data, b"kept");
    assert!(m.delivery.redelivered);
    let r = ch
        .queue_declare(
            "transient-q".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    warren_tests::assert_amqp_error(r, 404, "no queue 'transient-q'");
    broker.stop().await;
}

/// Entries the broker's queue `name` (vhost `/`) holds in spill files.
fn spilled(broker: &TestBroker, name: &str) -> u64 {
    let q = broker
        .broker()
        .vhost("/")
        .and_then(|v| v.find_queue(name))
        .expect("the queue exists");
    q.counters().spilled
}

/// Declares durable queue `name` and publishes `n` persistent messages to
/// it (bodies: their index, 4 octets big-endian), every one confirmed.
async fn fill_durable_queue(ch: &lapin::Channel, name: &str, n: u32) {
    warren_tests::declare_durable_queue(ch, name).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..n {
        ch.basic_publish(
            "".into(),
            name.into(),
            BasicPublishOptions::default(),
            &i.to_be_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    }
    assert!(
        ch.wait_for_confirms().await.unwrap().is_empty(),
        "all acked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_queue_spills_and_comes_back_whole_and_in_order_after_a_restart() {
    const N: u32 = 30_000;
    let mut broker = TestBroker::start().await;
    let dir = broker.keep_dir();
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    fill_durable_queue(&ch, "deep", N).await;
    assert!(
        spilled(&broker, "deep") > 0,
        "entries behind the window went to spill files"
    );
    drop(conn);
    broker.stop().await;

    let broker = TestBroker::start_in(dir.path()).await;
    assert!(
        spilled(&broker, "deep") > 0,
        "the recovered queue is rebuilt a window at a time"
    );
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(warren_tests::ready_count(&ch, "deep").await, N);
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            "deep".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut next = 0u32;
    while next < N {
        for d in warren_tests::next_deliveries(&mut consumer, 500).await {
            let body: [u8; 4] = d.data.as_slice().try_into().expect("a 4-octet body");
            assert_eq!(u32::from_be_bytes(body), next, "FIFO across the spill");
            assert!(!d.redelivered, "a clean restart keeps the flag");
            next += 1;
            if next % 500 == 0 {
                d.acker
                    .ack(BasicAckOptions { multiple: true })
                    .await
                    .unwrap();
            }
        }
    }
    assert_eq!(spilled(&broker, "deep"), 0);
    broker.stop().await;
}

/// Purging a deep queue whose spilled entries are on disk (a recovered
/// queue's are) reads them off the lock to delete their index entries and
/// release their bodies: after another restart nothing comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_deep_queue_stays_empty_after_a_restart() {
    const N: u32 = 20_000;
    let mut broker = TestBroker::start().await;
    let dir = broker.keep_dir();
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    fill_durable_queue(&ch, "deep", N).await;
    drop(conn);
    broker.stop().await;

    let broker = TestBroker::start_in(dir.path()).await;
    assert!(spilled(&broker, "deep") > 0, "recovered into spill files");
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let purged = ch
        .queue_purge("deep".into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    assert_eq!(purged, N);
    assert_eq!(spilled(&broker, "deep"), 0);
    // The removals are submitted by a task the broker waits for when it
    // stops.
    drop(conn);
    broker.stop().await;

    let broker = TestBroker::start_in(dir.path()).await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(warren_tests::ready_count(&ch, "deep").await, 0);
    broker.stop().await;
}

/// A broker's settings on `dir` with only its AMQP listener (for starts
/// that are expected to be refused).
fn amqp_only(dir: &std::path::Path) -> server::Config {
    server::Config {
        data_dir: dir.to_path_buf(),
        bind: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        management: None,
        prometheus: None,
        ..server::Config::default()
    }
}

/// The log segment files of a data directory, oldest first.
fn log_segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

/// A cleanly stopped broker's data directory with 2,000 confirmed messages
/// in the durable queue `kept`, each body its number.
async fn stopped_with_confirmed_messages(dir: &std::path::Path) {
    let broker = TestBroker::start_in(dir).await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    warren_tests::declare_durable_queue(&ch, "kept").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..2000u32 {
        ch.basic_publish(
            "".into(),
            "kept".into(),
            BasicPublishOptions::default(),
            // Large enough to fill several log segments.
            &[&i.to_be_bytes()[..], &[7u8; 1020]].concat(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    }
    assert!(
        ch.wait_for_confirms().await.unwrap().is_empty(),
        "all acked"
    );
    drop(conn);
    broker.stop().await;
}

/// The store found 8 octets flipped in the middle of the oldest log segment
/// of a cleanly stopped broker: it used to call it a torn tail, delete the
/// later segments and start with a fraction of the messages. Now the start
/// is refused naming the file, nothing is deleted, and `--repair-store`'s
/// repair moves the damage to quarantine and names exactly the lost messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_segment_is_refused_and_the_repair_names_what_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    stopped_with_confirmed_messages(dir.path()).await;
    let segs = log_segments(dir.path());
    assert!(segs.len() >= 3, "{} segments", segs.len());
    let mut raw = std::fs::read(&segs[0]).unwrap();
    // Inside a message body past the middle (its filler octets), so that
    // what is lost is whole messages the repair can name: damage that
    // garbles a record's own fields is the store fuzzer's business
    // (crates/queue-store/tests/damage.rs).
    let mid = raw.len() / 2;
    let at = raw[mid..]
        .windows(16)
        .position(|w| w.iter().all(|&b| b == 7))
        .map(|p| mid + p + 4)
        .expect("a body's filler past the middle");
    for b in &mut raw[at..at + 8] {
        *b ^= 0xff;
    }
    std::fs::write(&segs[0], raw).unwrap();

    let config = amqp_only(dir.path());
    match server::start(config).await {
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("data directory damaged"), "{text}");
            assert!(
                text.contains(&segs[0].display().to_string()),
                "{text} names the file"
            );
        }
        Ok(_) => panic!("started on a damaged data directory"),
    }
    assert_eq!(log_segments(dir.path()), segs, "nothing was deleted");

    let report = server::repair::repair_store(dir.path()).unwrap();
    let text = report.join("\n");
    assert!(text.contains("quarantine"), "{text}");
    // (A line for messages whose queue the damage hid may come first.)
    assert!(
        report
            .iter()
            .any(|l| l.starts_with("lost ") && l.contains("queue 'kept' in vhost '/'")),
        "no lost messages of 'kept' named: {text}"
    );
    // Every "lost N message(s) of ..." line counts (the damaged frame's
    // bodies are lost, their entries named under the queue).
    let lost: usize = report
        .iter()
        .filter(|l| l.starts_with("lost "))
        .map(|l| {
            l.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();

    let broker = TestBroker::start_in(dir.path()).await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let left = warren_tests::ready_count(&ch, "kept").await as usize;
    assert!(lost > 0 && lost < 2000, "{lost} lost");
    assert_eq!(
        left + lost,
        2000,
        "every message is either back or named lost: {text}"
    );
    drop(conn);
    broker.stop().await;
}

/// An empty metadata database next to a message log is damage, not a first
/// boot: the broker used to recreate `guest` and drop every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_metadata_database_is_not_a_first_boot() {
    let dir = tempfile::tempdir().unwrap();
    stopped_with_confirmed_messages(dir.path()).await;
    std::fs::write(dir.path().join("db"), b"").unwrap();
    let config = amqp_only(dir.path());
    let Err(err) = server::start(config).await else {
        panic!("started");
    };
    assert!(err.to_string().contains("metadata database"), "{err}");
}

/// A second broker on a data directory another one is using is told so at
/// once, with the other's pid (it used to wait 15 s for sled's lock and print
/// its raw error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_on_the_same_data_directory_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let child = spawn_broker(dir.path());
    let pid = child.child.id();
    let config = amqp_only(dir.path());
    let started = std::time::Instant::now();
    let Err(err) = server::start(config).await else {
        panic!("started");
    };
    let text = err.to_string();
    assert!(
        text.contains("in use by another Warren") && text.contains(&format!("pid {pid}")),
        "{text}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "refused without waiting for the lock"
    );
    child.kill();
}
