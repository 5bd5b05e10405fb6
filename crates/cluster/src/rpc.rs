//! What nodes ask each other on the cluster links ([`Request`]) and what
//! they answer ([`Response`]): Raft's RPCs for a group (0 is the metadata
//! group, a replicated queue's is its id), metadata commits forwarded to
//! the leader, joins, and status.

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::identity::NodeInfo;
use crate::meta_group::{MetaRequest, MetaResponse, MetaTypes};
use crate::queue_group::QueueTypes;

/// A request from a peer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Raft: append entries (or heartbeat) to group `group`.
    Append {
        /// Raft group.
        group: u64,
        /// The RPC.
        rpc: AppendEntriesRequest<MetaTypes>,
    },
    /// Raft: append entries (or heartbeat) to replicated queue group `group`.
    QueueAppend {
        /// Raft group (the queue's id).
        group: u64,
        /// The RPC.
        rpc: AppendEntriesRequest<QueueTypes>,
    },
    /// Raft: a snapshot chunk for replicated queue group `group`.
    QueueSnapshot {
        /// Raft group (the queue's id).
        group: u64,
        /// The RPC.
        rpc: InstallSnapshotRequest<QueueTypes>,
    },
    /// Raft: a vote request in group `group` (any group).
    Vote {
        /// Raft group.
        group: u64,
        /// The RPC.
        rpc: VoteRequest<u64>,
    },
    /// Raft: a snapshot chunk for group `group`.
    Snapshot {
        /// Raft group.
        group: u64,
        /// The RPC.
        rpc: InstallSnapshotRequest<MetaTypes>,
    },
    /// Commit a metadata request (sent to the metadata leader).
    Commit(MetaRequest),
    /// Add this node to the cluster (sent to the metadata leader).
    Join(NodeInfo),
    /// Remove node `name` from the cluster for good (sent to the leader).
    Forget {
        /// Its name.
        name: String,
    },
    /// What the node knows of the cluster.
    Status,
    /// Enqueue a message into a queue homed on the receiving node.
    Enqueue(EnqueueRequest),
    /// The receiving node's own queues, connections, channels or
    /// consumers, as its management API lists them.
    List(server::peers::Listing),
    /// Close a client connection on the receiving node (320, `reason`).
    CloseConnection {
        /// Its name, as the management API lists it.
        name: String,
        /// The close text.
        reason: String,
    },
    /// Purge a queue homed on the receiving node.
    Purge {
        /// Vhost.
        vhost: String,
        /// Queue.
        queue: String,
    },
    /// Delete a queue homed on the receiving node (it checks the
    /// conditions and commits the deletion).
    DeleteQueue {
        /// Vhost.
        vhost: String,
        /// Queue.
        queue: String,
        /// Only if it has no consumers.
        if_unused: bool,
        /// Only if it has no messages.
        if_empty: bool,
    },
    /// Declare a queue on the receiving node (placed there by
    /// `queue-leader-locator`), or check the one there.
    DeclareQueue {
        /// Vhost.
        vhost: String,
        /// Queue.
        queue: String,
        /// Survives restarts.
        durable: bool,
        /// Deleted with its last consumer.
        auto_delete: bool,
        /// Declare arguments, encoded as an AMQP field table.
        arguments: Vec<u8>,
    },
    /// A queue's counts (`queue.declare` on another node).
    QueueInfo {
        /// Vhost.
        vhost: String,
        /// Queue.
        queue: String,
    },
    /// `basic.get` from a queue homed on the receiving node.
    Get {
        /// Vhost.
        vhost: String,
        /// Queue.
        queue: String,
        /// Kept unacknowledged until settled.
        ack: bool,
    },
    /// Start a consumer on a queue homed on the receiving node; its
    /// deliveries come back as `Deliver` under `key`.
    Consume {
        /// Vhost.
        vhost: String,
        /// Queue.
        queue: String,
        /// The consumer's key on this link (chosen by the consuming node).
        key: u64,
        /// Per-consumer prefetch (0 = none).
        prefetch: u16,
        /// `exclusive` flag.
        exclusive: bool,
        /// `x-priority`.
        priority: i32,
        /// Who consumes (for the management API).
        client: server::peers::RemoteClient,
    },
    /// Cancel the consumer `key` (one-way).
    Cancel {
        /// Its key.
        key: u64,
    },
    /// A delivery to the consumer `key` on the receiving node (one-way).
    Deliver {
        /// The consumer's key.
        key: u64,
        /// Vhost (to give it back if the consumer is gone).
        vhost: String,
        /// Queue.
        queue: String,
        /// The delivery.
        delivery: WireDelivery,
    },
    /// The home node cancelled the consumer `key` (one-way).
    ConsumerCancelled {
        /// Its key.
        key: u64,
    },
    /// Settle deliveries of a queue homed on the receiving node (one-way).
    Settle {
        /// Vhost.
        vhost: String,
        /// Queue.
        queue: String,
        /// Its id (0: whichever queue has the name now): a queue deleted
        /// and declared again, or a classic queue moving into the
        /// replicated one that took its name, is told apart by it.
        queue_id: u64,
        /// Their places in the queue.
        seqs: Vec<u64>,
        /// 0 ack, 1 requeue, 2 reject.
        how: u8,
    },
    /// An entry for replicated queue `group`'s log, to its leader (who
    /// answers once a majority has it on disk).
    QueuePropose {
        /// The queue's id.
        group: u64,
        /// The entry.
        request: crate::queue_group::QueueRequest,
    },
    /// A replicated queue's delivery to the consumer `key` on the
    /// receiving node, from its group's leader (one-way).
    QueueDeliver {
        /// The queue's id.
        group: u64,
        /// The consumer's key.
        key: u64,
        /// The delivery.
        delivery: WireDelivery,
    },
    /// To replicated queue `group`'s leader: add `node` to its voters (as
    /// a learner first), or remove it.
    QueueMembers {
        /// The queue's id.
        group: u64,
        /// The node.
        node: NodeInfo,
        /// Add (else remove).
        add: bool,
    },
    /// Replicated queue `group` has a new leader (one-way): the receiving
    /// node cancels its consumers that asked for `x-cancel-on-ha-failover`.
    QueueFailover {
        /// The queue's id.
        group: u64,
    },
    /// A replicated queue's group and counts, from a member's replica.
    QueueStatus {
        /// The queue's id.
        group: u64,
    },
    /// From the leader of group `group` (any group), which is stopping:
    /// stand for election now (`handover`). Answered `Settled` once the
    /// campaign has started.
    Elect {
        /// Raft group.
        group: u64,
    },
    /// This node's replica of replicated queue `group`, as a row of
    /// `quorum_status` (added last: earlier variants keep their wire tags).
    QueueRaftStatus {
        /// The queue's id.
        group: u64,
    },
}

