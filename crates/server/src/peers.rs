//! [`Peers`]: what a node needs from its cluster to reach queues that live
//! on other nodes — today, enqueueing a published message into a queue on
//! its home node. The `cluster` crate implements it over its links; a node
//! alone has none (`Node::peers` unset) and every queue is local.
//!
//! [`RemoteQueue`]: a queue the metadata says lives on another node, as a
//! vhost's router knows it (by name and id) so that publishes route to it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use amqp_codec::{FieldTable, ShortStr};
use bytes::Bytes;

/// A message to enqueue on another node.
#[derive(Debug, Clone)]
pub struct RemotePublish {
    /// Vhost.
    pub vhost: String,
    /// Queue name.
    pub queue: ShortStr,
    /// Exchange it was published to.
    pub exchange: ShortStr,
    /// Its routing key.
    pub routing_key: ShortStr,
    /// The content header, encoded as on the wire.
    pub header: Bytes,
    /// The body.
    pub body: Bytes,
}

/// What the home node did with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteEnqueued {
    /// Refused (`x-overflow` reject-publish): nack it.
    pub refused: bool,
}

/// The answer to a remote enqueue, once the home node has the message
/// (durably, if it is persistent and the queue durable).
pub type RemoteOutcome = Pin<Box<dyn Future<Output = Result<RemoteEnqueued, String>> + Send>>;

/// A remote enqueue in flight.
pub struct Pending(pub RemoteOutcome);

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pending")
    }
}

/// A message taken from a queue on another node (`basic.get`).
#[derive(Debug, Clone)]
pub struct RemoteDelivery {
    /// Its place in its queue (what settling it names there).
    pub seq: u64,
    /// Delivered before.
    pub redelivered: bool,
    /// Times it was returned before (`x-delivery-count`).
    pub delivery_count: u32,
    /// Messages left in the queue.
    pub remaining: u32,
    /// Exchange it was published to.
    pub exchange: ShortStr,
    /// Its routing key.
    pub routing_key: ShortStr,
    /// The content header, encoded as on the wire.
    pub header: Bytes,
    /// The body.
    pub body: Bytes,
}

/// A queue's ready messages and consumers on its home node (`None`: it has
/// no such queue), or why the home node could not be asked.
pub type RemoteCounts = Pin<Box<dyn Future<Output = Result<Option<(u32, u32)>, String>> + Send>>;

/// Why the home node did not do it: the AMQP reply code it answered with
/// (`0`: it could not be asked) and the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Reply code; 0 when the home node could not be reached.
    pub code: u16,
    /// Reply text (or why it could not be reached).
    pub text: String,
}

/// The answer to a remote `queue.purge` or `queue.delete`: the messages it
/// removed, or why not.
pub type RemoteCount = Pin<Box<dyn Future<Output = Result<u32, Refusal>> + Send>>;

/// What a node lists of its own for another's management API (each as its
/// `/api/...` lists it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Listing {
    /// `/api/queues`.
    Queues,
    /// `/api/connections`.
    Connections,
    /// `/api/channels`.
    Channels,
    /// `/api/consumers`.
    Consumers,
}

/// A queue to declare on another node (`queue-leader-locator`).
#[derive(Debug, Clone)]
pub struct RemoteDeclare {
    /// Vhost.
    pub vhost: String,
    /// Queue name.
    pub queue: ShortStr,
    /// Survives restarts.
    pub durable: bool,
    /// Deleted with its last consumer.
    pub auto_delete: bool,
    /// Declare arguments as given.
    pub arguments: FieldTable,
}

/// The answer to a remote declare: the queue's id and its ready-message and
/// consumer counts (0 and 0 unless it existed), or why not.
pub type RemoteDeclared = Pin<Box<dyn Future<Output = Result<(u64, u32, u32), Refusal>> + Send>>;

/// Node `n`'s own queues as `/api/queues` lists them: a JSON array (text).
pub type RemoteListing = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// Whether node `n` had the connection it was asked to close.
pub type RemoteClose = Pin<Box<dyn Future<Output = Result<bool, String>> + Send>>;

/// The answer to a remote `basic.get`: a message, or none (empty queue).
pub type RemoteGet = Pin<Box<dyn Future<Output = Result<Option<RemoteDelivery>, String>> + Send>>;

