//! `warren`: the broker binary. `cargo run --release` starts it on
//! [::]:5672 (IPv6 and IPv4) with its data in `./data`. With `--peer` or
//! `--peer-dns` it is a cluster node (the `cluster` crate): its metadata is
//! committed through the cluster's Raft group.
//!
//! Every setting comes, in order of precedence, from a command-line flag, its
//! environment variable (`WARREN_*`), the TOML config file (`--config`), or
//! the built-in default.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;

#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use serde::Deserialize;
use server::alarm::{Amount, parse_amount};

#[cfg(test)]
mod configuration_reference;
mod rabbitmq_conf;

/// Warren, an AMQP 0-9-1 message broker.
#[derive(Debug, Clone, Parser)]
#[command(name = "warren", version)]
struct Args {
    /// Config file with any of the settings below (flags and env win): TOML,
    /// or RabbitMQ's `rabbitmq.conf` format if its name ends in `.conf`.
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "General",
        env = "WARREN_CONFIG"
    )]
    config: Option<PathBuf>,
    /// Data directory (sled database and message log) [default: data].
    #[arg(
        long,
        value_name = "DIR",
        help_heading = "General",
        env = "WARREN_DATA_DIR"
    )]
    data_dir: Option<PathBuf>,
    /// Definitions file (RabbitMQ's JSON format) to import at boot.
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "General",
        env = "WARREN_LOAD_DEFINITIONS"
    )]
    load_definitions: Option<PathBuf>,
    /// Log level: error, warn, info, debug, trace or off (WARREN_LOG, a
    /// tracing filter, wins) [default: info].
    #[arg(
        long,
        value_name = "LEVEL",
        help_heading = "General",
        env = "WARREN_LOG_LEVEL"
    )]
    log_level: Option<String>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, help_heading = "General", env = "WARREN_LOG_JSON", value_parser = clap::builder::BoolishValueParser::new())]
    log_json: bool,
    /// Repair a damaged data directory instead of starting: damaged parts
    /// are moved to `<data dir>/quarantine/` and the messages they cost are
    /// listed. Run it with the broker stopped, then start as usual.
    #[arg(long, help_heading = "General")]
    repair_store: bool,
    /// Address to listen on for AMQP, AMQPS, management, Prometheus and, in
    /// a cluster, the inter-node port (management and Prometheus have their
    /// own settings too) [default: `::`, IPv6 and IPv4 (dual-stack)].
    #[arg(
        long,
        value_name = "ADDRESS",
        help_heading = "AMQP listeners",
        env = "WARREN_BIND"
    )]
    bind: Option<IpAddr>,
    /// AMQP port [default: 5672].
    #[arg(
        long,
        value_name = "PORT",
        help_heading = "AMQP listeners",
        env = "WARREN_PORT"
    )]
    port: Option<u16>,
    /// Do not run the plain (non-TLS) AMQP listener.
    #[arg(long, help_heading = "AMQP listeners", env = "WARREN_NO_PLAIN_LISTENER", value_parser = clap::builder::BoolishValueParser::new())]
    no_plain_listener: bool,
    /// AMQPS port; the TLS listener runs when a certificate and key are given [default: 5671].
    #[arg(
        long,
        value_name = "PORT",
        help_heading = "AMQP listeners",
        env = "WARREN_TLS_PORT"
    )]
    tls_port: Option<u16>,
    /// Server certificate chain (PEM) for AMQPS.
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "AMQP listeners",
        env = "WARREN_TLS_CERT"
    )]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM) for AMQPS.
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "AMQP listeners",
        env = "WARREN_TLS_KEY"
    )]
    tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates are verified against.
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "AMQP listeners",
        env = "WARREN_TLS_CA"
    )]
    tls_ca: Option<PathBuf>,
    /// Verify client certificates (enables SASL EXTERNAL).
    #[arg(long, help_heading = "AMQP listeners", env = "WARREN_TLS_VERIFY_PEER", value_parser = clap::builder::BoolishValueParser::new())]
    tls_verify_peer: bool,
    /// Refuse TLS clients without a certificate.
    #[arg(long, help_heading = "AMQP listeners", env = "WARREN_TLS_FAIL_IF_NO_PEER_CERT", value_parser = clap::builder::BoolishValueParser::new())]
    tls_fail_if_no_peer_cert: bool,
    /// Heartbeat interval offered to clients, in seconds; 0 disables [default: 60].
    #[arg(
        value_name = "SECONDS",
        help_heading = "Connections, channels and messages",
        long,
        env = "WARREN_HEARTBEAT"
    )]
    heartbeat: Option<u16>,
    /// Largest channel number a client may open [default: 2047].
    #[arg(
        value_name = "NUMBER",
        help_heading = "Connections, channels and messages",
        long,
        env = "WARREN_CHANNEL_MAX"
    )]
    channel_max: Option<u16>,
    /// Largest frame the broker accepts and offers, octets [default: 131072].
    #[arg(
        value_name = "OCTETS",
        help_heading = "Connections, channels and messages",
        long,
        env = "WARREN_FRAME_MAX"
    )]
    frame_max: Option<u32>,
    /// Largest message body accepted, in octets, at most 536870912 (512 MiB, as RabbitMQ) [default: 134217728].
    #[arg(
        value_name = "OCTETS",
        help_heading = "Connections, channels and messages",
        long,
        env = "WARREN_MAX_MESSAGE_SIZE"
    )]
    max_message_size: Option<u64>,
    /// Most client connections at once; 0 = no limit [default: 0].
    #[arg(
        value_name = "NUMBER",
        help_heading = "Connections, channels and messages",
        long,
        env = "WARREN_MAX_CONNECTIONS"
    )]
    max_connections: Option<usize>,
    /// Most consumers per channel; 0 = no limit [default: 0].
    #[arg(
        value_name = "NUMBER",
        help_heading = "Connections, channels and messages",
        long,
        env = "WARREN_MAX_CONSUMERS_PER_CHANNEL"
    )]
    max_consumers_per_channel: Option<usize>,
    /// Consumer (delivery acknowledgement) timeout in ms [default: 1800000].
    #[arg(
        value_name = "MILLISECONDS",
        help_heading = "Connections, channels and messages",
        long,
        env = "WARREN_CONSUMER_TIMEOUT"
    )]
    consumer_timeout: Option<u64>,
    /// On a consumer timeout, cancel only that consumer (and requeue its
    /// messages) instead of closing the channel.
    #[arg(long, help_heading = "Connections, channels and messages", env = "WARREN_CONSUMER_TIMEOUT_CANCELS_CONSUMER", value_parser = clap::builder::BoolishValueParser::new())]
    consumer_timeout_cancels_consumer: bool,
    /// Default user, created on first boot [default: guest].
    #[arg(
        long,
        value_name = "USER",
        help_heading = "Users",
        env = "WARREN_DEFAULT_USER"
    )]
    default_user: Option<String>,
    /// Default user's password [default: guest].
    #[arg(
        long,
        value_name = "PASSWORD",
        help_heading = "Users",
        env = "WARREN_DEFAULT_PASS"
    )]
    default_pass: Option<String>,
    /// Users who may log in from loopback only (RabbitMQ's `loopback_users`;
    /// `none` lets guest in from anywhere) [default: guest].
    #[arg(
        value_name = "USERS",
        help_heading = "Users",
        long,
        env = "WARREN_LOOPBACK_USERS",
        value_delimiter = ','
    )]
    loopback_users: Option<Vec<String>>,
    /// Memory high watermark: a fraction of RAM (`0.4`) or an amount
    /// (`2GB`, `512MiB`, `1073741824`), as RabbitMQ's
    /// `vm_memory_high_watermark` [default: 0.4].
    #[arg(long, value_name = "AMOUNT", help_heading = "Alarms and flow control", env = "WARREN_MEMORY_HIGH_WATERMARK", value_parser = parse_amount)]
    memory_high_watermark: Option<Amount>,
    /// Free disk space limit: an amount (`50MB`, `1GiB`, octets) or a
    /// multiple of RAM (`1.5`), as RabbitMQ's `disk_free_limit`
    /// [default: 50MB].
    #[arg(long, value_name = "AMOUNT", help_heading = "Alarms and flow control", env = "WARREN_DISK_FREE_LIMIT", value_parser = parse_amount)]
    disk_free_limit: Option<Amount>,
    /// The memory a fractional watermark (and disk limit) is a fraction of:
    /// an amount (`4GB`, `512MiB`, octets), as RabbitMQ's
    /// `total_memory_available_override_value` [default: the machine's RAM,
    /// or its control group's memory limit (a container's) if lower].
    #[arg(long, value_name = "AMOUNT", help_heading = "Alarms and flow control", env = "WARREN_TOTAL_MEMORY_AVAILABLE", value_parser = parse_amount)]
    total_memory_available: Option<Amount>,
    /// Memory one queue may hold (by the broker's accounting) before its
    /// publishers are paused, in octets; 0 = no per-queue limit [default: 0].
    /// Set it below the watermark to keep one queue's flood from blocking
    /// every publisher.
    #[arg(
        value_name = "OCTETS",
        help_heading = "Alarms and flow control",
        long,
        env = "WARREN_QUEUE_FLOW_LIMIT"
    )]
    queue_flow_limit: Option<u64>,
    /// Message octets waiting for the store's writer before publishers that
    /// write to disk are paused [default: 67108864].
    #[arg(
        value_name = "OCTETS",
        help_heading = "Alarms and flow control",
        long,
        env = "WARREN_STORE_BACKLOG_LIMIT"
    )]
    store_backlog_limit: Option<u64>,
    /// Management HTTP API port (0: any free port) [default: 15672].
    #[arg(
        value_name = "PORT",
        help_heading = "Management API and Prometheus",
        long,
        env = "WARREN_MANAGEMENT_PORT"
    )]
    management_port: Option<u16>,
    /// Address the management HTTP API listens on [default: as --bind].
    #[arg(
        value_name = "ADDRESS",
        help_heading = "Management API and Prometheus",
        long,
        env = "WARREN_MANAGEMENT_BIND"
    )]
    management_bind: Option<IpAddr>,
    /// Do not serve the management HTTP API.
    #[arg(long, help_heading = "Management API and Prometheus", env = "WARREN_NO_MANAGEMENT", value_parser = clap::builder::BoolishValueParser::new())]
    no_management: bool,
    /// Prometheus metrics port (0: any free port) [default: 15692].
    #[arg(
        value_name = "PORT",
        help_heading = "Management API and Prometheus",
        long,
        env = "WARREN_PROMETHEUS_PORT"
    )]
    prometheus_port: Option<u16>,
    /// Address Prometheus metrics are served on [default: as --bind].
    #[arg(
        value_name = "ADDRESS",
        help_heading = "Management API and Prometheus",
        long,
        env = "WARREN_PROMETHEUS_BIND"
    )]
    prometheus_bind: Option<IpAddr>,
    /// Do not serve Prometheus metrics.
    #[arg(long, help_heading = "Management API and Prometheus", env = "WARREN_NO_PROMETHEUS", value_parser = clap::builder::BoolishValueParser::new())]
    no_prometheus: bool,
    /// This node's name, `name@host`; `host` is where other nodes reach it
    /// (stored in the data directory on first start) [default: warren@<hostname>].
    #[arg(
        long,
        value_name = "NAME",
        help_heading = "Cluster",
        env = "WARREN_NODE_NAME"
    )]
    node_name: Option<String>,
    /// The cluster's name [default: warren].
    #[arg(
        long,
        value_name = "NAME",
        help_heading = "Cluster",
        env = "WARREN_CLUSTER_NAME"
    )]
    cluster_name: Option<String>,
    /// Inter-node port (RabbitMQ's 25672) [default: 25672].
    #[arg(
        long,
        value_name = "PORT",
        help_heading = "Cluster",
        env = "WARREN_CLUSTER_PORT"
    )]
    cluster_port: Option<u16>,
    /// A seed node's cluster address, `host:port` (repeatable; RabbitMQ's
    /// `classic_config`). With any seed, the node runs as a cluster node.
    #[arg(
        value_name = "HOST:PORT",
        help_heading = "Cluster",
        long = "peer",
        env = "WARREN_PEERS",
        value_delimiter = ','
    )]
    peers: Vec<String>,
    /// A DNS name whose every A/AAAA record is a seed node (repeatable:
    /// docker-compose services, Kubernetes headless services).
    #[arg(
        value_name = "NAME",
        help_heading = "Cluster",
        long = "peer-dns",
        env = "WARREN_PEER_DNS",
        value_delimiter = ','
    )]
    peer_dns: Vec<String>,
    /// File holding the secret every node of the cluster shares (like
    /// RabbitMQ's Erlang cookie); required for a cluster node.
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "Cluster",
        env = "WARREN_CLUSTER_SECRET_FILE"
    )]
    cluster_secret_file: Option<PathBuf>,
    /// This node's certificate chain (PEM) for TLS between nodes; with
    /// --cluster-tls-key and --cluster-tls-ca every link is mutual TLS
    /// (RabbitMQ's inter-node TLS). Every node of the cluster must use it.
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "Cluster",
        env = "WARREN_CLUSTER_TLS_CERT"
    )]
    cluster_tls_cert: Option<PathBuf>,
    /// This node's private key (PEM) for TLS between nodes.
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "Cluster",
        env = "WARREN_CLUSTER_TLS_KEY"
    )]
    cluster_tls_key: Option<PathBuf>,
    /// The CA certificates (PEM) that sign every node's certificate.
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "Cluster",
        env = "WARREN_CLUSTER_TLS_CA"
    )]
    cluster_tls_ca: Option<PathBuf>,
}

