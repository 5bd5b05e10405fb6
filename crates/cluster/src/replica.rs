//! Replicated (quorum) queues on this node: [`Replicas`] knows every
//! replicated queue the metadata holds (by id and by vhost and name), runs
//! the replica of each one this node is a member of (its Raft group on the
//! shared WAL, its [`QueueMachine`], served to peers through
//! [`QueueGroups`]), and is how the rest of the node reaches one:
//!
//! - **proposing** an entry (enqueue, checkout, settle, `basic.get`, purge):
//!   to the local replica if it leads, else over the link to the leader it
//!   knows of (a member that does not lead answers whom it follows); the
//!   answer comes once a majority has the entry on disk;
//! - **delivering**: only the leader acts on the deliveries its state
//!   machine assigns, handing them to this node's consumers or sending them
//!   to the consumer's node (`Request::QueueDeliver`). A newly elected
//!   leader hands out again everything its replicas hold unsettled (its
//!   predecessor may have died before sending it); the consuming node drops
//!   a delivery it holds already ([`Replicated::first_delivery`]), and
//!   returns one for a consumer that is gone (a `Down` entry).
//!
//! A consumer is keyed `(node id, key)`; key 0 is the node's `basic.get`
//! requester. A node settles its deliveries by sequence number (the state
//! machine checks the holder is on that node).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use amqp_codec::{FieldTable, ShortStr};
use futures_util::FutureExt;
use openraft::error::RaftError;
use openraft::{Raft, ServerState};
use parking_lot::{Mutex, RwLock};
use queue_store::quorum::{ConsumerKey, QuorumEffect};
use queue_store::{Delivery, Effects, MessageRef, QueueArgs};
use server::peers::{RemoteDelivery, RemoteSink};

use crate::group_log::GroupLog;
use crate::group_net::{GroupNetworkFactory, QueueGroups};
use crate::identity::NodeInfo;
use crate::link::Links;
use crate::proposals::{Attempt, Proposer};
use crate::queue_group::{
    QueueIdentity, QueueMachine, QueueRequest, QueueResponse, QueueTypes, ReplicaEvents,
};
use crate::raft_wal::RaftWal;
use crate::rpc::{ProposeRefusal, Request, Response, WireDelivery};

/// How long an entry that must be committed eventually (a settlement, a
/// restarted node's word) is proposed again.
pub const RETRY_FOR: Duration = Duration::from_secs(300);

/// How long an entry may take to commit before its proposer is told it
/// failed (it may still commit: a publisher then gets a nack for a message
/// that is queued, never the other way round).
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a replica needs of its node: the cluster's members and this node's
/// consumers.
pub trait ReplicaHost: Send + Sync {
    /// Member `id` of the cluster.
    fn member(&self, id: u64) -> Option<NodeInfo>;
    /// The member called `name`.
    fn member_named(&self, name: &str) -> Option<NodeInfo>;
    /// This node's consumer `key`'s sink.
    fn local_sink(&self, key: u64) -> Option<Arc<dyn RemoteSink>>;
    /// Forgets this node's consumer `key`; its sink.
    fn remove_sink(&self, key: u64) -> Option<Arc<dyn RemoteSink>>;
}

/// A replicated queue's group as this node runs it.
struct LocalReplica {
    raft: Raft<QueueTypes>,
    /// Where this node, as leader, puts proposals into the log.
    proposer: Proposer,
    machine: QueueMachine,
    /// Kept alive for the machine, which holds it weakly.
    _events: Arc<LeaderEffects>,
}

/// A replicated queue, as every node knows it.
pub struct Replicated {
    /// Its id (its group's id too).
    pub id: u64,
    /// Its vhost.
    pub vhost: String,
    /// Its name.
    pub name: ShortStr,
    /// The nodes holding its replicas (changed by `add_member` and
    /// `delete_member`).
    members: RwLock<Vec<String>>,
    arguments: FieldTable,
    /// This node's replica, while it is a member.
    local: RwLock<Option<Arc<LocalReplica>>>,
    /// Told when `local` is set: a proposal made here while this node's
    /// replica of a queue just declared is still starting waits for it.
    started: tokio::sync::Notify,
    /// The leader last heard of (0: none).
    leader_hint: AtomicU64,
    /// Proposals of this node waiting to be sent, in order (see
    /// `Replicas::propose`).
    unsent: Mutex<Unsent>,
    /// What this node's consumers were handed and have not settled here:
    /// a new leader's second send of one hand-out is dropped.
    delivered: Mutex<HandedOut>,
    /// As its leader: consumers' nodes found unreachable once (a link to
    /// each was attempted); suspected if still so at the next look.
    unreached: Mutex<HashSet<u64>>,
    /// Set while this node, stopping, hands its leadership over: new
    /// proposals wait (a proposal is queued under a read of it, so none
    /// slips in once it is set) and then go to the new leader.
    handing_over: tokio::sync::watch::Sender<bool>,
    /// When this node last became its leader.
    led_since: Mutex<Option<std::time::Instant>>,
    /// As its leader (`at-least-once`): held dead letters being routed.
    dead_letters_on_way: Mutex<HashSet<u64>>,
    /// Batches of held dead letters take turns, in order.
    dead_letter_turn: tokio::sync::Mutex<()>,
    /// The last start or stop of this node's replica asked for: each
    /// waits for the one asked for before it, so that they happen in the
    /// order the metadata asked for them (see [`Replicas::in_turn`]).
    lifecycle:
        Mutex<Option<futures_util::future::Shared<futures_util::future::BoxFuture<'static, ()>>>>,
}

impl std::fmt::Debug for Replicated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicated")
            .field("id", &self.id)
            .field("vhost", &self.vhost)
            .field("name", &self.name)
            .field("members", &*self.members.read())
            .finish_non_exhaustive()
    }
}

/// A proposal in a waiting line: its deadline and proposer.
type Waiting = (
    QueueRequest,
    tokio::time::Instant,
    tokio::sync::oneshot::Sender<Result<QueueResponse, String>>,
);

/// A queue's proposals waiting for a leader to be sent to, in the order
/// they were made, each with its deadline and proposer.
#[derive(Default)]
struct Unsent {
    line: std::collections::VecDeque<Waiting>,
    /// A task is sending the line.
    draining: bool,
}

/// The hand-outs a node's consumers hold of one queue, to tell a new
/// leader's resend of one (dropped) from a later hand-out of the same
/// message after it returned to the queue (a nack, a consumer that went
/// away). A hand-out is a sequence number and its delivery count: every
/// return to the queue counts one more, and a resend keeps it.
#[derive(Debug, Default)]
struct HandedOut(HashMap<u64, u32>);

impl HandedOut {
    /// Whether `d` is a hand-out this node has not had yet.
    fn first(&mut self, d: &WireDelivery) -> bool {
        let earlier = self.0.insert(d.seq, d.delivery_count);
        !(d.redelivered && earlier == Some(d.delivery_count))
    }

    fn settled(&mut self, seqs: &[u64]) {
        for s in seqs {
            self.0.remove(s);
        }
    }
}

impl Replicated {
    /// The nodes holding its replicas.
    pub fn members(&self) -> Vec<String> {
        self.members.read().clone()
    }

    /// This node's replica, if it has one now.
    fn local(&self) -> Option<Arc<LocalReplica>> {
        self.local.read().clone()
    }

    /// Done when no hand-over of leadership is under way.
    async fn not_handing_over(&self) {
        let mut rx = self.handing_over.subscribe();
        let _ = rx.wait_for(|h| !*h).await;
    }

