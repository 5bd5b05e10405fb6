//! Per-object series, built at scrape time from the broker's state: what
//! `/metrics/per-object` serves (every queue, channel and connection) and
//! what `/metrics/detailed?family=...&vhost=...` serves (only the families
//! asked for, queues of the vhosts asked for), under RabbitMQ's family,
//! metric and label names.
//!
//! RabbitMQ labels channels and connections with their Erlang pids
//! (`channel="<0.977.0>"`, connections too under the label `channel`).
//! Warren has no pids: it keeps their shape with the connection's id and
//! the channel's number, `<0.{connection}.{channel}>`, and `<0.{connection}.0>`
//! for a connection (channel 0 is never a channel).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::broker::Broker;
use crate::metrics::NodeTotals;

/// A series' labels, in RabbitMQ's order.
type Labels = Vec<(&'static str, String)>;

/// The families `/metrics/detailed` serves (RabbitMQ 3.10's names, those
/// Warren has figures for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum ObjectFamily {
    /// Connections, channels and queues come and gone.
    ConnectionChurn,
    /// Descriptors, sockets, memory, disk and tasks in use.
    NodeCoarse,
    /// Their limits, and uptime.
    Node,
    /// Per queue: ready, unacknowledged and all messages.
    QueueCoarse,
    /// Per queue: consumers.
    QueueConsumerCount,
    /// Per queue: consumers and memory.
    Queue,
    /// Per connection: octets in and out.
    ConnectionCoarse,
    /// Per connection: reads, writes and channels.
    Connection,
    /// Per channel: consumers, unacknowledged, unconfirmed, prefetch.
    Channel,
    /// Per vhost: running (cluster-wide, `rabbitmq_cluster_` prefix).
    VhostStatus,
    /// Per exchange: its name and type (cluster-wide).
    ExchangeNames,
    /// Per exchange: bindings it is the source of (cluster-wide).
    ExchangeBindings,
    /// The store's I/O counters (`metrics::IO_COUNTERS`).
    NodePersister,
    /// Per replica of a replicated queue on this node: its Raft term and
    /// indexes, and its commit latency (`rabbitmq_raft_*`).
    Ra,
}

impl ObjectFamily {
    const NAMES: [(&'static str, ObjectFamily); 14] = [
        ("connection_churn_metrics", ObjectFamily::ConnectionChurn),
        ("node_coarse_metrics", ObjectFamily::NodeCoarse),
        ("node_metrics", ObjectFamily::Node),
        ("queue_coarse_metrics", ObjectFamily::QueueCoarse),
        ("queue_consumer_count", ObjectFamily::QueueConsumerCount),
        ("queue_metrics", ObjectFamily::Queue),
        ("connection_coarse_metrics", ObjectFamily::ConnectionCoarse),
        ("connection_metrics", ObjectFamily::Connection),
        ("channel_metrics", ObjectFamily::Channel),
        ("vhost_status", ObjectFamily::VhostStatus),
        ("exchange_names", ObjectFamily::ExchangeNames),
        ("exchange_bindings", ObjectFamily::ExchangeBindings),
        ("node_persister_metrics", ObjectFamily::NodePersister),
        ("ra_metrics", ObjectFamily::Ra),
    ];

    /// The family RabbitMQ calls `name`, if Warren serves it.
    pub(super) fn parse(name: &str) -> Option<ObjectFamily> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, f)| f)
    }
}

/// One exposition being built: families registered under `prefix`.
struct Exposition {
    registry: Registry,
    prefix: &'static str,
}

impl Exposition {
    fn gauge(&mut self, name: &str, help: &str) -> Family<Labels, Gauge> {
        let f = Family::<Labels, Gauge>::default();
        self.registry
            .register(format!("{}{name}", self.prefix), help, f.clone());
        f
    }

    /// A counter family; `name` without `_total` (added when encoded).
    fn counter(&mut self, name: &str, help: &str) -> Family<Labels, Counter> {
        let f = Family::<Labels, Counter>::default();
        self.registry
            .register(format!("{}{name}", self.prefix), help, f.clone());
        f
    }

    /// One unlabelled gauge set to `value`.
    fn one_gauge(&mut self, name: &str, help: &str, value: i64) {
        let g = Gauge::<i64>::default();
        g.set(value);
        self.registry
            .register(format!("{}{name}", self.prefix), help, g);
    }

    /// One unlabelled counter at `value`; `name` without `_total`.
    fn one_counter(&mut self, name: &str, help: &str, value: u64) {
        let c = Counter::<u64>::default();
        c.inc_by(value);
        self.registry
            .register(format!("{}{name}", self.prefix), help, c);
    }
}