/// A consumer to start on a queue on another node.
#[derive(Debug, Clone)]
pub struct RemoteConsume {
    /// Vhost.
    pub vhost: String,
    /// Queue.
    pub queue: ShortStr,
    /// Per-consumer prefetch on the home node (0 = none).
    pub prefetch: u16,
    /// `exclusive` flag.
    pub exclusive: bool,
    /// `x-priority`.
    pub priority: i32,
    /// `x-cancel-on-ha-failover`: told `basic.cancel` when a replicated
    /// queue's leader changes.
    pub cancel_on_failover: bool,
    /// Who consumes, for the home node's `/api/consumers`.
    pub client: RemoteClient,
}

/// A consumer on another node as the management API describes it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RemoteClient {
    /// Its consumer tag.
    pub tag: String,
    /// Its connection's name.
    pub connection_name: String,
    /// Its channel's number.
    pub channel: u16,
    /// Its client's address.
    pub peer: String,
    /// Its connection's user.
    pub user: String,
}

/// Where a remote consumer's deliveries arrive, on the consuming node.
pub trait RemoteSink: Send + Sync {
    /// One delivery (always to be settled: a no-ack consumer's sink acks
    /// it itself once written).
    fn deliver(&self, delivery: RemoteDelivery);
    /// The deliveries that arrived together (one read of the link) have all
    /// been handed over. Whoever calls [`deliver`](Self::deliver) calls
    /// this after a burst's last delivery: a no-ack consumer's sink sends
    /// its acknowledgements now if enough are held, else soon.
    fn end_of_burst(&self);
    /// Sends at once whatever settlements the sink holds back. Called just
    /// before its consumer's cancel goes to the home node, so that none is
    /// left behind (the home would otherwise keep those deliveries
    /// unacknowledged, and requeue them when the link goes).
    fn settle_held(&self) {}
    /// The home node cancelled the consumer (its queue is gone).
    fn cancelled(&self);
}

/// The answer to a remote `basic.consume`: the consumer's key on the link.
pub type RemoteConsumeOk = Pin<Box<dyn Future<Output = Result<u64, String>> + Send>>;

/// A member of the cluster, as this node sees it.
#[derive(Debug, Clone)]
pub struct Member {
    /// Node name.
    pub name: String,
    /// Its AMQP address.
    pub amqp_addr: String,
    /// Its cluster address.
    pub cluster_addr: String,
    /// Reachable from here (always, for this node itself).
    pub running: bool,
    /// A voting member of the metadata group.
    pub voter: bool,
    /// The metadata leader.
    pub leader: bool,
    /// Its figures as it last gossiped them (this node's own: now).
    pub stats: Option<NodeStats>,
    /// Running nodes it cannot reach (RabbitMQ's `partitions`), as it last
    /// gossiped them.
    pub partitions: Vec<String>,
}

/// A node's figures for `/api/nodes`, under RabbitMQ's field names; also
/// what each node gossips about itself.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeStats {
    /// Resident memory, octets.
    pub mem_used: u64,
    /// The memory high watermark, octets.
    pub mem_limit: u64,
    /// The memory alarm is raised.
    pub mem_alarm: bool,
    /// The free disk limit, octets.
    pub disk_free_limit: u64,
    /// The disk alarm is raised.
    pub disk_free_alarm: bool,
    /// Free space on the data directory's disk, octets (last sample).
    #[serde(default)]
    pub disk_free: u64,
    /// Open file descriptors.
    pub fd_used: u64,
    /// The file descriptor limit (soft).
    pub fd_total: u64,
    /// Open client connections.
    pub sockets_used: u64,
    /// The client connection limit: RabbitMQ's, 90% of the descriptor
    /// limit (the rest is for files).
    #[serde(default)]
    pub sockets_total: u64,
    /// Tasks alive on the runtime (RabbitMQ: Erlang processes).
    #[serde(default)]
    pub proc_used: u64,
    /// RabbitMQ's process limit; Warren has none but memory (Erlang's
    /// default, 1,048,576, for tools that compute a ratio).
    #[serde(default)]
    pub proc_total: u64,
    /// Cores.
    pub processors: u64,
    /// Milliseconds since the broker started.
    pub uptime: u64,
    /// Tasks waiting in the runtime's global queue (RabbitMQ: the Erlang
    /// schedulers' run queue).
    #[serde(default)]
    pub run_queue: u64,
    /// The process's context switches so far, all threads (voluntary and
    /// not).
    #[serde(default)]
    pub context_switches: u64,
    /// How the gauges above moved over the last sampling period (RabbitMQ's
    /// `{name}_details`).
    #[serde(default)]
    pub gauge_rates: GaugeRates,
    /// The store's I/O counters and their rates.
    #[serde(default)]
    pub io: IoStats,
}

