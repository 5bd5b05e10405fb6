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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Upper bounds (octets) of RabbitMQ's `rabbitmq_message_size_bytes`
/// buckets (4.1+); a last bucket takes everything larger.
const MESSAGE_SIZE_BOUNDS: [u64; 8] = [
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
];

/// Sizes of the message bodies publishers sent, as RabbitMQ's histogram
/// `rabbitmq_message_size_bytes{protocol="amqp091"}`: one atomic per
/// bucket and one for the sum, so a publish adds to two counters and takes
/// no lock.
#[derive(Debug, Clone, Default)]
pub struct MessageSizes(std::sync::Arc<MessageSizeCounters>);

#[derive(Debug, Default)]
struct MessageSizeCounters {
    buckets: [std::sync::atomic::AtomicU64; 9],
    sum: std::sync::atomic::AtomicU64,
}

impl MessageSizes {
    /// Counts a body of `octets`.
    pub fn observe(&self, octets: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let i = MESSAGE_SIZE_BOUNDS
            .iter()
            .position(|b| octets <= *b)
            .unwrap_or(MESSAGE_SIZE_BOUNDS.len());
        if let Some(b) = self.0.buckets.get(i) {
            b.fetch_add(1, Relaxed);
        }
        self.0.sum.fetch_add(octets, Relaxed);
    }
}

impl prometheus_client::encoding::EncodeMetric for MessageSizes {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let counts: Vec<u64> = self.0.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let buckets: Vec<(f64, u64)> = MESSAGE_SIZE_BOUNDS
            .iter()
            .map(|b| *b as f64)
            .chain(std::iter::once(f64::MAX))
            .zip(counts.iter().copied())
            .collect();
        encoder
            .encode_family(&[("protocol", "amqp091")])?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                self.0.sum.load(Relaxed) as f64,
                counts.iter().sum(),
                &buckets,
                None,
            )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

/// A counter that is the sum of others, read at scrape time: a total
/// RabbitMQ reports beside its parts, costing nothing when the parts move.
#[derive(Debug, Clone)]
struct CounterSum(Vec<Counter>);

impl prometheus_client::encoding::EncodeMetric for CounterSum {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let total: u64 = self.0.iter().map(Counter::get).sum();
        encoder.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&total, None)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Counter
    }
}

/// RabbitMQ's node I/O counters (its `node_persister_metrics`), in the
/// order [`NodeTotals::io`] holds them: the management API's field, the
/// Prometheus counter (`_total` is added), its help, and whether it is a
/// time in microseconds (exposed in seconds). Warren's store is one log:
/// a write is a batch appended, a read a load of stored bodies, a sync an
/// fsync; its metadata writes are RabbitMQ's schema (mnesia) disk
/// transactions.
pub const IO_COUNTERS: [(&str, &str, &str, bool); 12] = [
    (
        "io_read_count",
        "rabbitmq_io_read_ops",
        "Total number of I/O read operations",
        false,
    ),
    (
        "io_read_bytes",
        "rabbitmq_io_read_bytes",
        "Total number of I/O bytes read",
        false,
    ),
    (
        "io_write_count",
        "rabbitmq_io_write_ops",
        "Total number of I/O write operations",
        false,
    ),
    (
        "io_write_bytes",
        "rabbitmq_io_write_bytes",
        "Total number of I/O bytes written",
        false,
    ),
    (
        "io_sync_count",
        "rabbitmq_io_sync_ops",
        "Total number of I/O sync operations",
        false,
    ),
    (
        "msg_store_read_count",
        "rabbitmq_msg_store_read",
        "Total number of Message Store read operations",
        false,
    ),
    (
        "msg_store_write_count",
        "rabbitmq_msg_store_write",
        "Total number of Message Store write operations",
        false,
    ),
    (
        "queue_index_write_count",
        "rabbitmq_queue_index_write_ops",
        "Total number of Queue Index write operations",
        false,
    ),
    (
        "mnesia_disk_tx_count",
        "rabbitmq_schema_db_disk_tx",
        "Total number of Schema DB disk transactions",
        false,
    ),
    (
        "io_read_time",
        "rabbitmq_io_read_time_seconds",
        "Total I/O read time",
        true,
    ),
    (
        "io_write_time",
        "rabbitmq_io_write_time_seconds",
        "Total I/O write time",
        true,
    ),
    (
        "io_sync_time",
        "rabbitmq_io_sync_time_seconds",
        "Total I/O sync time",
        true,
    ),
];

