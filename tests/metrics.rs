//! The Prometheus endpoint: RabbitMQ's metric names, counters that move with
//! traffic (published, routed, returned, delivered, acknowledged, confirmed,
//! dropped by reason), node totals, and per-queue series.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use lapin::options::*;
use lapin::types::FieldTable;
use warren_tests::{TestBroker, channel_with_queue, next_deliveries};

async fn scrape(broker: &TestBroker, path: &str) -> String {
    let resp = reqwest::get(format!("{}{path}", broker.prometheus_url()))
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    resp.text().await.unwrap()
}

/// The value of the sample `series` (name with its labels, as exposed).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_with_traffic() {
    let broker = TestBroker::start().await;
    let before = scrape(&broker, "/metrics").await;
    assert_eq!(
        value(&before, "rabbitmq_global_messages_received_total"),
        0.0
    );
    assert!(value(&before, "rabbitmq_process_resident_memory_bytes") > 0.0);
    assert_eq!(value(&before, "rabbitmq_alarms_memory_used_watermark"), 0.0);
    // The node's identity, as RabbitMQ labels it (a node alone: the
    // cluster is named after the node).
    let identity = before
        .lines()
        .find(|l| l.starts_with("rabbitmq_identity_info{"))
        .unwrap_or_else(|| panic!("no rabbitmq_identity_info in:\n{before}"));
    assert!(
        identity.starts_with(
            "rabbitmq_identity_info{rabbitmq_node=\"warren@localhost\",rabbitmq_cluster=\"warren@localhost\",rabbitmq_cluster_permanent_id=\"rabbitmq-cluster-id-"
        ) && identity.ends_with("} 1"),
        "{identity}"
    );
    // The version series every RabbitMQ dashboard's header reads.
    let build = before
        .lines()
        .find(|l| l.starts_with("rabbitmq_build_info{"))
        .unwrap_or_else(|| panic!("no rabbitmq_build_info in:\n{before}"));
    assert!(
        build.contains("rabbitmq_version=\"3.10.0\"") && build.ends_with("} 1"),
        "{build}"
    );

    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "work").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..10u8 {
        ch.basic_publish(
            "".into(),
            "work".into(),
            BasicPublishOptions::default(),
            &[i],
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    // One unroutable mandatory publish comes back.
    ch.basic_publish(
        "".into(),
        "nowhere".into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"lost",
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let mid = scrape(&broker, "/metrics").await;
    assert_eq!(value(&mid, "rabbitmq_queue_messages_ready"), 10.0);
    assert_eq!(value(&mid, "rabbitmq_queues"), 1.0);
    assert!(value(&mid, "rabbitmq_channels") >= 1.0);
    assert!(value(&mid, "rabbitmq_connections") >= 1.0);
    let per_queue = scrape(&broker, "/metrics/per-object").await;
    assert_eq!(
        value(
            &per_queue,
            "rabbitmq_queue_messages_ready{vhost=\"/\",queue=\"work\"}"
        ),
        10.0
    );

    let mut consumer = ch
        .basic_consume(
            "work".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let deliveries = next_deliveries(&mut consumer, 10).await;
    for d in &deliveries[..9] {
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    // The last is rejected without requeue: no DLX, so it is dropped.
    deliveries[9]
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    // A synchronous round trip on the channel: the acks were processed.
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();

    let after = scrape(&broker, "/metrics").await;
    assert_eq!(
        value(&after, "rabbitmq_global_messages_received_total"),
        11.0
    );
    assert_eq!(value(&after, "rabbitmq_global_messages_routed_total"), 10.0);
    assert_eq!(
        value(&after, "rabbitmq_global_messages_unroutable_returned_total"),
        1.0
    );
    assert_eq!(
        value(&after, "rabbitmq_global_messages_confirmed_total"),
        11.0
    );
    assert_eq!(
        value(&after, "rabbitmq_global_messages_delivered_total"),
        10.0
    );
    assert_eq!(
        value(&after, "rabbitmq_global_messages_acknowledged_total"),
        9.0
    );
    assert_eq!(
        value(
            &after,
            "rabbitmq_global_messages_dead_lettered_rejected_total{queue_type=\"rabbit_classic_queue\",dead_letter_strategy=\"disabled\"}"
        ),
        1.0
    );
    assert_eq!(value(&after, "rabbitmq_queue_messages_ready"), 0.0);
    assert_eq!(value(&after, "rabbitmq_queue_messages_unacked"), 0.0);
    assert_eq!(value(&after, "rabbitmq_consumers"), 1.0);
    // The same figures under the names RabbitMQ's Overview dashboard
    // queries (summed over channels and queues).
    for (series, expected) in [
        ("rabbitmq_channel_messages_published_total", 11.0),
        ("rabbitmq_global_messages_received_confirm_total", 11.0),
        ("rabbitmq_channel_messages_confirmed_total", 11.0),
        ("rabbitmq_channel_messages_unroutable_returned_total", 1.0),
        ("rabbitmq_queue_messages_published_total", 10.0),
        ("rabbitmq_channel_messages_delivered_ack_total", 10.0),
        (
            "rabbitmq_global_messages_delivered_consume_manual_ack_total",
            10.0,
        ),
        ("rabbitmq_channel_messages_delivered_total", 0.0),
        ("rabbitmq_channel_messages_acked_total", 9.0),
        ("rabbitmq_channel_messages_unconfirmed", 0.0),
        ("rabbitmq_channel_consumers", 1.0),
        ("rabbitmq_global_consumers", 1.0),
        ("rabbitmq_global_publishers", 1.0),
        ("rabbitmq_queues_declared_total", 1.0),
        ("rabbitmq_queues_created_total", 1.0),
        ("rabbitmq_connections_opened_total", 1.0),
        ("rabbitmq_channels_opened_total", 1.0),
    ] {
        assert_eq!(value(&after, series), expected, "{series}");
    }
    // Body sizes (RabbitMQ's histogram): ten 1-octet bodies and one of 4.
    for (series, expected) in [
        (
            "rabbitmq_message_size_bytes_bucket{le=\"100.0\",protocol=\"amqp091\"}",
            11.0,
        ),
        (
            "rabbitmq_message_size_bytes_bucket{le=\"+Inf\",protocol=\"amqp091\"}",
            11.0,
        ),
        (
            "rabbitmq_message_size_bytes_count{protocol=\"amqp091\"}",
            11.0,
        ),
        (
            "rabbitmq_message_size_bytes_sum{protocol=\"amqp091\"}",
            14.0,
        ),
    ] {
        assert_eq!(value(&after, series), expected, "{series}");
    }
    let per_queue = scrape(&broker, "/metrics/per-object").await;
    for (name, expected) in [("published", 10.0), ("delivered", 10.0), ("acked", 9.0)] {
        assert_eq!(
            value(
                &per_queue,
                &format!("rabbitmq_queue_messages_{name}_total{{vhost=\"/\",queue=\"work\"}}")
            ),
            expected,
            "{name}"
        );
    }
    broker.stop().await;
}

/// `basic.get` (automatic and manual acknowledgement, and empty),
/// redeliveries, consumers with automatic acknowledgement, and the churn of
/// connections, channels and queues: each counted under RabbitMQ's names;
/// and the node's resources (descriptors, sockets, disk, uptime).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gets_redeliveries_churn_and_resources_are_counted() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "polled").await;
    for i in 0..4u8 {
        ch.basic_publish(
            "".into(),
            "polled".into(),
            BasicPublishOptions::default(),
            &[i],
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    let get = |no_ack| {
        let ch = ch.clone();
        async move {
            ch.basic_get("polled".into(), BasicGetOptions { no_ack })
                .await
                .unwrap()
        }
    };
    get(true).await.expect("a message");
    let manual = get(false).await.expect("a message");
    // Requeued, then taken again: redelivered.
    manual
        .delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let again = get(false).await.expect("a message");
    assert!(again.delivery.redelivered);
    again
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    // The two left go to a consumer with automatic acknowledgement.
    let mut consumer = ch
        .basic_consume(
            "polled".into(),
            "auto".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    next_deliveries(&mut consumer, 2).await;
    ch.basic_cancel("auto".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    assert!(get(true).await.is_none());
    // Churn: a channel and a queue come and go, then a connection.
    let other = channel_with_queue(&conn, "brief").await;
    other
        .queue_delete("brief".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    other.close(200, "bye".into()).await.unwrap();
    let brief = broker.connect().await;
    brief.close(200, "bye".into()).await.unwrap();
    // (The broker counts a connection closed once it has let it go.)
    let text = loop {
        let text = scrape(&broker, "/metrics").await;
        if value(&text, "rabbitmq_connections_closed_total") >= 1.0 {
            break text;
        }
        tokio::task::yield_now().await;
    };
    for (series, expected) in [
        ("rabbitmq_channel_get_total", 1.0),
        ("rabbitmq_channel_get_ack_total", 2.0),
        (
            "rabbitmq_global_messages_delivered_get_manual_ack_total",
            2.0,
        ),
        ("rabbitmq_channel_get_empty_total", 1.0),
        ("rabbitmq_global_messages_get_empty_total", 1.0),
        ("rabbitmq_channel_messages_redelivered_total", 1.0),
        ("rabbitmq_channel_messages_delivered_total", 2.0),
        (
            "rabbitmq_global_messages_delivered_consume_auto_ack_total",
            2.0,
        ),
        ("rabbitmq_global_messages_delivered_total", 5.0),
        ("rabbitmq_queues_declared_total", 2.0),
        ("rabbitmq_queues_created_total", 2.0),
        ("rabbitmq_queues_deleted_total", 1.0),
        ("rabbitmq_queues", 1.0),
        ("rabbitmq_channels_opened_total", 2.0),
        ("rabbitmq_channels_closed_total", 1.0),
        ("rabbitmq_channels", 1.0),
        ("rabbitmq_connections_opened_total", 2.0),
        ("rabbitmq_connections_closed_total", 1.0),
        ("rabbitmq_connections", 1.0),
        ("rabbitmq_process_open_tcp_sockets", 1.0),
    ] {
        assert_eq!(value(&text, series), expected, "{series}");
    }
    for series in [
        "rabbitmq_process_open_fds",
        "rabbitmq_process_max_fds",
        "rabbitmq_process_max_tcp_sockets",
        "rabbitmq_disk_space_available_limit_bytes",
    ] {
        assert!(value(&text, series) > 0.0, "{series}");
    }
    assert!(
        value(&text, "rabbitmq_process_max_tcp_sockets") < value(&text, "rabbitmq_process_max_fds")
    );
    // The queue's own split, as the management API shows it.
    let polled: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/api/queues/%2F/polled", broker.management_url()))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stats = &polled["message_stats"];
    for (kind, expected) in [
        ("get_no_ack", 1),
        ("get", 2),
        ("get_empty", 1),
        ("redeliver", 1),
        ("deliver_no_ack", 2),
        ("deliver", 0),
        ("deliver_get", 5),
    ] {
        assert_eq!(stats[kind], expected, "{kind}: {stats}");
    }
    // (Free disk space is sampled every second; uptime counts whole
    // seconds: both are present, at 0 or more.)
    assert!(value(&text, "rabbitmq_disk_space_available_bytes") >= 0.0);
    assert!(value(&text, "rabbitmq_erlang_uptime_seconds") >= 0.0);
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

/// `/metrics/detailed`: only the families asked for (none without
/// `family`), queues of the vhosts asked for, RabbitMQ's prefixes and
/// labels; `/metrics/per-object` has channels and connections too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detailed_serves_the_families_asked_for() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel_with_queue(&conn, "full").await;
    for _ in 0..3 {
        ch.basic_publish(
            "".into(),
            "full".into(),
            BasicPublishOptions::default(),
            b"x",
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    ch.queue_declare(
        "watched".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "watched".into(),
        "amq.topic".into(),
        "a.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // (Kept: lapin cancels a consumer it drops.)
    let _consumer = ch
        .basic_consume(
            "watched".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // (A round trip: the publishes were taken.)
    assert_eq!(warren_tests::ready_count(&ch, "full").await, 3);

    let none = scrape(&broker, "/metrics/detailed").await;
    assert!(!none.contains("rabbitmq_detailed_"), "{none}");

    // The store's I/O: a durable queue's persistent, confirmed message is
    // written and synced, in /metrics and in node_persister_metrics.
    let durable = conn.create_channel().await.unwrap();
    warren_tests::declare_durable_queue(&durable, "kept").await;
    durable
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    durable
        .basic_publish(
            "".into(),
            "kept".into(),
            BasicPublishOptions::default(),
            b"k",
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let persister = scrape(&broker, "/metrics/detailed?family=node_persister_metrics").await;
    let node = scrape(&broker, "/metrics").await;
    for series in [
        "rabbitmq_msg_store_write_total",
        "rabbitmq_io_sync_ops_total",
        "rabbitmq_io_write_ops_total",
        "rabbitmq_io_write_bytes_total",
        "rabbitmq_queue_index_write_ops_total",
    ] {
        assert!(value(&node, series) >= 1.0, "{series}");
        let detailed = series.replace("rabbitmq_", "rabbitmq_detailed_");
        assert!(value(&persister, &detailed) >= 1.0, "{detailed}");
    }
    assert!(value(&node, "rabbitmq_io_sync_time_seconds_total") > 0.0);
    assert!(none.contains("rabbitmq_identity_info{"), "{none}");

    let coarse = scrape(
        &broker,
        "/metrics/detailed?family=queue_coarse_metrics&vhost=%2F",
    )
    .await;
    for (series, expected) in [
        (
            "rabbitmq_detailed_queue_messages{vhost=\"/\",queue=\"full\"}",
            3.0,
        ),
        (
            "rabbitmq_detailed_queue_messages_ready{vhost=\"/\",queue=\"full\"}",
            3.0,
        ),
        (
            "rabbitmq_detailed_queue_messages{vhost=\"/\",queue=\"watched\"}",
            0.0,
        ),
    ] {
        assert_eq!(value(&coarse, series), expected, "{series}");
    }
    assert!(!coarse.contains("rabbitmq_detailed_queue_consumers"));
    let elsewhere = scrape(
        &broker,
        "/metrics/detailed?family=queue_coarse_metrics&vhost=other",
    )
    .await;
    assert!(!elsewhere.contains("queue=\"full\""), "{elsewhere}");

    // Both consumer families: the count is served once.
    let consumers = scrape(
        &broker,
        "/metrics/detailed?family=queue_consumer_count&family=queue_metrics",
    )
    .await;
    assert_eq!(
        consumers
            .lines()
            .filter(|l| l.starts_with("# TYPE rabbitmq_detailed_queue_consumers "))
            .count(),
        1,
        "{consumers}"
    );
    assert_eq!(
        value(
            &consumers,
            "rabbitmq_detailed_queue_consumers{vhost=\"/\",queue=\"watched\"}"
        ),
        1.0,
        "{consumers}"
    );

    let cluster = scrape(
        &broker,
        "/metrics/detailed?family=exchange_bindings&family=exchange_names&family=vhost_status",
    )
    .await;
    assert_eq!(
        value(
            &cluster,
            "rabbitmq_cluster_exchange_bindings{vhost=\"/\",exchange=\"amq.topic\",type=\"topic\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &cluster,
            "rabbitmq_cluster_exchange_name{vhost=\"/\",exchange=\"amq.direct\",type=\"direct\"}"
        ),
        1.0
    );
    assert!(!cluster.contains("exchange=\"\""), "no default exchange");
    assert_eq!(
        value(&cluster, "rabbitmq_cluster_vhost_status{vhost=\"/\"}"),
        1.0
    );

    let node = scrape(
        &broker,
        "/metrics/detailed?family=connection_churn_metrics&family=node_metrics&family=node_coarse_metrics&family=channel_metrics&family=connection_coarse_metrics",
    )
    .await;
    assert_eq!(
        value(&node, "rabbitmq_detailed_connections_opened_total"),
        1.0
    );
    // (full, watched and kept.)
    assert_eq!(value(&node, "rabbitmq_detailed_queues_created_total"), 3.0);
    assert!(value(&node, "rabbitmq_detailed_process_max_fds") > 0.0);
    assert!(value(&node, "rabbitmq_detailed_process_open_fds") > 0.0);
    // Channel 1 has the consumer (channel 2 published the persistent
    // message); series come in no set order.
    let channels: Vec<&str> = node
        .lines()
        .filter(|l| l.starts_with("rabbitmq_detailed_channel_consumers{channel=\"<0."))
        .collect();
    assert!(
        channels.iter().any(|l| l.ends_with(".1>\"} 1")),
        "{channels:?} in:\n{node}"
    );
    let incoming = node
        .lines()
        .find(|l| l.starts_with("rabbitmq_detailed_connection_incoming_bytes_total{channel=\"<0."))
        .unwrap_or_else(|| panic!("no connection series in:\n{node}"));
    let octets: f64 = incoming.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(octets > 100.0, "{incoming}");

    let per_object = scrape(&broker, "/metrics/per-object").await;
    for family in [
        "rabbitmq_channel_consumers{channel=\"<0.",
        "rabbitmq_connection_outgoing_bytes_total{channel=\"<0.",
        "rabbitmq_connection_channels{channel=\"<0.",
        "rabbitmq_queue_messages{vhost=\"/\",queue=\"full\"} 3",
    ] {
        assert!(per_object.contains(family), "{family} in:\n{per_object}");
    }
    conn.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}
