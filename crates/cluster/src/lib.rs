//! Warren's cluster: several nodes as one broker.
//!
//! What is here now: each node's identity (`identity`), membership by
//! gossip (`gossip`: chitchat, an address book and liveness hint for
//! `/api/nodes`), the authenticated links between nodes (`link`, `rpc`),
//! the node's durable Raft log
//! (`raft_wal`), the metadata Raft group (`meta_group`: openraft over that
//! log and those links, with the server's `MetaState` as its state
//! machine), the node's part in it (`node`), formation (`formation`), and
//! [`RaftMetaLog`], the server's `MetaLog` that commits through the group.
//! A node started with [`start`] hands that log to `server::start_with`;
//! every node then applies every metadata command and projects it.
//!
//! `joining` is `join_cluster`: a node records the cluster it joins and
//! restarts into it.
//!
//! `group_log` is any group's log on the WAL, `group_net` any group's Raft
//! RPCs over the links (and `QueueGroups`, where a node serves its queue
//! groups' RPCs); `queue_group` is a replicated queue's group (not yet
//! started by the node for a declared queue).
//!
//! `handover` moves a group's leadership away from a node that stops.
//!
//! Module order (each imports only those before it): `identity`, `gossip`,
//! `raft_wal` <- `group_log` <- `queue_group`, `meta_group` <- `proposals`,
//! `rpc` <- `link` <- `handover`, `group_net` <- `replica` <- `node` <-
//! `formation`, `joining` <- `lib`.

mod formation;
pub mod gossip;
pub mod group_log;
pub mod group_net;
pub mod handover;
pub mod identity;
pub mod joining;
pub mod link;
pub mod meta_group;
pub mod node;
pub mod proposals;
pub mod queue_group;
pub mod raft_wal;
pub mod replica;
pub mod rpc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use server::meta::{Applied, Commit, MetaCommand, MetaError, MetaLog, MetaProjection, MetaState};

pub use identity::{Identity, NodeInfo};
pub use joining::Joiner;
pub use node::ClusterNode;

/// The default inter-node port (RabbitMQ's).
pub const DEFAULT_CLUSTER_PORT: u16 = 25672;

/// How long a member must be unreachable (no link, and gossip does not
/// hear it through others) before the metadata leader drops its transient
/// and exclusive queues for every node, as RabbitMQ does when a node goes
/// down. The node itself drops them on applying the command when it comes
/// back.
pub const NODE_DOWN_GRACE: Duration = Duration::from_secs(10);

/// How a node takes part in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// Stable node name, `name@host`; `host` is where peers reach it.
    pub node_name: String,
    /// The cluster's name (nodes of another name are refused).
    pub cluster_name: String,
    /// Where the cluster port listens.
    pub bind: SocketAddr,
    /// The address peers dial (`host:port`); by default the node name's
    /// host and the cluster port.
    pub advertise: Option<String>,
    /// Static seed nodes' cluster addresses (`host:port`).
    pub peers: Vec<String>,
    /// Names whose every A/AAAA record is a seed (on the cluster port).
    pub peer_dns: Vec<String>,
    /// The shared secret.
    pub secret: Arc<[u8]>,
    /// The data directory (identity and Raft log live under it).
    pub data_dir: PathBuf,
    /// This node's AMQP address, as clients reach it (for listings).
    pub amqp_addr: String,
    /// Created when the cluster first forms: the default user and password.
    pub default_user: (String, String),
    /// Mutual TLS on every link (`--cluster-tls-*`), or none.
    pub tls: Option<link::LinkTls>,
}

/// Errors starting the cluster side of a node.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The settings are unusable.
    #[error("cluster settings: {0}")]
    Settings(String),
    /// The data directory's cluster state cannot be used.
    #[error("cluster state in the data directory: {0}")]
    State(String),
    /// The cluster port cannot be bound.
    #[error("cannot listen on the cluster port {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Raft could not start.
    #[error("metadata Raft group: {0}")]
    Raft(String),
}

/// A started cluster node.
#[derive(Debug)]
pub struct ClusterHandle {
    /// The node.
    pub node: Arc<ClusterNode>,
    /// Where the cluster port listens.
    pub cluster_addr: SocketAddr,
    wal: raft_wal::RaftWal,
    handler: Arc<node::Handler>,
    gossip: Arc<gossip::Gossip>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    projection: Arc<ClusterProjection>,
}

