//! The Prometheus endpoint: `/metrics` (the node's counters from
//! `metrics.rs`, with totals read from every vhost, queue and connection at
//! scrape time) and `/metrics/per-object` (per-queue series built at scrape
//! time), served by axum on their own port (default 15692) without
//! authentication, as RabbitMQ's `rabbitmq_prometheus` does.

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
use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::metrics::NodeTotals;

/// Labels of a per-queue series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    vhost: String,
    queue: String,
}

/// The totals `/metrics` reports, read from the broker now.
fn node_totals(broker: &Broker) -> NodeTotals {
    let mut t = NodeTotals::default();
    for v in broker.vhost_list() {
        for q in v.queues() {
            let counts = q.counters();
            t.queues += 1;
            t.consumers += counts.consumers as i64;
            t.ready += counts.ready as i64;
            t.unacked += counts.unacked as i64;
        }
    }
    t.connections = broker.connections.load(Ordering::Relaxed) as i64;
    for c in broker.live_connections.iter() {
        for ch in c
            .channels
            .lock()
            .values()
            .filter_map(std::sync::Weak::upgrade)
        {
            let (published, unconfirmed) = ch.publishing();
            t.publishers += i64::from(published);
            t.unconfirmed += unconfirmed as i64;
        }
    }
    let stats = broker.node_stats();
    t.disk_free = stats.disk_free as i64;
    t.disk_limit = stats.disk_free_limit as i64;
    t.open_fds = stats.fd_used as i64;
    t.max_fds = stats.fd_total as i64;
    t.open_sockets = stats.sockets_used as i64;
    t.max_sockets = stats.sockets_total as i64;
    t.uptime_seconds = (stats.uptime / 1000) as i64;
    t.memory_limit = broker.alarms.memory_limit() as i64;
    let alarms = broker.alarms.current();
    t.memory_alarm = alarms.memory;
    t.disk_alarm = alarms.disk;
    let stats = broker.store.stats();
    t.store_fsyncs = stats.syncs.load(Ordering::Relaxed) as i64;
    t.store_batches = stats.batches.load(Ordering::Relaxed) as i64;
    t
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

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn metrics(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        b.metrics.render(
            &node_totals(&b),
            &crate::metrics::IdentityLabels::new(
                &b.config.node_name,
                &b.peers
                    .get()
                    .map_or_else(|| b.config.node_name.clone(), |p| p.cluster_name()),
            ),
        ),
    )
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