/// The label value of connection `id` (see the module comment).
fn connection_label(id: u64) -> String {
    format!("<0.{id}.0>")
}

/// What to build, and for which vhosts (`None`: all).
#[derive(Debug, Default)]
pub(super) struct Request {
    /// Families asked for.
    pub(super) families: BTreeSet<ObjectFamily>,
    /// Queues of these vhosts only (queue families).
    pub(super) vhosts: Option<Vec<String>>,
}

impl Request {
    /// `/metrics/detailed`'s query: `family=` and `vhost=`, each repeatable.
    /// Unknown families are ignored and no family means none, as RabbitMQ's.
    pub(super) fn from_query(query: &str) -> Request {
        let mut r = Request::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = value.replace('+', " ");
            let value = percent_encoding::percent_decode_str(&value)
                .decode_utf8_lossy()
                .into_owned();
            match key {
                "family" => r.families.extend(ObjectFamily::parse(&value)),
                "vhost" => r.vhosts.get_or_insert_with(Vec::new).push(value),
                _ => {}
            }
        }
        r
    }
}

/// Adds the families `req` asks for to `registry`, named with `prefix`
/// (`rabbitmq_detailed_` or `rabbitmq_`; the cluster-wide families always
/// `rabbitmq_cluster_`).
pub(super) fn build(
    broker: &Broker,
    totals: &NodeTotals,
    req: &Request,
    prefix: &'static str,
    registry: Registry,
) -> Registry {
    let mut x = Exposition { registry, prefix };
    let has = |f| req.families.contains(&f);
    if has(ObjectFamily::ConnectionChurn) {
        for (name, help, value) in broker.metrics.churn() {
            x.one_counter(name, help, value);
        }
    }
    if has(ObjectFamily::NodePersister) {
        for ((_, name, help, micros), value) in crate::metrics::IO_COUNTERS.iter().zip(totals.io) {
            let name = name.trim_start_matches("rabbitmq_");
            if *micros {
                let c = Counter::<f64, std::sync::atomic::AtomicU64>::default();
                c.inc_by(value as f64 / 1e6);
                x.registry.register(format!("{}{name}", x.prefix), *help, c);
            } else {
                x.one_counter(name, help, value);
            }
        }
    }
    if has(ObjectFamily::NodeCoarse) {
        let stats = broker.node_stats();
        x.one_gauge("process_open_fds", "Open file descriptors", totals.open_fds);
        x.one_gauge(
            "process_open_tcp_sockets",
            "Open TCP sockets",
            totals.open_sockets,
        );
        x.one_gauge(
            "process_resident_memory_bytes",
            "Memory used in bytes",
            crate::metrics::resident_memory() as i64,
        );
        x.one_gauge(
            "disk_space_available_bytes",
            "Disk space available in bytes",
            totals.disk_free,
        );
        x.one_gauge(
            "erlang_processes_used",
            "Tasks alive (Erlang processes used)",
            stats.proc_used as i64,
        );
    }
    if has(ObjectFamily::Node) {
        x.one_gauge(
            "process_max_fds",
            "Open file descriptors limit",
            totals.max_fds,
        );
        x.one_gauge(
            "process_max_tcp_sockets",
            "Open TCP sockets limit",
            totals.max_sockets,
        );
        x.one_gauge(
            "resident_memory_limit_bytes",
            "Memory high watermark in bytes",
            totals.memory_limit,
        );
        x.one_gauge(
            "disk_space_available_limit_bytes",
            "Free disk space low watermark in bytes",
            totals.disk_limit,
        );
        x.one_gauge(
            "erlang_uptime_seconds",
            "Node uptime",
            totals.uptime_seconds,
        );
    }
    queues(broker, req, &mut x);
    if has(ObjectFamily::Ra) {
        raft(broker, req, &mut x);
    }
    connections_and_channels(broker, req, &mut x);
    cluster_wide(broker, req, x.registry)
}