impl ClusterHandle {
    /// What the server takes from the cluster: the metadata log for this
    /// node and the way to queues on other nodes.
    pub fn parts(&self) -> server::ClusterParts {
        server::ClusterParts {
            meta: Box::new(RaftMetaLog {
                node: self.node.clone(),
                projection: self.projection.clone(),
            }),
            peers: Arc::new(node::ClusterPeers {
                node: self.node.clone(),
            }),
        }
    }

    /// Hands the started broker to the cluster side: peers' requests for
    /// queues homed here reach it from now on.
    pub fn serve(&self, broker: &Arc<server::broker::Broker>) {
        let _ = self.handler.broker.set(Arc::downgrade(broker));
        self.node.replicas.set_broker(Arc::downgrade(broker));
    }

    /// Stops Raft, the links and formation; the log is flushed.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        // Leaders first hand over: the others need not wait out an
        // election timeout (RabbitMQ transfers quorum queue leadership
        // on shutdown too).
        self.node.replicas.hand_over_all().await;
        self.node.hand_over_metadata().await;
        self.node.replicas.shutdown().await;
        let _ = self.node.raft.shutdown().await;
        self.node.links.shutdown();
        if let Ok(g) = Arc::try_unwrap(self.gossip) {
            g.shutdown().await;
        }
        self.wal.close();
    }
}