/// A node's store I/O counters (`crate::metrics::IO_COUNTERS`'s order)
/// and their rates over the last sampling period.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IoStats {
    /// The counts.
    pub counts: [u64; 12],
    /// Their change per second.
    pub rates: [f64; 12],
}

impl NodeStats {
    /// The figures RabbitMQ gives rates of, in [`GaugeRates`]'s order.
    pub fn gauges(&self) -> [u64; 6] {
        [
            self.mem_used,
            self.disk_free,
            self.fd_used,
            self.sockets_used,
            self.proc_used,
            self.context_switches,
        ]
    }
}

/// How a node's figures changed per second over the last sampling period
/// (5 s).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GaugeRates {
    /// Of `mem_used`.
    pub mem_used: f64,
    /// Of `disk_free`.
    pub disk_free: f64,
    /// Of `fd_used`.
    pub fd_used: f64,
    /// Of `sockets_used`.
    pub sockets_used: f64,
    /// Of `proc_used`.
    pub proc_used: f64,
    /// Of `context_switches`.
    pub context_switches: f64,
}

impl From<[f64; 6]> for GaugeRates {
    fn from(
        [
            mem_used,
            disk_free,
            fd_used,
            sockets_used,
            proc_used,
            context_switches,
        ]: [f64; 6],
    ) -> Self {
        GaugeRates {
            mem_used,
            disk_free,
            fd_used,
            sockets_used,
            proc_used,
            context_switches,
        }
    }
}

/// A replicated queue's group and counts, as one of its members sees them
/// (RabbitMQ's quorum-queue fields of `/api/queues`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaStatus {
    /// The node leading its group, if one does.
    pub leader: Option<String>,
    /// The nodes holding its replicas.
    pub members: Vec<String>,
    /// The members running, as the answering member sees them.
    pub online: Vec<String>,
    /// Ready messages.
    pub ready: u64,
    /// Delivered, not yet settled.
    pub unacked: u64,
    /// Consumers taking messages.
    pub consumers: u64,
}

/// One member of a replicated queue's Raft group as its own node reports
/// it: a row of `rabbitmq-queues quorum_status` (RabbitMQ 3.10's columns).
/// A member whose node does not answer, or that runs no replica, is
/// `noproc` with no indexes, as RabbitMQ shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuorumMember {
    /// The member's node.
    pub node: String,
    /// `leader`, `follower`, `candidate`, `learner` (a member still
    /// catching up, not yet voting) or `noproc`.
    pub raft_state: String,
    /// The last entry in its log (`None` with `noproc`).
    pub log_index: Option<u64>,
    /// The last entry it knows committed.
    pub commit_index: Option<u64>,
    /// The last entry its snapshot covers.
    pub snapshot_index: Option<u64>,
    /// Its Raft term.
    pub term: Option<u64>,
    /// The version of the queue's state machine it runs.
    pub machine_version: Option<u64>,
}

impl QuorumMember {
    /// The row of a member that did not answer.
    pub fn noproc(node: &str) -> QuorumMember {
        QuorumMember {
            node: node.to_owned(),
            raft_state: "noproc".to_owned(),
            ..QuorumMember::default()
        }
    }
}

/// This node's replica of one replicated queue, for Prometheus (RabbitMQ's
/// `ra_metrics` family: `rabbitmq_raft_*`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RaftMetrics {
    /// The queue's vhost.
    pub vhost: String,
    /// The queue.
    pub queue: String,
    /// Its Raft term (`rabbitmq_raft_term_total`).
    pub term: u64,
    /// The last entry its snapshot covers.
    pub snapshot_index: u64,
    /// The last entry applied to its state.
    pub last_applied: u64,
    /// The last entry it knows committed.
    pub commit_index: u64,
    /// The last entry in its log (`rabbitmq_raft_log_last_written_index`).
    pub last_written: u64,
    /// From an entry's proposal to its application here, for the last
    /// entry applied (`rabbitmq_raft_entry_commit_latency_seconds`).
    pub commit_latency_seconds: f64,
}

/// The answer to [`Peers::quorum_status`]: a row per member.
pub type RemoteQuorumStatus =
    Pin<Box<dyn Future<Output = Result<Vec<QuorumMember>, String>> + Send>>;