/// The config file: the same settings as the flags, all optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    bind: Option<IpAddr>,
    port: Option<u16>,
    max_message_size: Option<u64>,
    heartbeat: Option<u16>,
    default_user: Option<String>,
    default_pass: Option<String>,
    consumer_timeout: Option<u64>,
    consumer_timeout_cancels_consumer: Option<bool>,
    memory_high_watermark: Option<FileAmount>,
    disk_free_limit: Option<FileAmount>,
    total_memory_available: Option<FileAmount>,
    queue_flow_limit: Option<u64>,
    store_backlog_limit: Option<u64>,
    max_connections: Option<usize>,
    max_consumers_per_channel: Option<usize>,
    tls_port: Option<u16>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_verify_peer: Option<bool>,
    tls_fail_if_no_peer_cert: Option<bool>,
    no_plain_listener: Option<bool>,
    management_port: Option<u16>,
    management_bind: Option<IpAddr>,
    no_management: Option<bool>,
    load_definitions: Option<PathBuf>,
    prometheus_port: Option<u16>,
    prometheus_bind: Option<IpAddr>,
    no_prometheus: Option<bool>,
    loopback_users: Option<Vec<String>>,
    channel_max: Option<u16>,
    frame_max: Option<u32>,
    log_level: Option<String>,
    log_json: Option<bool>,
    node_name: Option<String>,
    cluster_name: Option<String>,
    cluster_port: Option<u16>,
    peers: Option<Vec<String>>,
    peer_dns: Option<Vec<String>>,
    cluster_secret_file: Option<PathBuf>,
    cluster_tls_cert: Option<PathBuf>,
    cluster_tls_key: Option<PathBuf>,
    cluster_tls_ca: Option<PathBuf>,
}