/// A message taken by a peer's `basic.get`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireDelivery {
    /// Its place in its queue.
    pub seq: u64,
    /// Delivered before.
    pub redelivered: bool,
    /// `x-delivery-count`.
    pub delivery_count: u32,
    /// Messages left.
    pub remaining: u32,
    /// Exchange.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Content header as on the AMQP wire.
    pub header: bytes::Bytes,
    /// Body.
    pub body: bytes::Bytes,
}

/// A published message for a queue on the receiving node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnqueueRequest {
    /// Vhost.
    pub vhost: String,
    /// Queue.
    pub queue: String,
    /// Exchange it was published to.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Content header as on the AMQP wire.
    pub header: bytes::Bytes,
    /// Body.
    pub body: bytes::Bytes,
}

/// The answer to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    /// To `Append`.
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    /// To `Vote`.
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    /// To `Snapshot`.
    Snapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    /// To `Commit`: the outcome, and the log index it was applied at (the
    /// forwarding node waits until it applied that index itself).
    Committed {
        /// The outcome.
        outcome: MetaResponse,
        /// Its log index.
        index: u64,
    },
    /// To `Join`.
    Joined(Result<(), String>),
    /// To `Forget`: done, or why not (`NotFound:`-prefixed if no such node).
    Forgotten(Result<(), String>),
    /// To `Status`.
    Status(Status),
    /// To `List`: a JSON array (text), or why not.
    Listing(Result<String, String>),
    /// To `CloseConnection`: whether the node had it.
    ConnectionClosed(bool),
    /// To `Purge` and `DeleteQueue`: messages removed, or the reply code
    /// and text of the refusal.
    Count(Result<u32, (u16, String)>),
    /// To `DeclareQueue`: the queue's id, ready messages and consumers, or
    /// the reply code and text of the refusal.
    Declared(Result<(u64, u32, u32), (u16, String)>),
    /// To `QueueInfo`: ready messages and consumers; `None`: no such queue.
    QueueInfo(Option<(u32, u32)>),
    /// To `Get`: a message, none, or why not.
    Got(Result<Option<WireDelivery>, String>),
    /// To one-way requests (never sent).
    Settled,
    /// To `Consume`: started, or why not.
    Consumed(Result<(), String>),
    /// To `Enqueue`: queued (durably, if persistent), or refused by the
    /// queue (`x-overflow` reject-publish); `Err`: it could not be queued.
    Enqueued(Result<bool, String>),
    /// This node is not the leader; try this one (if known).
    NotLeader(Option<NodeInfo>),
    /// The request cannot be served now (no quorum, shutting down).
    Unavailable(String),
    /// The group named does not exist here.
    NoSuchGroup(u64),
    /// To `QueueStatus`: `None` if the node holds no replica of it.
    ReplicaStatus(Option<server::peers::ReplicaStatus>),
    /// To `QueuePropose`: the entry's answer once committed, or why not.
    QueueProposed(Result<crate::queue_group::QueueResponse, ProposeRefusal>),
    /// To `QueueRaftStatus`: `None` if the node runs no replica of it.
    QueueRaftStatus(Option<server::peers::QuorumMember>),
}

/// Why a replicated queue's entry was not committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProposeRefusal {
    /// The node asked does not lead the group; the leader it knows of.
    NotLeader(Option<u64>),
    /// The node asked holds no replica of the queue.
    NotMember,
    /// It could not be committed (no majority, shutting down).
    Failed(String),
}

/// A node's view of the cluster.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    /// This node.
    pub node: NodeInfo,
    /// The metadata leader it knows of.
    pub leader: Option<u64>,
    /// Raft term.
    pub term: u64,
    /// Last applied metadata index.
    pub applied: u64,
    /// Whether it is in contact with a majority (metadata changes can be
    /// made through it).
    pub majority: bool,
    /// Voting members.
    pub voters: Vec<NodeInfo>,
    /// Non-voting members.
    pub learners: Vec<NodeInfo>,
}