/// The queue families.
fn queues(broker: &Broker, req: &Request, x: &mut Exposition) {
    let has = |f| req.families.contains(&f);
    let coarse = has(ObjectFamily::QueueCoarse);
    let full = has(ObjectFamily::Queue);
    // (queue_metrics holds the consumer count too: asked for both, it is
    // served once, as RabbitMQ does.)
    let consumer_count = has(ObjectFamily::QueueConsumerCount) && !full;
    if !(coarse || full || consumer_count) {
        return;
    }
    let ready = coarse.then(|| {
        x.gauge(
            "queue_messages_ready",
            "Messages ready to be delivered to consumers",
        )
    });
    let unacked = coarse.then(|| {
        x.gauge(
            "queue_messages_unacked",
            "Messages delivered to consumers but not yet acknowledged",
        )
    });
    let messages =
        coarse.then(|| x.gauge("queue_messages", "Sum of ready and unacknowledged messages"));
    let consumers =
        (full || consumer_count).then(|| x.gauge("queue_consumers", "Consumers on a queue"));
    let memory = full.then(|| {
        x.gauge(
            "queue_process_memory_bytes",
            "Memory a queue accounts for (bodies held in memory and entries)",
        )
    });
    for v in broker.vhost_list() {
        if let Some(only) = &req.vhosts {
            if !only.iter().any(|n| n == v.name()) {
                continue;
            }
        }
        for q in v.queues() {
            let labels = vec![
                ("vhost", v.name().to_owned()),
                ("queue", q.name.as_str().to_owned()),
            ];
            let counts = q.counters();
            if let (Some(r), Some(u), Some(m)) = (&ready, &unacked, &messages) {
                r.get_or_create(&labels).set(counts.ready as i64);
                u.get_or_create(&labels).set(counts.unacked as i64);
                m.get_or_create(&labels)
                    .set((counts.ready + counts.unacked) as i64);
            }
            if let Some(c) = &consumers {
                c.get_or_create(&labels).set(counts.consumers as i64);
            }
            if let Some(mem) = &memory {
                mem.get_or_create(&labels).set(counts.memory as i64);
            }
        }
    }
}

/// `ra_metrics`: a series per replica of a replicated queue on this node,
/// labelled as RabbitMQ labels a quorum queue's.
fn raft(broker: &Broker, req: &Request, x: &mut Exposition) {
    let term = x.counter("raft_term", "Current Raft term number");
    let snapshot = x.gauge("raft_log_snapshot_index", "Raft log snapshot index");
    let applied = x.gauge("raft_log_last_applied_index", "Raft log last applied index");
    let commit = x.gauge("raft_log_commit_index", "Raft log commit index");
    let written = x.gauge("raft_log_last_written_index", "Raft log last written index");
    let latency = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    x.registry.register(
        format!("{}raft_entry_commit_latency_seconds", x.prefix),
        "Time taken for a log entry to be committed",
        latency.clone(),
    );
    let Some(peers) = broker.peers.get() else {
        return;
    };
    for r in peers.raft_metrics() {
        if let Some(only) = &req.vhosts {
            if !only.contains(&r.vhost) {
                continue;
            }
        }
        let labels = vec![("vhost", r.vhost), ("queue", r.queue)];
        term.get_or_create(&labels).inc_by(r.term);
        snapshot.get_or_create(&labels).set(r.snapshot_index as i64);
        applied.get_or_create(&labels).set(r.last_applied as i64);
        commit.get_or_create(&labels).set(r.commit_index as i64);
        written.get_or_create(&labels).set(r.last_written as i64);
        latency.get_or_create(&labels).set(r.commit_latency_seconds);
    }
}