    /// `request` queued at this node's replica as leader, unless a
    /// hand-over is under way (then `Err` gives it back).
    fn propose_as_leader(
        &self,
        local: &LocalReplica,
        request: QueueRequest,
    ) -> Result<impl std::future::Future<Output = Attempt> + Send + use<>, Box<QueueRequest>> {
        let handing_over = self.handing_over.borrow();
        if *handing_over {
            return Err(Box::new(request));
        }
        Ok(local.proposer.propose(request))
    }

    /// Whether `delivery` is new to this node (else a duplicate: a new
    /// leader hands out again what its predecessor may not have sent).
    pub fn first_delivery(&self, delivery: &WireDelivery) -> bool {
        self.delivered.lock().first(delivery)
    }

    /// Deliveries settled here.
    pub fn settled(&self, seqs: &[u64]) {
        self.delivered.lock().settled(seqs);
    }

    /// Its group and counts as this node's replica sees them (`None`
    /// unless this node is a member): its leader, and the members this
    /// node reaches.
    pub fn local_status(&self, replicas: &Replicas) -> Option<server::peers::ReplicaStatus> {
        let local = self.local()?;
        let leader = local.raft.metrics().borrow().current_leader;
        let host = replicas.host();
        let members = self.members();
        let online = members
            .iter()
            .filter(|m| {
                **m == replicas.me.name
                    || host
                        .as_ref()
                        .and_then(|h| h.member_named(m))
                        .is_some_and(|n| replicas.links.is_connected(n.id))
            })
            .cloned()
            .collect();
        let (ready, unacked, consumers) = local.machine.with_state(|s| {
            (
                s.queue().ready_count(),
                s.queue().unacked_count(),
                s.consumer_count() as u64,
            )
        });
        Some(server::peers::ReplicaStatus {
            leader: leader
                .and_then(|id| host.as_ref()?.member(id))
                .map(|n| n.name),
            members,
            online,
            ready,
            unacked,
            consumers,
        })
    }

    /// The last entry this node's replica knows committed: its saved
    /// committed mark, and at least what it applied (applied entries are
    /// committed: a floor until a mark is saved).
    fn commit_index(&self, replicas: &Replicas, last_applied: u64) -> u64 {
        GroupLog::<QueueTypes>::new(replicas.wal.clone(), self.id)
            .committed_index()
            .unwrap_or(0)
            .max(last_applied)
    }

    /// This node's replica as a row of `quorum_status` (`None` unless
    /// this node runs one): its Raft state, its log's last index, the last
    /// it knows committed, its snapshot's, its term.
    pub fn raft_member(&self, replicas: &Replicas) -> Option<server::peers::QuorumMember> {
        let local = self.local()?;
        let metrics = local.raft.metrics();
        let m = metrics.borrow();
        let raft_state = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "noproc",
        };
        let commit_index = self.commit_index(replicas, m.last_applied.map_or(0, |id| id.index));
        Some(server::peers::QuorumMember {
            node: replicas.me.name.clone(),
            raft_state: raft_state.to_owned(),
            log_index: Some(m.last_log_index.unwrap_or(0)),
            commit_index: Some(commit_index),
            snapshot_index: Some(m.snapshot.map_or(0, |id| id.index)),
            term: Some(m.current_term),
            machine_version: Some(crate::queue_group::MACHINE_VERSION),
        })
    }

    /// This node's replica's Raft figures (`None` unless it runs one).
    pub fn raft_metrics(&self, replicas: &Replicas) -> Option<server::peers::RaftMetrics> {
        let local = self.local()?;
        let commit_latency = local.machine.commit_latency_ms();
        let metrics = local.raft.metrics();
        let m = metrics.borrow();
        let last_applied = m.last_applied.map_or(0, |id| id.index);
        let commit_index = self.commit_index(replicas, last_applied);
        Some(server::peers::RaftMetrics {
            vhost: self.vhost.clone(),
            queue: self.name.to_string(),
            term: m.current_term,
            snapshot_index: m.snapshot.map_or(0, |id| id.index),
            last_applied,
            commit_index,
            last_written: m.last_log_index.unwrap_or(0),
            commit_latency_seconds: commit_latency as f64 / 1000.0,
        })
    }

    /// Why an entry for it was given up: no leader in time.
    fn no_leader(&self) -> String {
        format!(
            "replicated queue '{}' in vhost '{}' has no leader within {} s",
            self.name,
            self.vhost,
            PROPOSE_TIMEOUT.as_secs()
        )
    }

    /// Whether this node leads its group now.
    fn leads(&self, me: u64) -> bool {
        self.local().is_some_and(|l| {
            let m = l.raft.metrics();
            let m = m.borrow();
            m.state == ServerState::Leader && m.current_leader == Some(me)
        })
    }

    /// The leader this node knows of.
    fn leader(&self) -> Option<u64> {
        if let Some(l) = self.local() {
            if let Some(id) = l.raft.metrics().borrow().current_leader {
                return Some(id);
            }
        }
        match self.leader_hint.load(Ordering::Relaxed) {
            0 => None,
            id => Some(id),
        }
    }
}