/// The node's advertised cluster address.
fn advertised(settings: &ClusterSettings, port: u16) -> Result<String, ClusterError> {
    if let Some(a) = &settings.advertise {
        return Ok(a.clone());
    }
    let host = settings
        .node_name
        .split_once('@')
        .map(|(_, h)| h)
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            ClusterError::Settings(format!(
                "node name '{}' has no host part (name@host): peers need it to reach this node",
                settings.node_name
            ))
        })?;
    Ok(if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// Starts this node's cluster side: opens its identity and Raft log, binds
/// the cluster port, starts the metadata group and formation. Metadata
/// commits can be made once the cluster has formed (they wait until then).
///
/// A join recorded by `join_cluster` ([`joining`]) is carried out first:
/// the node's Raft state is wiped once, and the recorded seeds replace the
/// configured ones.
pub async fn start(mut settings: ClusterSettings) -> Result<ClusterHandle, ClusterError> {
    if settings.secret.is_empty() {
        return Err(ClusterError::Settings(
            "the cluster secret is empty (--cluster-secret-file)".into(),
        ));
    }
    if joining::apply_pending_reset(&settings.data_dir).map_err(ClusterError::State)? {
        tracing::warn!(
            "join_cluster: this node's Raft state and id were reset; it joins as a new member"
        );
    }
    if let Some(seeds) = joining::stored_seeds(&settings.data_dir).map_err(ClusterError::State)? {
        if seeds != settings.peers || !settings.peer_dns.is_empty() {
            tracing::info!(
                ?seeds,
                "seeds recorded by join_cluster replace the configured ones"
            );
        }
        settings.peers = seeds;
        settings.peer_dns.clear();
    }
    let identity = Identity::load_or_create(&settings.data_dir, &settings.node_name)
        .map_err(ClusterError::State)?;
    let listener = tokio::net::TcpListener::bind(settings.bind)
        .await
        .map_err(|source| ClusterError::Listen {
            addr: settings.bind,
            source,
        })?;
    let cluster_addr = listener
        .local_addr()
        .map_err(|source| ClusterError::Listen {
            addr: settings.bind,
            source,
        })?;
    let me = NodeInfo {
        id: identity.id,
        name: identity.name.clone(),
        cluster_addr: advertised(&settings, cluster_addr.port())?,
        amqp_addr: settings.amqp_addr.clone(),
    };
    let gossip = Arc::new(start_gossip(&settings, &me, cluster_addr).await?);
    let raft_dir = settings.data_dir.join("raft");
    let (wal, opened) = raft_wal::RaftWal::open(&raft_dir).map_err(|e| {
        ClusterError::State(if e.kind() == std::io::ErrorKind::InvalidData {
            // This node's votes and log cannot be trusted: the others
            // rebuild it, as a new member.
            format!(
                "{e}. To rebuild this node from the others: on another node run `warrenctl forget_cluster_node {}`, then move {} and {} aside and start this node again; it joins as a new member",
                identity.name,
                raft_dir.display(),
                settings.data_dir.join("cluster").display()
            )
        } else {
            e.to_string()
        })
    })?;
    if opened.torn_tail > 0 {
        tracing::warn!(
            octets = opened.torn_tail,
            "the Raft log ended in a write torn by a crash; cut"
        );
    }
    let machine = meta_group::MetaMachine::open(&raft_dir).map_err(ClusterError::State)?;
    let links = link::Links::new(
        me.clone(),
        settings.cluster_name.clone(),
        settings.secret.clone(),
    );
    let handler = Arc::new(node::Handler {
        node: std::sync::OnceLock::new(),
        machine: machine.clone(),
        broker: std::sync::OnceLock::new(),
        me: std::sync::OnceLock::new(),
        outstanding: parking_lot::Mutex::default(),
        in_burst: parking_lot::Mutex::default(),
        queue_groups: Arc::default(),
        consumers: parking_lot::Mutex::default(),
    });
    let _ = handler.me.set(Arc::downgrade(&handler));
    links.set_handler(handler.clone());
    if let Some(tls) = &settings.tls {
        links.set_tls(tls.clone());
    }
    let config = openraft::Config {
        cluster_name: settings.cluster_name.clone(),
        heartbeat_interval: 150,
        election_timeout_min: 600,
        election_timeout_max: 1200,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(5_000),
        max_in_snapshot_log_to_keep: 1_000,
        ..Default::default()
    }
    .validate()
    .map_err(|e| ClusterError::Raft(e.to_string()))?;
    let raft = openraft::Raft::new(
        identity.id,
        Arc::new(config),
        group_net::GroupNetworkFactory::<meta_group::MetaTypes>::new(
            links.clone(),
            meta_group::META_GROUP,
        ),
        group_log::GroupLog::<meta_group::MetaTypes>::new(wal.clone(), meta_group::META_GROUP),
        machine.clone(),
    )
    .await
    .map_err(|e| ClusterError::Raft(e.to_string()))?;
    let replicas = replica::Replicas::new(
        me.clone(),
        links.clone(),
        wal.clone(),
        handler.queue_groups.clone(),
        raft_dir.join("queues"),
    );
    let node = Arc::new(ClusterNode::new(
        me.clone(),
        settings.cluster_name.clone(),
        links.clone(),
        raft,
        machine,
        gossip.view(),
        replicas.clone(),
    ));
    let host: Arc<dyn replica::ReplicaHost> = node.clone();
    replicas.set_host(Arc::downgrade(&host));
    let projection = Arc::new(ClusterProjection::default());
    let _ = projection.replicas.set(replicas);
    let _ = handler.node.set(Arc::downgrade(&node));
    let mut tasks = vec![tokio::spawn(links.clone().serve(listener))];
    tasks.push(tokio::spawn(gossip_rounds(
        gossip.clone(),
        node.clone(),
        handler.clone(),
    )));
    tasks.push(tokio::spawn(formation::run(node.clone(), settings)));
    tasks.push(tokio::spawn(ClusterNode::follow_leadership(
        Arc::downgrade(&node),
    )));
    tracing::info!(node = %me.name, id = me.id, cluster_addr = %me.cluster_addr, "cluster node started");
    Ok(ClusterHandle {
        node,
        cluster_addr,
        wal,
        handler,
        gossip,
        tasks,
        projection,
    })
}

/// Starts gossip on the cluster port's number, over UDP, with the same
/// seeds as formation (peer DNS names on this node's cluster port).
async fn start_gossip(
    settings: &ClusterSettings,
    me: &NodeInfo,
    cluster_addr: SocketAddr,
) -> Result<gossip::Gossip, ClusterError> {
    let advertise = match tokio::net::lookup_host(me.cluster_addr.as_str()).await {
        Ok(mut addrs) => addrs.next(),
        Err(_) => None,
    }
    .or((!cluster_addr.ip().is_unspecified()).then_some(cluster_addr))
    .ok_or_else(|| {
        ClusterError::Settings(format!(
            "cannot resolve this node's cluster address {} for gossip",
            me.cluster_addr
        ))
    })?;
    let seeds = settings
        .peers
        .iter()
        .cloned()
        .chain(
            settings
                .peer_dns
                .iter()
                .map(|n| format!("{n}:{}", cluster_addr.port())),
        )
        .collect();
    gossip::Gossip::start(gossip::GossipSettings {
        node_name: me.name.clone(),
        cluster_name: settings.cluster_name.clone(),
        bind: cluster_addr,
        advertise,
        seeds,
        secret: settings.secret.clone(),
        initial: vec![
            (gossip::keys::AMQP.into(), me.amqp_addr.clone()),
            (gossip::keys::CLUSTER.into(), me.cluster_addr.clone()),
            (
                gossip::keys::VERSION.into(),
                env!("CARGO_PKG_VERSION").into(),
            ),
        ],
    })
    .await
    .map_err(|e| ClusterError::Settings(format!("{e:#}")))
}

/// Every gossip interval: publishes this node's figures, the members it
/// has links to and those it is partitioned from (gossip deems them live,
/// yet this node cannot reach them), and refreshes the view. Every 2 s it
/// also tries a link to each member it has none to, so that "no link"
/// means "cannot reach".
async fn gossip_rounds(
    gossip: Arc<gossip::Gossip>,
    node: Arc<ClusterNode>,
    handler: Arc<node::Handler>,
) {
    let mut tick = tokio::time::interval(gossip::GOSSIP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let probing: Arc<parking_lot::Mutex<std::collections::HashSet<u64>>> = Arc::default();
    // Members unreachable since, and those whose transient queues this
    // node (as leader) dropped for this absence.
    let mut down_since: std::collections::HashMap<u64, std::time::Instant> = Default::default();
    let dropped: Arc<parking_lot::Mutex<std::collections::HashSet<u64>>> = Arc::default();
    let mut round: u64 = 0;
    loop {
        tick.tick().await;
        round += 1;
        let status = node.status();
        let others = status
            .voters
            .iter()
            .chain(&status.learners)
            .filter(|n| n.id != node.me.id);
        let view = node.gossip.read().clone();
        let (mut linked, mut partitions) = (vec![node.me.name.as_str()], Vec::new());
        for n in others {
            if node.running(n, &view) {
                down_since.remove(&n.id);
                dropped.lock().remove(&n.id);
            } else {
                let since = *down_since
                    .entry(n.id)
                    .or_insert_with(std::time::Instant::now);
                if since.elapsed() >= NODE_DOWN_GRACE
                    && node.is_leader()
                    && dropped.lock().insert(n.id)
                {
                    drop_transient_of(&node, n, &dropped);
                }
            }
            if node.links.is_connected(n.id) {
                linked.push(&n.name);
                continue;
            }
            if view.live.contains_key(&n.name) {
                partitions.push(n.name.as_str());
            }
            if round % 8 == 0 && probing.lock().insert(n.id) {
                let (links, probing, n) = (node.links.clone(), probing.clone(), n.clone());
                tokio::spawn(async move {
                    let probe = links
                        .request(
                            Some(n.id),
                            &n.cluster_addr,
                            &rpc::Request::Status,
                            Duration::from_secs(2),
                        )
                        .await;
                    if let Err(e) = probe {
                        tracing::debug!(peer = %n.name, error = %e, "cluster link probe");
                    }
                    probing.lock().remove(&n.id);
                });
            }
        }
        let mut keys = vec![
            (gossip::keys::SEES, linked.join(",")),
            (gossip::keys::PARTITIONS, partitions.join(",")),
        ];
        // Figures every second (reading /proc costs a little: on the
        // blocking pool).
        if round % 4 == 1 {
            if let Some(b) = handler.broker.get().and_then(Weak::upgrade) {
                let stats =
                    tokio::task::spawn_blocking(move || serde_json::to_string(&b.node_stats()));
                if let Ok(Ok(stats)) = stats.await {
                    keys.push((gossip::keys::STATS, stats));
                }
            }
        }
        gossip.publish_and_refresh(&keys).await;
    }
}

/// Commits (as the metadata leader) that the transient and exclusive queues
/// of member `n`, down for [`NODE_DOWN_GRACE`], are gone; tried again on a
/// later round if the commit fails.
fn drop_transient_of(
    node: &Arc<ClusterNode>,
    n: &NodeInfo,
    dropped: &Arc<parking_lot::Mutex<std::collections::HashSet<u64>>>,
) {
    let command = MetaCommand::DropTransient {
        home: n.name.clone(),
        before: u64::MAX,
    };
    let request = meta_group::MetaRequest::Command(command.to_wire());
    let (node, dropped, n) = (node.clone(), dropped.clone(), n.clone());
    tokio::spawn(async move {
        let outcome = node.commit(request).await.and_then(|r| match r.result {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(MetaError::from(e)),
            None => Err(MetaError::Unavailable("no outcome".into())),
        });
        match outcome {
            Ok(()) => {
                tracing::info!(node = %n.name, "node down: its transient and exclusive queues are dropped")
            }
            Err(e) => {
                tracing::warn!(node = %n.name, error = %e, "node down: cannot drop its transient queues yet");
                dropped.lock().remove(&n.id);
            }
        }
    });
}

/// The server's [`MetaLog`] in a cluster: commands are committed through
/// the metadata Raft group and applied on every node.
#[derive(Debug)]
pub struct RaftMetaLog {
    node: Arc<ClusterNode>,
    projection: Arc<ClusterProjection>,
}

/// What a committed metadata command changes on this node: the server's
/// runtime views (its projection), then the replicated queues (a declared
/// one's replica starts on its members, a deleted one's stops).
#[derive(Default)]
struct ClusterProjection {
    server: std::sync::OnceLock<Weak<dyn MetaProjection>>,
    replicas: std::sync::OnceLock<Arc<replica::Replicas>>,
}

impl std::fmt::Debug for ClusterProjection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterProjection").finish_non_exhaustive()
    }
}

