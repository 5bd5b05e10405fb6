//! Prometheus metrics, named as RabbitMQ's `rabbitmq_prometheus` plugin names
//! them so that existing dashboards and alerts work: message counters
//! (`rabbitmq_global_messages_*_total`), node totals (connections, channels,
//! queues, consumers, messages ready/unacknowledged), process memory and
//! alarms; per-queue series on `/metrics/per-object`. Served by axum on its
//! own port (default 15692) without authentication, as RabbitMQ does.
//!
//! Counters are atomics bumped where the event happens; totals are read from
//! the broker's state at scrape time.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use queue_store::DeadLetterReason;
use tokio::net::TcpListener;

use crate::broker::Broker;

/// Labels of RabbitMQ's dead-letter counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeadLetterLabels {
    queue_type: &'static str,
    /// `at_most_once` when dead-lettered, `disabled` when dropped (no DLX).
    dead_letter_strategy: &'static str,
}

/// Labels of a per-queue series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    vhost: String,
    queue: String,
}

/// The broker's counters and the gauges filled in at scrape time.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Messages published to the broker.
    pub received: Counter,
    /// Messages routed to at least one queue.
    pub routed: Counter,
    /// Unroutable mandatory messages returned to their publishers.
    pub unroutable_returned: Counter,
    /// Unroutable messages dropped (not mandatory).
    pub unroutable_dropped: Counter,
    /// Deliveries to consumers and `basic.get`.
    pub delivered: Counter,
    /// Acknowledged deliveries.
    pub acknowledged: Counter,
    /// Publisher confirms sent (`basic.ack`).
    pub confirmed: Counter,
    dead_lettered: [Family<DeadLetterLabels, Counter>; 4],
    /// Open channels.
    pub channels: Gauge,
    connections: Gauge,
    queues: Gauge,
    consumers: Gauge,
    ready: Gauge,
    unacked: Gauge,
    resident_memory: Gauge,
    memory_limit: Gauge,
    memory_alarm: Gauge,
    disk_alarm: Gauge,
    store_fsyncs: Gauge,
    store_batches: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let mut counter = |name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let received = counter(
            "rabbitmq_global_messages_received",
            "Total number of messages received from publishers",
        );
        let routed = counter(
            "rabbitmq_global_messages_routed",
            "Total number of messages routed to queues",
        );
        let unroutable_returned = counter(
            "rabbitmq_global_messages_unroutable_returned",
            "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable",
        );
        let unroutable_dropped = counter(
            "rabbitmq_global_messages_unroutable_dropped",
            "Total number of messages published as non-mandatory into an exchange and dropped as unroutable",
        );
        let delivered = counter(
            "rabbitmq_global_messages_delivered",
            "Total number of messages delivered to consumers",
        );
        let acknowledged = counter(
            "rabbitmq_global_messages_acknowledged",
            "Total number of messages acknowledged by consumers",
        );
        let confirmed = counter(
            "rabbitmq_global_messages_confirmed",
            "Total number of messages confirmed to publishers",
        );
        let dead_lettered = [
            ("expired", "expired"),
            ("rejected", "rejected"),
            (
                "maxlen",
                "dropped because a queue exceeded its maximum length",
            ),
            (
                "delivery_limit",
                "returned more often than the delivery limit",
            ),
        ]
        .map(|(reason, why)| {
            let f = Family::<DeadLetterLabels, Counter>::default();
            registry.register(
                format!("rabbitmq_global_messages_dead_lettered_{reason}"),
                format!("Total number of messages dead-lettered or dropped: {why}"),
                f.clone(),
            );
            f
        });
        let mut gauge = |name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        Metrics {
            received,
            routed,
            unroutable_returned,
            unroutable_dropped,
            delivered,
            acknowledged,
            confirmed,
            dead_lettered,
            channels: gauge("rabbitmq_channels", "Channels currently open"),
            connections: gauge("rabbitmq_connections", "Connections currently open"),
            queues: gauge("rabbitmq_queues", "Queues available"),
            consumers: gauge("rabbitmq_consumers", "Consumers currently connected"),
            ready: gauge(
                "rabbitmq_queue_messages_ready",
                "Messages ready to be delivered to consumers",
            ),
            unacked: gauge(
                "rabbitmq_queue_messages_unacked",
                "Messages delivered to consumers but not yet acknowledged",
            ),
            resident_memory: gauge(
                "rabbitmq_process_resident_memory_bytes",
                "Memory used in bytes (resident set)",
            ),
            memory_limit: gauge(
                "rabbitmq_resident_memory_limit_bytes",
                "Memory high watermark in bytes",
            ),
            memory_alarm: gauge(
                "rabbitmq_alarms_memory_used_watermark",
                "1 if the memory alarm is in effect",
            ),
            disk_alarm: gauge(
                "rabbitmq_alarms_free_disk_space_watermark",
                "1 if the free disk space alarm is in effect",
            ),
            store_fsyncs: gauge(
                "warren_store_fsyncs",
                "fsyncs of the message store since start (group commits)",
            ),
            store_batches: gauge(
                "warren_store_batches",
                "Batches written by the message store since start",
            ),
            registry,
        }
    }
}