/// An amount in the config file: a number (octets, or with a decimal point
/// a multiple of RAM) or a string in [`parse_amount`]'s forms.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(untagged)]
enum FileAmount {
    Octets(u64),
    OfRam(f64),
    Text(String),
}

impl FileAmount {
    fn amount(&self) -> Result<Amount, String> {
        match self {
            FileAmount::Octets(n) => Ok(Amount::Octets(*n)),
            FileAmount::OfRam(f) => Ok(Amount::OfRam(*f)),
            FileAmount::Text(t) => parse_amount(t),
        }
    }
}

fn load_file(path: &Option<PathBuf>) -> Result<FileConfig, String> {
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if path.extension().is_some_and(|e| e == "conf") {
        return rabbitmq_conf::parse(&text).map_err(|e| format!("{}: {e}", path.display()));
    }
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The cluster side's settings, if this is a cluster node (it has seeds,
/// configured or recorded by `join_cluster`), and the node's way to join a
/// cluster (which needs the secret).
fn cluster_settings(
    args: &Args,
    file: &FileConfig,
    config: &server::Config,
) -> Result<(Option<cluster::ClusterSettings>, cluster::Joiner), String> {
    let peers = if args.peers.is_empty() {
        file.peers.clone().unwrap_or_default()
    } else {
        args.peers.clone()
    };
    let peer_dns = if args.peer_dns.is_empty() {
        file.peer_dns.clone().unwrap_or_default()
    } else {
        args.peer_dns.clone()
    };
    let joined = cluster::joining::stored_seeds(&config.data_dir)?.is_some();
    let clustered = !peers.is_empty() || !peer_dns.is_empty() || joined;
    let secret = match args
        .cluster_secret_file
        .clone()
        .or(file.cluster_secret_file.clone())
    {
        Some(path) => Some(read_secret(&path)?),
        None if clustered => {
            return Err(
                "a cluster node needs --cluster-secret-file (the secret every node shares)".into(),
            );
        }
        None => None,
    };
    let node_name = args
        .node_name
        .clone()
        .or(file.node_name.clone())
        .unwrap_or_else(default_node_name);
    let host = node_name
        .split_once('@')
        .map(|(_, h)| h.to_owned())
        .unwrap_or_default();
    let port = args
        .cluster_port
        .or(file.cluster_port)
        .unwrap_or(cluster::DEFAULT_CLUSTER_PORT);
    let cluster_name = args
        .cluster_name
        .clone()
        .or(file.cluster_name.clone())
        .unwrap_or_else(|| "warren".into());
    let tls = {
        let cert = args
            .cluster_tls_cert
            .clone()
            .or(file.cluster_tls_cert.clone());
        let key = args
            .cluster_tls_key
            .clone()
            .or(file.cluster_tls_key.clone());
        let ca = args.cluster_tls_ca.clone().or(file.cluster_tls_ca.clone());
        match (cert, key, ca) {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(ca)) => Some(
                cluster::link::LinkTls::new(&cert, &key, &ca)
                    .map_err(|e| format!("cluster TLS: {e}"))?,
            ),
            _ => {
                return Err(
                    "cluster TLS needs all of --cluster-tls-cert, --cluster-tls-key and --cluster-tls-ca"
                        .into(),
                );
            }
        }
    };
    let joiner = cluster::Joiner::new(
        config.data_dir.clone(),
        node_name.clone(),
        cluster_name.clone(),
        secret.clone(),
        cluster::DEFAULT_CLUSTER_PORT,
    )
    .with_tls(tls.clone());
    let Some(secret) = secret.filter(|_| clustered) else {
        return Ok((None, joiner));
    };
    Ok((
        Some(cluster::ClusterSettings {
            node_name,
            cluster_name,
            bind: SocketAddr::new(config.bind.ip(), port),
            advertise: None,
            peers,
            peer_dns,
            secret,
            data_dir: config.data_dir.clone(),
            amqp_addr: format!("{host}:{}", config.bind.port()),
            default_user: (config.default_user.clone(), config.default_pass.clone()),
            tls,
        }),
        joiner,
    ))
}

