//! [`Broker`]: the running broker — configuration, the store, vhosts, users —
//! and [`start`], which opens the store, recovers, and accepts connections
//! until shut down. Used by the `warren` binary and by the integration tests
//! (which start brokers in-process on ephemeral ports).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use amqp_codec::ShortStr;
use dashmap::DashMap;
use queue_store::{Store, StoreError};

use crate::meta::{Applied, MetaCommand, MetaError, PermissionDef, TopicPermissionDef};
use tokio::net::TcpListener;

pub use crate::config::Config;
pub use crate::node::NODE_NAME;
use crate::node::Node;
use crate::vhost::Vhost;

/// The running broker: the node's shared parts, and the vhosts, users and
/// connections on top of them.
#[derive(Debug)]
pub struct Broker {
    /// What the vhosts and queues share (settings, store, metadata log,
    /// metrics, alarms, tasks).
    pub node: Arc<Node>,
    vhosts: DashMap<String, Arc<Vhost>>,
    next_connection: AtomicU64,
    /// Open client connections (after the handshake).
    pub connections: std::sync::atomic::AtomicUsize,
    /// Open client connections by id (management listings, forced close).
    pub live_connections: DashMap<u64, Arc<crate::connection::ConnectionShared>>,
    /// When the broker started (uptime).
    pub started: std::time::Instant,
}

impl std::ops::Deref for Broker {
    type Target = Node;

    fn deref(&self) -> &Node {
        &self.node
    }
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

    /// Commits a metadata command through the broker's [`MetaLog`] and then
    /// applies it to the runtime view it concerns (users and permissions,
    /// policies, vhost limits). Exchanges, queues and bindings are applied
    /// to their vhost's router by `Vhost`, which also holds transient ones.
    pub async fn commit_meta(&self, command: MetaCommand) -> Result<Applied, MetaError> {
        let applied = self.meta.commit(command.clone()).await?;
        self.project(&command);
        Ok(applied)
    }

    /// Applies a committed command to the runtime view of users,
    /// permissions, policies and limits.
    fn project(&self, command: &MetaCommand) {
        match command {
            MetaCommand::PutUser(u) => self.auth.put_user(u.clone()),
            MetaCommand::DeleteUser { name } => self.auth.delete_user(name),
            MetaCommand::SetPermission(p) => {
                // The state checked the patterns compile.
                if let Err(e) = self.auth.set_permissions(p) {
                    tracing::error!(user = %p.user, vhost = %p.vhost, error = %e, "permission patterns");
                }
            }
            MetaCommand::ClearPermission { user, vhost } => {
                self.auth.clear_permissions(user, vhost)
            }
            MetaCommand::SetTopicPermission(p) => self.auth.set_topic_permissions(p),
            MetaCommand::ClearTopicPermission {
                user,
                vhost,
                exchange,
            } => self.auth.clear_topic_permissions(user, vhost, exchange),
            MetaCommand::PutVhost { name, limits } => {
                if let Some(v) = self.vhost(name) {
                    *v.limits.lock() = *limits;
                }
            }
            MetaCommand::PutPolicy(policy) => {
                if let Some(v) = self.vhost(&policy.vhost) {
                    let mut policies = v.policies.write();
                    match policies.iter_mut().find(|p| p.name == policy.name) {
                        Some(existing) => *existing = policy.clone(),
                        None => policies.push(policy.clone()),
                    }
                }
            }
            MetaCommand::DeletePolicy { vhost, name } => {
                if let Some(v) = self.vhost(vhost) {
                    v.policies.write().retain(|p| p.name != *name);
                }
            }
            MetaCommand::DeleteVhost { name } => self.auth.clear_vhost(name),
            MetaCommand::DeclareExchange { .. }
            | MetaCommand::DeleteExchange { .. }
            | MetaCommand::DeclareQueue { .. }
            | MetaCommand::DeleteQueue { .. }
            | MetaCommand::Bind { .. }
            | MetaCommand::Unbind { .. } => {}
        }
    }

