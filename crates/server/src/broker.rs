//! [`Broker`]: the running broker — its node (settings, store, metadata log,
//! users), the vhosts and the open connections — and the operator-level
//! changes made through the metadata log (vhosts, users, permissions,
//! limits, policies). Started by `start.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use amqp_codec::ShortStr;
use dashmap::DashMap;

use crate::meta::{
    Applied, MetaCommand, MetaError, MetaProjection, PermissionDef, TopicPermissionDef,
};

pub use crate::config::{Config, NODE_NAME};
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
    pub live_connections: DashMap<u64, Arc<crate::session::ConnectionShared>>,
    /// When the broker started (uptime).
    pub started: std::time::Instant,
    /// How the node's gauges moved ([`crate::peers::GaugeRates`]'s order),
    /// sampled every 5 s by the monitor.
    gauge_rates: crate::rates::SampledRates<6>,
    /// How many messages the store wrote and read (RabbitMQ's
    /// `disk_writes`, `disk_reads`), sampled with them.
    disk_io_rates: crate::rates::SampledRates<2>,
    /// The store's I/O counters' rates ([`crate::metrics::IO_COUNTERS`]).
    io_rates: crate::rates::SampledRates<12>,
    /// This node's listeners once bound, as RabbitMQ names their
    /// protocols (`amqp`, `amqp/ssl`, `http`, `http/prometheus`,
    /// `clustering`): the health checks' `port-listener` and
    /// `protocol-listener`.
    pub listeners: std::sync::OnceLock<Vec<(&'static str, SocketAddr)>>,
}

impl std::ops::Deref for Broker {
    type Target = Node;

    fn deref(&self) -> &Node {
        &self.node
    }
}

impl Broker {
    /// A broker over `node`, with no vhosts yet (recovery and the first
    /// boot's defaults add them).
    pub fn new(node: Arc<Node>) -> Broker {
        Broker {
            node,
            vhosts: DashMap::new(),
            next_connection: AtomicU64::new(1),
            connections: std::sync::atomic::AtomicUsize::new(0),
            live_connections: DashMap::new(),
            started: std::time::Instant::now(),
            gauge_rates: Default::default(),
            disk_io_rates: Default::default(),
            io_rates: Default::default(),
            listeners: std::sync::OnceLock::new(),
        }
    }

    /// The vhost called `name`.
    pub fn vhost(&self, name: &str) -> Option<Arc<Vhost>> {
        self.vhosts.get(name).map(|v| v.value().clone())
    }

    /// Every vhost.
    pub fn vhost_list(&self) -> Vec<Arc<Vhost>> {
        self.vhosts.iter().map(|v| v.value().clone()).collect()
    }

    /// Samples the node's gauges and the store's message reads and writes
    /// for their rates (the monitor, every 5 s).
    pub fn sample_node(&self) {
        self.gauge_rates.sample(self.node_stats().gauges());
        self.disk_io_rates.sample(self.disk_io());
        self.io_rates.sample(self.io_counts());
    }

    /// The store's I/O counters, in [`crate::metrics::IO_COUNTERS`]'s order.
    pub fn io_counts(&self) -> [u64; 12] {
        let s = self.store.stats();
        [
            &s.reads,
            &s.bytes_read,
            &s.batches,
            &s.bytes_written,
            &s.syncs,
            &s.messages_read,
            &s.messages_written,
            &s.index_writes,
            &s.definition_writes,
            &s.read_micros,
            &s.write_micros,
            &s.sync_micros,
        ]
        .map(|c| c.load(Ordering::Relaxed))
    }

    /// Messages the store read back from disk and wrote to it, with their
    /// rates at the last sample (the overview's `disk_reads`, `disk_writes`).
    pub fn disk_io_stats(&self) -> ([u64; 2], [f64; 2]) {
        (self.disk_io(), self.disk_io_rates.rates())
    }

    fn disk_io(&self) -> [u64; 2] {
        let stats = self.store.stats();
        [
            stats.messages_read.load(Ordering::Relaxed),
            stats.messages_written.load(Ordering::Relaxed),
        ]
    }