/// Done, or why not.
pub type RemoteDone = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// The answer to [`Peers::replica_status`].
pub type RemoteReplicaStatus = Pin<Box<dyn Future<Output = Result<ReplicaStatus, String>> + Send>>;

/// Reaches queues on other nodes, and tells the management API about the
/// cluster.
pub trait Peers: Send + Sync + std::fmt::Debug {
    /// The cluster's name.
    fn cluster_name(&self) -> String;

    /// Every member of the cluster, this node included.
    fn members(&self) -> Vec<Member>;

    /// Removes node `name` from the cluster for good (`forget_cluster_node`).
    fn forget(
        &self,
        name: &str,
    ) -> Pin<Box<dyn Future<Output = Result<(), crate::meta::MetaError>> + Send>>;

    /// Sends `publish` to node `home` now (messages sent to one node arrive
    /// in the order of these calls); the outcome resolves later.
    fn enqueue(&self, home: &str, publish: RemotePublish) -> RemoteOutcome;

    /// Takes one message from queue `queue` of `vhost` on node `home`; with
    /// `ack`, it stays unacknowledged there until settled (and is returned
    /// to the queue if this node goes away first).
    fn get(&self, home: &str, vhost: &str, queue: &ShortStr, ack: bool) -> RemoteGet;

    /// The gate raised while too many messages for node `home` are in
    /// flight: publishers routing there pause until it is lowered.
    fn flow(&self, home: &str) -> Option<std::sync::Arc<queue_store::FlowGate>>;

    /// What node `node` holds of `what` (its queues, connections, channels
    /// or consumers), as its management API lists them.
    fn list_on(&self, node: &str, what: Listing) -> RemoteListing;

    /// Closes connection `name` on node `node` with 320 CONNECTION_FORCED
    /// and `reason` (the management API's `DELETE /api/connections/{name}`).
    fn close_connection(&self, node: &str, name: &str, reason: &str) -> RemoteClose;

    /// Purges queue `queue` on node `home`.
    fn purge(&self, home: &str, vhost: &str, queue: &ShortStr) -> RemoteCount;

    /// Proposes `args`, the arguments in effect, to replicated queue `queue`
    /// of `vhost` (a policy changed, or it was just declared): its log
    /// orders them with everything else, so every replica applies them at
    /// the same point. Answered once committed (so its group has a leader).
    fn propose_replica_args(
        &self,
        vhost: &str,
        queue: &ShortStr,
        args: queue_store::QueueArgs,
    ) -> RemoteDone;

    /// [`Self::propose_replica_args`] in the background; a failure is
    /// logged.
    fn set_replica_args(&self, vhost: &str, queue: &ShortStr, args: queue_store::QueueArgs) {
        let done = self.propose_replica_args(vhost, queue, args);
        let (vhost, queue) = (vhost.to_owned(), queue.clone());
        tokio::spawn(async move {
            match done.await {
                Ok(()) => {
                    tracing::debug!(%vhost, %queue, "replicated queue has the arguments in effect")
                }
                Err(error) => {
                    tracing::warn!(%vhost, %queue, %error, "cannot give a replicated queue the arguments its policy sets")
                }
            }
        });
    }

    /// Deletes queue `queue` on node `home` (which checks `if_unused` and
    /// `if_empty` there, and commits the deletion for every node).
    fn delete(
        &self,
        home: &str,
        vhost: &str,
        queue: &ShortStr,
        if_unused: bool,
        if_empty: bool,
    ) -> RemoteCount;

    /// Declares a queue on node `home` (which commits it for every node),
    /// or checks that the one there is equivalent.
    fn declare(&self, home: &str, declare: RemoteDeclare) -> RemoteDeclared;

    /// Queue `queue`'s counts on node `home` (`queue.declare`).
    fn counts(&self, home: &str, vhost: &str, queue: &ShortStr) -> RemoteCounts;

    /// Settles deliveries of queue `queue` (id `queue_id`, which tells a
    /// replicated queue from the classic one it took over) on node `home`
    /// (in order with this node's other requests to it; not waited for).
    fn settle(
        &self,
        home: &str,
        vhost: &str,
        queue: &ShortStr,
        queue_id: u64,
        seqs: Vec<u64>,
        how: crate::queue::Settle,
    );