    /// Builds the runtime object a recovered command describes (at boot).
    /// Returns how many queues it recovered.
    fn recover(
        self: &Arc<Self>,
        command: MetaCommand,
        recovered: &mut queue_store::Recovered,
    ) -> usize {
        match &command {
            MetaCommand::PutVhost { name, limits } => match ShortStr::try_from(name.as_str()) {
                Ok(short) => {
                    let v = Vhost::new(short, self.node.clone());
                    *v.limits.lock() = *limits;
                    self.vhosts.insert(name.clone(), v);
                }
                Err(e) => tracing::warn!(vhost = %name, error = %e, "cannot recover vhost"),
            },
            MetaCommand::DeclareExchange { vhost, exchange } => {
                if let Some(v) = self.vhost(vhost) {
                    v.recover_exchange(exchange);
                }
            }
            MetaCommand::DeclareQueue { vhost, queue } => {
                if let Some(v) = self.vhost(vhost) {
                    v.recover_queue(queue, recovered);
                    return 1;
                }
            }
            MetaCommand::Bind { vhost, binding } => {
                if let Some(v) = self.vhost(vhost) {
                    v.recover_binding(binding);
                }
            }
            _ => self.project(&command),
        }
        0
    }

    /// Adds or replaces a user as given (a hash, not a password).
    pub async fn put_user(&self, user: crate::auth::User) -> Result<bool, MetaError> {
        Ok(self
            .commit_meta(MetaCommand::PutUser(user))
            .await?
            .changed_existence)
    }

    /// Adds or updates a user (the password is hashed as RabbitMQ does).
    pub async fn add_user(
        &self,
        name: &str,
        password: Option<&str>,
        tags: &[&str],
    ) -> Result<(), MetaError> {
        self.put_user(crate::auth::User {
            name: name.to_owned(),
            password_hash: password.map(crate::auth::hash_password),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        })
        .await
        .map(|_| ())
    }

    /// Deletes a user and their permissions.
    pub async fn delete_user(&self, name: &str) -> Result<(), MetaError> {
        self.commit_meta(MetaCommand::DeleteUser {
            name: name.to_owned(),
        })
        .await
        .map(|_| ())
    }

    /// Sets a user's permissions in a vhost (regular expressions). Returns
    /// whether they are new.
    pub async fn set_permissions(
        &self,
        user: &str,
        vhost: &str,
        configure: &str,
        write: &str,
        read: &str,
    ) -> Result<bool, MetaError> {
        Ok(self
            .commit_meta(MetaCommand::SetPermission(PermissionDef {
                user: user.to_owned(),
                vhost: vhost.to_owned(),
                configure: configure.to_owned(),
                write: write.to_owned(),
                read: read.to_owned(),
            }))
            .await?
            .changed_existence)
    }

    /// Clears a user's permissions in a vhost.
    pub async fn clear_permissions(&self, user: &str, vhost: &str) -> Result<(), MetaError> {
        self.commit_meta(MetaCommand::ClearPermission {
            user: user.to_owned(),
            vhost: vhost.to_owned(),
        })
        .await
        .map(|_| ())
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
    ) -> Result<(), MetaError> {
        self.commit_meta(MetaCommand::SetTopicPermission(TopicPermissionDef {
            user: user.to_owned(),
            vhost: vhost.to_owned(),
            exchange: exchange.to_owned(),
            write: write.to_owned(),
            read: read.to_owned(),
        }))
        .await
        .map(|_| ())
    }

    /// Clears a user's topic permissions on an exchange.
    pub async fn clear_topic_permissions(
        &self,
        user: &str,
        vhost: &str,
        exchange: &str,
    ) -> Result<(), MetaError> {
        self.commit_meta(MetaCommand::ClearTopicPermission {
            user: user.to_owned(),
            vhost: vhost.to_owned(),
            exchange: exchange.to_owned(),
        })
        .await
        .map(|_| ())
    }

    /// Creates a vhost (no-op if it exists).
    pub async fn add_vhost(self: &Arc<Self>, name: &str) -> Result<Arc<Vhost>, MetaError> {
        if let Some(v) = self.vhost(name) {
            return Ok(v);
        }
        let short = ShortStr::try_from(name).map_err(|e| MetaError::Invalid(e.to_string()))?;
        let v = self
            .vhosts
            .entry(name.to_owned())
            .or_insert_with(|| Vhost::new(short, self.node.clone()))
            .clone();
        let limits = *v.limits.lock();
        self.commit_meta(MetaCommand::PutVhost {
            name: name.to_owned(),
            limits,
        })
        .await?;
        tracing::info!(vhost = name, "vhost created");
        Ok(v)
    }

