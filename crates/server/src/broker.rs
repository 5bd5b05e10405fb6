//! [`Broker`]: the running broker — configuration, the store, vhosts, users —
//! and [`start`], which opens the store, recovers, and accepts connections
//! until shut down. Used by the `warren` binary and by the integration tests
//! (which start brokers in-process on ephemeral ports).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use amqp_codec::ShortStr;
use dashmap::DashMap;
use queue_store::{Effects, Store, StoreError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::queue::{QueueHandle, now_ms};
use crate::vhost::Vhost;

/// Broker settings.
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
    /// Whether the default user may log in only from loopback (RabbitMQ's
    /// `loopback_users`).
    pub default_user_loopback_only: bool,
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
            default_user_loopback_only: true,
            consumer_timeout: Duration::from_secs(30 * 60),
            consumer_timeout_cancels_consumer: false,
            max_connections: 0,
            max_consumers_per_channel: 0,
            memory_high_watermark: default_watermark(),
            queue_flow_limit: 0,
            store_backlog_limit: queue_store::DEFAULT_BACKLOG_LIMIT,
            disk_free_limit: 50 * 1000 * 1000,
            queue_memory_budget: queue_store::queue::DEFAULT_MEMORY_BUDGET,
            plain_listener: true,
            management: Some(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 15672))),
            load_definitions: None,
            prometheus: Some(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 15692))),
            tls: None,
        }
    }
}

/// The node name reported in the management API and trace headers (one
/// node until Warren clusters).
pub const NODE_NAME: &str = "warren@localhost";

/// 0.4 of RAM, as RabbitMQ.
fn default_watermark() -> u64 {
    crate::alarm::total_memory().map_or(1 << 30, |m| m / 10 * 4)
}

/// The running broker.
#[derive(Debug)]
pub struct Broker {
    /// Settings.
    pub config: Config,
    /// Durable storage.
    pub store: Store,
    /// Where deep queues spill the entries behind their in-memory window
    /// (`<data dir>/spill`; the files in it are anonymous). `None` if it
    /// could not be created: queues then keep every entry in memory.
    pub spill_dir: Option<Arc<std::path::Path>>,
    vhosts: DashMap<String, Arc<Vhost>>,
    next_queue: AtomicU64,
    next_connection: AtomicU64,
    /// Open client connections (after the handshake).
    pub connections: std::sync::atomic::AtomicUsize,
    /// Direct reply-to consumers.
    pub reply_consumers: crate::reply_to::ReplyConsumers,
    /// Memory and disk alarms.
    pub alarms: crate::alarm::Alarms,
    /// Prometheus counters and gauges.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Open client connections by id (management listings, forced close).
    pub live_connections: DashMap<u64, Arc<crate::connection::ConnectionShared>>,
    /// When the broker started (uptime).
    pub started: std::time::Instant,
    /// Users and permissions.
    pub auth: crate::auth::Auth,
    /// Cancelled on shutdown.
    pub shutdown: CancellationToken,
    /// Every task the broker spawned.
    pub tracker: TaskTracker,
}

impl Broker {
    /// The vhost called `name`.
    pub fn vhost(&self, name: &str) -> Option<Arc<Vhost>> {
        self.vhosts.get(name).map(|v| v.value().clone())
    }

    /// Every vhost.
    pub fn vhost_list(&self) -> Vec<Arc<Vhost>> {
        self.vhosts.iter().map(|v| v.value().clone()).collect()
    }

    /// A fresh queue storage id.
    pub fn next_queue_id(&self) -> u64 {
        self.next_queue.fetch_add(1, Ordering::Relaxed)
    }

    /// Keeps fresh ids above a recovered one.
    pub fn note_queue_id(&self, id: u64) {
        self.next_queue.fetch_max(id + 1, Ordering::Relaxed);
    }

