//! [`Config`]: the broker's settings, as the binary assembles them from its
//! flags, environment and config file (`main.rs`) and the integration tests
//! from their defaults. Lower layers (the node, vhosts, queues, channels)
//! read them through the `Node`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The node name reported in the management API and trace headers (one
/// node until Warren clusters; then it becomes the `--node-name` setting).
pub const NODE_NAME: &str = "warren@localhost";

/// Broker settings.
/// The largest `max_message_size` allowed: RabbitMQ's (512 MiB). The
/// cluster's link frames and Raft log records are sized to carry a message
/// this large.
pub const MAX_MESSAGE_SIZE_LIMIT: u64 = 512 << 20;

#[derive(Debug, Clone)]
pub struct Config {
    /// Where sled keeps its files.
    pub data_dir: PathBuf,
    /// AMQP listener address. The IPv6 wildcard `[::]` (the default, as
    /// RabbitMQ's) listens on IPv4 too, dual-stack.
    pub bind: SocketAddr,
    /// Largest message body accepted.
    pub max_message_size: u64,
    /// `frame_max` offered in `connection.tune`.
    pub frame_max: u32,
    /// `channel_max` offered in `connection.tune`.
    pub channel_max: u16,
    /// Heartbeat offered in `connection.tune`, seconds.
    pub heartbeat: u16,
    /// Time allowed for the handshake.
    pub handshake_timeout: Duration,
    /// Default user created in an empty data directory.
    pub default_user: String,
    /// Its password.
    pub default_pass: String,
    /// Users who may log in only from loopback (RabbitMQ's `loopback_users`;
    /// `guest` by default).
    pub loopback_users: Vec<String>,
    /// How long a delivery may stay unacknowledged before the consumer is
    /// considered stuck (RabbitMQ's `consumer_timeout`; queues can set
    /// `x-consumer-timeout`).
    pub consumer_timeout: Duration,
    /// On a consumer timeout, cancel only that consumer and requeue its
    /// messages, instead of closing the whole channel as RabbitMQ does.
    pub consumer_timeout_cancels_consumer: bool,
    /// Most client connections at once (0 = no limit).
    pub max_connections: usize,
    /// Most consumers on one channel (0 = no limit).
    pub max_consumers_per_channel: usize,
    /// Memory (by the broker's accounting) above which publishers are blocked.
    pub memory_high_watermark: u64,
    /// Free disk space below which publishers are blocked.
    pub disk_free_limit: u64,
    /// The memory a fractional watermark is a fraction of, if set (RabbitMQ's
    /// `total_memory_available_override_value`); else the machine's RAM or
    /// the container's limit ([`crate::alarm::total_memory`]).
    pub total_memory_available: Option<u64>,
    /// Body octets of ready messages each queue keeps in memory before paging
    /// the rest out to the store.
    pub queue_memory_budget: u64,
    /// Memory one queue may hold (by the alarm's accounting) before the
    /// connections publishing to it stop being read, until it drains to half;
    /// 0 = no per-queue limit (the default, as RabbitMQ: only the memory alarm).
    pub queue_flow_limit: u64,
    /// Message octets submitted to the store but not yet written, above which
    /// connections whose publishes were written stop being read.
    pub store_backlog_limit: u64,
    /// Whether the plain AMQP listener (`bind`) runs.
    pub plain_listener: bool,
    /// The management HTTP API's address (none: not served).
    pub management: Option<SocketAddr>,
    /// The Prometheus endpoint's address (none: not served).
    pub prometheus: Option<SocketAddr>,
    /// A definitions file (RabbitMQ's JSON format) imported at boot.
    pub load_definitions: Option<PathBuf>,
    /// The AMQPS listener address and its TLS settings (none: no TLS).
    pub tls: Option<(SocketAddr, crate::tls::TlsSettings)>,
    /// Added to every metadata commit after it is durable: shows how the
    /// broker behaves when a commit takes a network round trip, as it will
    /// under a replicated log (tests and benchmarks). Zero by default; not
    /// a command-line setting.
    pub metadata_commit_delay: Duration,
    /// This node's name (`--node-name`): the home recorded for the queues
    /// it declares in a cluster.
    pub node_name: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("data"),
            bind: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 5672)),
            max_message_size: 128 << 20,
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat: 60,
            handshake_timeout: Duration::from_secs(10),
            default_user: "guest".into(),
            default_pass: "guest".into(),
            loopback_users: vec!["guest".to_owned()],
            consumer_timeout: Duration::from_secs(30 * 60),
            consumer_timeout_cancels_consumer: false,
            max_connections: 0,
            max_consumers_per_channel: 0,
            memory_high_watermark: default_watermark(),
            total_memory_available: None,
            queue_flow_limit: 0,
            store_backlog_limit: queue_store::DEFAULT_BACKLOG_LIMIT,
            disk_free_limit: 50 * 1000 * 1000,
            queue_memory_budget: queue_store::queue::DEFAULT_MEMORY_BUDGET,
            plain_listener: true,
            management: Some(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 15672))),
            load_definitions: None,
            prometheus: Some(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 15692))),
            tls: None,
            metadata_commit_delay: Duration::ZERO,
            node_name: NODE_NAME.to_owned(),
        }
    }
}

/// 0.4 of RAM, as RabbitMQ.
fn default_watermark() -> u64 {
    crate::alarm::total_memory().map_or(1 << 30, |m| m / 10 * 4)
}