    /// Sets a vhost's limits (persisted with the vhost).
    pub async fn set_vhost_limits(
        &self,
        name: &str,
        limits: crate::vhost::VhostLimits,
    ) -> Result<(), MetaError> {
        let Some(v) = self.vhost(name) else {
            return Err(MetaError::NotFound(format!("no vhost '{name}'")));
        };
        self.update_vhost_limits(&v, |l| {
            *l = limits;
            Ok::<(), std::convert::Infallible>(())
        })
        .await
        .map(|_| ())
    }

    /// Changes one vhost's limits with `change` and commits the result; the
    /// read, change and commit happen under the vhost's limits lock, so two
    /// concurrent changes of different limits both stick. `change`'s own
    /// refusal comes back as the inner error, with nothing changed.
    pub async fn update_vhost_limits<E>(
        &self,
        vhost: &crate::vhost::Vhost,
        change: impl FnOnce(&mut crate::vhost::VhostLimits) -> Result<(), E>,
    ) -> Result<Result<(), E>, MetaError> {
        let commit = {
            let mut limits = vhost.limits.lock();
            let mut updated = *limits;
            if let Err(e) = change(&mut updated) {
                return Ok(Err(e));
            }
            *limits = updated;
            // Committed under the lock: the command's place in the log is
            // taken when `commit` is called.
            self.meta.commit(MetaCommand::PutVhost {
                name: vhost.name().to_owned(),
                limits: updated,
            })
        };
        commit.await.map(|_| Ok(()))
    }

    /// Adds or replaces a policy in its vhost and applies it to live queues at
    /// once. Returns whether it is new; `Ok(None)` if the vhost does not exist.
    pub async fn set_policy(
        self: &Arc<Self>,
        policy: crate::policy::Policy,
    ) -> Result<Option<bool>, MetaError> {
        let Some(v) = self.vhost(&policy.vhost) else {
            return Ok(None);
        };
        let created = self
            .commit_meta(MetaCommand::PutPolicy(policy))
            .await?
            .changed_existence;
        v.apply_policies();
        Ok(Some(created))
    }

    /// Removes a policy; queues fall back to their own arguments (or the next
    /// matching policy) at once. Returns whether it existed.
    pub async fn clear_policy(
        self: &Arc<Self>,
        vhost: &str,
        name: &str,
    ) -> Result<bool, MetaError> {
        let Some(v) = self.vhost(vhost) else {
            return Ok(false);
        };
        match self
            .commit_meta(MetaCommand::DeletePolicy {
                vhost: vhost.to_owned(),
                name: name.to_owned(),
            })
            .await
        {
            Ok(_) => {
                v.apply_policies();
                Ok(true)
            }
            Err(MetaError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes a vhost: its connections are closed (320) and its queues,
    /// exchanges and bindings removed, durable ones from the store too; its
    /// permissions and policies go with it (a vhost created later under the
    /// same name starts clean, as in RabbitMQ).
    pub async fn delete_vhost(self: &Arc<Self>, name: &str) -> Result<(), MetaError> {
        let Some((_, v)) = self.vhosts.remove(name) else {
            return Ok(());
        };
        v.closed.cancel();
        for q in v.queues() {
            let _ = v.delete_queue(&q, false).await;
        }
        v.delete_exchanges().await;
        v.policies.write().clear();
        self.commit_meta(MetaCommand::DeleteVhost {
            name: name.to_owned(),
        })
        .await?;
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
    let first_boot = meta_state.is_empty();
    let store = Arc::new(store);
    let meta = Box::new(crate::meta::LocalMetaLog::new(
        meta_state,
        store.clone(),
        config.metadata_commit_delay,
    ));
    let broker = Arc::new(Broker {
        node: Arc::new(Node::new(config, store, meta, spill_dir, alarms)),
        vhosts: DashMap::new(),
        next_connection: AtomicU64::new(1),
        connections: std::sync::atomic::AtomicUsize::new(0),
        live_connections: DashMap::new(),
        started: std::time::Instant::now(),
    });
    let mut queues = 0;
    for command in commands {
        queues += broker.recover(command, &mut recovered);
    }
    for v in broker.vhost_list() {
        v.apply_exchange_policies();
        v.apply_policies();
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
