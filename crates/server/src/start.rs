//! [`start`]: opens the data directory, rebuilds the metadata and the
//! queues from it (or creates RabbitMQ's defaults on a first boot), loads a
//! definitions file if asked, and starts the listeners (AMQP, AMQPS, the
//! management API, the Prometheus endpoint) and the resource monitor;
//! [`BrokerHandle`] stops it all. Used by the `warren` binary and by the
//! integration tests (which start brokers in-process on ephemeral ports).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use queue_store::{Store, StoreError};
use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::config::Config;
use crate::meta::MetaError;
use crate::node::Node;

/// A started broker: where it listens and how to stop it.
#[derive(Debug)]
pub struct BrokerHandle {
    /// The broker.
    pub broker: Arc<Broker>,
    /// The bound AMQP address (useful with port 0); unspecified if the plain
    /// listener is disabled.
    pub addr: SocketAddr,
    /// The bound AMQPS address, if TLS is configured.
    pub tls_addr: Option<SocketAddr>,
    /// The bound management API address, if it is served.
    pub management_addr: Option<SocketAddr>,
    /// The bound Prometheus endpoint address, if it is served.
    pub prometheus_addr: Option<SocketAddr>,
    accept: Vec<tokio::task::JoinHandle<()>>,
}

impl BrokerHandle {
    /// Graceful shutdown: stop accepting, close connections with 320, flush
    /// the store, wait for every task.
    pub async fn shutdown(self) -> Result<(), StoreError> {
        self.broker.shutdown.cancel();
        for a in self.accept {
            let _ = a.await;
        }
        self.broker.tracker.close();
        self.broker.tracker.wait().await;
        self.broker.store.close()
    }
}

/// What a cluster node's broker gets from the cluster: the metadata log
/// and the way to queues on other nodes.
#[derive(Debug)]
pub struct ClusterParts {
    /// The cluster's metadata log.
    pub meta: Box<dyn crate::meta::MetaLog>,
    /// Queues on other nodes.
    pub peers: Arc<dyn crate::peers::Peers>,
}