    /// A fresh connection id.
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// Checks a login: the user exists, has a password, the password
    /// matches, and `guest` comes from loopback (RabbitMQ's `loopback_users`).
    pub fn authenticate(&self, user: &str, pass: &str, peer: SocketAddr) -> Result<(), String> {
        let Some(u) = self.auth.user(user) else {
            return Err(format!("user '{user}' does not exist"));
        };
        let Some(hash) = &u.password_hash else {
            return Err(format!("user '{user}' has no password"));
        };
        if !crate::auth::verify_password(hash, pass) {
            return Err(format!("invalid credentials for user '{user}'"));
        }
        // (An IPv4 client of a dual-stack listener arrives as ::ffff:a.b.c.d:
        // canonical, 127.0.0.1 is loopback.)
        if user == "guest"
            && self.config.default_user_loopback_only
            && !peer.ip().to_canonical().is_loopback()
        {
            return Err(format!("user '{user}' can only connect via localhost"));
        }
        Ok(())
    }

    /// Adds or updates a user (the password is hashed as RabbitMQ does).
    pub async fn add_user(
        &self,
        name: &str,
        password: Option<&str>,
        tags: &[&str],
    ) -> Result<(), StoreError> {
        let write = self.auth.put_user(crate::auth::User {
            name: name.to_owned(),
            password_hash: password.map(crate::auth::hash_password),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        });
        self.store.submit([write]);
        self.store.commit().await
    }

    /// Deletes a user and their permissions.
    pub async fn delete_user(&self, name: &str) -> Result<(), StoreError> {
        self.store.submit(self.auth.delete_user(name));
        self.store.commit().await
    }

    /// Sets a user's permissions in a vhost (regular expressions).
    pub async fn set_permissions(
        &self,
        user: &str,
        vhost: &str,
        configure: &str,
        write: &str,
        read: &str,
    ) -> Result<(), String> {
        let w = self
            .auth
            .set_permissions(user, vhost, configure, write, read)
            .map_err(|e| e.to_string())?;
        self.store.submit([w]);
        self.store.commit().await.map_err(|e| e.to_string())
    }

    /// Sets a user's topic permissions on an exchange (regular expressions;
    /// `{username}` and `{vhost}` are expanded when checked).
    pub async fn set_topic_permissions(
        &self,
        user: &str,
        vhost: &str,
        exchange: &str,
        write: &str,
        read: &str,
    ) -> Result<(), StoreError> {
        self.store.submit([self
            .auth
            .set_topic_permissions(user, vhost, exchange, write, read)]);
        self.store.commit().await
    }

    /// Creates a vhost (no-op if it exists).
    pub async fn add_vhost(self: &Arc<Self>, name: &str) -> Result<Arc<Vhost>, StoreError> {
        if let Some(v) = self.vhost(name) {
            return Ok(v);
        }
        let short = ShortStr::try_from(name).map_err(|e| StoreError::Engine(e.to_string()))?;
        let v = Arc::new(Vhost::new(short));
        self.vhosts.insert(name.to_owned(), v.clone());
        self.store.submit([queue_store::Write::PutDefinition {
            kind: queue_store::DefKind::Vhost,
            key: bytes::Bytes::from(name.to_owned().into_bytes()),
            value: amqp_codec::FieldTable::new(),
        }]);
        self.store.commit().await?;
        tracing::info!(vhost = name, "vhost created");
        Ok(v)
    }

    /// Sets a vhost's limits (persisted with the vhost).
    pub async fn set_vhost_limits(
        &self,
        name: &str,
        limits: crate::vhost::VhostLimits,
    ) -> Result<(), StoreError> {
        let Some(v) = self.vhost(name) else {
            return Err(StoreError::Engine(format!("no vhost '{name}'")));
        };
        self.update_vhost_limits(&v, |l| {
            *l = limits;
            Ok::<(), std::convert::Infallible>(())
        })
        .await
        .map(|_| ())
    }