impl ClusterProjection {
    fn replicated(&self, command: &MetaCommand, at_start: bool) {
        let Some(replicas) = self.replicas.get() else {
            return;
        };
        match command {
            MetaCommand::DeclareQueue { vhost, queue } => replicas.declared(vhost, queue, at_start),
            MetaCommand::DeleteQueue { vhost, name } => replicas.deleted(vhost, name),
            MetaCommand::DeleteVhost { name } => replicas.vhost_deleted(name),
            _ => {}
        }
    }

    /// Sets the server's projection on `node`'s machine behind this one;
    /// the state as of then (its replicated queues known from now on).
    fn attach(self: &Arc<Self>, node: &ClusterNode, server: Weak<dyn MetaProjection>) -> MetaState {
        let _ = self.server.set(server);
        let me: Arc<dyn MetaProjection> = self.clone();
        let state = node.machine.attach(Arc::downgrade(&me));
        for d in state.definitions() {
            if let Ok(command) = MetaCommand::from_definition(d.kind, &d.key, &d.record) {
                self.replicated(&command, true);
            }
        }
        state
    }
}

impl MetaProjection for ClusterProjection {
    fn project(&self, command: &MetaCommand) {
        // A replicated queue is known to `Replicas` before the vhost routes
        // to it: a publish routed there in between would be sent to a home
        // node as a classic queue's, and refused (a nack).
        let declared = matches!(command, MetaCommand::DeclareQueue { .. });
        if declared {
            self.replicated(command, false);
        }
        if let Some(p) = self.server.get().and_then(Weak::upgrade) {
            p.project(command);
        }
        if !declared {
            self.replicated(command, false);
        }
    }
}

impl MetaLog for RaftMetaLog {
    fn commit(&self, command: MetaCommand) -> Commit<'_> {
        let request = meta_group::MetaRequest::Command(command.to_wire());
        Box::pin(async move {
            let response = self.node.commit(request).await?;
            match response.result {
                Some(Ok(changed_existence)) => {
                    tracing::debug!(command = %command.describe(), "metadata committed (cluster)");
                    Ok(Applied {
                        changed_existence,
                        ..Applied::default()
                    })
                }
                Some(Err(e)) => Err(MetaError::from(e)),
                None => Err(MetaError::Unavailable(
                    "the metadata log gave no outcome".into(),
                )),
            }
        })
    }

    fn set_projection(&self, projection: Weak<dyn MetaProjection>) {
        let _ = self.projection.attach(&self.node, projection);
    }

    fn attach(&self, projection: Weak<dyn MetaProjection>) -> Option<MetaState> {
        Some(self.projection.attach(&self.node, projection))
    }
}

/// How long formation waits between rounds.
pub(crate) const FORMATION_ROUND: Duration = Duration::from_millis(500);