/// The connection and channel families.
fn connections_and_channels(broker: &Broker, req: &Request, x: &mut Exposition) {
    let has = |f| req.families.contains(&f);
    if has(ObjectFamily::ConnectionCoarse) {
        let incoming = x.counter(
            "connection_incoming_bytes",
            "Total number of bytes received on a connection",
        );
        let outgoing = x.counter(
            "connection_outgoing_bytes",
            "Total number of bytes sent on a connection",
        );
        for c in broker.live_connections.iter() {
            let labels = vec![("channel", connection_label(c.id))];
            incoming
                .get_or_create(&labels)
                .inc_by(c.recv_oct.load(Ordering::Relaxed));
            outgoing.get_or_create(&labels).inc_by(c.outbox.sent().0);
        }
    }
    if has(ObjectFamily::Connection) {
        let reads = x.counter(
            "connection_incoming_packets",
            "Total number of packets received on a connection",
        );
        let writes = x.counter(
            "connection_outgoing_packets",
            "Total number of packets sent on a connection",
        );
        let channels = x.gauge("connection_channels", "Channels on a connection");
        for c in broker.live_connections.iter() {
            let labels = vec![("channel", connection_label(c.id))];
            reads
                .get_or_create(&labels)
                .inc_by(c.recv_cnt.load(Ordering::Relaxed));
            writes.get_or_create(&labels).inc_by(c.outbox.sent().1);
            channels
                .get_or_create(&labels)
                .set(c.channels.lock().len() as i64);
        }
    }
    if has(ObjectFamily::Channel) {
        let consumers = x.gauge("channel_consumers", "Consumers on a channel");
        let unacked = x.gauge(
            "channel_messages_unacked",
            "Delivered but not yet acknowledged messages",
        );
        let unconfirmed = x.gauge(
            "channel_messages_unconfirmed",
            "Published but not yet confirmed messages",
        );
        let consumer_prefetch = x.gauge(
            "consumer_prefetch",
            "Limit of unacknowledged messages for each consumer",
        );
        let channel_prefetch = x.gauge(
            "channel_prefetch",
            "Total limit of unacknowledged messages for all consumers on a channel",
        );
        for c in broker.live_connections.iter() {
            for (number, ch) in c.open_channels() {
                let labels = vec![("channel", format!("<0.{}.{number}>", c.id))];
                let (held, global_prefetch, consumer_count) = ch.stats();
                consumers.get_or_create(&labels).set(consumer_count as i64);
                unacked.get_or_create(&labels).set(held as i64);
                unconfirmed
                    .get_or_create(&labels)
                    .set(ch.publishing().1 as i64);
                consumer_prefetch
                    .get_or_create(&labels)
                    .set(i64::from(ch.modes().prefetch));
                channel_prefetch
                    .get_or_create(&labels)
                    .set(i64::from(global_prefetch));
            }
        }
    }
}

/// The cluster-wide families (`rabbitmq_cluster_` whatever the endpoint;
/// the same on every node: not to be summed over nodes).
fn cluster_wide(broker: &Broker, req: &Request, registry: Registry) -> Registry {
    let mut x = Exposition {
        registry,
        prefix: "rabbitmq_cluster_",
    };
    let has = |f| req.families.contains(&f);
    if has(ObjectFamily::VhostStatus) {
        let status = x.gauge("vhost_status", "Whether a given vhost is running");
        for v in broker.vhost_list() {
            status
                .get_or_create(&vec![("vhost", v.name().to_owned())])
                .set(1);
        }
    }
    let names = has(ObjectFamily::ExchangeNames)
        .then(|| x.gauge("exchange_name", "Enumerates exchanges without any additional info. This value is cluster-wide. A cheaper alternative to `exchange_bindings`"));
    let bindings = has(ObjectFamily::ExchangeBindings).then(|| {
        x.gauge(
            "exchange_bindings",
            "Number of bindings for an exchange. This value is cluster-wide.",
        )
    });
    if names.is_some() || bindings.is_some() {
        for v in broker.vhost_list() {
            let router = v.router.read();
            let mut per_source: HashMap<&str, i64> = HashMap::new();
            let all: Vec<_> = router.bindings().collect();
            for b in &all {
                *per_source.entry(b.source.as_str()).or_default() += 1;
            }
            // As RabbitMQ: neither the default exchange nor internal ones.
            for e in router
                .exchanges()
                .filter(|e| !e.name.is_empty() && !e.internal)
            {
                let labels = vec![
                    ("vhost", v.name().to_owned()),
                    ("exchange", e.name.as_str().to_owned()),
                    ("type", e.kind.as_str().to_owned()),
                ];
                if let Some(n) = &names {
                    n.get_or_create(&labels).set(1);
                }
                if let Some(b) = &bindings {
                    b.get_or_create(&labels)
                        .set(per_source.get(e.name.as_str()).copied().unwrap_or(0));
                }
            }
        }
    }
    x.registry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_names_families_and_vhosts_and_ignores_the_rest() {
        let r = Request::from_query(
            "family=queue_coarse_metrics&family=no_such_family&vhost=%2F&vhost=a+b&per-object=1&family=queue_coarse_metrics",
        );
        assert_eq!(
            r.families.into_iter().collect::<Vec<_>>(),
            vec![ObjectFamily::QueueCoarse]
        );
        assert_eq!(r.vhosts, Some(vec!["/".to_owned(), "a b".to_owned()]));
        let none = Request::from_query("");
        assert!(none.families.is_empty() && none.vhosts.is_none());
    }

    #[test]
    fn every_family_name_parses_to_a_distinct_family() {
        let parsed: BTreeSet<_> = ObjectFamily::NAMES
            .iter()
            .filter_map(|(n, _)| ObjectFamily::parse(n))
            .collect();
        assert_eq!(parsed.len(), ObjectFamily::NAMES.len());
    }
}