    /// Changes one vhost's limits with `change` and persists the result; the
    /// read, change and write happen under the vhost's limits lock, so two
    /// concurrent changes of different limits both stick. `change`'s own
    /// refusal comes back as the inner error, with nothing changed.
    pub async fn update_vhost_limits<E>(
        &self,
        vhost: &crate::vhost::Vhost,
        change: impl FnOnce(&mut crate::vhost::VhostLimits) -> Result<(), E>,
    ) -> Result<Result<(), E>, StoreError> {
        {
            let mut limits = vhost.limits.lock();
            let mut updated = *limits;
            if let Err(e) = change(&mut updated) {
                return Ok(Err(e));
            }
            *limits = updated;
            // Submitted under the lock: the store applies writes in order.
            self.store.submit([queue_store::Write::PutDefinition {
                kind: queue_store::DefKind::Vhost,
                key: bytes::Bytes::from(vhost.name().to_owned().into_bytes()),
                value: updated.record(),
            }]);
        }
        self.store.commit().await.map(Ok)
    }

    /// Adds or replaces a policy in its vhost and applies it to live queues at
    /// once. Returns whether it is new; `Ok(None)` if the vhost does not exist.
    pub async fn set_policy(
        self: &Arc<Self>,
        policy: crate::policy::Policy,
    ) -> Result<Option<bool>, StoreError> {
        let Some(v) = self.vhost(&policy.vhost) else {
            return Ok(None);
        };
        let write = queue_store::Write::PutDefinition {
            kind: queue_store::DefKind::Policy,
            key: queue_store::scoped_name(&policy.vhost, &[policy.name.as_bytes()]),
            value: policy.record(),
        };
        let created = {
            let mut policies = v.policies.write();
            match policies.iter_mut().find(|p| p.name == policy.name) {
                Some(existing) => {
                    *existing = policy;
                    false
                }
                None => {
                    policies.push(policy);
                    true
                }
            }
        };
        self.store.submit([write]);
        self.store.commit().await?;
        v.apply_policies(self);
        Ok(Some(created))
    }

    /// Removes a policy; queues fall back to their own arguments (or the next
    /// matching policy) at once. Returns whether it existed.
    pub async fn clear_policy(
        self: &Arc<Self>,
        vhost: &str,
        name: &str,
    ) -> Result<bool, StoreError> {
        let Some(v) = self.vhost(vhost) else {
            return Ok(false);
        };
        let existed = {
            let mut policies = v.policies.write();
            let before = policies.len();
            policies.retain(|p| p.name != name);
            policies.len() != before
        };
        if existed {
            self.store.submit([queue_store::Write::DeleteDefinition {
                kind: queue_store::DefKind::Policy,
                key: queue_store::scoped_name(vhost, &[name.as_bytes()]),
            }]);
            self.store.commit().await?;
            v.apply_policies(self);
        }
        Ok(existed)
    }

    /// Deletes a vhost: its connections are closed (320) and its queues,
    /// exchanges and bindings removed, durable ones from the store too.
    pub async fn delete_vhost(self: &Arc<Self>, name: &str) -> Result<(), StoreError> {
        let Some((_, v)) = self.vhosts.remove(name) else {
            return Ok(());
        };
        v.closed.cancel();
        for q in v.queues() {
            let _ = v.delete_queue(self, &q, false).await;
        }
        v.delete_exchanges(self);
        // Its permissions and policies go with it (a vhost created later
        // under the same name starts clean, as in RabbitMQ).
        let mut writes = self.auth.clear_vhost(name);
        for p in v.policies.write().drain(..) {
            writes.push(queue_store::Write::DeleteDefinition {
                kind: queue_store::DefKind::Policy,
                key: queue_store::scoped_name(name, &[p.name.as_bytes()]),
            });
        }
        writes.push(queue_store::Write::DeleteDefinition {
            kind: queue_store::DefKind::Vhost,
            key: bytes::Bytes::from(name.to_owned().into_bytes()),
        });
        self.store.submit(writes);
        self.store.commit().await?;
        tracing::info!(vhost = name, "vhost deleted");
        Ok(())
    }
}

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