/// A counter whose value is read from elsewhere at scrape time (set by
/// [`Metrics::render`]); a time in microseconds is exposed in seconds.
#[derive(Debug, Clone, Default)]
struct ScrapedCounter {
    value: Arc<AtomicU64>,
    micros: bool,
}

impl prometheus_client::encoding::EncodeMetric for ScrapedCounter {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let v = self.value.load(Ordering::Relaxed);
        if self.micros {
            let seconds = v as f64 / 1e6;
            encoder
                .encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&seconds, None)
        } else {
            encoder.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&v, None)
        }
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Counter
    }
}

/// The broker's counters and the gauges filled in at scrape time.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The store's I/O counters ([`IO_COUNTERS`]), set at scrape time.
    io: [ScrapedCounter; 12],
    /// Messages published to the broker.
    pub received: Counter,
    /// Messages routed to at least one queue.
    pub routed: Counter,
    /// Unroutable mandatory messages returned to their publishers.
    pub unroutable_returned: Counter,
    /// Unroutable messages dropped (not mandatory).
    pub unroutable_dropped: Counter,
    /// Deliveries split as RabbitMQ splits them: to consumers or by
    /// `basic.get`, each with automatic or manual acknowledgement.
    consume_auto_ack: Counter,
    consume_manual_ack: Counter,
    get_auto_ack: Counter,
    get_manual_ack: Counter,
    /// Deliveries flagged redelivered.
    redelivered: Counter,
    /// `basic.get` answered `get-empty`.
    pub get_empty: Counter,
    /// Acknowledged deliveries.
    pub acknowledged: Counter,
    /// Publisher confirms sent (`basic.ack`).
    pub confirmed: Counter,
    /// Messages received on channels in confirm mode.
    pub received_confirm: Counter,
    /// Body sizes of messages received from publishers.
    pub message_sizes: MessageSizes,
    /// Copies enqueued: one per queue a message was routed to (RabbitMQ's
    /// `rabbitmq_queue_messages_published_total`, summed over queues).
    pub queue_published: Counter,
    dead_lettered: [Family<DeadLetterLabels, Counter>; 4],
    /// Messages dead-lettered (not those dropped), whatever the reason: the
    /// overview's `dead_lettered` (a Warren addition for its UI's chart).
    dead_lettered_total: Counter,
    /// Connections, channels and queues come and gone (RabbitMQ's churn
    /// counters).
    pub connections_opened: Counter,
    /// Connections closed, however.
    pub connections_closed: Counter,
    channels_opened: Counter,
    channels_closed: Counter,
    /// `queue.declare` answered (also passive, and of existing queues).
    pub queues_declared: Counter,
    /// Queues created on this node.
    pub queues_created: Counter,
    /// Queues deleted on this node (by anyone, expiry and auto-delete too).
    pub queues_deleted: Counter,
    /// Open channels.
    channels: Gauge,
    publishers: Gauge,
    unconfirmed: Gauge,
    disk_free: Gauge,
    disk_limit: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    open_sockets: Gauge,
    max_sockets: Gauge,
    uptime: Gauge,
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
    /// RabbitMQ's `ra_metrics`, summed over this node's replicas of
    /// replicated queues (the commit latency averaged), as RabbitMQ
    /// aggregates them.
    raft_term: ScrapedCounter,
    raft_snapshot_index: Gauge,
    raft_last_applied: Gauge,
    raft_commit_index: Gauge,
    raft_last_written: Gauge,
    raft_commit_latency: Gauge<f64, AtomicU64>,
    identity: Family<IdentityLabels, Gauge>,
    /// One series, set once.
    build: Family<BuildLabels, Gauge>,
    /// The overview's counters at the last sample and their rates since
    /// the one before (see [`Metrics::sample_overview`]).
    overview: parking_lot::Mutex<Option<OverviewSample>>,
}