/// Errors starting the broker.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory could not be opened.
    #[error("cannot open data directory: {0}")]
    Store(#[from] StoreError),
    /// The first boot's defaults could not be committed.
    #[error("cannot create the defaults: {0}")]
    Defaults(#[from] MetaError),
    /// The TLS settings are unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The definitions file given to load at boot could not be applied.
    #[error("cannot load definitions: {0}")]
    Definitions(String),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// Opens the store, recovers definitions and messages, and starts accepting
/// AMQP connections.
pub async fn start(config: Config) -> Result<BrokerHandle, StartError> {
    start_with(config, None).await
}

/// [`start`] with the metadata committed through `meta` (a cluster's log)
/// instead of the node's local log: the metadata comes from that log's
/// state, not from the store's definitions, and a first boot creates no
/// defaults here (the cluster creates them once, when it forms).
pub async fn start_with(
    config: Config,
    cluster: Option<ClusterParts>,
) -> Result<BrokerHandle, StartError> {
    let (meta, peers) = match cluster {
        Some(c) => (Some(c.meta), Some(c.peers)),
        None => (None, None),
    };
    let dir = config.data_dir.clone();
    let (store, mut recovered) = tokio::task::spawn_blocking(move || Store::open(&dir))
        .await
        .map_err(|e| StoreError::Engine(e.to_string()))??;
    store.set_backlog_limit(config.store_backlog_limit);
    let spill = config.data_dir.join("spill");
    let spill_dir = match std::fs::create_dir_all(&spill) {
        Ok(()) => Some(Arc::from(spill.as_path())),
        Err(e) => {
            tracing::warn!(dir = %spill.display(), error = %e, "cannot create the spill directory; deep queues stay in memory");
            None
        }
    };
    let alarms = crate::alarm::Alarms::new(config.memory_high_watermark, config.disk_free_limit);
    // The metadata is rebuilt by applying each stored definition's command.
    let (meta_state, commands, problems) = crate::meta::MetaState::recover(&recovered.definitions);
    for problem in &problems {
        tracing::warn!(definition = %problem, "cannot recover a definition; skipped");
    }
    let external = meta.is_some();
    let first_boot = meta_state.is_empty() && !external;
    let store = Arc::new(store);
    let meta = match meta {
        Some(log) => log,
        None => Box::new(crate::meta::LocalMetaLog::new(
            meta_state,
            store.clone(),
            config.metadata_commit_delay,
        )),
    };
    let node = Node::new(config, store, meta, spill_dir, alarms);
    if let Some(peers) = peers {
        let _ = node.peers.set(peers);
    }
    let broker = Arc::new(Broker::new(Arc::new(node)));
    let weak = Arc::downgrade(&broker);
    let projection: std::sync::Weak<dyn crate::meta::MetaProjection> = weak;
    let mut commands = commands;
    if let Some(state) = broker.meta.attach(projection) {
        let definitions: Vec<_> = state
            .definitions()
            .into_iter()
            .map(|d| (d.kind, d.key, d.record))
            .collect();
        let (_, from_log, problems) = crate::meta::MetaState::recover(&definitions);
        for problem in &problems {
            tracing::warn!(definition = %problem, "cannot rebuild a definition from the metadata log; skipped");
        }
        commands = from_log;
    }
    // Rebuilding the queues reads and writes spill files (a deep queue
    // streams to them): on the blocking pool, not on a runtime worker.
    let rebuilding = broker.clone();
    let (queues, mut recovered) = tokio::task::spawn_blocking(move || {
        let mut queues = 0;
        for command in commands {
            queues += rebuilding.recover(command, &mut recovered);
        }
        (queues, recovered)
    })
    .await
    .map_err(|e| StoreError::Engine(format!("recovery did not finish: {e}")))?;
    for v in broker.vhost_list() {
        v.apply_exchange_policies();
        v.apply_policies();
        v.convert_mirrored();
    }
    broker.node.begin_run();
    if broker.peers.get().is_some() {
        spawn_drop_earlier_transient(&broker);
    }
    // Index entries of queues without a definition (a crash between writing
    // them and the queue's definition, or between deleting the definition and
    // the index): drop them and their bodies, and never reuse their ids.
    for (id, entries) in std::mem::take(&mut recovered.queues) {
        tracing::warn!(
            queue_id = id,
            messages = entries.len(),
            "dropping the index of an undefined queue"
        );
        broker.note_queue_id(id);
        broker
            .store
            .submit([queue_store::Write::DeleteQueueIndex { queue: id }]);
        for (_, entry) in entries {
            broker.store.release(entry.message);
        }
    }
    if first_boot {
        // An empty data directory: RabbitMQ's defaults.
        let (user, pass) = (
            broker.config.default_user.clone(),
            broker.config.default_pass.clone(),
        );
        broker.add_vhost("/").await?;
        broker
            .add_user(&user, Some(&pass), &["administrator"])
            .await?;
        broker.set_permissions(&user, "/", ".*", ".*", ".*").await?;
        tracing::info!(user = %user, "first boot: created the default user and vhost '/'");
    }
    if let Some(path) = broker.config.load_definitions.clone() {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| StartError::Definitions(format!("{}: {e}", path.display())))?;
        let defs: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| StartError::Definitions(format!("{}: {e}", path.display())))?;
        let imported = crate::definitions::import(&broker, &defs)
            .await
            .map_err(|e| StartError::Definitions(format!("{}: {e}", path.display())))?;
        tracing::info!(file = %path.display(), applied = imported.applied, skipped = imported.skipped.len(), "definitions loaded");
    }
    crate::monitor::spawn_monitor(&broker);
    let mut accept = Vec::new();
    let mut addr = SocketAddr::from(([0, 0, 0, 0], 0));
    if broker.config.plain_listener {
        let listener = bind(broker.config.bind).await?;
        addr = local_addr(&listener, broker.config.bind)?;
        tracing::info!(%addr, data_dir = %broker.config.data_dir.display(), queues, "warren listening (AMQP)");
        accept.push(tokio::spawn(accept_loop(broker.clone(), listener, None)));
    }
    let mut tls_addr = None;
    if let Some((tls_bind, settings)) = broker.config.tls.clone() {
        let acceptor = crate::tls::acceptor(&settings).map_err(StartError::Tls)?;
        let listener = bind(tls_bind).await?;
        let a = local_addr(&listener, tls_bind)?;
        tracing::info!(addr = %a, "warren listening (AMQPS)");
        tls_addr = Some(a);
        accept.push(tokio::spawn(accept_loop(
            broker.clone(),
            listener,
            Some(acceptor),
        )));
    }
    let mut management_addr = None;
    if let Some(http) = broker.config.management {
        let listener = bind(http).await?;
        let a = local_addr(&listener, http)?;
        tracing::info!(addr = %a, "management API listening (HTTP)");
        management_addr = Some(a);
        crate::management::spawn(&broker, listener);
    }
    let mut prometheus_addr = None;
    if let Some(http) = broker.config.prometheus {
        let listener = bind(http).await?;
        let a = local_addr(&listener, http)?;
        tracing::info!(addr = %a, "Prometheus metrics listening (HTTP)");
        prometheus_addr = Some(a);
        crate::prometheus::spawn(&broker, listener);
    }
    let mut listeners = Vec::new();
    if broker.config.plain_listener {
        listeners.push(("amqp", addr));
    }
    listeners.extend(tls_addr.map(|a| ("amqp/ssl", a)));
    listeners.extend(management_addr.map(|a| ("http", a)));
    listeners.extend(prometheus_addr.map(|a| ("http/prometheus", a)));
    let _ = broker.listeners.set(listeners);
    Ok(BrokerHandle {
        broker,
        addr,
        tls_addr,
        management_addr,
        prometheus_addr,
        accept,
    })
}