    /// Starts a consumer on node `home`; its deliveries go to `sink`.
    fn consume(
        &self,
        home: &str,
        consume: RemoteConsume,
        sink: std::sync::Arc<dyn RemoteSink>,
    ) -> RemoteConsumeOk;

    /// Cancels the consumer `key` on node `home` (its unsettled deliveries
    /// stay until settled).
    fn cancel(&self, home: &str, key: u64);

    /// Replicated queue `queue`'s group and counts, from one of its members.
    fn replica_status(&self, vhost: &str, queue: &ShortStr) -> RemoteReplicaStatus;

    /// Every member of replicated queue `queue`'s group, each as its node
    /// reports it (`rabbitmq-queues quorum_status`): how far each replica's
    /// log is behind the leader's.
    fn quorum_status(&self, vhost: &str, queue: &ShortStr) -> RemoteQuorumStatus;

    /// This node's replicas of replicated queues, their Raft figures.
    fn raft_metrics(&self) -> Vec<RaftMetrics>;

    /// Adds node `node` to replicated queue `queue`'s members (`add`; its
    /// replica catches up, then votes), or removes it
    /// (`rabbitmq-queues add_member` / `delete_member`).
    fn change_members(
        &self,
        vhost: &str,
        queue: &ShortStr,
        node: &str,
        add: bool,
    ) -> Pin<Box<dyn Future<Output = Result<(), Refusal>> + Send>>;
}

/// The node a `join_cluster` reached, and its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTarget {
    /// The node asked (its name).
    pub node: String,
    /// Its cluster's name.
    pub cluster: String,
}

/// Makes this node a member of another node's cluster
/// (`rabbitmqctl join_cluster`). The `cluster` crate implements it: it
/// checks that the target belongs to a formed cluster this node may join
/// and records the join in the data directory; the node then restarts
/// (`Node::request_restart`), leaves whatever cluster it was
/// in and joins the target's with none of its own definitions, as
/// RabbitMQ's `join_cluster` resets a node first.
pub trait ClusterJoin: Send + Sync + std::fmt::Debug {
    /// Checks `target` (`host:port` or a node name `name@host`, on the
    /// default cluster port) and records the join.
    fn join(
        &self,
        target: &str,
    ) -> Pin<Box<dyn Future<Output = Result<JoinTarget, String>> + Send + '_>>;
}

/// A queue that lives on another node.
#[derive(Debug, Clone)]
pub struct RemoteQueue {
    /// Its id in this vhost's router (unique in the cluster).
    pub id: u64,
    /// Name.
    pub name: ShortStr,
    /// The node it lives on.
    pub home: String,
    /// Survives its home node's restart.
    pub durable: bool,
    /// Owned by a connection on its home node: others may publish to it,
    /// nothing else (RabbitMQ's 405).
    pub exclusive: bool,
    /// Deleted with its last consumer.
    pub auto_delete: bool,
    /// Declare arguments as given (what a redeclare is compared with).
    pub arguments: Arc<FieldTable>,
    /// A replicated (quorum) queue's members (empty for a queue homed on
    /// one node): the [`Peers`] reach it through its group's leader,
    /// wherever that is, and `home` is only where its group started.
    pub members: Vec<String>,
}

impl RemoteQueue {
    /// Whether it is replicated (a quorum queue in a cluster).
    pub fn replicated(&self) -> bool {
        !self.members.is_empty()
    }

    /// RabbitMQ's 404 for a durable queue whose home node cannot be
    /// reached; `cause` (what the link said) is logged, not sent.
    pub fn home_down(&self, vhost: &str, operation: &str, cause: &str) -> crate::error::AmqpError {
        tracing::debug!(queue = %self.name, home = %self.home, operation, error = %cause, "home node unreachable");
        crate::error::AmqpError::not_found(format!(
            "home node '{}' of durable queue '{}' in vhost '{vhost}' is down or inaccessible",
            self.home, self.name
        ))
    }

    /// What its home answered to a purge or delete, as a client is told
    /// it: the count, the home's own refusal, or [`Self::home_down`].
    pub fn answered(
        &self,
        done: Result<u32, Refusal>,
        vhost: &str,
    ) -> Result<u32, crate::error::AmqpError> {
        match done {
            Ok(n) => Ok(n),
            Err(r) if r.code != 0 => Err(crate::error::AmqpError::channel(r.code, r.text)),
            Err(r) => Err(self.home_down(vhost, "purge or delete", &r.text)),
        }
    }
}