/// A sample of [`Metrics::overview_counts`].
#[derive(Debug, Clone)]
struct OverviewSample {
    at: std::time::Instant,
    counts: Vec<u64>,
    rates: Vec<f64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let mut counter = |names: &[&str], help: &str| {
            // One counter under each name: RabbitMQ reports some figures
            // both globally and summed over channels (or queues), and
            // dashboards query either.
            let c = Counter::default();
            for name in names {
                registry.register(*name, help, c.clone());
            }
            c
        };
        let received = counter(
            &[
                "rabbitmq_global_messages_received",
                "rabbitmq_channel_messages_published",
            ],
            "Total number of messages received from publishers",
        );
        let routed = counter(
            &["rabbitmq_global_messages_routed"],
            "Total number of messages routed to queues",
        );
        let unroutable_returned = counter(
            &[
                "rabbitmq_global_messages_unroutable_returned",
                "rabbitmq_channel_messages_unroutable_returned",
            ],
            "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable",
        );
        let unroutable_dropped = counter(
            &[
                "rabbitmq_global_messages_unroutable_dropped",
                "rabbitmq_channel_messages_unroutable_dropped",
            ],
            "Total number of messages published as non-mandatory into an exchange and dropped as unroutable",
        );
        let acknowledged = counter(
            &[
                "rabbitmq_global_messages_acknowledged",
                "rabbitmq_channel_messages_acked",
            ],
            "Total number of messages acknowledged by consumers",
        );
        let confirmed = counter(
            &[
                "rabbitmq_global_messages_confirmed",
                "rabbitmq_channel_messages_confirmed",
            ],
            "Total number of messages confirmed to publishers",
        );
        let consume_auto_ack = counter(
            &[
                "rabbitmq_global_messages_delivered_consume_auto_ack",
                "rabbitmq_channel_messages_delivered",
            ],
            "Total number of messages delivered to consumers using basic.consume with automatic acknowledgment",
        );
        let consume_manual_ack = counter(
            &[
                "rabbitmq_global_messages_delivered_consume_manual_ack",
                "rabbitmq_channel_messages_delivered_ack",
            ],
            "Total number of messages delivered to consumers using basic.consume with manual acknowledgment",
        );
        let get_auto_ack = counter(
            &[
                "rabbitmq_global_messages_delivered_get_auto_ack",
                "rabbitmq_channel_get",
            ],
            "Total number of messages delivered to consumers using basic.get with automatic acknowledgment",
        );
        let get_manual_ack = counter(
            &[
                "rabbitmq_global_messages_delivered_get_manual_ack",
                "rabbitmq_channel_get_ack",
            ],
            "Total number of messages delivered to consumers using basic.get with manual acknowledgment",
        );
        let redelivered = counter(
            &[
                "rabbitmq_global_messages_redelivered",
                "rabbitmq_channel_messages_redelivered",
            ],
            "Total number of messages redelivered to consumers",
        );
        let get_empty = counter(
            &[
                "rabbitmq_global_messages_get_empty",
                "rabbitmq_channel_get_empty",
            ],
            "Total number of times basic.get operations fetched no message",
        );
        let received_confirm = counter(
            &["rabbitmq_global_messages_received_confirm"],
            "Total number of messages received from publishers expecting confirmations",
        );
        let queue_published = counter(
            &["rabbitmq_queue_messages_published"],
            "Total number of messages published to queues",
        );
        let connections_opened = counter(
            &["rabbitmq_connections_opened"],
            "Total number of connections opened",
        );
        let connections_closed = counter(
            &["rabbitmq_connections_closed"],
            "Total number of connections closed or terminated",
        );
        let channels_opened = counter(
            &["rabbitmq_channels_opened"],
            "Total number of channels opened",
        );
        let channels_closed = counter(
            &["rabbitmq_channels_closed"],
            "Total number of channels closed",
        );
        let queues_declared = counter(
            &["rabbitmq_queues_declared"],
            "Total number of queues declared",
        );
        let queues_created = counter(
            &["rabbitmq_queues_created"],
            "Total number of queues created",
        );
        let queues_deleted = counter(
            &["rabbitmq_queues_deleted"],
            "Total number of queues deleted",
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
        // All deliveries: the sum of the four kinds, added up at scrape time
        // (a delivery bumps only its kind's counter).
        registry.register(
            "rabbitmq_global_messages_delivered",
            "Total number of messages delivered to consumers",
            CounterSum(vec![
                consume_auto_ack.clone(),
                consume_manual_ack.clone(),
                get_auto_ack.clone(),
                get_manual_ack.clone(),
            ]),
        );
        let io = IO_COUNTERS.map(|(_, name, help, micros)| {
            let c = ScrapedCounter {
                micros,
                ..ScrapedCounter::default()
            };
            registry.register(name, help, c.clone());
            c
        });
        let message_sizes = MessageSizes::default();
        registry.register(
            "rabbitmq_message_size_bytes",
            "Size of messages received from publishers",
            message_sizes.clone(),
        );
        let raft_term = ScrapedCounter::default();
        registry.register(
            "rabbitmq_raft_term",
            "Current Raft term number",
            raft_term.clone(),
        );
        let raft_commit_latency = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "rabbitmq_raft_entry_commit_latency_seconds",
            "Time taken for a log entry to be committed",
            raft_commit_latency.clone(),
        );
        let mut gauge = |names: &[&str], help: &str| {
            let g = Gauge::default();
            for name in names {
                registry.register(*name, help, g.clone());
            }
            g
        };
        Metrics {
            io,
            received,
            routed,
            unroutable_returned,
            unroutable_dropped,
            consume_auto_ack,
            consume_manual_ack,
            get_auto_ack,
            get_manual_ack,
            redelivered,
            get_empty,
            acknowledged,
            confirmed,
            received_confirm,
            message_sizes,
            queue_published,
            dead_lettered,
            dead_lettered_total: Counter::default(),
            connections_opened,
            connections_closed,
            channels_opened,
            channels_closed,
            queues_declared,
            queues_created,
            queues_deleted,
            channels: gauge(&["rabbitmq_channels"], "Channels currently open"),
            publishers: gauge(
                &["rabbitmq_global_publishers"],
                "Current number of publishers",
            ),
            unconfirmed: gauge(
                &["rabbitmq_channel_messages_unconfirmed"],
                "Published but not yet confirmed messages",
            ),
            disk_free: gauge(
                &["rabbitmq_disk_space_available_bytes"],
                "Disk space available in bytes",
            ),
            disk_limit: gauge(
                &["rabbitmq_disk_space_available_limit_bytes"],
                "Free disk space low watermark in bytes",
            ),
            open_fds: gauge(&["rabbitmq_process_open_fds"], "Open file descriptors"),
            max_fds: gauge(&["rabbitmq_process_max_fds"], "Open file descriptors limit"),
            open_sockets: gauge(&["rabbitmq_process_open_tcp_sockets"], "Open TCP sockets"),
            max_sockets: gauge(
                &["rabbitmq_process_max_tcp_sockets"],
                "Open TCP sockets limit",
            ),
            uptime: gauge(
                &["rabbitmq_erlang_uptime_seconds"],
                "Node uptime (seconds since the broker started)",
            ),
            connections: gauge(&["rabbitmq_connections"], "Connections currently open"),
            queues: gauge(&["rabbitmq_queues"], "Queues available"),
            consumers: gauge(
                &[
                    "rabbitmq_consumers",
                    "rabbitmq_global_consumers",
                    "rabbitmq_channel_consumers",
                ],
                "Consumers currently connected",
            ),
            ready: gauge(
                &["rabbitmq_queue_messages_ready"],
                "Messages ready to be delivered to consumers",
            ),
            unacked: gauge(
                &["rabbitmq_queue_messages_unacked"],
                "Messages delivered to consumers but not yet acknowledged",
            ),
            resident_memory: gauge(
                &["rabbitmq_process_resident_memory_bytes"],
                "Memory used in bytes (resident set)",
            ),
            memory_limit: gauge(
                &["rabbitmq_resident_memory_limit_bytes"],
                "Memory high watermark in bytes",
            ),
            memory_alarm: gauge(
                &["rabbitmq_alarms_memory_used_watermark"],
                "1 if the memory alarm is in effect",
            ),
            disk_alarm: gauge(
                &["rabbitmq_alarms_free_disk_space_watermark"],
                "1 if the free disk space alarm is in effect",
            ),
            store_fsyncs: gauge(
                &["warren_store_fsyncs"],
                "fsyncs of the message store since start (group commits)",
            ),
            store_batches: gauge(
                &["warren_store_batches"],
                "Batches written by the message store since start",
            ),
            raft_term,
            raft_snapshot_index: gauge(
                &["rabbitmq_raft_log_snapshot_index"],
                "Raft log snapshot index",
            ),
            raft_last_applied: gauge(
                &["rabbitmq_raft_log_last_applied_index"],
                "Raft log last applied index",
            ),
            raft_commit_index: gauge(&["rabbitmq_raft_log_commit_index"], "Raft log commit index"),
            raft_last_written: gauge(
                &["rabbitmq_raft_log_last_written_index"],
                "Raft log last written index",
            ),
            raft_commit_latency,
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
            overview: parking_lot::Mutex::new(None),
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

/// How a message was handed to a client, as RabbitMQ splits deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryKind {
    /// Pushed to a consumer (`basic.deliver`).
    Consume,
    /// Fetched by `basic.get`.
    Get,
}

impl Metrics {
    /// Counts a delivery of `kind`, acknowledged by the client if
    /// `manual_ack`, flagged redelivered if `redelivered`.
    pub fn delivered(&self, kind: DeliveryKind, manual_ack: bool, redelivered: bool) {
        match (kind, manual_ack) {
            (DeliveryKind::Consume, false) => self.consume_auto_ack.inc(),
            (DeliveryKind::Consume, true) => self.consume_manual_ack.inc(),
            (DeliveryKind::Get, false) => self.get_auto_ack.inc(),
            (DeliveryKind::Get, true) => self.get_manual_ack.inc(),
        };
        if redelivered {
            self.redelivered.inc();
        }
    }