/// Listens on `addr`. The IPv6 wildcard listens dual-stack (IPv4 clients
/// too), as RabbitMQ does by default; on a host without IPv6 it falls back
/// to the IPv4 wildcard.
/// In a cluster, commits once the metadata group answers that this node's
/// transient queues of its earlier run are gone (they died with it), trying
/// again every second until it is committed or the broker stops. A
/// transient declare meanwhile commits it itself (`Node::drop_earlier_transient`).
fn spawn_drop_earlier_transient(broker: &Arc<Broker>) {
    let node = broker.node.clone();
    broker.tracker.spawn(async move {
        loop {
            match node.drop_earlier_transient().await {
                Ok(()) => {
                    tracing::debug!("the transient queues of this node's earlier run are dropped");
                    return;
                }
                Err(e) => tracing::debug!(error = %e, "cannot drop earlier transient queues yet"),
            }
            tokio::select! {
                _ = node.shutdown.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    });
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    if addr.ip() == std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) {
        match dual_stack(addr) {
            Ok(listener) => return Ok(listener),
            Err(e) => {
                let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, addr.port()));
                tracing::warn!(%addr, error = %e, "cannot listen on IPv6: listening on {v4}");
                return TcpListener::bind(v4)
                    .await
                    .map_err(|source| StartError::Listen { addr: v4, source });
            }
        }
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })
}

/// An IPv6 listener that takes IPv4 connections too (`IPV6_V6ONLY` off).
fn dual_stack(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

fn local_addr(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, StartError> {
    listener
        .local_addr()
        .map_err(|source| StartError::Listen { addr, source })
}

async fn accept_loop(
    broker: Arc<Broker>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        tokio::select! {
            _ = broker.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    let _ = socket.set_nodelay(true);
                    let b = broker.clone();
                    match &tls {
                        None => {
                            broker.tracker.spawn(crate::connection::serve(b, socket, peer));
                        }
                        Some(acceptor) => {
                            let acceptor = acceptor.clone();
                            broker.tracker.spawn(async move {
                                let timeout = b.config.handshake_timeout;
                                match tokio::time::timeout(timeout, acceptor.accept(socket)).await {
                                    Ok(Ok(stream)) => crate::connection::serve_tls(b, stream, peer).await,
                                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                                }
                            });
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