/// The cluster secret in `path` (surrounding whitespace trimmed).
fn read_secret(path: &std::path::Path) -> Result<std::sync::Arc<[u8]>, String> {
    let secret =
        std::fs::read(path).map_err(|e| format!("cluster secret file {}: {e}", path.display()))?;
    let secret: Vec<u8> = secret.trim_ascii().to_vec();
    if secret.len() < 16 {
        return Err(format!(
            "cluster secret file {}: the secret must be at least 16 octets",
            path.display()
        ));
    }
    Ok(secret.into())
}

/// `warren@<hostname>`, as RabbitMQ's `rabbit@<hostname>`.
fn default_node_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    format!("warren@{host}")
}

fn config(args: Args, file: FileConfig) -> Result<server::Config, String> {
    let d = server::Config::default();
    let from_file = |a: &Option<FileAmount>, key: &str| {
        a.as_ref()
            .map(|a| a.amount().map_err(|e| format!("{key}: {e}")))
            .transpose()
    };
    let total_memory_available = match args.total_memory_available.or(from_file(
        &file.total_memory_available,
        "total_memory_available",
    )?) {
        None => None,
        Some(Amount::Octets(n)) if n > 0 => Some(n),
        Some(_) => {
            return Err(
                "total_memory_available: give an amount of memory (4GB, 512MiB, octets)".into(),
            );
        }
    };
    // (The default watermark, 0.4, is of that memory too.)
    let memory_high_watermark = args
        .memory_high_watermark
        .or(from_file(
            &file.memory_high_watermark,
            "memory_high_watermark",
        )?)
        .map_or(
            match total_memory_available {
                Some(_) => Amount::OfRam(0.4).octets_of(total_memory_available),
                None => d.memory_high_watermark,
            },
            |a| a.octets_of(total_memory_available),
        );
    let disk_free_limit = args
        .disk_free_limit
        .or(from_file(&file.disk_free_limit, "disk_free_limit")?)
        .map_or(d.disk_free_limit, |a| a.octets_of(total_memory_available));
    let max_message_size = args
        .max_message_size
        .or(file.max_message_size)
        .unwrap_or(d.max_message_size);
    // RabbitMQ's limit and text (its schema's max_message_size validator);
    // the cluster's link and Raft log are sized for it.
    if max_message_size == 0 || max_message_size > server::config::MAX_MESSAGE_SIZE_LIMIT {
        return Err(format!(
            "max_message_size: Max message size should be between 0 and 512MB (got {max_message_size})"
        ));
    }
    let bind_ip = args.bind.or(file.bind).unwrap_or(d.bind.ip());
    let tls_port = args.tls_port.or(file.tls_port);
    let tls_ca = args.tls_ca.or(file.tls_ca);
    let verify_peer = args.tls_verify_peer || file.tls_verify_peer.unwrap_or(false);
    let fail_if_no_peer_cert =
        args.tls_fail_if_no_peer_cert || file.tls_fail_if_no_peer_cert.unwrap_or(false);
    // A TLS setting that cannot take effect is an error, not a listener
    // that silently is not there or a client check that silently is not made.
    let tls = match (
        args.tls_cert.or(file.tls_cert),
        args.tls_key.or(file.tls_key),
    ) {
        (Some(cert), Some(key)) => {
            if (verify_peer || fail_if_no_peer_cert) && tls_ca.is_none() {
                return Err(
                    "tls_verify_peer and tls_fail_if_no_peer_cert need tls_ca (the CA that client certificates are verified against)"
                        .into(),
                );
            }
            Some((
                SocketAddr::new(bind_ip, tls_port.unwrap_or(5671)),
                server::tls::TlsSettings {
                    cert,
                    key,
                    ca: tls_ca,
                    verify_peer,
                    fail_if_no_peer_cert,
                },
            ))
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err("AMQPS needs both tls_cert and tls_key".into());
        }
        (None, None) => {
            if tls_port.is_some() || tls_ca.is_some() || verify_peer || fail_if_no_peer_cert {
                return Err(
                    "TLS settings given without tls_cert and tls_key: the AMQPS listener needs both"
                        .into(),
                );
            }
            None
        }
    };
    Ok(server::Config {
        tls,
        plain_listener: !(args.no_plain_listener || file.no_plain_listener.unwrap_or(false)),
        load_definitions: args.load_definitions.or(file.load_definitions),
        prometheus: (!(args.no_prometheus || file.no_prometheus.unwrap_or(false))).then(|| {
            let port = args
                .prometheus_port
                .or(file.prometheus_port)
                .unwrap_or(d.prometheus.map_or(15692, |a| a.port()));
            SocketAddr::new(
                args.prometheus_bind
                    .or(file.prometheus_bind)
                    .unwrap_or(bind_ip),
                port,
            )
        }),
        management: (!(args.no_management || file.no_management.unwrap_or(false))).then(|| {
            let port = args
                .management_port
                .or(file.management_port)
                .unwrap_or(d.management.map_or(15672, |a| a.port()));
            SocketAddr::new(
                args.management_bind
                    .or(file.management_bind)
                    .unwrap_or(bind_ip),
                port,
            )
        }),
        data_dir: args.data_dir.or(file.data_dir).unwrap_or(d.data_dir),
        bind: SocketAddr::new(bind_ip, args.port.or(file.port).unwrap_or(d.bind.port())),
        max_message_size,
        heartbeat: args.heartbeat.or(file.heartbeat).unwrap_or(d.heartbeat),
        channel_max: args
            .channel_max
            .or(file.channel_max)
            .unwrap_or(d.channel_max),
        frame_max: args.frame_max.or(file.frame_max).unwrap_or(d.frame_max),
        // `none` (RabbitMQ's word for no one) is no user name.
        loopback_users: args
            .loopback_users
            .or(file.loopback_users)
            .map_or(d.loopback_users, |users| {
                users.into_iter().filter(|u| u != "none").collect()
            }),
        default_user: args
            .default_user
            .or(file.default_user)
            .unwrap_or(d.default_user),
        default_pass: args
            .default_pass
            .or(file.default_pass)
            .unwrap_or(d.default_pass),
        consumer_timeout: args
            .consumer_timeout
            .or(file.consumer_timeout)
            .map_or(d.consumer_timeout, std::time::Duration::from_millis),
        consumer_timeout_cancels_consumer: args.consumer_timeout_cancels_consumer
            || file.consumer_timeout_cancels_consumer.unwrap_or(false),
        memory_high_watermark,
        queue_flow_limit: args
            .queue_flow_limit
            .or(file.queue_flow_limit)
            .unwrap_or(d.queue_flow_limit),
        store_backlog_limit: args
            .store_backlog_limit
            .or(file.store_backlog_limit)
            .unwrap_or(d.store_backlog_limit),
        disk_free_limit,
        total_memory_available,
        max_connections: args
            .max_connections
            .or(file.max_connections)
            .unwrap_or(d.max_connections),
        max_consumers_per_channel: args
            .max_consumers_per_channel
            .or(file.max_consumers_per_channel)
            .unwrap_or(d.max_consumers_per_channel),
        ..d
    })
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let file = match load_file(&args.config) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cannot read config file {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let log_level = args
        .log_level
        .clone()
        .or(file.log_level.clone())
        .unwrap_or_else(|| "info".to_owned());
    if !["error", "warn", "info", "debug", "trace", "off"].contains(&log_level.as_str()) {
        eprintln!(
            "invalid setting: log level '{log_level}' (error, warn, info, debug, trace or off)"
        );
        return std::process::ExitCode::FAILURE;
    }
    server::logging::init(args.log_json || file.log_json == Some(true), &log_level);
    // jemalloc purges freed memory from a thread of its own (after its
    // default 10 s decay), so memory comes back after a burst even when the
    // broker goes quiet.
    #[cfg(feature = "jemalloc")]
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "cannot start jemalloc's background purging thread");
    }
    let repair = args.repair_store;
    let mut config = match config(args.clone(), file.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("invalid setting: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let (cluster, joiner) = match cluster_settings(&args, &file, &config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("invalid setting: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // A node alone is `warren@<hostname>` too, as RabbitMQ's `rabbit@<hostname>`.
    config.node_name = match &cluster {
        Some(c) => c.node_name.clone(),
        None => args
            .node_name
            .clone()
            .or(file.node_name.clone())
            .unwrap_or_else(default_node_name),
    };
    if repair {
        return match server::repair::repair_store(&config.data_dir) {
            Ok(lines) => {
                for l in lines {
                    println!("{l}");
                }
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cannot repair {}: {e}", config.data_dir.display());
                std::process::ExitCode::FAILURE
            }
        };
    }
    let data_dir = config.data_dir.clone();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let cluster = match cluster {
            None => None,
            Some(settings) => match cluster::start(settings).await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the cluster node");
                    return std::process::ExitCode::FAILURE;
                }
            },
        };
        let parts = cluster.as_ref().map(cluster::ClusterHandle::parts);
        let handle = match server::start_with(config, parts).await {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                if matches!(e, server::StartError::Store(queue_store::StoreError::Damaged(_))) {
                    tracing::error!(
                        "nothing was changed. To move the damaged parts to {}/quarantine and keep what is intact, run with the broker stopped: warren --repair-store --data-dir {}",
                        data_dir.display(),
                        data_dir.display()
                    );
                }
                return std::process::ExitCode::FAILURE;
            }
        };
        if let Some(c) = &cluster {
            c.serve(&handle.broker);
            joiner.attach(&c.node);
        }
        let _ = handle.broker.cluster_join.set(std::sync::Arc::new(joiner));
        let restart = tokio::select! {
            _ = wait_for_signal() => false,
            _ = handle.broker.restart_requested() => true,
        };
        tracing::info!(restart, "shutting down");
        let closed = handle.shutdown().await;
        if let Some(c) = cluster {
            c.shutdown().await;
        }
        match closed {
            Ok(()) if restart => {
                // join_cluster: the same program again, which carries out the
                // recorded join as it starts.
                let e = cluster::joining::restart_process();
                tracing::error!(error = %e, "cannot restart to join the cluster; start the node again");
                std::process::ExitCode::FAILURE
            }
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "store did not close cleanly");
                std::process::ExitCode::FAILURE
            }
        }
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let args = Args::parse_from(["warren", "--port", "5999"]);
        let file: FileConfig =
            toml::from_str("port = 1234\ndata_dir = \"/var/lib/warren\"\nheartbeat = 30").unwrap();
        let c = config(args, file).unwrap();
        assert_eq!(c.bind.port(), 5999);
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/warren"));
        assert_eq!(c.heartbeat, 30);
        assert_eq!(c.max_message_size, 128 << 20);
        assert!(
            toml::from_str::<FileConfig>("bogus = 1").is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn tls_settings_that_cannot_take_effect_are_refused() {
        let refused = |argv: &[&str]| {
            let mut all = vec!["warren"];
            all.extend_from_slice(argv);
            config(Args::parse_from(all), FileConfig::default()).unwrap_err()
        };
        assert!(refused(&["--tls-cert", "c.pem"]).contains("both tls_cert and tls_key"));
        assert!(refused(&["--tls-key", "k.pem"]).contains("both tls_cert and tls_key"));
        let e = refused(&[
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-verify-peer",
        ]);
        assert!(e.contains("need tls_ca"), "{e}");
        assert!(refused(&["--tls-port", "5671"]).contains("without tls_cert and tls_key"));
        let ok = Args::parse_from([
            "warren",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-ca",
            "ca.pem",
            "--tls-fail-if-no-peer-cert",
        ]);
        let c = config(ok, FileConfig::default()).unwrap();
        let (addr, tls) = c.tls.unwrap();
        assert_eq!(addr.port(), 5671);
        assert!(tls.fail_if_no_peer_cert && !tls.verify_peer);
    }

    #[test]
    fn a_max_message_size_outside_rabbitmqs_range_is_refused() {
        let with = |n: &str| {
            config(
                Args::parse_from(["warren", "--max-message-size", n]),
                FileConfig::default(),
            )
        };
        assert_eq!(with("536870912").unwrap().max_message_size, 512 << 20);
        for bad in ["536870913", "0"] {
            let e = with(bad).unwrap_err();
            assert_eq!(
                e,
                format!(
                    "max_message_size: Max message size should be between 0 and 512MB (got {bad})"
                )
            );
        }
        let file: FileConfig = toml::from_str("max_message_size = 1073741824").unwrap();
        assert!(config(Args::parse_from(["warren"]), file).is_err());
    }

    #[test]
    fn amounts_from_flags_and_file() {
        let args = Args::parse_from(["warren", "--memory-high-watermark", "512MiB"]);
        let c = config(args, FileConfig::default()).unwrap();
        assert_eq!(c.memory_high_watermark, 512 << 20);
        let file: FileConfig =
            toml::from_str("memory_high_watermark = \"2GB\"\ndisk_free_limit = 1000").unwrap();
        let c = config(Args::parse_from(["warren"]), file).unwrap();
        assert_eq!(c.memory_high_watermark, 2_000_000_000);
        assert_eq!(c.disk_free_limit, 1000);
        let file: FileConfig = toml::from_str("memory_high_watermark = \"much\"").unwrap();
        assert!(config(Args::parse_from(["warren"]), file).is_err());
    }

    #[test]
    fn fractions_are_of_the_total_memory_available_when_it_is_given() {
        // The default watermark (0.4) and fractions given, of 1 GiB.
        let args = Args::parse_from(["warren", "--total-memory-available", "1GiB"]);
        let c = config(args, FileConfig::default()).unwrap();
        assert_eq!(c.memory_high_watermark, (f64::from(1 << 30) * 0.4) as u64);
        assert_eq!(c.total_memory_available, Some(1 << 30));
        let args = Args::parse_from([
            "warren",
            "--total-memory-available",
            "1GiB",
            "--memory-high-watermark",
            "0.5",
            "--disk-free-limit",
            "2.0",
        ]);
        let c = config(args, FileConfig::default()).unwrap();
        assert_eq!(c.memory_high_watermark, 512 << 20);
        assert_eq!(c.disk_free_limit, 2 << 30);
        // As the RabbitMQ cluster operator writes it.
        let file = rabbitmq_conf::parse("total_memory_available_override_value = 2GB\n").unwrap();
        let c = config(Args::parse_from(["warren"]), file).unwrap();
        assert_eq!(c.memory_high_watermark, 800_000_000);
        // A fraction of itself means nothing.
        let args = Args::parse_from(["warren", "--total-memory-available", "0.5"]);
        assert!(config(args, FileConfig::default()).is_err());
    }
}
