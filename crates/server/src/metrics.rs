//! Prometheus metrics, named as RabbitMQ's `rabbitmq_prometheus` plugin names
//! them so that existing dashboards and alerts work: message counters
//! (`rabbitmq_global_messages_*_total`), node totals (connections, channels,
//! queues, consumers, messages ready/unacknowledged), process memory and
//! alarms; per-queue series on `/metrics/per-object`. Served by axum on its
//! own port (default 15692) without authentication, as RabbitMQ does.
//!
//! Counters are atomics bumped where the event happens; totals are read from
//! the broker's state at scrape time by the endpoint (`prometheus.rs`), which
//! also builds the per-object series.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use queue_store::DeadLetterReason;

/// Labels of RabbitMQ's dead-letter counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeadLetterLabels {
    queue_type: &'static str,
    /// `at_most_once` when dead-lettered, `disabled` when dropped (no DLX),
    /// `at_least_once` for a quorum queue's confirmed dead letters.
    dead_letter_strategy: &'static str,
}

/// Labels of `rabbitmq_identity_info`, RabbitMQ's per-node identity
/// series (dashboards join the others to it on `instance`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    /// The node's name.
    pub rabbitmq_node: String,
    /// The cluster's name (a node alone: its own name, as RabbitMQ's).
    pub rabbitmq_cluster: String,
    /// A stable id of the cluster: `rabbitmq-cluster-id-` and a hash of
    /// its name (RabbitMQ draws one at random when the cluster forms).
    pub rabbitmq_cluster_permanent_id: String,
}

impl IdentityLabels {
    /// The labels of node `node` in cluster `cluster`.
    pub fn new(node: &str, cluster: &str) -> IdentityLabels {
        // FNV-1a: the same id on every node and every run.
        let hash = cluster.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        IdentityLabels {
            rabbitmq_node: node.to_owned(),
            rabbitmq_cluster: cluster.to_owned(),
            rabbitmq_cluster_permanent_id: format!("rabbitmq-cluster-id-{hash:016x}"),
        }
    }
}

/// Labels of `rabbitmq_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    /// The RabbitMQ release whose behaviour Warren follows.
    rabbitmq_version: &'static str,
    prometheus_plugin_version: &'static str,
    prometheus_client_version: &'static str,
    /// No Erlang here: `none`.
    erlang_version: &'static str,
    warren_version: &'static str,
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
    identity: Family<IdentityLabels, Gauge>,
    /// Kept registered (one series, set once).
    #[allow(dead_code)]
    build: Family<BuildLabels, Gauge>,
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
            build: {
                let f = Family::<BuildLabels, Gauge>::default();
                registry.register(
                    "rabbitmq_build_info",
                    "RabbitMQ & Erlang/OTP version info",
                    f.clone(),
                );
                f.get_or_create(&BuildLabels {
                    rabbitmq_version: "3.10.0",
                    prometheus_plugin_version: env!("CARGO_PKG_VERSION"),
                    prometheus_client_version: "prometheus-client (Rust)",
                    erlang_version: "none",
                    warren_version: env!("CARGO_PKG_VERSION"),
                })
                .set(1);
                f
            },
            identity: {
                let f = Family::<IdentityLabels, Gauge>::default();
                registry.register(
                    "rabbitmq_identity_info",
                    "RabbitMQ node & cluster identity info",
                    f.clone(),
                );
                f
            },
            registry,
        }
    }
}

/// Where `reason`'s counter family sits in `Metrics::dead_lettered`.
fn reason_index(reason: DeadLetterReason) -> usize {
    match reason {
        DeadLetterReason::Expired => 0,
        DeadLetterReason::Rejected => 1,
        DeadLetterReason::MaxLen => 2,
        DeadLetterReason::DeliveryLimit => 3,
    }
}

impl Metrics {
    /// Counts a message a quorum queue dead-lettered `at-least-once` (its
    /// queues confirmed it) for `reason`.
    pub fn dead_letter_at_least_once(&self, reason: DeadLetterReason) {
        let i = reason_index(reason);
        if let Some(f) = self.dead_lettered.get(i) {
            f.get_or_create(&DeadLetterLabels {
                queue_type: "rabbit_quorum_queue",
                dead_letter_strategy: "at_least_once",
            })
            .inc();
        }
    }

    /// Counts a message dead-lettered (`dead_lettered`) or dropped for `reason`.
    pub fn dead_letter(&self, reason: DeadLetterReason, dead_lettered: bool) {
        let i = reason_index(reason);
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

    /// The node-wide exposition (`/metrics`), with the totals read from the
    /// broker at scrape time.
    pub fn render(&self, totals: &NodeTotals, identity: &IdentityLabels) -> String {
        if self.identity.get(identity).is_none() {
            // One series: the names are fixed for the process's life, but
            // a cluster's name may only be known once it formed.
            self.identity.clear();
            self.identity.get_or_create(identity).set(1);
        }
        self.queues.set(totals.queues);
        self.consumers.set(totals.consumers);
        self.ready.set(totals.ready);
        self.unacked.set(totals.unacked);
        self.connections.set(totals.connections);
        self.resident_memory.set(resident_memory() as i64);
        self.memory_limit.set(totals.memory_limit);
        self.memory_alarm.set(i64::from(totals.memory_alarm));
        self.disk_alarm.set(i64::from(totals.disk_alarm));
        self.store_fsyncs.set(totals.store_fsyncs);
        self.store_batches.set(totals.store_batches);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

/// The node totals a scrape reports, read from the broker's state.
#[derive(Debug, Default, Clone, Copy)]
pub struct NodeTotals {
    /// Queues.
    pub queues: i64,
    /// Consumers.
    pub consumers: i64,
    /// Ready messages.
    pub ready: i64,
    /// Unacknowledged messages.
    pub unacked: i64,
    /// Open connections.
    pub connections: i64,
    /// The memory watermark (octets).
    pub memory_limit: i64,
    /// The memory alarm is raised.
    pub memory_alarm: bool,
    /// The disk alarm is raised.
    pub disk_alarm: bool,
    /// The store's fsyncs so far.
    pub store_fsyncs: i64,
    /// The store's write batches so far.
    pub store_batches: i64,
}

/// This process's resident set in bytes (Linux; 0 elsewhere).
pub fn resident_memory() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}