/// Errors starting the broker.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory could not be opened.
    #[error("cannot open data directory: {0}")]
    Store(#[from] StoreError),
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
    let broker = Arc::new(Broker {
        config,
        store,
        spill_dir,
        vhosts: DashMap::new(),
        next_queue: AtomicU64::new(1),
        next_connection: AtomicU64::new(1),
        connections: std::sync::atomic::AtomicUsize::new(0),
        reply_consumers: crate::reply_to::ReplyConsumers::default(),
        alarms,
        metrics: Arc::default(),
        live_connections: DashMap::new(),
        started: std::time::Instant::now(),
        auth: crate::auth::Auth::default(),
        shutdown: CancellationToken::new(),
        tracker: TaskTracker::new(),
    });
    broker.auth.recover(&recovered.definitions);
    let mut vhost_names: Vec<(String, crate::vhost::VhostLimits)> = recovered
        .definitions
        .iter()
        .filter(|(k, _, _)| *k == queue_store::DefKind::Vhost)
        .map(|(_, name, t)| {
            (
                String::from_utf8_lossy(name).into_owned(),
                crate::vhost::VhostLimits::from_record(t),
            )
        })
        .collect();
    let first_boot = broker.auth.is_empty() && vhost_names.is_empty();
    if first_boot {
        // An empty data directory: RabbitMQ's defaults.
        vhost_names.push(("/".to_owned(), crate::vhost::VhostLimits::default()));
    }
    let mut queues = 0;
    for (name, limits) in &vhost_names {
        let Ok(short) = ShortStr::try_from(name.as_str()) else {
            continue;
        };
        let vhost = Arc::new(Vhost::new(short));
        *vhost.limits.lock() = *limits;
        broker.vhosts.insert(name.clone(), vhost.clone());
        queues += vhost.recover(&broker, &mut recovered);
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
        let (user, pass) = (
            broker.config.default_user.clone(),
            broker.config.default_pass.clone(),
        );
        broker.store.submit([queue_store::Write::PutDefinition {
            kind: queue_store::DefKind::Vhost,
            key: bytes::Bytes::from_static(b"/"),
            value: amqp_codec::FieldTable::new(),
        }]);
        broker
            .add_user(&user, Some(&pass), &["administrator"])
            .await?;
        broker
            .set_permissions(&user, "/", ".*", ".*", ".*")
            .await
            .map_err(StoreError::Engine)?;
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
    crate::alarm::spawn_monitor(&broker);
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
        crate::metrics::spawn(&broker, listener);
    }
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

/// A queue's timer: expires messages as their TTL runs out (so an idle queue
/// dead-letters promptly) and deletes the queue when `x-expires` says it has
/// been unused too long.
pub fn spawn_housekeeping(broker: &Arc<Broker>, vhost: Arc<Vhost>, q: Arc<QueueHandle>) {
    let broker = broker.clone();
    let tracker = broker.tracker.clone();
    tracker.spawn(async move {
        loop {
            let (deadline, unused_deadline) = {
                let st = q.state.lock();
                if st.deleted {
                    return;
                }
                let unused = if st.consumers.is_empty() {
                    st.queue.unused_deadline()
                } else {
                    None
                };
                (st.queue.next_expiry(), unused)
            };
            let next = [deadline, unused_deadline].into_iter().flatten().min();
            let sleep = async {
                match next {
                    Some(at) => {
                        let wait = at.saturating_sub(now_ms());
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = broker.shutdown.cancelled() => return,
                _ = q.wake.notified() => continue,
                _ = sleep => {}
            }
            let now = now_ms();
            if unused_deadline.is_some_and(|d| d <= now) {
                let still_unused = {
                    let st = q.state.lock();
                    st.consumers.is_empty() && st.queue.unused_deadline().is_some_and(|d| d <= now)
                };
                if still_unused {
                    tracing::info!(queue = %q.name, "queue expired (x-expires)");
                    let _ = vhost.delete_queue(&broker, &q, true).await;
                    return;
                }
            }
            let mut fx = Effects::default();
            {
                let mut st = q.state.lock();
                st.queue.expire(now, &mut fx);
                st.dispatch(&q, &broker.store, &mut fx);
            }
            vhost.apply(&broker, &mut fx);
        }
    });
}