impl Metrics {
    /// Counts a message dead-lettered (`dead_lettered`) or dropped for `reason`.
    pub fn dead_letter(&self, reason: DeadLetterReason, dead_lettered: bool) {
        let i = match reason {
            DeadLetterReason::Expired => 0,
            DeadLetterReason::Rejected => 1,
            DeadLetterReason::MaxLen => 2,
            DeadLetterReason::DeliveryLimit => 3,
        };
        if let Some(f) = self.dead_lettered.get(i) {
            f.get_or_create(&DeadLetterLabels {
                queue_type: "rabbit_classic_queue",
                dead_letter_strategy: if dead_lettered {
                    "at_most_once"
                } else {
                    "disabled"
                },
            })
            .inc();
        }
    }

    /// The node-wide exposition (`/metrics`).
    fn render(&self, broker: &Broker) -> String {
        let (mut queues, mut consumers, mut ready, mut unacked) = (0, 0, 0, 0);
        for v in broker.vhost_list() {
            for q in v.queues() {
                let counts = q.counters();
                queues += 1;
                consumers += counts.consumers as i64;
                ready += counts.ready as i64;
                unacked += counts.unacked as i64;
            }
        }
        self.queues.set(queues);
        self.consumers.set(consumers);
        self.ready.set(ready);
        self.unacked.set(unacked);
        self.connections
            .set(broker.connections.load(Ordering::Relaxed) as i64);
        self.resident_memory.set(resident_memory() as i64);
        self.memory_limit.set(broker.alarms.memory_limit() as i64);
        let alarms = broker.alarms.current();
        self.memory_alarm.set(i64::from(alarms.memory));
        self.disk_alarm.set(i64::from(alarms.disk));
        let stats = broker.store.stats();
        self.store_fsyncs
            .set(stats.syncs.load(Ordering::Relaxed) as i64);
        self.store_batches
            .set(stats.batches.load(Ordering::Relaxed) as i64);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

/// Per-queue series (`/metrics/per-object`), built at scrape time.
fn render_per_object(broker: &Broker) -> String {
    let mut registry = Registry::default();
    let family = |registry: &mut Registry, name: &str, help: &str| {
        let f = Family::<QueueLabels, Gauge>::default();
        registry.register(name, help, f.clone());
        f
    };
    let ready = family(
        &mut registry,
        "rabbitmq_queue_messages_ready",
        "Messages ready to be delivered to consumers",
    );
    let unacked = family(
        &mut registry,
        "rabbitmq_queue_messages_unacked",
        "Messages delivered to consumers but not yet acknowledged",
    );
    let consumers = family(
        &mut registry,
        "rabbitmq_queue_consumers",
        "Consumers on a queue",
    );
    let memory = family(
        &mut registry,
        "rabbitmq_queue_process_memory_bytes",
        "Memory a queue accounts for (bodies held in memory and entries)",
    );
    let counter = |registry: &mut Registry, name: &str, help: &str| {
        let f = Family::<QueueLabels, Counter>::default();
        registry.register(name, help, f.clone());
        f
    };
    let published = counter(
        &mut registry,
        "rabbitmq_queue_messages_published",
        "Messages published into a queue",
    );
    let delivered = counter(
        &mut registry,
        "rabbitmq_queue_messages_delivered",
        "Messages delivered from a queue to consumers or gets",
    );
    let acked = counter(
        &mut registry,
        "rabbitmq_queue_messages_acked",
        "Messages acknowledged from a queue",
    );
    for v in broker.vhost_list() {
        for q in v.queues() {
            let labels = QueueLabels {
                vhost: v.name().to_owned(),
                queue: q.name.as_str().to_owned(),
            };
            let ([p, d, a], _) = q.stats.snapshot();
            published.get_or_create(&labels).inc_by(p);
            delivered.get_or_create(&labels).inc_by(d);
            acked.get_or_create(&labels).inc_by(a);
            let counts = q.counters();
            ready.get_or_create(&labels).set(counts.ready as i64);
            unacked.get_or_create(&labels).set(counts.unacked as i64);
            consumers
                .get_or_create(&labels)
                .set(counts.consumers as i64);
            memory.get_or_create(&labels).set(counts.memory as i64);
        }
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "metrics encoding failed");
    }
    out
}

/// This process's resident set in bytes (Linux; 0 elsewhere).
fn resident_memory() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn metrics(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], b.metrics.render(&b))
}

async fn per_object(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        render_per_object(&b),
    )
}

/// Serves `/metrics` and `/metrics/per-object` on `listener` until shutdown.
pub fn spawn(broker: &Arc<Broker>, listener: TcpListener) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/metrics/per-object", get(per_object))
        .with_state(broker.clone());
    crate::management::serve_http(broker, listener, app, "metrics endpoint");
}
