//! The Prometheus endpoint: `/metrics` (the node's counters from
//! `metrics.rs`, with totals read from every vhost, queue and connection at
//! scrape time), `/metrics/per-object` and `/metrics/detailed` (per-object
//! series built at scrape time, `objects.rs`), served by axum on their own
//! port (default 15692) without authentication, as RabbitMQ's
//! `rabbitmq_prometheus` does.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::metrics::NodeTotals;

mod objects;

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
        for (_, ch) in c.open_channels() {
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
    t.io = broker.io_counts();
    if let Some(peers) = broker.peers.get() {
        t.raft = raft_totals(&peers.raft_metrics());
    }
    let stats = broker.store.stats();
    t.store_fsyncs = stats.syncs.load(Ordering::Relaxed) as i64;
    t.store_batches = stats.batches.load(Ordering::Relaxed) as i64;
    t
}

/// The Raft figures of a node's replicas summed, the commit latency
/// averaged, as RabbitMQ's aggregated `/metrics` does.
fn raft_totals(replicas: &[crate::peers::RaftMetrics]) -> crate::metrics::RaftTotals {
    let mut t = crate::metrics::RaftTotals::default();
    for r in replicas {
        t.term += r.term;
        t.snapshot_index += r.snapshot_index;
        t.last_applied += r.last_applied;
        t.commit_index += r.commit_index;
        t.last_written += r.last_written;
        t.commit_latency_seconds += r.commit_latency_seconds;
    }
    if !replicas.is_empty() {
        t.commit_latency_seconds /= replicas.len() as f64;
    }
    t
}

/// `/metrics/per-object`: the queue, connection and channel families for
/// every object, and each queue's message counters, built at scrape time.
fn render_per_object(broker: &Broker) -> String {
    use objects::ObjectFamily as F;
    let req = objects::Request {
        families: [
            F::QueueCoarse,
            F::Queue,
            F::Ra,
            F::ConnectionCoarse,
            F::Connection,
            F::Channel,
        ]
        .into_iter()
        .collect(),
        vhosts: None,
    };
    let mut registry = objects::build(
        broker,
        &node_totals(broker),
        &req,
        "rabbitmq_",
        Registry::default(),
    );
    let mut counter = |name: &str, help: &str| {
        let f = Family::<QueueLabels, Counter>::default();
        registry.register(name, help, f.clone());
        f
    };
    let published = counter(
        "rabbitmq_queue_messages_published",
        "Messages published into a queue",
    );
    let delivered = counter(
        "rabbitmq_queue_messages_delivered",
        "Messages delivered from a queue to consumers or gets",
    );
    let acked = counter(
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
        }
    }
    encode(&registry)
}

/// `/metrics/detailed?family=...&vhost=...`: only the families asked for,
/// with the node's identity and build series, as RabbitMQ serves it.
fn render_detailed(broker: &Broker, query: &str) -> String {
    let req = objects::Request::from_query(query);
    let mut registry = Registry::default();
    broker
        .metrics
        .register_info(&mut registry, &identity(broker));
    let registry = objects::build(
        broker,
        &node_totals(broker),
        &req,
        "rabbitmq_detailed_",
        registry,
    );
    encode(&registry)
}

fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!(error = %e, "metrics encoding failed");
    }
    out
}

/// This node's identity labels.
fn identity(b: &Broker) -> crate::metrics::IdentityLabels {
    crate::metrics::IdentityLabels::new(
        &b.config.node_name,
        &b.peers
            .get()
            .map_or_else(|| b.config.node_name.clone(), |p| p.cluster_name()),
    )
}

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn metrics(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        b.metrics.render(&node_totals(&b), &identity(&b)),
    )
}

async fn per_object(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        render_per_object(&b),
    )
}

async fn detailed(State(b): State<Arc<Broker>>, RawQuery(q): RawQuery) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        render_detailed(&b, q.as_deref().unwrap_or("")),
    )
}

/// Serves `/metrics`, `/metrics/per-object` and `/metrics/detailed` on
/// `listener` until shutdown.
pub fn spawn(broker: &Arc<Broker>, listener: TcpListener) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/metrics/per-object", get(per_object))
        .route("/metrics/detailed", get(detailed))
        .with_state(broker.clone());
    crate::management::serve_http(broker, listener, app, "metrics endpoint");
}