    /// This node's figures now (`/api/nodes`, and what it gossips).
    pub fn node_stats(&self) -> crate::peers::NodeStats {
        let alarms = self.alarms.current();
        let fd_used = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
        // "Max open files  <soft>  <hard>  files"
        let fd_total = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("Max open files"))?;
                line["Max open files".len()..]
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0);
        crate::peers::NodeStats {
            mem_used: crate::metrics::resident_memory(),
            mem_limit: self.alarms.memory_limit(),
            mem_alarm: alarms.memory,
            disk_free_limit: self.alarms.disk_limit(),
            disk_free_alarm: alarms.disk,
            disk_free: self.alarms.disk_free(),
            fd_used,
            fd_total,
            sockets_used: self.connections.load(Ordering::Relaxed) as u64,
            sockets_total: fd_total / 10 * 9,
            proc_used: tokio::runtime::Handle::try_current()
                .map_or(0, |h| h.metrics().num_alive_tasks() as u64),
            proc_total: 1_048_576,
            processors: std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
            uptime: self.started.elapsed().as_millis() as u64,
            run_queue: tokio::runtime::Handle::try_current()
                .map_or(0, |h| h.metrics().global_queue_depth() as u64),
            context_switches: context_switches(),
            gauge_rates: crate::peers::GaugeRates::from(self.gauge_rates.rates()),
            io: crate::peers::IoStats {
                counts: self.io_counts(),
                rates: self.io_rates.rates(),
            },
        }
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
        if self.config.loopback_users.iter().any(|u| u == user)
            && !peer.ip().to_canonical().is_loopback()
        {
            return Err(format!("user '{user}' can only connect via localhost"));
        }
        Ok(())
    }

    /// Commits a metadata command through the node's [`MetaLog`], which
    /// projects it (see [`MetaProjection`] below) before this completes.
    /// Exchanges, queues and bindings are applied to their vhost's router by
    /// `Vhost`, which also holds transient ones.
    pub async fn commit_meta(&self, command: MetaCommand) -> Result<Applied, MetaError> {
        self.meta.commit(command).await
    }

    /// Applies a committed command to the runtime view of users,
    /// permissions, policies and limits (the log's projection, and boot
    /// recovery).
    fn project_command(&self, command: &MetaCommand) {
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
                // The node that ran the operation made the vhost before
                // committing; any other node (in a cluster) makes it here.
                let v = match self.vhost(name) {
                    Some(v) => v,
                    None => match ShortStr::try_from(name.as_str()) {
                        Ok(short) => self
                            .vhosts
                            .entry(name.clone())
                            .or_insert_with(|| Vhost::new(short, self.node.clone()))
                            .clone(),
                        Err(e) => {
                            tracing::warn!(vhost = %name, error = %e, "cannot make vhost");
                            return;
                        }
                    },
                };
                *v.limits.lock() = *limits;
            }
            MetaCommand::DeleteVhost { name } => {
                // The node that ran the operation removed it first; any other
                // node (in a cluster) closes its connections to it here. Its
                // durable queues' definitions went with the command; their
                // index entries here are dropped at the next boot.
                if let Some((_, v)) = self.vhosts.remove(name) {
                    v.closed.cancel();
                    v.policies.write().clear();
                    v.operator_policies.write().clear();
                    tracing::info!(vhost = %name, "vhost deleted (by another node)");
                }
                self.auth.clear_vhost(name);
            }
            // Every node re-applies a vhost's policies to its queues here,
            // the node that ran the operation too.
            MetaCommand::PutPolicy(policy) => {
                if let Some(v) = self.vhost(&policy.vhost) {
                    {
                        let mut policies = v.policies_of(policy.kind).write();
                        match policies.iter_mut().find(|p| p.name == policy.name) {
                            Some(existing) => *existing = policy.clone(),
                            None => policies.push(policy.clone()),
                        }
                    }
                    v.apply_policies();
                    v.apply_policies_to_replicated();
                    v.convert_mirrored();
                }
            }
            MetaCommand::DeletePolicy { vhost, name, kind } => {
                if let Some(v) = self.vhost(vhost) {
                    v.policies_of(*kind).write().retain(|p| p.name != *name);
                    v.apply_policies();
                    v.apply_policies_to_replicated();
                    v.convert_mirrored();
                }
            }
            // Router objects: the node that ran the operation changed its
            // router first, so these are no-ops there; any other node (in a
            // cluster) follows here. A queue homed on another node becomes
            // routable by name; its messages are sent to its home.
            MetaCommand::DeclareExchange { vhost, exchange } => {
                if let Some(v) = self.vhost(vhost) {
                    v.project_exchange(exchange);
                }
            }
            MetaCommand::DeleteExchange { vhost, name } => {
                if let Some(v) = self.vhost(vhost) {
                    v.project_exchange_deleted(name);
                }
            }
            MetaCommand::DeclareQueue { vhost, queue } => {
                if let Some(v) = self.vhost(vhost) {
                    v.project_queue(queue);
                    // A new replicated queue's group starts from its own
                    // arguments; the policies that apply to it follow in
                    // its log.
                    if !queue.members.is_empty() {
                        if let Some(remote) = v.find_remote_queue(&queue.name) {
                            v.apply_policy_to_replicated(&remote);
                        }
                    }
                }
            }
            MetaCommand::DeleteQueue { vhost, name } => {
                if let Some(v) = self.vhost(vhost) {
                    v.project_queue_deleted(name);
                }
            }
            MetaCommand::Bind { vhost, binding } => {
                if let Some(v) = self.vhost(vhost) {
                    v.project_bind(binding);
                }
            }
            MetaCommand::Unbind { vhost, binding } => {
                if let Some(v) = self.vhost(vhost) {
                    v.project_unbind(binding);
                }
            }
            MetaCommand::DropTransient { home, before } => {
                for v in self.vhost_list() {
                    v.project_transient_dropped(home, *before);
                }
            }
        }
    }

    /// Builds the runtime object a recovered command describes (at boot).
    /// Returns how many queues it recovered.
    pub(crate) fn recover(
        self: &Arc<Self>,
        command: MetaCommand,
        recovered: &mut queue_store::Recovered,
    ) -> usize {
        match &command {
            MetaCommand::PutVhost { name, limits } => match ShortStr::try_from(name.as_str()) {
                Ok(short) => {
                    // (A cluster's projection may have made it already.)
                    let v = self
                        .vhosts
                        .entry(name.clone())
                        .or_insert_with(|| Vhost::new(short, self.node.clone()))
                        .clone();
                    *v.limits.lock() = *limits;
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
                    if !self.node.is_home(&queue.home) || !queue.members.is_empty() {
                        // Homed elsewhere, or replicated (reached through
                        // its group wherever its leader is).
                        v.project_queue(queue);
                        // A classic queue of this node it took over may
                        // still hold messages to move into it.
                        return usize::from(v.recover_moving(queue, recovered));
                    }
                    if !queue.durable || queue.exclusive {
                        // A cluster's transient queue of this node's
                        // earlier run: gone with it (this run drops it
                        // from the metadata), its id not to be reused.
                        self.node.note_queue_id(queue.id);
                        return 0;
                    }
                    v.recover_queue(queue, recovered);
                    return 1;
                }
            }
            MetaCommand::Bind { vhost, binding } => {
                if let Some(v) = self.vhost(vhost) {
                    v.recover_binding(binding);
                }
            }
            _ => self.project_command(&command),
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
        if let Err(e) = self
            .commit_meta(MetaCommand::PutVhost {
                name: name.to_owned(),
                limits,
            })
            .await
        {
            // Not committed: it does not exist (unless a commit of the same
            // vhost by another node made it meanwhile).
            if !matches!(e, MetaError::Conflict(_)) {
                self.vhosts.remove_if(name, |_, made| {
                    Arc::ptr_eq(made, &v) && made.queues().is_empty()
                });
            }
            return Err(e);
        }
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

    /// Adds or replaces a policy or an operator policy in its vhost; the
    /// projection applies it to live queues before this returns. Returns
    /// whether it is new; `Ok(None)` if the vhost does not exist.
    pub async fn set_policy(
        self: &Arc<Self>,
        policy: crate::policy::Policy,
    ) -> Result<Option<bool>, MetaError> {
        if self.vhost(&policy.vhost).is_none() {
            return Ok(None);
        }
        let created = self
            .commit_meta(MetaCommand::PutPolicy(policy))
            .await?
            .changed_existence;
        Ok(Some(created))
    }

    /// Removes a policy or an operator policy; queues fall back to their own
    /// arguments (or the next matching policy) before this returns. Returns
    /// whether it existed.
    pub async fn clear_policy(
        self: &Arc<Self>,
        vhost: &str,
        name: &str,
        kind: crate::policy::PolicyKind,
    ) -> Result<bool, MetaError> {
        if self.vhost(vhost).is_none() {
            return Ok(false);
        }
        match self
            .commit_meta(MetaCommand::DeletePolicy {
                vhost: vhost.to_owned(),
                name: name.to_owned(),
                kind,
            })
            .await
        {
            Ok(_) => Ok(true),
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

/// The process's context switches so far: every thread's voluntary and
/// involuntary ones (`/proc/self/task/*/status`); 0 where there is no
/// `/proc`.
fn context_switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.ends_with(char::is_numeric) && l.contains("ctxt_switches:"))
                .filter_map(|l| l.rsplit(char::is_whitespace).next()?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

impl MetaProjection for Broker {
    /// Users and permissions, vhost limits and policies follow the log.
    /// (A vhost is created and deleted here, on the node that runs the
    /// operation; a node applying another's commands, in a cluster, will
    /// need `PutVhost`/`DeleteVhost` to build and tear down the vhost too.)
    fn project(&self, command: &MetaCommand) {
        self.project_command(command);
    }
}