    /// The node's counters the management overview shows, under
    /// RabbitMQ's names there: `message_stats` keys, then `churn_rates`
    /// keys (prefixed `churn.`).
    pub fn overview_counts(&self) -> [(&'static str, u64); 17] {
        [
            ("confirm", self.confirmed.get()),
            ("deliver", self.consume_manual_ack.get()),
            ("deliver_no_ack", self.consume_auto_ack.get()),
            ("get", self.get_manual_ack.get()),
            ("get_no_ack", self.get_auto_ack.get()),
            ("get_empty", self.get_empty.get()),
            ("redeliver", self.redelivered.get()),
            ("drop_unroutable", self.unroutable_dropped.get()),
            ("return_unroutable", self.unroutable_returned.get()),
            ("dead_lettered", self.dead_lettered_total.get()),
            ("churn.connection_created", self.connections_opened.get()),
            ("churn.connection_closed", self.connections_closed.get()),
            ("churn.channel_created", self.channels_opened.get()),
            ("churn.channel_closed", self.channels_closed.get()),
            ("churn.queue_declared", self.queues_declared.get()),
            ("churn.queue_created", self.queues_created.get()),
            ("churn.queue_deleted", self.queues_deleted.get()),
        ]
    }

    /// Samples [`Metrics::overview_counts`]: rates become the change per
    /// second since the previous sample (the monitor calls it every 5 s).
    pub fn sample_overview(&self) {
        let now = std::time::Instant::now();
        let counts: Vec<u64> = self.overview_counts().iter().map(|(_, c)| *c).collect();
        let mut last = self.overview.lock();
        let rates = match &*last {
            Some(prev) => {
                let secs = now.duration_since(prev.at).as_secs_f64().max(1e-3);
                counts
                    .iter()
                    .zip(&prev.counts)
                    .map(|(c, p)| c.saturating_sub(*p) as f64 / secs)
                    .collect()
            }
            None => vec![0.0; counts.len()],
        };
        *last = Some(OverviewSample {
            at: now,
            counts,
            rates,
        });
    }

    /// Each overview counter now, with its last sampled rate.
    pub fn overview_stats(&self) -> Vec<(&'static str, u64, f64)> {
        let last = self.overview.lock();
        self.overview_counts()
            .iter()
            .enumerate()
            .map(|(i, (name, count))| {
                let rate = last
                    .as_ref()
                    .and_then(|s| s.rates.get(i).copied())
                    .unwrap_or(0.0);
                (*name, *count, rate)
            })
            .collect()
    }

    /// A channel opened.
    pub fn channel_opened(&self) {
        self.channels.inc();
        self.channels_opened.inc();
    }

    /// A channel closed (however).
    pub fn channel_closed(&self) {
        self.channels.dec();
        self.channels_closed.inc();
    }

    /// Counts a message a quorum queue dead-lettered `at-least-once` (its
    /// queues confirmed it) for `reason`.
    pub fn dead_letter_at_least_once(&self, reason: DeadLetterReason) {
        let i = reason_index(reason);
        self.dead_lettered_total.inc();
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
        if dead_lettered {
            self.dead_lettered_total.inc();
        }
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

    fn note_identity(&self, identity: &IdentityLabels) {
        if self.identity.get(identity).is_none() {
            // One series: the names are fixed for the process's life, but
            // a cluster's name may only be known once it formed.
            self.identity.clear();
            self.identity.get_or_create(identity).set(1);
        }
    }

    /// Registers `rabbitmq_build_info` and `rabbitmq_identity_info` in
    /// `registry` too (`/metrics/detailed` serves them beside its families).
    pub fn register_info(&self, registry: &mut Registry, identity: &IdentityLabels) {
        self.note_identity(identity);
        registry.register(
            "rabbitmq_build_info",
            "RabbitMQ & Erlang/OTP version info",
            self.build.clone(),
        );
        registry.register(
            "rabbitmq_identity_info",
            "RabbitMQ node & cluster identity info",
            self.identity.clone(),
        );
    }

    /// The churn counters (RabbitMQ's `connection_churn_metrics`): name
    /// (without prefix or `_total`), help, value.
    pub fn churn(&self) -> [(&'static str, &'static str, u64); 7] {
        [
            (
                "connections_opened",
                "Total number of connections opened",
                self.connections_opened.get(),
            ),
            (
                "connections_closed",
                "Total number of connections closed or terminated",
                self.connections_closed.get(),
            ),
            (
                "channels_opened",
                "Total number of channels opened",
                self.channels_opened.get(),
            ),
            (
                "channels_closed",
                "Total number of channels closed",
                self.channels_closed.get(),
            ),
            (
                "queues_declared",
                "Total number of queues declared",
                self.queues_declared.get(),
            ),
            (
                "queues_created",
                "Total number of queues created",
                self.queues_created.get(),
            ),
            (
                "queues_deleted",
                "Total number of queues deleted",
                self.queues_deleted.get(),
            ),
        ]
    }

    /// The node-wide exposition (`/metrics`), with the totals read from the
    /// broker at scrape time.
    pub fn render(&self, totals: &NodeTotals, identity: &IdentityLabels) -> String {
        self.note_identity(identity);
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
        let raft = &totals.raft;
        self.raft_term.value.store(raft.term, Ordering::Relaxed);
        self.raft_snapshot_index.set(raft.snapshot_index as i64);
        self.raft_last_applied.set(raft.last_applied as i64);
        self.raft_commit_index.set(raft.commit_index as i64);
        self.raft_last_written.set(raft.last_written as i64);
        self.raft_commit_latency.set(raft.commit_latency_seconds);
        self.publishers.set(totals.publishers);
        self.unconfirmed.set(totals.unconfirmed);
        self.disk_free.set(totals.disk_free);
        self.disk_limit.set(totals.disk_limit);
        self.open_fds.set(totals.open_fds);
        self.max_fds.set(totals.max_fds);
        self.open_sockets.set(totals.open_sockets);
        self.max_sockets.set(totals.max_sockets);
        self.uptime.set(totals.uptime_seconds);
        for (c, v) in self.io.iter().zip(totals.io) {
            c.value.store(v, Ordering::Relaxed);
        }
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
    /// The store's I/O counters, in [`IO_COUNTERS`]'s order.
    pub io: [u64; 12],
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
    /// Channels that have published.
    pub publishers: i64,
    /// Publishes not yet confirmed, over every channel in confirm mode.
    pub unconfirmed: i64,
    /// Free space on the data directory's disk (octets; the last sample).
    pub disk_free: i64,
    /// The free disk space limit (octets).
    pub disk_limit: i64,
    /// Open file descriptors.
    pub open_fds: i64,
    /// The file descriptor limit.
    pub max_fds: i64,
    /// Open client sockets.
    pub open_sockets: i64,
    /// The client socket limit.
    pub max_sockets: i64,
    /// Seconds since the broker started.
    pub uptime_seconds: i64,
    /// This node's replicas of replicated queues, their Raft figures summed.
    pub raft: RaftTotals,
}

/// The Raft figures of a node's replicas, summed as RabbitMQ's aggregated
/// `/metrics` sums its `ra_metrics` (the commit latency is their average).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct RaftTotals {
    /// Terms.
    pub term: u64,
    /// Snapshot indexes.
    pub snapshot_index: u64,
    /// Last applied indexes.
    pub last_applied: u64,
    /// Commit indexes.
    pub commit_index: u64,
    /// Last written indexes.
    pub last_written: u64,
    /// The average commit latency (seconds).
    pub commit_latency_seconds: f64,
}

/// This process's resident set in bytes (Linux; 0 elsewhere).
pub fn resident_memory() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}