/// Every replicated queue this node knows of.
pub struct Replicas {
    me: NodeInfo,
    links: Arc<Links>,
    wal: RaftWal,
    groups: Arc<QueueGroups>,
    dir: PathBuf,
    host: OnceLock<Weak<dyn ReplicaHost>>,
    me_weak: OnceLock<Weak<Replicas>>,
    queues: RwLock<HashMap<u64, Arc<Replicated>>>,
    by_name: RwLock<HashMap<(String, String), u64>>,
    count: AtomicUsize,
    /// This node's consumers of replicated queues: key -> (queue id,
    /// cancelled on failover).
    consumers: Mutex<HashMap<u64, (u64, bool)>>,
    next_message: AtomicU64,
    /// This run's first consumer number (earlier runs' are below it).
    first_key: u64,
    /// The broker, once started (the leader routes dead letters through
    /// it).
    broker: OnceLock<Weak<server::broker::Broker>>,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicas")
            .field("queues", &self.count.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The group's Raft settings: elections within about a second.
fn raft_config() -> Result<openraft::Config, String> {
    openraft::Config {
        heartbeat_interval: 150,
        election_timeout_min: 600,
        election_timeout_max: 1200,
        // Or after `queue_group::SNAPSHOT_AT_OCTETS` of messages.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(20_000),
        // At most 64 MiB of batches of 256 KiB kept for followers behind.
        max_in_snapshot_log_to_keep: 256,
        // An entry may be a batch of up to 256 KiB of messages
        // (`proposals::MAX_BATCH_BYTES`): an AppendEntries stays well
        // under a link frame.
        max_payload_entries: 64,
        ..Default::default()
    }
    .validate()
    .map_err(|e| e.to_string())
}

fn now_ms() -> u64 {
    server::queue::now_ms()
}

/// A delivery as it travels to the consumer's node.
pub fn wire_delivery(d: &Delivery) -> Option<WireDelivery> {
    let MessageRef::Loaded(m) = &d.message else {
        // An in-memory queue pages nothing.
        return None;
    };
    let mut header = bytes::BytesMut::new();
    m.header.encode(&mut header);
    Some(WireDelivery {
        seq: d.seq,
        redelivered: d.redelivered,
        delivery_count: d.delivery_count,
        remaining: u32::try_from(d.remaining).unwrap_or(u32::MAX),
        exchange: m.exchange.to_string(),
        routing_key: m.routing_key.to_string(),
        header: header.freeze(),
        body: m.body.clone(),
    })
}

/// A delivery as a consumer's sink takes it.
pub fn remote_delivery(d: WireDelivery) -> Result<RemoteDelivery, String> {
    let short = |s: &str| ShortStr::try_from(s).map_err(|e| e.to_string());
    Ok(RemoteDelivery {
        seq: d.seq,
        redelivered: d.redelivered,
        delivery_count: d.delivery_count,
        remaining: d.remaining,
        exchange: short(&d.exchange)?,
        routing_key: short(&d.routing_key)?,
        header: d.header,
        body: d.body,
    })
}

type Answer = Pin<Box<dyn std::future::Future<Output = Result<QueueResponse, String>> + Send>>;

impl Replicas {
    /// The registry of node `me`, whose replicas keep their logs in `wal`
    /// and their snapshots under `dir`, serving peers through `groups`.
    pub fn new(
        me: NodeInfo,
        links: Arc<Links>,
        wal: RaftWal,
        groups: Arc<QueueGroups>,
        dir: PathBuf,
    ) -> Arc<Replicas> {
        let r = Arc::new(Replicas {
            me,
            links,
            wal,
            groups,
            dir,
            host: OnceLock::new(),
            me_weak: OnceLock::new(),
            queues: RwLock::default(),
            by_name: RwLock::default(),
            count: AtomicUsize::new(0),
            consumers: Mutex::default(),
            next_message: AtomicU64::new(1),
            // Above every earlier run's (the clock moved on since).
            first_key: now_ms().saturating_mul(1 << 12).max(1),
            broker: OnceLock::new(),
        });
        let _ = r.me_weak.set(Arc::downgrade(&r));
        r
    }

    /// Where members and local consumers are found from now on.
    pub fn set_host(&self, host: Weak<dyn ReplicaHost>) {
        let _ = self.host.set(host);
    }

    /// The broker dead letters are routed through from now on.
    pub fn set_broker(&self, broker: Weak<server::broker::Broker>) {
        let _ = self.broker.set(broker);
    }

    fn host(&self) -> Option<Arc<dyn ReplicaHost>> {
        self.host.get().and_then(Weak::upgrade)
    }

    /// The replicated queue `name` of `vhost`, if there is one.
    pub fn by_name(&self, vhost: &str, name: &str) -> Option<Arc<Replicated>> {
        if self.count.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let id = *self
            .by_name
            .read()
            .get(&(vhost.to_owned(), name.to_owned()))?;
        self.get(id)
    }

    /// The replicated queue with id `id` (no lock taken while there are
    /// none: a classic queue's settles ask on every ack).
    pub fn get(&self, id: u64) -> Option<Arc<Replicated>> {
        if self.count.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.queues.read().get(&id).cloned()
    }

    /// Every replicated queue with a replica on node `name`.
    pub fn with_member(&self, name: &str) -> Vec<Arc<Replicated>> {
        self.queues
            .read()
            .values()
            .filter(|q| q.members.read().iter().any(|m| m == name))
            .cloned()
            .collect()
    }

    /// The Raft figures of every replica this node runs.
    pub fn raft_metrics(&self) -> Vec<server::peers::RaftMetrics> {
        self.local()
            .iter()
            .filter_map(|q| q.raft_metrics(self))
            .collect()
    }

    /// Every replicated queue this node holds a replica of.
    fn local(&self) -> Vec<Arc<Replicated>> {
        self.queues
            .read()
            .values()
            .filter(|q| q.local().is_some())
            .cloned()
            .collect()
    }

    /// A replicated queue the metadata now holds (or holds with other
    /// members): known from now on, and this node's replica started if it
    /// is a member now, stopped if it no longer is. `at_start`: known when
    /// this node started (its group is told that this node's consumers of
    /// earlier runs are gone).
    pub fn declared(&self, vhost: &str, def: &server::meta::QueueDef, at_start: bool) {
        if def.members.is_empty() {
            return;
        }
        let Some(me) = self.me_weak.get().and_then(Weak::upgrade) else {
            return;
        };
        let known = self.get(def.id);
        let q = match known {
            Some(q) => {
                if *q.members.read() == def.members {
                    return;
                }
                tracing::info!(queue = %q.name, vhost = %q.vhost, members = ?def.members, "members changed");
                *q.members.write() = def.members.clone();
                q
            }
            None => {
                let q = Arc::new(Replicated {
                    id: def.id,
                    vhost: vhost.to_owned(),
                    name: def.name.clone(),
                    members: RwLock::new(def.members.clone()),
                    arguments: def.arguments.clone(),
                    local: RwLock::new(None),
                    started: tokio::sync::Notify::new(),
                    leader_hint: AtomicU64::new(0),
                    unsent: Mutex::default(),
                    delivered: Mutex::default(),
                    unreached: Mutex::default(),
                    handing_over: tokio::sync::watch::Sender::new(false),
                    led_since: Mutex::default(),
                    dead_letters_on_way: Mutex::default(),
                    dead_letter_turn: tokio::sync::Mutex::new(()),
                    lifecycle: Mutex::new(None),
                });
                {
                    let mut queues = self.queues.write();
                    if queues.contains_key(&def.id) {
                        return;
                    }
                    queues.insert(def.id, q.clone());
                    // (Counted as it is inserted: `get` looks only when
                    // there are some.)
                    self.count.fetch_add(1, Ordering::Relaxed);
                }
                self.by_name
                    .write()
                    .insert((vhost.to_owned(), def.name.to_string()), def.id);
                if at_start {
                    let request = QueueRequest::NodeRestarted {
                        node: self.me.id,
                        first_key: self.first_key,
                        now_ms: now_ms(),
                    };
                    let (me, q) = (me.clone(), q.clone());
                    tokio::spawn(async move {
                        let first = me.propose(&q, request.clone());
                        me.until_committed(&q, request, first, "a restarted node's word")
                            .await;
                    });
                }
                q
            }
        };
        let member = def.members.contains(&self.me.name);
        if member {
            // Only the node that declared it initialises its group (at
            // its declaration; later it has a log and this does nothing).
            // (Asked for even if a replica runs: a stop asked for before
            // may be pending.)
            let initialise = def.members.first() == Some(&self.me.name);
            let (r, q2) = (me.clone(), q.clone());
            Self::in_turn(&q, async move {
                if let Err(e) = r.start(&q2, initialise).await {
                    tracing::error!(queue = %q2.name, vhost = %q2.vhost, error = %e, "cannot start this node's replica of a replicated queue");
                }
            });
        } else {
            // Not a member: its replica stops, and whatever this node kept
            // of the queue goes (also when none ran: one that could not
            // start, or state from before this node was removed while
            // down), so that the node starts from nothing if added again.
            self.stop_local(&q);
        }
    }

    /// Runs `op`, a start or stop of this node's replica of `q`, after
    /// every one asked for before it: in the order the metadata asked.
    fn in_turn(q: &Arc<Replicated>, op: impl std::future::Future<Output = ()> + Send + 'static) {
        use futures_util::FutureExt as _;
        let mut last = q.lifecycle.lock();
        let before = last.take();
        let turn = async move {
            if let Some(before) = before {
                before.await;
            }
            op.await;
        }
        .boxed()
        .shared();
        *last = Some(turn.clone());
        drop(last);
        tokio::spawn(turn);
    }

    /// Replicated queue `name` of `vhost` was deleted: its replica here
    /// stops and its snapshot goes.
    pub fn deleted(&self, vhost: &str, name: &str) {
        let Some(id) = self
            .by_name
            .write()
            .remove(&(vhost.to_owned(), name.to_owned()))
        else {
            return;
        };
        self.forget(id);
    }

    /// Vhost `vhost` was deleted, with its replicated queues.
    pub fn vhost_deleted(&self, vhost: &str) {
        let ids: Vec<u64> = {
            let mut by_name = self.by_name.write();
            let ids = by_name
                .iter()
                .filter(|((v, _), _)| v == vhost)
                .map(|(_, id)| *id)
                .collect();
            by_name.retain(|(v, _), _| v != vhost);
            ids
        };
        for id in ids {
            self.forget(id);
        }
    }

    fn forget(&self, id: u64) {
        let Some(q) = self.queues.write().remove(&id) else {
            return;
        };
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.stop_local(&q);
    }

    /// Stops this node's replica of `q` if it runs, and drops what it
    /// kept: its entries, committed mark and purge in the shared log (its
    /// last vote stays: a few octets, and a vote is never taken back) and
    /// its snapshot. Also when no replica runs (one that could not start,
    /// say on a damaged snapshot): a node added back starts from nothing
    /// and catches up from the leader. In turn with the replica's starts
    /// ([`Self::in_turn`]): one asked for after this runs after it.
    fn stop_local(&self, q: &Arc<Replicated>) {
        let Some(me) = self.me_weak.get().and_then(Weak::upgrade) else {
            return;
        };
        let q2 = q.clone();
        Self::in_turn(q, async move {
            let q = q2;
            let id = q.id;
            let local = q.local.write().take();
            if let Some(local) = local {
                tracing::info!(queue = %q.name, vhost = %q.vhost, "no longer a member: this node's replica stops");
                me.groups.remove(id);
                let _ = local.raft.shutdown().await;
            }
            let snapshot = me.snapshot_path(id);
            if !me.wal.holds(id) && !snapshot.exists() {
                return;
            }
            if let Err(e) = me.wal.reset(id).await {
                tracing::warn!(group = id, error = %e, "cannot drop a replica's Raft entries");
            }
            if let Err(e) = std::fs::remove_file(&snapshot) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %snapshot.display(), error = %e, "cannot remove a replica's snapshot");
                }
            }
        });
    }

    fn snapshot_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.snapshot"))
    }

    /// Starts this node's replica of `q`; with `initialise`, it initialises
    /// the group with all of its members.
    async fn start(self: &Arc<Self>, q: &Arc<Replicated>, initialise: bool) -> Result<(), String> {
        // (In turn with the replica's stops: see `in_turn`.) Not if the
        // queue went or this node left it since this was asked for.
        let wanted = self.get(q.id).is_some() && q.members().contains(&self.me.name);
        if !wanted || q.local().is_some() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let args = QueueArgs::parse(&q.arguments, &q.name, &q.vhost).map_err(|e| e.to_string())?;
        let identity = QueueIdentity {
            id: q.id,
            name: q.name.clone(),
            arguments: q.arguments.clone(),
            args,
        };
        let machine = QueueMachine::open(identity, self.snapshot_path(q.id))?;
        let raft = Raft::new(
            self.me.id,
            Arc::new(raft_config()?),
            GroupNetworkFactory::<QueueTypes>::new(self.links.clone(), q.id),
            GroupLog::<QueueTypes>::new(self.wal.clone(), q.id),
            machine.clone(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let events = Arc::new(LeaderEffects {
            replicas: Arc::downgrade(self),
            queue: Arc::downgrade(q),
        });
        let weak: Weak<dyn ReplicaEvents> =
            Arc::downgrade(&(events.clone() as Arc<dyn ReplicaEvents>));
        machine.set_events(weak);
        let started_meanwhile = {
            let mut local = q.local.write();
            let started = local.is_some();
            if !started {
                *local = Some(Arc::new(LocalReplica {
                    raft: raft.clone(),
                    proposer: Proposer::start(raft.clone(), PROPOSE_TIMEOUT),
                    machine,
                    _events: events,
                }));
            }
            started
        };
        if started_meanwhile {
            let _ = raft.shutdown().await;
            return Ok(());
        }
        self.groups.insert(q.id, raft.clone());
        q.started.notify_waiters();
        let members = q.members();
        tracing::info!(queue = %q.name, vhost = %q.vhost, ?members, "replica started");
        tokio::spawn(watch_leadership(Arc::downgrade(self), Arc::downgrade(q)));
        if initialise {
            let host = self.host().ok_or("the node is stopping")?;
            let nodes: BTreeMap<u64, NodeInfo> = members
                .iter()
                .filter_map(|m| host.member_named(m))
                .map(|n| (n.id, n))
                .collect();
            if nodes.len() != members.len() {
                return Err(format!("some members are not in the cluster: {members:?}"));
            }
            match raft.initialize(nodes).await {
                Ok(()) => {}
                // Initialised before (this node restarted).
                Err(RaftError::APIError(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    /// As the leader of group `group`: adds `node` to its voters (first as
    /// a learner that catches up) or removes it.
    pub async fn change_voters(&self, group: u64, node: NodeInfo, add: bool) -> Response {
        let Some(local) = self.get(group).and_then(|q| q.local()) else {
            return Response::QueueProposed(Err(ProposeRefusal::NotMember));
        };
        let m = local.raft.metrics().borrow().clone();
        if m.current_leader != Some(self.me.id) {
            return Response::QueueProposed(Err(ProposeRefusal::NotLeader(m.current_leader)));
        }
        let id = node.id;
        let done = if add {
            match local.raft.add_learner(id, node, true).await {
                Ok(_) => local
                    .raft
                    .change_membership(openraft::ChangeMembers::AddVoterIds([id].into()), false)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        } else {
            local
                .raft
                .change_membership(openraft::ChangeMembers::RemoveVoters([id].into()), false)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        Response::QueueProposed(match done {
            Ok(()) => Ok(QueueResponse::Done),
            Err(e) => Err(ProposeRefusal::Failed(e)),
        })
    }

    /// Asks `q`'s leader (wherever it is) to add `node` to its voters or
    /// remove it.
    pub async fn change_voters_at_leader(
        self: &Arc<Self>,
        q: &Arc<Replicated>,
        node: NodeInfo,
        add: bool,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + PROPOSE_TIMEOUT;
        let mut round = 0;
        loop {
            let members = q.members();
            let target = match q.leader() {
                Some(id) => self.host().and_then(|h| h.member(id)),
                None => self
                    .host()
                    .and_then(|h| h.member_named(&members[round % members.len().max(1)])),
            };
            round += 1;
            let answer = match target {
                Some(t) if t.id == self.me.id => self.change_voters(q.id, node.clone(), add).await,
                Some(t) => {
                    let request = Request::QueueMembers {
                        group: q.id,
                        node: node.clone(),
                        add,
                    };
                    match self.links.send_ordered(&t.cluster_addr, request).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => Response::Unavailable(e.to_string()),
                        Err(_) => Response::Unavailable("no answer".into()),
                    }
                }
                None => Response::Unavailable("no member known".into()),
            };
            match answer {
                Response::QueueProposed(Ok(_)) => return Ok(()),
                Response::QueueProposed(Err(ProposeRefusal::Failed(e))) => return Err(e),
                Response::QueueProposed(Err(ProposeRefusal::NotLeader(Some(h)))) => {
                    q.leader_hint.store(h, Ordering::Relaxed);
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(q.no_leader());
            }
        }
    }

    /// A fresh message id for an entry this node proposes.
    pub fn next_message_id(&self) -> u64 {
        // Informational only (an in-memory queue keys nothing by it).
        ((self.me.id & 0xFFFF_FFFF) << 32)
            | (self.next_message.fetch_add(1, Ordering::Relaxed) & 0xFFFF_FFFF)
    }

    /// This node's id.
    pub fn me(&self) -> u64 {
        self.me.id
    }

    /// This run's first consumer number.
    pub fn first_key(&self) -> u64 {
        self.first_key
    }

    /// Waits for `first` (a proposal of `request`), proposing it again
    /// after each failure (for up to [`RETRY_FOR`]): for entries that must
    /// be committed eventually and may be committed twice.
    pub async fn until_committed(
        self: &Arc<Self>,
        q: &Arc<Replicated>,
        request: QueueRequest,
        first: Answer,
        what: &str,
    ) {
        let deadline = tokio::time::Instant::now() + RETRY_FOR;
        let mut answer = first;
        loop {
            match answer.await {
                Ok(_) => return,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!(queue = %q.name, vhost = %q.vhost, error = %e, "{what} was not committed; given up");
                    return;
                }
                Err(e) => {
                    tracing::debug!(queue = %q.name, error = %e, "{what} was not committed; proposed again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            answer = self.propose(q, request.clone());
        }
    }

    /// Registers this node's consumer `key` of queue `q` (which asked to
    /// be cancelled when its leader changes, or not).
    pub fn add_consumer(&self, key: u64, q: &Replicated, cancel_on_failover: bool) {
        self.consumers
            .lock()
            .insert(key, (q.id, cancel_on_failover));
    }

    /// Forgets this node's consumer `key`; its queue, if it had one.
    pub fn remove_consumer(&self, key: u64) -> Option<Arc<Replicated>> {
        let (id, _) = self.consumers.lock().remove(&key)?;
        self.get(id)
    }

    /// Group `group` has a new leader: this node's consumers of it that
    /// asked for `x-cancel-on-ha-failover` are cancelled (`basic.cancel`),
    /// and what they held returns to the queue.
    pub fn failed_over(self: &Arc<Self>, group: u64) {
        let Some(q) = self.get(group) else {
            return;
        };
        let keys: Vec<u64> = {
            let mut consumers = self.consumers.lock();
            let keys: Vec<u64> = consumers
                .iter()
                .filter(|(_, (g, cancel))| *g == group && *cancel)
                .map(|(k, _)| *k)
                .collect();
            for k in &keys {
                consumers.remove(k);
            }
            keys
        };
        let host = self.host();
        for key in keys {
            tracing::info!(queue = %q.name, vhost = %q.vhost, key, "the queue's leader changed: cancelling a consumer that asked for x-cancel-on-ha-failover");
            if let Some(sink) = host.as_ref().and_then(|h| h.remove_sink(key)) {
                // Its held acknowledgements first: `Down` returns what it
                // has not settled.
                sink.settle_held();
                sink.cancelled();
            }
            let down = QueueRequest::Down {
                consumer: (self.me.id, key),
                now_ms: now_ms(),
            };
            tokio::spawn(self.propose(&q, down));
        }
    }

    /// Proposes `request` for `q`'s log: to this node's replica if it
    /// leads, else to the leader it knows of; the answer comes once it is
    /// committed. Entries this node proposes reach the leader in the order
    /// proposed: while the leader is known and none waits, the first
    /// attempt is sent before this returns; otherwise the proposal joins
    /// the queue's waiting line (`Replicated::unsent`), which one task
    /// sends in order, each once a leader is known.
    pub fn propose(self: &Arc<Self>, q: &Arc<Replicated>, request: QueueRequest) -> Answer {
        tracing::trace!(target: "latency", "propose");
        let deadline = tokio::time::Instant::now() + PROPOSE_TIMEOUT;
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut unsent = q.unsent.lock();
            if unsent.line.is_empty() && q.leader().is_some() {
                let first = self.attempt(q, request.clone(), 0);
                drop(unsent);
                return Box::pin(self.clone().retry(q.clone(), request, first, deadline));
            }
            unsent.line.push_back((request, deadline, tx));
            if !unsent.draining {
                unsent.draining = true;
                tokio::spawn(self.clone().send_in_order(q.clone()));
            }
        }
        let q = q.clone();
        Box::pin(async move { rx.await.unwrap_or_else(|_| Err(q.no_leader())) })
    }

    /// Sends `q`'s waiting line in order: while no leader is known, the
    /// first in line is proposed to completion (trying the members in turn
    /// learns the leader) before the next is sent.
    async fn send_in_order(self: Arc<Self>, q: Arc<Replicated>) {
        loop {
            let next = {
                let mut unsent = q.unsent.lock();
                let Some((request, deadline, tx)) = unsent.line.pop_front() else {
                    unsent.draining = false;
                    return;
                };
                if q.leader().is_some() {
                    // Sent now, under the line's lock: in order.
                    let first = self.attempt(&q, request.clone(), 0);
                    let answer = self.clone().retry(q.clone(), request, first, deadline);
                    tokio::spawn(async move {
                        let _ = tx.send(answer.await);
                    });
                    continue;
                }
                (request, deadline, tx)
            };
            let (request, deadline, tx) = next;
            let first = self.attempt(&q, request.clone(), 0);
            let _ = tx.send(
                self.clone()
                    .retry(q.clone(), request, first, deadline)
                    .await,
            );
        }
    }

    /// Follows a proposal's first attempt until it is answered, trying
    /// again (at the leader named, or the members in turn) while it was
    /// not taken, until `deadline`.
    async fn retry(
        self: Arc<Self>,
        q: Arc<Replicated>,
        request: QueueRequest,
        first: Pin<Box<dyn std::future::Future<Output = Attempt> + Send>>,
        deadline: tokio::time::Instant,
    ) -> Result<QueueResponse, String> {
        let mut outcome = first.await;
        tracing::trace!(target: "latency", "proposal answered");
        let mut round = 1;
        loop {
            match outcome {
                Attempt::Done(r) => return r,
                Attempt::Retry(hint) => {
                    if let Some(h) = hint {
                        q.leader_hint.store(h, Ordering::Relaxed);
                    } else {
                        q.leader_hint.store(0, Ordering::Relaxed);
                        // No leader known: an election is under way.
                        // (No event reaches a non-member: poll.)
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(q.no_leader());
            }
            outcome = self.attempt(&q, request.clone(), round).await;
            round += 1;
        }
    }

    /// One try at proposing; its send happens before this returns.
    fn attempt(
        self: &Arc<Self>,
        q: &Arc<Replicated>,
        request: QueueRequest,
        round: usize,
    ) -> Pin<Box<dyn std::future::Future<Output = Attempt> + Send>> {
        let leader = q.leader();
        if leader.is_none() && q.local().is_none() && q.members().contains(&self.me.name) {
            // A member whose replica is still starting (the queue was
            // declared a moment ago): it waits for it, then for a leader,
            // instead of asking the members in turn (itself among them).
            let q = q.clone();
            return Box::pin(async move {
                let started = q.started.notified();
                tokio::pin!(started);
                started.as_mut().enable();
                if q.local().is_none() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), started).await;
                }
                match q.local() {
                    Some(local) => leader_known(local.raft.clone()).await,
                    None => Attempt::Retry(None),
                }
            });
        }
        if leader == Some(self.me.id) || (leader.is_none() && q.local().is_some()) {
            let Some(local) = q.local() else {
                return Box::pin(std::future::ready(Attempt::Retry(None)));
            };
            if leader.is_none() {
                return Box::pin(leader_known(local.raft.clone()));
            }
            let mut write = match q.propose_as_leader(&local, request) {
                Ok(write) => Box::pin(write),
                Err(_) => {
                    // Tried again once the new leader is known.
                    let q = q.clone();
                    return Box::pin(async move {
                        q.not_handing_over().await;
                        Attempt::Retry(q.leader())
                    });
                }
            };
            if let Some(done) = (&mut write).now_or_never() {
                return Box::pin(std::future::ready(done));
            }
            return write;
        }
        let target = match leader {
            Some(id) => self.host().and_then(|h| h.member(id)),
            // No leader known: ask the members in turn.
            None => {
                let members = q.members();
                let name = &members[round % members.len().max(1)];
                self.host().and_then(|h| h.member_named(name))
            }
        };
        let Some(target) = target else {
            return Box::pin(std::future::ready(Attempt::Retry(None)));
        };
        // A request to a node not connected now is sent only once a new
        // connection is made: if that fails, it was never sent and may be
        // tried again (elsewhere). One lost on a live connection may have
        // been committed: not retried.
        let was_connected = self.links.is_connected(target.id);
        let answer = self.links.send_ordered(
            &target.cluster_addr,
            Request::QueuePropose {
                group: q.id,
                request,
            },
        );
        Box::pin(async move {
            match answer.await {
                Ok(Ok(Response::QueueProposed(Ok(r)))) => Attempt::Done(Ok(r)),
                Ok(Ok(Response::QueueProposed(Err(ProposeRefusal::NotLeader(hint))))) => {
                    Attempt::Retry(hint.filter(|h| *h != target.id))
                }
                Ok(Ok(Response::QueueProposed(Err(ProposeRefusal::NotMember)))) => {
                    Attempt::Retry(None)
                }
                Ok(Ok(Response::QueueProposed(Err(ProposeRefusal::Failed(e))))) => {
                    Attempt::Done(Err(format!("node '{}': {e}", target.name)))
                }
                Ok(Ok(other)) => {
                    Attempt::Done(Err(format!("node '{}' answered {other:?}", target.name)))
                }
                Ok(Err(crate::link::LinkError::Unreachable { .. })) if !was_connected => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Attempt::Retry(None)
                }
                Ok(Err(e)) => Attempt::Done(Err(format!("node '{}': {e}", target.name))),
                Err(_) => Attempt::Done(Err(format!("node '{}': no answer", target.name))),
            }
        })
    }

    /// A peer's proposal for group `group`, which this node may lead.
    pub fn serve_propose(
        &self,
        group: u64,
        request: QueueRequest,
    ) -> Pin<Box<dyn std::future::Future<Output = Response> + Send>> {
        tracing::trace!(target: "latency", "serve propose");
        let Some(q) = self.get(group) else {
            return Box::pin(std::future::ready(Response::QueueProposed(Err(
                ProposeRefusal::NotMember,
            ))));
        };
        let me = self.me.id;
        match serve_as_leader(&q, me, request) {
            Ok(answer) => answer,
            Err(request) => Box::pin(async move {
                // A hand-over is under way: answered once it is over.
                q.not_handing_over().await;
                match serve_as_leader(&q, me, *request) {
                    Ok(answer) => answer.await,
                    Err(_) => Response::QueueProposed(Err(ProposeRefusal::NotLeader(None))),
                }
            }),
        }
    }

    /// A delivery from the leader of group `group` for this node's consumer
    /// `key`: handed to its sink (`Some`, to be told when the burst ends),
    /// dropped if this node has it already, or returned to the queue if
    /// the consumer is gone.
    pub fn deliver_here(
        self: &Arc<Self>,
        group: u64,
        key: u64,
        delivery: WireDelivery,
    ) -> Option<Arc<dyn RemoteSink>> {
        tracing::trace!(target: "latency", "deliver here");
        let q = self.get(group)?;
        let sink = self.host().and_then(|h| h.local_sink(key));
        let ours = self
            .consumers
            .lock()
            .get(&key)
            .is_some_and(|(g, _)| *g == group);
        let Some(sink) = sink.filter(|_| ours) else {
            tracing::debug!(queue = %q.name, key, "a delivery for a consumer that is gone: returned");
            let down = QueueRequest::Down {
                consumer: (self.me.id, key),
                now_ms: now_ms(),
            };
            let answer = self.propose(&q, down);
            tokio::spawn(answer);
            return None;
        };
        if !q.first_delivery(&delivery) {
            return None;
        }
        match remote_delivery(delivery) {
            Ok(d) => {
                sink.deliver(d);
                Some(sink)
            }
            Err(e) => {
                tracing::warn!(queue = %q.name, error = %e, "an undecodable delivery");
                None
            }
        }
    }

    /// As the leader of `q`: hands `deliveries` to their consumers.
    fn hand_out(&self, q: &Replicated, deliveries: Vec<(ConsumerKey, Delivery)>) {
        let host = self.host();
        let mut local: Vec<Arc<dyn RemoteSink>> = Vec::new();
        for ((node, key), d) in deliveries {
            if key == 0 {
                // A `basic.get` requester's: it has it from the answer.
                continue;
            }
            let Some(wire) = wire_delivery(&d) else {
                continue;
            };
            if node == self.me.id {
                let Some(me) = self.me_weak.get().and_then(Weak::upgrade) else {
                    return;
                };
                if let Some(sink) = me.deliver_here(q.id, key, wire) {
                    if !local.iter().any(|s| Arc::ptr_eq(s, &sink)) {
                        local.push(sink);
                    }
                }
                continue;
            }
            let Some(to) = host.as_ref().and_then(|h| h.member(node)) else {
                continue;
            };
            tracing::trace!(target: "latency", to = node, "hand out");
            self.links.send_oneway(
                &to.cluster_addr,
                Request::QueueDeliver {
                    group: q.id,
                    key,
                    delivery: wire,
                },
            );
        }
        for sink in local {
            sink.end_of_burst();
        }
    }

    /// This node was elected leader of `q` in `term`: once its replica
    /// applied what it has, consumers that asked for
    /// `x-cancel-on-ha-failover` are cancelled (3.x's mirror promotion), and
    /// every unsettled delivery is handed out again.
    async fn take_over(self: &Arc<Self>, q: &Arc<Replicated>, local: &LocalReplica, term: u64) {
        let last = local.raft.metrics().borrow().last_log_index.unwrap_or(0);
        let _ = local
            .raft
            .wait(Some(Duration::from_secs(5)))
            .applied_index_at_least(Some(last), "the new leader's own entry")
            .await;
        let (held, nodes) = local
            .machine
            .with_state(|s| (s.checked_out(), s.consumer_nodes()));
        for n in nodes {
            if n == self.me.id {
                self.failed_over(q.id);
            } else if let Some(to) = self.host().and_then(|h| h.member(n)) {
                self.links
                    .send_oneway(&to.cluster_addr, Request::QueueFailover { group: q.id });
            }
        }
        if !held.is_empty() {
            tracing::info!(queue = %q.name, deliveries = held.len(), term, "elected: handing out unsettled deliveries again");
        }
        self.hand_out(q, held);
        let dead_letters = local.machine.with_state(|s| s.held_dead_letters());
        if !dead_letters.is_empty() {
            tracing::info!(queue = %q.name, dead_letters = dead_letters.len(), term, "elected: routing the dead letters the queue holds");
        }
        self.route_held_dead_letters(q, dead_letters);
    }

    /// As leader of `q` (`x-dead-letter-strategy: at-least-once`): routes
    /// `held` dead letters as confirmed publishes, again every little while
    /// (up to 30 s apart) until their queues have them, then settles them
    /// (`SettleDeadLetters`); batches take turns, in order. One already on
    /// its way is skipped. Whatever is left when this node stops leading is
    /// routed by the next leader (a queue may then get one twice).
    fn route_held_dead_letters(
        self: &Arc<Self>,
        q: &Arc<Replicated>,
        held: Vec<(u64, queue_store::DeadLetterRequest)>,
    ) {
        let held: Vec<_> = {
            let mut on_way = q.dead_letters_on_way.lock();
            held.into_iter()
                .filter(|(id, _)| on_way.insert(*id))
                .collect()
        };
        if held.is_empty() {
            return;
        }
        let (replicas, q) = (self.clone(), q.clone());
        tokio::spawn(async move {
            let _turn = q.dead_letter_turn.lock().await;
            let mut todo = held;
            let mut settle: Vec<u64> = Vec::new();
            let mut pause = Duration::from_millis(250);
            while (!todo.is_empty() || !settle.is_empty()) && q.leads(replicas.me.id) {
                let vhost = replicas
                    .broker
                    .get()
                    .and_then(Weak::upgrade)
                    .and_then(|b| b.vhost(&q.vhost));
                let mut why = String::from("its vhost is not running here");
                if let Some(vhost) = vhost {
                    let sends: Vec<_> = todo
                        .iter()
                        .map(|(_, r)| vhost.dead_letter_confirmed(r))
                        .collect();
                    drop(vhost);
                    let outcomes = futures_util::future::join_all(sends).await;
                    let mut again = Vec::new();
                    for ((id, r), outcome) in std::mem::take(&mut todo).into_iter().zip(outcomes) {
                        match outcome {
                            Ok(()) => settle.push(id),
                            Err(e) => {
                                why = e;
                                again.push((id, r));
                            }
                        }
                    }
                    todo = again;
                }
                if !settle.is_empty() {
                    let ids = settle.clone();
                    match replicas
                        .propose(&q, QueueRequest::SettleDeadLetters { ids })
                        .await
                    {
                        Ok(_) => {
                            let mut on_way = q.dead_letters_on_way.lock();
                            for id in settle.drain(..) {
                                on_way.remove(&id);
                            }
                        }
                        Err(e) => why = e,
                    }
                }
                if todo.is_empty() && settle.is_empty() {
                    break;
                }
                tracing::warn!(queue = %q.name, vhost = %q.vhost, waiting = todo.len(), error = %why, "dead letters (at-least-once) not yet taken by their queues: trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(30));
            }
            // Left to the next leader.
            let mut on_way = q.dead_letters_on_way.lock();
            for id in todo.iter().map(|(id, _)| *id).chain(settle) {
                on_way.remove(&id);
            }
        });
    }

    /// A peer's link is gone: every queue this node leads checks its
    /// consumers' nodes.
    pub fn node_gone(self: &Arc<Self>, _id: u64) {
        for q in self.local() {
            if let Some(local) = q.local().filter(|_| q.leads(self.me.id)) {
                self.check_nodes(&q, &local);
            }
        }
    }

    /// As the leader of `q`: suspects the consumers of nodes it cannot
    /// reach (what they hold returns to the queue), and restores those of
    /// nodes it reaches again.
    fn check_nodes(self: &Arc<Self>, q: &Arc<Replicated>, local: &LocalReplica) {
        let (nodes, suspected) = local
            .machine
            .with_state(|s| (s.consumer_nodes(), s.suspected_nodes()));
        for n in nodes {
            if n == self.me.id {
                continue;
            }
            let reachable = self.links.is_connected(n);
            if !reachable && !suspected.contains(&n) && q.unreached.lock().insert(n) {
                // Not suspected on one look: a link to it is attempted
                // (this node may never have needed one), and the next
                // round decides.
                if let Some(to) = self.host().and_then(|h| h.member(n)) {
                    self.links.send_oneway(&to.cluster_addr, Request::Status);
                }
                continue;
            }
            if reachable {
                q.unreached.lock().remove(&n);
            }
            let request = match (reachable, suspected.contains(&n)) {
                (false, false) => {
                    tracing::info!(queue = %q.name, vhost = %q.vhost, node = n, "a consumer's node cannot be reached: its deliveries return to the queue");
                    QueueRequest::NodeDown {
                        node: n,
                        now_ms: now_ms(),
                    }
                }
                (true, true) => {
                    tracing::info!(queue = %q.name, vhost = %q.vhost, node = n, "a consumer's node is back: its consumers take messages again");
                    QueueRequest::NodeUp {
                        node: n,
                        now_ms: now_ms(),
                    }
                }
                _ => continue,
            };
            tokio::spawn(self.propose(q, request));
        }
    }

    /// Hands the leadership of every queue this node leads to another
    /// member (the node is stopping gracefully; see `handover`), all at
    /// once. Proposals made meanwhile wait and then go to the new leader.
    pub async fn hand_over_all(self: &Arc<Self>) {
        let led: Vec<(Arc<Replicated>, Arc<LocalReplica>)> = self
            .queues
            .read()
            .values()
            .filter_map(|q| {
                let local = q.local()?;
                let leads = local.raft.metrics().borrow().current_leader == Some(self.me.id);
                leads.then(|| (q.clone(), local))
            })
            .collect();
        let all = led.into_iter().map(|(q, local)| async move {
            q.handing_over.send_replace(true);
            // Nothing this node took is still on its way into the log.
            local.proposer.flushed().await;
            let led_for = q.led_since.lock().map(|t| t.elapsed());
            let group = q.id;
            let outcome =
                crate::handover::hand_over(&local.raft, self.me.id, led_for, |to| async move {
                    let addr = self
                        .host()
                        .and_then(|h| h.member(to))
                        .map(|m| m.cluster_addr)
                        .ok_or_else(|| format!("node {to} is not a known member"))?;
                    crate::handover::ask_to_stand(&self.links, &addr, group).await
                })
                .await;
            q.handing_over.send_replace(false);
            match outcome {
                crate::handover::HandOver::To(id) => {
                    let to = self.host().and_then(|h| h.member(id)).map(|m| m.name);
                    tracing::info!(queue = %q.name, vhost = %q.vhost, to = to.as_deref().unwrap_or("?"), "stopping: handed the queue's leadership over");
                }
                crate::handover::HandOver::Failed(why) => {
                    tracing::warn!(queue = %q.name, vhost = %q.vhost, why, "stopping: the queue's leadership was not handed over; its members elect a leader once this node has gone");
                }
                crate::handover::HandOver::NotLeader => {}
            }
        });
        futures_util::future::join_all(all).await;
    }

    /// Stops every replica (the node shuts down).
    pub async fn shutdown(&self) {
        let all: Vec<Arc<Replicated>> = self.queues.read().values().cloned().collect();
        for q in all {
            if let Some(l) = q.local() {
                let _ = l.raft.shutdown().await;
            }
        }
    }
}

/// The answer to a peer's proposal to `q` if this node leads it (queued
/// here, in the link's order: see `Replicas::propose`); `Err` while a
/// hand-over is under way.
fn serve_as_leader(
    q: &Replicated,
    me: u64,
    request: QueueRequest,
) -> Result<Pin<Box<dyn std::future::Future<Output = Response> + Send>>, Box<QueueRequest>> {
    let Some(local) = q.local() else {
        return Ok(Box::pin(std::future::ready(Response::QueueProposed(Err(
            ProposeRefusal::NotMember,
        )))));
    };
    let leader = local.raft.metrics().borrow().current_leader;
    if leader != Some(me) {
        return Ok(Box::pin(std::future::ready(Response::QueueProposed(Err(
            ProposeRefusal::NotLeader(leader),
        )))));
    }
    let mut write = Box::pin(q.propose_as_leader(&local, request)?);
    if let Some(done) = (&mut write).now_or_never() {
        return Ok(Box::pin(std::future::ready(answer_of(done))));
    }
    Ok(Box::pin(async move { answer_of(write.await) }))
}

/// Waits (up to 500 ms) for this node's replica `raft` to know a leader:
/// a try again, at it if there is one.
async fn leader_known(raft: Raft<QueueTypes>) -> Attempt {
    let _ = raft
        .wait(Some(Duration::from_millis(500)))
        .metrics(|m| m.current_leader.is_some(), "a queue leader")
        .await;
    Attempt::Retry(raft.metrics().borrow().current_leader)
}

fn answer_of(a: Attempt) -> Response {
    Response::QueueProposed(match a {
        Attempt::Done(Ok(r)) => Ok(r),
        Attempt::Done(Err(e)) => Err(ProposeRefusal::Failed(e)),
        Attempt::Retry(hint) => Err(ProposeRefusal::NotLeader(hint)),
    })
}

/// Acts on a replica's effects when its node leads the group, and asks
/// any replica for a snapshot when its messages since the last one call for it.
struct LeaderEffects {
    replicas: Weak<Replicas>,
    queue: Weak<Replicated>,
}

impl ReplicaEvents for LeaderEffects {
    fn applied(&self, deliveries: Vec<QuorumEffect>, effects: Effects) {
        let (Some(replicas), Some(q)) = (self.replicas.upgrade(), self.queue.upgrade()) else {
            return;
        };
        if !q.leads(replicas.me.id) {
            return;
        }
        if !(effects.dead_letters.is_empty() && effects.discarded.is_empty()) {
            // The leader routes them, as RabbitMQ's `at-most-once`
            // strategy: one applied just before the leader dies is lost.
            // Only they are taken: the replica's other effects name no
            // stored message (an in-memory queue writes nothing).
            let mut routed = Effects {
                dead_letters: effects.dead_letters,
                discarded: effects.discarded,
                ..Effects::default()
            };
            let vhost = replicas
                .broker
                .get()
                .and_then(Weak::upgrade)
                .and_then(|b| b.vhost(&q.vhost));
            match vhost {
                Some(v) => v.apply(&mut routed),
                None => {
                    tracing::warn!(queue = %q.name, messages = routed.dead_letters.len(), "dead letters of a replicated queue dropped: its vhost is not running here");
                }
            }
        }
        let mut held = Vec::new();
        let deliveries = deliveries
            .into_iter()
            .filter_map(|e| match e {
                QuorumEffect::Deliver { consumer, delivery } => Some((consumer, delivery)),
                QuorumEffect::DeadLetter { id, request } => {
                    held.push((id, request));
                    None
                }
            })
            .collect();
        replicas.hand_out(&q, deliveries);
        if !held.is_empty() {
            replicas.route_held_dead_letters(&q, held);
        }
    }

    fn snapshot_due(&self) -> bool {
        let Some(local) = self.queue.upgrade().and_then(|q| q.local()) else {
            return false;
        };
        let raft = local.raft.clone();
        tokio::spawn(async move {
            if let Err(e) = raft.trigger().snapshot().await {
                tracing::warn!(error = %e, "cannot ask a replica for a snapshot");
            }
        });
        true
    }
}

/// How often a leader checks which consumers' nodes it can reach.
const LEADER_ROUND: Duration = Duration::from_secs(1);

/// Follows a replica's leadership: each time it becomes the leader, once
/// it has applied what its predecessors committed, it hands out again
/// every unsettled delivery; while it leads, it suspects the consumers of
/// nodes it cannot reach (their deliveries return to the queue) and
/// restores them once it can (`NodeDown`, `NodeUp`), checking on each
/// link loss and once a second.
async fn watch_leadership(replicas: Weak<Replicas>, queue: Weak<Replicated>) {
    let Some((raft, mut expiry)) = queue
        .upgrade()
        .and_then(|q| q.local().map(|l| (l.raft.clone(), l.machine.next_expiry())))
    else {
        return;
    };
    // Changes of vote, role and leader only (not every applied entry).
    let mut server = raft.server_metrics();
    let mut led_term = None;
    let mut round = tokio::time::interval(LEADER_ROUND);
    round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut wake = Wake::Changed;
    loop {
        let (leads, term) = {
            let m = server.borrow_and_update();
            (m.state == ServerState::Leader, m.vote.leader_id().term)
        };
        let (Some(r), Some(q)) = (replicas.upgrade(), queue.upgrade()) else {
            return;
        };
        let local = q.local().filter(|_| leads);
        if let Some(local) = &local {
            if led_term != Some(term) {
                led_term = Some(term);
                *q.led_since.lock() = Some(std::time::Instant::now());
                r.take_over(&q, local, term).await;
            }
            match wake {
                Wake::Round => r.check_nodes(&q, local),
                Wake::Expiry => {
                    // Messages at the head passed their TTL: a tick entry
                    // expires them on every replica alike.
                    let tick = QueueRequest::Tick { now_ms: now_ms() };
                    if let Err(e) = r.propose(&q, tick).await {
                        tracing::debug!(queue = %q.name, error = %e, "an expiry tick was not committed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                Wake::Changed => {}
            }
        }
        drop((r, q));
        // While leading: woken when the head's TTL runs out.
        let due = local
            .and_then(|_| *expiry.borrow_and_update())
            .map(|at| Duration::from_millis(at.saturating_sub(now_ms())));
        wake = tokio::select! {
            changed = server.changed() => {
                if changed.is_err() {
                    return;
                }
                Wake::Changed
            }
            changed = expiry.changed() => {
                if changed.is_err() {
                    return;
                }
                Wake::Changed
            }
            _ = tokio::time::sleep(due.unwrap_or(LEADER_ROUND)), if due.is_some() => Wake::Expiry,
            _ = round.tick() => Wake::Round,
        };
    }
}

/// Why a replica's leadership watch woke.
#[derive(Debug, Clone, Copy)]
enum Wake {
    /// Its role or the queue's next expiry changed.
    Changed,
    /// The leader's round: consumers' nodes are checked.
    Round,
    /// The head's TTL ran out.
    Expiry,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handed(seq: u64, redelivered: bool, delivery_count: u32) -> WireDelivery {
        WireDelivery {
            seq,
            redelivered,
            delivery_count,
            remaining: 0,
            exchange: String::new(),
            routing_key: "q".into(),
            header: bytes::Bytes::new(),
            body: bytes::Bytes::new(),
        }
    }

    #[test]
    fn a_new_leaders_resend_is_dropped() {
        let mut h = HandedOut::default();
        assert!(h.first(&handed(7, false, 0)));
        assert!(!h.first(&handed(7, true, 0)), "the same hand-out again");
    }

    #[test]
    fn a_message_handed_out_again_after_a_return_is_delivered() {
        let mut h = HandedOut::default();
        assert!(h.first(&handed(7, false, 0)));
        // Returned (its consumer went away before settling it, or it was
        // nacked, and the settlement was not seen here yet): delivered
        // again, one count up.
        assert!(h.first(&handed(7, true, 1)));
        assert!(!h.first(&handed(7, true, 1)), "and its resend dropped");
        assert!(h.first(&handed(7, true, 2)));
    }

    #[test]
    fn a_settled_hand_out_is_forgotten() {
        let mut h = HandedOut::default();
        assert!(h.first(&handed(7, false, 0)));
        h.settled(&[7]);
        assert!(h.0.is_empty());
        // Only a committed settlement is forgotten, and a new leader
        // resends only what is not settled: delivered (at least once).
        assert!(h.first(&handed(7, true, 0)));
    }
}
